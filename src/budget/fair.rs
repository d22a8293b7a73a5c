//! The order in which one account's waiting calls are served: weighted
//! round-robin by caller, so a caller with fifty calls in line and a caller
//! with one alternate instead of the one waiting behind the fifty. A caller
//! of weight w is served up to w calls in a row per round.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::domain::Caller;

struct Lane<T> {
    items: VecDeque<T>,
    weight: u32,
    /// Served in a row in the current round.
    served: u32,
}

/// Items queued per caller, popped in weighted round-robin order.
pub(super) struct FairQueue<T> {
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// Callers with items, in service order; the front one is being served.
    ring: VecDeque<Arc<str>>,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            ring: VecDeque::new(),
        }
    }
}

impl<T> FairQueue<T> {
    pub(super) fn push(&mut self, caller: &Caller, item: T) {
        let lane = self.lanes.entry(Arc::clone(&caller.id)).or_insert_with(|| {
            self.ring.push_back(Arc::clone(&caller.id));
            Lane {
                items: VecDeque::new(),
                weight: caller.weight.get(),
                served: 0,
            }
        });
        lane.items.push_back(item);
    }

    /// The next item in round-robin order.
    pub(super) fn pop(&mut self) -> Option<T> {
        loop {
            let id = self.ring.front()?;
            let lane = self.lanes.get_mut(id)?;
            // A lane that used up its turn yields now, not when it was last
            // served: a caller that joined since then goes before it.
            if lane.served >= lane.weight {
                lane.served = 0;
                self.ring.rotate_left(1);
                continue;
            }
            let Some(item) = lane.items.pop_front() else {
                self.lanes.remove(id);
                self.ring.pop_front();
                continue;
            };
            // An emptied lane stays (with its count) until its turn ends: the
            // dispatcher holds the caller's call while it waits for the slot,
            // and the caller's next call must not start a fresh turn.
            lane.served += 1;
            return Some(item);
        }
    }

    /// Removes everything, in no particular order.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.ring.clear();
        self.lanes.drain().flat_map(|(_, lane)| lane.items)
    }
}

/// How many calls are served before a new call of `caller`, given the calls
/// still waiting per caller (`waiting`: id → (count, weight)). Round r of the
/// new call is ceil((own + 1) / w); every other caller j gets at most r × w_j
/// turns before it.
pub(super) fn ahead<'a>(
    caller: &Caller,
    waiting: impl IntoIterator<Item = (&'a Arc<str>, (usize, u32))>,
) -> usize {
    let mut own = 0;
    let mut others = Vec::new();
    for (id, (count, weight)) in waiting {
        if *id == caller.id {
            own = count;
        } else {
            others.push((count, weight));
        }
    }
    let rounds = (own / caller.weight.get() as usize) + 1;
    own + others
        .into_iter()
        .map(|(count, weight)| count.min(rounds.saturating_mul(weight as usize)))
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn caller(id: &str, weight: u32) -> Caller {
        Caller::new(id, NonZeroU32::new(weight).unwrap())
    }

    #[test]
    fn a_flooding_caller_and_a_single_call_alternate() {
        let (a, b) = (caller("a", 1), caller("b", 1));
        let mut q = FairQueue::default();
        for i in 0..50 {
            q.push(&a, format!("a{i}"));
        }
        q.push(&b, "b0".to_owned());
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).take(4).collect();
        assert_eq!(order, ["a0", "b0", "a1", "a2"]);
    }

    #[test]
    fn weights_give_consecutive_turns() {
        let (a, b) = (caller("a", 2), caller("b", 1));
        let mut q = FairQueue::default();
        for i in 0..4 {
            q.push(&a, format!("a{i}"));
            q.push(&b, format!("b{i}"));
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["a0", "a1", "b0", "a2", "a3", "b1", "b2", "b3"]);
    }

    #[test]
    fn a_caller_that_rejoins_within_its_turn_does_not_start_a_new_one() {
        let (a, b) = (caller("a", 1), caller("b", 1));
        let mut q = FairQueue::default();
        q.push(&a, "a1");
        assert_eq!(q.pop(), Some("a1"));
        q.push(&a, "a2");
        q.push(&b, "b1");
        assert_eq!(q.pop(), Some("b1"));
        assert_eq!(q.pop(), Some("a2"));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn the_estimate_counts_round_robin_turns() {
        let a = caller("a", 1);
        let (ida, idb, idc): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        // b has 30 waiting, c has 1: a new call of a is served in round 1,
        // after one of b and the one of c.
        assert_eq!(ahead(&a, [(&idb, (30, 1)), (&idc, (1, 1))]), 2);
        // With 2 of its own already waiting, it is in round 3.
        assert_eq!(
            ahead(&a, [(&ida, (2, 1)), (&idb, (30, 1)), (&idc, (1, 1))]),
            2 + 3 + 1
        );
        // Weight 2 with 2 of its own waiting: round 2, so two of b before it.
        let heavy = caller("a", 2);
        assert_eq!(ahead(&heavy, [(&ida, (2, 2)), (&idb, (30, 1))]), 2 + 2);
    }

    #[test]
    fn drain_hands_back_every_item_and_leaves_the_queue_empty() {
        let (a, b) = (caller("a", 1), caller("b", 3));
        let mut q = FairQueue::default();
        for i in 0..3 {
            q.push(&a, i);
            q.push(&b, 10 + i);
        }
        let mut drained: Vec<_> = q.drain().collect();
        drained.sort();
        assert_eq!(drained, [0, 1, 2, 10, 11, 12]);
        assert_eq!(q.pop(), None);
    }
}
