//! In-process GCRA (governor) on tokio's clock, so tests drive it with a
//! paused runtime instead of sleeping.

use std::sync::Mutex;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::{BackendUnavailable, Decision, Limiter};
use crate::config::BudgetConfig;

/// governor's clock, read from tokio's (pausable) time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// One account's budget in this process.
pub struct LocalLimiter {
    gcra: Gcra,
    clock: TokioClock,
    /// Upstream pushback: no slot before this instant.
    not_before: Mutex<Option<Instant>>,
}

impl LocalLimiter {
    pub fn new(config: &BudgetConfig) -> Self {
        Self::with_interval(config.interval(), config.burst)
    }

    /// A limiter with emission interval `interval` and the given burst.
    pub fn with_interval(interval: Duration, burst: std::num::NonZeroU32) -> Self {
        let quota = Quota::with_period(interval)
            .expect("interval is at least the safety margin plus 1ms, never zero")
            .allow_burst(burst);
        let clock = TokioClock {
            origin: Instant::now(),
        };
        Self {
            gcra: RateLimiter::direct_with_clock(quota, clock),
            clock,
            not_before: Mutex::new(None),
        }
    }

    /// The synchronous decision, for benchmarks and the async wrapper.
    pub fn decide(&self) -> Decision {
        let now = Instant::now();
        let not_before = *self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = not_before
            && until > now
        {
            return Decision::Wait(until - now);
        }
        match self.gcra.check() {
            Ok(()) => Decision::Granted,
            Err(not_until) => Decision::Wait(not_until.wait_time_from(self.clock.now())),
        }
    }
}

impl LocalLimiter {
    /// No slot before `until` (a pushback, or a handover from another budget).
    pub fn hold_until(&self, until: Instant) {
        let mut not_before = self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        if not_before.is_none_or(|t| t < until) {
            *not_before = Some(until);
        }
    }
}

impl Limiter for LocalLimiter {
    fn acquire(&self) -> BoxFuture<'_, Result<Decision, BackendUnavailable>> {
        std::future::ready(Ok(self.decide())).boxed()
    }

    fn try_acquire_now(&self) -> Option<Decision> {
        Some(self.decide())
    }

    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()> {
        self.hold_until(Instant::now() + wait);
        std::future::ready(()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    const T: Duration = Duration::from_millis(1010);

    #[tokio::test(start_paused = true)]
    async fn first_call_is_granted_then_the_next_waits_one_interval() {
        let l = LocalLimiter::with_interval(T, NonZeroU32::MIN);
        assert_eq!(l.decide(), Decision::Granted);
        assert_eq!(l.decide(), Decision::Wait(T));
        tokio::time::advance(T / 2).await;
        assert_eq!(l.decide(), Decision::Wait(T - T / 2));
        tokio::time::advance(T / 2).await;
        assert_eq!(l.decide(), Decision::Granted);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_allows_that_many_after_idle() {
        let l = LocalLimiter::with_interval(T, NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert_eq!(l.decide(), Decision::Granted);
        }
        assert!(matches!(l.decide(), Decision::Wait(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_moves_the_next_slot() {
        let l = LocalLimiter::with_interval(T, NonZeroU32::MIN);
        l.pushback(Duration::from_secs(5)).await;
        assert_eq!(l.decide(), Decision::Wait(Duration::from_secs(5)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(l.decide(), Decision::Granted);
    }
}
