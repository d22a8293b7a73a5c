//! Single flight: identical calls that wait or run at the same time share
//! one execution, so a retry storm or duplicate work from callers costs one
//! budget slot and one upstream call, not many.
//!
//! The first caller of a key leads: its work runs in a task owned by the
//! flight, under the leader's deadline. Later callers of the same key follow:
//! they receive the same outcome. Every caller, the leader included, waits no
//! longer than its own patience, so none outlives its deadline even if the
//! work overruns. The task is cancelled only when every caller has gone away;
//! then its place in the budget queue is freed as if a lone caller had left. Once the work ends the key is free again: a call
//! arriving after that starts a new flight (deleting twice is the caller's
//! business; answering a later call with an old outcome would not be honest).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::watch;
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
    outcome: watch::Receiver<Option<T>>,
    deadline: Instant,
    mark: Mark,
    task: tokio::task::AbortHandle,
    registry: Weak<Registry<K, T>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, T> Drop for Flight<K, T> {
    /// The last caller left: nobody wants the outcome any more.
    fn drop(&mut self) {
        self.task.abort();
        forget(&self.registry, &self.key, self.id);
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

/// What a caller gets from [`Coalescer::run`].
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

impl<K, T> Coalescer<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key`, or joins the flight already running it.
    /// `deadline` is the work's deadline if this caller leads; either way the
    /// caller waits until `patience` at most.
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
        let (flight, role) = self.join(key, deadline, work);
        let mut outcome = flight.outcome.clone();
        let waited = timeout_at(patience, outcome.wait_for(Option::is_some)).await;
        let outcome = match waited {
            Ok(Ok(value)) => value.clone().ok_or(Expired { marked: false }),
            // The task drops the sender unsent only when aborted, which needs
            // every caller gone, this one included: expiry all the same.
            Ok(Err(_)) | Err(_) => Err(Expired {
                marked: flight.mark.is_set(),
            }),
        };
        Joined {
            outcome,
            role,
            flight_deadline: flight.deadline,
        }
    }

    /// Flights in progress.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn join<F, Fut>(&self, key: K, deadline: Instant, work: F) -> (Arc<Flight<K, T>>, Role)
    where
        F: FnOnce(Mark) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let mut flights = self.lock();
        if let Some(flight) = flights.get(&key).and_then(|e| e.flight.upgrade()) {
            return (flight, Role::Follower);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let mark = Mark::default();
        let registry = Arc::downgrade(&self.flights);
        let done_key = key.clone();
        let work = work(mark.clone());
        // Spawned, so the work outlives its leader while others still wait;
        // it stays in the leader's span for tracing.
        let task = tokio::spawn(
            async move {
                let value = work.await;
                let _ = tx.send(Some(value));
                forget(&registry, &done_key, id);
            }
            .in_current_span(),
        );
        let flight = Arc::new(Flight {
            outcome: rx,
            deadline,
            mark,
            task: task.abort_handle(),
            registry: Arc::downgrade(&self.flights),
            key: key.clone(),
            id,
        });
        let entry = Entry {
            id,
            flight: Arc::downgrade(&flight),
        };
        flights.insert(key, entry);
        (flight, Role::Leader)
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
}
