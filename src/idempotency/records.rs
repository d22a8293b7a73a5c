//! The door the request path uses: [`Records::begin`] claims a key (or
//! answers its stored outcome, or waits for the call that runs it), and a
//! [`Claim`] records how the call ended, or that its caller went away.
//!
//! Which store: Redis with the Redis backend while it answers; while it does
//! not, `--redis-fallback` decides: `local` keeps records in this process
//! (a retry on another replica, or after Redis returns, may then run
//! again), `deny` refuses the call ([`Refused::Unavailable`]). Memory
//! otherwise.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tonic_types::pb::Status as RpcStatus;

use super::memory::MemoryStore;
use super::redis::RedisRecords;
use super::{Fingerprint, Found, Held, Key, LEASE_MARGIN, State, Store};
use crate::budget::redis::RedisStore;
use crate::budget::shared::RedisBackend;
use crate::config::RedisFallback;

/// Where records live, and how calls wait for each other.
pub(crate) struct Records {
    memory: Arc<MemoryStore>,
    redis: Option<Shared>,
    /// Bumped when a record of this process ends.
    changes: watch::Sender<u64>,
}

/// Records in Redis, with the budget's view of whether Redis answers.
struct Shared {
    records: Arc<RedisRecords>,
    backend: Arc<RedisBackend>,
    fallback: RedisFallback,
}

/// Why a call with a request_id does not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request_id was used for another request (fields or allow_missing).
    #[error("request_id was already used for a different request")]
    Reused,
    /// The call with this request_id still runs at this caller's deadline.
    #[error("the call with this request_id is still running")]
    InProgress,
    /// Redis is lost and `--redis-fallback` is `deny`.
    #[error("the idempotency store is unavailable")]
    Unavailable,
}

/// What [`Records::begin`] decided.
#[derive(Debug)]
pub(crate) enum Begun {
    /// Run the call and [`Claim::finish`] it.
    Run(Claim),
    /// Answer this: an earlier call with this request_id ended so.
    Replay(RpcStatus),
}

/// How a claimed call ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Nothing reached Infobip (or provably took effect): forgotten, a retry
    /// runs as a new call.
    NothingSent,
    /// Sent, but no answer says whether it took effect.
    Unknown,
    /// Infobip's answer settled it: this is what retries answer.
    Done(RpcStatus),
}

impl Records {
    /// Records in memory only (the memory budget backend), at most
    /// `max_entries` of them.
    pub(crate) fn memory(max_entries: usize) -> Self {
        let changes = watch::Sender::new(0);
        Self {
            memory: Arc::new(MemoryStore::new(max_entries, changes.clone())),
            redis: None,
            changes,
        }
    }

    /// Records in Redis (keys under `key_prefix`), in memory while Redis is
    /// lost if `fallback` is `local`.
    pub(crate) fn redis(
        max_entries: usize,
        backend: Arc<RedisBackend>,
        key_prefix: &str,
        fallback: RedisFallback,
    ) -> Self {
        let mut records = Self::memory(max_entries);
        let store: Arc<RedisStore> = Arc::clone(backend.store());
        let changes = records.changes.clone();
        records.redis = Some(Shared {
            records: Arc::new(RedisRecords::new(store, key_prefix, changes)),
            backend,
            fallback,
        });
        records
    }

    /// Claims `key` for a call of `fingerprint` that answers by `deadline`,
    /// waiting (at most until `patience`) while another call runs it.
    pub(crate) async fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        deadline: Instant,
        patience: Instant,
    ) -> Result<Begun, Refused> {
        let mut changes = self.changes.subscribe();
        loop {
            // Subscribed before asking: an end right after the answer wakes us.
            changes.mark_unchanged();
            let lease = deadline.saturating_duration_since(Instant::now()) + LEASE_MARGIN;
            let (store, found) = self.claim(&key, fingerprint, lease).await?;
            let look_again = match found {
                Found::Claimed {
                    token,
                    prior_unknown,
                } => {
                    let held = Held::new(key, fingerprint, token);
                    return Ok(Begun::Run(Claim {
                        store,
                        held: Some(held),
                        prior_unknown,
                    }));
                }
                Found::Done(status) => return Ok(Begun::Replay(status)),
                Found::Reused => return Err(Refused::Reused),
                Found::Running { look_again } => look_again,
            };
            if Instant::now() >= patience {
                return Err(Refused::InProgress);
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = sleep_until(look_again.min(patience)) => {}
            }
        }
    }

    /// One claim in the store that applies now.
    async fn claim(
        &self,
        key: &Key,
        fingerprint: Fingerprint,
        lease: std::time::Duration,
    ) -> Result<(Arc<dyn Store>, Found), Refused> {
        if let Some(shared) = &self.redis {
            if !shared.backend.is_degraded() {
                let records = Arc::clone(&shared.records);
                if let Ok(found) = records.claim(key, fingerprint, lease).await {
                    return Ok((records, found));
                }
            }
            if shared.fallback == RedisFallback::Deny {
                return Err(Refused::Unavailable);
            }
        }
        let memory = Arc::clone(&self.memory);
        let found = memory.claim(key, fingerprint, lease).await;
        let found = found.map_err(|_| Refused::Unavailable)?;
        Ok((memory, found))
    }
}

