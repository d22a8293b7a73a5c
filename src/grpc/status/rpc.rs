//! A status as `google.rpc.Status` and back: what a batch result or a
//! stored outcome of an idempotent call carries (code, message, the same
//! details), so the answer read back is the one first given.

use prost::Message;
use tonic::{Code, Status};
use tonic_types::pb::Status as RpcStatus;

use super::ErrorInfo;

/// A status as `google.rpc.Status` (code, message, the same details), as a
/// batch result or a stored outcome carries it.
pub(crate) fn to_rpc(status: &Status) -> RpcStatus {
    let details = RpcStatus::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default();
    RpcStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details,
    }
}

/// The status a stored `google.rpc.Status` stands for, details included.
pub(crate) fn from_rpc(rpc: &RpcStatus) -> Status {
    let code = Code::from_i32(rpc.code);
    if rpc.details.is_empty() {
        return Status::new(code, rpc.message.clone());
    }
    Status::with_details(code, rpc.message.clone(), rpc.encode_to_vec().into())
}

/// The `ErrorInfo.reason` a stored status carries, for logs.
pub(super) fn reason(rpc: &RpcStatus) -> Option<String> {
    rpc.details
        .iter()
        .filter(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .find_map(|any| ErrorInfo::decode(any.value.as_slice()).ok())
        .map(|info| info.reason)
}
