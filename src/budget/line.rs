//! One account's line as this replica sees it: a caller asks the store for
//! a place (one round trip: granted, queued with the slot it will have at
//! the latest, or refused at once), sleeps until that slot, and claims it.
//! No polling: a waiter asks again only at its slot, or at once when the
//! store says the line moved up (a caller left, on any replica). A caller
//! that leaves (cancelled, deadline) takes its ticket out of the line, so
//! its slot goes to whoever waits behind it, on whichever replica.
//!
//! The order, the slots and the fair shares are the store's
//! ([`super::schedule`]); this side only waits, claims and reports.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::schedule::claim_late;
use super::store::{Answer, Ask, BackendUnavailable, Refusal, Store, duration, micros, new_ticket};
use super::{BudgetError, Rejection};
use crate::config::BudgetConfig;
use crate::domain::Caller;
use crate::telemetry::metrics;

/// Longest pushback applied when Infobip answers 429 without Retry-After.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

mod idle;

/// What a caller learns when its turn comes.
#[derive(Debug)]
pub struct Turn {
    /// Slots ahead of it when it joined.
    pub position: usize,
    /// Time spent in line.
    pub waited: Duration,
    /// When the slot was asked for and taken (at the latest): the upstream
    /// request should leave now.
    pub granted_at: Instant,
    /// The ticket the slot was granted to (see [`super::spacing`]).
    pub(super) ticket: String,
}

struct State {
    /// When a caller joining now could expect a slot, as last learnt.
    next_free: Instant,
    /// Consecutive upstream 429s without Retry-After, for backoff.
    pushback_streak: u32,
}

/// The waiting callers of one account on this replica, in front of the
/// account's store.
pub struct Line {
    pub(super) name: String,
    pub(super) store: Arc<dyn Store>,
    pub(super) interval: Duration,
    /// Where spacing is promised (burst 1 and a margin): how late after its
    /// grant a request may leave before it holds the line.
    pub(super) slack: Option<Duration>,
    waiting: AtomicUsize,
    state: Mutex<State>,
    closing: CancellationToken,
}

impl Line {
    pub fn new(name: &str, store: Arc<dyn Store>, config: &BudgetConfig) -> Arc<Self> {
        let spacing = config.burst.get() == 1 && !config.safety_margin.is_zero();
        Arc::new(Self {
            name: name.to_owned(),
            store,
            interval: config.interval(),
            // Half the margin: a send this late after its grant, followed by
            // one on time, still arrives at least interval - margin/2 apart.
            slack: spacing.then(|| config.safety_margin / 2),
            waiting: AtomicUsize::new(0),
            state: Mutex::new(State {
                next_free: Instant::now(),
                pushback_streak: 0,
            }),
            closing: CancellationToken::new(),
        })
    }

