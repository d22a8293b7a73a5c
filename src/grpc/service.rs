//! The tonic handler. A call reads top to bottom in [`Gateway::admit_call`]
//! (admit: who, which account, allowed? → size and parse; all before the
//! call's future exists) and [`Gateway::delete`]: its request_id's record
//! (answer a stored outcome, join the call that runs) → flight (identical
//! calls share one) → attempts (budget slot, one DELETE, retry what did not
//! take effect) → answer (status, span, metrics, one log event).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::accounts::{Account, Accounts};
use super::attempt::Sender;
use super::flight::{Call, Flights};
use super::idempotent::Deleter;
use super::lanes::AnonymousLanes;
use super::report::{Report, UNKNOWN};
use super::status::CallError;
use crate::auth::{Authenticator, Identity};
use crate::domain::{Caller, Deletion};
use crate::idempotency::Records;
use crate::operations::OperationStore;
use crate::pb::association_service_server::AssociationService;
use crate::pb::{DeleteAssociationRequest, DeleteAssociationResponse};
use crate::telemetry::refusals::RefusalLog;
use crate::upstream::Upstream;

/// Largest request accepted, as its fields encode: a valid request is well
/// under 2 KiB. tonic's own decoding limit is far higher (a memory guard);
/// this one answers with the gateway's ErrorInfo.
pub(crate) const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// Per-call limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    pub(crate) upstream_timeout: Duration,
    pub(crate) upstream_reserve: Duration,
    /// Deadline of a call that sets none: max-wait + upstream timeout.
    pub(crate) default_deadline: Duration,
}

/// The `AssociationService` implementation. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Gateway {
    pub(super) accounts: Arc<Accounts>,
    pub(super) auth: Arc<Authenticator>,
    pub(super) sender: Sender,
    pub(super) limits: CallLimits,
    flights: Arc<Flights>,
    /// What calls with a request_id did.
    records: Arc<Records>,
    lanes: Arc<AnonymousLanes>,
    /// Refusals of one kind are logged once, then counted.
    pub(super) refusals: Arc<RefusalLog>,
    /// Batches: where their operations and requests wait.
    pub(super) operations: Arc<dyn OperationStore>,
}

/// A call admitted, sized and parsed: what its future holds while it
/// waits in line (the request itself is gone by then).
struct Admitted<'a> {
    account: &'a Arc<Account>,
    identity: Identity,
    /// The fair-share lane: the identity, or a bounded anonymous one.
    lane: Caller,
    deletion: Deletion,
    started: Instant,
    deadline: Instant,
}

type Answer = Result<Response<DeleteAssociationResponse>, Status>;

#[tonic::async_trait]
impl AssociationService for Gateway {
    /// Admission, size and parsing run before the call's future exists, so
    /// a call waiting in line holds only what its deletion needs: 10,000
    /// waiting calls are mostly their futures (BENCHMARKS §5).
    fn delete_association<'life0, 'async_trait>(
        &'life0 self,
        request: Request<DeleteAssociationRequest>,
    ) -> BoxFuture<'async_trait, Answer>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        match self.admit_call(request) {
            Ok(admitted) => Box::pin(self.delete(admitted)),
            Err(refused) => Box::pin(std::future::ready(refused)),
        }
    }

    async fn batch_delete_associations(
        &self,
        request: Request<crate::pb::BatchDeleteAssociationsRequest>,
    ) -> Result<Response<crate::proto::google::longrunning::Operation>, Status> {
        super::batch::submit(self, request).await
    }
}

impl Gateway {
    /// Admits (decided before any budget is spent), then sizes and parses:
    /// a refusal here costs no budget and sends nothing.
    fn admit_call(
        &self,
        request: Request<DeleteAssociationRequest>,
    ) -> Result<Admitted<'_>, Answer> {
        let started = Instant::now();
        // A caller's timeout may be up to 8 digits of hours: never past what
        // an instant can hold (no panic on a request path).
        let timeout = grpc_timeout(request.metadata()).unwrap_or(self.limits.default_deadline);
        let deadline = started
            .checked_add(timeout)
            .unwrap_or_else(|| started + self.limits.default_deadline);
        let refuse = |account: &str, caller: &str, error: CallError| {
            let report = Report::default();
            Err(report.answer(&self.refusals, account, caller, started, Err(error)))
        };

