//! Single flight for the gateway: identical calls waiting or in flight at
//! the same time on this replica (same account, same five fields) share one
//! run of the attempts, so a retry storm costs one slot. Each caller still
//! answers by its own deadline; a call the budget refuses at admission is
//! refused at once (admission is the flight's first step).

use std::sync::Arc;

use tokio::time::Instant;

use super::accounts::Account;
use super::attempt::{ANSWER_MARGIN, Attempts, Interactive, Sender};
use super::report::Report;
use super::status::CallError;
use crate::budget::{BudgetError, Rejection};
use crate::coalesce::{Coalescer, Expired, Role};
use crate::domain::{Association, Caller};
use crate::telemetry::{metrics, server_call};
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
    pub(super) fn fly<'a>(
        &'a self,
        sender: &'a Sender,
        call: Call<'a>,
        association: Association,
        report: &'a mut Report,
    ) -> impl Future<Output = Result<(), CallError>> + Send + 'a {
        // The key built before the future: a waiting call holds it once.
        let key: FlightKey = Arc::new((call.account.name().to_owned(), association));
        self.fly_key(sender, call, key, report)
    }

    async fn fly_key(
        &self,
        sender: &Sender,
        call: Call<'_>,
        key: FlightKey,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let Call {
            account,
            caller,
            deadline,
            ready_by,
        } = call;
        let patience = deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline);
        let mut joins = 0;
        loop {
            // The work owns what it needs: it may move to a task of its own
            // if its leader leaves. It takes its turn in the leader's share.
            let (leader, lane, flight) = (Arc::clone(account), caller.clone(), Arc::clone(&key));
            let sender = sender.clone();
            // Its child spans stay the leader's call's wherever it runs.
            let work = move |mark| {
                server_call::carry(async move {
                    let mut report = Report::default();
                    let attempts = Attempts {
                        sender: &sender,
                        account: &leader,
                        caller: &lane,
                        turns: Interactive { ready_by, deadline },
                    };
                    let result = attempts.run(&flight.1, mark, &mut report).await;
                    (result, report)
                })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;
    use futures::future::BoxFuture;
    use tokio::sync::watch;

    use super::*;
    use crate::budget::Line;
    use crate::budget::store::{Answer, Ask, BackendUnavailable, Store};
    use crate::config::{AccountConfig, BudgetConfig, endpoint_url};
    use crate::keys::{ApiKey, KeyCell, KeySource};
    use crate::pb;
    use crate::upstream::Upstream;

    /// A budget that admits every call and never grants a slot: each call
    /// waits in line until its `ready_by` and is refused `TimedOut`, as
    /// under an upstream pushback that came after it was admitted.
    struct NoSlot(watch::Sender<u64>);

    /// Always in line, an hour from its slot.
    fn queued() -> BoxFuture<'static, Result<Answer, BackendUnavailable>> {
        futures::future::ready(Ok(Answer::Queued(3_600_000_000))).boxed()
    }

    impl Store for NoSlot {
        fn admit<'a>(&'a self, _: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
            queued()
        }
        fn claim<'a>(&'a self, _: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
            queued()
        }
        fn leave<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
            async {}.boxed()
        }
        fn hold<'a>(&'a self, _: &'a str, _: Duration) -> BoxFuture<'a, ()> {
            async {}.boxed()
        }
        fn left<'a>(&'a self, _: &'a str, _: bool) -> BoxFuture<'a, ()> {
            async {}.boxed()
        }
        fn pushback(&self, _: Duration) -> BoxFuture<'_, ()> {
            async {}.boxed()
        }
        fn moved(&self) -> watch::Receiver<u64> {
            self.0.subscribe()
        }
    }

    /// Flights on one account whose budget never grants a slot.
    struct Setup {
        flights: Flights,
        account: Arc<Account>,
        sender: Sender,
        association: Association,
    }

    impl Setup {
        fn new() -> Arc<Self> {
            let budget = BudgetConfig::with_max_queue(100);
            let key = KeySource::Fixed(ApiKey::new("k").unwrap());
            let endpoint = endpoint_url("http://127.0.0.1:9").unwrap();
            let request = pb::DeleteAssociationRequest {
                resource_type: pb::ResourceType::Number as i32,
                channel: pb::Channel::Sms as i32,
                application_id: "app-1".into(),
                entity_id: None,
                resource_id: "number-key-0".into(),
                ..Default::default()
            };
            Arc::new(Self {
                flights: Flights::default(),
                account: Arc::new(Account {
                    config: AccountConfig::new("test", endpoint, key.clone()),
                    line: Line::new("test", Arc::new(NoSlot(watch::Sender::new(0))), &budget),
                    key: Arc::new(KeyCell::load(key).unwrap()),
                }),
                sender: Sender {
                    upstream: Upstream::new(Duration::from_secs(1), None).unwrap(),
                    timeout: Duration::from_secs(1),
                },
                association: Association::try_from(request).unwrap(),
            })
        }

        /// The call with `deadline` (ready by 100 ms before it), and when it
        /// was answered.
        async fn call(&self, deadline: Instant) -> (Result<(), CallError>, Report, Instant) {
            let call = Call {
                account: &self.account,
                caller: &Caller::anonymous(),
                deadline,
                ready_by: deadline - Duration::from_millis(100),
            };
            let mut report = Report::default();
            let association = self.association.clone();
            let result = self
                .flights
                .fly(&self.sender, call, association, &mut report)
                .await;
            (result, report, Instant::now())
        }

        /// Waits, yielding without moving the clock, until a flight for the
        /// association is in progress.
        async fn until_flying(&self) {
            let key = Arc::new(("test".to_owned(), self.association.clone()));
            for _ in 0..100 {
                if self.flights.0.is_flying(&key) {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("no flight started");
        }
    }

    fn timed_out(result: &Result<(), CallError>) -> bool {
        matches!(
            result,
            Err(CallError::Budget(BudgetError::Exhausted {
                reason: Rejection::TimedOut,
                ..
            }))
        )
    }

    /// A follower refused under its leader's shorter deadline tries again
    /// (joining the next identical call's flight), three times at most: then
    /// it answers that refusal, though it still has time. Four identical
    /// calls with short deadlines come one after another, each the moment
    /// the one before is refused, so the follower joins each in turn.
    #[tokio::test(start_paused = true)]
    async fn a_follower_refused_under_shorter_deadlines_tries_again_three_times_at_most() {
        let setup = Setup::new();
        let started = Instant::now();
        let leaders = tokio::spawn({
            let setup = Arc::clone(&setup);
            async move {
                let mut refused_at = Vec::new();
                for _ in 0..4 {
                    let deadline = Instant::now() + Duration::from_millis(300);
                    let (result, report, at) = setup.call(deadline).await;
                    assert!(timed_out(&result), "{result:?}");
                    assert!(!report.coalesced, "each leads its own flight");
                    refused_at.push(at);
                }
                refused_at
            }
        });
        setup.until_flying().await;
        let (result, report, answered) = setup.call(started + Duration::from_secs(60)).await;
        let refused_at = leaders.await.unwrap();
        assert!(timed_out(&result), "{result:?}");
        assert!(report.coalesced);
        assert_eq!(
            answered - started,
            refused_at[2] - started,
            "answered with the third leader's refusal (leaders refused at {:?})",
            refused_at
                .iter()
                .map(|at| *at - started)
                .collect::<Vec<_>>()
        );
    }

    /// A follower whose deadline is its leader's has no more time to try
    /// again with: it answers the leader's refusal, as a follower.
    #[tokio::test(start_paused = true)]
    async fn a_follower_with_its_leaders_deadline_answers_the_leaders_refusal() {
        let setup = Setup::new();
        let deadline = Instant::now() + Duration::from_millis(300);
        let leader = tokio::spawn({
            let setup = Arc::clone(&setup);
            async move { setup.call(deadline).await }
        });
        setup.until_flying().await;
        let (result, report, answered) = setup.call(deadline).await;
        let (led, _, refused_at) = leader.await.unwrap();
        assert!(timed_out(&led), "{led:?}");
        assert!(timed_out(&result), "{result:?}");
        assert!(report.coalesced, "answered as the leader's follower");
        assert_eq!(answered, refused_at);
    }
}
