//! Batches from the caller's side: submit one, wait for its operation, read
//! its metadata and per-request results (from the response, or from the
//! CANCELLED error's details), and tell which request an arrival was.

use std::time::Duration;

use prost::Message;
use provisioning_gateway::mock::Arrival;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::pb::{
    BatchDeleteAssociationsMetadata, BatchDeleteAssociationsRequest,
    BatchDeleteAssociationsResponse, DeleteAssociationRequest,
};
use provisioning_gateway::proto::google::longrunning::operations_client::OperationsClient;
use provisioning_gateway::proto::google::longrunning::{
    Operation, WaitOperationRequest, operation,
};
use tonic::transport::Channel;
use tonic_types::pb::Status as RpcStatus;

pub type Ops = OperationsClient<Channel>;

const METADATA: &str =
    "type.googleapis.com/infobip.provisioning.v1.BatchDeleteAssociationsMetadata";
const RESPONSE: &str =
    "type.googleapis.com/infobip.provisioning.v1.BatchDeleteAssociationsResponse";

/// A client of the `Operations` service at `addr` (`host:port`).
pub async fn ops(addr: impl std::fmt::Display) -> Ops {
    OperationsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// `msg` with a metadata entry.
pub fn with<T>(msg: T, key: &'static str, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(key, value.parse().unwrap());
    r
}

/// A batch of `requests` with `request_id`.
pub fn batch(
    requests: Vec<DeleteAssociationRequest>,
    request_id: &str,
) -> BatchDeleteAssociationsRequest {
    BatchDeleteAssociationsRequest {
        requests,
        request_id: request_id.into(),
    }
}

/// Submits `batch`; the operation as first answered.
pub async fn submit(
    client: &mut AssociationServiceClient<Channel>,
    batch: BatchDeleteAssociationsRequest,
) -> Operation {
    client
        .batch_delete_associations(batch)
        .await
        .unwrap()
        .into_inner()
}

/// WaitOperation until `name` is done (within 30 s).
pub async fn done(ops: &mut Ops, name: &str) -> Operation {
    let wait = WaitOperationRequest {
        name: name.into(),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    };
    let mut request = tonic::Request::new(wait);
    request.set_timeout(Duration::from_secs(31));
    let op = ops.wait_operation(request).await.unwrap().into_inner();
    assert!(op.done, "not done within 30 s: {:?}", metadata(&op));
    op
}

/// The operation's progress.
pub fn metadata(op: &Operation) -> BatchDeleteAssociationsMetadata {
    let any = op.metadata.as_ref().expect("metadata");
    assert_eq!(any.type_url, METADATA);
    BatchDeleteAssociationsMetadata::decode(any.value.as_slice()).unwrap()
}

/// The per-request results of a done operation, and its error if it ended
/// in one (the results then travel in the error's details).
pub fn results(op: &Operation) -> (Vec<RpcStatus>, Option<RpcStatus>) {
    let (any, error) = match op.result.as_ref().expect("a done operation has a result") {
        operation::Result::Response(any) => (any.clone(), None),
        operation::Result::Error(error) => {
            let any = error
                .details
                .iter()
                .find(|d| d.type_url == RESPONSE)
                .expect("the results in the error's details")
                .clone();
            (any, Some(error.clone()))
        }
    };
    assert_eq!(any.type_url, RESPONSE);
    let response = BatchDeleteAssociationsResponse::decode(any.value.as_slice()).unwrap();
    (response.results, error)
}

/// The results' codes.
pub fn codes(results: &[RpcStatus]) -> Vec<tonic::Code> {
    results
        .iter()
        .map(|r| tonic::Code::from_i32(r.code))
        .collect()
}

/// The `resource_id` an arrival at the emulator deleted.
pub fn resource(arrival: &Arrival) -> String {
    let body: serde_json::Value = serde_json::from_slice(&arrival.body).unwrap();
    body["resourceId"].as_str().unwrap().to_owned()
}
