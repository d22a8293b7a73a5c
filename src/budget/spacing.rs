//! Spacing on arrivals, across replicas. The schedule spaces *grants*; the
//! vendor counts *arrivals*. A request that leaves later than its grant by
//! more than the line's slack (a cold connection, a dropped SYN, a starved
//! thread) would arrive closer than the interval to the next one, granted
//! on time, maybe on another replica. So the moment of sending is measured
//! where it happens (the connection asks for the request's body once it is
//! connected and writing the request: the first poll of the body), and:
//!
//! - while a granted request is *held up* past its slack, its replica tells
//!   the store so every interval/2 (`hold`): no replica is granted a slot
//!   while it is held, and a hold lapses on its own if the replica dies;
//! - when it finally *leaves late*, the store moves the next slot to one
//!   interval after that moment (`left`), for every replica;
//! - a request sent on time costs nothing beyond its grant.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until};

use super::line::{Line, Turn};
use crate::telemetry::metrics;

/// The sending time of one upstream attempt.
#[derive(Clone)]
pub(crate) struct SendClock(Arc<Inner>);

struct Inner {
    /// A send after this instant is late; `None`: never late.
    late_after: Option<Instant>,
    /// The ticket the attempt's slot was granted to.
    ticket: String,
    sent_at: OnceLock<Instant>,
    sent: Notify,
}

impl SendClock {
    /// A clock for an attempt that is late if it leaves after `late_after`.
    fn new(late_after: Option<Instant>, ticket: String) -> Self {
        Self(Arc::new(Inner {
            late_after,
            ticket,
            sent_at: OnceLock::new(),
            sent: Notify::new(),
        }))
    }

    /// The request body, stamping this clock when the connection first asks for it.
    pub(crate) fn body(&self, bytes: Bytes) -> reqwest::Body {
        reqwest::Body::wrap(ClockedBody {
            bytes: Some(bytes),
            clock: self.clone(),
        })
    }

    /// When the request left, once it has.
    fn sent_at(&self) -> Option<Instant> {
        self.0.sent_at.get().copied()
    }

    /// Completes once the request has left.
    async fn sent(&self) -> Instant {
        loop {
            let notified = self.0.sent.notified();
            if let Some(at) = self.sent_at() {
                return at;
            }
            notified.await;
        }
    }

    fn is_late(&self, at: Instant) -> bool {
        self.0.late_after.is_some_and(|limit| at > limit)
    }

    fn stamp(&self) {
        if self.0.sent_at.set(Instant::now()).is_ok() {
            self.0.sent.notify_one();
        }
    }
}

impl Line {
    /// The send clock of the attempt `turn` was granted for.
    pub(crate) fn send_clock(&self, turn: Turn) -> SendClock {
        let late_after = self.slack.map(|slack| turn.granted_at + slack);
        SendClock::new(late_after, turn.ticket)
    }

    /// Runs one upstream `attempt`. If its request has not left when its
    /// slack runs out, holds the account's line (on every replica) until
    /// it leaves, then moves the next slot to one interval after it.
    pub(crate) async fn keep_spacing<T>(
        &self,
        attempt: impl Future<Output = T>,
        clock: &SendClock,
    ) -> T {
        let Some(late_after) = clock.0.late_after else {
            return attempt.await;
        };
        let mut attempt = std::pin::pin!(attempt);
        tokio::select! {
            biased;
            outcome = &mut attempt => {
                if let Some(at) = clock.sent_at().filter(|at| clock.is_late(*at)) {
                    self.left_late(clock, at).await;
                }
                return outcome;
            }
            () = sleep_until(late_after) => {}
        }
        if let Some(at) = clock.sent_at() {
            if clock.is_late(at) {
                self.left_late(clock, at).await;
            }
            return attempt.await;
        }
        // Held up on its way out: hold the line until it leaves.
        let holding = async {
            loop {
                self.store.hold(&clock.0.ticket, self.interval).await;
                tokio::select! {
                    biased;
                    at = clock.sent() => return at,
                    () = sleep(self.interval / 2) => {}
                }
            }
        };
        tokio::select! {
            biased;
            outcome = &mut attempt => {
                match clock.sent_at() {
                    Some(at) => self.left_late(clock, at).await,
                    // It never left: the line goes on.
                    None => self.store.left(&clock.0.ticket, false).await,
                }
                outcome
            }
            at = holding => {
                self.left_late(clock, at).await;
                attempt.await
            }
        }
    }

    /// The request left at `at`, late: no slot within one interval of it.
    async fn left_late(&self, clock: &SendClock, at: Instant) {
        tracing::debug!(
            account = %self.name,
            late_ms = at.elapsed().as_millis() as u64,
            "upstream request left late: next slot moved"
        );
        metrics::late_send(&self.name);
        self.store.left(&clock.0.ticket, true).await;
    }
}

/// A request body of known length (sent with `Content-Length`) that stamps
/// its [`SendClock`] when first polled.
struct ClockedBody {
    bytes: Option<Bytes>,
    clock: SendClock,
}