    /// The account's interval T between slots.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Callers of this replica waiting now.
    #[cfg(test)]
    pub(crate) fn depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for `caller`'s turn on this account; `ready_by` is the latest
    /// instant at which the slot is still useful (caller deadline minus
    /// upstream reserve). Refuses at once when the turn cannot come by then.
    pub async fn wait_turn(&self, caller: &Caller, ready_by: Instant) -> Result<Turn, BudgetError> {
        let joined = Instant::now();
        let ask = Ask {
            ticket: new_ticket(),
            lane: caller.id.to_string(),
            weight: caller.weight.get(),
            ready_in: until(joined, ready_by),
            background: false,
        };
        // The store keeps the ticket a little past `ready_by` for a claim
        // that comes late, each late claim moving the next slot on: a slot
        // promised at `ready_by` may come that much later, taken from the
        // upstream reserve.
        let kept = ready_by + duration(claim_late(micros(self.interval)));
        let mut moved = self.store.moved();
        moved.mark_unchanged();
        // From here on, a caller that leaves takes its ticket out of the line.
        let mut waiter = Waiter::new(self, &ask.ticket);
        // Each store command boxed: a caller waiting between them holds no
        // room for one (10,000 waiting callers, BENCHMARKS §5).
        let (first, mut asked) = Box::pin(self.ask(&ask.ticket, self.store.admit(&ask))).await?;
        // Slots before its own, as its first answer tells.
        let position = match first {
            Answer::Queued(wait) => {
                let t = u64::try_from(micros(self.interval)).unwrap_or(1).max(1);
                let slots = u64::try_from(wait)
                    .unwrap_or(0)
                    .div_ceil(t)
                    .saturating_sub(1);
                usize::try_from(slots).unwrap_or(usize::MAX)
            }
            _ => 0,
        };
        let mut answer = first;
        // The answer came from an admission (which never answers `Gone`
        // but for a store that lost its state in between).
        let mut admitted_now = true;
        loop {
            let at = match answer {
                Answer::Granted => {
                    waiter.granted();
                    let now = Instant::now();
                    self.learn(now + self.interval);
                    return Ok(Turn {
                        position,
                        waited: now.saturating_duration_since(joined),
                        // The slot was taken when it was asked for, whenever
                        // the answer came: lateness counts from there.
                        granted_at: asked,
                        ticket: ask.ticket,
                    });
                }
                Answer::Refused(why, wait) => {
                    waiter.granted();
                    let retry_after = duration(wait);
                    self.learn(Instant::now() + retry_after);
                    return Err(BudgetError::Exhausted {
                        reason: match why {
                            Refusal::QueueFull => Rejection::QueueFull,
                            Refusal::MaxWait => Rejection::MaxWait,
                            Refusal::Deadline => Rejection::Deadline,
                        },
                        retry_after,
                    });
                }
                Answer::Queued(wait) => {
                    waiter.queued();
                    Instant::now() + duration(wait)
                }
                // The ticket went missing (dropped unclaimed, or admitted by
                // the other store before a switch): in line again, while the
                // caller has time.
                Answer::Gone if !admitted_now && Instant::now() < ready_by => {
                    admitted_now = true;
                    let again = Ask {
                        ready_in: until(Instant::now(), ready_by),
                        ..ask.clone()
                    };
                    (answer, asked) =
                        Box::pin(self.ask(&ask.ticket, self.store.admit(&again))).await?;
                    continue;
                }
                Answer::Gone => {
                    waiter.granted();
                    return Err(self.timed_out());
                }
            };
            // Every select here is `biased`: a shutdown first, then the
            // caller's own deadline, then news that the line moved.
            tokio::select! {
                biased;
                () = self.closing.cancelled() => return Err(BudgetError::ShuttingDown),
                () = sleep_until(at.min(kept)) => {}
                changed = moved.changed() => {
                    if changed.is_err() {
                        // The store is gone; only the slot or the deadline remain.
                        sleep_until(at.min(kept)).await;
                    }
                }
            }
            // The deadline came before the slot: its turn cannot come in time.
            if Instant::now() >= kept && at > kept {
                return Err(self.timed_out());
            }
            (answer, asked) = Box::pin(self.ask(&ask.ticket, self.store.claim(&ask))).await?;
            admitted_now = false;
        }
    }

    /// One store command for `ticket`, unless the gateway shuts down
    /// first; with when it was asked. Where spacing is promised, an answer
    /// later than the slack (a Redis reply held up, or several tries) may
    /// bring a slot taken when it was asked: the line is held meanwhile, on
    /// every replica, until the answer is known, so no other replica's slot
    /// comes while this one's request has not left (see [`super::spacing`],
    /// which lets the line go once it has).
    async fn ask(
        &self,
        ticket: &str,
        command: impl Future<Output = Result<Answer, BackendUnavailable>>,
    ) -> Result<(Answer, Instant), BudgetError> {
        let asked = Instant::now();
        if self.closing.is_cancelled() {
            return Err(BudgetError::ShuttingDown);
        }
        let mut command = std::pin::pin!(command);
        let answer = match self.slack {
            None => self.unless_closing(&mut command).await,
            Some(slack) => {
                tokio::select! {
                    biased;
                    answer = self.unless_closing(&mut command) => answer,
                    () = sleep_until(asked + slack) => {
                        let holding = async {
                            loop {
                                self.store.hold(ticket, self.interval).await;
                                tokio::time::sleep(self.interval / 2).await;
                            }
                        };
                        let answer = tokio::select! {
                            biased;
                            answer = self.unless_closing(&mut command) => answer,
                            () = holding => unreachable!("holds until the answer"),
                        };
                        if !matches!(answer, Ok(Answer::Granted)) {
                            self.store.left(ticket, false).await;
                        }
                        answer
                    }
                }
            }
        };
        Ok((answer?, asked))
    }

