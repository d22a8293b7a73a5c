//! BatchDeleteAssociations, top to bottom: admit (as DeleteAssociation
//! does) → check the whole batch (each request exactly as DeleteAssociation
//! checks it; any problem refuses it all, naming `requests[i].<field>`, and
//! nothing is queued) → accept it at once as an operation whose requests
//! wait in the operations store for the account's drainer (`drain.rs`).
//!
//! The estimated end is the creation time plus one interval per request
//! waiting on the account (earlier batches included) and per request of
//! this batch: the pace when no interactive call takes a slot.

use std::sync::Arc;

use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::lro;
use super::operation_error::{MAX_VIOLATIONS, OperationError};
use super::report::UNKNOWN;
use super::service::Gateway;
use super::status::CallError;
use crate::auth::Identity;
use crate::domain::{Association, RequestId};
use crate::operations::{MAX_BATCH, NewOperation, Submitted};
use crate::pb::BatchDeleteAssociationsRequest;
use crate::proto::google::longrunning::Operation;
use crate::telemetry::{metrics, server_call};

/// Who may see an operation: the caller's identity. Anonymous callers
/// (no authentication configured) in a namespace of their own, so an
/// `x-caller` name never passes for an authenticated identity.
pub(super) fn owner(identity: &Identity) -> String {
    if identity.authenticated {
        identity.caller.id.to_string()
    } else {
        format!("anon:{}", identity.caller.id)
    }
}

/// Serves one BatchDeleteAssociations call.
pub(super) async fn submit(
    gateway: &Gateway,
    request: Request<BatchDeleteAssociationsRequest>,
) -> Result<Response<Operation>, Status> {
    let started = Instant::now();
    let peer_certs = request.peer_certs();
    let peer_certs = peer_certs.as_deref().map(Vec::as_slice);
    let (account, identity) = match gateway.admit(request.metadata(), peer_certs) {
        Ok(admitted) => admitted,
        Err((account, error)) => return Err(answer(gateway, account, UNKNOWN, started, error)),
    };
    let account = Arc::clone(account);
    let caller = gateway.auth.label(&identity);
    let mut batch = request.into_inner();
    let requests = match check(&batch) {
        Ok(requests) => requests,
        Err(invalid) => {
            return Err(answer(
                gateway,
                account.name(),
                caller,
                started,
                invalid.into(),
            ));
        }
    };
    let total = requests.len();
    // Encoded for the store: the decoded requests go before it is asked.
    batch.requests = Vec::new();
    let new = NewOperation {
        account: account.name().to_owned(),
        owner: owner(&identity),
        request_id: batch.request_id,
        requests,
        interval: account.line.interval(),
    };
    let fingerprint = new.fingerprint();
    let snapshot = match gateway.operations.submit(new).await {
        Ok(Submitted::Created(s)) => s,
        Ok(Submitted::Existing(s)) if s.fingerprint == fingerprint => s,
        Ok(Submitted::Existing(_)) => {
            let reused = OperationError::RequestIdReused.into();
            return Err(answer(gateway, account.name(), caller, started, reused));
        }
        Err(e) => {
            tracing::warn!(account = account.name(), error = %e, "batch not accepted");
            let unavailable = OperationError::Unavailable.into();
            return Err(answer(
                gateway,
                account.name(),
                caller,
                started,
                unavailable,
            ));
        }
    };
    metrics::request(account.name(), caller, tonic::Code::Ok, started.elapsed());
    server_call::label(account.name(), caller);
    tracing::info!(
        account = account.name(),
        caller,
        operation = %snapshot.id,
        requests = total,
        "batch accepted"
    );
    Ok(Response::new(lro::operation(&snapshot, account.name())))
}

/// A refused batch: counted, logged unless a flood, answered.
fn answer(
    gateway: &Gateway,
    account: &str,
    caller: &str,
    started: Instant,
    error: CallError,
) -> Status {
    let status = error.to_status(account);
    metrics::request(account, caller, status.code(), started.elapsed());
    server_call::label(account, caller);
    let kind = error.refusal().unwrap_or("batch");
    if gateway.refusals.log_now(account, caller, kind) {
        tracing::warn!(account, caller, reason = error.reason(), "batch refused");
    }
    status
}

