//! The gRPC service. The request path reads top to bottom in
//! [`Gateway::delete`]: parse → account → budget → upstream → status.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::transport::CertificateDer;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::budget::{AccountQueue, Budget, BudgetError, Caller, Rejection, Turn};
use crate::coalesce::{Coalescer, Expired, Mark, Role};
use crate::config::AccountConfig;
use crate::domain::Association;
use crate::pb::association_service_server::AssociationService;
use crate::pb::{DeleteAssociationRequest, DeleteAssociationResponse};
use crate::send_clock::SendClock;
use crate::status::CallError;
use crate::telemetry::{self, metrics};
use crate::upstream::{TransportError, Upstream};

/// Label of calls refused before an account or caller is known.
const UNKNOWN: &str = "unknown";

/// Attempts per call at most: the first and two retries of what provably did
/// not take effect (no connection, 429, 503).
const MAX_ATTEMPTS: u32 = 3;
/// Left between the end of an upstream attempt and the caller's deadline, so
/// the caller gets our answer (a precise status) rather than the transport's
/// bare timeout, even on a busy node.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// Per-call limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub upstream_timeout: Duration,
    pub upstream_reserve: Duration,
    /// Deadline of a call that sets none: max-wait + upstream timeout.
    pub default_deadline: Duration,
}

/// Identical calls in flight at the same time share one outcome: the account
/// and the five fields (shared, so the flight's copies cost no allocation).
type FlightKey = Arc<(String, Association)>;
/// What every caller of a flight receives.
type Flown = (Result<(), CallError>, Report);

/// The `AssociationService` implementation. Cheap to clone: a coalesced
/// call's work holds a clone, as it may move to a task of its own.
#[derive(Clone)]
pub struct Gateway {
    accounts: Arc<HashMap<String, Arc<AccountConfig>>>,
    default_account: Arc<str>,
    auth: Arc<Authenticator>,
    /// Caller names that may appear as metric labels (configured ones).
    known_callers: Arc<HashSet<String>>,
    budget: Arc<Budget>,
    upstream: Upstream,
    limits: CallLimits,
    flights: Arc<Coalescer<FlightKey, Flown>>,
}

/// What happened to one call, for its log event.
#[derive(Debug, Default, Clone)]
struct Report {
    attempts: u32,
    waited: Duration,
    http_status: Option<u16>,
    /// The call shared another identical call's upstream call.
    coalesced: bool,
}

impl Gateway {
    pub fn new(
        accounts: Vec<AccountConfig>,
        default_account: String,
        auth: Authenticator,
        budget: Arc<Budget>,
        upstream: Upstream,
        limits: CallLimits,
    ) -> Self {
        let known_callers = auth
            .tokens
            .iter()
            .map(|t| t.name.to_string())
            .chain(
                accounts
                    .iter()
                    .flat_map(|a| a.allowed_callers.iter().flatten().cloned()),
            )
            .collect();
        Self {
            accounts: Arc::new(
                accounts
                    .into_iter()
                    .map(|a| (a.name.clone(), Arc::new(a)))
                    .collect(),
            ),
            default_account: default_account.into(),
            auth: Arc::new(auth),
            known_callers: Arc::new(known_callers),
            budget,
            upstream,
            limits,
            flights: Arc::default(),
        }
    }

    async fn delete(
        &self,
        account: &Arc<AccountConfig>,
        caller: &Caller,
        request: DeleteAssociationRequest,
        deadline: Instant,
        report: &mut Report,
    ) -> Result<(), CallError> {
        // 1. Parse: a refusal here costs no budget and sends nothing.
        let association = Association::try_from(request)?;
        // Identical calls at the same time share steps 2-4 (one slot).
        self.coalesced(account, caller, association, deadline, report)
            .await
    }

    /// Steps 2-4 for one association, under the deadline of the call that
    /// leads its flight; `mark` is set once a request goes upstream.
    async fn send(
        &self,
        account: &AccountConfig,
        caller: &Caller,
        association: &Association,
        deadline: Instant,
        mark: Mark,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let body = bytes::Bytes::from(association.to_json());
        let queue = self
            .budget
            .account(&account.name)
            .ok_or(CallError::UnknownAccount)?;
        let ready_by = self.ready_by(deadline);
        let mut last: Option<CallError> = None;
        loop {
            // 2. Budget: every attempt pays a slot. A retry that cannot get
            //    one in time answers with the last upstream outcome instead.
            let turn = match self.wait_turn(&account.name, queue, caller, ready_by).await {
                Ok(turn) => turn,
                Err(e) => return Err(last.unwrap_or(CallError::Budget(e))),
            };
            report.waited += turn.waited;
            report.attempts += 1;

            // 3. Upstream: one DELETE, bounded by the caller's deadline.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = self
                .limits
                .upstream_timeout
                .min(remaining.saturating_sub(ANSWER_MARGIN));
            mark.set();
            let clock = SendClock::new(queue.late_after(turn.granted_at), turn.departure);
            // Boxed: a call still waiting in line holds no room for it.
            let attempt = Box::pin(self.upstream.delete(
                account,
                clock.body(body.clone()),
                timeout,
                report.attempts,
            ));
            let outcome = keep_spacing(attempt, &clock, queue).await;
            report.http_status = outcome.as_ref().ok().map(|r| r.status);

            // 4. Outcome: retry only what provably did not take effect.
            let retry = match outcome {
                Ok(reply) if reply.is_success() => {
                    queue.reset_pushback();
                    return Ok(());
                }
                Ok(reply) if reply.status == 429 => {
                    queue.pushback(reply.retry_after).await;
                    CallError::Upstream(reply)
                }
                Ok(reply) => {
                    queue.reset_pushback();
                    if reply.status != 503 {
                        return Err(CallError::Upstream(reply));
                    }
                    CallError::Upstream(reply)
                }
                Err(TransportError::Connect) => CallError::Transport(TransportError::Connect),
                Err(e) => return Err(e.into()),
            };
            if report.attempts >= MAX_ATTEMPTS {
                return Err(retry);
            }
            last = Some(retry);
        }
    }

