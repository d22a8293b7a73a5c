//! Batch deletions as stored: each accepted batch is an operation (its
//! owner, counters, times, cancel flag and one result per request) and its
//! requests wait in one queue per account, in submission order across
//! batches, until the account's drainer takes them one at a time. Storage
//! only: no gRPC, no budget, no upstream; the request path
//! (`grpc::batch`, `grpc::drain`, `grpc::operations`) gives it meaning.
//!
//! Two implementations behind [`OperationStore`], chosen like the budget
//! backend: [`memory`] keeps everything in this process (lost with it);
//! [`redis`] keeps operations and pending requests in Redis, where any
//! replica drains them and a replica's death loses nothing (its module docs
//! describe the keys).
//!
//! The drainer's protocol, the same on both: [`OperationStore::hold`] the
//! account (one drainer per account across replicas), [`take`] the next
//! request (a request taken but never finished is taken again, by this
//! drainer or the next holder), [`start`] it just before each upstream
//! attempt (refused once the operation is cancelled or the account's lease
//! is lost; a start is recorded, so a redelivery knows an attempt may have
//! reached Infobip), [`finish`] it with its result.
//!
//! [`take`]: OperationStore::take
//! [`start`]: OperationStore::start
//! [`finish`]: OperationStore::finish
//!
//! A mechanism: imports `config`, and `budget` for its Redis connection only.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::BackendConfig;

pub(crate) mod memory;
pub(crate) mod redis;

/// Requests in one batch at most.
pub(crate) const MAX_BATCH: usize = 10_000;
/// How long an account's drainer holds it without renewing: a replica that
/// died loses its accounts within this.
pub(crate) const LEASE: Duration = Duration::from_secs(5);

/// Why the store could not answer (Redis unreachable or answering nonsense).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operations store is unavailable: {0}")]
pub(crate) struct Unavailable(pub(crate) String);

/// What a store command answers.
pub(crate) type Answer<'a, T> = BoxFuture<'a, Result<T, Unavailable>>;

/// A batch to accept.
pub(crate) struct NewOperation {
    pub(crate) account: String,
    /// Who may see it: the caller's identity.
    pub(crate) owner: String,
    /// The batch's `request_id` (empty: none).
    pub(crate) request_id: String,
    /// The requests, each an encoded `DeleteAssociationRequest`.
    pub(crate) requests: Vec<Vec<u8>>,
    /// The account's interval, for the estimated end.
    pub(crate) interval: Duration,
}

impl NewOperation {
    /// The requests' fingerprint: a retry with the same `request_id` must
    /// carry the same requests.
    pub(crate) fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        for request in &self.requests {
            hash.update((request.len() as u64).to_be_bytes());
            hash.update(request);
        }
        hex(&hash.finalize())
    }
}

/// What accepting a batch did.
pub(crate) enum Submitted {
    /// A new operation.
    Created(Snapshot),
    /// The operation of an earlier batch with the same owner and request id.
    Existing(Snapshot),
}

/// One operation as stored now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) id: String,
    pub(crate) owner: String,
    pub(crate) fingerprint: String,
    pub(crate) total: u32,
    pub(crate) succeeded: u32,
    pub(crate) failed: u32,
    /// Wall-clock times, µs since the Unix epoch.
    pub(crate) create_us: i64,
    pub(crate) estimated_end_us: i64,
    pub(crate) end_us: Option<i64>,
    pub(crate) cancel_requested: bool,
    pub(crate) done: bool,
    /// One per request, when asked for and done.
    pub(crate) results: Option<Vec<Outcome>>,
}

/// The result of one request of a done operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// An encoded `google.rpc.Status`, as the drainer stored it.
    Stored(Vec<u8>),
    /// Never sent: the operation was cancelled first.
    Cancelled,
    /// Nothing stored (a store that lost it): never expected.
    Missing,
}

/// A request the account's drainer took.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) op: String,
    pub(crate) index: u32,
    pub(crate) owner: String,
    /// An encoded `DeleteAssociationRequest`.
    pub(crate) request: Vec<u8>,
    /// An attempt of it started before (on a drainer that died or stopped):
    /// it may have reached Infobip.
    pub(crate) redelivered: bool,
    /// Where it sits in the queue (the stream entry in Redis).
    pub(crate) entry: String,
}