impl Body for ClockedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.clock.stamp();
        Poll::Ready(self.bytes.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use http_body_util::BodyExt;
    use std::time::Duration;

    fn body(bytes: &'static [u8]) -> (SendClock, ClockedBody, Instant) {
        let now = Instant::now();
        let clock = SendClock::new(Some(now + Duration::from_millis(5)), "t".to_owned());
        let body = ClockedBody {
            bytes: Some(Bytes::from_static(bytes)),
            clock: clock.clone(),
        };
        (clock, body, now)
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_on_time_is_stamped_and_not_late() {
        let (clock, body, now) = body(b"{}");
        assert_eq!(body.size_hint().exact(), Some(2));
        assert_eq!(clock.sent_at(), None);
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"{}");
        assert_eq!(clock.sent_at(), Some(now));
        assert!(!clock.is_late(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_send_wakes_whoever_waits_for_it() {
        let (clock, body, now) = body(b"{}");
        let waiting = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sent().await }
        });
        tokio::time::advance(Duration::from_millis(60)).await;
        body.collect().await.unwrap();
        let at = waiting.await.unwrap();
        assert_eq!(at, now + Duration::from_millis(60));
        assert!(clock.is_late(at));
        // Asked after the fact, it answers at once.
        assert_eq!(clock.sent().now_or_never(), Some(at));
    }

    use crate::budget::store::memory::MemoryStore;
    use crate::budget::store::{Rules, Store};
    use crate::config::BudgetConfig;
    use crate::domain::Caller;

    /// The default interval: 1/s with a 10 ms margin (slack 5 ms).
    const T: Duration = Duration::from_millis(1010);
    const FAR: Duration = Duration::from_secs(3600);

    fn line() -> Arc<Line> {
        let c = BudgetConfig::with_max_queue(100);
        let store = MemoryStore::new("test", Rules::of(&c, c.interval()));
        Line::new("test", Arc::new(store) as Arc<dyn Store>, &c)
    }

    /// Takes the free slot; returns the attempt's clock.
    async fn granted(q: &Line) -> SendClock {
        let turn = q
            .wait_turn(&Caller::anonymous(), Instant::now() + FAR)
            .await;
        q.send_clock(turn.unwrap())
    }

    /// A caller waiting in a task of its own; yields when it was served.
    fn waiting(q: &Arc<Line>) -> tokio::task::JoinHandle<Instant> {
        let q = Arc::clone(q);
        tokio::spawn(async move {
            q.wait_turn(&Caller::anonymous(), Instant::now() + FAR)
                .await
                .unwrap();
            Instant::now()
        })
    }

    /// An attempt whose request leaves after `after` (stamped as the
    /// connection would), or never, and that ends `then` later.
    async fn attempt(clock: &SendClock, after: Option<Duration>, ends: Duration) {
        if let Some(after) = after {
            tokio::time::sleep(after).await;
            clock.stamp();
            tokio::time::sleep(ends).await;
        } else {
            tokio::time::sleep(ends).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_up_holds_every_grant_until_it_leaves_then_one_interval() {
        let q = line();
        let start = Instant::now();
        let clock = granted(&q).await;
        let next = waiting(&q);
        // Held up on its way out for three intervals (a SYN dropped twice).
        q.keep_spacing(attempt(&clock, Some(T * 3), T / 10), &clock)
            .await;
        assert_eq!(
            next.await.unwrap() - start,
            T * 4,
            "one interval after it left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_leaves_lets_the_line_go_when_it_gives_up() {
        let q = line();
        let start = Instant::now();
        let clock = granted(&q).await;
        let next = waiting(&q);
        // No connection for two intervals, then the attempt gives up.
        q.keep_spacing(attempt(&clock, None, T * 2), &clock).await;
        assert_eq!(next.await.unwrap() - start, T * 2, "as it gave up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_a_little_late_moves_the_next_slot_to_one_interval_after_it() {
        let q = line();
        let start = Instant::now();
        let clock = granted(&q).await;
        let next = waiting(&q);
        // Out 60 ms after its grant, past the 5 ms slack.
        let late = Duration::from_millis(60);
        q.keep_spacing(attempt(&clock, Some(late), T / 10), &clock)
            .await;
        assert_eq!(next.await.unwrap() - start, late + T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_on_time_costs_the_line_nothing() {
        let q = line();
        let start = Instant::now();
        let clock = granted(&q).await;
        let next = waiting(&q);
        q.keep_spacing(attempt(&clock, Some(Duration::ZERO), T * 2), &clock)
            .await;
        assert_eq!(next.await.unwrap() - start, T, "at its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_at_the_end_of_its_slack_is_on_time_and_just_after_is_late() {
        let (clock, _, now) = body(b"{}");
        assert!(!clock.is_late(now + Duration::from_millis(5)));
        assert!(clock.is_late(now + Duration::from_millis(5) + Duration::from_nanos(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_body_says_it_has_ended_once_its_bytes_are_out() {
        let (_, mut body, _) = body(b"{}");
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"{}"));
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_within_its_slack_costs_the_line_nothing() {
        let q = line();
        let start = Instant::now();
        let clock = granted(&q).await;
        let next = waiting(&q);
        // Out 3 ms after its grant, within the 5 ms slack.
        let within = Duration::from_millis(3);
        q.keep_spacing(attempt(&clock, Some(within), T / 10), &clock)
            .await;
        assert_eq!(next.await.unwrap() - start, T, "at its slot");
    }
}