    /// Runs [`Self::send`] once for all identical calls waiting or in flight
    /// at the same time; each caller still answers by its own deadline.
    async fn coalesced(
        &self,
        account: &Arc<AccountConfig>,
        caller: &Caller,
        association: Association,
        deadline: Instant,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let key: FlightKey = Arc::new((account.name.clone(), association));
        // A call that would lead a new flight and that the budget refuses at
        // once is refused before any flight is set up (load shedding is cheap).
        if let Some(queue) = self.budget.account(&account.name)
            && !self.flights.is_flying(&key)
            && let Err(e) = queue.check(caller, self.ready_by(deadline))
        {
            let span = self.wait_span(&account.name);
            self.record_wait(&span, &account.name, &Err(e));
            return Err(CallError::Budget(e));
        }
        let patience = deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline);
        let mut joins = 0;
        loop {
            let (gateway, account, flight) = (self.clone(), Arc::clone(account), Arc::clone(&key));
            // The shared call takes its turn in the leader's fair share.
            let caller = caller.clone();
            let joined = self
                .flights
                .run(key.clone(), deadline, patience, move |mark| async move {
                    let mut report = Report::default();
                    let result = gateway
                        .send(&account, &caller, &flight.1, deadline, mark, &mut report)
                        .await;
                    (result, report)
                })
                .await;
            joins += 1;
            let follower = joined.role == Role::Follower;
            if follower {
                metrics::coalesced(&key.0);
            }
            let (result, shared) = match joined.outcome {
                Ok(outcome) => outcome,
                // Gave up at its own deadline (the work may still be running
                // for others): what a lone call would have met.
                Err(Expired { marked }) => {
                    report.coalesced = true;
                    return Err(if marked {
                        CallError::Transport(TransportError::Timeout)
                    } else {
                        let retry_after = self
                            .budget
                            .account(&key.0)
                            .map_or(Duration::ZERO, |q| q.retry_after());
                        CallError::Budget(BudgetError::Exhausted {
                            reason: Rejection::TimedOut,
                            retry_after,
                        })
                    });
                }
            };
            *report = Report {
                coalesced: follower,
                ..shared
            };
            // Refused for lack of time under the leader's shorter deadline: not
            // this caller's answer while it has more time. Nothing was sent, so
            // it tries on its own (leading, or joining a newer flight).
            let leaders_deadline = matches!(
                result,
                Err(CallError::Budget(BudgetError::Exhausted {
                    reason: Rejection::Deadline | Rejection::TimedOut,
                    ..
                }))
            );
            if follower && leaders_deadline && deadline > joined.flight_deadline && joins < 3 {
                continue;
            }
            return result;
        }
    }

    /// The latest instant a budget slot is still useful to a call with `deadline`.
    fn ready_by(&self, deadline: Instant) -> Instant {
        deadline
            .checked_sub(self.limits.upstream_reserve)
            .unwrap_or(deadline)
    }

    /// One budget wait, as its own span with its metrics.
    async fn wait_turn(
        &self,
        account: &str,
        queue: &AccountQueue,
        caller: &Caller,
        ready_by: Instant,
    ) -> Result<Turn, BudgetError> {
        let span = self.wait_span(account);
        let result = queue
            .wait_turn(caller, ready_by)
            .instrument(span.clone())
            .await;
        self.record_wait(&span, account, &result);
        result
    }

    /// The `budget.wait` span of one call.
    fn wait_span(&self, account: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "budget.wait",
            account,
            budget.queue_position = Empty,
            budget.waited_ms = Empty,
            budget.outcome = Empty,
            otel.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        telemetry::record_ids(&span);
        span
    }

    /// A budget wait's outcome, on its span and in the metrics.
    fn record_wait(&self, span: &tracing::Span, account: &str, result: &Result<Turn, BudgetError>) {
        match result {
            Ok(turn) => {
                span.record("budget.queue_position", turn.position);
                span.record("budget.waited_ms", turn.waited.as_millis() as u64);
                span.record("budget.outcome", "granted");
                metrics::budget_wait(account, turn.waited);
            }
            Err(e) => {
                let outcome = match e {
                    BudgetError::Exhausted { reason, .. } => reason.as_str(),
                    BudgetError::ShuttingDown => "shutting_down",
                    BudgetError::BackendUnavailable => "backend_unavailable",
                };
                span.record("budget.outcome", outcome);
                span.record("otel.status_code", "ERROR");
                metrics::rejection(account, outcome);
            }
        }
    }

    /// Who calls, on which account, and whether it may: decided before any
    /// budget is spent. On refusal, the account name for labels comes along.
    fn admit(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<(&Arc<AccountConfig>, Identity), (&str, CallError)> {
        let identity = self
            .auth
            .identify(metadata, peer_certs)
            .map_err(|e| (UNKNOWN, e.into()))?;
        let account = self.account(metadata).map_err(|e| (UNKNOWN, e))?;
        if let Some(allowed) = &account.allowed_callers
            && !(identity.authenticated && allowed.iter().any(|c| **c == *identity.caller.id))
        {
            let name = self.caller_label(&identity).to_owned();
            return Err((account.name.as_str(), AuthError::NotAllowed(name).into()));
        }
        Ok((account, identity))
    }

    /// The caller as a bounded label: configured names, `anonymous`, or `unlisted`.
    fn caller_label<'a>(&self, identity: &'a Identity) -> &'a str {
        if !identity.authenticated {
            "anonymous"
        } else if self.known_callers.contains(&*identity.caller.id) {
            &identity.caller.id
        } else {
            "unlisted"
        }
    }

    fn account(&self, metadata: &MetadataMap) -> Result<&Arc<AccountConfig>, CallError> {
        match metadata.get("x-infobip-account") {
            None => self.accounts.get(&*self.default_account),
            Some(name) => name.to_str().ok().and_then(|n| self.accounts.get(n)),
        }
        .ok_or(CallError::UnknownAccount)
    }
}

