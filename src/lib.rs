//! provisioning-gateway: a gRPC front for Infobip's
//! `DELETE /provisioning/1/associations` that holds the vendor's budget
//! (1 request per second per account) centrally for every internal caller.
//!
//! Layers, lowest first (a module imports only modules of lower layers):
//! - leaves: [`domain`] (what a call is about), [`config`] (checked, inert
//!   settings), `keys` (API keys), `coalesce` (generic single flight);
//! - mechanisms: `telemetry`, `budget` (the line and the limiter), `upstream`
//!   (the Infobip client), `auth` (who calls, may it), `idempotency` (what
//!   calls with a request_id did; beside the budget, on its Redis
//!   connection), `operations` (batches as stored: in the process or in
//!   Redis);
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
mod idempotency;
mod keys;
pub mod mock;
mod operations;
pub mod startup;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
mod upstream;

pub use config::Config;
pub use keys::{ApiKey, KeySource};
pub use startup::App;

/// Code generated from the contract, one module per protobuf package (the
/// generated code names its imports by relative path).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// `google.*` definitions the contract imports (their comments are
    /// Google's, written for protobuf, not rustdoc).
    #[allow(rustdoc::all)]
    pub mod google {
        /// `google.api` (HTTP and client annotations).
        pub mod api {
            tonic::include_proto!("google.api");
        }
        /// `google.longrunning`: `Operation` and the `Operations` service.
        pub mod longrunning {
            tonic::include_proto!("google.longrunning");
        }
    }
    /// The gateway's own package.
    pub mod infobip {
        /// `infobip.provisioning`.
        pub mod provisioning {
            /// `infobip.provisioning.v1`.
            pub mod v1 {
                tonic::include_proto!("infobip.provisioning.v1");
            }
        }
    }
}

/// The contract's own package, `infobip.provisioning.v1`.
pub mod pb {
    pub use crate::proto::infobip::provisioning::v1::*;

    /// Encoded file descriptor set (the contract and every definition it
    /// imports), served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("provisioning_descriptor");
}

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "infobip.provisioning.v1.AssociationService";

/// The gateway's name and version, sent upstream as `User-Agent`.
pub const USER_AGENT: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));
