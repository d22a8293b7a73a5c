//! The per-account budget: a FIFO of waiters ([`queue`]) in front of a GCRA
//! limiter behind the [`Limiter`] trait: [`local`] in process for one
//! replica; [`redis`] shared by several, wrapped in [`shared`] for the
//! fallback while Redis is unreachable.
//!
//! A call asks [`AccountQueue::wait_turn`] for its turn. Admission is decided
//! at once from the queue ahead and the next known slot, so a call that cannot
//! be served before its deadline is refused immediately instead of timing out
//! in line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::config::{BackendConfig, BudgetConfig};

pub mod fair;
pub mod local;
pub mod queue;
pub mod redis;
pub mod shared;

pub use fair::Caller;
pub use queue::{AccountQueue, Departure, Turn};

/// A limiter's answer: the slot is taken now, or the next one is this far off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Granted,
    Wait(Duration),
}

/// The shared state behind a budget could not be reached and no fallback applies.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("budget backend unavailable")]
pub struct BackendUnavailable;

/// One account's GCRA state, wherever it lives.
pub trait Limiter: Send + Sync + 'static {
    /// Takes the next slot if it is due now, else says how long until it is.
    fn acquire(&self) -> BoxFuture<'_, Result<Decision, BackendUnavailable>>;
    /// The same decision made at once, without waiting on anything, where
    /// the limiter can (in process); `None` where it cannot (Redis).
    fn try_acquire_now(&self) -> Option<Decision> {
        None
    }
    /// Moves the next slot to at least now + `wait` (upstream 429 pushback).
    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()>;
    /// Completes when the limiter's answers may have changed other than by
    /// time passing (the Redis backend switched to or from its fallback), so
    /// a dispatcher sleeping on an old `Wait` asks again. Never, by default.
    fn changed(&self) -> BoxFuture<'_, ()> {
        futures::future::pending().boxed()
    }
}

/// This process' wall clock, as the Redis backend reads it. Budget decisions
/// never do (they use Redis `TIME`, and tokio's monotonic clock for sleeping);
/// it only measures the skew reported on `/healthz`. The offset lets tests run
/// replicas whose clocks disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    offset_us: i64,
}

impl WallClock {
    /// The system clock as it is.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system clock shifted by `offset_us` microseconds (negative: behind).
    pub fn offset_by_micros(offset_us: i64) -> Self {
        Self { offset_us }
    }

    /// Microseconds since the Unix epoch, as this clock reads.
    pub fn now_micros(&self) -> i64 {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since.as_micros())
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_us)
    }
}

/// What `/healthz` says about the budget backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendReport {
    /// `memory` or `redis`.
    pub budget_backend: &'static str,
    /// Redis is unreachable and the fallback applies.
    pub degraded: bool,
    /// `local` or `deny` (Redis backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
    /// Redis' clock minus this replica's, in ms, when last measured (Redis
    /// backend only). Informational: decisions use Redis' clock alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_clock_skew_ms: Option<i64>,
}

/// A handle on the backend's state, for `/healthz`.
#[derive(Clone)]
pub struct BackendHealth(Option<Arc<shared::RedisBackend>>);

impl BackendHealth {
    pub fn report(&self) -> BackendReport {
        match &self.0 {
            None => BackendReport {
                budget_backend: "memory",
                degraded: false,
                fallback: None,
                redis_clock_skew_ms: None,
            },
            Some(redis) => redis.report(),
        }
    }
}

/// Why a call was refused its turn; the label used in metrics and ErrorInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `--max-queue` callers are already waiting.
    QueueFull,
    /// The turn would come later than the caller's deadline minus the reserve.
    Deadline,
    /// The turn would come later than `--max-wait`.
    MaxWait,
    /// Admitted, but the slot did not come in time (e.g. after a pushback).
    TimedOut,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Deadline => "deadline",
            Self::MaxWait => "max_wait",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Why a call did not get its turn.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BudgetError {
    #[error("the account's budget cannot serve this call in time ({})", reason.as_str())]
    Exhausted {
        reason: Rejection,
        /// When a retry could expect a slot.
        retry_after: Duration,
    },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("the budget backend is unavailable")]
    BackendUnavailable,
}

/// The budgets of every configured account.
pub struct Budget {
    accounts: HashMap<String, Arc<AccountQueue>>,
    health: BackendHealth,
}

impl Budget {
    /// The configured backend's budgets, one per (account, budget). The Redis
    /// backend starts even when Redis is unreachable (degraded: fallback until
    /// the probe reconnects).
    pub async fn build(
        backend: &BackendConfig,
        accounts: &[(String, BudgetConfig)],
    ) -> Result<Self, redis::StoreError> {
        Ok(match backend {
            BackendConfig::Memory => Self::memory(accounts),
            BackendConfig::Redis(redis) => {
                let backend = shared::RedisBackend::start(redis).await?;
                let limiters = accounts.iter().map(|(name, config)| {
                    let limiter = backend.limiter(name, config);
                    (name.clone(), config.clone(), Arc::new(limiter) as _)
                });
                let mut budget = Self::with_limiters(limiters);
                budget.health = BackendHealth(Some(backend));
                budget
            }
        })
    }

    /// In-process budgets, one GCRA per account.
    pub fn memory(accounts: &[(String, BudgetConfig)]) -> Self {
        Self::with_limiters(accounts.iter().map(|(name, config)| {
            let limiter = Arc::new(local::LocalLimiter::new(config)) as _;
            (name.clone(), config.clone(), limiter)
        }))
    }

    /// Budgets over the given limiters; spawns each account's dispatcher.
    pub fn with_limiters(
        limiters: impl IntoIterator<Item = (String, BudgetConfig, Arc<dyn Limiter>)>,
    ) -> Self {
        let accounts = limiters
            .into_iter()
            .map(|(name, config, limiter)| {
                let queue = AccountQueue::spawn(&name, limiter, &config);
                (name, queue)
            })
            .collect();
        Self {
            accounts,
            health: BackendHealth(None),
        }
    }

    /// The backend's state, for `/healthz`.
    pub fn health(&self) -> BackendHealth {
        self.health.clone()
    }

    /// The queue of a configured account.
    pub fn account(&self, name: &str) -> Option<&Arc<AccountQueue>> {
        self.accounts.get(name)
    }

    /// Refuses new calls and answers every waiting one with `ShuttingDown`.
    pub fn close(&self) {
        self.accounts.values().for_each(|q| q.close());
    }
}