/// The batch's requests, each checked as DeleteAssociation checks it and
/// encoded for the store; or every problem, by field path.
fn check(batch: &BatchDeleteAssociationsRequest) -> Result<Vec<Vec<u8>>, OperationError> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let n = batch.requests.len();
    if n == 0 || n > MAX_BATCH {
        problems.push((
            "requests".into(),
            format!("must hold 1 to {MAX_BATCH} requests, got {n}"),
        ));
    }
    // The rules of DeleteAssociation's request_id.
    if let Err(v) = RequestId::parse("request_id", batch.request_id.clone()) {
        problems.push((v.field.into(), v.description));
    }
    // Past the limit nothing is checked: the refusal names the count.
    let requests = batch.requests.iter().take(MAX_BATCH);
    for (i, request) in requests.enumerate() {
        // Enough to fill BadRequest and say how many more there are.
        if problems.len() > MAX_VIOLATIONS * 50 {
            break;
        }
        if !request.request_id.is_empty() {
            problems.push((
                format!("requests[{i}].request_id"),
                "must be empty inside a batch (the batch has its own request_id)".into(),
            ));
        }
        if let Err(invalid) = Association::try_from(request.clone()) {
            for v in invalid.0 {
                problems.push((format!("requests[{i}].{}", v.field), v.description));
            }
        }
    }
    if !problems.is_empty() {
        return Err(OperationError::InvalidBatch(problems));
    }
    Ok(batch.requests.iter().map(Message::encode_to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, DeleteAssociationRequest};

    fn valid(n: usize) -> DeleteAssociationRequest {
        DeleteAssociationRequest {
            resource_type: pb::ResourceType::Number as i32,
            channel: pb::Channel::Sms as i32,
            application_id: "app".into(),
            resource_id: format!("n{n}"),
            ..Default::default()
        }
    }

    fn fields(batch: BatchDeleteAssociationsRequest) -> Vec<String> {
        match check(&batch) {
            Err(OperationError::InvalidBatch(v)) => v.into_iter().map(|(f, _)| f).collect(),
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_named_by_its_request_index() {
        let mut requests: Vec<_> = (0..5).map(valid).collect();
        requests[3].resource_id.clear();
        requests[1].request_id = "x".into();
        let batch = BatchDeleteAssociationsRequest {
            requests,
            request_id: "b".repeat(65),
        };
        assert_eq!(
            fields(batch),
            [
                "request_id",
                "requests[1].request_id",
                "requests[3].resource_id"
            ]
        );
    }

    #[test]
    fn the_batch_request_id_follows_delete_associations_rules() {
        let batch = |id: &str| BatchDeleteAssociationsRequest {
            requests: vec![valid(0)],
            request_id: id.into(),
        };
        assert!(fields(batch("has space")) == ["request_id"]);
        assert!(check(&batch("2f1c-ok_id:1.x~y")).is_ok());
        assert!(check(&batch("")).is_ok());
    }

    /// A batch of garbage costs bounded work: checking stops once the
    /// problems pass 50 × what BadRequest shows, one item past the bound.
    #[test]
    fn checking_stops_one_item_past_fifty_times_the_violations_shown() {
        let bound = MAX_VIOLATIONS * 50;
        let requests = (0..MAX_BATCH)
            .map(|n| DeleteAssociationRequest {
                request_id: "inside".into(),
                ..valid(n)
            })
            .collect();
        let batch = BatchDeleteAssociationsRequest {
            requests,
            request_id: String::new(),
        };
        let found = fields(batch);
        assert_eq!(found.len(), bound + 1);
        assert_eq!(
            found.last().map(String::as_str),
            Some(format!("requests[{bound}].request_id").as_str())
        );
    }

    #[test]
    fn a_batch_holds_one_to_ten_thousand_requests() {
        let empty = BatchDeleteAssociationsRequest::default();
        assert_eq!(fields(empty), ["requests"]);
        let full = BatchDeleteAssociationsRequest {
            requests: (0..MAX_BATCH).map(valid).collect(),
            request_id: String::new(),
        };
        assert_eq!(check(&full).unwrap().len(), MAX_BATCH);
        let over = BatchDeleteAssociationsRequest {
            requests: (0..=MAX_BATCH).map(valid).collect(),
            request_id: String::new(),
        };
        assert_eq!(fields(over), ["requests"]);
    }
}
