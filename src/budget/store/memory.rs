//! The line in this process: the schedule's rules under a mutex, on tokio's
//! clock (so tests drive it with a paused runtime). Every command answers on
//! its first poll.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Answer, Ask, BackendUnavailable, Rules, Store, clock_reset, micros};
use crate::budget::schedule::Schedule;

/// One account's line in this process.
pub(crate) struct MemoryStore {
    account: String,
    rules: Rules,
    origin: Instant,
    schedule: Mutex<Schedule>,
    moved: watch::Sender<u64>,
}

impl MemoryStore {
    pub(crate) fn new(account: &str, rules: Rules) -> Self {
        Self {
            account: account.to_owned(),
            rules,
            origin: Instant::now(),
            schedule: Mutex::new(Schedule::default()),
            moved: watch::Sender::new(0),
        }
    }

    fn now(&self) -> i64 {
        micros(self.origin.elapsed())
    }

    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // Each command leaves the schedule whole before it can panic (it
        // does not): a poisoned lock is still consistent.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, (answer, reset): (Answer, bool)) -> Result<Answer, BackendUnavailable> {
        if reset {
            clock_reset(&self.account);
        }
        Ok(answer)
    }

    /// Admits, or answers for the ticket as it stands (see [`Schedule::admit`]).
    pub(crate) fn admit_now(&self, ask: &Ask) -> Answer {
        let now = self.now();
        let answer = self.lock().admit(&self.rules, now, ask);
        self.answer(answer).unwrap_or(Answer::Gone)
    }

    /// No grant before `at` (a handover from another store).
    pub(crate) fn hold_until(&self, at: Instant) {
        let wait = micros(at.saturating_duration_since(Instant::now()));
        if wait > 0 {
            let now = self.now();
            self.lock().pushback(&self.rules, now, wait);
        }
    }

    /// Waiting tickets.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting()
    }
}

impl Store for MemoryStore {
    fn admit<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
        let now = self.now();
        let answer = self.lock().admit(&self.rules, now, ask);
        futures::future::ready(self.answer(answer)).boxed()
    }

    fn claim<'a>(&'a self, ask: &'a Ask) -> BoxFuture<'a, Result<Answer, BackendUnavailable>> {
        let now = self.now();
        let answer = self.lock().claim(&self.rules, now, &ask.ticket);
        futures::future::ready(self.answer(answer)).boxed()
    }

    fn leave<'a>(&'a self, ticket: &'a str) -> BoxFuture<'a, ()> {
        let now = self.now();
        if self.lock().leave(&self.rules, now, ticket) {
            self.moved.send_modify(|n| *n = n.wrapping_add(1));
        }
        futures::future::ready(()).boxed()
    }

    fn hold<'a>(&'a self, ticket: &'a str, hold: Duration) -> BoxFuture<'a, ()> {
        let now = self.now();
        self.lock().hold(&self.rules, now, ticket, micros(hold));
        futures::future::ready(()).boxed()
    }

    fn left<'a>(&'a self, ticket: &'a str, late: bool) -> BoxFuture<'a, ()> {
        let now = self.now();
        if self.lock().left(&self.rules, now, ticket, late) {
            self.moved.send_modify(|n| *n = n.wrapping_add(1));
        }
        futures::future::ready(()).boxed()
    }

    fn pushback(&self, wait: Duration) -> BoxFuture<'_, ()> {
        let now = self.now();
        self.lock().pushback(&self.rules, now, micros(wait));
        futures::future::ready(()).boxed()
    }

    fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }
}
