//! Single flight: identical calls that wait or run at the same time share
//! one execution, so a retry storm or duplicate work from callers costs one
//! budget slot and one upstream call, not many.
//!
//! The first caller of a key leads: it runs the work itself, in its own task
//! (no task per call), under its deadline. Later callers of the same key
//! follow: they receive the same outcome. Every caller, the leader included,
//! waits no longer than its own patience, so none outlives its deadline even
//! if the work overruns. A leader that leaves (patience over, or cancelled)
//! while followers still wait hands the unfinished work to a task of its own;
//! the work is cancelled only when every caller has gone away, and then its
//! place in the budget queue is freed as if a lone caller had left. Once the
//! work ends the key is free again: a call arriving after that starts a new
//! flight (deleting twice is the caller's business; answering a later call
//! with an old outcome would not be honest).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

type Registry<K, T> = Mutex<HashMap<K, Entry<K, T>>>;

/// The flights in progress, by key.
pub struct Coalescer<K: Hash + Eq, T> {
    flights: Arc<Registry<K, T>>,
    next_id: AtomicU64,
}

struct Entry<K: Hash + Eq, T> {
    id: u64,
    flight: Weak<Flight<K, T>>,
}

/// One execution and everyone waiting for it.
struct Flight<K: Hash + Eq, T> {
    outcome: Arc<Outcome<T>>,
    deadline: Instant,
    mark: Mark,
    /// The task finishing the work after its leader left, if it did.
    handed_over: Mutex<Option<AbortHandle>>,
    registry: Weak<Registry<K, T>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, T> Drop for Flight<K, T> {
    /// The last caller left: nobody wants the outcome any more.
    fn drop(&mut self) {
        let task = self
            .handed_over
            .get_mut()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(task) = task.take() {
            task.abort();
        }
        forget(&self.registry, &self.key, self.id);
    }
}

/// The leader's hold on the work while it runs it in its own task.
struct Lead<K: Hash + Eq + Clone + Send + Sync + 'static, T: Send + Sync + 'static> {
    /// `None` once finished (or handed over).
    work: Option<BoxFuture<'static, T>>,
    /// `None` once published (or handed over with the work).
    publisher: Option<Publisher<T>>,
    flight: Arc<Flight<K, T>>,
    /// The leader's span, for the work if it is handed over.
    span: tracing::Span,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, T: Clone + Send + Sync + 'static> Lead<K, T> {
    /// Runs the work to its end and publishes the outcome to the followers.
    async fn finish(&mut self) -> T {
        let Some(work) = self.work.as_mut() else {
            unreachable!("the work is taken only when the lead is dropped")
        };
        let value = work.await;
        self.work = None;
        if let Some(publisher) = self.publisher.take() {
            publisher.publish(value.clone());
        }
        forget(&self.flight.registry, &self.flight.key, self.flight.id);
        value
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, T: Send + Sync + 'static> Drop for Lead<K, T> {
    /// The leader left with the work unfinished: followers still waiting get
    /// it finished in a task of its own; with none, it is cancelled here.
    fn drop(&mut self) {
        let Some(work) = self.work.take() else { return };
        let flight = &self.flight;
        let Some(registry) = flight.registry.upgrade() else {
            return;
        };
        // Followers join under this lock: the count cannot grow meanwhile.
        let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if Arc::strong_count(flight) > 1 => {
                let publisher = self.publisher.take();
                let (registry, key, id) =
                    (Arc::downgrade(&registry), flight.key.clone(), flight.id);
                let task = runtime.spawn(
                    async move {
                        let value = work.await;
                        if let Some(publisher) = publisher {
                            publisher.publish(value);
                        }
                        forget(&registry, &key, id);
                    }
                    .instrument(self.span.clone()),
                );
                let mut slot = flight.handed_over.lock().unwrap_or_else(|p| p.into_inner());
                *slot = Some(task.abort_handle());
            }
            _ => {
                if map.get(&flight.key).is_some_and(|e| e.id == flight.id) {
                    map.remove(&flight.key);
                }
                drop(map);
                drop(work);
            }
        }
    }
}

/// A flight's outcome, published once to every follower: a lighter
/// `watch` (one per flight, so its size counts per waiting call).
struct Outcome<T> {
    /// Boxed: a flight waiting in line holds no room for it.
    value: OnceLock<Box<T>>,
    /// Its publisher went without publishing.
    abandoned: AtomicBool,
    ready: Notify,
}

/// The side of an [`Outcome`] that publishes it: the leader's, or the
/// task's it hands the work to. Dropped unpublished, the flight is
/// abandoned and its followers stop waiting.
struct Publisher<T>(Arc<Outcome<T>>);

impl<T: Clone> Outcome<T> {
    fn channel() -> (Publisher<T>, Arc<Self>) {
        let outcome = Arc::new(Self {
            value: OnceLock::new(),
            abandoned: AtomicBool::new(false),
            ready: Notify::new(),
        });
        (Publisher(Arc::clone(&outcome)), outcome)
    }