/// What [`OperationStore::take`] found.
pub(crate) enum Take {
    Item(Item),
    /// Nothing waits.
    Empty,
    /// Only requests of cancelled or deleted operations were dropped: ask again.
    Skipped,
    /// The account's lease went to another drainer.
    Lost,
}

/// Whether a taken request may be sent now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Start {
    Go,
    /// Its operation was cancelled: finish it as cancelled, unsent.
    Cancelled,
    /// The lease is lost or the operation is gone: leave it.
    Stop,
}

/// What deleting an operation did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    Deleted,
    /// Not done: deleting would drop its pending requests.
    Running,
    Missing,
}

/// One page of an owner's operations, newest first.
pub(crate) struct Page {
    pub(crate) operations: Vec<Snapshot>,
    /// The id to list before for the next page, when there is one.
    pub(crate) next: Option<String>,
}

/// Where operations live. Commands on one account are atomic.
pub(crate) trait OperationStore: Send + Sync {
    /// Accepts a batch, or finds the operation its request id already names.
    fn submit(&self, new: NewOperation) -> Answer<'_, Submitted>;
    /// The operation `id` of `account`, with its results when asked for and done.
    fn get<'a>(
        &'a self,
        account: &'a str,
        id: &'a str,
        results: bool,
    ) -> Answer<'a, Option<Snapshot>>;
    /// `owner`'s operations on `account`, newest first, older than `before`.
    fn list<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> Answer<'a, Page>;
    /// Requests cancellation: requests not yet taken are never sent.
    fn cancel<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, ()>;
    /// Forgets a done operation.
    fn delete<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, Removal>;
    /// Takes or renews the right to drain `account` (there is work, and no
    /// other drainer holds it); false when another holds it or nothing waits.
    fn hold<'a>(&'a self, account: &'a str) -> Answer<'a, bool>;
    /// Gives the right up (nothing waits, or shutting down).
    fn release<'a>(&'a self, account: &'a str) -> Answer<'a, ()>;
    /// The next request of `account`, oldest first.
    fn take<'a>(&'a self, account: &'a str) -> Answer<'a, Take>;
    /// An attempt of `item` is about to go upstream.
    fn start<'a>(&'a self, account: &'a str, item: &'a Item) -> Answer<'a, Start>;
    /// `item` ended with `result` (an encoded `google.rpc.Status`).
    fn finish<'a>(
        &'a self,
        account: &'a str,
        item: &'a Item,
        ok: bool,
        result: Vec<u8>,
    ) -> Answer<'a, ()>;
    /// Whether `account` may have work queued by another process (a cheap
    /// check before [`OperationStore::hold`], made once a second by every
    /// idle drainer: one read per process for all accounts, not one command
    /// each).
    fn may_have_work<'a>(&'a self, _account: &'a str) -> Answer<'a, bool> {
        Box::pin(async { Ok(true) })
    }
    /// `account`'s queue was found empty: it may drop out of the accounts
    /// [`OperationStore::may_have_work`] names, until work comes again.
    fn went_quiet<'a>(&'a self, _account: &'a str) -> Answer<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// This process' wake-ups.
    fn wakeups(&self) -> &Wakeups;
    /// Other processes change operations too (waiters must also poll).
    fn shared(&self) -> bool;
}

/// The configured store: in Redis with the Redis budget backend, else here.
pub(crate) fn start(backend: &BackendConfig, retention: Duration) -> Arc<dyn OperationStore> {
    match backend {
        BackendConfig::Memory => Arc::new(memory::MemoryOperations::new(retention)),
        BackendConfig::Redis(redis) => Arc::new(redis::RedisOperations::new(redis, retention)),
    }
}

/// Wake-ups within this process: a drainer when its account got work, and
/// waiters (WaitOperation) when any operation changed here.
#[derive(Default)]
pub(crate) struct Wakeups {
    work: Mutex<HashMap<String, watch::Sender<u64>>>,
    changed: watch::Sender<u64>,
}

impl Wakeups {
    /// Bumped when `account` gets work.
    pub(crate) fn work(&self, account: &str) -> watch::Receiver<u64> {
        self.sender(account).subscribe()
    }

    /// `account` got work.
    pub(crate) fn submitted(&self, account: &str) {
        self.sender(account).send_modify(|n| *n = n.wrapping_add(1));
        self.touched();
    }