#[tonic::async_trait]
impl AssociationService for Gateway {
    async fn delete_association(
        &self,
        request: Request<DeleteAssociationRequest>,
    ) -> Result<Response<DeleteAssociationResponse>, Status> {
        let started = Instant::now();
        let deadline =
            started + grpc_timeout(request.metadata()).unwrap_or(self.limits.default_deadline);
        let mut report = Report::default();
        let peer_certs = request.peer_certs();
        let admitted = self.admit(request.metadata(), peer_certs.as_deref().map(Vec::as_slice));
        let (account_name, caller, result) = match admitted {
            Ok((account, identity)) => {
                let result = self
                    .delete(
                        account,
                        &identity.caller,
                        request.into_inner(),
                        deadline,
                        &mut report,
                    )
                    .await;
                let label = self.caller_label(&identity).to_owned();
                (account.name.as_str(), label, result)
            }
            Err((account, e)) => (account, UNKNOWN.to_owned(), Err(e)),
        };
        let elapsed = started.elapsed();
        let span = tracing::Span::current();
        span.record("account", account_name);
        span.record("caller", caller.as_str());
        let code = result
            .as_ref()
            .map_or_else(CallError::code, |()| tonic::Code::Ok);
        metrics::request(account_name, &caller, code, elapsed);
        match result {
            Ok(()) => {
                tracing::info!(
                    account = account_name,
                    caller,
                    outcome = "OK",
                    coalesced = report.coalesced,
                    attempts = report.attempts,
                    http_status = report.http_status,
                    budget_wait_ms = report.waited.as_millis() as u64,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "association deleted"
                );
                Ok(Response::new(DeleteAssociationResponse {}))
            }
            Err(error) => {
                let status = error.to_status(account_name);
                tracing::warn!(
                    account = account_name,
                    caller,
                    outcome = ?status.code(),
                    reason = %error.reason(),
                    coalesced = report.coalesced,
                    attempts = report.attempts,
                    http_status = report.http_status,
                    budget_wait_ms = report.waited.as_millis() as u64,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "delete failed"
                );
                Err(status)
            }
        }
    }
}

/// Runs one upstream `attempt`; if its request leaves late (a cold
/// connection, a starved thread), moves the account's next slot meanwhile,
/// while the request is still in flight.
async fn keep_spacing<T>(
    attempt: impl Future<Output = T>,
    clock: &SendClock,
    queue: &AccountQueue,
) -> T {
    let mut attempt = std::pin::pin!(attempt);
    tokio::select! {
        biased;
        outcome = &mut attempt => outcome,
        sent_at = clock.late() => tokio::join!(attempt, queue.sent_late(sent_at)).0,
    }
}

/// The caller's `grpc-timeout` (gRPC over HTTP/2 spec: up to 8 digits and a
/// unit H, M, S, m, u or n).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
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
