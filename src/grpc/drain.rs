//! The batch drainers: one per account on each replica, of which one at a
//! time holds the account (the store's lease), takes its requests one by
//! one in submission order, and runs each as DeleteAssociation would (the
//! same attempts, retries and status table) in background turns: slots no
//! waiting call can use, so interactive calls go first. Each attempt may
//! take the upstream timeout.
//!
//! A request is finished with the status a unary call would have answered
//! (a 404 is OK with `allow_missing`, and on a redelivery: an earlier
//! attempt may have deleted it). One left unfinished (shutdown, a budget
//! backend that refuses, a lost lease, a store that does not answer) stays
//! queued for the next holder: delivery is at least once.
//!
//! Drainers look for work when this replica accepts a batch and every
//! [`POLL`] (work another replica accepted, or one whose holder died), and
//! stop when the gateway shuts down, leaving what is queued.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_types::pb::Status as RpcStatus;

use super::accounts::Account;
use super::attempt::{ANSWER_MARGIN, Attempts, TurnSource};
use super::operation_error::OperationError;
use super::outcome::settle;
use super::report::Report;
use super::service::Gateway;
use super::status::to_rpc;
use crate::budget::{BudgetError, Turn};
use crate::coalesce::Mark;
use crate::domain::{Association, Caller};
use crate::operations::{Item, LEASE, OperationStore, Start, Take};
use crate::pb::DeleteAssociationRequest;

/// How often an idle drainer looks for work it was not told about.
const POLL: Duration = Duration::from_secs(1);
/// How often a holder renews its hold (well within [`LEASE`]).
const RENEW: Duration = Duration::from_millis(1500);
/// Pause after the store failed to answer.
const PAUSE: Duration = Duration::from_millis(200);
/// Tries to store a result before leaving the request queued.
const FINISH_TRIES: u32 = 10;

/// Runs every account's drainer until `stop`; returns once each has left
/// its account (a request in flight upstream finishes first).
pub(crate) async fn drain_all(gateway: Gateway, stop: CancellationToken) {
    let gateway = Arc::new(gateway);
    let mut drainers = JoinSet::new();
    for account in gateway.accounts.iter() {
        let (gateway, account, stop) = (Arc::clone(&gateway), Arc::clone(account), stop.clone());
        drainers.spawn(async move { drain(&gateway, &account, &stop).await });
    }
    while drainers.join_next().await.is_some() {}
}

