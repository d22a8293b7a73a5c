//! The per-account budget: a FIFO of waiters ([`queue`]) in front of a GCRA
//! limiter behind the [`Limiter`] trait ([`local`] in process; a Redis one
//! slots in for several replicas).
//!
//! A call asks [`AccountQueue::wait_turn`] for its turn. Admission is decided
//! at once from the queue ahead and the next known slot, so a call that cannot
//! be served before its deadline is refused immediately instead of timing out
//! in line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::BudgetConfig;

pub mod fair;
pub mod local;
pub mod queue;

pub use fair::Caller;
pub use queue::{AccountQueue, Turn};

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
    /// Moves the next slot to at least now + `wait` (upstream 429 pushback).
    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()>;
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
}

impl Budget {
    /// In-process budgets, one GCRA per account.
    pub fn memory<'a>(config: &BudgetConfig, accounts: impl IntoIterator<Item = &'a str>) -> Self {
        Self::with_limiters(
            config,
            accounts.into_iter().map(|name| {
                (
                    name.to_owned(),
                    Arc::new(local::LocalLimiter::new(config)) as _,
                )
            }),
        )
    }

    /// Budgets over the given limiters; spawns each account's dispatcher.
    pub fn with_limiters(
        config: &BudgetConfig,
        limiters: impl IntoIterator<Item = (String, Arc<dyn Limiter>)>,
    ) -> Self {
        let accounts = limiters
            .into_iter()
            .map(|(name, limiter)| {
                let queue = AccountQueue::spawn(&name, limiter, config);
                (name, queue)
            })
            .collect();
        Self { accounts }
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
