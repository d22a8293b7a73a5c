//! provisioning-gateway: a gRPC front for Infobip's
//! `DELETE /provisioning/1/associations` that holds the vendor's budget
//! (1 request per second per account) centrally for every internal caller.
//!
//! Layers, lowest first (a module imports only modules of lower layers):
//! - leaves: [`domain`] (what a call is about), [`config`] (checked, inert
//!   settings), `keys` (API keys), `coalesce` (generic single flight);
//! - mechanisms: `telemetry`, `budget` (the line and the limiter), `upstream`
//!   (the Infobip client), `auth` (who calls, may it);
//! - the request path: `grpc`;
//! - wiring: [`startup`] (build, serve, drain), [`cli`], [`demo`].
//!
//! [`mock`] is the Infobip emulator used by `demo`, `mock-upstream` and the
//! tests. The public surface is what the binary, tests and benchmarks need;
//! [`testing`] holds the hooks only they use.
#![forbid(unsafe_code)]

mod auth;
mod budget;
pub mod cli;
mod coalesce;
pub mod config;
pub mod demo;
pub mod domain;
mod grpc;
mod keys;
pub mod mock;
pub mod startup;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
mod upstream;

pub use config::Config;
pub use keys::{ApiKey, KeySource};
pub use startup::App;

/// Code generated from `proto/infobip/provisioning/v1/associations.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("infobip.provisioning.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("provisioning_descriptor");
}

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "infobip.provisioning.v1.AssociationService";

/// The gateway's name and version, sent upstream as `User-Agent`.
pub const USER_AGENT: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));
