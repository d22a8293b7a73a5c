//! What happened to one call, and its one trace of it: span fields, the
//! request metrics and a single log event, all written in [`Report::answer`].
//! A served call always has its log event; a refusal (nothing sent upstream)
//! has one when it is the first of its kind lately, and is otherwise counted
//! in a summary line ([`RefusalLog`]), so a flood of refusals cannot flood
//! the logs.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Response, Status};

use super::status::CallError;
use crate::pb::DeleteAssociationResponse;
use crate::telemetry::metrics;
use crate::telemetry::refusals::RefusalLog;
use crate::telemetry::server_call;

/// Label of calls refused before an account or caller is known.
pub(super) const UNKNOWN: &str = "unknown";

/// What happened to one call, for its log event.
#[derive(Debug, Default, Clone)]
pub(super) struct Report {
    pub(super) attempts: u32,
    pub(super) waited: Duration,
    pub(super) http_status: Option<u16>,
    /// The call shared another identical call's upstream call.
    pub(super) coalesced: bool,
    /// Answered from an earlier call with the same request_id.
    pub(super) replayed: bool,
}

impl Report {
    /// Records the call on its span, in the metrics and in one log event, and
    /// turns its result into the answer. A recorded server span gets the
    /// account and caller even when no log line is written.
    pub(super) fn answer(
        &self,
        refusals: &RefusalLog,
        account: &str,
        caller: &str,
        started: Instant,
        result: Result<(), CallError>,
    ) -> Result<Response<DeleteAssociationResponse>, Status> {
        let elapsed = started.elapsed();
        let code = result
            .as_ref()
            .map_or_else(CallError::code, |()| tonic::Code::Ok);
        metrics::request(account, caller, code, elapsed);
        let logged = match &result {
            Ok(()) => true,
            Err(error) => error
                .refusal()
                .is_none_or(|kind| refusals.log_now(account, caller, kind)),
        };
        let span = tracing::Span::current();
        // A held-back refusal on a span nobody exports has no reader for
        // these fields: a flood skips recording them.
        if logged {
            span.record("account", account);
            span.record("caller", caller);
        }
        server_call::label(account, caller);
        let (answer, reason) = match result {
            Ok(()) => (Ok(Response::new(DeleteAssociationResponse {})), None),
            Err(error) => {
                let status = error.to_status(account);
                (Err(status), logged.then(|| error.reason()))
            }
        };
        if !logged {
            return answer;
        }
        // The call's ids on its span, for this event's line (held back
        // refusals skip the cost).
        server_call::record_ids(&span);
        macro_rules! event {
            ($level:ident, $outcome:expr, $message:literal) => {
                tracing::$level!(
                    account,
                    caller,
                    outcome = $outcome,
                    reason,
                    coalesced = self.coalesced,
                    replayed = self.replayed,
                    attempts = self.attempts,
                    http_status = self.http_status,
                    budget_wait_ms = self.waited.as_millis() as u64,
                    elapsed_ms = elapsed.as_millis() as u64,
                    $message
                )
            };
        }
        match &answer {
            Ok(_) => event!(info, "OK", "association deleted"),
            Err(status) => event!(warn, metrics::code_name(status.code()), "delete failed"),
        }
        answer
    }
}
