//! One account's line of waiters in front of its [`Limiter`].
//!
//! Calls line up per caller and are served round-robin by caller
//! ([`super::fair`]), FIFO within a caller; a single dispatcher task per
//! account (`dispatch.rs`) takes the next call still waiting, asks the limiter for a slot,
//! sleeps exactly as long as the limiter says (no polling), and hands the
//! slot over. A caller that leaves (cancelled, deadline) simply drops its
//! receiver: the dispatcher notices and moves on, so no slot is spent on
//! nobody. A call that finds nobody in line and a limiter that can decide at
//! once (in process) takes a free slot itself, without waking the dispatcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use super::fair::{FairQueue, ahead};
use super::limiter::{Decision, Limiter};
use super::pace::Pace;
use super::transit::{Departure, Transit};
use super::{BudgetError, Rejection};
use crate::config::BudgetConfig;
use crate::domain::Caller;
use crate::telemetry::metrics;

/// Longest pushback applied when Infobip answers 429 without Retry-After.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a caller learns when its turn comes.
#[derive(Debug)]
pub struct Turn {
    /// Callers that were ahead of it when it joined.
    pub position: usize,
    /// Time spent in line.
    pub waited: Duration,
    /// When the slot was asked for and taken (at the latest): the upstream
    /// request should leave now.
    pub granted_at: Instant,
    /// Tell it when the request leaves (see [`Departure`]).
    pub departure: Departure,
}

pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Result<(Instant, Departure), BudgetError>>,
    pub(super) ready_by: Instant,
    pub(super) joined: Instant,
}

pub(super) struct State {
    pub(super) waiters: FairQueue<Waiter>,
    /// Calls inside `wait_turn` (admitted, not yet served or gone).
    live: usize,
    /// The same, per caller, with the caller's weight.
    live_by_caller: HashMap<Arc<str>, (usize, u32)>,
    /// Best estimate of when the limiter grants its next slot.
    pub(super) next_slot: Instant,
    /// This replica's time between grants while callers wait: the interval
    /// alone, or longer when other replicas share the budget (see [`Pace`]).
    pub(super) pace: Pace,
    /// Consecutive upstream 429s without Retry-After, for backoff.
    pushback_streak: u32,
}

/// The waiters and dispatcher of one account.
pub struct Line {
    name: String,
    pub(super) limiter: Arc<dyn Limiter>,
    interval: Duration,
    /// Granted requests not yet gone out, where spacing is promised (a
    /// burst of 1 and a margin to keep it); `None` where it is not.
    pub(super) transit: Option<Arc<Transit>>,
    max_wait: Duration,
    max_queue: usize,
    state: Mutex<State>,
    pub(super) wake: Notify,
    pub(super) closing: CancellationToken,
}

impl Line {
    /// Creates the queue and spawns its dispatcher on the current runtime.
    pub fn spawn(name: &str, limiter: Arc<dyn Limiter>, config: &BudgetConfig) -> Arc<Self> {
        let spacing = config.burst.get() == 1 && !config.safety_margin.is_zero();
        let queue = Arc::new(Self {
            name: name.to_owned(),
            limiter,
            interval: config.interval(),
            // Half the margin: a send this late after its grant, followed by
            // one on time, still arrives at least interval - margin/2 apart.
            transit: spacing
                .then(|| Arc::new(Transit::new(config.interval(), config.safety_margin / 2))),
            max_wait: config.max_wait,
            max_queue: config.max_queue.get(),
            state: Mutex::new(State {
                waiters: FairQueue::default(),
                live: 0,
                live_by_caller: HashMap::new(),
                next_slot: Instant::now(),
                pace: Pace::new(config.interval()),
                pushback_streak: 0,
            }),
            wake: Notify::new(),
            closing: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&queue).dispatch());
        queue
    }

    /// Callers waiting now.
    #[cfg(test)]
    pub(super) fn depth(&self) -> usize {
        self.lock().live
    }

