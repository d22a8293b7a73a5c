//! The upstream attempts of one flight or one batch item: each waits for a
//! budget slot from its [`TurnSource`] (an interactive call's turn by its
//! deadline, [`Interactive`]; a batch item's background turn, in
//! `drain.rs`), sends one DELETE bounded by the attempt's deadline, and
//! [`next_step`] decides from its outcome whether to answer or to try
//! again. Only what provably did not take effect is retried (no
//! connection, 429, 503), each retry paying a slot, never past the deadline.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::accounts::Account;
use super::report::Report;
use super::status::CallError;
use crate::budget::{BudgetError, Turn};
use crate::coalesce::Mark;
use crate::domain::{Association, Caller};
use crate::telemetry::{self, metrics};
use crate::upstream::{Reply, TransportError, Upstream};

/// Attempts per call at most: the first and two retries of what provably did
/// not take effect (no connection, 429, 503).
const MAX_ATTEMPTS: u32 = 3;
/// Left between the end of an upstream attempt and the caller's deadline, so
/// the caller gets our answer (a precise status) rather than the transport's
/// bare timeout, even on a busy node.
pub(super) const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// What to do after one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The association is gone.
    Done,
    /// Answer this error.
    Fail,
    /// It provably did not take effect: try again if attempts and time allow.
    Retry,
}

/// The retry decision, per the README: retry only what did not take effect.
pub(super) fn next_step(outcome: &Result<Reply, TransportError>) -> Step {
    match outcome {
        Ok(reply) if reply.is_success() => Step::Done,
        Ok(reply) if matches!(reply.status, 429 | 503) => Step::Retry,
        Ok(_) => Step::Fail,
        Err(TransportError::Connect) => Step::Retry,
        Err(_) => Step::Fail,
    }
}

/// The Infobip client and the longest attempt: what every attempt shares.
#[derive(Clone)]
pub(super) struct Sender {
    pub(super) upstream: Upstream,
    pub(super) timeout: Duration,
}

/// Where each attempt's budget slot comes from.
pub(super) trait TurnSource {
    /// The slot of the next attempt, and the instant that attempt must have
    /// ended by.
    async fn turn(
        &self,
        account: &Account,
        caller: &Caller,
    ) -> Result<(Turn, Instant), BudgetError>;
}

/// An interactive call's turns: in line, refused at once when the slot
/// cannot come by `ready_by`; every attempt ends by the call's `deadline`.
pub(super) struct Interactive {
    /// The latest instant a budget slot is still useful.
    pub(super) ready_by: Instant,
    pub(super) deadline: Instant,
}

impl TurnSource for Interactive {
    async fn turn(
        &self,
        account: &Account,
        caller: &Caller,
    ) -> Result<(Turn, Instant), BudgetError> {
        let turn = wait_turn(account, caller, self.ready_by).await?;
        Ok((turn, self.deadline))
    }
}

/// One flight's (or batch item's) work: attempts for an association on
/// `account` in `caller`'s turns from `turns`.
pub(super) struct Attempts<'a, T> {
    pub(super) sender: &'a Sender,
    pub(super) account: &'a Account,
    pub(super) caller: &'a Caller,
    pub(super) turns: T,
}

