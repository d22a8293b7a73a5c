//! Records in Redis, beside the budget, on the same connection: every
//! replica sees them, so a retry on another replica answers the first
//! call's outcome or joins it.
//!
//! Keys (the account in a hash tag, so both keys of a record share a Cluster
//! slot; the digest hides caller and request_id):
//! - `<prefix>idem:{<account>}:<hex digest>`: the [record](super::record),
//!   created by the claim with `PX` [`RETENTION`] (24 h from the first call;
//!   later writes keep that expiry);
//! - the same with `:lease`: the token of the call running it, `PX` its
//!   lease. A running record without a lease is an unknown outcome: its
//!   replica died mid-call (or could not record the end).
//!
//! Each step is one script (one round trip, atomic): claim, take over, and
//! finish. A replica waiting for a call another replica runs looks again
//! every [`POLL`] (it hears at once of calls of its own replica).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::Script;
use tokio::sync::watch;
use tokio::time::Instant;

use super::record::Record;
use super::{Fingerprint, Found, Held, Key, RETENTION, State, Store, Token, Unavailable};
use crate::budget::redis::RedisStore;

/// How often a call waiting for another replica's call looks again.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Claims a free key: `{1, '', 1}`; else `{0, record, lease exists}`.
/// KEYS: record, lease. ARGV: running record, retention ms, lease ms, token.
const CLAIM: &str = r"
local record = redis.call('GET', KEYS[1])
if not record then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
  return {1, '', 1}
end
return {0, record, redis.call('EXISTS', KEYS[2])}
";

/// Takes over a record still holding the bytes the claim saw, when no call
/// holds its lease: 1, else 0. KEYS: record, lease. ARGV: bytes seen,
/// running record, lease ms, token.
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
";

/// Ends a claim: writes the end (or deletes the record for ''), if the
/// lease is this token's, or lapsed with the record still running: 1, else
/// 0. KEYS: record, lease. ARGV: token, end record or '', running record.
const FINISH: &str = r"
local holder = redis.call('GET', KEYS[2])
if holder then
  if holder ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[2])
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
elseif redis.call('GET', KEYS[1]) ~= ARGV[3] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
";

/// Another call runs the record: look again in [`POLL`] (sooner if a call
/// of this replica ends).
fn look_again_soon() -> Found {
    Found::Running {
        look_again: Instant::now() + POLL,
    }
}

fn script(cell: &'static OnceLock<Script>, source: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(source))
}

/// Records in Redis.
pub(crate) struct RedisRecords {
    store: Arc<RedisStore>,
    key_prefix: String,
    /// Makes this process' tokens unique among replicas.
    nonce: u64,
    next_token: AtomicU64,
    changes: watch::Sender<u64>,
}

impl RedisRecords {
    pub(crate) fn new(
        store: Arc<RedisStore>,
        key_prefix: &str,
        changes: watch::Sender<u64>,
    ) -> Self {
        let seed = (std::process::id(), format!("{:?}", Instant::now()));
        Self {
            store,
            key_prefix: key_prefix.to_owned(),
            nonce: std::collections::hash_map::RandomState::new().hash_one(seed),
            next_token: AtomicU64::new(1),
            changes,
        }
    }

    /// The record's key and its lease's.
    fn keys(&self, key: &Key) -> [String; 2] {
        let record = format!("{}idem:{{{}}}:{}", self.key_prefix, key.account, key.hex());
        let lease = format!("{record}:lease");
        [record, lease]
    }

    fn token(&self, token: Token) -> String {
        format!("{:016x}-{:x}", self.nonce, token.0)
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &'static Script,
        keys: &[String; 2],
        args: &[&[u8]],
    ) -> Result<T, Unavailable> {
        let mut invocation = script.prepare_invoke();
        invocation.key(&keys[0]).key(&keys[1]);
        for arg in args {
            invocation.arg(*arg);
        }
        self.store
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "idempotency record: Redis did not answer");
                Unavailable
            })
    }

    async fn claim_in_redis(
        &self,
        key: &Key,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Found, Unavailable> {
        static CLAIM_SCRIPT: OnceLock<Script> = OnceLock::new();
        static TAKE_OVER_SCRIPT: OnceLock<Script> = OnceLock::new();
        let keys = self.keys(key);
        let token = Token(self.next_token.fetch_add(1, Ordering::Relaxed));
        let owner = self.token(token);
        let running = Record {
            fingerprint,
            state: State::Running,
        }
        .encode();
        let lease_ms = lease.as_millis().max(1).to_string();
        let retention_ms = RETENTION.as_millis().to_string();
        // A record that changes between the two steps is looked at again; a
        // few times at most, then waited for like a running one.
        for _ in 0..3 {
            let claim = script(&CLAIM_SCRIPT, CLAIM);
            let args: [&[u8]; 4] = [
                &running,
                retention_ms.as_bytes(),
                lease_ms.as_bytes(),
                owner.as_bytes(),
            ];
            let (claimed, seen, leased): (i64, Vec<u8>, i64) =
                self.invoke(claim, &keys, &args).await?;
            if claimed == 1 {
                return Ok(Found::Claimed {
                    token,
                    prior_unknown: false,
                });
            }
            let prior = Record::decode(&seen);
            match &prior {
                Some(record) if record.fingerprint != fingerprint => return Ok(Found::Reused),
                Some(Record {
                    state: State::Done(status),
                    ..
                }) => return Ok(Found::Done(status.clone())),
                Some(Record {
                    state: State::Running,
                    ..
                }) if leased == 1 => return Ok(look_again_soon()),
                // Unknown, a lapsed lease, or bytes that are no record
                // (treated as absent).
                _ => {}
            }
            let take_over = script(&TAKE_OVER_SCRIPT, TAKE_OVER);
            let args: [&[u8]; 4] = [&seen, &running, lease_ms.as_bytes(), owner.as_bytes()];
            let took: i64 = self.invoke(take_over, &keys, &args).await?;
            if took == 1 {
                return Ok(Found::Claimed {
                    token,
                    prior_unknown: prior.is_some(),
                });
            }
        }
        Ok(look_again_soon())
    }

    async fn finish_in_redis(&self, held: &Held, end: Option<State>) -> Result<(), Unavailable> {
        static FINISH_SCRIPT: OnceLock<Script> = OnceLock::new();
        let keys = self.keys(&held.key);
        let owner = self.token(held.token);
        let record = |state| {
            Record {
                fingerprint: held.fingerprint,
                state,
            }
            .encode()
        };
        let end = end.map(record).unwrap_or_default();
        let running = record(State::Running);
        let args: [&[u8]; 3] = [owner.as_bytes(), &end, &running];
        let _: i64 = self
            .invoke(script(&FINISH_SCRIPT, FINISH), &keys, &args)
            .await?;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }
}

impl Store for RedisRecords {
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Found, Unavailable>> {
        self.claim_in_redis(key, fingerprint, lease).boxed()
    }

    fn finish<'a>(
        &'a self,
        held: &'a Held,
        end: Option<State>,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        self.finish_in_redis(held, end).boxed()
    }

    fn abandon(self: Arc<Self>, held: Held) {
        // Without a runtime (shutting down) the lease lapses instead: the
        // record then reads as unknown all the same.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = self.finish_in_redis(&held, Some(State::Unknown)).await;
            });
        }
    }
}
