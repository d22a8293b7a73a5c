//! One account's line on the Redis backend, with its fallback: the shared
//! line in Redis while it answers, a per-replica line while it does not.
//!
//! - A command that fails is tried again (the same ticket: a retry never
//!   takes a second slot); only [`FAILURES_TO_DEGRADE`] failures in a row
//!   switch the replica to the fallback, so one reply delayed past the
//!   timeout is not an outage.
//! - A command whose answer was lost may have taken a slot: it counts as a
//!   slot taken when it was asked for.
//! - Handover, both ways, keeps what this replica knows: the local line
//!   starts no earlier than the last slot this replica could have been
//!   given on the shared one, nor before a pushback it received; back on
//!   Redis, the shared line is first pushed past this replica's last local
//!   grant and any pushback received meanwhile (the keys may have expired,
//!   or Redis restarted empty), and on a new connection (a failover to a
//!   node that may lack the latest writes) no slot comes within one
//!   interval of it.
//! - A waiting caller whose ticket the other line does not know is
//!   admitted there again by [`super::Line`] (the store answers `Gone`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::redis::StoreError;
use super::shared::{FAILURES_TO_DEGRADE, RETRY_PAUSE, RedisBackend};
use super::store::memory::MemoryStore;
use super::store::redis::{RedisLine, Reply};
use super::store::{Answer, Ask, BackendUnavailable, Rules, Store, duration};
use crate::config::RedisFallback;

/// What the account remembers across a switch of line.
#[derive(Debug, Default)]
struct Handover {
    /// The last command went to the local line.
    on_local: bool,
    /// The latest slot this replica could have been given on the shared
    /// line: grants, queued slots, commands whose answer was lost.
    shared_next: Option<Instant>,
    /// When the local line last granted a slot.
    last_local_grant: Option<Instant>,
    /// Latest upstream pushback (429) or late departure: no slot before this.
    pushed_until: Option<Instant>,
    /// `pushed_until` has not reached Redis (it was lost when it came).
    push_unsent: bool,
    /// The connection (generation) of the last shared command.
    connection: Option<u64>,
}

/// One account's line on the Redis backend.
pub struct SharedLine {
    backend: Arc<RedisBackend>,
    redis: RedisLine,
    /// The fallback at rate ÷ expected replicas (`local` mode only).
    local: MemoryStore,
    interval: Duration,
    handover: Mutex<Handover>,
}

fn later(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.max(b)))
}

