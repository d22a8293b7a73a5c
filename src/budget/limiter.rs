//! The GCRA behind a line, wherever it lives: the [`Limiter`] trait and its
//! answers.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

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
