//! The rich error details of a status, read from the wire bytes
//! (`grpc-status-details-bin`, a `google.rpc.Status`) rather than through
//! `tonic_types::StatusExt`, whose `error_info()` keeps only the last
//! `ErrorInfo`: here a second one, or none, fails the test.

use prost::Message;
use tonic_types::pb::{ErrorInfo, Status as RpcStatus};

/// `ErrorInfo.domain` of every error the gateway returns.
pub const DOMAIN: &str = "provisioning-gateway";
const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// The `google.rpc.Status` a status carries in `grpc-status-details-bin`.
pub fn rpc_status(status: &tonic::Status) -> RpcStatus {
    assert!(
        !status.details().is_empty(),
        "no grpc-status-details-bin on {status:?}"
    );
    let rpc = RpcStatus::decode(status.details()).unwrap_or_else(|e| {
        panic!("grpc-status-details-bin is no google.rpc.Status ({e}): {status:?}")
    });
    assert_eq!(rpc.code, status.code() as i32, "details' code: {status:?}");
    assert_eq!(
        rpc.message,
        status.message(),
        "details' message: {status:?}"
    );
    rpc
}

/// Every `ErrorInfo` among the details, in order (none without details).
pub fn error_infos(status: &tonic::Status) -> Vec<ErrorInfo> {
    if status.details().is_empty() {
        return Vec::new();
    }
    rpc_status(status)
        .details
        .iter()
        .filter(|any| any.type_url == ERROR_INFO)
        .map(|any| {
            ErrorInfo::decode(any.value.as_slice())
                .unwrap_or_else(|e| panic!("an undecodable ErrorInfo ({e}): {status:?}"))
        })
        .collect()
}

/// THE `ErrorInfo` of `status`: panics unless there is exactly one, in the
/// gateway's domain.
pub fn error_info(status: &tonic::Status) -> ErrorInfo {
    let mut infos = error_infos(status);
    assert_eq!(
        infos.len(),
        1,
        "exactly one ErrorInfo, found {infos:?} on {status:?}"
    );
    let info = infos.remove(0);
    assert_eq!(info.domain, DOMAIN, "{status:?}");
    info
}

/// THE `ErrorInfo` of `status`, which must have `reason`.
pub fn error_info_with(status: &tonic::Status, reason: &str) -> ErrorInfo {
    let info = error_info(status);
    assert_eq!(info.reason, reason, "{status:?}");
    info
}