impl SharedLine {
    pub(super) fn new(
        backend: Arc<RedisBackend>,
        redis: RedisLine,
        local: Rules,
        interval: Duration,
    ) -> Self {
        let local = MemoryStore::new(redis.account(), local);
        Self {
            backend,
            redis,
            local,
            interval,
            handover: Mutex::new(Handover::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Handover> {
        // Plain field updates only: a poisoned lock is still consistent.
        self.handover.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `command` on the shared line, tried again after a failure;
    /// `None` once degraded (the caller turns to the fallback).
    async fn shared<F, Fut>(&self, command: F) -> Option<Answer>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Reply, StoreError>>,
    {
        for attempt in 1..=FAILURES_TO_DEGRADE {
            if self.backend.is_degraded() {
                return None;
            }
            let asked = Instant::now();
            let result = match self.seed().await {
                Ok(()) => command().await,
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) => {
                    self.note(&reply.answer, asked);
                    return Some(reply.answer);
                }
                Err(e) => {
                    self.backend.failed();
                    // The script may have run: a slot taken when asked.
                    {
                        let mut h = self.lock();
                        h.shared_next = later(h.shared_next, asked + self.interval);
                    }
                    if attempt == FAILURES_TO_DEGRADE {
                        self.backend.degrade(&e);
                        return None;
                    }
                    tracing::debug!(error = %e, attempt, "Redis command failed; trying again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        None
    }

    /// Back from the fallback, or on a new connection: push the shared
    /// line past what this replica did or learnt meanwhile.
    async fn seed(&self) -> Result<(), StoreError> {
        let generation = self.backend.store().generation();
        let until = {
            let h = self.lock();
            let after_grant = h.last_local_grant.map(|t| t + self.interval);
            let from_local = h.on_local.then_some(after_grant).flatten();
            let unsent = (h.on_local || h.push_unsent)
                .then_some(h.pushed_until)
                .flatten();
            let reconnected = h.connection.is_some() && h.connection != generation;
            let from_reconnect = reconnected.then(|| Instant::now() + self.interval);
            from_local.max(unsent).max(from_reconnect)
        };
        if let Some(until) = until {
            let wait = until.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                self.redis.pushback(wait).await?;
            }
        }
        let mut h = self.lock();
        h.on_local = false;
        h.push_unsent = false;
        h.connection = generation;
        Ok(())
    }

    /// What a shared answer says about this replica's slots.
    fn note(&self, answer: &Answer, asked: Instant) {
        let next = match answer {
            Answer::Granted => asked + self.interval,
            Answer::Queued(wait) => Instant::now() + duration(*wait) + self.interval,
            Answer::Refused(..) | Answer::Gone => return,
        };
        let mut h = self.lock();
        h.shared_next = later(h.shared_next, next);
    }

    /// The fallback, entered once per outage from where the shared line was.
    fn local(&self) -> Result<&MemoryStore, BackendUnavailable> {
        if self.backend.fallback == RedisFallback::Deny {
            return Err(BackendUnavailable);
        }
        let mut h = self.lock();
        if !h.on_local {
            h.on_local = true;
            if let Some(next) = h.shared_next.max(h.pushed_until) {
                self.local.hold_until(next);
            }
        }
        Ok(&self.local)
    }

    fn local_answer(&self, answer: Answer) -> Answer {
        if answer == Answer::Granted {
            self.lock().last_local_grant = Some(Instant::now());
        }
        answer
    }
}

impl Store for SharedLine {
    fn admit<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
        async move {
            if let Some(answer) = self.shared(|| self.redis.admit(ask)).await {
                return Ok(answer);
            }
            let answer = self.local()?.admit_now(ask);
            Ok(self.local_answer(answer))
        }
        .boxed()
    }

    fn claim<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
        async move {
            if let Some(answer) = self.shared(|| self.redis.claim(&ask.ticket)).await {
                return Ok(answer);
            }
            let answer = self.local()?.claim(ask).await?;
            Ok(self.local_answer(answer))
        }
        .boxed()
    }

    fn leave<'a>(&'a self, ticket: &'a str) -> BoxFuture<'a, ()> {
        async move {
            if self.shared(|| self.redis.leave(ticket)).await.is_none() {
                self.local.leave(ticket).await;
            }
        }
        .boxed()
    }

    fn hold<'a>(&'a self, ticket: &'a str, hold: Duration) -> BoxFuture<'a, ()> {
        async move {
            self.local.hold(ticket, hold).await;
            self.shared(|| self.redis.hold(ticket, hold)).await;
        }
        .boxed()
    }

    fn left<'a>(&'a self, ticket: &'a str, late: bool) -> BoxFuture<'a, ()> {
        async move {
            self.local.left(ticket, late).await;
            if late {
                let mut h = self.lock();
                h.pushed_until = later(h.pushed_until, Instant::now() + self.interval);
            }
            if self
                .shared(|| self.redis.left(ticket, late))
                .await
                .is_none()
                && late
            {
                self.lock().push_unsent = true;
            }
        }
        .boxed()
    }

    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()> {
        async move {
            // Both lines: the local one matters if Redis is lost next, the
            // shared one gets it when Redis returns if it is lost now.
            self.local.pushback(wait).await;
            {
                let mut h = self.lock();
                let until = Instant::now() + wait;
                h.shared_next = later(h.shared_next, until);
                h.pushed_until = later(h.pushed_until, until);
            }
            if self.shared(|| self.redis.pushback(wait)).await.is_none() {
                self.lock().push_unsent = true;
            }
        }
        .boxed()
    }

    fn moved(&self) -> watch::Receiver<u64> {
        self.redis.moved()
    }
}
