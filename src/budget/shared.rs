//! The Redis backend as the gateway runs it: the shared budget while Redis
//! answers, a fallback while it does not, and a probe that brings the replica
//! back on the shared budget soon after Redis returns.
//!
//! - **Healthy**: every decision is one script call ([`RedisLimiter`]).
//! - **Degraded** (a command failed or timed out, or Redis was down at
//!   start): decisions never touch Redis. `local` serves from a per-replica
//!   GCRA at rate ÷ `--expected-replicas`, so the replicas together stay near
//!   the vendor's rate; `deny` answers `BackendUnavailable`. A warn log at the
//!   transition, the gauge `provisioning_gateway_budget_backend_degraded` and
//!   `/healthz` show the state.
//! - **Probe**: while degraded, reconnects every [`PROBE_DEGRADED`] (each try
//!   bounded by [`CONNECT_TIMEOUT`](super::redis::CONNECT_TIMEOUT)), so the
//!   replica is back on the shared budget well within a second of Redis
//!   returning; while healthy, reads `TIME` every
//!   [`PROBE_HEALTHY`] to notice a lost Redis without traffic and to measure
//!   clock skew.
//!
//! Handover, both ways, keeps what this replica already knows: on losing
//! Redis, the local budget starts no earlier than the shared slot last seen;
//! on getting it back, the shared key is first pushed to this replica's last
//! local grant + T (the key may have expired, or Redis restarted empty).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::BackendReport;
use super::limiter::{BackendUnavailable, Decision, Limiter};
use super::local::LocalLimiter;
use super::redis::WallClock;
use super::redis::{RedisLimiter, RedisStore, StoreError, TIMEOUT, measure_skew};
use crate::config::{BudgetConfig, RedisConfig, RedisFallback, Topology};
use crate::telemetry::metrics::{BACKEND_ERRORS, CLOCK_SKEW, DEGRADED};

