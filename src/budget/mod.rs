//! The per-account budget: one line of waiting calls in front of a GCRA,
//! kept where every replica can see it. The design, in rooms:
//!
//! - [`schedule`]: the rules (GCRA slots as reservations on one schedule,
//!   promise-keeping admission, weighted fair order, departures, clock
//!   regressions), on an abstract clock, with no I/O;
//! - [`store`]: where they run: [`store::memory`] in this process (one
//!   replica), [`store::redis`] in Redis for every replica (`line.lua`, one
//!   round trip per command, on Redis' clock), with [`fallback`] to a
//!   per-replica line while Redis is lost and [`shared`] for the
//!   connection, its probe and the subscriber that wakes waiters;
//! - [`line`](mod@line): this replica's side: admit, sleep until the slot, claim;
//! - [`spacing`]: departures, so the vendor sees arrivals spaced, whatever
//!   held a request up on its way out.
//!
//! A call is admitted only with a slot that comes before its deadline minus
//! the upstream reserve, on the whole line (every replica's callers), and
//! refused at once otherwise with when a slot would be free.
//!
//! A mechanism: imports `config`, `domain` and `telemetry::metrics` only.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{BackendConfig, BudgetConfig};

mod connect;
pub(crate) mod fallback;
mod line;
pub(crate) mod redis;
pub(crate) mod schedule;
pub(crate) mod shared;
mod spacing;
pub(crate) mod store;

pub(crate) use line::{Line, Turn};
pub(crate) use redis::WallClock;

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

impl BudgetError {
    /// The label of this refusal in metrics and on the `budget.wait` span.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Exhausted { reason, .. } => reason.as_str(),
            Self::ShuttingDown => "shutting_down",
            Self::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// What `/healthz` says about the budget backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct BackendReport {
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

/// Where the budgets live: in this process, or in Redis (with its
/// connection, probe and fallback). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Backend(Option<Arc<shared::RedisBackend>>);

impl Backend {
    /// The configured backend. The Redis backend starts even when Redis is
    /// unreachable (degraded: fallback until the probe reconnects); `clock`
    /// only measures the skew shown on `/healthz`.
    pub(crate) async fn start(
        config: &BackendConfig,
        clock: WallClock,
    ) -> Result<Self, redis::StoreError> {
        Ok(Self(match config {
            BackendConfig::Memory => None,
            BackendConfig::Redis(redis) => Some(shared::RedisBackend::start(redis, clock).await?),
        }))
    }

    /// In-process budgets only.
    pub(crate) fn memory() -> Self {
        Self(None)
    }

    /// The line of account `name`.
    pub(crate) fn line(&self, name: &str, config: &BudgetConfig) -> Arc<Line> {
        let store: Arc<dyn store::Store> = match &self.0 {
            None => Arc::new(store::memory::MemoryStore::new(
                name,
                store::Rules::of(config, config.interval()),
            )),
            Some(redis) => Arc::new(redis.line(name, config)),
        };
        Line::new(name, store, config)
    }

    /// The Redis backend, when the budgets live there (its connection also
    /// holds idempotency records).
    pub(crate) fn redis(&self) -> Option<&Arc<shared::RedisBackend>> {
        self.0.as_ref()
    }

    /// The backend's state, for `/healthz`.
    pub(crate) fn report(&self) -> BackendReport {
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
