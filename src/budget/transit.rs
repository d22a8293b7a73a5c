//! Requests granted but not yet gone out. Where spacing is promised (burst 1
//! and a safety margin) a replica grants no slot while a granted request may
//! still leave, and none within one interval after a request that left late.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Granted requests that have not gone out yet, and the earliest next grant
/// after one that left late. Where spacing is promised this replica never
/// grants while a granted request may still leave: a request held up for
/// longer than a whole interval (a connect retried by the kernel, a stalled
/// handshake) cannot then arrive close to one granted meanwhile.
pub(super) struct Transit {
    state: Mutex<TransitState>,
    /// Wakes the dispatcher when a request leaves or gives up.
    changed: Notify,
    interval: Duration,
    /// How late after its grant a request may leave before the next slot moves.
    pub(super) slack: Duration,
}

#[derive(Default)]
struct TransitState {
    unsent: usize,
    /// One interval after the last late departure.
    not_before: Option<Instant>,
}

impl Transit {
    pub(super) fn new(interval: Duration, slack: Duration) -> Self {
        Self {
            state: Mutex::default(),
            changed: Notify::new(),
            interval,
            slack,
        }
    }

    /// A granted request now on its way out.
    pub(super) fn depart(self: &Arc<Self>) -> Departure {
        self.lock().unsent += 1;
        Departure(Some(Arc::clone(self)))
    }

    fn lock(&self) -> MutexGuard<'_, TransitState> {
        // Counter updates only: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing on its way out and no late departure's interval running.
    pub(super) fn is_clear(&self, now: Instant) -> bool {
        let st = self.lock();
        st.unsent == 0 && st.not_before.is_none_or(|t| t <= now)
    }

    /// Completes once [`Self::is_clear`].
    pub(super) async fn clear(&self) {
        loop {
            // Notify keeps a permit when nobody waits: no wake-up is lost
            // between the check and the await.
            let changed = self.changed.notified();
            let until = {
                let st = self.lock();
                if st.unsent > 0 {
                    None
                } else {
                    match st.not_before {
                        Some(t) if t > Instant::now() => Some(t),
                        _ => return,
                    }
                }
            };
            match until {
                Some(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    fn done(&self, left_late_at: Option<Instant>) {
        {
            let mut st = self.lock();
            st.unsent = st.unsent.saturating_sub(1);
            if let Some(at) = left_late_at {
                let next = at + self.interval;
                st.not_before = Some(st.not_before.map_or(next, |t| t.max(next)));
            }
        }
        self.changed.notify_one();
    }
}

/// A granted request on its way upstream. [`Self::left`] says when it went
/// out; dropped without that, it never will (no connection, cancelled).
/// Either lets this replica grant again.
#[derive(Default)]
pub struct Departure(Option<Arc<Transit>>);

impl Departure {
    /// The request went out at `at`, late if `late`: then this replica's
    /// next grant comes one interval after `at` at the earliest.
    pub fn left(mut self, at: Instant, late: bool) {
        if let Some(transit) = self.0.take() {
            transit.done(late.then_some(at));
        }
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        if let Some(transit) = self.0.take() {
            transit.done(None);
        }
    }
}

impl std::fmt::Debug for Departure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Departure(pending)"
        } else {
            "Departure(none)"
        })
    }
}