        let peer_certs = request.peer_certs();
        let peer_certs = peer_certs.as_deref().map(Vec::as_slice);
        let (account, identity) = match self.admit(request.metadata(), peer_certs) {
            Ok(admitted) => admitted,
            Err((account, error)) => return refuse(account, UNKNOWN, error),
        };
        let lane = if identity.authenticated {
            identity.caller.clone()
        } else {
            self.lanes.lane(request.remote_addr(), &identity.caller)
        };

        let size = request.get_ref().encoded_len();
        if size > MAX_REQUEST_BYTES {
            let too_large = CallError::RequestTooLarge {
                size,
                limit: MAX_REQUEST_BYTES,
            };
            return refuse(account.name(), self.auth.label(&identity), too_large);
        }
        match Deletion::try_from(request.into_inner()) {
            Ok(deletion) => Ok(Admitted {
                account,
                identity,
                lane,
                deletion,
                started,
                deadline,
            }),
            Err(invalid) => refuse(account.name(), self.auth.label(&identity), invalid.into()),
        }
    }

    /// Record, flight and attempts (a request_id runs once, identical calls
    /// share one slot), then the answer.
    /// Not an async fn: its parameters would be moved into the body, and a
    /// waiting call would hold its admitted call twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn moves its parameters into its body: held twice while waiting"
    )]
    fn delete<'a>(&'a self, call: Admitted<'a>) -> impl Future<Output = Answer> + Send + 'a {
        async move {
            // Fields used in place: a waiting call's future holds each once.
            let mut report = Report::default();
            let flight = Call {
                account: call.account,
                caller: &call.lane,
                deadline: call.deadline,
                ready_by: self.ready_by(call.deadline),
            };
            let deleter = Deleter {
                flights: &self.flights,
                sender: &self.sender,
                records: &self.records,
            };
            let caller = &call.identity.caller.id;
            let result = deleter
                .delete(flight, caller, call.deletion, &mut report)
                .await;
            let (account, caller) = (call.account.name(), self.auth.label(&call.identity));
            report.answer(&self.refusals, account, caller, call.started, result)
        }
    }

    pub(crate) fn new(
        accounts: Arc<Accounts>,
        auth: Authenticator,
        upstream: Upstream,
        limits: CallLimits,
        records: Records,
        operations: Arc<dyn OperationStore>,
    ) -> Self {
        Self {
            accounts,
            auth: Arc::new(auth),
            sender: Sender {
                upstream,
                timeout: limits.upstream_timeout,
            },
            limits,
            flights: Arc::default(),
            records: Arc::new(records),
            lanes: Arc::default(),
            refusals: Arc::default(),
            operations,
        }
    }

    /// The refusal log, for the summaries `startup` writes.
    pub(crate) fn refusals(&self) -> Arc<RefusalLog> {
        Arc::clone(&self.refusals)
    }

    /// Who calls, on which account, and whether it may. On refusal, the
    /// account name for labels comes along.
    pub(super) fn admit(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<(&Arc<Account>, Identity), (&str, CallError)> {
        let identity = self
            .auth
            .identify(metadata, peer_certs)
            .map_err(|e| (UNKNOWN, e.into()))?;
        let account = self.accounts.find(metadata).map_err(|e| (UNKNOWN, e))?;
        self.auth
            .authorize(&identity, account.config.allowed_callers.as_deref())
            .map_err(|e| (account.name(), e.into()))?;
        Ok((account, identity))
    }

    /// The latest instant a budget slot is still useful to a call with `deadline`.
    fn ready_by(&self, deadline: Instant) -> Instant {
        deadline
            .checked_sub(self.limits.upstream_reserve)
            .unwrap_or(deadline)
    }
}

/// The caller's `grpc-timeout` (gRPC over HTTP/2 spec: up to 8 digits and a
/// unit H, M, S, m, u or n).
pub(super) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let mut m = MetadataMap::new();
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("1H", Duration::from_secs(3600)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d), "{v}");
        }
        for bad in ["", "S", "5x", "123456789S", "-1S"] {
            m.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&m), None, "{bad}");
        }
    }
}
