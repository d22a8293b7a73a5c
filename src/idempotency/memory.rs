//! Records in this process: right for one replica (and the `local`
//! fallback while Redis is lost), lost with the process. Bounded: at most
//! `max_entries` keys (`--idempotency-max-entries`), the oldest out first
//! when a new one comes, and none kept past [`RETENTION`] from its first
//! call.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Fingerprint, State};
use super::{Found, Held, Key, RETENTION, Store, Token, Unavailable};

/// The records of this process.
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    next_token: AtomicU64,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<Key, Entry>,
    /// Keys in the order they were first claimed, each with the `seq` of
    /// its entry then (a key forgotten and claimed again is a new entry; the
    /// old place is skipped).
    order: VecDeque<(u64, Key)>,
    seq: u64,
}

struct Entry {
    seq: u64,
    created: Instant,
    fingerprint: Fingerprint,
    state: State,
    /// The claim running it and when its lease lapses; kept after it
    /// lapsed, so the claim's own end is still recorded if nobody took over.
    lease: Option<(Token, Instant)>,
}

impl MemoryStore {
    pub(crate) fn new(max_entries: usize, changes: watch::Sender<u64>) -> Self {
        Self {
            inner: Mutex::default(),
            max_entries: max_entries.max(1),
            next_token: AtomicU64::new(1),
            changes,
        }
    }

