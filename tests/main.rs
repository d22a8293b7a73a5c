//! One integration test binary (one link): real gRPC over loopback against
//! the real server and the Infobip emulator or a raw TCP test upstream.
// Measures wall time on the real clock, outside any paused runtime: the
// library's tokio-clock rule (clippy.toml) does not apply here.
#![allow(clippy::disallowed_types)]

mod batch_replicas;
mod batches;
mod budget;
mod callers;
mod certificates;
mod chaos;
mod cli;
mod coalesce;
mod contract;
mod hardening;
mod idempotency;
mod lifecycle;
mod line_script;
mod mapping;
mod observability;
mod promises;
mod redis;
mod retry_guidance;
mod shared_line;
mod support;
mod telemetry;
mod topologies;
mod topology_harness;
mod validation;
