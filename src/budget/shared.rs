//! The Redis backend as the gateway runs it: the shared budget while Redis
//! answers, a fallback while it does not, and a probe that brings the replica
//! back on the shared budget soon after Redis returns.
//!
//! - **Healthy**: every command is one script call ([`RedisLine`]).
//! - **Degraded** (one command failed [`FAILURES_TO_DEGRADE`] times in a
//!   row, or Redis was down at start): commands never touch Redis. `local`
//!   serves from a per-replica line at rate ÷ `--expected-replicas`, so the
//!   replicas together stay near the vendor's rate; `deny` answers
//!   `BackendUnavailable`. A warn log at the transition, the gauge
//!   `provisioning_gateway_budget_backend_degraded` and `/healthz` show the
//!   state (see [`super::fallback`]).
//! - **Subscriber**: one extra connection listens on `<prefix>moved`, where
//!   a caller leaving a line on any replica is announced, and wakes this
//!   replica's waiters of that account so they move up at once.
//! - **Probe**: while degraded, reconnects every [`PROBE_DEGRADED`] (each try
//!   bounded by [`CONNECT_TIMEOUT`](super::redis::CONNECT_TIMEOUT)), so the
//!   replica is back on the shared budget well within a second of Redis
//!   returning; while healthy, reads `TIME` every
//!   [`PROBE_HEALTHY`] to notice a lost Redis without traffic and to measure
//!   clock skew.
//!
//! Handover, both ways, keeps what this replica already knows (see
//! [`super::fallback`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::BackendReport;
use super::fallback::SharedLine;
use super::redis::WallClock;
use super::redis::{RedisStore, StoreError, TIMEOUT, measure_skew};
use super::store::Rules;
use super::store::redis::{RedisLine, channel};
use crate::config::{BudgetConfig, RedisConfig, RedisFallback, Topology};
use crate::telemetry::metrics::{BACKEND_ERRORS, CLOCK_SKEW, DEGRADED};

/// Reconnect attempts while degraded.
pub const PROBE_DEGRADED: Duration = Duration::from_millis(200);
/// Liveness and skew checks while healthy.
pub const PROBE_HEALTHY: Duration = Duration::from_secs(1);
/// Consecutive failures of one command before the replica degrades: one
/// slow reply (a latency spike past the timeout) is not an outage.
pub const FAILURES_TO_DEGRADE: u32 = 3;
/// Pause before a failed command is tried again.
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Skew worth a warning (NTP is off): harmless to the budget, not to logs.
const SKEW_WARNING_US: i64 = 1_000_000;

/// The process' Redis connection, its health, and its probe.
pub struct RedisBackend {
    store: Arc<RedisStore>,
    /// The URL as logs may show it (password redacted).
    shown_url: String,
    key_prefix: String,
    /// Keys carry a hash tag (Redis Cluster).
    tagged_keys: bool,
    pub(super) fallback: RedisFallback,
    expected_replicas: u32,
    clock: WallClock,
    /// True while degraded; watched by the probe and by waiting callers.
    pub(super) degraded: watch::Sender<bool>,
    /// Per account: bumped when its line moved up (a caller left on any
    /// replica, or this replica switched budgets); waiters ask again.
    moves: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Last measured Redis-minus-local clock skew, µs (i64::MIN: never).
    skew_us: AtomicI64,
}

impl RedisBackend {
    /// Connects (bounded) and starts the probe. Redis being down is no error:
    /// the backend starts degraded and the probe keeps trying.
    pub async fn start(config: &RedisConfig, clock: WallClock) -> Result<Arc<Self>, StoreError> {
        let store = Arc::new(RedisStore::new(config, TIMEOUT));
        let backend = Arc::new(Self {
            store,
            shown_url: config.url.to_string(),
            key_prefix: config.key_prefix.clone(),
            tagged_keys: *config.url.topology() == Topology::Cluster,
            fallback: config.fallback,
            expected_replicas: config.expected_replicas.get(),
            clock,
            degraded: watch::Sender::new(false),
            skew_us: AtomicI64::new(i64::MIN),
            moves: Mutex::new(HashMap::new()),
        });
        match backend.reconnect().await {
            Ok(()) => tracing::info!(
                budget_backend = "redis",
                redis = %backend.shown_url,
                fallback = backend.fallback_name(),
                "connected to Redis: the budget is shared"
            ),
            Err(e) => {
                backend.failed();
                backend.degrade(&e);
            }
        }
        metrics::gauge!(DEGRADED).set(if backend.is_degraded() { 1.0 } else { 0.0 });
        tokio::spawn(probe(Arc::downgrade(&backend)));
        tokio::spawn(subscriber(Arc::downgrade(&backend)));
        Ok(backend)
    }

    /// The line of one account, keyed `<prefix><account>` (`<prefix>{<account>}` on a Cluster).
    pub(crate) fn line(self: &Arc<Self>, account: &str, config: &BudgetConfig) -> SharedLine {
        let moved = self.moves_of(account);
        let shared = Rules::of(config, config.interval());
        // The fallback's interval: each replica's share of the rate.
        let local = Rules::of(
            config,
            config.interval().saturating_mul(self.expected_replicas),
        );
        let redis = RedisLine::new(
            Arc::clone(&self.store),
            account,
            &self.key(account),
            &self.key_prefix,
            shared,
            moved,
        );
        SharedLine::new(Arc::clone(self), redis, local, config.interval())
    }

