//! The connection to Redis that every account's line shares
//! ([`super::store::redis`] runs the line's script on it), and this
//! process' wall clock, used only to report skew.
//!
//! [`RedisStore`] owns the connection. It never waits for Redis on a call's
//! behalf: every command has a short timeout. A command that fails drops
//! the connection so that only the background probe ([`super::shared`])
//! reconnects; one that only timed out keeps it (a late reply is discarded
//! when it comes), so one slow reply does not cost the connection. It does not use the `redis` crate's
//! `ConnectionManager`: that one keeps a connection whose commands time out
//! (a half-open TCP connection after Redis moved) and reconnects with its own
//! backoff, both of which could keep a replica off the shared budget long
//! after Redis is back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::time::{SystemTime, UNIX_EPOCH};

use super::connect::{Conn, Connector};
use super::store::redis::line_script;
use crate::config::RedisConfig;

/// Longest a command may take. Loopback or in-cluster Redis answers in well
/// under a millisecond; this only bounds a dead or stuck one.
pub const TIMEOUT: Duration = Duration::from_millis(250);
/// Longest a (re)connect may take: TCP, TLS, AUTH and loading the script.
/// Only the probe and startup connect, never a call, so this is a bit longer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why Redis could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer from the budget script: {0:?}")]
    Answer(Vec<i64>),
}

/// The connection to Redis, shared by every account of the process.
pub struct RedisStore {
    connector: Connector,
    timeout: Duration,
    /// The live connection and its generation, so a failure drops only the
    /// connection it happened on, not a newer one.
    conn: Mutex<Option<(u64, Conn)>>,
    generation: AtomicU64,
}

impl RedisStore {
    /// A store for the configured Redis (any topology); does not connect yet.
    pub fn new(config: &RedisConfig, timeout: Duration) -> Self {
        Self {
            connector: Connector::new(config, CONNECT_TIMEOUT, timeout),
            timeout,
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// The live connection's generation (one more at every connect).
    pub(crate) fn generation(&self) -> Option<u64> {
        self.lock().as_ref().map(|(g, _)| *g)
    }

    /// Whether a connection is up (as far as the last command knows).
    pub fn is_connected(&self) -> bool {
        self.lock().is_some()
    }

    /// Opens a fresh connection and loads the script on it, so decisions are
    /// one EVALSHA round trip, also right after a Redis restart (a NOSCRIPT
    /// answer would still reload it).
    pub async fn connect(&self) -> Result<(), StoreError> {
        let connect = async {
            let mut conn = self.connector.open().await?;
            line_script().prepare_invoke().load_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(r) => r.map_err(StoreError::from)?,
            Err(_) => return Err(StoreError::Timeout(CONNECT_TIMEOUT)),
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock() = Some((generation, conn));
        Ok(())
    }

    /// Redis' clock in microseconds since the epoch, on the live connection.
    pub async fn time(&self) -> Result<i64, StoreError> {
        self.run(|mut c| async move { time(&mut c).await }).await
    }

    /// One PING round trip on the live connection (the benchmark's yardstick).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
            .await
    }

    /// One keyed read (`EXISTS key`), routed as the script on `key` is: the
    /// yardstick on a Cluster, where PING goes to every node.
    pub async fn keyed_round_trip(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.run(|mut c| async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Drops the connection (tests use it to simulate a lost one).
    pub fn disconnect(&self) {
        *self.lock() = None;
    }

    /// The connector, for the subscriber's own connection.
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Runs one command on the live connection, bounded by the timeout. A
    /// failure drops that connection (the probe reconnects, calls do not
    /// wait); a timeout does not.
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (generation, conn) = self.lock().clone().ok_or(StoreError::NotConnected)?;
        let result = self.bounded(command(conn)).await;
        // A reply that only came late (the connection's own response
        // timeout, or ours) keeps the connection.
        if matches!(&result, Err(StoreError::Redis(e)) if !e.is_timeout()) {
            let mut live = self.lock();
            if live.as_ref().is_some_and(|(g, _)| *g == generation) {
                *live = None;
            }
        }
        result
    }

    async fn bounded<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Conn)>> {
        // Every update is a single assignment: a poisoned lock is still consistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn time(conn: &mut Conn) -> redis::RedisResult<i64> {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1_000_000 + micros)
}

/// This process' wall clock, as the Redis backend reads it. Budget decisions
/// never do (they use Redis `TIME`, and tokio's monotonic clock for sleeping);
/// it only measures the skew reported on `/healthz`. The offset lets tests run
/// replicas whose clocks disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    offset_us: i64,
}

impl WallClock {
    /// The system clock shifted by `offset_us` microseconds (negative: behind).
    pub fn offset_by_micros(offset_us: i64) -> Self {
        Self { offset_us }
    }

    /// Microseconds since the Unix epoch, as this clock reads.
    fn now_micros(&self) -> i64 {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since.as_micros())
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_us)
    }
}

/// Redis' clock minus this process' wall clock, measured around one `TIME`
/// round trip (the local reading is taken half-way).
pub fn skew_micros(redis_now_us: i64, sent_us: i64, received_us: i64) -> i64 {
    redis_now_us - (sent_us + (received_us - sent_us) / 2)
}

/// Reads `TIME` and returns the skew against `clock`.
pub async fn measure_skew(store: &RedisStore, clock: WallClock) -> Result<i64, StoreError> {
    let sent = clock.now_micros();
    let redis_now = store.time().await?;
    Ok(skew_micros(redis_now, sent, clock.now_micros()))
}