    async fn unless_closing(
        &self,
        command: impl Future<Output = Result<Answer, BackendUnavailable>>,
    ) -> Result<Answer, BudgetError> {
        tokio::select! {
            biased;
            () = self.closing.cancelled() => Err(BudgetError::ShuttingDown),
            answer = command => answer.map_err(|_| BudgetError::BackendUnavailable),
        }
    }

    fn timed_out(&self) -> BudgetError {
        BudgetError::Exhausted {
            reason: Rejection::TimedOut,
            retry_after: self.retry_after(),
        }
    }

    /// A slot is not expected before `at` for a caller joining now.
    fn learn(&self, at: Instant) {
        self.lock().next_free = at;
    }

    /// When a caller joining now could expect its slot (for `RetryInfo`),
    /// as last learnt from the store.
    pub fn retry_after(&self) -> Duration {
        self.lock()
            .next_free
            .saturating_duration_since(Instant::now())
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
            st.next_free = st.next_free.max(Instant::now() + wait);
            wait
        };
        self.store.pushback(wait).await;
        wait
    }

    /// Upstream accepted a call: 429 backoff starts over.
    pub fn reset_pushback(&self) {
        self.lock().pushback_streak = 0;
    }

    /// Refuses new callers and answers every waiting one with `ShuttingDown`.
    pub fn close(&self) {
        self.closing.cancel();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Single-field updates only: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// From `now` to `then` in µs; negative when `then` has passed.
fn until(now: Instant, then: Instant) -> i64 {
    if then >= now {
        micros(then - now)
    } else {
        -micros(now - then)
    }
}

/// A caller in line on this replica: counted in the depth gauge while it
/// waits, and its ticket taken out of the line if it leaves before its turn
/// (cancelled, deadline, shutdown), so the slot goes to whoever waits
/// behind it.
struct Waiter<'a> {
    line: &'a Line,
    ticket: Option<String>,
    counted: bool,
}

impl<'a> Waiter<'a> {
    fn new(line: &'a Line, ticket: &str) -> Self {
        Self {
            line,
            ticket: Some(ticket.to_owned()),
            counted: false,
        }
    }

    /// In line: counted in the depth.
    fn queued(&mut self) {
        if !std::mem::replace(&mut self.counted, true) {
            let depth = self.line.waiting.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::queue_depth(&self.line.name, depth);
        }
    }

