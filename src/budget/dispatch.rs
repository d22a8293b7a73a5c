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
            // Every select here is `biased`: polled in the order written, a
            // shutdown first, then the caller having left, then the work.
            // When a caller leaves at the instant its slot comes (its
            // deadline and the slot on one tick), an unbiased pick would now
            // and then take the slot for nobody; and the order must be the
            // same on every run for the paused-clock tests to mean anything.
            if let Some(transit) = &self.transit {
                tokio::select! {
                    biased;
                    () = self.closing.cancelled() => {
                        let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                        return;
                    }
                    () = waiter.tx.closed() => return,
                    () = transit.clear() => {}
                }
            }
            // The slot is taken somewhere between asking and the answer (a
            // Redis round trip, which a busy node can stretch): the request
            // is due from the asking, so lateness is counted from there.
            let asked = Instant::now();
            let decision = tokio::select! {
                biased;
                () = self.closing.cancelled() => {
                    let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                    return;
                }
                () = waiter.tx.closed() => return,
                d = self.limiter.acquire() => d,
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
                        biased;
                        () = self.closing.cancelled() => {
                            let _ = waiter.tx.send(Err(BudgetError::ShuttingDown));
                            return;
                        }
                        () = waiter.tx.closed() => return,
                        () = sleep(wait) => {}
                        // The limiter switched budgets (Redis lost or back):
                        // this wait may no longer hold, ask again.
                        () = self.limiter.changed() => {}
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use futures::FutureExt;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::budget::Rejection;
    use crate::budget::local::LocalLimiter;
    use crate::config::BudgetConfig;
    use crate::domain::Caller;

    /// The interval at 1/s with a 10 ms margin.
    const T: Duration = Duration::from_millis(1010);
    const FAR: Duration = Duration::from_secs(3600);

    fn line() -> Arc<Line> {
        let c = BudgetConfig::with_max_queue(100);
        Line::spawn("test", Arc::new(LocalLimiter::new(&c)), &c)
    }

    /// A caller of `who` in line in a task of its own, with its turn useful
    /// until `ready_by`; yields when it was served (its request leaves at
    /// once). Returns once it is in line (`depth` callers then wait).
    async fn join(q: &Arc<Line>, who: &Caller, ready_by: Instant) -> JoinHandle<Instant> {
        let depth = q.depth();
        let (q2, who) = (Arc::clone(q), who.clone());
        let task = tokio::spawn(async move {
            let turn = q2.wait_turn(&who, ready_by).await.expect("served");
            turn.departure.left(Instant::now(), false);
            Instant::now()
        });
        q.until_depth(depth + 1).await;
        task
    }

    /// Takes the free slot at once (its request leaves at once).
    async fn take_free_slot(q: &Line) {
        let anon = Caller::anonymous();
        let turn = q.wait_turn(&anon, Instant::now() + FAR).now_or_never();
        let turn = turn.expect("a free slot").unwrap();
        turn.departure.left(Instant::now(), false);
    }

    /// Has the task's caller leave the line (cancelled), and waits until it has.
    async fn leave(q: &Line, task: &JoinHandle<Instant>) {
        let depth = q.depth();
        task.abort();
        q.until_depth(depth - 1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_leaving_the_middle_of_the_line_gives_its_slot_to_the_next() {
        let q = line();
        let start = Instant::now();
        let anon = Caller::anonymous();
        take_free_slot(&q).await;
        let head = join(&q, &anon, start + FAR).await; // the dispatcher waits for its slot
        let middle = join(&q, &anon, start + FAR).await;
        let last = join(&q, &anon, start + FAR).await;
        tokio::time::advance(T / 2).await;
        leave(&q, &middle).await;
        assert_eq!(head.await.unwrap() - start, T, "the head at its slot");
        assert_eq!(
            last.await.unwrap() - start,
            T * 2,
            "the last one at the slot the one that left would have had"
        );
        assert!(middle.await.unwrap_err().is_cancelled());
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_leaving_from_the_middle_of_a_fair_line_lose_no_interval() {
        // Two callers alternate; three calls of b leave from the middle.
        let q = line();
        let start = Instant::now();
        let (a, b) = (
            Caller::new("a", NonZeroU32::MIN),
            Caller::new("b", NonZeroU32::MIN),
        );
        take_free_slot(&q).await;
        let mut stay = Vec::new();
        let mut go = Vec::new();
        for n in 0..4 {
            stay.push(join(&q, &a, start + FAR).await);
            let task = join(&q, &b, start + FAR).await;
            if n == 0 {
                stay.push(task)
            } else {
                go.push(task)
            }
        }
        for task in &go {
            leave(&q, task).await;
        }
        // a0, b0, a1, a2, a3: one interval apart, from T.
        let mut served = Vec::new();
        for task in stay {
            served.push(task.await.unwrap() - start);
        }
        served.sort();
        let want: Vec<Duration> = (1..=5).map(|n| T * n).collect();
        assert_eq!(served, want);
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_dispatcher_takes_the_first_caller_still_waiting() {
        let q = line();
        let start = Instant::now();
        let anon = Caller::anonymous();
        take_free_slot(&q).await;
        // Told apart by their deadlines.
        let (head, middle, last) = (start + FAR, start + FAR * 2, start + FAR * 3);
        let _head = join(&q, &anon, head).await; // the dispatcher holds it
        let middle_task = join(&q, &anon, middle).await;
        let _last = join(&q, &anon, last).await;
        leave(&q, &middle_task).await;
        // What the dispatcher takes next, once the head is served: the last
        // caller, not the one that left.
        let next = q.next_waiter().now_or_never().flatten();
        let next = next.expect("a caller waiting");
        assert!(!next.tx.is_closed(), "a caller that left");
        assert_eq!(next.ready_by, last);
        assert!(
            q.next_waiter().now_or_never().is_none(),
            "nobody else waits"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_leaves_while_a_granted_request_has_not_left_wastes_no_slot() {
        let q = line();
        let start = Instant::now();
        let anon = Caller::anonymous();
        // Granted at 0; its request does not leave (a slow connect).
        let first = q.wait_turn(&anon, start + FAR).await.unwrap();
        let head = join(&q, &anon, start + FAR).await; // the dispatcher waits for it to leave
        let next = join(&q, &anon, start + FAR).await;
        tokio::time::advance(T * 2).await;
        leave(&q, &head).await;
        tokio::time::advance(T).await;
        drop(first.departure); // it never went out
        assert_eq!(
            next.await.unwrap() - start,
            T * 3,
            "the slot due since T went to the caller still waiting"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_leaves_at_the_instant_of_its_slot_does_not_take_it_along() {
        let q = line();
        let start = Instant::now();
        let anon = Caller::anonymous();
        take_free_slot(&q).await;
        // Its turn is useful until T exactly: the instant of its slot.
        let head = {
            let q = Arc::clone(&q);
            let anon = anon.clone();
            tokio::spawn(async move {
                let turn = q.wait_turn(&anon, start + T).await;
                turn.map(|t| {
                    t.departure.left(Instant::now(), false);
                    Instant::now()
                })
            })
        };
        q.until_depth(1).await;
        let next = join(&q, &anon, start + FAR).await;
        let next = next.await.unwrap() - start;
        match head.await.unwrap() {
            // Served at its slot: the next one at the slot after.
            Ok(at) => assert_eq!((at - start, next), (T, T * 2)),
            // Gone as its slot came: the slot is the next one's.
            Err(_) => assert_eq!(next, T, "the slot at T went to nobody"),
        }
    }

    /// The refusal of a call that asks now with its turn useful for `within`.
    fn refused(q: &Line, within: Duration) -> (Rejection, Duration) {
        match q.check(&Caller::anonymous(), Instant::now() + within) {
            Err(BudgetError::Exhausted {
                reason,
                retry_after,
            }) => (reason, retry_after),
            other => panic!("admitted or refused otherwise: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admission_counts_the_slot_the_dispatcher_is_waiting_for() {
        let q = line();
        let start = Instant::now();
        take_free_slot(&q).await;
        // The dispatcher asks the limiter for the next caller's slot and
        // sleeps until it, one interval out: a new call comes after both.
        let _waiting = join(&q, &Caller::anonymous(), start + FAR).await;
        assert_eq!(refused(&q, T * 3 / 2), (Rejection::Deadline, T * 2));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_grant_admission_counts_the_next_one_interval_out() {
        let q = line();
        let start = Instant::now();
        take_free_slot(&q).await;
        // Served by the dispatcher at T: the next slot is one interval later.
        let served = join(&q, &Caller::anonymous(), start + FAR).await;
        assert_eq!(served.await.unwrap() - start, T);
        assert_eq!(refused(&q, T / 2), (Rejection::Deadline, T));
    }
}
