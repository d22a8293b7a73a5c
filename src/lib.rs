//! provisioning-gateway: a gRPC front for Infobip's
//! `DELETE /provisioning/1/associations` that holds the vendor's budget
//! (1 request per second per account) centrally for every internal caller.
//!
//! The request path, top to bottom, is in [`grpc`]; [`startup`] builds and runs
//! the server; [`mock`] is the Infobip emulator used by `demo`, `mock-upstream`
//! and the tests.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod domain;
pub mod grpc;
pub mod keys;
pub mod mock;
pub mod send_clock;
pub mod startup;
pub mod status;
pub mod telemetry;
pub mod upstream;

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
