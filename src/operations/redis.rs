//! Operations in Redis, for several replicas: operations and their pending
//! requests live in Redis, not in any replica, so any replica drains them
//! and one killed mid-batch loses nothing. Every command is one call of
//! [`operations.lua`](script) (atomic per account), or a plain read.
//!
//! Keys of account A, under `--redis-key-prefix` P, all with the hash tag
//! `{A}` (one Cluster slot per account); B = `P{A}:ops`:
//! - `B:queue`: a stream of pending requests (fields `op`, `i`, `req`: the
//!   operation id, the request's index, the encoded request), in submission
//!   order across batches, read by the consumer group `drainers`; an entry
//!   is acknowledged and deleted once its result is stored (or it is
//!   dropped as cancelled);
//! - `B:op:<id>`: a hash per operation: `owner`, `fp` (fingerprint of its
//!   requests), `rid`, `total`, `ok`, `failed`, `create`, `eta`, `end` (µs
//!   since the epoch), `cancel`, `cancel_from` (requests from this index on
//!   were never taken when it was cancelled), `taken`, `done`, one `r:<i>`
//!   per result (an encoded `google.rpc.Status`) and `s:<i>` while an
//!   attempt of request i may have gone upstream without a stored result;
//!   it expires `--operation-retention` after it is done;
//! - `B:owner:<owner>`: a sorted set (lexical) of the owner's operation ids,
//!   for ListOperations; ids of expired operations are removed as met;
//! - `B:rid:<sha256(owner, request_id)>`: the operation a batch request id
//!   names (expires with it);
//! - `B:lease`: the consumer name of the replica draining the account,
//!   `SET NX PX` [`LEASE`] and renewed by its holder; a replica that dies
//!   loses it within [`LEASE`].
//!
//! Delivery is at least once: the holder takes the oldest pending entry
//! first (`XAUTOCLAIM`, a dead holder's included), and a request whose
//! attempt started (`s:<i>`) before its holder died is sent again, where a
//! 404 then counts as OK. Replicas learn of new work from `P ops:active`,
//! the accounts with queued work (read once a second by each replica, not
//! once per account: see [`active`]), then take the account's lease.
//!
//! Its own connection (not the budget's): a batch of 10,000 requests is a
//! large command that must not hold up budget decisions, and a failing
//! command here must not cost the budget its connection. Nothing read back
//! from Redis can panic: an unexpected answer is [`Unavailable`].

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub(crate) mod active;
mod read;

use super::{
    Answer, Item, LEASE, NewOperation, OperationStore, Page, Removal, Snapshot, Start, Submitted,
    Take, Unavailable, Wakeups, hex, micros, new_id, now_us,
};
use crate::budget::redis::{RedisStore, StoreError};
use crate::config::RedisConfig;
use active::Active;
use read::{FIELDS, parse};

/// Longest command (accepting 10,000 requests takes tens of ms).
const TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnects at most this often.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// Whether a connection may be tried at `now`: not within
/// [`RECONNECT_EVERY`] of the last failed try.
fn may_reconnect(failed_at: Option<Instant>, now: Instant) -> bool {
    failed_at.is_none_or(|at| now.saturating_duration_since(at) >= RECONNECT_EVERY)
}

/// The script's answer to `submit`: whether it created the operation (else
/// the request id's existing one), and its id.
fn submit_answer(answer: &[String]) -> Result<(bool, &String), Unavailable> {
    match answer {
        [kind, id] if kind == "created" => Ok((true, id)),
        [kind, id] if kind == "existing" => Ok((false, id)),
        _ => Err(unexpected("submit")),
    }
}

/// The script's answer to `take`.
fn take_answer(answer: &[Vec<u8>]) -> Result<Take, Unavailable> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match answer {
        [kind] if kind == b"empty" => Take::Empty,
        [kind] if kind == b"lost" => Take::Lost,
        [kind] if kind == b"busy" => Take::Skipped,
        [kind, entry, op, index, request, owner, started] if kind == b"item" => Take::Item(Item {
            entry: text(entry),
            op: text(op),
            index: text(index).parse().map_err(|_| unexpected("take"))?,
            request: request.clone(),
            owner: text(owner),
            redelivered: started == b"1",
        }),
        _ => return Err(unexpected("take")),
    })
}

/// The script's answer to `delete`.
fn removal(word: &str) -> Result<Removal, Unavailable> {
    match word {
        "deleted" => Ok(Removal::Deleted),
        "running" => Ok(Removal::Running),
        "missing" => Ok(Removal::Missing),
        _ => Err(unexpected("delete")),
    }
}