impl<T: TurnSource> Attempts<'_, T> {
    /// Runs them; `mark` is set once a request goes upstream. The first
    /// turn is waited for before the attempts' state exists (boxed once it
    /// comes): a call waiting in line holds its turn's future only.
    pub(super) async fn run(
        &self,
        association: &Association,
        mark: Mark,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let first = self.turns.turn(self.account, self.caller).await;
        let first = first.map_err(CallError::Budget)?;
        Box::pin(self.attempts(first, association, mark, report)).await
    }

    /// The attempts from the first granted turn on.
    async fn attempts(
        &self,
        first: (Turn, Instant),
        association: &Association,
        mark: Mark,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let body = Bytes::from(association.to_json());
        let line = &self.account.line;
        let mut last: Option<CallError> = None;
        let mut granted = Some(first);
        loop {
            // Every attempt pays a slot. A retry that cannot get one in time
            // answers with the last upstream outcome instead.
            let next = match granted.take() {
                Some(first) => Ok(first),
                None => self.turns.turn(self.account, self.caller).await,
            };
            let (turn, deadline) = match next {
                Ok(turn) => turn,
                Err(e) => return Err(last.unwrap_or(CallError::Budget(e))),
            };
            report.waited += turn.waited;
            report.attempts += 1;

            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = self
                .sender
                .timeout
                .min(remaining.saturating_sub(ANSWER_MARGIN));
            mark.set();
            let clock = line.send_clock(turn);
            // Boxed: a retry waiting in line holds no room for it.
            let attempt = self.sender.upstream.delete(
                self.account.target(),
                clock.body(body.clone()),
                timeout,
                report.attempts,
            );
            let outcome = Box::pin(line.keep_spacing(attempt, &clock)).await;
            report.http_status = outcome.as_ref().ok().map(|r| r.status);

            let step = next_step(&outcome);
            let error = match outcome {
                Ok(reply) => {
                    // Infobip's answer says how its budget stands: a 429
                    // holds back the account, anything else ends a backoff.
                    if reply.status == 429 {
                        line.pushback(reply.retry_after).await;
                    } else {
                        line.reset_pushback();
                    }
                    if step == Step::Done {
                        return Ok(());
                    }
                    CallError::Upstream(reply)
                }
                Err(e) => e.into(),
            };
            if step != Step::Retry || report.attempts >= MAX_ATTEMPTS {
                return Err(error);
            }
            last = Some(error);
        }
    }
}

/// One budget wait, with its metrics and its `budget.wait` span (a child of
/// the server span, built once the wait is over: a call waiting in line
/// holds no span for it).
async fn wait_turn(
    account: &Account,
    caller: &Caller,
    ready_by: Instant,
) -> Result<Turn, BudgetError> {
    let started = SystemTime::now();
    let result = account.line.wait_turn(caller, ready_by).await;
    record_wait(started, account.name(), &result);
    result
}

/// A budget wait's outcome, in the metrics and as its `budget.wait` span.
fn record_wait(started: SystemTime, account: &str, result: &Result<Turn, BudgetError>) {
    match result {
        Ok(turn) => metrics::budget_wait(account, turn.waited),
        Err(e) => metrics::rejection(account, e.as_str()),
    }
    // The attributes are built only for a recorded span.
    let attributes = || {
        let account = KeyValue::new("account", account.to_owned());
        match result {
            Ok(turn) => vec![
                account,
                KeyValue::new("budget.queue_position", turn.position as i64),
                KeyValue::new("budget.waited_ms", turn.waited.as_millis() as i64),
                KeyValue::new("budget.outcome", "granted"),
            ],
            Err(e) => vec![account, KeyValue::new("budget.outcome", e.as_str())],
        }
    };
    telemetry::child_span("budget.wait", started, attributes, result.is_err());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16) -> Result<Reply, TransportError> {
        Ok(Reply::new(status, &Default::default(), b""))
    }

    #[test]
    fn only_what_provably_did_not_take_effect_is_retried() {
        let table = [
            (reply(204), Step::Done),
            (reply(200), Step::Done),
            (reply(429), Step::Retry),
            (reply(503), Step::Retry),
            (reply(400), Step::Fail),
            (reply(404), Step::Fail),
            (reply(500), Step::Fail),
            (reply(502), Step::Fail),
            (reply(504), Step::Fail),
            (Err(TransportError::Connect), Step::Retry),
            (Err(TransportError::Timeout), Step::Fail),
        ];
        for (outcome, step) in table {
            assert_eq!(next_step(&outcome), step, "{outcome:?}");
        }
    }
}