    /// The wake-up of `account`'s waiters.
    fn moves_of(&self, account: &str) -> watch::Sender<u64> {
        let mut moves = self.moves.lock().unwrap_or_else(|p| p.into_inner());
        moves
            .entry(account.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .clone()
    }

    /// Wakes the waiters of `account`, or of every account.
    fn wake(&self, account: Option<&str>) {
        let moves = self.moves.lock().unwrap_or_else(|p| p.into_inner());
        for (name, tx) in moves.iter() {
            if account.is_none_or(|a| a == name) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// The key of an account: `<prefix><account>`, or `<prefix>{<account>}`
    /// on a Cluster, where the hash tag keeps every key of one account on one
    /// slot (a script touching several of them runs only there).
    fn key(&self, account: &str) -> String {
        if self.tagged_keys {
            format!("{}{{{account}}}", self.key_prefix)
        } else {
            format!("{}{account}", self.key_prefix)
        }
    }

    /// The connection, for benchmarks and tests.
    pub fn store(&self) -> &Arc<RedisStore> {
        &self.store
    }

    pub fn is_degraded(&self) -> bool {
        *self.degraded.borrow()
    }

    /// State for `/healthz`.
    pub(crate) fn report(&self) -> BackendReport {
        let skew = self.skew_us.load(Ordering::Relaxed);
        BackendReport {
            budget_backend: "redis",
            degraded: self.is_degraded(),
            fallback: Some(self.fallback_name()),
            redis_clock_skew_ms: (skew != i64::MIN).then_some(skew / 1000),
        }
    }

    fn fallback_name(&self) -> &'static str {
        self.fallback.as_str()
    }

    /// A command failed (counted; the caller decides whether to degrade).
    pub(super) fn failed(&self) {
        metrics::counter!(BACKEND_ERRORS).increment(1);
    }

    /// Redis is lost: switch to the fallback (once per outage: one warn).
    /// The connection is dropped, so that only the probe reconnects.
    pub(super) fn degrade(&self, error: &StoreError) {
        self.store.disconnect();
        let flipped = self
            .degraded
            .send_if_modified(|d| !std::mem::replace(d, true));
        if flipped {
            self.wake(None);
            metrics::gauge!(DEGRADED).set(1.0);
            tracing::warn!(
                budget_backend = "redis",
                redis = %self.shown_url,
                fallback = self.fallback_name(),
                expected_replicas = self.expected_replicas,
                error = %error,
                "Redis unreachable: budget degraded to the fallback until it answers again"
            );
        }
    }

    /// The probe reconnected: back on the shared budget.
    fn recover(&self) {
        if self
            .degraded
            .send_if_modified(|d| std::mem::replace(d, false))
        {
            metrics::gauge!(DEGRADED).set(0.0);
            self.wake(None);
            tracing::info!(
                budget_backend = "redis",
                redis = %self.shown_url,
                "Redis answers again: back on the shared budget"
            );
        }
    }

    /// A fresh connection, script loaded, skew measured.
    async fn reconnect(&self) -> Result<(), StoreError> {
        self.store.connect().await?;
        self.check_skew(true).await
    }

    async fn check_skew(&self, connected_now: bool) -> Result<(), StoreError> {
        let skew = measure_skew(&self.store, self.clock).await?;
        let before = self.skew_us.swap(skew, Ordering::Relaxed);
        metrics::gauge!(CLOCK_SKEW).set(skew as f64 / 1e6);
        let was_large = before != i64::MIN && before.abs() > SKEW_WARNING_US;
        if skew.abs() > SKEW_WARNING_US && (connected_now || !was_large) {
            tracing::warn!(
                skew_ms = skew / 1000,
                "this replica's clock disagrees with Redis' (check NTP); the budget is unaffected: it runs on Redis' clock"
            );
        }
        Ok(())
    }
}

/// Reconnects while degraded; checks liveness while healthy. Ends when the
/// backend is dropped.
async fn probe(backend: Weak<RedisBackend>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        let degraded = b.is_degraded();
        let result = if degraded || !b.store.is_connected() {
            b.reconnect().await
        } else {
            // Like any command: only consecutive failures are an outage.
            let mut result = b.check_skew(false).await;
            for _ in 1..FAILURES_TO_DEGRADE {
                if result.is_ok() {
                    break;
                }
                b.failed();
                tokio::time::sleep(RETRY_PAUSE).await;
                result = b.check_skew(false).await;
            }
            result
        };
        match result {
            Ok(()) => b.recover(),
            Err(e) if degraded => tracing::debug!(error = %e, "Redis still unreachable"),
            Err(e) => {
                b.failed();
                b.degrade(&e);
            }
        }
        let pause = if b.is_degraded() {
            PROBE_DEGRADED
        } else {
            PROBE_HEALTHY
        };
        let mut changes = b.degraded.subscribe();
        drop(b);
        // A call that finds Redis gone wakes the probe at once.
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = changes.changed() => {}
        }
    }
}

/// Listens for lines that moved up on any replica and wakes this replica's
/// waiters of that account. Reconnects after a lost connection (and wakes
/// every waiter then: a message may have been missed). Ends when the
/// backend is dropped.
async fn subscriber(backend: Weak<RedisBackend>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        let channel = channel(&b.key_prefix);
        let subscribed = async {
            let mut pubsub = b.store.connector().open_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(super::redis::CONNECT_TIMEOUT, subscribed).await;
        let weak = Arc::downgrade(&b);
        drop(b);
        match pubsub {
            Ok(Ok(pubsub)) => {
                if let Some(b) = weak.upgrade() {
                    b.wake(None);
                }
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Some(b) = weak.upgrade() else { return };
                    if let Ok(account) = message.get_payload::<String>() {
                        b.wake(Some(&account));
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "Redis subscriber could not connect"),
            Err(_) => tracing::debug!("Redis subscriber timed out connecting"),
        }
        tokio::time::sleep(PROBE_DEGRADED).await;
    }
}