    /// The outcome once published; `None` if it never will be.
    async fn wait(&self) -> Option<T> {
        loop {
            // Registered before the checks: a publication in between wakes it.
            let ready = self.ready.notified();
            if let Some(value) = self.value.get() {
                return Some(T::clone(value));
            }
            if self.abandoned.load(Ordering::Acquire) {
                return None;
            }
            ready.await;
        }
    }
}

impl<T> Publisher<T> {
    fn publish(self, value: T) {
        let _ = self.0.value.set(Box::new(value));
    }
}

impl<T> Drop for Publisher<T> {
    fn drop(&mut self) {
        if self.0.value.get().is_none() {
            self.0.abandoned.store(true, Ordering::Release);
        }
        self.0.ready.notify_waiters();
    }
}

/// Set by the work once it passes a point of no return (the upstream request
/// is on its way), so a follower that gives up can say how far it got.
#[derive(Debug, Clone, Default)]
pub struct Mark(Arc<AtomicBool>);

impl Mark {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether this caller started the flight or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// A caller's patience ran out before the flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// The work had passed its [`Mark`].
    pub marked: bool,
}

/// What a caller gets from [`Joining::wait`].
#[derive(Debug)]
pub struct Joined<T> {
    pub outcome: Result<T, Expired>,
    pub role: Role,
    /// The deadline the work runs under (its leader's).
    pub flight_deadline: Instant,
}

impl<K: Hash + Eq, T> Default for Coalescer<K, T> {
    fn default() -> Self {
        Self {
            flights: Arc::default(),
            next_id: AtomicU64::new(0),
        }
    }
}

/// A caller that has started or joined a flight and not yet waited for it.
/// Dropped unawaited, it leaves like a caller that gives up.
pub struct Joining<K: Hash + Eq + Clone + Send + Sync + 'static, T: Send + Sync + 'static>(
    Join<K, T>,
);

impl<K, T> Joining<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Whether this caller started the flight or joined one.
    pub fn role(&self) -> Role {
        match self.0 {
            Join::Leader(_) => Role::Leader,
            Join::Follower(_) => Role::Follower,
        }
    }

    /// The flight's outcome, waiting until `patience` at most. Not an async
    /// fn, and the lead used in place: a waiting call holds its part once.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn moves its parameters into its body: held twice while waiting"
    )]
    pub fn wait(mut self, patience: Instant) -> impl Future<Output = Joined<T>> + Send {
        async move {
            match &mut self.0 {
                Join::Leader(lead) => {
                    let outcome = timeout_at(patience, lead.finish()).await;
                    Joined {
                        outcome: outcome.map_err(|_| Expired {
                            marked: lead.flight.mark.is_set(),
                        }),
                        role: Role::Leader,
                        flight_deadline: lead.flight.deadline,
                    }
                }
                Join::Follower(flight) => {
                    let waited = timeout_at(patience, flight.outcome.wait()).await;
                    let outcome = match waited {
                        Ok(Some(value)) => Ok(value),
                        // Unpublished only when the work was cancelled or could
                        // not be handed over: expiry all the same.
                        Ok(None) | Err(_) => Err(Expired {
                            marked: flight.mark.is_set(),
                        }),
                    };
                    Joined {
                        outcome,
                        role: Role::Follower,
                        flight_deadline: flight.deadline,
                    }
                }
            }
        }
    }
}

/// How a caller takes part in a flight.
enum Join<K: Hash + Eq + Clone + Send + Sync + 'static, T: Send + Sync + 'static> {
    Leader(Lead<K, T>),
    Follower(Arc<Flight<K, T>>),
}

