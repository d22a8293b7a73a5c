//! The accounts with queued batch work, `P ops:active` (a set; one key, any
//! Cluster slot), so a replica learns of work another accepted with one
//! read per poll instead of one command per configured account (there may
//! be 10,000). A submit adds its account after queueing; a drainer that
//! finds the queue empty removes it, then looks again and puts it back if
//! work came meanwhile, so work is never left out of the set.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::super::Unavailable;
use super::unavailable;
use crate::budget::redis::RedisStore;

/// How long one read of the set answers for every account.
const FRESH: Duration = Duration::from_millis(900);

/// This process' view of the set.
pub(crate) struct Active {
    key: String,
    /// The last read, and when it was made.
    seen: Mutex<(Option<Instant>, HashSet<String>)>,
    /// Held by the one caller reading the set again.
    reading: Semaphore,
}

impl Active {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            key: format!("{prefix}ops:active"),
            seen: Mutex::new((None, HashSet::new())),
            reading: Semaphore::new(1),
        }
    }

    /// Whether `account` had queued work at the last read (at most
    /// [`FRESH`] old; read again when older, by one caller for all).
    pub(super) async fn has(&self, store: &RedisStore, account: &str) -> Result<bool, Unavailable> {
        if let Some(has) = self.cached(account) {
            return Ok(has);
        }
        let _reading = self
            .reading
            .acquire()
            .await
            .map_err(|_| Unavailable("closed".into()))?;
        if let Some(has) = self.cached(account) {
            return Ok(has);
        }
        let key = self.key.clone();
        let members: Vec<String> =
            store
                .run(|mut conn| async move {
                    redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await
                })
                .await
                .map_err(unavailable)?;
        let mut seen = self.lock();
        *seen = (Some(Instant::now()), members.into_iter().collect());
        Ok(seen.1.contains(account))
    }

    fn cached(&self, account: &str) -> Option<bool> {
        let seen = self.lock();
        let fresh = seen.0.is_some_and(|at| at.elapsed() < FRESH);
        fresh.then(|| seen.1.contains(account))
    }

    /// `account` has queued work (after it was queued).
    pub(crate) async fn add(&self, store: &RedisStore, account: &str) -> Result<(), Unavailable> {
        let (key, member) = (self.key.clone(), account.to_owned());
        store
            .run(|mut conn| async move {
                redis::cmd("SADD")
                    .arg(key)
                    .arg(member)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map_err(unavailable)?;
        self.lock().1.insert(account.to_owned());
        Ok(())
    }

    /// `account`'s queue (`queue`, its stream) was found empty: out of the
    /// set, unless work came meanwhile.
    pub(crate) async fn quiet(
        &self,
        store: &RedisStore,
        account: &str,
        queue: String,
    ) -> Result<(), Unavailable> {
        let (key, member) = (self.key.clone(), account.to_owned());
        let left: i64 = store
            .run(|mut conn| async move {
                redis::cmd("SREM")
                    .arg(&key)
                    .arg(&member)
                    .query_async::<i64>(&mut conn)
                    .await?;
                redis::cmd("XLEN").arg(queue).query_async(&mut conn).await
            })
            .await
            .map_err(unavailable)?;
        if left > 0 {
            return self.add(store, account).await;
        }
        self.lock().1.remove(account);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Instant>, HashSet<String>)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_read_answers_for_every_account_until_it_is_fresh_no_more() {
        let active = Active::new("t:");
        *active.lock() = (Some(Instant::now()), HashSet::from(["a".to_owned()]));
        assert_eq!(
            (active.cached("a"), active.cached("b")),
            (Some(true), Some(false))
        );
        tokio::time::advance(FRESH - Duration::from_millis(1)).await;
        assert_eq!(active.cached("a"), Some(true));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(active.cached("a"), None, "read again once FRESH old");
    }
}
