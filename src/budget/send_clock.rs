//! When an upstream request actually leaves, measured where it happens: the
//! connection asks for the request's body once it is connected and writing
//! the request, so the first poll of the body is the moment of sending (a
//! cold connection's connect and handshake come before it).
//!
//! The budget spaces *grants*; the vendor sees *arrivals*. A request that
//! leaves later than its grant by more than the budget's slack (a cold
//! connection, a starved thread) would arrive closer than the interval to the
//! next one, sent on time. [`SendClock::late`] says so while the request is
//! still in flight, early enough to move the next slot (see
//! [`Line::sent_late`]); and the turn's
//! [`Departure`] learns the moment, so the replica grants no other slot while
//! the request has not left.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::line::{Line, Turn};
use super::transit::Departure;

/// The sending time of one upstream attempt.
#[derive(Clone)]
pub(crate) struct SendClock(Arc<Inner>);

struct Inner {
    /// A send after this instant is late; `None`: never late.
    late_after: Option<Instant>,
    sent_at: OnceLock<Instant>,
    late: Notify,
    /// Told when the request leaves; dropped with the clock if it never does.
    departure: Mutex<Option<Departure>>,
}

impl SendClock {
    /// A clock for an attempt that is late if it leaves after `late_after`;
    /// `departure` learns when it leaves.
    fn new(late_after: Option<Instant>, departure: Departure) -> Self {
        Self(Arc::new(Inner {
            late_after,
            sent_at: OnceLock::new(),
            late: Notify::new(),
            departure: Mutex::new(Some(departure)),
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

    /// Completes with the sending time if the request left late; never
    /// completes otherwise. Costs no wake-up for a request sent on time.
    async fn late(&self) -> Instant {
        loop {
            let notified = self.0.late.notified();
            if let Some(at) = self.sent_at().filter(|at| self.is_late(*at)) {
                return at;
            }
            notified.await;
        }
    }

    fn is_late(&self, at: Instant) -> bool {
        self.0.late_after.is_some_and(|limit| at > limit)
    }

    fn stamp(&self) {
        let now = Instant::now();
        if self.0.sent_at.set(now).is_ok() {
            let late = self.is_late(now);
            let mut departure = self.0.departure.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(departure) = departure.take() {
                departure.left(now, late);
            }
            if late {
                self.0.late.notify_one();
            }
        }
    }
}

impl Line {
    /// The send clock of the attempt `turn` was granted for.
    pub(crate) fn send_clock(&self, turn: Turn) -> SendClock {
        SendClock::new(self.late_after(turn.granted_at), turn.departure)
    }

    /// Runs one upstream `attempt`; if its request leaves late (a cold
    /// connection, a starved thread), moves the account's next slot
    /// meanwhile, while the request is still in flight.
    pub(crate) async fn keep_spacing<T>(
        &self,
        attempt: impl Future<Output = T>,
        clock: &SendClock,
    ) -> T {
        let mut attempt = std::pin::pin!(attempt);
        tokio::select! {
            biased;
            outcome = &mut attempt => outcome,
            sent_at = clock.late() => tokio::join!(attempt, self.sent_late(sent_at)).0,
        }
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
        let clock = SendClock::new(Some(now + Duration::from_millis(5)), Departure::default());
        let body = ClockedBody {
            bytes: Some(Bytes::from_static(bytes)),
            clock: clock.clone(),
        };
        (clock, body, now)
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_on_time_is_stamped_and_never_late() {
        let (clock, body, now) = body(b"{}");
        assert_eq!(body.size_hint().exact(), Some(2));
        assert_eq!(clock.sent_at(), None);
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"{}");
        assert_eq!(clock.sent_at(), Some(now));
        assert!(clock.late().now_or_never().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_send_wakes_whoever_waits_for_it() {
        let (clock, body, now) = body(b"{}");
        let waiting = tokio::spawn({
            let clock = clock.clone();
            async move { clock.late().await }
        });
        tokio::time::advance(Duration::from_millis(60)).await;
        body.collect().await.unwrap();
        assert_eq!(waiting.await.unwrap(), now + Duration::from_millis(60));
        // Asked after the fact, it answers at once.
        assert_eq!(
            clock.late().now_or_never(),
            Some(now + Duration::from_millis(60))
        );
    }
}
