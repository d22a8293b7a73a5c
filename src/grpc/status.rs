//! The one place where a call's failure becomes a `tonic::Status`: the
//! mapping table of the README, with exactly one `google.rpc.ErrorInfo` on
//! every error (AIP-193), `BadRequest` for field problems and `RetryInfo`
//! whenever coming back later can help.
//!
//! Messages are the vendor's `text` or a fixed sentence: never an internal
//! error chain, never the API key.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use tonic::{Code, Status};
use tonic_types::pb::{BadRequest, RetryInfo, bad_request::FieldViolation};

use super::operation_error::{MAX_VIOLATIONS, OperationError};
use crate::auth::AuthError;
use crate::budget::{BudgetError, Rejection};
use crate::domain::InvalidRequest;
use crate::idempotency::Refused;
use crate::upstream::{Reply, TransportError};

mod rpc;
mod vendor;

pub(crate) use rpc::{from_rpc, to_rpc};
use vendor::{proto_field, reason_from_vendor, truncate};

/// `ErrorInfo.domain` of every error the gateway returns.
pub const DOMAIN: &str = "provisioning-gateway";
/// Longest upstream `text` copied into a status message, in bytes.
const MAX_MESSAGE: usize = 512;
/// Most bytes of vendor validation errors copied into `BadRequest` (field
/// paths and descriptions), at most [`MAX_VIOLATIONS`] of them (the bound
/// batch refusals have too), each at most [`MAX_VIOLATION`] bytes. Together
/// with the message, the details stay far under the 8 KiB of headers common
/// gRPC clients accept (`grpc-status-details-bin` is base64: 4/3 of these
/// bytes); a vendor 400 listing thousands of problems would otherwise reach
/// the caller as a protocol error. What is left out is counted in the
/// ErrorInfo metadata `violations_omitted`.
const MAX_VIOLATION_BYTES: usize = 2048;
const MAX_VIOLATION: usize = 200;
/// `RetryInfo` is rounded up to this: a hint need not be finer, and identical
/// refusals then carry identical bytes, which HTTP/2 header compression sends
/// as a table index instead of a fresh 200-byte header (load shedding).
const RETRY_GRANULARITY: Duration = Duration::from_millis(10);
/// The trailer of the gRPC retry design (A6) by which a server tells a
/// retrying client when to try again; on budget refusals only.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// `google.rpc.ErrorInfo`, wire-identical to tonic-types' but with its
/// metadata in key order: the same error always encodes to the same bytes.
#[derive(Clone, PartialEq, Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
    #[prost(btree_map = "string, string", tag = "3")]
    metadata: BTreeMap<String, String>,
}

/// Rich details under construction: BadRequest, RetryInfo, ErrorInfo.
#[derive(Default)]
struct Details {
    violations: Vec<FieldViolation>,
    retry: Option<Duration>,
}

impl Details {
    fn violation(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation {
            field: field.into(),
            description: description.into(),
            ..FieldViolation::default()
        });
    }

    /// The status carrying these details and `error_info`.
    fn into_status(self, code: Code, message: String, error_info: ErrorInfo) -> Status {
        let any = |name: &str, value: Vec<u8>| Any {
            type_url: format!("type.googleapis.com/google.rpc.{name}"),
            value,
        };
        let mut details = Vec::with_capacity(3);
        if !self.violations.is_empty() {
            let bad = BadRequest {
                field_violations: self.violations,
            };
            details.push(any("BadRequest", bad.encode_to_vec()));
        }
        if let Some(delay) = self.retry {
            let retry = RetryInfo {
                retry_delay: prost_types::Duration::try_from(delay).ok(),
            };
            details.push(any("RetryInfo", retry.encode_to_vec()));
        }
        details.push(any("ErrorInfo", error_info.encode_to_vec()));
        let status = tonic_types::pb::Status {
            code: code as i32,
            message: message.clone(),
            details,
        };
        Status::with_details(code, message, status.encode_to_vec().into())
    }
}

