//! Where an account's line lives: [`memory`] in this process, or [`redis`]
//! for every replica at once (with its fallback in [`super::shared`]). Both
//! run the same rules ([`super::schedule`]) on their own clock; a replica
//! sends durations ("useful for another 800 ms"), never its clock, and gets
//! durations back ("your slot comes in 450 ms at the latest").

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

pub(crate) use super::schedule::{Answer, Ask, Refusal, Rules};
use crate::config::BudgetConfig;

pub(crate) mod memory;
pub(crate) mod redis;

/// The shared state behind a budget could not be reached and no fallback applies.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("budget backend unavailable")]
pub struct BackendUnavailable;

/// Longest upstream pushback honoured (the upstream caps `Retry-After` there).
pub(crate) const MAX_PUSHBACK: Duration = Duration::from_secs(300);
/// Shortest time an unclaimed turn is kept for its caller's replica.
const MIN_GRACE: Duration = Duration::from_millis(100);

/// One account's line, wherever it lives. Every command is atomic on the
/// store's side; `admit` and `claim` may be retried with the same ticket
/// (the answer is the ticket's state, never a second slot).
pub(crate) trait Store: Send + Sync + 'static {
    /// Admission: granted now, queued with the slot it will have at the
    /// latest, or refused with when a slot would come.
    fn admit<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>>;
    /// The ticket's turn, if it has come; else when it will.
    fn claim<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>>;
    /// The ticket's caller left: the line behind it moves up.
    fn leave<'a>(&'a self, ticket: &'a str) -> BoxFuture<'a, ()>;
    /// The ticket's granted request has not left yet: no grant for anyone
    /// while it has not, for `hold` at most.
    fn hold<'a>(&'a self, ticket: &'a str, hold: Duration) -> BoxFuture<'a, ()>;
    /// The ticket's granted request left now (late: no grant within one
    /// interval of now), or never will.
    fn left<'a>(&'a self, ticket: &'a str, late: bool) -> BoxFuture<'a, ()>;
    /// Upstream pushback (429): no grant before now + `wait`.
    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()>;
    /// Changes whenever the line may have moved up for a waiting caller (a
    /// caller left, the store switched): waiters then ask again at once.
    fn moved(&self) -> watch::Receiver<u64>;
}

impl Rules {
    /// The rules of an account with this budget, at `interval` (the
    /// account's, or longer for a per-replica fallback).
    pub(crate) fn of(config: &BudgetConfig, interval: Duration) -> Self {
        let interval_us = micros(interval).max(1);
        let max_wait = micros(config.max_wait);
        Self {
            interval: interval_us,
            burst: i64::from(config.burst.get()),
            max_wait,
            max_queue: i64::try_from(config.max_queue.get()).unwrap_or(i64::MAX),
            horizon: max_wait
                .saturating_add(micros(MAX_PUSHBACK))
                .saturating_add(interval_us.saturating_mul(2)),
            grace: interval_us.saturating_mul(2).max(micros(MIN_GRACE)),
        }
    }
}

/// A duration in µs, saturating.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A duration from µs (negative: zero).
pub(crate) fn duration(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// A ticket id unique across replicas: this process' random id and a count.
pub(crate) fn new_ticket() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    format!("{process:016x}-{n:x}")
}

/// Logs and counts a clock found to have stepped back (a `tat` or hold
/// beyond any horizon a command could set), which the store reset.
pub(crate) fn clock_reset(account: &str) {
    crate::telemetry::metrics::clock_reset(account);
    tracing::warn!(
        account,
        "the budget's next slot was further ahead than any wait the gateway sets: \
         a clock stepped back (NTP step, failover to a lagging node); reset to now"
    );
}