/// The script's answer to `start`: send it, it was cancelled, or stop (the
/// lease went to another drainer, or the operation is gone).
fn start_answer(word: &str) -> Result<Start, Unavailable> {
    match word {
        "go" => Ok(Start::Go),
        "cancelled" => Ok(Start::Cancelled),
        "lost" | "gone" => Ok(Start::Stop),
        _ => Err(unexpected("start")),
    }
}

/// The script, called by its SHA (loaded on first use on a connection).
fn script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(include_str!("operations.lua")))
}

/// Operations of every account in Redis.
pub(crate) struct RedisOperations {
    store: RedisStore,
    prefix: String,
    /// This process' consumer name and lease value.
    consumer: String,
    retention_ms: String,
    wakeups: Wakeups,
    /// Held by the one caller reconnecting.
    connecting: Semaphore,
    /// When the last reconnect failed.
    failed_at: Mutex<Option<Instant>>,
    /// The accounts with queued work.
    active: Active,
}

fn unavailable(e: StoreError) -> Unavailable {
    Unavailable(e.to_string())
}

fn unexpected(what: &str) -> Unavailable {
    Unavailable(format!("unexpected answer from Redis to {what}"))
}

impl RedisOperations {
    pub(crate) fn new(config: &RedisConfig, retention: Duration) -> Self {
        let consumer = RandomState::new().hash_one(std::process::id());
        Self {
            store: RedisStore::new(config, TIMEOUT),
            prefix: config.key_prefix.clone(),
            consumer: format!("{consumer:016x}"),
            retention_ms: (micros(retention) / 1000).max(1).to_string(),
            wakeups: Wakeups::default(),
            connecting: Semaphore::new(1),
            failed_at: Mutex::new(None),
            active: Active::new(&config.key_prefix),
        }
    }

    fn base(&self, account: &str) -> String {
        format!("{}{{{account}}}:ops", self.prefix)
    }

    /// A live connection: one caller reconnects (after a failed try, not
    /// again within [`RECONNECT_EVERY`]) while the others wait for it.
    async fn connected(&self) -> Result<(), Unavailable> {
        if self.store.is_connected() {
            return Ok(());
        }
        let _connecting = self
            .connecting
            .acquire()
            .await
            .map_err(|_| Unavailable("not connected to Redis".into()))?;
        if self.store.is_connected() {
            return Ok(());
        }
        {
            let mut failed = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
            if !may_reconnect(*failed, Instant::now()) {
                return Err(Unavailable("not connected to Redis".into()));
            }
            *failed = None;
        }
        let connected = self.store.connect().await;
        if connected.is_err() {
            *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        connected.map_err(unavailable)
    }

    /// One script command on `account`.
    async fn call<T: redis::FromRedisValue>(
        &self,
        account: &str,
        args: Vec<Vec<u8>>,
    ) -> Result<T, Unavailable> {
        self.connected().await?;
        let key = self.base(account);
        let run = self.store.run(|mut conn| async move {
            let mut invocation = script().prepare_invoke();
            invocation.key(key);
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke_async(&mut conn).await
        });
        run.await.map_err(unavailable)
    }

    async fn submit_now(&self, new: NewOperation) -> Result<Submitted, Unavailable> {
        let now = now_us();
        let rid = if new.request_id.is_empty() {
            String::new()
        } else {
            let mut hash = Sha256::new();
            hash.update(new.owner.as_bytes());
            hash.update([0]);
            hash.update(new.request_id.as_bytes());
            hex(&hash.finalize())
        };
        let mut args: Vec<Vec<u8>> = [
            "submit".to_owned(),
            now.to_string(),
            micros(new.interval).to_string(),
            new_id(now),
            new.owner.clone(),
            rid,
            new.fingerprint(),
        ]
        .map(String::into_bytes)
        .into();
        args.extend(new.requests);
        let answer: Vec<String> = self.call(&new.account, args).await?;
        let (created, id) = submit_answer(&answer)?;
        let snapshot = self.snapshot(&new.account, id, false).await?;
        let snapshot = snapshot.ok_or_else(|| unexpected("submit (operation gone)"))?;
        if created {
            // Other replicas learn of the work from the set; should that
            // fail, this replica's drainer has it.
            if let Err(e) = self.active.add(&self.store, &new.account).await {
                tracing::warn!(account = %new.account, error = %e.0, "batch queued, but not listed for other replicas");
            }
            self.wakeups.submitted(&new.account);
            Ok(Submitted::Created(snapshot))
        } else {
            Ok(Submitted::Existing(snapshot))
        }
    }

    async fn take_now(&self, account: &str) -> Result<Take, Unavailable> {
        let args = vec![b"take".to_vec(), self.consumer.clone().into_bytes()];
        let answer: Vec<Vec<u8>> = self.call(account, args).await?;
        take_answer(&answer)
    }

    async fn word(&self, account: &str, args: &[&str]) -> Result<String, Unavailable> {
        let args = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        self.call(account, args).await
    }
}

impl OperationStore for RedisOperations {
    fn submit(&self, new: NewOperation) -> Answer<'_, Submitted> {
        Box::pin(self.submit_now(new))
    }

