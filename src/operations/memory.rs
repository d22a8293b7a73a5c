//! Operations in this process, for one replica (the memory budget backend):
//! lost when the process ends, as the README and the contract say. The same
//! rules as the Redis store's script, on plain maps under one lock (held
//! for a few map updates, never across an `.await`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{
    Answer, Item, NewOperation, OperationStore, Page, Removal, Snapshot, Start, Submitted, Take,
    Wakeups, estimated_end, micros, new_id, now_us,
};

/// Every account's operations and queue.
pub(crate) struct MemoryOperations {
    accounts: Mutex<HashMap<String, Account>>,
    retention_us: i64,
    wakeups: Wakeups,
}

mod op;

use op::Op;

#[derive(Default)]
struct Account {
    /// Requests not taken yet, oldest first.
    queue: VecDeque<Entry>,
    /// The request taken and not finished: taken again until it is.
    taken: Option<Entry>,
    ops: HashMap<String, Op>,
    /// Each owner's operation ids (they sort by creation).
    owners: HashMap<String, BTreeSet<String>>,
    /// (owner, request id) → operation id.
    request_ids: HashMap<(String, String), String>,
    entries: u64,
}

#[derive(Clone)]
struct Entry {
    seq: u64,
    op: String,
    index: u32,
    request: Vec<u8>,
}