impl<K, T> Coalescer<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// [`Self::start`] and [`Joining::wait`] in one (for the tests).
    #[cfg(test)]
    pub async fn run<F, Fut>(
        &self,
        key: K,
        deadline: Instant,
        patience: Instant,
        work: F,
    ) -> Joined<T>
    where
        F: FnOnce(Mark) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.start(key, deadline, work).wait(patience).await
    }

    /// Runs `work` for `key`, or joins the flight already running it: the
    /// caller's part is decided at once ([`Joining::role`]), and
    /// [`Joining::wait`] waits for the outcome until the caller's patience
    /// runs out. `deadline` is the work's deadline if this caller leads.
    pub fn start<F, Fut>(&self, key: K, deadline: Instant, work: F) -> Joining<K, T>
    where
        F: FnOnce(Mark) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        Joining(self.join(key, deadline, work))
    }

    /// Whether a flight for `key` is in progress (a call now would follow it).
    #[cfg(test)]
    pub(crate) fn is_flying(&self, key: &K) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|e| e.flight.strong_count() > 0)
    }

    /// Flights in progress.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn join<F, Fut>(&self, key: K, deadline: Instant, work: F) -> Join<K, T>
    where
        F: FnOnce(Mark) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let mut flights = self.lock();
        if let Some(flight) = flights.get(&key).and_then(|e| e.flight.upgrade()) {
            return Join::Follower(flight);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (publisher, outcome) = Outcome::channel();
        let mark = Mark::default();
        let flight = Arc::new(Flight {
            outcome,
            deadline,
            mark: mark.clone(),
            handed_over: Mutex::new(None),
            registry: Arc::downgrade(&self.flights),
            key: key.clone(),
            id,
        });
        let entry = Entry {
            id,
            flight: Arc::downgrade(&flight),
        };
        flights.insert(key, entry);
        drop(flights);
        Join::Leader(Lead {
            work: Some(Box::pin(work(mark))),
            publisher: Some(publisher),
            flight,
            span: tracing::Span::current(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<K, T>>> {
        // Inserts and removes only: a poisoned map is still consistent.
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes the entry of flight `id`, unless a newer flight took the key.
fn forget<K: Hash + Eq, T>(registry: &Weak<Registry<K, T>>, key: &K, id: u64) {
    if let Some(map) = registry.upgrade() {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|e| e.id == id) {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::time::sleep;

    const FAR: Duration = Duration::from_secs(3600);

    /// Work that counts its runs, takes `took`, and answers `value`.
    fn work(
        runs: &Arc<AtomicUsize>,
        took: Duration,
        value: u32,
    ) -> impl FnOnce(Mark) -> futures::future::BoxFuture<'static, u32> + use<> {
        let runs = Arc::clone(runs);
        move |mark| {
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                sleep(took / 2).await;
                mark.set();
                sleep(took / 2).await;
                value
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn identical_calls_at_the_same_time_share_one_run() {
        let c = Arc::new(Coalescer::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let calls = (0..5).map(|i| {
            let c = Arc::clone(&c);
            let w = work(&runs, Duration::from_secs(1), i);
            async move { c.run("k", now + FAR, now + FAR, w).await }
        });
        let joined = futures::future::join_all(calls).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(joined.iter().all(|j| j.outcome == Ok(0)), "{joined:?}");
        let leaders = joined.iter().filter(|j| j.role == Role::Leader).count();
        assert_eq!(leaders, 1);
        assert_eq!(c.in_flight(), 0, "the key is free once the work ended");
        // A later call runs again.
        let j = c
            .run("k", now + FAR, now + FAR, work(&runs, Duration::ZERO, 9))
            .await;
        assert_eq!((j.outcome, j.role), (Ok(9), Role::Leader));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_do_not_share() {
        let c = Arc::new(Coalescer::<u8, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let a = c.run(
            1,
            now + FAR,
            now + FAR,
            work(&runs, Duration::from_secs(1), 1),
        );
        let b = c.run(
            2,
            now + FAR,
            now + FAR,
            work(&runs, Duration::from_secs(1), 2),
        );
        let (a, b) = tokio::join!(a, b);
        assert_eq!((a.outcome, b.outcome), (Ok(1), Ok(2)));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_gives_up_at_its_own_patience_without_disturbing_others() {
        let c = Arc::new(Coalescer::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let leader = {
            let c = Arc::clone(&c);
            let w = work(&runs, Duration::from_secs(4), 7);
            tokio::spawn(async move { c.run("k", now + FAR, now + FAR, w).await })
        };
        tokio::task::yield_now().await;
        let early = c.run(
            "k",
            now + FAR,
            now + Duration::from_secs(1),
            work(&runs, Duration::ZERO, 0),
        );
        let late = c.run(
            "k",
            now + FAR,
            now + Duration::from_secs(3),
            work(&runs, Duration::ZERO, 0),
        );
        let (early, late) = tokio::join!(early, late);
        assert_eq!(
            early.outcome,
            Err(Expired { marked: false }),
            "before the mark"
        );
        assert_eq!(
            late.outcome,
            Err(Expired { marked: true }),
            "after the mark"
        );
        assert_eq!(leader.await.unwrap().outcome, Ok(7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_work_survives_its_leader_while_a_follower_waits() {
        let c = Arc::new(Coalescer::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let leader = {
            let c = Arc::clone(&c);
            let w = work(&runs, Duration::from_secs(2), 5);
            tokio::spawn(async move { c.run("k", now + FAR, now + FAR, w).await })
        };
        tokio::task::yield_now().await;
        let follower = {
            let c = Arc::clone(&c);
            let w = work(&runs, Duration::ZERO, 0);
            tokio::spawn(async move { c.run("k", now + FAR, now + FAR, w).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        let j = follower.await.unwrap();
        assert_eq!((j.outcome, j.role), (Ok(5), Role::Follower));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_out_of_patience_hands_the_work_to_a_waiting_follower() {
        let c = Arc::new(Coalescer::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let leader = c.run(
            "k",
            now + FAR,
            now + Duration::from_secs(1),
            work(&runs, Duration::from_secs(2), 3),
        );
        let follower = async {
            tokio::task::yield_now().await;
            c.run("k", now + FAR, now + FAR, work(&runs, Duration::ZERO, 0))
                .await
        };
        let (leader, follower) = tokio::join!(leader, follower);
        assert_eq!(leader.outcome, Err(Expired { marked: true }));
        assert_eq!(Instant::now() - now, Duration::from_secs(2));
        assert_eq!((follower.outcome, follower.role), (Ok(3), Role::Follower));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_leader_out_of_patience_cancels_the_work() {
        let c = Coalescer::<&str, u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let j = c
            .run(
                "k",
                now + FAR,
                now + Duration::from_millis(100),
                work(&runs, Duration::from_secs(2), 3),
            )
            .await;
        assert_eq!(j.outcome, Err(Expired { marked: false }));
        assert_eq!(c.in_flight(), 0, "the key is free at once");
        let again = c
            .run("k", now + FAR, now + FAR, work(&runs, Duration::ZERO, 4))
            .await;
        assert_eq!((again.outcome, again.role), (Ok(4), Role::Leader));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_work_is_cancelled_when_every_caller_is_gone() {
        struct Finished(Arc<AtomicBool>);
        let c = Arc::new(Coalescer::<&str, u32>::default());
        let finished = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let now = Instant::now();
        let caller = {
            let c = Arc::clone(&c);
            let (finished, dropped) = (Arc::clone(&finished), Arc::clone(&dropped));
            tokio::spawn(async move {
                c.run("k", now + FAR, now + FAR, move |_| async move {
                    let _guard = Finished(dropped);
                    sleep(Duration::from_secs(2)).await;
                    finished.store(true, Ordering::SeqCst);
                    1
                })
                .await
            })
        };
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        sleep(Duration::from_millis(10)).await;
        caller.abort();
        sleep(Duration::from_secs(5)).await;
        assert!(dropped.load(Ordering::SeqCst), "the work was dropped");
        assert!(!finished.load(Ordering::SeqCst), "and never finished");
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn handed_over_work_is_cancelled_when_its_last_follower_leaves() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let c = Coalescer::<&str, u32>::default();
        let (finished, dropped) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let now = Instant::now();
        let work = {
            let (finished, dropped) = (Arc::clone(&finished), Arc::clone(&dropped));
            move |_| async move {
                let _guard = Dropped(dropped);
                sleep(Duration::from_secs(5)).await;
                finished.store(true, Ordering::SeqCst);
                1
            }
        };
        // The leader leaves at 1 s (the work moves to a task), the follower
        // at 2 s: nobody wants the outcome any more.
        let leader = c.run("k", now + FAR, now + Duration::from_secs(1), work);
        let follower = async {
            tokio::task::yield_now().await;
            let idle = |_| async { 0 };
            c.run("k", now + FAR, now + Duration::from_secs(2), idle)
                .await
        };
        let (leader, follower) = tokio::join!(leader, follower);
        assert_eq!(leader.outcome, Err(Expired { marked: false }));
        assert_eq!(follower.role, Role::Follower);
        assert_eq!(follower.outcome, Err(Expired { marked: false }));
        assert_eq!(
            c.in_flight(),
            0,
            "the key is free when the last caller leaves"
        );
        sleep(Duration::from_secs(1)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handed-over work was cancelled"
        );
        sleep(Duration::from_secs(5)).await;
        assert!(!finished.load(Ordering::SeqCst), "and never finished");
    }
}