    fn get<'a>(
        &'a self,
        account: &'a str,
        id: &'a str,
        results: bool,
    ) -> Answer<'a, Option<Snapshot>> {
        Box::pin(self.snapshot(account, id, results))
    }

    fn list<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
        before: Option<&'a str>,
        limit: usize,
    ) -> Answer<'a, Page> {
        Box::pin(async move {
            let fetch = (limit + 1).to_string();
            let args = ["list", owner, before.unwrap_or(""), &fetch];
            let args = args.iter().map(|a| a.as_bytes().to_vec()).collect();
            let flat: Vec<Vec<u8>> = self.call(account, args).await?;
            let mut operations: Vec<Snapshot> = flat
                .chunks(1 + FIELDS.len())
                .filter_map(|op| parse(&String::from_utf8_lossy(op.first()?), op.get(1..)?))
                .collect();
            let more = operations.len() > limit;
            operations.truncate(limit);
            let next = more
                .then(|| operations.last().map(|s| s.id.clone()))
                .flatten();
            Ok(Page { operations, next })
        })
    }

    fn cancel<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, ()> {
        Box::pin(async move {
            let now = now_us().to_string();
            self.word(account, &["cancel", id, &now, &self.retention_ms])
                .await?;
            self.wakeups.touched();
            Ok(())
        })
    }

    fn delete<'a>(&'a self, account: &'a str, id: &'a str) -> Answer<'a, Removal> {
        Box::pin(async move { removal(&self.word(account, &["delete", id]).await?) })
    }

    fn hold<'a>(&'a self, account: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
            let lease = micros(LEASE) / 1000;
            let args = ["hold", &self.consumer, &lease.to_string()];
            let args = args.iter().map(|a| a.as_bytes().to_vec()).collect();
            let held: i64 = self.call(account, args).await?;
            Ok(held == 1)
        })
    }

    fn release<'a>(&'a self, account: &'a str) -> Answer<'a, ()> {
        Box::pin(async move {
            let args = vec![b"release".to_vec(), self.consumer.clone().into_bytes()];
            self.call::<Value>(account, args).await.map(drop)
        })
    }

    fn take<'a>(&'a self, account: &'a str) -> Answer<'a, Take> {
        Box::pin(self.take_now(account))
    }

    fn start<'a>(&'a self, account: &'a str, item: &'a Item) -> Answer<'a, Start> {
        Box::pin(async move {
            let index = item.index.to_string();
            let args = ["start", &self.consumer, &item.op, &index];
            start_answer(&self.word(account, &args).await?)
        })
    }

    fn finish<'a>(
        &'a self,
        account: &'a str,
        item: &'a Item,
        ok: bool,
        result: Vec<u8>,
    ) -> Answer<'a, ()> {
        Box::pin(async move {
            let now = now_us().to_string();
            let index = item.index.to_string();
            let ok = if ok { "1" } else { "0" };
            let mut args: Vec<Vec<u8>> = ["finish", &item.op, &index, &item.entry, ok]
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect();
            args.push(result);
            args.push(now.into_bytes());
            args.push(self.retention_ms.clone().into_bytes());
            self.call::<Value>(account, args).await?;
            self.wakeups.touched();
            Ok(())
        })
    }

    fn may_have_work<'a>(&'a self, account: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
            self.connected().await?;
            self.active.has(&self.store, account).await
        })
    }

    fn went_quiet<'a>(&'a self, account: &'a str) -> Answer<'a, ()> {
        Box::pin(async move {
            self.connected().await?;
            let queue = format!("{}:queue", self.base(account));
            self.active.quiet(&self.store, account, queue).await
        })
    }

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submit_answer_is_created_or_existing_with_an_id_and_nothing_else() {
        let answer = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let id = "0123".to_owned();
        assert_eq!(
            submit_answer(&answer(&["created", "0123"])).ok(),
            Some((true, &id))
        );
        assert_eq!(
            submit_answer(&answer(&["existing", "0123"])).ok(),
            Some((false, &id))
        );
        for bad in [&["gone", "0123"][..], &["created"], &[]] {
            assert!(submit_answer(&answer(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_take_answer_reads_as_its_own_kind_and_anything_else_is_refused() {
        let answer = |words: &[&str]| -> Vec<Vec<u8>> {
            words.iter().map(|w| w.as_bytes().to_vec()).collect()
        };
        let kind = |words: &[&str]| match take_answer(&answer(words)) {
            Ok(Take::Empty) => "empty",
            Ok(Take::Lost) => "lost",
            Ok(Take::Skipped) => "busy",
            Ok(Take::Item(_)) => "item",
            Err(_) => "refused",
        };
        for word in ["empty", "lost", "busy"] {
            assert_eq!(kind(&[word]), word);
        }
        assert_eq!(kind(&["item"]), "refused", "an item without its fields");
        assert_eq!(kind(&["gone"]), "refused");
        assert_eq!(kind(&[]), "refused");
        let item = answer(&["item", "7-0", "op", "3", "req", "o", "1"]);
        let Ok(Take::Item(item)) = take_answer(&item) else {
            panic!("an item");
        };
        assert_eq!(
            (item.entry.as_str(), item.op.as_str(), item.index),
            ("7-0", "op", 3)
        );
        assert_eq!(
            (item.request.as_slice(), item.owner.as_str()),
            (&b"req"[..], "o")
        );
        assert!(item.redelivered);
        let fresh = answer(&["item", "7-0", "op", "3", "req", "o", "0"]);
        assert!(matches!(take_answer(&fresh), Ok(Take::Item(i)) if !i.redelivered));
        let bad_index = answer(&["item", "7-0", "op", "x", "req", "o", "0"]);
        assert!(take_answer(&bad_index).is_err());
        assert!(take_answer(&answer(&["lost", "extra"])).is_err());
        let not_an_item = answer(&["gone", "7-0", "op", "3", "req", "o", "1"]);
        assert!(
            take_answer(&not_an_item).is_err(),
            "seven words of another kind"
        );
    }

    #[test]
    fn delete_and_start_answers_read_as_their_own_kind_and_anything_else_is_refused() {
        let removals = ["deleted", "running", "missing", "other"].map(|w| removal(w).ok());
        use Removal::{Deleted, Missing, Running};
        assert_eq!(
            removals,
            [Some(Deleted), Some(Running), Some(Missing), None]
        );
        let starts = ["go", "cancelled", "lost", "gone", "other"].map(|w| start_answer(w).ok());
        use Start::{Cancelled, Go, Stop};
        assert_eq!(
            starts,
            [Some(Go), Some(Cancelled), Some(Stop), Some(Stop), None]
        );
    }

    #[test]
    fn the_stores_wake_ups_are_one_for_all_who_listen_and_it_is_shared() {
        use crate::config::RedisUrl;
        // Not connected: no command runs.
        let url = RedisUrl::new("redis://127.0.0.1:1").unwrap();
        let store = RedisOperations::new(&RedisConfig::new(url), Duration::from_secs(60));
        let (mut work, mut changed) = (store.wakeups().work("a"), store.wakeups().changed());
        store.wakeups().submitted("a");
        assert!(work.has_changed().unwrap() && changed.has_changed().unwrap());
        work.borrow_and_update();
        changed.borrow_and_update();
        store.wakeups().touched();
        assert!(changed.has_changed().unwrap() && !work.has_changed().unwrap());
        // Other replicas change its operations too: its waiters also poll.
        assert!(store.shared());
    }

    #[test]
    fn a_failed_connection_is_tried_again_only_once_the_pause_has_passed() {
        let at = Instant::now();
        let ms = Duration::from_millis;
        assert!(may_reconnect(None, at), "never failed");
        assert!(!may_reconnect(Some(at), at));
        assert!(!may_reconnect(Some(at), at + RECONNECT_EVERY - ms(1)));
        assert!(
            may_reconnect(Some(at), at + RECONNECT_EVERY),
            "at the pause's end"
        );
        assert!(
            may_reconnect(Some(at), at + 3 * RECONNECT_EVERY),
            "and after it"
        );
    }
}