    /// Bumped when an operation changed in this process.
    pub(crate) fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// An operation changed.
    pub(crate) fn touched(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn sender(&self, account: &str) -> watch::Sender<u64> {
        let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        work.entry(account.to_owned()).or_default().clone()
    }
}

/// The outcome of request `i` of a done operation from its stored result:
/// none stored is a cancelled request when a cancel came before it was
/// taken (`cancelled_from`: the first request the cancel left untaken), and
/// a lost result otherwise.
pub(crate) fn outcome(stored: Option<Vec<u8>>, i: i64, cancelled_from: Option<i64>) -> Outcome {
    match stored {
        Some(bytes) => Outcome::Stored(bytes),
        None if cancelled_from.is_some_and(|from| i >= from) => Outcome::Cancelled,
        None => Outcome::Missing,
    }
}

/// A new operation id: 16 hex digits of the creation time in µs, then 16
/// random ones, so ids sort by creation (pages, newest first) and never
/// collide across replicas.
pub(crate) fn new_id(now_us: i64) -> String {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    // Strictly increasing within the process, even within one µs.
    static LAST: AtomicI64 = AtomicI64::new(0);
    let mut last = LAST.load(Ordering::Relaxed);
    let at = loop {
        let next = now_us.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(seen) => last = seen,
        }
    };
    let random = RandomState::new().hash_one(COUNT.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}{random:016x}", at.max(0))
}

/// Whether `id` could be an operation id (what [`new_id`] makes).
pub(crate) fn is_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// This process' wall clock, µs since the Unix epoch (operations' times are
/// for people: creation, estimated and actual end).
pub(crate) fn now_us() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// µs in `d`, saturating.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Estimated end of a batch of `n` behind `ahead` requests, one interval each.
fn estimated_end(now_us: i64, ahead: usize, n: usize, interval: Duration) -> i64 {
    let slots = i64::try_from(ahead.saturating_add(n)).unwrap_or(i64::MAX);
    now_us.saturating_add(slots.saturating_mul(micros(interval)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_and_are_recognised() {
        let (a, b) = (new_id(1_700_000_000_000_000), new_id(1_700_000_000_000_001));
        assert!(a < b, "{a} {b}");
        assert!(is_id(&a) && is_id(&b));
        let (c, d) = (new_id(5), new_id(5));
        assert!(c < d, "increasing within one µs: {c} {d}");
        for bad in ["", "operations/x", &a[1..], &a.to_uppercase()] {
            assert!(!is_id(bad), "{bad}");
        }
    }

    #[test]
    fn work_wakes_its_accounts_drainer_and_every_waiter_a_change_only_the_waiters() {
        let wakeups = Wakeups::default();
        let (mut a, b, mut changed) = (wakeups.work("a"), wakeups.work("b"), wakeups.changed());
        wakeups.submitted("a");
        assert!(a.has_changed().unwrap(), "a's drainer is woken");
        assert!(!b.has_changed().unwrap(), "b's is not");
        assert!(changed.has_changed().unwrap(), "waiters are woken");
        a.borrow_and_update();
        changed.borrow_and_update();
        wakeups.touched();
        assert!(changed.has_changed().unwrap(), "a change wakes waiters");
        assert!(!a.has_changed().unwrap() && !b.has_changed().unwrap());
    }

    #[test]
    fn a_result_not_stored_is_cancelled_only_from_where_the_cancel_left_off() {
        assert_eq!(outcome(Some(vec![7]), 5, Some(2)), Outcome::Stored(vec![7]));
        assert_eq!(outcome(None, 5, None), Outcome::Missing, "no cancel: lost");
        assert_eq!(
            outcome(None, 1, Some(2)),
            Outcome::Missing,
            "taken before it"
        );
        assert_eq!(outcome(None, 2, Some(2)), Outcome::Cancelled);
        assert_eq!(outcome(None, 3, Some(2)), Outcome::Cancelled);
    }

    #[test]
    fn the_fingerprint_tells_batches_apart() {
        let batch = |requests: Vec<Vec<u8>>| NewOperation {
            account: "a".into(),
            owner: "o".into(),
            request_id: "r".into(),
            requests,
            interval: Duration::from_secs(1),
        };
        let one = batch(vec![b"ab".to_vec(), b"c".to_vec()]);
        let other = batch(vec![b"a".to_vec(), b"bc".to_vec()]);
        assert_ne!(one.fingerprint(), other.fingerprint());
        assert_eq!(one.fingerprint(), batch(one.requests.clone()).fingerprint());
    }
}
