//! A line's dispatcher: one task per account takes the next call still
//! waiting (fair order), asks the limiter for a slot, sleeps exactly as long
//! as the limiter says (no polling), and hands the slot over. A caller that
//! left is skipped; no slot is spent on nobody.

use std::sync::Arc;

use tokio::time::{Instant, sleep};

use super::BudgetError;
use super::limiter::Decision;
use super::line::{Line, Waiter};

impl Line {
    pub(super) async fn dispatch(self: Arc<Self>) {
        while let Some(waiter) = self.next_waiter().await {
            self.serve(waiter).await;
        }
    }

    /// The first caller still waiting, or `None` once closed (after answering
    /// everyone still in line).
    async fn next_waiter(&self) -> Option<Waiter> {
        loop {
            // Notify stores a permit when nobody waits, so a wake-up between the
            // check and the await is not lost.
            let woken = self.wake.notified();
            {
                let mut st = self.lock();
                if self.closing.is_cancelled() {
                    for w in st.waiters.drain() {
                        let _ = w.tx.send(Err(BudgetError::ShuttingDown));
                    }
                    return None;
                }
                let now = Instant::now();
                while let Some(w) = st.waiters.pop() {
                    if !w.tx.is_closed() && w.ready_by > now {
                        return Some(w);
                    }
                }
            }
            woken.await;
        }
    }

    /// Gets a slot for `waiter`, sleeping as the limiter says, unless the
    /// waiter leaves first or the gateway shuts down.
    async fn serve(&self, mut waiter: Waiter) {
        loop {
            // No grant while a granted request may still leave.
            if let Some(transit) = &self.transit {
                tokio::select! {
                    () = transit.clear() => {}
                    () = waiter.tx.closed() => return,
                    () = self.closing.cancelled() => {
                        let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                        return;
                    }
                }
            }
            // The slot is taken somewhere between asking and the answer (a
            // Redis round trip, which a busy node can stretch): the request
            // is due from the asking, so lateness is counted from there.
            let asked = Instant::now();
            let decision = tokio::select! {
                d = self.limiter.acquire() => d,
                () = waiter.tx.closed() => return,
                () = self.closing.cancelled() => {
                    let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                    return;
                }
            };
            match decision {
                Ok(Decision::Granted) => {
                    let now = Instant::now();
                    {
                        let mut st = self.lock();
                        st.pace.granted(now, waiter.joined);
                        // This replica's next grant, as far as it can tell.
                        st.next_slot = now + st.pace.get(now);
                    }
                    // If the caller left in the instant since the check above,
                    // this slot is lost; the window is a few instructions wide.
                    let _ = waiter.tx.send(Ok((asked, self.departure())));
                    return;
                }
                Ok(Decision::Wait(wait)) => {
                    self.lock().next_slot = Instant::now() + wait;
                    tokio::select! {
                        () = sleep(wait) => {}
                        // The limiter switched budgets (Redis lost or back):
                        // this wait may no longer hold, ask again.
                        () = self.limiter.changed() => {}
                        () = waiter.tx.closed() => return,
                        () = self.closing.cancelled() => {
                            let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                            return;
                        }
                    }
                }
                Err(_) => {
                    let _ = waiter.tx.send(Err(BudgetError::BackendUnavailable));
                    return;
                }
            }
        }
    }
}