/// A call that holds its key. Dropped without [`Claim::finish`] (its caller
/// went away mid-call), the record ends as an unknown outcome.
pub(crate) struct Claim {
    store: Arc<dyn Store>,
    /// `None` once finished.
    held: Option<Held>,
    prior_unknown: bool,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("prior_unknown", &self.prior_unknown)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// An earlier call with this request_id may have taken effect: an
    /// upstream 404 now answers OK.
    pub(crate) fn prior_unknown(&self) -> bool {
        self.prior_unknown
    }

    /// Records how the call ended. A store that cannot be written lets the
    /// lease lapse: the record then reads as an unknown outcome.
    pub(crate) async fn finish(mut self, end: End) {
        let state = match end {
            // Still unknown: an earlier call may have taken effect.
            End::NothingSent if self.prior_unknown => Some(State::Unknown),
            End::NothingSent => None,
            End::Unknown => Some(State::Unknown),
            End::Done(status) => Some(State::Done(status)),
        };
        if let Some(held) = &self.held {
            let _ = self.store.finish(held, state).await;
        }
        self.held = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            Arc::clone(&self.store).abandon(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::idempotency::fixtures;

    fn key() -> Key {
        fixtures::key(1)
    }

    fn fingerprint() -> Fingerprint {
        fixtures::fingerprint(false)
    }

    fn in_(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    async fn begin(records: &Records, patience: Instant) -> Result<Begun, Refused> {
        records
            .begin(key(), fingerprint(), patience, patience)
            .await
    }

    async fn run(records: &Records) -> Claim {
        match begin(records, in_(10)).await {
            Ok(Begun::Run(claim)) => claim,
            other => panic!("not run: {other:?}"),
        }
    }

    fn not_found() -> RpcStatus {
        RpcStatus {
            code: 5,
            message: "gone".into(),
            details: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_joins_the_running_call_and_answers_its_outcome() {
        let records = Arc::new(Records::memory(10));
        let first = run(&records).await;
        let retry = tokio::spawn({
            let records = Arc::clone(&records);
            async move { begin(&records, in_(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!retry.is_finished(), "it waits for the first call");
        first.finish(End::Done(not_found())).await;
        let started = Instant::now();
        let joined = retry.await.unwrap();
        assert!(
            matches!(&joined, Ok(Begun::Replay(s)) if *s == not_found()),
            "{joined:?}"
        );
        assert_eq!(Instant::now(), started, "woken at once, not by polling");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_still_waiting_at_its_patience_is_refused_in_progress() {
        let records = Records::memory(10);
        let _first = run(&records).await;
        let patience = in_(2);
        assert_eq!(
            begin(&records, patience).await.unwrap_err(),
            Refused::InProgress
        );
        assert_eq!(Instant::now(), patience);
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_call_holds_its_key_until_its_deadline_and_the_lease_margin() {
        let records = Records::memory(10);
        let deadline = in_(10);
        let _first = run(&records).await;
        let retry = begin(&records, in_(60)).await;
        assert!(
            matches!(&retry, Ok(Begun::Run(claim)) if claim.prior_unknown()),
            "{retry:?}"
        );
        assert_eq!(Instant::now(), deadline + LEASE_MARGIN, "taken over then");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_caller_went_away_leaves_an_unknown_outcome() {
        let records = Records::memory(10);
        drop(run(&records).await);
        let retry = run(&records).await;
        assert!(retry.prior_unknown());
        // Refused by the budget this time: still unknown, not forgotten.
        retry.finish(End::NothingSent).await;
        assert!(run(&records).await.prior_unknown());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_sent_is_forgotten_and_the_retry_runs_as_new() {
        let records = Records::memory(10);
        run(&records).await.finish(End::NothingSent).await;
        let retry = run(&records).await;
        assert!(!retry.prior_unknown());
    }
}
