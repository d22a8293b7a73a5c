//! Why a batch or an `Operations` call fails, before any upstream request:
//! its code, `ErrorInfo` reason and field violations. [`super::status`]
//! turns it into a status with the rest of the table.

use tonic::Code;

/// Violations copied into `BadRequest` at most (the rest are counted in
/// the ErrorInfo metadata `violations_omitted`): a batch of 10,000 invalid
/// items must still fit the 8 KiB of headers clients accept.
pub(crate) const MAX_VIOLATIONS: usize = 20;

/// A batch or operation call refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OperationError {
    /// Some requests of a batch (or the batch itself) are invalid: field
    /// paths such as `requests[3].resource_id`, with what is wrong.
    #[error("invalid batch: {}", summary(.0))]
    InvalidBatch(Vec<(String, String)>),
    /// The batch's request id names an earlier batch with other requests.
    #[error("request_id already names a batch of other requests from this caller")]
    RequestIdReused,
    /// A malformed argument of an `Operations` call.
    #[error("invalid {field}: {problem}")]
    InvalidArgument {
        field: &'static str,
        problem: String,
    },
    /// No such operation for this caller on this account.
    #[error("no such operation")]
    NotFound,
    /// DeleteOperation on an operation still running.
    #[error("the operation is still running: cancel it or wait until it is done")]
    Running,
    /// The operations store does not answer.
    #[error("the operations store is unavailable")]
    Unavailable,
    /// A batch item never sent, or the operation itself, once cancelled.
    #[error("cancelled before it was sent")]
    Cancelled,
}

impl OperationError {
    pub(crate) fn code(&self) -> Code {
        match self {
            Self::InvalidBatch(_) | Self::RequestIdReused | Self::InvalidArgument { .. } => {
                Code::InvalidArgument
            }
            Self::NotFound => Code::NotFound,
            Self::Running => Code::FailedPrecondition,
            Self::Unavailable => Code::Unavailable,
            Self::Cancelled => Code::Cancelled,
        }
    }

    /// The `ErrorInfo.reason`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::InvalidBatch(_) | Self::InvalidArgument { .. } => "INVALID_REQUEST",
            Self::RequestIdReused => "REQUEST_ID_REUSED",
            Self::NotFound => "OPERATION_NOT_FOUND",
            Self::Running => "OPERATION_RUNNING",
            Self::Unavailable => "OPERATIONS_UNAVAILABLE",
            Self::Cancelled => "OPERATION_CANCELLED",
        }
    }

    /// The refusal's kind in logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::InvalidBatch(_) | Self::InvalidArgument { .. } => "invalid_request",
            Self::RequestIdReused => "request_id_reused",
            Self::NotFound => "operation_not_found",
            Self::Running => "operation_running",
            Self::Unavailable => "operations_unavailable",
            Self::Cancelled => "operation_cancelled",
        }
    }

    /// The field violations for `BadRequest`, at most [`MAX_VIOLATIONS`],
    /// and how many were left out.
    pub(crate) fn violations(&self) -> (Vec<(String, String)>, usize) {
        match self {
            Self::InvalidBatch(all) => {
                let kept = all.iter().take(MAX_VIOLATIONS).cloned().collect();
                (kept, all.len().saturating_sub(MAX_VIOLATIONS))
            }
            Self::RequestIdReused => (
                vec![(
                    "request_id".into(),
                    "names an earlier batch of other requests".into(),
                )],
                0,
            ),
            Self::InvalidArgument { field, problem } => {
                (vec![((*field).to_owned(), problem.clone())], 0)
            }
            _ => (Vec::new(), 0),
        }
    }
}

/// How many problems, and the first.
fn summary(violations: &[(String, String)]) -> String {
    match violations.first() {
        None => "no requests".into(),
        Some((field, problem)) if violations.len() == 1 => format!("{field}: {problem}"),
        Some((field, problem)) => {
            format!("{} problems, first {field}: {problem}", violations.len())
        }
    }
}