    /// Served, refused or gone: nothing to take out.
    fn granted(&mut self) {
        self.ticket = None;
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.counted {
            let depth = self.line.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::queue_depth(&self.line.name, depth);
        }
        if let Some(ticket) = self.ticket.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let store = Arc::clone(&self.line.store);
            // The caller is gone; its ticket leaves the line on its own.
            runtime.spawn(async move { store.leave(&ticket).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use futures::FutureExt;
    use futures::future::BoxFuture;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::budget::store::Rules;
    use crate::budget::store::memory::MemoryStore;

    /// The default interval: 1/s with a 10 ms margin.
    const T: Duration = Duration::from_millis(1010);
    const FAR: Duration = Duration::from_secs(3600);

    fn line_with(store: &Arc<MemoryStore>) -> Arc<Line> {
        Line::new("test", Arc::clone(store) as Arc<dyn Store>, &config())
    }

    fn config() -> BudgetConfig {
        BudgetConfig::with_max_queue(100)
    }

    fn store() -> Arc<MemoryStore> {
        let c = config();
        Arc::new(MemoryStore::new("test", Rules::of(&c, c.interval())))
    }

    fn anon() -> Caller {
        Caller::anonymous()
    }

    /// A caller of `who` in line in a task of its own, useful until
    /// `ready_by`; yields when it was served. Returns once it is in line.
    async fn join(q: &Arc<Line>, who: &Caller, ready_by: Instant) -> JoinHandle<Instant> {
        let depth = q.depth();
        let (q2, who) = (Arc::clone(q), who.clone());
        let task = tokio::spawn(async move {
            q2.wait_turn(&who, ready_by).await.expect("served");
            Instant::now()
        });
        until(|| q.depth() == depth + 1).await;
        task
    }

    /// Yields to the other tasks, without moving the clock, until `done`.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_one_interval_apart() {
        let q = line_with(&store());
        let start = Instant::now();
        let first = q.wait_turn(&anon(), start + FAR).now_or_never();
        let first = first.expect("a free slot on the first poll").unwrap();
        assert_eq!((first.position, first.waited), (0, Duration::ZERO));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            tasks.push(join(&q, &anon(), start + FAR).await);
        }
        // The fifth in line is told four slots come before its own.
        let q2 = Arc::clone(&q);
        let told = tokio::spawn(async move { q2.wait_turn(&anon(), start + FAR).await });
        until(|| q.depth() == 5).await;
        for (n, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap() - start, T * (n as u32 + 1));
        }
        let turn = told.await.unwrap().unwrap();
        assert_eq!((turn.position, turn.waited), (4, T * 5));
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_leaving_the_middle_of_the_line_gives_its_slot_to_the_next() {
        let store = store();
        let q = line_with(&store);
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let head = join(&q, &anon(), start + FAR).await;
        let middle = join(&q, &anon(), start + FAR).await;
        let last = join(&q, &anon(), start + FAR).await;
        tokio::time::advance(T / 2).await;
        middle.abort();
        until(|| store.waiting() == 2).await;
        assert_eq!(head.await.unwrap() - start, T, "the head at its slot");
        assert_eq!(
            last.await.unwrap() - start,
            T * 2,
            "the last one at the slot the one that left would have had"
        );
        assert!(middle.await.unwrap_err().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn hopeless_calls_are_refused_at_once_with_retry_after() {
        let q = line_with(&store());
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let _waiting = join(&q, &anon(), start + FAR).await;
        // The next slot is 2T out: a call useful for 1.5 T is refused on its
        // first poll, and told when coming back would reach it: T/2.
        let refused = q.wait_turn(&anon(), start + T * 3 / 2).now_or_never();
        match refused.expect("refused on the first poll") {
            Err(BudgetError::Exhausted {
                reason: Rejection::Deadline,
                retry_after,
            }) => assert_eq!(retry_after, T / 2),
            other => panic!("admitted or refused otherwise: {other:?}"),
        }
        assert_eq!(q.retry_after(), T / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_useful_until_its_slot_exactly_is_served_at_it() {
        let q = line_with(&store());
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let at = join(&q, &anon(), start + T).await;
        assert_eq!(at.await.unwrap() - start, T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_whose_slot_moved_past_its_deadline_times_out_then() {
        let q = line_with(&store());
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let waiting = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.wait_turn(&anon(), start + T * 2).await.map(drop) })
        };
        until(|| q.depth() == 1).await;
        // A 429: no slot for 5 s.
        q.pushback(Some(Duration::from_secs(5))).await;
        match waiting.await.unwrap() {
            Err(BudgetError::Exhausted {
                reason: Rejection::TimedOut,
                ..
            }) => assert_eq!(
                Instant::now() - start,
                T * 2 + Duration::from_millis(50),
                "at its deadline, and the little a late claim is allowed"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_moved_to_the_last_instant_a_late_claim_is_kept_is_served_at_it() {
        let q = line_with(&store());
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let at = join(&q, &anon(), start + T * 2).await;
        // A 429 moves the next slot to the deadline and the 50 ms a late
        // claim is allowed, exactly: still in time.
        let kept = start + T * 2 + Duration::from_millis(50);
        q.pushback(Some(kept - Instant::now())).await;
        assert_eq!(at.await.unwrap(), kept);
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_delays_the_next_turn_and_backs_off() {
        let q = line_with(&store());
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(q.pushback(None).await, T);
        assert_eq!(q.pushback(None).await, T * 2);
        q.reset_pushback();
        assert_eq!(q.pushback(None).await, T, "the backoff starts over");
        let seven = Duration::from_secs(7);
        assert_eq!(q.pushback(Some(seven)).await, seven);
        let start = Instant::now();
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(Instant::now() - start, seven);
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_callers_share_slots_by_weight_through_the_line() {
        let q = line_with(&store());
        let start = Instant::now();
        q.wait_turn(&anon(), start + FAR).await.unwrap();
        let (light, heavy) = (
            Caller::new("light", NonZeroU32::MIN),
            Caller::new("heavy", NonZeroU32::new(3).unwrap()),
        );
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(("light", join(&q, &light, start + FAR).await));
            tasks.push(("heavy", join(&q, &heavy, start + FAR).await));
        }
        let mut served = Vec::new();
        for (who, task) in tasks {
            served.push((task.await.unwrap(), who));
        }
        served.sort();
        let heavy_first_8 = served[..8].iter().filter(|(_, w)| *w == "heavy").count();
        assert_eq!(heavy_first_8, 6, "{served:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn close_answers_waiters_and_newcomers_with_shutting_down() {
        let q = line_with(&store());
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let waiting = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.wait_turn(&anon(), Instant::now() + FAR).await.map(drop) })
        };
        until(|| q.depth() == 1).await;
        q.close();
        assert!(matches!(
            waiting.await.unwrap(),
            Err(BudgetError::ShuttingDown)
        ));
        assert!(matches!(
            q.wait_turn(&anon(), Instant::now() + FAR).await,
            Err(BudgetError::ShuttingDown)
        ));
        assert_eq!(q.depth(), 0);
    }

    /// A store answering admissions and claims from a script (then: in line,
    /// an hour from the slot), recording each command.
    struct Scripted {
        admits: Mutex<Vec<Answer>>,
        claims: Mutex<Vec<Answer>>,
        /// `admit`/`claim`/`leave`, with the ask's `ready_in` (µs).
        log: Mutex<Vec<(&'static str, i64)>>,
        moved: tokio::sync::watch::Sender<u64>,
    }

    impl Scripted {
        fn new(admits: &[Answer], claims: &[Answer]) -> Arc<Self> {
            let rev = |a: &[Answer]| Mutex::new(a.iter().rev().copied().collect());
            Arc::new(Self {
                admits: rev(admits),
                claims: rev(claims),
                log: Mutex::new(Vec::new()),
                moved: tokio::sync::watch::Sender::new(0),
            })
        }

        fn next(&self, what: &'static str, ask: &Ask) -> Answer {
            self.log.lock().unwrap().push((what, ask.ready_in));
            let script = if what == "admit" {
                &self.admits
            } else {
                &self.claims
            };
            let next = script.lock().unwrap().pop();
            next.unwrap_or(Answer::Queued(3_600_000_000))
        }

        fn log(&self) -> Vec<(&'static str, i64)> {
            self.log.lock().unwrap().clone()
        }

        fn queue(q: &Arc<Self>) -> Arc<Line> {
            Line::new("test", Arc::clone(q) as Arc<dyn Store>, &config())
        }
    }

    impl Store for Scripted {
        fn admit<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
            futures::future::ready(Ok(self.next("admit", ask))).boxed()
        }
        fn claim<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
            futures::future::ready(Ok(self.next("claim", ask))).boxed()
        }
        fn leave<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
            self.log.lock().unwrap().push(("leave", 0));
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
        fn moved(&self) -> tokio::sync::watch::Receiver<u64> {
            self.moved.subscribe()
        }
    }

    const T_US: i64 = 1_010_000;

    #[tokio::test(start_paused = true)]
    async fn a_ticket_gone_while_its_caller_has_time_is_admitted_again_with_the_time_left() {
        let store = Scripted::new(&[Answer::Queued(T_US), Answer::Granted], &[Answer::Gone]);
        let q = Scripted::queue(&store);
        let start = Instant::now();
        let turn = q.wait_turn(&anon(), start + T * 10).await;
        assert_eq!(turn.unwrap().waited, T);
        assert_eq!(
            store.log(),
            [
                ("admit", 10 * T_US),
                ("claim", 10 * T_US),
                ("admit", 9 * T_US)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_gone_at_its_callers_deadline_times_out_without_another_admission() {
        let store = Scripted::new(&[Answer::Queued(T_US), Answer::Granted], &[Answer::Gone]);
        let q = Scripted::queue(&store);
        let start = Instant::now();
        match q.wait_turn(&anon(), start + T).await {
            Err(BudgetError::Exhausted {
                reason: Rejection::TimedOut,
                ..
            }) => assert_eq!(Instant::now() - start, T),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.log(), [("admit", T_US), ("claim", T_US)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_lost_the_ticket_on_admission_times_the_caller_out() {
        let store = Scripted::new(&[Answer::Gone, Answer::Granted], &[]);
        let q = Scripted::queue(&store);
        let turn = q.wait_turn(&anon(), Instant::now() + FAR).await;
        assert!(matches!(
            turn,
            Err(BudgetError::Exhausted {
                reason: Rejection::TimedOut,
                ..
            })
        ));
        assert_eq!(store.log().len(), 1, "admitted once");
    }

    #[tokio::test(start_paused = true)]
    async fn served_and_refused_callers_leave_nothing_to_take_out_of_the_line() {
        let store = Scripted::new(
            &[Answer::Granted, Answer::Refused(Refusal::Deadline, T_US)],
            &[],
        );
        let q = Scripted::queue(&store);
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert!(q.wait_turn(&anon(), Instant::now() + FAR).await.is_err());
        // A caller that leaves the line takes its ticket out: once that
        // (spawned last) is done, any leave spawned before it is too.
        let waiting = join(&q, &anon(), Instant::now() + FAR).await;
        waiting.abort();
        until(|| store.log().iter().any(|(what, _)| *what == "leave")).await;
        let leaves = store.log().iter().filter(|(w, _)| *w == "leave").count();
        assert_eq!(leaves, 1, "{:?}", store.log());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_deadline_has_passed_is_refused_even_with_a_free_slot() {
        let q = line_with(&store());
        let past = Instant::now() - Duration::from_millis(1);
        assert!(matches!(
            q.wait_turn(&anon(), past).await,
            Err(BudgetError::Exhausted {
                reason: Rejection::Deadline,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_one_interval_after_a_grant_and_the_whole_pushback() {
        let q = line_with(&store());
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        assert_eq!(q.retry_after(), T, "after a grant: the next slot");
        let seven = Duration::from_secs(7);
        q.pushback(Some(seven)).await;
        assert_eq!(q.retry_after(), seven);
    }

    /// A background turn (a batch item) takes the slot as any grant does:
    /// a caller refused right after is told to come back one interval on.
    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_one_interval_after_a_background_grant() {
        let q = line_with(&store());
        q.idle_turn(&anon()).await.unwrap();
        assert_eq!(q.retry_after(), T);
    }

    #[tokio::test(start_paused = true)]
    async fn the_depth_gauge_counts_the_callers_waiting() {
        let metrics = crate::telemetry::metrics::handle();
        let gauge = || {
            let page = metrics.render();
            let prefix = "provisioning_gateway_budget_queue_depth{account=\"gauged\"} ";
            let line = page.lines().find(|l| l.starts_with(prefix));
            line.map(|l| l[prefix.len()..].to_owned())
        };
        let q = Line::new("gauged", store() as Arc<dyn Store>, &config());
        q.wait_turn(&anon(), Instant::now() + FAR).await.unwrap();
        let first = join(&q, &anon(), Instant::now() + FAR).await;
        assert_eq!(gauge().as_deref(), Some("1"));
        let second = join(&q, &anon(), Instant::now() + FAR).await;
        assert_eq!(gauge().as_deref(), Some("2"));
        second.abort();
        until(|| q.depth() == 1).await;
        assert_eq!(gauge().as_deref(), Some("1"));
        first.await.unwrap();
        assert_eq!(gauge().as_deref(), Some("0"));
    }
}
