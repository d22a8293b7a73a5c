//! The per-account budget: GCRA interval, burst and admission limits.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use super::ConfigError;

/// The per-account budget, checked.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BudgetConfig {
    pub rate_per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub safety_margin: Duration,
    pub max_wait: Duration,
    pub max_queue: NonZeroUsize,
    pub upstream_reserve: Duration,
}

/// The budget settings as given, before they are checked.
#[derive(Debug, Clone)]
pub(super) struct BudgetSettings {
    pub rate_per_second: u32,
    pub burst: u32,
    pub safety_margin: Duration,
    pub max_wait: Duration,
    pub max_queue: usize,
    pub upstream_reserve: Duration,
}

impl BudgetConfig {
    /// The emission interval T: 1/rate plus the safety margin.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.rate_per_second.get() + self.safety_margin
    }

    /// Checks the budget settings.
    pub(super) fn check(s: &BudgetSettings) -> Result<Self, ConfigError> {
        const RATE: &str = "--rate-per-second (GATEWAY_RATE_PER_SECOND)";
        let rate_per_second = NonZeroU32::new(s.rate_per_second)
            .ok_or_else(|| ConfigError::new(RATE, "must be at least 1"))?;
        if s.rate_per_second > 1000 {
            return Err(ConfigError::new(RATE, "must be at most 1000"));
        }
        let burst = NonZeroU32::new(s.burst)
            .ok_or_else(|| ConfigError::new("--burst (GATEWAY_BURST)", "must be at least 1"))?;
        let max_queue = NonZeroUsize::new(s.max_queue).ok_or_else(|| {
            ConfigError::new("--max-queue (GATEWAY_MAX_QUEUE)", "must be at least 1")
        })?;
        if s.safety_margin > Duration::from_secs(10) {
            return Err(ConfigError::new(
                "--safety-margin (GATEWAY_SAFETY_MARGIN)",
                "must be at most 10s",
            ));
        }
        if s.max_wait.is_zero() {
            return Err(ConfigError::new(
                "--max-wait (GATEWAY_MAX_WAIT)",
                "must be greater than zero",
            ));
        }
        Ok(Self {
            rate_per_second,
            burst,
            safety_margin: s.safety_margin,
            max_wait: s.max_wait,
            max_queue,
            upstream_reserve: s.upstream_reserve,
        })
    }
}

#[cfg(test)]
impl BudgetConfig {
    /// The documented defaults with `max_queue`, through the one builder
    /// (unit tests of the line).
    pub(crate) fn with_max_queue(max_queue: usize) -> Self {
        let key =
            crate::keys::KeySource::Fixed(crate::keys::ApiKey::new("k").expect("a valid key"));
        let endpoint = super::endpoint_url("https://x.example").expect("a valid URL");
        super::Config::builder()
            .account(super::AccountConfig::new("test", endpoint, key))
            .max_queue(max_queue)
            .build()
            .expect("the defaults are valid")
            .budget
    }
}
