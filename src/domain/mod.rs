//! The gateway's own words for what a call is about: the association to
//! delete (parsed from the request, never checked again), the call that asks
//! for it (with `allow_missing` and its idempotency key) and the caller it
//! is deleted for (the key of fair shares). A leaf: imports only the
//! generated protobuf types.

mod association;
mod caller;
mod deletion;

pub use association::{Association, FieldViolation, InvalidRequest};
pub use caller::Caller;
pub use deletion::{Deletion, MAX_REQUEST_ID, RequestId};
