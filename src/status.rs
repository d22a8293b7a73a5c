//! The one place where a call's failure becomes a `tonic::Status`: the
//! mapping table of DESIGN.md, with exactly one `google.rpc.ErrorInfo` on
//! every error (AIP-193), `BadRequest` for field problems and `RetryInfo`
//! whenever coming back later can help.
//!
//! Messages are the vendor's `text` or a fixed sentence: never an internal
//! error chain, never the API key.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;
use crate::budget::BudgetError;
use crate::domain::InvalidRequest;
use crate::upstream::{Reply, TransportError};

/// `ErrorInfo.domain` of every error the gateway returns.
pub const DOMAIN: &str = "provisioning-gateway";
/// Longest upstream `text` copied into a status message.
const MAX_MESSAGE: usize = 512;

/// Everything that can end a call without success. `Clone`: coalesced calls
/// all receive the outcome of the one that ran.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("unknown account")]
    UnknownAccount,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("Infobip answered HTTP {}", .0.status)]
    Upstream(Reply),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl CallError {
    /// The `ErrorInfo.reason`: the vendor's messageId when there is one.
    pub fn reason(&self) -> String {
        match self {
            Self::Invalid(_) => "INVALID_REQUEST".into(),
            Self::UnknownAccount => "UNKNOWN_ACCOUNT".into(),
            Self::Auth(AuthError::Unauthenticated) => "UNAUTHENTICATED".into(),
            Self::Auth(AuthError::NotAllowed(_)) => "CALLER_NOT_ALLOWED".into(),
            Self::Budget(BudgetError::Exhausted { .. }) => "BUDGET_EXHAUSTED".into(),
            Self::Budget(BudgetError::ShuttingDown) => "SHUTTING_DOWN".into(),
            Self::Budget(BudgetError::BackendUnavailable) => "BUDGET_BACKEND_UNAVAILABLE".into(),
            Self::Upstream(reply) => reply
                .error
                .as_ref()
                .and_then(|e| e.message_id.as_deref())
                .map(reason_from_vendor)
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| format!("UPSTREAM_HTTP_{}", reply.status)),
            Self::Transport(TransportError::Timeout) => "UPSTREAM_TIMEOUT".into(),
            Self::Transport(_) => "UPSTREAM_UNREACHABLE".into(),
        }
    }

    /// The gRPC code, per the table.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::UnknownAccount => Code::InvalidArgument,
            Self::Auth(AuthError::Unauthenticated) => Code::Unauthenticated,
            Self::Auth(AuthError::NotAllowed(_)) => Code::PermissionDenied,
            Self::Budget(BudgetError::Exhausted { .. }) => Code::ResourceExhausted,
            Self::Budget(_) => Code::Unavailable,
            Self::Upstream(reply) => code_for_http(reply.status),
            Self::Transport(TransportError::Timeout) => Code::DeadlineExceeded,
            Self::Transport(_) => Code::Unavailable,
        }
    }

    /// The status returned to the caller, with rich details.
    pub fn to_status(&self, account: &str) -> Status {
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::from([("account".to_owned(), account.to_owned())]);
        let message = match self {
            Self::Invalid(invalid) => {
                for v in &invalid.0 {
                    details.add_bad_request_violation(v.field, &v.description);
                }
                invalid.to_string()
            }
            Self::UnknownAccount => {
                details
                    .add_bad_request_violation("x-infobip-account", "names no configured account");
                "unknown account in metadata x-infobip-account".to_owned()
            }
            Self::Budget(BudgetError::Exhausted {
                reason,
                retry_after,
            }) => {
                metadata.insert("rejection".into(), reason.as_str().into());
                metadata.insert("retry_after_ms".into(), retry_after.as_millis().to_string());
                details.set_retry_info(Some(*retry_after));
                self.to_string()
            }
            Self::Auth(AuthError::NotAllowed(caller)) => {
                metadata.insert("caller".into(), caller.clone());
                self.to_string()
            }
            Self::Budget(_) | Self::Transport(_) | Self::Auth(_) => self.to_string(),
            Self::Upstream(reply) => {
                metadata.insert("http_status".into(), reply.status.to_string());
                if reply.status == 429 {
                    details
                        .set_retry_info(Some(reply.retry_after.unwrap_or(Duration::from_secs(1))));
                }
                let error = reply.error.as_ref();
                for (field, problems) in error.iter().flat_map(|e| &e.validation_errors) {
                    for problem in problems {
                        details.add_bad_request_violation(proto_field(field), problem);
                    }
                }
                error
                    .and_then(|e| e.text.as_deref())
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| truncate(t, MAX_MESSAGE))
                    .unwrap_or_else(|| self.to_string())
            }
        };
        details.set_error_info(self.reason(), DOMAIN, metadata);
        Status::with_error_details(self.code(), message, details)
    }
}

