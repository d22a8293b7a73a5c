//! The request path: [`service`] is the tonic handler and reads top to bottom
//! (admit → size and parse → record → flight → attempts → answer);
//! [`idempotent`] runs a call once per request_id; [`flight`] shares one run
//! among identical calls; [`attempt`] waits for a slot, sends, and decides on
//! retries; [`outcome`] settles a shared outcome for one caller
//! (`allow_missing`) and says whether it may have taken effect; [`report`]
//! writes the call's one log event and metrics; [`status`] is the mapping
//! table; [`accounts`] the per-account registry; [`lanes`] bounds the
//! fair-share lanes anonymous callers may open.
//!
//! Batches: [`batch`] checks and accepts BatchDeleteAssociations as an
//! operation; [`drain`] runs each account's queued requests in background
//! turns; [`operations`] serves `google.longrunning.Operations`; [`lro`]
//! shows a stored operation as the contract's `Operation`;
//! [`operation_error`] says why a batch or an operation call is refused.
//!
//! Imports the mechanisms (`auth`, `budget`, `coalesce`, `idempotency`,
//! `operations`, `upstream`, `telemetry`) and the leaves; nothing imports it
//! but `startup`.

mod accounts;
mod attempt;
mod batch;
mod drain;
mod flight;
mod idempotent;
mod lanes;
mod lro;
mod operation_error;
mod operations;
mod outcome;
mod report;
mod service;
pub(crate) mod status;

pub(crate) use accounts::Accounts;
pub(crate) use drain::drain_all;
pub(crate) use operations::OperationsService;
pub(crate) use service::{CallLimits, Gateway};