    /// Waits, yielding to the other tasks without moving the clock, until
    /// exactly `depth` callers wait.
    #[cfg(test)]
    pub(super) async fn until_depth(&self, depth: usize) {
        for _ in 0..1000 {
            if self.depth() == depth {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{} callers wait, never {depth}", self.depth());
    }

    /// Waits for `caller`'s next turn on this account; `ready_by` is the latest
    /// instant at which the slot is still useful (caller deadline minus
    /// upstream reserve). Refuses at once when the turn cannot come by then.
    pub async fn wait_turn(&self, caller: &Caller, ready_by: Instant) -> Result<Turn, BudgetError> {
        let joined = Instant::now();
        let (tx, rx);
        let position = {
            let mut st = self.lock();
            let position = self.admit(&st, caller, joined, ready_by)?;
            // Nobody in line or being served, nothing on its way out: a
            // free slot is this call's.
            if st.live == 0
                && self.transit.as_ref().is_none_or(|t| t.is_clear(joined))
                && self.limiter.try_acquire_now() == Some(Decision::Granted)
            {
                st.next_slot = joined + self.interval;
                return Ok(Turn {
                    position,
                    waited: Duration::ZERO,
                    granted_at: joined,
                    departure: self.departure(),
                });
            }
            (tx, rx) = oneshot::channel();
            st.waiters.push(
                caller,
                Waiter {
                    tx,
                    ready_by,
                    joined,
                },
            );
            st.live += 1;
            st.live_by_caller
                .entry(Arc::clone(&caller.id))
                .or_insert((0, caller.weight.get()))
                .0 += 1;
            metrics::queue_depth(&self.name, st.live);
            position
        };
        let _live = LiveGuard(self, &caller.id);
        self.wake.notify_one();
        match timeout_at(ready_by, rx).await {
            Ok(Ok(Ok((granted_at, departure)))) => Ok(Turn {
                position,
                waited: granted_at.saturating_duration_since(joined),
                granted_at,
                departure,
            }),
            Ok(Ok(Err(e))) => Err(e),
            // The dispatcher drops a sender when it stops, or when it finds the
            // waiter's `ready_by` passed a moment before this timer fires.
            Ok(Err(_)) if self.closing.is_cancelled() => Err(BudgetError::ShuttingDown),
            Ok(Err(_)) | Err(_) => {
                let st = self.lock();
                Err(BudgetError::Exhausted {
                    reason: Rejection::TimedOut,
                    retry_after: self.eta(&st, st.live, Instant::now()),
                })
            }
        }
    }

    /// Whether `caller` would be admitted now (see [`Self::wait_turn`]), without
    /// joining the line: lets a call be refused before anything is set up.
    pub fn check(&self, caller: &Caller, ready_by: Instant) -> Result<(), BudgetError> {
        let st = self.lock();
        self.admit(&st, caller, Instant::now(), ready_by).map(drop)
    }

    /// Admission of `caller` joining at `joined`: its position in line, or
    /// why it is refused at once.
    fn admit(
        &self,
        st: &State,
        caller: &Caller,
        joined: Instant,
        ready_by: Instant,
    ) -> Result<usize, BudgetError> {
        if self.closing.is_cancelled() {
            return Err(BudgetError::ShuttingDown);
        }
        let position = ahead(caller, st.live_by_caller.iter().map(|(id, v)| (id, *v)));
        let eta = self.eta(st, position, joined);
        let refuse = |reason| {
            Err(BudgetError::Exhausted {
                reason,
                retry_after: eta,
            })
        };
        if st.live >= self.max_queue {
            return refuse(Rejection::QueueFull);
        }
        if eta > self.max_wait {
            return refuse(Rejection::MaxWait);
        }
        // A line shared with other replicas moves unevenly: keep what the
        // pace exceeds the interval by as slack (none when alone).
        let slack = if st.live == 0 {
            Duration::ZERO
        } else {
            st.pace.get(joined).saturating_sub(self.interval)
        };
        if joined + eta + slack > ready_by {
            return refuse(Rejection::Deadline);
        }
        Ok(position)
    }

    /// When a caller joining now could expect its slot (for `RetryInfo`).
    pub fn retry_after(&self) -> Duration {
        let st = self.lock();
        self.eta(&st, st.live, Instant::now())
    }

    /// Upstream said 429: no slot for `retry_after`, or for T doubled per
    /// consecutive 429 when the vendor gives no Retry-After.
    pub async fn pushback(&self, retry_after: Option<Duration>) -> Duration {
        let wait = {
            let mut st = self.lock();
            let wait = retry_after.unwrap_or_else(|| {
                let factor = 1u32 << st.pushback_streak.min(5);
                (self.interval * factor).min(MAX_BACKOFF)
            });
            st.pushback_streak = st.pushback_streak.saturating_add(1);
            st.next_slot = st.next_slot.max(Instant::now() + wait);
            wait
        };
        self.limiter.pushback(wait).await;
        wait
    }

    /// After which instant a request granted at `granted_at` leaves late
    /// (see [`Self::sent_late`]); `None` if it never does.
    pub fn late_after(&self, granted_at: Instant) -> Option<Instant> {
        self.transit.as_ref().map(|t| granted_at + t.slack)
    }

    /// A request left at `sent_at`, later than its grant allowed for: no
    /// slot before `sent_at` + the interval, so the vendor never sees two
    /// arrivals closer than that, whatever delayed this one.
    pub async fn sent_late(&self, sent_at: Instant) {
        let next = sent_at + self.interval;
        {
            let mut st = self.lock();
            st.next_slot = st.next_slot.max(next);
        }
        tracing::debug!(
            account = %self.name,
            late_ms = sent_at.elapsed().as_millis() as u64,
            "upstream request left late: next slot moved"
        );
        metrics::late_send(&self.name);
        self.limiter
            .pushback(next.saturating_duration_since(Instant::now()))
            .await;
    }

    /// A granted request on its way out, holding back the next grant.
    pub(super) fn departure(&self) -> Departure {
        self.transit
            .as_ref()
            .map_or_else(Departure::default, Transit::depart)
    }

    /// Upstream accepted a call: 429 backoff starts over.
    pub fn reset_pushback(&self) {
        self.lock().pushback_streak = 0;
    }

    /// Refuses new callers and answers every waiting one with `ShuttingDown`.
    pub fn close(&self) {
        self.closing.cancel();
        self.wake.notify_one();
    }

    /// When a call joining now with `ahead` calls before it could expect its
    /// slot: the next slot plus, per call ahead, this replica's pace.
    fn eta(&self, st: &State, ahead: usize, now: Instant) -> Duration {
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        st.next_slot.saturating_duration_since(now) + st.pace.get(now).saturating_mul(ahead)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is a
        // single assignment, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a call out of `live` however `wait_turn` ends, cancellation included.
struct LiveGuard<'a>(&'a Line, &'a Arc<str>);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.live = st.live.saturating_sub(1);
        if let Some((count, _)) = st.live_by_caller.get_mut(self.1) {
            *count -= 1;
            if *count == 0 {
                st.live_by_caller.remove(self.1);
            }
        }
        metrics::queue_depth(&self.0.name, st.live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::local::LocalLimiter;
    use tokio::time::sleep;

    fn config(max_queue: usize) -> BudgetConfig {
        BudgetConfig::with_max_queue(max_queue)
    }

    fn queue(max_queue: usize) -> Arc<Line> {
        let c = config(max_queue);
        Line::spawn("test", Arc::new(LocalLimiter::new(&c)), &c)
    }

    fn anon() -> Caller {
        Caller::anonymous()
    }

    const T: Duration = Duration::from_millis(1010);

    /// A caller waiting for its turn in a task of its own; yields when it was served.
    fn served_at(q: &Arc<Line>) -> tokio::task::JoinHandle<Instant> {
        let q = Arc::clone(q);
        tokio::spawn(async move {
            q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
            Instant::now()
        })
    }
    const FAR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_fifo_one_interval_apart() {
        let q = queue(100);
        let start = Instant::now();
        let mut handles = Vec::new();
        for i in 0..5 {
            let q = Arc::clone(&q);
            handles.push(tokio::spawn(async move {
                let turn = q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
                (i, turn.position, Instant::now() - start)
            }));
            tokio::task::yield_now().await;
        }
        for (n, h) in handles.into_iter().enumerate() {
            let (i, position, at) = h.await.unwrap();
            // The first is served at once, so each later caller has one fewer ahead.
            assert_eq!((i, position), (n, n.saturating_sub(1)));
            assert_eq!(at, T * n as u32, "caller {n} served at {at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_slot_is_taken_at_once_without_the_dispatcher() {
        use futures::FutureExt;
        let q = queue(100);
        // Completes on its first poll: no other task (the dispatcher) ran.
        let turn = q.wait_turn(&anon(), Instant::now() + FAR).now_or_never();
        let turn = turn.expect("granted on the first poll").unwrap();
        assert_eq!((turn.position, turn.waited), (0, Duration::ZERO));
        // The next one waits in line for the dispatcher.
        assert!(
            q.wait_turn(&anon(), Instant::now() + FAR)
                .now_or_never()
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_send_moves_the_next_slot_to_one_interval_after_it() {
        let q = queue(100);
        let turn = q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let slack = Duration::from_millis(5);
        assert_eq!(q.late_after(turn.granted_at), Some(turn.granted_at + slack));
        // The request left 60 ms after its grant (a cold connection, say).
        tokio::time::advance(Duration::from_millis(60)).await;
        turn.departure.left(Instant::now(), true);
        q.sent_late(Instant::now()).await;
        let sent = Instant::now();
        // Admission counts from the send, not from the grant.
        match q.check(&anon(), sent + T - Duration::from_millis(30)) {
            Err(BudgetError::Exhausted {
                reason: Rejection::Deadline,
                retry_after,
            }) => assert_eq!(retry_after, T),
            other => panic!("admitted or refused otherwise: {other:?}"),
        }
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(Instant::now() - sent, T, "one full interval after the send");
    }

    #[tokio::test(start_paused = true)]
    async fn no_grant_while_a_granted_request_has_not_left() {
        let q = queue(100);
        let start = Instant::now();
        let first = q.wait_turn(&anon(), start + FAR).await.unwrap();
        let next = served_at(&q);
        // Its connection takes 3 T: no slot for anyone meanwhile.
        sleep(T * 3).await;
        assert!(!next.is_finished(), "granted while the first had not left");
        first.departure.left(Instant::now(), true);
        assert_eq!(next.await.unwrap() - start, T * 4, "one T after it left");
    }

    #[tokio::test(start_paused = true)]
    async fn the_free_slot_is_not_taken_while_a_request_is_on_its_way_or_just_left_late() {
        use futures::FutureExt;
        let q = queue(100);
        let first = q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        // The limiter has a free slot again, but the first request has not left.
        sleep(T * 3).await;
        let asked = q.wait_turn(&anon(), Instant::now() + FAR).now_or_never();
        assert!(
            asked.is_none(),
            "took the free slot while a request had not left"
        );
        // It leaves now, late: the next slot is one interval after it.
        first.departure.left(Instant::now(), true);
        sleep(T / 2).await;
        let asked = q.wait_turn(&anon(), Instant::now() + FAR).now_or_never();
        assert!(
            asked.is_none(),
            "took a slot within an interval of a late send"
        );
        sleep(T / 2).await;
        let asked = q.wait_turn(&anon(), Instant::now() + FAR).now_or_never();
        assert!(
            asked.is_some(),
            "one interval after the late send the slot is free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_leaves_frees_the_line() {
        let q = queue(100);
        let start = Instant::now();
        let first = q.wait_turn(&anon(), start + FAR).await.unwrap();
        let next = served_at(&q);
        sleep(T / 2).await;
        drop(first); // no connection: it never went out
        assert_eq!(next.await.unwrap() - start, T, "the limiter's own slot");
    }

    #[tokio::test(start_paused = true)]
    async fn sends_are_never_late_where_spacing_is_not_promised() {
        let mut c = config(100);
        c.burst = std::num::NonZeroU32::new(5).unwrap();
        let q = Line::spawn("burst", Arc::new(LocalLimiter::new(&c)), &c);
        assert_eq!(q.late_after(Instant::now()), None);
        let mut c = config(100);
        c.safety_margin = Duration::ZERO;
        let q = Line::spawn("no-margin", Arc::new(LocalLimiter::new(&c)), &c);
        assert_eq!(q.late_after(Instant::now()), None);
    }

    /// A line whose limiter grants one slot every 3 T (other replicas take
    /// two of every three on the shared budget), at 12 T + 1 ms: eight
    /// callers joined at 0; slots at 0 (taken at once), 3 T, 6 T, 9 T and
    /// 12 T served five; three still wait (held by the returned tasks).
    async fn shared_line_with_three_waiting() -> (
        Arc<Line>,
        Vec<tokio::task::JoinHandle<Result<(), BudgetError>>>,
    ) {
        let c = config(100);
        let limiter = Arc::new(LocalLimiter::with_interval(
            T * 3,
            std::num::NonZeroU32::MIN,
        ));
        let q = Line::spawn("shared", limiter, &c);
        let mut held = Vec::new();
        for _ in 0..8 {
            let q = Arc::clone(&q);
            held.push(tokio::spawn(async move {
                q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop)
            }));
            tokio::task::yield_now().await;
        }
        sleep(T * 12 + Duration::from_millis(1)).await;
        assert_eq!(q.depth(), 3);
        (q, held)
    }

    #[tokio::test(start_paused = true)]
    async fn admission_uses_the_pace_the_line_actually_moves_at() {
        let (q, _held) = shared_line_with_three_waiting().await;
        // At one interval per call ahead this caller would be admitted
        // (about 4 T); at the pace seen, its turn is further than its deadline.
        let err = q
            .wait_turn(&anon(), Instant::now() + T * 5)
            .await
            .unwrap_err();
        match err {
            BudgetError::Exhausted {
                reason,
                retry_after,
            } => {
                assert_eq!(reason, Rejection::Deadline);
                assert!(retry_after > T * 6, "{retry_after:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_line_keeps_what_its_pace_exceeds_the_interval_by_as_slack() {
        let (q, _held) = shared_line_with_three_waiting().await;
        // A turn due just before the deadline is not enough while the line
        // moves slower than the interval: the slack is kept.
        let eta = q.retry_after();
        let err = q
            .check(&anon(), Instant::now() + eta + Duration::from_millis(1))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BudgetError::Exhausted {
                    reason: Rejection::Deadline,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_exactly_max_wait_away_is_admitted_and_one_more_is_not() {
        let mut c = config(100);
        c.max_wait = T * 2;
        let q = Line::spawn("max-wait", Arc::new(LocalLimiter::new(&c)), &c);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap(); // the free slot
        let mut held = Vec::new();
        let mut hold = |q: &Arc<Line>| {
            let q = Arc::clone(q);
            held.push(tokio::spawn(async move {
                q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop)
            }));
        };
        hold(&q);
        q.until_depth(1).await;
        // The next slot is T away and one call is ahead: 2 T = max-wait.
        q.check(&anon(), Instant::now() + FAR).unwrap();
        hold(&q);
        q.until_depth(2).await;
        let err = q.check(&anon(), Instant::now() + FAR).unwrap_err();
        assert!(
            matches!(
                err,
                BudgetError::Exhausted {
                    reason: Rejection::MaxWait,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_does_not_waste_a_slot() {
        let q = queue(100);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap(); // takes the slot at t=0
        let leaver = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop) })
        };
        tokio::task::yield_now().await;
        let stayer = served_at(&q);
        tokio::time::advance(T / 2).await;
        leaver.abort();
        let start = Instant::now() - T / 2;
        let served = stayer.await.unwrap();
        assert_eq!(
            served - start,
            T,
            "the slot at T went to the caller still waiting"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hopeless_calls_are_refused_at_once_with_retry_after() {
        let q = queue(100);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let before = Instant::now();
        let err = q
            .wait_turn(&anon(), Instant::now() + T / 2)
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), before, "refused without waiting");
        match err {
            BudgetError::Exhausted {
                reason,
                retry_after,
            } => {
                assert_eq!(reason, Rejection::Deadline);
                assert_eq!(retry_after, T);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn is_queue_full<T: std::fmt::Debug>(result: &Result<T, BudgetError>) -> bool {
        matches!(
            result,
            Err(BudgetError::Exhausted {
                reason: Rejection::QueueFull,
                ..
            })
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_bound_is_exact() {
        use futures::FutureExt;
        const BOUND: usize = 3;
        let q = queue(BOUND);
        let start = Instant::now();
        // The free slot at 0: taken at once, nobody waits.
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        assert_eq!(q.depth(), 0);
        let mut held = Vec::new();
        for n in 0..BOUND {
            held.push(served_at(&q));
            q.until_depth(n + 1).await;
        }
        // Exactly BOUND wait: the next call is refused, at once.
        let over = q.wait_turn(&anon(), start + FAR).now_or_never();
        let over = over.expect("refused without waiting");
        assert!(is_queue_full(&over), "{over:?}");
        let check = q.check(&anon(), start + FAR);
        assert!(is_queue_full(&check), "{check:?}");
        assert_eq!(q.depth(), BOUND);
        // One leaves: exactly one more is admitted, and the next refused.
        held.pop().unwrap().abort();
        q.until_depth(BOUND - 1).await;
        assert!(q.check(&anon(), start + FAR).is_ok());
        held.push(served_at(&q));
        q.until_depth(BOUND).await;
        let over = q.wait_turn(&anon(), start + FAR).now_or_never();
        let over = over.expect("refused without waiting");
        assert!(is_queue_full(&over), "{over:?}");
        // Every call held in line is served, in order, one interval apart.
        for (n, h) in held.into_iter().enumerate() {
            let at = h.await.expect("served") - start;
            assert_eq!(at, T * (n as u32 + 1), "call {n} served at {at:?}");
        }
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_refuses_calls_that_would_wait_too_long() {
        let q = queue(1000);
        let mut held = Vec::new();
        for _ in 0..31 {
            let q = Arc::clone(&q);
            held.push(tokio::spawn(async move {
                q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop)
            }));
            tokio::task::yield_now().await;
        }
        let err = q
            .wait_turn(&anon(), Instant::now() + FAR)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                BudgetError::Exhausted {
                    reason: Rejection::MaxWait,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_delays_the_next_turn_and_backs_off() {
        let q = queue(100);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(q.pushback(None).await, T);
        assert_eq!(q.pushback(None).await, T * 2);
        q.reset_pushback();
        assert_eq!(q.pushback(None).await, T, "the backoff starts over");
        assert_eq!(
            q.pushback(Some(Duration::from_secs(7))).await,
            Duration::from_secs(7)
        );
        // Admission knows: a call that must go within 3 s is refused now.
        match q.check(&anon(), Instant::now() + Duration::from_secs(3)) {
            Err(BudgetError::Exhausted {
                reason: Rejection::Deadline,
                retry_after,
            }) => assert!(retry_after >= Duration::from_secs(7), "{retry_after:?}"),
            other => panic!("admitted or refused otherwise: {other:?}"),
        }
        let start = Instant::now();
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_call_is_not_stuck_behind_a_flooding_caller() {
        let q = queue(1000);
        let flood = Caller::new("flood", std::num::NonZeroU32::MIN);
        let mut held = Vec::new();
        for _ in 0..30 {
            let (q, flood) = (Arc::clone(&q), flood.clone());
            held.push(tokio::spawn(async move {
                q.wait_turn(&flood, Instant::now() + FAR).await.map(drop)
            }));
            tokio::task::yield_now().await;
        }
        let start = Instant::now();
        let single = Caller::new("single", std::num::NonZeroU32::MIN);
        let turn = q.wait_turn(&single, Instant::now() + FAR).await.unwrap();
        assert!(
            turn.position <= 1,
            "one flooding call at most before it, got {}",
            turn.position
        );
        let waited = Instant::now() - start;
        assert!(
            waited <= T * 2,
            "served within two intervals, waited {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn close_answers_waiters_with_shutting_down() {
        let q = queue(100);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let waiting = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop) })
        };
        tokio::task::yield_now().await;
        q.close();
        assert!(matches!(
            waiting.await.unwrap(),
            Err(BudgetError::ShuttingDown)
        ));
        assert!(matches!(
            q.wait_turn(&anon(), Instant::now() + FAR).await,
            Err(BudgetError::ShuttingDown)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn close_answers_at_once_callers_still_in_line_behind_the_one_being_served() {
        let q = queue(100);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let q = Arc::clone(&q);
                tokio::spawn(
                    async move { q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop) },
                )
            })
            .collect();
        q.until_depth(3).await;
        let closed = Instant::now();
        q.close();
        for w in waiting {
            assert!(matches!(w.await.unwrap(), Err(BudgetError::ShuttingDown)));
        }
        assert_eq!(
            Instant::now(),
            closed,
            "answered at once, not at their deadlines"
        );
    }
}
