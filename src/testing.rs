//! Hooks for the crate's tests, benchmarks and examples only: internals they
//! measure or drive directly. Not part of the supported surface.

use std::sync::Arc;

use crate::config::{BudgetConfig, Config};
use crate::startup::App;

pub use crate::budget::redis::{RedisStore, TIMEOUT, WallClock};
pub use crate::budget::schedule::{Answer, Ask, Refusal, Rules, Schedule};
pub use crate::budget::shared::RedisBackend;
pub use crate::budget::store::redis::RedisLine;
pub use crate::budget::{BudgetError, Rejection};
pub use crate::grpc::status::{CallError, code_for_http};
pub use crate::upstream::Reply;

/// [`App::build`] with this replica's wall clock `offset_ms` off the
/// system's (as a replica whose NTP is wrong sees it).
pub async fn build_with_clock_offset(config: Config, offset_ms: i64) -> anyhow::Result<App> {
    App::build_with(config, WallClock::offset_by_micros(offset_ms * 1000)).await
}

/// The rules benchmarks run the line with: burst 1, 60 s of patience, a
/// line of up to 10,000, at `interval`.
pub fn bench_rules(interval: std::time::Duration) -> Rules {
    Rules {
        interval: i64::try_from(interval.as_micros()).unwrap_or(i64::MAX),
        burst: 1,
        max_wait: 60_000_000,
        max_queue: 10_000,
        horizon: 400_000_000,
        grace: 50_000,
    }
}

/// The line of one account in Redis under `base` (`<base>`, `<base>:line`,
/// …), for tests of the script at its boundaries.
pub fn redis_line(store: Arc<RedisStore>, base: &str, rules: Rules) -> RedisLine {
    let moved = tokio::sync::watch::Sender::new(0);
    RedisLine::new(store, "test", base, "test:", rules, moved)
}

/// In-process lines for many accounts (the memory benchmark's per-account
/// state); closed when dropped.
pub struct MemoryLines(Vec<Arc<crate::budget::Line>>);

impl MemoryLines {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>, config: &BudgetConfig) -> Self {
        let backend = crate::budget::Backend::memory();
        Self(names.into_iter().map(|n| backend.line(n, config)).collect())
    }
}

impl Drop for MemoryLines {
    fn drop(&mut self) {
        self.0.iter().for_each(|line| line.close());
    }
}
