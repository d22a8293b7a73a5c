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

/// Idempotency records in Redis (keys under `prefix`) as the request path
/// claims and ends them, for tests of what one call's end does to a call
/// that took its record over.
pub struct RedisRecords(crate::idempotency::RedisRecords);

/// A record a call holds.
pub struct Held(crate::idempotency::Held);

/// What a claim found instead of running the call.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Another call runs it.
    Running,
    /// It ended with this gRPC code.
    Done(i32),
    /// The request id names another request.
    Reused,
}

impl RedisRecords {
    pub fn new(store: Arc<RedisStore>, prefix: &str) -> Self {
        let changes = tokio::sync::watch::Sender::new(0);
        Self(crate::idempotency::RedisRecords::new(
            store, prefix, changes,
        ))
    }

    /// Claims `request_id` (the anonymous caller on account `default`, one
    /// fixed request) for a call whose lease lasts `lease`.
    pub async fn claim(&self, request_id: &str, lease: std::time::Duration) -> Result<Held, Taken> {
        use crate::idempotency::{Fingerprint, Found, Key, Store};
        let id = crate::domain::RequestId::parse("request_id", request_id.into())
            .ok()
            .flatten()
            .expect("a valid request id");
        let key = Key::new("default", "anonymous", &id);
        let association =
            crate::domain::Association::try_from(crate::pb::DeleteAssociationRequest {
                resource_type: crate::pb::ResourceType::Number as i32,
                channel: crate::pb::Channel::Sms as i32,
                application_id: "app".into(),
                resource_id: "n-1".into(),
                ..Default::default()
            })
            .expect("a valid request");
        let fingerprint = Fingerprint::of(&association, false);
        match self.0.claim(&key, fingerprint, lease).await {
            Ok(Found::Claimed { token, .. }) => {
                Ok(Held(crate::idempotency::Held::new(key, fingerprint, token)))
            }
            Ok(Found::Running { .. }) => Err(Taken::Running),
            Ok(Found::Done(status)) => Err(Taken::Done(status.code)),
            Ok(Found::Reused) => Err(Taken::Reused),
            Err(_) => panic!("Redis did not answer the claim"),
        }
    }

    /// Ends what `held` holds with gRPC `code`.
    pub async fn finish(&self, held: &Held, code: i32) {
        use crate::idempotency::{State, Store};
        let status = tonic_types::pb::Status {
            code,
            ..Default::default()
        };
        let ended = self.0.finish(&held.0, Some(State::Done(status))).await;
        assert!(ended.is_ok(), "Redis did not answer the finish");
    }
}

/// The set of accounts with queued batch work in Redis
/// (`<prefix>ops:active`), for tests of how a drainer leaves it.
pub struct ActiveAccounts(crate::operations::redis::active::Active);

impl ActiveAccounts {
    pub fn new(prefix: &str) -> Self {
        Self(crate::operations::redis::active::Active::new(prefix))
    }

    /// `account` has queued work.
    pub async fn add(&self, store: &RedisStore, account: &str) -> Result<(), String> {
        self.0.add(store, account).await.map_err(|e| e.0)
    }

    /// `account`'s queue (the stream `queue`) was found empty.
    pub async fn quiet(
        &self,
        store: &RedisStore,
        account: &str,
        queue: &str,
    ) -> Result<(), String> {
        self.0
            .quiet(store, account, queue.to_owned())
            .await
            .map_err(|e| e.0)
    }
}
