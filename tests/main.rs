//! One integration test binary (one link): real gRPC over loopback against
//! the real server and the Infobip emulator or a raw TCP test upstream.

mod budget;
mod callers;
mod chaos;
mod cli;
mod coalesce;
mod contract;
mod lifecycle;
mod mapping;
mod observability;
mod redis;
mod support;
mod validation;