impl Account {
    /// Forgets done operations older than the retention.
    fn purge(&mut self, now: i64, retention_us: i64) {
        let expired: Vec<String> = self
            .ops
            .iter()
            .filter(|(_, op)| {
                op.end_us
                    .is_some_and(|end| now >= end.saturating_add(retention_us))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(op) = self.ops.remove(id) {
            if let Some(ids) = self.owners.get_mut(&op.owner) {
                ids.remove(id);
                if ids.is_empty() {
                    self.owners.remove(&op.owner);
                }
            }
            let key = (op.owner, op.request_id);
            if self.request_ids.get(&key).is_some_and(|i| i == id) {
                self.request_ids.remove(&key);
            }
        }
    }
}

impl MemoryOperations {
    pub(crate) fn new(retention: Duration) -> Self {
        Self {
            accounts: Mutex::default(),
            retention_us: micros(retention),
            wakeups: Wakeups::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Account>> {
        // Map updates only: a poisoned lock is still consistent.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on `account`'s state, purged of expired operations.
    fn with<T>(&self, account: &str, f: impl FnOnce(&mut Account, i64) -> T) -> T {
        let now = now_us();
        let mut accounts = self.lock();
        let state = accounts.entry(account.to_owned()).or_default();
        state.purge(now, self.retention_us);
        f(state, now)
    }

    fn submit_now(&self, new: NewOperation) -> Submitted {
        let fingerprint = new.fingerprint();
        let submitted = self.with(&new.account, |state, now| {
            let key = (new.owner.clone(), new.request_id.clone());
            if !new.request_id.is_empty()
                && let Some(op) = state.request_ids.get(&key).and_then(|id| {
                    let op = state.ops.get(id)?;
                    Some(op.snapshot(id, false))
                })
            {
                return Submitted::Existing(op);
            }
            let id = new_id(now);
            let ahead = state.queue.len() + usize::from(state.taken.is_some());
            let total = new.requests.len();
            for (index, request) in new.requests.into_iter().enumerate() {
                state.entries += 1;
                state.queue.push_back(Entry {
                    seq: state.entries,
                    op: id.clone(),
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    request,
                });
            }
            let total = u32::try_from(total).unwrap_or(u32::MAX);
            let op = Op {
                owner: new.owner.clone(),
                fingerprint,
                request_id: new.request_id.clone(),
                total,
                succeeded: 0,
                failed: 0,
                create_us: now,
                estimated_end_us: estimated_end(now, ahead, total as usize, new.interval),
                end_us: None,
                cancel: false,
                cancel_from: total,
                taken: 0,
                results: vec![None; total as usize],
                started: HashSet::new(),
            };
            let snapshot = op.snapshot(&id, false);
            state.ops.insert(id.clone(), op);
            state
                .owners
                .entry(new.owner)
                .or_default()
                .insert(id.clone());
            if !new.request_id.is_empty() {
                state.request_ids.insert(key, id);
            }
            Submitted::Created(snapshot)
        });
        if matches!(submitted, Submitted::Created(_)) {
            self.wakeups.submitted(&new.account);
        }
        submitted
    }

    fn take_now(&self, account: &str) -> Take {
        self.with(account, |state, _| {
            let entry = match state.taken.clone().or_else(|| state.queue.pop_front()) {
                Some(entry) => entry,
                None => return Take::Empty,
            };
            state.taken = Some(entry.clone());
            let live = state.ops.get_mut(&entry.op).filter(|op| {
                let i = entry.index;
                let has_result = op.results.get(i as usize).is_none_or(Option::is_some);
                !(has_result || op.cancel && i >= op.cancel_from)
            });
            let Some(op) = live else {
                // Its operation is gone, cancelled before it, or it has a
                // result already: dropped.
                state.taken = None;
                return Take::Skipped;
            };
            op.taken = op.taken.max(entry.index + 1);
            Take::Item(Item {
                redelivered: op.started.contains(&entry.index),
                owner: op.owner.clone(),
                op: entry.op,
                index: entry.index,
                request: entry.request,
                entry: entry.seq.to_string(),
            })
        })
    }

    fn finish_now(&self, account: &str, item: &Item, ok: bool, result: Vec<u8>) {
        self.with(account, |state, now| {
            if state
                .taken
                .as_ref()
                .is_some_and(|e| e.seq.to_string() == item.entry)
            {
                state.taken = None;
            }
            let Some(op) = state.ops.get_mut(&item.op) else {
                return;
            };
            let Some(slot) = op.results.get_mut(item.index as usize) else {
                return;
            };
            if slot.is_none() {
                *slot = Some(result);
                if ok {
                    op.succeeded += 1;
                } else {
                    op.failed += 1;
                }
                op.started.remove(&item.index);
                op.settle(now);
            }
        });
        self.wakeups.touched();
    }

    fn cancel_now(&self, account: &str, id: &str) {
        self.with(account, |state, now| {
            if let Some(op) = state.ops.get_mut(id)
                && !op.done()
                && !op.cancel
            {
                op.cancel = true;
                op.cancel_from = op.taken;
                op.failed += op.total.saturating_sub(op.taken);
                op.settle(now);
            }
        });
        self.wakeups.touched();
    }

    fn list_now(&self, account: &str, owner: &str, before: Option<&str>, limit: usize) -> Page {
        self.with(account, |state, _| {
            let ids = state.owners.get(owner);
            let newest_first = ids.into_iter().flatten().rev();
            let mut page: Vec<Snapshot> = newest_first
                .filter(|id| before.is_none_or(|b| id.as_str() < b))
                .filter_map(|id| Some(state.ops.get(id)?.snapshot(id, false)))
                .take(limit + 1)
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            Page {
                next: more.then(|| page.last().map(|s| s.id.clone())).flatten(),
                operations: page,
            }
        })
    }
}

/// An answer known at once.
fn answered<'a, T: Send + 'a>(value: T) -> Answer<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl OperationStore for MemoryOperations {
    fn submit(&self, new: NewOperation) -> Answer<'_, Submitted> {
        answered(self.submit_now(new))
    }

    fn get<'a>(
        &'a self,
        account: &'a str,
        id: &'a str,
        results: bool,
    ) -> Answer<'a, Option<Snapshot>> {
        let found = self.with(account, |state, _| {
            state.ops.get(id).map(|op| op.snapshot(id, results))
        });
        answered(found)
    }

    fn list<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> Answer<'a, Page> {
        answered(self.list_now(account, owner, before, limit))
    }

    fn cancel<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, ()> {
        self.cancel_now(account, id);
        answered(())
    }

    fn delete<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, Removal> {
        let removal = self.with(account, |state, _| match state.ops.get(id) {
            None => Removal::Missing,
            Some(op) if !op.done() => Removal::Running,
            Some(_) => {
                state.remove(id);
                Removal::Deleted
            }
        });
        answered(removal)
    }

    /// One process, one drainer per account: always its own.
    fn hold<'a>(&'a self, _account: &'a str) -> Answer<'a, bool> {
        answered(true)
    }

    fn release<'a>(&'a self, _account: &'a str) -> Answer<'a, ()> {
        answered(())
    }

    fn take<'a>(&'a self, account: &'a str) -> Answer<'a, Take> {
        answered(self.take_now(account))
    }

    fn start<'a>(&'a self, account: &'a str, item: &'a Item) -> Answer<'a, Start> {
        let start = self.with(account, |state, _| match state.ops.get_mut(&item.op) {
            None => Start::Stop,
            Some(op) if op.cancel => Start::Cancelled,
            Some(op) => {
                op.started.insert(item.index);
                Start::Go
            }
        });
        answered(start)
    }

    fn finish<'a>(
        &'a self,
        account: &'a str,
        item: &'a Item,
        ok: bool,
        result: Vec<u8>,
    ) -> Answer<'a, ()> {
        self.finish_now(account, item, ok, result);
        answered(())
    }

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::operations::Outcome;

    fn batch(store: &MemoryOperations, owner: &str, request_id: &str, n: usize) -> Snapshot {
        let new = NewOperation {
            account: "a".into(),
            owner: owner.into(),
            request_id: request_id.into(),
            requests: (0..n).map(|i| vec![i as u8]).collect(),
            interval: Duration::from_secs(1),
        };
        match store.submit_now(new) {
            Submitted::Created(s) | Submitted::Existing(s) => s,
        }
    }

    fn take(store: &MemoryOperations) -> Option<Item> {
        loop {
            match store.take_now("a") {
                Take::Item(item) => return Some(item),
                Take::Skipped => continue,
                Take::Empty | Take::Lost => return None,
            }
        }
    }

    fn get(store: &MemoryOperations, id: &str) -> Option<Snapshot> {
        store.get("a", id, true).now_or_never().unwrap().unwrap()
    }

    #[test]
    fn a_new_batch_wakes_its_drainer_a_repeat_does_not_results_and_cancels_wake_waiters() {
        let store = MemoryOperations::new(Duration::from_secs(60));
        let (mut work, mut changed) = (store.wakeups().work("a"), store.wakeups().changed());
        let op = batch(&store, "o", "r", 2);
        assert!(work.has_changed().unwrap(), "a new batch wakes the drainer");
        work.borrow_and_update();
        changed.borrow_and_update();
        batch(&store, "o", "r", 2);
        assert!(!work.has_changed().unwrap(), "its repeat is no new work");
        let item = take(&store).unwrap();
        store.finish_now("a", &item, true, Vec::new());
        assert!(changed.has_changed().unwrap(), "a result wakes waiters");
        changed.borrow_and_update();
        store.cancel_now("a", &op.id);
        assert!(changed.has_changed().unwrap(), "a cancel wakes waiters");
    }

    #[test]
    fn requests_drain_in_submission_order_across_batches_and_end_their_operation() {
        let store = MemoryOperations::new(Duration::from_secs(60));
        let first = batch(&store, "o", "", 2);
        let second = batch(&store, "o", "", 1);
        assert_eq!(second.estimated_end_us - second.create_us, 3_000_000);
        let mut order = Vec::new();
        while let Some(item) = take(&store) {
            // Taken again until finished.
            assert_eq!(take(&store).unwrap().entry, item.entry);
            order.push((item.op.clone(), item.index));
            store.finish_now("a", &item, item.index == 0, vec![item.index as u8]);
        }
        let want = [
            (first.id.clone(), 0),
            (first.id.clone(), 1),
            (second.id.clone(), 0),
        ];
        assert_eq!(order, want);
        let done = get(&store, &first.id).unwrap();
        assert!(done.done && done.end_us.is_some());
        assert_eq!((done.succeeded, done.failed), (1, 1));
        let results = done.results.unwrap();
        assert_eq!(
            results,
            [Outcome::Stored(vec![0]), Outcome::Stored(vec![1])]
        );
    }

    #[test]
    fn a_cancel_leaves_untaken_requests_unsent_and_the_taken_one_unstarted() {
        let store = MemoryOperations::new(Duration::from_secs(60));
        let op = batch(&store, "o", "", 4);
        let first = take(&store).unwrap();
        assert_eq!(
            store.start("a", &first).now_or_never().unwrap().unwrap(),
            Start::Go
        );
        store.finish_now("a", &first, true, Vec::new());
        let second = take(&store).unwrap();
        store.cancel_now("a", &op.id);
        let again = take(&store).expect("the taken one is delivered again");
        assert_eq!(again.index, second.index);
        assert_eq!(
            store.start("a", &second).now_or_never().unwrap().unwrap(),
            Start::Cancelled
        );
        assert!(
            !get(&store, &op.id).unwrap().done,
            "the taken one is still out"
        );
        store.finish_now("a", &second, false, vec![1]);
        assert!(take(&store).is_none(), "the rest is never taken");
        let done = get(&store, &op.id).unwrap();
        assert!(done.done && done.cancel_requested);
        assert_eq!((done.succeeded, done.failed), (1, 3));
        let results = done.results.unwrap();
        assert_eq!(results[2..], [Outcome::Cancelled, Outcome::Cancelled]);
    }

    #[test]
    fn a_request_id_names_one_operation_per_owner_until_it_expires() {
        let store = MemoryOperations::new(Duration::from_secs(1));
        let one = batch(&store, "o", "r", 1);
        assert_eq!(batch(&store, "o", "r", 1).id, one.id);
        assert_ne!(batch(&store, "p", "r", 1).id, one.id, "another owner");
        let item = take(&store).unwrap();
        assert!(!item.redelivered);
        store.start("a", &item).now_or_never().unwrap().unwrap();
        assert!(take(&store).unwrap().redelivered, "started before");
        store.finish_now("a", &item, true, Vec::new());
        // Done: kept for the retention, then forgotten with its request id.
        assert!(get(&store, &one.id).is_some());
        let mut state = store.lock();
        state
            .get_mut("a")
            .unwrap()
            .purge(now_us() + 2_000_000, store.retention_us);
        let key = ("o".to_owned(), "r".to_owned());
        assert!(!state["a"].request_ids.contains_key(&key), "forgotten");
        drop(state);
        assert!(get(&store, &one.id).is_none());
        assert_ne!(batch(&store, "o", "r", 1).id, one.id);
    }

    #[test]
    fn pages_list_an_owners_operations_newest_first() {
        let store = MemoryOperations::new(Duration::from_secs(60));
        let ids: Vec<String> = (0..5).map(|_| batch(&store, "o", "", 1).id).collect();
        batch(&store, "other", "", 1);
        let first = store.list_now("a", "o", None, 2);
        let got: Vec<&str> = first.operations.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
        // Exactly a page's worth left: no next page.
        let rest = store.list_now("a", "o", first.next.as_deref(), 3);
        assert_eq!(rest.operations.len(), 3);
        assert!(rest.next.is_none());
    }

    #[test]
    fn a_repeated_finish_does_not_release_the_request_taken_since() {
        let store = MemoryOperations::new(Duration::from_secs(60));
        batch(&store, "o", "", 3);
        let first = take(&store).unwrap();
        store.finish_now("a", &first, true, Vec::new());
        let second = take(&store).unwrap();
        assert_eq!(second.index, 1);
        store.finish_now("a", &first, true, Vec::new());
        let next = take(&store).unwrap();
        assert_eq!(next.index, 1, "the second is out until it finishes");
    }
}