/// The table's HTTP rows.
pub fn code_for_http(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        500 => Code::Internal,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ if (400..500).contains(&status) => Code::FailedPrecondition,
        // Other 5xx, and anything outside the HTTP error ranges (1xx, 3xx).
        _ => Code::Unavailable,
    }
}

/// Infobip's camelCase field names, as the proto spells them.
fn proto_field(vendor: &str) -> String {
    let mut out = String::with_capacity(vendor.len() + 4);
    for c in vendor.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A vendor messageId as an AIP-193 reason: UPPER_SNAKE_CASE, at most 63 chars.
fn reason_from_vendor(id: &str) -> String {
    let mut r: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while r.ends_with('_') {
        r.pop();
    }
    r.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit())
        .to_owned()
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ServiceException;
    use proptest::prelude::*;

    fn reply(status: u16, error: Option<ServiceException>) -> CallError {
        CallError::Upstream(Reply {
            status,
            error,
            retry_after: None,
        })
    }

    #[test]
    fn every_http_row_of_the_table() {
        let rows = [
            (204, Code::Ok),
            (400, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (409, Code::Aborted),
            (429, Code::ResourceExhausted),
            (499, Code::Cancelled),
            (500, Code::Internal),
            (501, Code::Unimplemented),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
            (418, Code::FailedPrecondition),
            (422, Code::FailedPrecondition),
            (505, Code::Unavailable),
            (599, Code::Unavailable),
        ];
        for (http, code) in rows {
            assert_eq!(code_for_http(http), code, "HTTP {http}");
        }
    }

    #[test]
    fn vendor_fields_and_reasons_are_translated() {
        assert_eq!(proto_field("applicationId"), "application_id");
        assert_eq!(proto_field("entityId"), "entity_id");
        assert_eq!(reason_from_vendor("TOO_MANY_REQUESTS"), "TOO_MANY_REQUESTS");
        assert_eq!(reason_from_vendor("bad-request."), "BAD_REQUEST");
    }

    #[test]
    fn validation_errors_become_a_bad_request() {
        let e = ServiceException {
            message_id: Some("BAD_REQUEST".into()),
            text: Some("Bad request".into()),
            validation_errors: [(
                "resourceId".to_owned(),
                vec!["must not be blank".to_owned()],
            )]
            .into(),
        };
        let status = reply(400, Some(e)).to_status("default");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "Bad request");
        let d = status.get_error_details();
        assert_eq!(
            d.bad_request().unwrap().field_violations[0].field,
            "resource_id"
        );
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "BAD_REQUEST");
        assert_eq!(info.metadata["http_status"], "400");
    }

    proptest! {
        #[test]
        fn any_upstream_answer_maps_to_a_status_with_one_error_info(
            status in 100u16..1000,
            id in proptest::option::of(".{0,80}"),
            text in proptest::option::of(".{0,2000}"),
        ) {
            let err = reply(status, Some(ServiceException { message_id: id, text, validation_errors: Default::default() }));
            let s = err.to_status("acct");
            let d = s.get_error_details();
            let info = d.error_info().unwrap();
            prop_assert!(!info.reason.is_empty() && info.reason.len() <= 63);
            prop_assert!(info.reason.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
            prop_assert_eq!(&info.metadata["http_status"], &status.to_string());
            prop_assert!(s.message().chars().count() <= MAX_MESSAGE + 40);
        }
    }
}
