//! A stored operation as the contract shows it: `google.longrunning.Operation`
//! named `operations/<id>`, its `BatchDeleteAssociationsMetadata` and, once
//! done, its `BatchDeleteAssociationsResponse` (packed in `Any`).
//!
//! A cancelled operation whose cancel left requests unsent ends with
//! `error` = CANCELLED; the per-request results then travel in that
//! status' details, as a `BatchDeleteAssociationsResponse` next to the
//! `ErrorInfo` (an operation carries either an error or a response).

use prost::Message;
use prost_types::{Any, Timestamp};
use tonic::Code;
use tonic_types::pb::Status as RpcStatus;

use super::operation_error::OperationError;
use super::status::{CallError, to_rpc};
use crate::operations::{Outcome, Snapshot, is_id};
use crate::pb::{BatchDeleteAssociationsMetadata, BatchDeleteAssociationsResponse};
use crate::proto::google::longrunning::{Operation, operation};

/// Every operation's name starts with this.
pub(super) const NAME_PREFIX: &str = "operations/";
const METADATA_TYPE: &str =
    "type.googleapis.com/infobip.provisioning.v1.BatchDeleteAssociationsMetadata";
const RESPONSE_TYPE: &str =
    "type.googleapis.com/infobip.provisioning.v1.BatchDeleteAssociationsResponse";

/// The operation `snapshot` on `account` (whose name statuses carry).
pub(super) fn operation(snapshot: &Snapshot, account: &str) -> Operation {
    let metadata = metadata(snapshot);
    let result = snapshot
        .results
        .as_ref()
        .filter(|_| snapshot.done)
        .map(|outcomes| {
            let results: Vec<RpcStatus> = outcomes.iter().map(|o| result(o, account)).collect();
            let cancelled = results.iter().any(|r| r.code == Code::Cancelled as i32);
            let response = BatchDeleteAssociationsResponse { results };
            if snapshot.cancel_requested && cancelled {
                let mut error = cancelled_status(account);
                error.details.push(any(RESPONSE_TYPE, &response));
                operation::Result::Error(error)
            } else {
                operation::Result::Response(any(RESPONSE_TYPE, &response))
            }
        });
    Operation {
        name: format!("{NAME_PREFIX}{}", snapshot.id),
        metadata: Some(any(METADATA_TYPE, &metadata)),
        done: snapshot.done,
        result,
    }
}

/// The progress of `snapshot`.
fn metadata(snapshot: &Snapshot) -> BatchDeleteAssociationsMetadata {
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    BatchDeleteAssociationsMetadata {
        total: count(snapshot.total),
        succeeded: count(snapshot.succeeded),
        failed: count(snapshot.failed),
        create_time: Some(timestamp(snapshot.create_us)),
        estimated_end_time: Some(timestamp(snapshot.estimated_end_us)),
        end_time: snapshot.end_us.map(timestamp),
        cancel_requested: snapshot.cancel_requested,
    }
}

/// One request's result as the caller sees it.
fn result(outcome: &Outcome, account: &str) -> RpcStatus {
    match outcome {
        Outcome::Stored(bytes) => {
            RpcStatus::decode(bytes.as_slice()).unwrap_or_else(|_| RpcStatus {
                code: Code::Unknown as i32,
                message: "the stored result of this request is unreadable".into(),
                details: Vec::new(),
            })
        }
        Outcome::Cancelled => cancelled_status(account),
        Outcome::Missing => RpcStatus {
            code: Code::Unknown as i32,
            message: "no result was stored for this request".into(),
            details: Vec::new(),
        },
    }
}

/// CANCELLED, as a request never sent (and a cancelled operation) ends.
pub(super) fn cancelled_status(account: &str) -> RpcStatus {
    to_rpc(&CallError::Operation(OperationError::Cancelled).to_status(account))
}

/// The id an operation's name carries.
pub(super) fn id_of(name: &str) -> Result<&str, OperationError> {
    name.strip_prefix(NAME_PREFIX)
        .filter(|id| is_id(id))
        .ok_or_else(|| OperationError::InvalidArgument {
            field: "name",
            problem: format!("must be {NAME_PREFIX}<id> as the gateway named it"),
        })
}

fn any(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

/// µs since the Unix epoch as a protobuf timestamp.
fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(results: Vec<Outcome>, cancel_requested: bool) -> Snapshot {
        Snapshot {
            id: "0".repeat(32),
            owner: "o".into(),
            fingerprint: String::new(),
            total: u32::try_from(results.len()).unwrap(),
            succeeded: 1,
            failed: 1,
            create_us: 1_500_000,
            estimated_end_us: 2_000_000,
            end_us: Some(2_500_000),
            cancel_requested,
            done: true,
            results: Some(results),
        }
    }

    #[test]
    fn a_done_operation_answers_its_results_in_order() {
        let ok = Vec::new();
        let op = operation(
            &snapshot(
                vec![Outcome::Stored(ok), Outcome::Stored(vec![0xff])],
                false,
            ),
            "a",
        );
        assert_eq!(op.name, format!("operations/{}", "0".repeat(32)));
        let Some(operation::Result::Response(any)) = op.result else {
            panic!("a response: {op:?}")
        };
        assert_eq!(any.type_url, RESPONSE_TYPE);
        let response = BatchDeleteAssociationsResponse::decode(any.value.as_slice()).unwrap();
        let codes: Vec<i32> = response.results.iter().map(|r| r.code).collect();
        assert_eq!(
            codes,
            [0, Code::Unknown as i32],
            "unreadable bytes: UNKNOWN, no panic"
        );
        let meta = BatchDeleteAssociationsMetadata::decode(op.metadata.unwrap().value.as_slice());
        let meta = meta.unwrap();
        assert_eq!(
            meta.create_time.unwrap(),
            Timestamp {
                seconds: 1,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn a_cancel_that_left_requests_unsent_ends_in_cancelled_with_the_results() {
        let op = operation(
            &snapshot(vec![Outcome::Stored(Vec::new()), Outcome::Cancelled], true),
            "a",
        );
        let Some(operation::Result::Error(error)) = op.result else {
            panic!("an error: {op:?}")
        };
        assert_eq!(error.code, Code::Cancelled as i32);
        let response = error
            .details
            .iter()
            .find(|d| d.type_url == RESPONSE_TYPE)
            .unwrap();
        let response = BatchDeleteAssociationsResponse::decode(response.value.as_slice()).unwrap();
        assert_eq!(response.results[1].code, Code::Cancelled as i32);
    }

    #[test]
    fn names_are_checked() {
        let id = "0123456789abcdef".repeat(2);
        assert_eq!(id_of(&format!("operations/{id}")).unwrap(), id);
        for bad in ["", "operations/", "ops/x", &id] {
            assert!(id_of(bad).is_err(), "{bad}");
        }
    }
}