/// Reconnect attempts while degraded.
pub const PROBE_DEGRADED: Duration = Duration::from_millis(200);
/// Liveness and skew checks while healthy.
pub const PROBE_HEALTHY: Duration = Duration::from_secs(1);
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
    fallback: RedisFallback,
    expected_replicas: u32,
    clock: WallClock,
    /// True while degraded; watched by the probe and by sleeping dispatchers.
    degraded: watch::Sender<bool>,
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
        });
        match backend.reconnect().await {
            Ok(()) => tracing::info!(
                budget_backend = "redis",
                redis = %backend.shown_url,
                fallback = backend.fallback_name(),
                "connected to Redis: the budget is shared"
            ),
            Err(e) => backend.degrade(&e),
        }
        metrics::gauge!(DEGRADED).set(if backend.is_degraded() { 1.0 } else { 0.0 });
        tokio::spawn(probe(Arc::downgrade(&backend)));
        Ok(backend)
    }

    /// The limiter of one account, keyed `<prefix><account>` (`<prefix>{<account>}` on a Cluster).
    pub(crate) fn limiter(self: &Arc<Self>, account: &str, config: &BudgetConfig) -> SharedLimiter {
        self.limiter_with(account, config.interval(), config.burst)
    }

    /// The limiter of one account with this interval and burst.
    pub fn limiter_with(
        self: &Arc<Self>,
        account: &str,
        interval: Duration,
        burst: std::num::NonZeroU32,
    ) -> SharedLimiter {
        SharedLimiter {
            backend: Arc::clone(self),
            redis: RedisLimiter::new(Arc::clone(&self.store), self.key(account), interval, burst),
            local: LocalLimiter::with_interval(
                interval.saturating_mul(self.expected_replicas),
                burst,
            ),
            interval,
            handover: Mutex::new(Handover::default()),
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

    /// Redis failed: switch to the fallback (once per outage: one warn).
    fn degrade(&self, error: &StoreError) {
        metrics::counter!(BACKEND_ERRORS).increment(1);
        let flipped = self
            .degraded
            .send_if_modified(|d| !std::mem::replace(d, true));
        if flipped {
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
            b.check_skew(false).await
        };
        match result {
            Ok(()) => b.recover(),
            Err(e) if degraded => tracing::debug!(error = %e, "Redis still unreachable"),
            Err(e) => b.degrade(&e),
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

/// What one account's limiter remembers across a switch of budget.
#[derive(Debug, Default)]
struct Handover {
    /// The last decision came from the local budget.
    on_local: bool,
    /// When the shared budget's next slot was due, as last seen.
    shared_next: Option<Instant>,
    /// When the local budget last granted a slot.
    last_local_grant: Option<Instant>,
    /// Latest upstream pushback (429): no slot before this.
    pushed_until: Option<Instant>,
    /// The connection (generation) of the last shared decision.
    connection: Option<u64>,
}

/// One account's limiter on the Redis backend, with its fallback.
pub struct SharedLimiter {
    backend: Arc<RedisBackend>,
    redis: RedisLimiter,
    /// rate ÷ expected replicas, used only while degraded in `local` mode.
    local: LocalLimiter,
    interval: Duration,
    handover: Mutex<Handover>,
}

impl SharedLimiter {
    /// The Redis key of this account.
    pub fn key(&self) -> &str {
        self.redis.key()
    }

    async fn shared(&self) -> Result<Decision, StoreError> {
        // Back from the fallback: the shared key may have expired, or Redis
        // restarted empty; keep the spacing after this replica's own grants,
        // and any pushback it received meanwhile. On a new connection (a
        // restart, or a failover to a node that may lack the latest writes)
        // no slot comes within one interval of it: whatever was granted on
        // the old one was granted before this replica lost it.
        let generation = self.backend.store.generation();
        let seed = {
            let h = self.lock();
            let after_grant = h.last_local_grant.map(|t| t + self.interval);
            let from_local = h
                .on_local
                .then(|| after_grant.max(h.pushed_until))
                .flatten();
            let reconnected = h.connection.is_some() && h.connection != generation;
            let from_reconnect = reconnected.then(|| Instant::now() + self.interval);
            from_local
                .max(from_reconnect)
                .map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Some(wait) = seed.filter(|w| !w.is_zero()) {
            self.redis.push_back(wait).await?;
        }
        let decision = self.redis.decide().await?;
        let mut h = self.lock();
        h.on_local = false;
        h.connection = generation;
        h.shared_next = Some(
            Instant::now()
                + match decision {
                    Decision::Granted => self.interval,
                    Decision::Wait(wait) => wait,
                },
        );
        Ok(decision)
    }

    fn fallback(&self) -> Result<Decision, BackendUnavailable> {
        if self.backend.fallback == RedisFallback::Deny {
            return Err(BackendUnavailable);
        }
        let now = Instant::now();
        let mut h = self.lock();
        if !h.on_local {
            h.on_local = true;
            // Never earlier than the shared slot this replica last saw.
            if let Some(next) = h.shared_next.filter(|n| *n > now) {
                self.local.hold_until(next);
            }
        }
        let decision = self.local.decide();
        if decision == Decision::Granted {
            h.last_local_grant = Some(now);
        }
        Ok(decision)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handover> {
        // Plain field updates only: a poisoned lock is still consistent.
        self.handover.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Limiter for SharedLimiter {
    fn acquire(&self) -> BoxFuture<'_, Result<Decision, BackendUnavailable>> {
        async move {
            if !self.backend.is_degraded() {
                match self.shared().await {
                    Ok(decision) => return Ok(decision),
                    Err(e) => self.backend.degrade(&e),
                }
            }
            self.fallback()
        }
        .boxed()
    }

    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()> {
        async move {
            // Both budgets: the local one matters if Redis is lost next.
            self.local.hold_until(Instant::now() + wait);
            {
                let mut h = self.lock();
                let until = Instant::now() + wait;
                h.shared_next = Some(h.shared_next.map_or(until, |n| n.max(until)));
                h.pushed_until = Some(h.pushed_until.map_or(until, |n| n.max(until)));
            }
            if !self.backend.is_degraded()
                && let Err(e) = self.redis.push_back(wait).await
            {
                self.backend.degrade(&e);
            }
        }
        .boxed()
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        let mut rx = self.backend.degraded.subscribe();
        async move {
            if rx.changed().await.is_err() {
                // The backend is gone; nothing will change any more.
                futures::future::pending::<()>().await;
            }
        }
        .boxed()
    }
}
