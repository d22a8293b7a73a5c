//! Refusal logs that survive a flood. A caller in a retry storm can send tens
//! of thousands of calls a second that the gateway refuses at once (budget,
//! invalid request, authentication); one log line each would cost more than
//! the refusal and drown the lines that matter. So refusals of one kind
//! (account, caller label, reason) are logged the first time in full, then
//! only counted: [`RefusalLog::summarize`], run every [`SUMMARY_INTERVAL`]
//! and at shutdown, writes one line per kind with the count held back. A
//! kind with nothing held back over an interval is forgotten, so its next
//! refusal is logged in full again. Served calls are not refusals: each
//! keeps its own line.
//!
//! A mechanism: imports nothing of the crate.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How often held-back refusals are summarized.
pub(crate) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Most kinds tracked at once. Kinds are bounded labels (configured accounts
/// × caller labels × a fixed set of reasons), so this is a guard: a refusal
/// of a kind beyond it is logged in full, never dropped.
const MAX_KINDS: usize = 1024;

/// One kind of refusal and how many were held back since its last line.
#[derive(Debug)]
struct Kind {
    account: Box<str>,
    caller: Box<str>,
    reason: &'static str,
    held: u64,
}

/// The kinds of refusal seen lately. Shared by every call (an `Arc` in the
/// service); the lock is held for a short scan, never across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    kinds: Mutex<Vec<Kind>>,
}

/// A summary line's content: a kind and the refusals held back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) account: Box<str>,
    pub(crate) caller: Box<str>,
    pub(crate) reason: &'static str,
    pub(crate) count: u64,
}

impl RefusalLog {
    /// Whether this refusal is to be logged now: the first of its kind since
    /// the kind was last forgotten. Otherwise it is counted for the summary.
    pub(crate) fn log_now(&self, account: &str, caller: &str, reason: &'static str) -> bool {
        let mut kinds = self.lock();
        let seen = kinds
            .iter_mut()
            .find(|k| k.reason == reason && *k.account == *account && *k.caller == *caller);
        if let Some(kind) = seen {
            kind.held += 1;
            return false;
        }
        if kinds.len() < MAX_KINDS {
            kinds.push(Kind {
                account: account.into(),
                caller: caller.into(),
                reason,
                held: 0,
            });
        }
        true
    }

    /// Takes the counts held back since the last call, and forgets the
    /// kinds that had none (their next refusal is logged in full).
    pub(crate) fn take(&self) -> Vec<Held> {
        let mut kinds = self.lock();
        let mut held = Vec::new();
        kinds.retain_mut(|k| {
            if k.held == 0 {
                return false;
            }
            held.push(Held {
                account: k.account.clone(),
                caller: k.caller.clone(),
                reason: k.reason,
                count: std::mem::take(&mut k.held),
            });
            true
        });
        held
    }

    /// Logs one line per kind with refusals held back since the last call.
    pub(crate) fn summarize(&self) {
        for h in self.take() {
            tracing::warn!(
                account = &*h.account,
                caller = &*h.caller,
                refusal = h.reason,
                refused = h.count,
                interval_s = SUMMARY_INTERVAL.as_secs(),
                "refusals held back: more calls refused like the first one logged"
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Kind>> {
        // A panic while holding it cannot leave the counts inconsistent.
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(account: &str, caller: &str, reason: &'static str, count: u64) -> Held {
        Held {
            account: account.into(),
            caller: caller.into(),
            reason,
            count,
        }
    }

    #[test]
    fn the_first_of_a_kind_is_logged_then_the_rest_counted_per_interval() {
        let log = RefusalLog::default();
        assert!(log.log_now("a", "anonymous", "deadline"));
        for _ in 0..999 {
            assert!(!log.log_now("a", "anonymous", "deadline"));
        }
        // Another account, caller or reason is another kind.
        assert!(log.log_now("b", "anonymous", "deadline"));
        assert!(log.log_now("a", "billing", "deadline"));
        assert!(log.log_now("a", "anonymous", "queue_full"));
        assert!(!log.log_now("a", "anonymous", "queue_full"));
        assert_eq!(
            log.take(),
            [
                held("a", "anonymous", "deadline", 999),
                held("a", "anonymous", "queue_full", 1)
            ]
        );
        // Still refused in the next interval: counted, not logged.
        assert!(!log.log_now("a", "anonymous", "deadline"));
        assert!(log.log_now("b", "anonymous", "deadline"), "b was forgotten");
        assert_eq!(log.take(), [held("a", "anonymous", "deadline", 1)]);
        // A quiet interval forgets the kind: the next one is logged again.
        assert_eq!(log.take(), []);
        assert!(log.log_now("a", "anonymous", "deadline"));
    }

    #[test]
    fn kinds_beyond_the_guard_are_logged_one_by_one() {
        let log = RefusalLog::default();
        for i in 0..MAX_KINDS {
            assert!(log.log_now(&i.to_string(), "c", "deadline"));
        }
        assert!(log.log_now("one more", "c", "deadline"));
        assert!(log.log_now("one more", "c", "deadline"));
    }
}