/// `d` rounded up to [`RETRY_GRANULARITY`].
fn round_up(d: Duration) -> Duration {
    let step = RETRY_GRANULARITY.as_nanos();
    let steps = d.as_nanos().div_ceil(step);
    Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
}

/// Everything that can end a call without success. `Clone`: coalesced calls
/// all receive the outcome of the one that ran.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("unknown account")]
    UnknownAccount,
    /// The request encodes to more than the gateway accepts.
    #[error("the request is {size} bytes, over the limit of {limit}")]
    RequestTooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("Infobip answered HTTP {}", .0.status)]
    Upstream(Reply),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Idempotency(#[from] Refused),
    /// An earlier call with the same request_id ended with this answer.
    #[error("the answer of an earlier call with this request_id")]
    Replayed(tonic_types::pb::Status),
    /// A batch or an `Operations` call refused.
    #[error(transparent)]
    Operation(#[from] OperationError),
}

impl CallError {
    /// The `ErrorInfo.reason`: the vendor's messageId when there is one.
    pub fn reason(&self) -> String {
        match self {
            Self::Invalid(_) => "INVALID_REQUEST".into(),
            Self::UnknownAccount => "UNKNOWN_ACCOUNT".into(),
            Self::RequestTooLarge { .. } => "REQUEST_TOO_LARGE".into(),
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
            Self::Operation(e) => e.reason().into(),
            Self::Transport(_) => "UPSTREAM_UNREACHABLE".into(),
            Self::Idempotency(Refused::Reused) => "REQUEST_ID_REUSED".into(),
            Self::Idempotency(Refused::InProgress) => "REQUEST_IN_PROGRESS".into(),
            Self::Idempotency(Refused::Unavailable) => "IDEMPOTENCY_BACKEND_UNAVAILABLE".into(),
            Self::Replayed(status) => rpc::reason(status).unwrap_or_default(),
        }
    }

    /// The kind of a refusal, for logs: an answer the gateway made without
    /// asking Infobip (nothing was sent). `None` for outcomes that came from
    /// an upstream attempt: those calls were served, each is logged.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            Self::Invalid(_) => Some("invalid_request"),
            Self::UnknownAccount => Some("unknown_account"),
            Self::RequestTooLarge { .. } => Some("request_too_large"),
            Self::Auth(AuthError::Unauthenticated) => Some("unauthenticated"),
            Self::Auth(AuthError::NotAllowed(_)) => Some("caller_not_allowed"),
            Self::Budget(e) => Some(e.as_str()),
            Self::Idempotency(Refused::Reused) => Some("request_id_reused"),
            Self::Idempotency(Refused::InProgress) => Some("request_in_progress"),
            Self::Idempotency(Refused::Unavailable) => Some("idempotency_unavailable"),
            Self::Operation(e) => Some(e.kind()),
            Self::Upstream(_) | Self::Transport(_) | Self::Replayed(_) => None,
        }
    }

    /// The gRPC code, per the table.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::UnknownAccount => Code::InvalidArgument,
            // What tonic answers to a message over its decoding limit, so
            // both size limits read alike; not RESOURCE_EXHAUSTED, which
            // here means "the budget: come back later".
            Self::RequestTooLarge { .. } => Code::OutOfRange,
            Self::Auth(AuthError::Unauthenticated) => Code::Unauthenticated,
            Self::Auth(AuthError::NotAllowed(_)) => Code::PermissionDenied,
            Self::Budget(BudgetError::Exhausted { .. }) => Code::ResourceExhausted,
            Self::Budget(_) => Code::Unavailable,
            Self::Upstream(reply) => code_for_http(reply.status),
            Self::Transport(TransportError::Timeout) => Code::DeadlineExceeded,
            Self::Transport(_) => Code::Unavailable,
            Self::Idempotency(Refused::Reused) => Code::InvalidArgument,
            Self::Idempotency(Refused::InProgress) => Code::DeadlineExceeded,
            Self::Idempotency(Refused::Unavailable) => Code::Unavailable,
            Self::Replayed(status) => Code::from_i32(status.code),
            Self::Operation(e) => e.code(),
        }
    }

    /// The status returned to the caller, with rich details. Budget
    /// refusals are built once per thread and reused while identical (same
    /// account, reason and rounded `RetryInfo`): under a flood, shedding load
    /// must stay cheap.
    pub fn to_status(&self, account: &str) -> Status {
        let Self::Budget(BudgetError::Exhausted {
            reason,
            retry_after,
        }) = self
        else {
            return self.build_status(account);
        };
        thread_local! {
            static LAST_REFUSAL: RefCell<Option<(String, Rejection, Duration, Status)>> =
                const { RefCell::new(None) };
        }
        let retry_after = round_up(*retry_after);
        LAST_REFUSAL.with_borrow_mut(|last| match last {
            Some((a, r, d, status)) if a == account && r == reason && *d == retry_after => {
                status.clone()
            }
            _ => {
                let status = self.build_status(account);
                *last = Some((account.to_owned(), *reason, retry_after, status.clone()));
                status
            }
        })
    }

    fn build_status(&self, account: &str) -> Status {
        let mut details = Details::default();
        let mut metadata = BTreeMap::from([("account".to_owned(), account.to_owned())]);
        let message = match self {
            Self::Invalid(invalid) => {
                for v in &invalid.0 {
                    details.violation(v.field, &v.description);
                }
                invalid.to_string()
            }
            Self::UnknownAccount => {
                details.violation("x-infobip-account", "names no configured account");
                "unknown account in metadata x-infobip-account".to_owned()
            }
            Self::Budget(BudgetError::Exhausted {
                reason,
                retry_after,
            }) => {
                let retry_after = round_up(*retry_after);
                metadata.insert("rejection".into(), reason.as_str().into());
                metadata.insert("retry_after_ms".into(), retry_after.as_millis().to_string());
                details.retry = Some(retry_after);
                self.to_string()
            }
            Self::RequestTooLarge { size, limit } => {
                metadata.insert("size_bytes".into(), size.to_string());
                metadata.insert("limit_bytes".into(), limit.to_string());
                self.to_string()
            }
            Self::Auth(AuthError::NotAllowed(caller)) => {
                metadata.insert("caller".into(), caller.clone());
                self.to_string()
            }
            Self::Idempotency(Refused::Reused) => {
                details.violation(
                    "request_id",
                    "was used for a different request within 24 hours",
                );
                self.to_string()
            }
            Self::Budget(_) | Self::Transport(_) | Self::Auth(_) | Self::Idempotency(_) => {
                self.to_string()
            }
            Self::Replayed(status) => return from_rpc(status),
            Self::Operation(e) => {
                let (violations, omitted) = e.violations();
                for (field, problem) in violations {
                    details.violation(field, problem);
                }
                if omitted > 0 {
                    metadata.insert("violations_omitted".into(), omitted.to_string());
                }
                truncate(&e.to_string(), MAX_MESSAGE)
            }
            Self::Upstream(reply) => {
                metadata.insert("http_status".into(), reply.status.to_string());
                if reply.status == 429 {
                    details.retry = Some(reply.retry_after.unwrap_or(Duration::from_secs(1)));
                }
                let error = reply.error.as_ref();
                let problems = error
                    .iter()
                    .flat_map(|e| &e.validation_errors)
                    .flat_map(|(field, problems)| problems.iter().map(move |p| (field, p)));
                let (mut bytes, mut omitted) = (0, 0usize);
                for (field, problem) in problems {
                    let field = truncate(&proto_field(field), MAX_VIOLATION);
                    let problem = truncate(problem, MAX_VIOLATION);
                    bytes += field.len() + problem.len();
                    if details.violations.len() < MAX_VIOLATIONS && bytes <= MAX_VIOLATION_BYTES {
                        details.violation(field, problem);
                    } else {
                        omitted += 1;
                    }
                }
                if omitted > 0 {
                    metadata.insert("violations_omitted".into(), omitted.to_string());
                }
                error
                    .and_then(|e| e.text.as_deref())
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| truncate(t, MAX_MESSAGE))
                    .unwrap_or_else(|| self.to_string())
            }
        };
        let error_info = ErrorInfo {
            reason: self.reason(),
            domain: DOMAIN.to_owned(),
            metadata,
        };
        let retry = details.retry;
        let mut status = details.into_status(self.code(), message, error_info);
        // Budget refusals tell a retrying client when (RetryInfo says the same).
        if let (Self::Budget(_), Some(delay)) = (self, retry) {
            let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            status.metadata_mut().insert(RETRY_PUSHBACK, millis.into());
        }
        status
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ServiceException;
    use proptest::prelude::*;
    use tonic_types::StatusExt;

    fn reply(status: u16, error: Option<ServiceException>) -> CallError {
        CallError::Upstream(Reply {
            status,
            error,
            retry_after: None,
        })
    }

    fn refusal(retry_after: Duration) -> Status {
        CallError::Budget(BudgetError::Exhausted {
            reason: Rejection::QueueFull,
            retry_after,
        })
        .to_status("default")
    }

    #[test]
    fn identical_refusals_encode_to_identical_bytes_with_retry_rounded_up() {
        let a = refusal(Duration::from_micros(1_000_001));
        let b = refusal(Duration::from_micros(1_009_999));
        assert_eq!(a.details(), b.details(), "same bytes within one 10 ms step");
        let details = a.get_error_details();
        let retry = details.retry_info().unwrap().retry_delay.unwrap();
        assert_eq!(retry, Duration::from_millis(1010), "rounded up, never down");
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "BUDGET_EXHAUSTED");
        assert_eq!(info.metadata["retry_after_ms"], "1010");
        assert_eq!(info.metadata["rejection"], "queue_full");
        assert_eq!(info.metadata["account"], "default");
        // Reused per thread only while identical: each refusal below differs
        // from the one right before it in one thing only (the rounded delay,
        // the reason, the account), and gets a status of its own.
        let later = refusal(Duration::from_millis(1011));
        assert_ne!(a.details(), later.details());
        let retry = later.get_error_details().retry_info().unwrap().retry_delay;
        assert_eq!(retry, Some(Duration::from_millis(1020)));
        let refused = |reason, account| {
            let status = CallError::Budget(BudgetError::Exhausted {
                reason,
                retry_after: Duration::from_millis(1011),
            })
            .to_status(account);
            status.get_error_details().error_info().cloned().unwrap()
        };
        let deadline = refused(Rejection::Deadline, "default");
        assert_eq!(deadline.metadata["rejection"], "deadline");
        assert_eq!(deadline.metadata["account"], "default");
        let other = refused(Rejection::Deadline, "other");
        assert_eq!(other.metadata["rejection"], "deadline");
        assert_eq!(other.metadata["account"], "other");
    }

    #[test]
    fn only_budget_refusals_carry_the_retry_pushback_trailer() {
        let refused = refusal(Duration::from_millis(1234));
        let pushback = refused.metadata().get(RETRY_PUSHBACK).unwrap();
        assert_eq!(
            pushback.to_str().unwrap(),
            "1240",
            "RetryInfo's delay, in ms"
        );
        let mut vendor_429 = Reply::new(429, &Default::default(), b"");
        vendor_429.retry_after = Some(Duration::from_secs(2));
        let others = [
            CallError::Upstream(vendor_429),
            CallError::Budget(BudgetError::ShuttingDown),
            CallError::Transport(TransportError::Timeout),
            CallError::Idempotency(Refused::InProgress),
        ];
        for other in others {
            let status = other.to_status("default");
            assert!(status.metadata().get(RETRY_PUSHBACK).is_none(), "{other:?}");
        }
    }

    #[test]
    fn a_reused_request_id_is_named_in_a_bad_request() {
        let status = CallError::Idempotency(Refused::Reused).to_status("default");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "request_id");
        assert_eq!(details.error_info().unwrap().reason, "REQUEST_ID_REUSED");
    }

    #[test]
    fn an_invalid_batch_shows_twenty_violations_and_counts_the_rest() {
        let invalid = |n: usize| {
            let all = (0..n)
                .map(|i| (format!("requests[{i}].resource_id"), "is empty".to_owned()))
                .collect();
            CallError::Operation(OperationError::InvalidBatch(all)).to_status("default")
        };
        let status = invalid(MAX_VIOLATIONS + 5);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let shown = &details.bad_request().unwrap().field_violations;
        assert_eq!(shown.len(), MAX_VIOLATIONS);
        let last = MAX_VIOLATIONS - 1;
        assert_eq!(shown[last].field, format!("requests[{last}].resource_id"));
        let info = details.error_info().unwrap();
        assert_eq!(info.metadata["violations_omitted"], "5");
        // None left out: no count at all.
        let details = invalid(MAX_VIOLATIONS).get_error_details();
        let shown = &details.bad_request().unwrap().field_violations;
        assert_eq!(shown.len(), MAX_VIOLATIONS);
        let info = details.error_info().unwrap();
        assert!(
            !info.metadata.contains_key("violations_omitted"),
            "{info:?}"
        );
    }

    #[test]
    fn a_replayed_status_is_answered_as_it_was_stored() {
        let first = reply(404, None).to_status("default");
        let replayed = CallError::Replayed(to_rpc(&first));
        assert_eq!(replayed.code(), Code::NotFound);
        assert_eq!(replayed.reason(), "UPSTREAM_HTTP_404");
        let again = replayed.to_status("other");
        assert_eq!(again.message(), first.message());
        assert_eq!(again.details(), first.details());
    }

    #[test]
    fn a_status_survives_the_round_trip_through_google_rpc_status() {
        let status = refusal(Duration::from_millis(1500));
        let rpc = to_rpc(&status);
        assert_eq!(rpc.code, Code::ResourceExhausted as i32);
        assert!(!rpc.details.is_empty());
        let back = from_rpc(&rpc);
        assert_eq!(back.code(), status.code());
        assert_eq!(back.message(), status.message());
        assert_eq!(back.details(), status.details());
        let plain = from_rpc(&to_rpc(&Status::not_found("gone")));
        assert_eq!((plain.code(), plain.message()), (Code::NotFound, "gone"));
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
        // AIP-193: a reason starts with a letter.
        assert_eq!(reason_from_vendor("4xx-too-many"), "XX_TOO_MANY");
        assert_eq!(reason_from_vendor("_1_busy"), "BUSY");
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
        // Nothing left out, nothing counted.
        assert!(
            !info.metadata.contains_key("violations_omitted"),
            "{info:?}"
        );
    }

    #[test]
    fn vendor_violations_are_cut_at_their_count_or_their_bytes_whichever_comes_first() {
        // `n` problems of `size` bytes each (field path and description).
        let shown_and_omitted = |n: usize, size: usize| {
            let problem = "x".repeat(size - "field000".len());
            let e = ServiceException {
                message_id: Some("BAD_REQUEST".into()),
                text: Some("Bad request".into()),
                validation_errors: (0..n)
                    .map(|i| (format!("field{i:03}"), vec![problem.clone()]))
                    .collect(),
            };
            let details = reply(400, Some(e)).to_status("default").get_error_details();
            let shown = &details.bad_request().unwrap().field_violations;
            let fields: Vec<String> = shown.iter().map(|v| v.field.clone()).collect();
            let info = details.error_info().unwrap();
            (fields, info.metadata["violations_omitted"].clone())
        };
        // 2 KiB holds ten of 200 bytes; the count bound alone lets fifteen in.
        let (fields, omitted) = shown_and_omitted(15, 200);
        assert_eq!(fields.len(), MAX_VIOLATION_BYTES / 200, "{fields:?}");
        assert_eq!((&*fields[0], &*fields[9]), ("field000", "field009"));
        assert_eq!(omitted, "5");
        // Small ones stop at the count.
        let (fields, omitted) = shown_and_omitted(MAX_VIOLATIONS + 5, 20);
        assert_eq!(fields.len(), MAX_VIOLATIONS, "{fields:?}");
        assert_eq!(omitted, "5");
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
            prop_assert!(s.message().len() <= MAX_MESSAGE + 40);
        }
    }
}