    /// Keys held now (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().records.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update completes under the lock: a poisoned one is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim_now(&self, key: &Key, fingerprint: Fingerprint, lease: Duration) -> Found {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now);
        let token = Token(self.next_token.fetch_add(1, Ordering::Relaxed));
        let until = now + lease;
        let Some(entry) = inner.records.get_mut(key) else {
            inner.insert(
                key.clone(),
                fingerprint,
                now,
                (token, until),
                self.max_entries,
            );
            return Found::Claimed {
                token,
                prior_unknown: false,
            };
        };
        if entry.fingerprint != fingerprint {
            return Found::Reused;
        }
        match &entry.state {
            State::Done(status) => Found::Done(status.clone()),
            State::Running => match entry.lease {
                Some((_, lapses)) if lapses > now => Found::Running { look_again: lapses },
                // Its call's replica went away without a word: unknown.
                _ => entry.take_over(token, until),
            },
            State::Unknown => entry.take_over(token, until),
        }
    }

    fn finish_now(&self, key: &Key, token: Token, end: Option<State>) {
        let mut inner = self.lock();
        let Some(entry) = inner.records.get_mut(key) else {
            return;
        };
        if entry.lease.map(|(t, _)| t) != Some(token) {
            return;
        }
        match end {
            Some(state) => {
                entry.state = state;
                entry.lease = None;
            }
            None => {
                inner.records.remove(key);
            }
        }
        drop(inner);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Entry {
    fn take_over(&mut self, token: Token, until: Instant) -> Found {
        self.state = State::Running;
        self.lease = Some((token, until));
        Found::Claimed {
            token,
            prior_unknown: true,
        }
    }
}

impl Inner {
    fn insert(
        &mut self,
        key: Key,
        fingerprint: Fingerprint,
        now: Instant,
        lease: (Token, Instant),
        max_entries: usize,
    ) {
        self.seq += 1;
        let entry = Entry {
            seq: self.seq,
            created: now,
            fingerprint,
            state: State::Running,
            lease: Some(lease),
        };
        self.order.push_back((self.seq, key.clone()));
        self.records.insert(key, entry);
        while self.records.len() > max_entries {
            self.pop_oldest();
        }
        // Places of forgotten keys pile up behind the live ones: sweep them
        // out when they outnumber the entries.
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order
                .retain(|(seq, key)| records.get(key).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Drops the entries first claimed [`RETENTION`] ago or earlier.
    fn expire(&mut self, now: Instant) {
        while let Some((seq, key)) = self.order.front() {
            match self.records.get(key) {
                Some(entry) if entry.seq == *seq => {
                    if now.duration_since(entry.created) < RETENTION {
                        return;
                    }
                    self.pop_oldest();
                }
                // A place left by a forgotten key.
                _ => {
                    self.order.pop_front();
                }
            }
        }
    }

    fn pop_oldest(&mut self) {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.records.get(&key).is_some_and(|e| e.seq == seq) {
                self.records.remove(&key);
                return;
            }
        }
    }
}

impl Store for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Found, Unavailable>> {
        futures::future::ready(Ok(self.claim_now(key, fingerprint, lease))).boxed()
    }

    fn finish<'a>(
        &'a self,
        held: &'a Held,
        end: Option<State>,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        self.finish_now(&held.key, held.token, end);
        futures::future::ready(Ok(())).boxed()
    }

    fn abandon(self: Arc<Self>, held: Held) {
        self.finish_now(&held.key, held.token, Some(State::Unknown));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::fixtures::{fingerprint, key};
    use tonic_types::pb::Status as RpcStatus;

    const LEASE: Duration = Duration::from_secs(10);

    fn store(max_entries: usize) -> MemoryStore {
        MemoryStore::new(max_entries, watch::Sender::new(0))
    }

    fn claim(store: &MemoryStore, n: usize) -> Found {
        store.claim_now(&key(n), fingerprint(false), LEASE)
    }

    fn token(found: Found) -> Token {
        match found {
            Found::Claimed { token, .. } => token,
            other => panic!("not claimed: {other:?}"),
        }
    }

    /// Key `n` claimed and finished with an outcome: kept.
    fn keep(store: &MemoryStore, n: usize) {
        let t = token(claim(store, n));
        store.finish_now(&key(n), t, Some(done()));
    }

    /// Key `n` claimed and finished with none: forgotten.
    fn forget(store: &MemoryStore, n: usize) {
        let t = token(claim(store, n));
        store.finish_now(&key(n), t, None);
    }

    fn done() -> State {
        State::Done(RpcStatus::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_done_key_answers_its_outcome_and_another_request_is_refused() {
        let store = store(10);
        let first = token(claim(&store, 1));
        assert!(matches!(claim(&store, 1), Found::Running { .. }));
        store.finish_now(&key(1), first, Some(done()));
        assert_eq!(claim(&store, 1), Found::Done(RpcStatus::default()));
        let other = store.claim_now(&key(1), fingerprint(true), LEASE);
        assert_eq!(other, Found::Reused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_key_runs_anew_and_an_unknown_one_is_taken_over() {
        let store = store(10);
        forget(&store, 1);
        let again = claim(&store, 1);
        assert!(
            matches!(
                again,
                Found::Claimed {
                    prior_unknown: false,
                    ..
                }
            ),
            "{again:?}"
        );
        store.finish_now(&key(1), token(again), Some(State::Unknown));
        let retry = claim(&store, 1);
        assert!(
            matches!(
                retry,
                Found::Claimed {
                    prior_unknown: true,
                    ..
                }
            ),
            "{retry:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_is_taken_over_and_its_late_end_ignored() {
        let store = store(10);
        let first = token(claim(&store, 1));
        let Found::Running { look_again } = claim(&store, 1) else {
            panic!("running")
        };
        assert_eq!(look_again, Instant::now() + LEASE);
        tokio::time::advance(LEASE).await;
        let second = token(claim(&store, 1));
        store.finish_now(&key(1), first, None);
        assert!(matches!(claim(&store, 1), Found::Running { .. }), "kept");
        store.finish_now(&key(1), second, Some(done()));
        assert!(matches!(claim(&store, 1), Found::Done(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_key_goes_first_when_the_store_is_full() {
        let store = store(3);
        for n in 0..3 {
            let t = token(claim(&store, n));
            store.finish_now(&key(n), t, Some(done()));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        token(claim(&store, 3));
        assert_eq!(store.len(), 3);
        assert!(
            matches!(claim(&store, 0), Found::Claimed { .. }),
            "the oldest was dropped"
        );
        // Key 0 came back as the newest: 1 went.
        assert!(matches!(claim(&store, 2), Found::Done(_)));
        assert!(matches!(claim(&store, 1), Found::Claimed { .. }));
        assert_eq!(store.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_forgotten_and_claimed_again_is_as_new_as_its_new_claim() {
        let store = store(2);
        keep(&store, 0);
        forget(&store, 1);
        keep(&store, 2);
        // Key 1 again, after key 2: key 0, the oldest, goes.
        keep(&store, 1);
        // The next goes by age too: key 2, not key 1 by its first place.
        token(claim(&store, 3));
        assert!(matches!(claim(&store, 1), Found::Done(_)), "key 1 kept");
        assert!(
            matches!(claim(&store, 2), Found::Claimed { .. }),
            "key 2 went"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn places_are_swept_once_they_outnumber_twice_the_entries_and_64() {
        let store = store(10);
        (0..3).for_each(|n| keep(&store, n));
        let places = || store.lock().order.len();
        // 3 kept and 69 forgotten: 72 places, never more than 2 × 4 + 64
        // while one of them was held (4 entries): none swept.
        (3..72).for_each(|n| forget(&store, n));
        assert_eq!(places(), 72);
        // The 73rd outnumbers them: only the places of the 3 kept and the
        // one held then are left.
        forget(&store, 72);
        assert_eq!(places(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_kept_24_hours_from_its_first_call() {
        let store = store(10);
        let t = token(claim(&store, 1));
        tokio::time::advance(RETENTION - Duration::from_secs(1)).await;
        store.finish_now(&key(1), t, Some(done()));
        assert!(matches!(claim(&store, 1), Found::Done(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            claim(&store, 1),
            Found::Claimed {
                prior_unknown: false,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_claimed_again_after_forgotten_does_not_hold_back_older_keys_expiry() {
        let store = store(10);
        keep(&store, 0);
        forget(&store, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        keep(&store, 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        keep(&store, 1);
        // Key 2's day is over; key 1, claimed again after it, has a second
        // left, and its first place (before key 2's) counts for nothing.
        tokio::time::advance(RETENTION - Duration::from_secs(1)).await;
        assert!(
            matches!(
                claim(&store, 2),
                Found::Claimed {
                    prior_unknown: false,
                    ..
                }
            ),
            "key 2 expired"
        );
        assert!(matches!(claim(&store, 1), Found::Done(_)), "key 1 kept");
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_keys_leave_no_trail() {
        let store = store(4);
        for n in 0..1000 {
            let t = token(claim(&store, n));
            store.finish_now(&key(n), t, None);
        }
        let inner = store.lock();
        assert!(inner.records.is_empty());
        assert!(inner.order.len() <= 64 + 2, "{}", inner.order.len());
    }
}
