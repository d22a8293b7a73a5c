//! The gateway's own words for what a call is about: the association to
//! delete (parsed from the request, never checked again) and the caller it
//! is deleted for (the key of fair shares). A leaf: imports only the
//! generated protobuf types.

mod association;
mod caller;

pub use association::{Association, FieldViolation, InvalidRequest};
pub use caller::Caller;
