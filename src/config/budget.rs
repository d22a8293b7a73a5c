//! The per-account budget: GCRA interval, burst and admission limits.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use super::{ConfigError, defaults};

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

    /// Checks the budget settings against [`defaults`]' bounds.
    pub(super) fn check(s: &BudgetSettings) -> Result<Self, ConfigError> {
        const RATE: &str = "--rate-per-second (GATEWAY_RATE_PER_SECOND)";
        const BURST: &str = "--burst (GATEWAY_BURST)";
        const QUEUE: &str = "--max-queue (GATEWAY_MAX_QUEUE)";
        let rate_per_second = NonZeroU32::new(s.rate_per_second)
            .ok_or_else(|| ConfigError::new(RATE, "must be at least 1"))?;
        at_most(RATE, s.rate_per_second, defaults::MAX_RATE_PER_SECOND)?;
        let burst = NonZeroU32::new(s.burst)
            .ok_or_else(|| ConfigError::new(BURST, "must be at least 1"))?;
        at_most(BURST, s.burst, defaults::MAX_BURST)?;
        let max_queue = NonZeroUsize::new(s.max_queue)
            .ok_or_else(|| ConfigError::new(QUEUE, "must be at least 1"))?;
        at_most(QUEUE, s.max_queue, defaults::MAX_MAX_QUEUE)?;
        duration_at_most(
            "--safety-margin (GATEWAY_SAFETY_MARGIN)",
            s.safety_margin,
            defaults::MAX_SAFETY_MARGIN,
        )?;
        if s.max_wait.is_zero() {
            return Err(ConfigError::new(
                "--max-wait (GATEWAY_MAX_WAIT)",
                "must be greater than zero",
            ));
        }
        duration_at_most(
            "--max-wait (GATEWAY_MAX_WAIT)",
            s.max_wait,
            defaults::MAX_MAX_WAIT,
        )?;
        duration_at_most(
            "--upstream-reserve (GATEWAY_UPSTREAM_RESERVE)",
            s.upstream_reserve,
            defaults::MAX_UPSTREAM_RESERVE,
        )?;
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

/// `value` ≤ `max`, or a refusal naming `setting`.
pub(super) fn at_most<T: PartialOrd + std::fmt::Display>(
    setting: &'static str,
    value: T,
    max: T,
) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::new(setting, format!("must be at most {max}")));
    }
    Ok(())
}

/// `value` ≤ `max`, or a refusal naming `setting` (durations as humantime).
pub(super) fn duration_at_most(
    setting: &'static str,
    value: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::new(
            setting,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
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