/// One account's drainer.
async fn drain(gateway: &Gateway, account: &Account, stop: &CancellationToken) {
    let store = &*gateway.operations;
    let name = account.name();
    let mut work = store.wakeups().work(name);
    loop {
        work.borrow_and_update();
        // One read per process tells every idle drainer whether to look.
        let held = match store.may_have_work(name).await {
            Ok(false) => Ok(false),
            Ok(true) | Err(_) => store.hold(name).await,
        };
        match held {
            Ok(true) => {
                tracing::info!(account = name, "draining the account's batches");
                while_held(gateway, account, stop).await;
                if let Err(e) = store.release(name).await {
                    tracing::debug!(account = name, error = %e, "could not release the batch lease");
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(account = name, error = %e, "batch drainer: store unavailable")
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = work.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Drains while this drainer holds the account and work waits.
async fn while_held(gateway: &Gateway, account: &Account, stop: &CancellationToken) {
    let store = &*gateway.operations;
    let renewing = renew(store, account.name());
    tokio::pin!(renewing);
    let mut lost = false;
    while !lost && !stop.is_cancelled() {
        let taken = tokio::select! {
            biased;
            () = &mut renewing => return,
            taken = store.take(account.name()) => taken,
        };
        let item = match taken {
            Ok(Take::Item(item)) => item,
            Ok(Take::Skipped) => continue,
            Ok(Take::Empty) => {
                if let Err(e) = store.went_quiet(account.name()).await {
                    tracing::debug!(account = account.name(), error = %e, "batch drainer: store unavailable");
                }
                return;
            }
            Ok(Take::Lost) => return,
            Err(e) => {
                tracing::debug!(account = account.name(), error = %e, "batch drainer: store unavailable");
                tokio::time::sleep(PAUSE).await;
                return;
            }
        };
        // A lost hold does not stop a request on its way: its start was
        // the last check, and its result is worth keeping.
        let run = run_item(gateway, account, &item);
        tokio::pin!(run);
        let finished = loop {
            tokio::select! {
                biased;
                finished = &mut run => break finished,
                () = &mut renewing, if !lost => lost = true,
            }
        };
        if !finished {
            tokio::time::sleep(PAUSE).await;
            return;
        }
    }
}

/// Renews the hold every [`RENEW`]; completes once it is lost (another
/// holder, or no renewal confirmed for a whole [`LEASE`]).
async fn renew(store: &dyn OperationStore, account: &str) {
    renew_with(|| store.hold(account)).await
}

/// [`renew`], each renewal by `hold`.
async fn renew_with<'a, E>(mut hold: impl FnMut() -> BoxFuture<'a, Result<bool, E>>) {
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(RENEW).await;
        match hold().await {
            Ok(true) => confirmed = Instant::now(),
            Ok(false) => return,
            Err(_) if confirmed.elapsed() >= LEASE => return,
            Err(_) => {}
        }
    }
}

/// Runs one request; true once its result is stored.
async fn run_item(gateway: &Gateway, account: &Account, item: &Item) -> bool {
    let name = account.name();
    let store = &*gateway.operations;
    let request = DeleteAssociationRequest::decode(item.request.as_slice());
    let allow_missing = request.as_ref().is_ok_and(|r| r.allow_missing);
    let mut report = Report::default();
    let result = match request.map(Association::try_from) {
        // Accepted by an earlier version, refused by this one; or bytes
        // that are no request: answered like a unary call, never sent.
        Ok(Err(invalid)) => Err(invalid.into()),
        Err(_) => Err(OperationError::InvalidArgument {
            field: "requests",
            problem: "the stored request is unreadable".into(),
        }
        .into()),
        Ok(Ok(association)) => {
            let attempts = Attempts {
                sender: &gateway.sender,
                account,
                caller: &Caller::new(item.owner.as_str(), NonZeroU32::MIN),
                turns: Background {
                    store,
                    item,
                    timeout: gateway.limits.upstream_timeout,
                    left: Mutex::new(None),
                },
            };
            let result = attempts
                .run(&association, Mark::default(), &mut report)
                .await;
            match attempts.turns.left() {
                Some(Leave::Queued) => return false,
                Some(Leave::Cancelled) if report.attempts == 0 => {
                    Err(OperationError::Cancelled.into())
                }
                _ => result,
            }
        }
    };
    let result = settle(result, allow_missing || item.redelivered);
    let (ok, status) = match &result {
        Ok(()) => (true, RpcStatus::default()),
        Err(e) => (false, to_rpc(&e.to_status(name))),
    };
    let bytes = status.encode_to_vec();
    for _ in 0..FINISH_TRIES {
        match store.finish(name, item, ok, bytes.clone()).await {
            Ok(()) => {
                tracing::info!(
                    account = name,
                    operation = %item.op,
                    index = item.index,
                    outcome = crate::telemetry::metrics::code_name(tonic::Code::from_i32(status.code)),
                    attempts = report.attempts,
                    http_status = report.http_status,
                    redelivered = item.redelivered,
                    "batch request done"
                );
                return true;
            }
            Err(e) => {
                tracing::debug!(account = name, error = %e, "batch result not stored yet");
                tokio::time::sleep(PAUSE).await;
            }
        }
    }
    false
}

/// Why a batch request stopped before its attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Leave it queued (shutting down, no budget backend, lease lost).
    Queued,
    /// Its operation was cancelled before this attempt went.
    Cancelled,
}

/// A batch request's turns: a background slot, then the store's start
/// (checked and recorded just before the attempt leaves).
struct Background<'a> {
    store: &'a dyn OperationStore,
    item: &'a Item,
    timeout: Duration,
    left: Mutex<Option<Leave>>,
}

impl Background<'_> {
    fn leave(&self, why: Leave) {
        *self.left.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn left(&self) -> Option<Leave> {
        *self.left.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TurnSource for Background<'_> {
    async fn turn(
        &self,
        account: &Account,
        caller: &Caller,
    ) -> Result<(Turn, Instant), BudgetError> {
        let turn = account.line.idle_turn(caller).await.inspect_err(|_| {
            self.leave(Leave::Queued);
        })?;
        match self.store.start(account.name(), self.item).await {
            Ok(Start::Go) => Ok((turn, Instant::now() + self.timeout + ANSWER_MARGIN)),
            Ok(Start::Cancelled) => {
                self.leave(Leave::Cancelled);
                Err(BudgetError::ShuttingDown)
            }
            Ok(Start::Stop) | Err(_) => {
                self.leave(Leave::Queued);
                Err(BudgetError::BackendUnavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures::FutureExt;

    use super::*;

    /// When `renew_with` completes, given the answers of its renewals in
    /// turn (one every [`RENEW`]); `None` if it still holds after them all
    /// and a minute more of failures.
    async fn lost_after(answers: &[Result<bool, ()>]) -> Option<Duration> {
        let started = Instant::now();
        let limit = started + RENEW * answers.len() as u32 + Duration::from_secs(60);
        let mut answers: VecDeque<_> = answers.iter().copied().collect();
        let hold = || futures::future::ready(answers.pop_front().unwrap_or(Err(()))).boxed();
        tokio::time::timeout_at(limit, renew_with(hold))
            .await
            .ok()
            .map(|()| started.elapsed())
    }

    /// A failed renewal keeps the hold while the last confirmed one is less
    /// than a lease old; the first failure a whole lease after it lets go.
    #[tokio::test(start_paused = true)]
    async fn renewals_that_fail_keep_the_hold_until_a_lease_has_passed_unconfirmed() {
        // Confirmed at 1.5 s; failures at 3, 4.5, 6 (4.5 s unconfirmed) and
        // 7.5 s (6 s unconfirmed: lost).
        let answers = [Ok(true), Err(()), Err(()), Err(()), Err(()), Ok(true)];
        assert_eq!(lost_after(&answers).await, Some(RENEW * 5));
        // A confirmed renewal starts the count again.
        let answers = [Err(()), Err(()), Ok(true), Err(()), Err(()), Err(())];
        assert_eq!(lost_after(&answers).await, Some(RENEW * 7));
    }

    /// Another holder (the renewal answered false) ends the hold at once.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_another_holder_refuses_ends_the_hold_at_once() {
        assert_eq!(lost_after(&[Ok(true), Ok(false)]).await, Some(RENEW * 2));
    }

    /// A batch request's attempt may take the whole upstream timeout: the
    /// deadline its turn gives is the timeout plus the answer margin from
    /// when the turn came.
    #[tokio::test(start_paused = true)]
    async fn a_background_turn_gives_its_attempt_the_whole_upstream_timeout() {
        use crate::budget::Backend;
        use crate::config::{AccountConfig, BudgetConfig, endpoint_url};
        use crate::keys::{ApiKey, KeyCell, KeySource};
        use crate::operations::NewOperation;
        use crate::operations::memory::MemoryOperations;

        let key = KeySource::Fixed(ApiKey::new("k").unwrap());
        let endpoint = endpoint_url("http://127.0.0.1:9").unwrap();
        let account = Account {
            config: AccountConfig::new("a", endpoint, key.clone()),
            line: Backend::memory().line("a", &BudgetConfig::with_max_queue(10)),
            key: Arc::new(KeyCell::load(key).unwrap()),
        };
        let store = MemoryOperations::new(Duration::from_secs(60));
        let new = NewOperation {
            account: "a".into(),
            owner: "o".into(),
            request_id: String::new(),
            requests: vec![Vec::new()],
            interval: Duration::from_secs(1),
        };
        store.submit(new).await.unwrap();
        let Take::Item(item) = store.take("a").await.unwrap() else {
            panic!("the request is not taken");
        };
        let timeout = Duration::from_secs(5);
        let background = Background {
            store: &store,
            item: &item,
            timeout,
            left: Mutex::new(None),
        };
        let (_, deadline) = background
            .turn(&account, &Caller::anonymous())
            .await
            .unwrap();
        assert_eq!(deadline, Instant::now() + timeout + ANSWER_MARGIN);
        assert_eq!(background.left(), None);
    }

    /// Renewals that all succeed keep the hold.
    #[tokio::test(start_paused = true)]
    async fn confirmed_renewals_keep_the_hold() {
        let started = Instant::now();
        let renewing = renew_with(|| futures::future::ready(Ok::<_, ()>(true)).boxed());
        let held = tokio::time::timeout(LEASE * 10, renewing).await;
        assert!(held.is_err(), "let go after {:?}", started.elapsed());
    }
}
