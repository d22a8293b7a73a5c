//! `google.longrunning.Operations` for batches, on the gateway's port. Each
//! call is admitted as DeleteAssociation is (who calls, which account,
//! allowed?), and sees only the operations its caller created on that
//! account: any other name is NOT_FOUND.
//!
//! - GetOperation: the operation, with its results once done.
//! - ListOperations: the caller's operations on the account, newest first,
//!   in pages (`page_size` 1 to 1000, default 50; `page_token` is the last
//!   name's id); each with its metadata and `done`, without its results
//!   (read them with GetOperation: a page of 10,000-result operations
//!   would not fit a message). `filter` is not supported.
//! - CancelOperation: requests not yet sent are never sent.
//! - DeleteOperation: forgets a done operation; a running one is
//!   FAILED_PRECONDITION (cancel it first: deleting would drop its requests).
//! - WaitOperation: until done, `timeout`, the call's deadline, or
//!   [`MAX_WAIT`], whichever comes first; then the latest state.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::accounts::Account;
use super::batch::owner;
use super::lro;
use super::operation_error::OperationError;
use super::service::{Gateway, grpc_timeout};
use super::status::CallError;
use crate::operations::{Removal, Snapshot, is_id};
use crate::proto::google::longrunning::operations_server::Operations;
use crate::proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};

/// Operations per page unless the caller asks otherwise.
const DEFAULT_PAGE: usize = 50;
/// Operations per page at most.
const MAX_PAGE: usize = 1000;
/// Longest WaitOperation without a timeout or a deadline.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Time left to answer before the call's deadline.
const WAIT_MARGIN: Duration = Duration::from_millis(50);
/// How often WaitOperation looks again where other replicas drain.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// The `Operations` implementation. Cheap to clone.
#[derive(Clone)]
pub(crate) struct OperationsService {
    gateway: Gateway,
}

/// A caller admitted to an account: the account, and who owns what it sees.
struct Admitted {
    account: Arc<Account>,
    owner: String,
}

impl OperationsService {
    pub(crate) fn new(gateway: Gateway) -> Self {
        Self { gateway }
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<Admitted, Status> {
        let peer_certs = request.peer_certs();
        let peer_certs = peer_certs.as_deref().map(Vec::as_slice);
        match self.gateway.admit(request.metadata(), peer_certs) {
            Ok((account, identity)) => Ok(Admitted {
                account: Arc::clone(account),
                owner: owner(&identity),
            }),
            Err((account, error)) => Err(error.to_status(account)),
        }
    }

    /// The caller's operation `name`, or NOT_FOUND.
    async fn find(&self, who: &Admitted, name: &str, results: bool) -> Result<Snapshot, Status> {
        let account = who.account.name();
        let id = lro::id_of(name).map_err(|e| refuse(account, e))?;
        let found = self.gateway.operations.get(account, id, results).await;
        match found.map_err(|_| refuse(account, OperationError::Unavailable))? {
            Some(snapshot) if snapshot.owner == who.owner => Ok(snapshot),
            _ => Err(refuse(account, OperationError::NotFound)),
        }
    }
}

/// The status of a refused `Operations` call.
fn refuse(account: &str, error: OperationError) -> Status {
    CallError::Operation(error).to_status(account)
}

fn invalid(field: &'static str, problem: &str) -> OperationError {
    OperationError::InvalidArgument {
        field,
        problem: problem.to_owned(),
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let who = self.admit(&request)?;
        let account = who.account.name();
        let list = request.into_inner();
        let page_size = match usize::try_from(list.page_size) {
            Ok(0) => DEFAULT_PAGE,
            Ok(n) => n.min(MAX_PAGE),
            Err(_) => {
                return Err(refuse(
                    account,
                    invalid("page_size", "must not be negative"),
                ));
            }
        };
        if !matches!(list.name.as_str(), "" | "operations") {
            let problem = "must be empty or \"operations\"";
            return Err(refuse(account, invalid("name", problem)));
        }
        if !list.filter.is_empty() {
            return Err(refuse(account, invalid("filter", "is not supported")));
        }
        let before = match list.page_token.as_str() {
            "" => None,
            token if is_id(token) => Some(token),
            _ => {
                let problem = "must be a next_page_token this method returned";
                return Err(refuse(account, invalid("page_token", problem)));
            }
        };
        let store = &self.gateway.operations;
        let page = store.list(account, &who.owner, before, page_size).await;
        let page = page.map_err(|_| refuse(account, OperationError::Unavailable))?;
        Ok(Response::new(ListOperationsResponse {
            operations: page
                .operations
                .iter()
                .map(|s| lro::operation(s, account))
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
            unreachable: Vec::new(),
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let who = self.admit(&request)?;
        let snapshot = self.find(&who, &request.get_ref().name, true).await?;
        Ok(Response::new(lro::operation(&snapshot, who.account.name())))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let who = self.admit(&request)?;
        let account = who.account.name();
        let snapshot = self.find(&who, &request.get_ref().name, false).await?;
        let removal = self.gateway.operations.delete(account, &snapshot.id).await;
        match removal.map_err(|_| refuse(account, OperationError::Unavailable))? {
            Removal::Deleted => Ok(Response::new(())),
            Removal::Running => Err(refuse(account, OperationError::Running)),
            Removal::Missing => Err(refuse(account, OperationError::NotFound)),
        }
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let who = self.admit(&request)?;
        let account = who.account.name();
        let snapshot = self.find(&who, &request.get_ref().name, false).await?;
        let cancelled = self.gateway.operations.cancel(account, &snapshot.id).await;
        cancelled.map_err(|_| refuse(account, OperationError::Unavailable))?;
        tracing::info!(account, operation = %snapshot.id, "batch cancel requested");
        Ok(Response::new(()))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let started = Instant::now();
        let who = self.admit(&request)?;
        let account = who.account.name();
        let call_timeout = grpc_timeout(request.metadata()).map(|t| t.saturating_sub(WAIT_MARGIN));
        let wait = request
            .get_ref()
            .timeout
            .map(Duration::try_from)
            .transpose();
        let wait = wait.map_err(|_| refuse(account, invalid("timeout", "must not be negative")))?;
        let patience = [Some(MAX_WAIT), wait, call_timeout]
            .into_iter()
            .flatten()
            .min();
        let until = started + patience.unwrap_or(MAX_WAIT);
        let store = &self.gateway.operations;
        let name = &request.get_ref().name;
        loop {
            let mut changed = store.wakeups().changed();
            changed.borrow_and_update();
            let snapshot = self.find(&who, name, false).await?;
            if snapshot.done {
                let done = self.find(&who, name, true).await?;
                return Ok(Response::new(lro::operation(&done, account)));
            }
            if Instant::now() >= until {
                return Ok(Response::new(lro::operation(&snapshot, account)));
            }
            // Here the store says when this process changed something;
            // elsewhere (Redis: other replicas drain too) it is read again.
            let poll = if store.shared() { WAIT_POLL } else { MAX_WAIT };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = tokio::time::sleep(poll) => {}
                _ = changed.changed() => {}
            }
        }
    }
}
