//! Single flight for the gateway: identical calls waiting or in flight at
//! the same time on this replica (same account, same five fields) share one
//! run of the attempts, so a retry storm costs one slot. Each caller still
//! answers by its own deadline; a call the budget refuses at admission is
//! refused at once (admission is the flight's first step).

use std::sync::Arc;

use tokio::time::Instant;

use super::accounts::Account;
use super::attempt::{ANSWER_MARGIN, Attempts, Sender};
use super::report::Report;
use super::status::CallError;
use crate::budget::{BudgetError, Rejection};
use crate::coalesce::{Coalescer, Expired, Role};
use crate::domain::{Association, Caller};
use crate::telemetry::metrics;
use crate::upstream::TransportError;

/// Identical calls in flight at the same time share one outcome: the account
/// and the five fields (shared, so the flight's copies cost no allocation).
type FlightKey = Arc<(String, Association)>;
/// What every caller of a flight receives.
type Flown = (Result<(), CallError>, Report);

/// The flights in progress on this replica.
#[derive(Default)]
pub(super) struct Flights(Coalescer<FlightKey, Flown>);

/// One call as a flight sees it: for whom, on which account, by when.
pub(super) struct Call<'a> {
    pub(super) account: &'a Arc<Account>,
    pub(super) caller: &'a Caller,
    pub(super) deadline: Instant,
    /// The latest instant a budget slot is still useful to it.
    pub(super) ready_by: Instant,
}

/// How often a follower refused under its leader's shorter deadline tries
/// again on its own.
const MAX_JOINS: u32 = 3;

impl Flights {
    /// Runs the attempts once for all identical calls waiting or in flight
    /// at the same time; each caller still answers by its own deadline.
    pub(super) async fn fly(
        &self,
        sender: &Sender,
        call: Call<'_>,
        association: Association,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let Call {
            account,
            caller,
            deadline,
            ready_by,
        } = call;
        let key: FlightKey = Arc::new((account.name().to_owned(), association));
        let patience = deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline);
        let mut joins = 0;
        loop {
            // The work owns what it needs: it may move to a task of its own
            // if its leader leaves. It takes its turn in the leader's share.
            let (leader, lane, flight) = (Arc::clone(account), caller.clone(), Arc::clone(&key));
            let sender = sender.clone();
            let work = move |mark| async move {
                let mut report = Report::default();
                let attempts = Attempts {
                    sender: &sender,
                    account: &leader,
                    caller: &lane,
                    ready_by,
                    deadline,
                };
                let result = attempts.run(&flight.1, mark, &mut report).await;
                (result, report)
            };
            let joining = self.0.start(key.clone(), deadline, work);
            joins += 1;
            if joining.role() == Role::Follower {
                // Counted as it joins: the counter moves while identical
                // calls wait, not only once their flight has ended.
                metrics::coalesced(account.name());
            }
            let joined = joining.wait(patience).await;
            let follower = joined.role == Role::Follower;
            let (result, shared) = match joined.outcome {
                Ok(outcome) => outcome,
                // Gave up at its own deadline (the work may still be running
                // for others): what a lone call would have met.
                Err(Expired { marked }) => {
                    report.coalesced = true;
                    return Err(if marked {
                        CallError::Transport(TransportError::Timeout)
                    } else {
                        CallError::Budget(BudgetError::Exhausted {
                            reason: Rejection::TimedOut,
                            retry_after: account.line.retry_after(),
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
            if follower
                && leaders_deadline
                && deadline > joined.flight_deadline
                && joins < MAX_JOINS
            {
                continue;
            }
            return result;
        }
    }
}
