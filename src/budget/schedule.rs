//! The rules of one account's line, on one clock, with no I/O: the memory
//! store runs them in process ([`super::store::memory`]), and `line.lua`
//! runs the same rules inside Redis for every replica at once. Times are
//! microseconds on the store's clock (tokio's for memory, Redis `TIME` for
//! Redis); callers send durations, never their own clock.
//!
//! **The schedule.** A GCRA: `tat` is the theoretical arrival time, a grant
//! is allowed at `tat - tau` (tau = (burst - 1) × T) and moves `tat` one
//! interval T on. The line's tickets are in service order; the ticket at
//! position p gets the slot
//!
//! ```text
//! slot(p) = max(now, tat - tau + p·T, held + T + p·T)
//! ```
//!
//! where `held` is the latest instant a granted request may still be held up
//! on its way out (a replica says so while it is). Nothing else decides a
//! slot: every replica reads the same state.
//!
//! **Invariants** (kept by every command, checked by the tests):
//! 1. *Promise*: every waiting ticket's slot is at or before its `ready_at`
//!    (its caller's deadline minus the upstream reserve), and the ticket is
//!    kept a little past it ([`claim_late`]) for its claim. Admission refuses
//!    a ticket it cannot place so, and places a new ticket only where
//!    pushing the tickets behind it one interval on keeps their promise.
//!    Only an upstream pushback (429) or a request held up on its way out
//!    can break a promise; such tickets time out and leave.
//! 2. *Spacing*: two grants are at least T apart (burst 1), and no grant
//!    comes within T of a request that left late, or while one is held.
//! 3. *Order*: tickets are granted in line order; a ticket whose turn came
//!    and went unclaimed for [`Rules::grace`] (its replica is gone) is
//!    dropped by the next claim, so a dead replica costs one slot.
//! 4. *Fair shares*: a caller of weight w gets a finish tag 1/w past the
//!    later of its previous tag and the tag last served (weighted fair
//!    queueing); a new ticket goes before the tickets with a later tag,
//!    within invariant 1.
//! 5. *Clock*: a `tat` or hold further ahead than any command could have
//!    set ([`Rules::horizon`]) is a clock that stepped back: it is reset to
//!    one interval from now (a grant may have gone just before), and the
//!    answer says so.

use std::collections::{HashMap, VecDeque};

/// The settings every command of one account runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Emission interval T, µs (≥ 1).
    pub interval: i64,
    /// Slots that may go back to back after idling (≥ 1).
    pub burst: i64,
    /// Longest a caller may be told to wait, µs.
    pub max_wait: i64,
    /// Most tickets waiting at once.
    pub max_queue: i64,
    /// How far ahead `tat` or a hold can legitimately be, µs.
    pub horizon: i64,
    /// How long an unclaimed head keeps its turn, µs.
    pub grace: i64,
}

/// The last granted tickets remembered, so a retried command whose answer
/// was lost learns it was granted instead of taking a second slot (beyond
/// them, a retry is admitted again: the lost slot goes unused, never twice).
pub(crate) const RECENT: usize = 16;

impl Rules {
    fn tau(&self) -> i64 {
        (self.burst - 1) * self.interval
    }
}

/// At most this long (µs) past `ready_at` a ticket is kept for its claim.
const CLAIM_LATE: i64 = 50_000;

/// How long past its `ready_at` a ticket is kept, for an interval of
/// `interval` µs: half of it, at most 50 ms. A slot promised at `ready_at`
/// may come that much late (claims come a few ms after their slot, each
/// moving the next slot on); replicas wait for it as long, taking it from
/// the upstream reserve.
pub(crate) fn claim_late(interval: i64) -> i64 {
    (interval / 2).min(CLAIM_LATE)
}

/// A caller's request for a place in line.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    /// Unique per call and attempt, the same on a retried command.
    pub ticket: String,
    /// The caller's fairness key and weight.
    pub lane: String,
    pub weight: u32,
    /// How long from now the slot is still useful, µs.
    pub ready_in: i64,
    /// Background work (a batch item): granted only a slot no waiting
    /// ticket can use, that is with the line empty and the slot free now;
    /// never queued (refused with when a slot would come).
    pub background: bool,
}

/// What a command answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The slot is this ticket's now: the request may leave.
    Granted,
    /// In line; the slot comes in this many µs at the latest.
    Queued(i64),
    /// Not admitted; a slot would come in this many µs.
    Refused(Refusal, i64),
    /// The ticket is not (or no longer) in line: expired, or dropped after
    /// its turn went unclaimed.
    Gone,
}

/// Why admission refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    QueueFull,
    MaxWait,
    Deadline,
}

#[derive(Debug, Clone)]
struct Ticket {
    id: String,
    lane: String,
    tag: f64,
    ready_at: i64,
}

/// One account's line and GCRA state.
#[derive(Debug, Default)]
pub struct Schedule {
    /// GCRA theoretical arrival time; `None`: no constraint.
    tat: Option<i64>,
    /// Waiting tickets in service order.
    line: VecDeque<Ticket>,
    /// Virtual time: the tag of the ticket served last.
    vtime: f64,
    /// Granted requests held up on their way out: ticket → held until.
    held: HashMap<String, i64>,
    /// The last [`RECENT`] granted tickets.
    granted: VecDeque<String>,
}

impl Schedule {
    /// Admits `ask` at `now`: granted at once (a free slot, nobody ahead),
    /// queued with the slot it will have at the latest, or refused with
    /// when a slot would come. The same ticket asked again answers as it
    /// stands (a retry after a lost answer). Returns whether the clock was
    /// found to have stepped back (and was reset).
    pub fn admit(&mut self, rules: &Rules, now: i64, ask: &Ask) -> (Answer, bool) {
        let regressed = self.tidy(rules, now);
        if self.granted.contains(&ask.ticket) {
            return (Answer::Granted, regressed);
        }
        if let Some(p) = self.position(&ask.ticket) {
            return (Answer::Queued(self.slot(rules, now, p) - now), regressed);
        }
        if ask.background {
            let slot = self.slot(rules, now, self.line.len());
            if self.line.is_empty() && slot <= now {
                // Served last: it moves no caller's fair share.
                self.grant(rules, now, &ask.ticket, self.vtime);
                return (Answer::Granted, regressed);
            }
            return (
                Answer::Refused(Refusal::Deadline, (slot - now).max(1)),
                regressed,
            );
        }
        // The lane's finish tag: its last ticket waiting, or the virtual time.
        let last = self
            .line
            .iter()
            .filter(|t| t.lane == ask.lane)
            .map(|t| t.tag)
            .fold(self.vtime, f64::max);
        let tag = last + 1.0 / f64::from(ask.weight.max(1));
        // From the tail: pass every ticket with a later tag that can still
        // afford one interval more.
        let mut at = self.line.len();
        while at > 0 {
            let t = &self.line[at - 1];
            let pushed = self.slot(rules, now, at);
            if t.tag <= tag || pushed > t.ready_at {
                break;
            }
            at -= 1;
        }
        let slot = self.slot(rules, now, at);
        let wait = slot - now;
        let refusal = if self.line.len() as i64 >= rules.max_queue {
            Some(Refusal::QueueFull)
        } else if wait > rules.max_wait {
            Some(Refusal::MaxWait)
        } else if wait > ask.ready_in {
            Some(Refusal::Deadline)
        } else {
            None
        };
        if let Some(why) = refusal {
            return (
                Answer::Refused(why, self.come_back(rules, now, ask, why, wait)),
                regressed,
            );
        }
        if at == 0 && slot <= now {
            self.grant(rules, now, &ask.ticket, tag);
            return (Answer::Granted, regressed);
        }
        let ticket = Ticket {
            id: ask.ticket.clone(),
            lane: ask.lane.clone(),
            tag,
            ready_at: now.saturating_add(ask.ready_in),
        };
        self.line.insert(at, ticket);
        (Answer::Queued(wait), regressed)
    }

    /// The ticket's turn, if it has come: granted; else how long until it
    /// comes; `Gone` if the ticket is no longer in line.
    pub fn claim(&mut self, rules: &Rules, now: i64, ticket: &str) -> (Answer, bool) {
        let regressed = self.tidy(rules, now);
        if self.granted.iter().any(|t| t == ticket) {
            return (Answer::Granted, regressed);
        }
        let Some(mut p) = self.position(ticket) else {
            return (Answer::Gone, regressed);
        };
        // Heads whose turn came and went unclaimed: their replica is gone.
        while p > 0 && self.stale_head(rules, now) {
            self.line.pop_front();
            p -= 1;
        }
        let slot = self.slot(rules, now, p);
        if p > 0 {
            // Someone ahead has not claimed yet. If this ticket's own slot
            // has come (the one ahead is late), ask again one interval on,
            // or when that one's turn goes stale if sooner.
            let stale_at = self.due(rules, 0).saturating_add(rules.grace);
            let again = if slot > now {
                slot
            } else {
                stale_at.min(now + rules.interval)
            };
            return (Answer::Queued(again - now), regressed);
        }
        if slot > now {
            return (Answer::Queued(slot - now), regressed);
        }
        let Some(t) = self.line.pop_front() else {
            return (Answer::Gone, regressed);
        };
        self.grant(rules, now, &t.id, t.tag);
        (Answer::Granted, regressed)
    }

    /// The ticket's caller left (cancelled, deadline): the tickets behind it
    /// move up. Returns whether the line changed.
    pub fn leave(&mut self, rules: &Rules, now: i64, ticket: &str) -> bool {
        self.tidy(rules, now);
        let held = self.held.remove(ticket).is_some();
        match self.position(ticket) {
            Some(p) => {
                self.line.remove(p);
                true
            }
            None => held,
        }
    }

    /// The granted request of `ticket` has not left yet: no grant until it
    /// has, or for `hold` µs at most (its replica may be gone).
    pub fn hold(&mut self, rules: &Rules, now: i64, ticket: &str, hold: i64) {
        self.tidy(rules, now);
        let until = now.saturating_add(hold.clamp(0, rules.horizon));
        let entry = self.held.entry(ticket.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// The granted request of `ticket` left now, late if `late`: then no
    /// grant within one interval of now. Returns whether it held the line
    /// (which now moves).
    pub fn left(&mut self, rules: &Rules, now: i64, ticket: &str, late: bool) -> bool {
        self.tidy(rules, now);
        let held = self.held.remove(ticket).is_some();
        if late {
            self.push_tat(rules, now + rules.interval);
        }
        held
    }

    /// Upstream pushback (429): no grant before now + `wait` µs.
    pub fn pushback(&mut self, rules: &Rules, now: i64, wait: i64) {
        self.tidy(rules, now);
        self.push_tat(rules, now.saturating_add(wait.clamp(0, rules.horizon)));
    }

    /// When a refused caller coming back with the same deadline could be
    /// admitted, if nobody else joins meanwhile: the tail's slot less what
    /// its deadline (or `max_wait`) allows; for a full line, when its head
    /// is served. Callers with different deadlines are told different
    /// instants, so refused callers do not all come back at the slot the
    /// head is granted (a burst then delays that request's departure), and
    /// a caller that comes back waits in line instead of racing for a slot.
    fn come_back(&self, rules: &Rules, now: i64, ask: &Ask, why: Refusal, wait: i64) -> i64 {
        let slot = (self.slot(rules, now, self.line.len()) - now).max(wait);
        match why {
            Refusal::Deadline => slot - ask.ready_in.max(0),
            Refusal::MaxWait => slot - rules.max_wait,
            Refusal::QueueFull => self.slot(rules, now, 0) - now,
        }
        .max(0)
    }

    /// Waiting tickets (for depth and tests).
    pub fn waiting(&self) -> usize {
        self.line.len()
    }

    /// No grant before `at`.
    fn push_tat(&mut self, rules: &Rules, at: i64) {
        let tat = at + rules.tau();
        self.tat = Some(self.tat.map_or(tat, |t| t.max(tat)));
    }

    fn grant(&mut self, rules: &Rules, now: i64, ticket: &str, tag: f64) {
        let tat = self.tat.map_or(now, |t| t.max(now));
        self.tat = Some(tat + rules.interval);
        self.vtime = self.vtime.max(tag);
        self.granted.push_back(ticket.to_owned());
        if self.granted.len() > RECENT {
            self.granted.pop_front();
        }
    }

    fn position(&self, ticket: &str) -> Option<usize> {
        self.line.iter().position(|t| t.id == ticket)
    }

    /// Whether the head's turn came more than the grace ago, unclaimed.
    fn stale_head(&self, rules: &Rules, now: i64) -> bool {
        now >= self.due(rules, 0).saturating_add(rules.grace)
    }

    /// When position `p`'s turn comes by the GCRA and the holds alone.
    fn due(&self, rules: &Rules, p: usize) -> i64 {
        let gcra = self.tat.map_or(i64::MIN, |t| t - rules.tau());
        let held = self
            .held
            .values()
            .copied()
            .max()
            .map_or(i64::MIN, |h| h + rules.interval);
        gcra.max(held).saturating_add(p as i64 * rules.interval)
    }

    /// The slot of position `p`, at the latest.
    fn slot(&self, rules: &Rules, now: i64, p: usize) -> i64 {
        now.max(self.due(rules, p))
    }

    /// Drops what has expired; resets state a clock step left beyond the
    /// horizon. Returns whether it did that.
    fn tidy(&mut self, rules: &Rules, now: i64) -> bool {
        let late = claim_late(rules.interval);
        self.line.retain(|t| t.ready_at.saturating_add(late) >= now);
        self.held.retain(|_, until| *until > now);
        let beyond = now.saturating_add(rules.horizon);
        let regressed =
            self.tat.is_some_and(|t| t > beyond) || self.held.values().any(|h| *h > beyond);
        if regressed {
            // When the last grant was is lost with the clock: one could have
            // gone just now.
            self.tat = Some(now + rules.interval);
            self.held.clear();
        }
        if self.line.is_empty() && self.tat.is_some_and(|t| t <= now) {
            self.tat = None;
        }
        regressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_000_000;

    #[test]
    fn a_ticket_is_kept_half_an_interval_past_its_slot_at_most_50_ms() {
        assert_eq!(claim_late(40_000), 20_000, "fast accounts: half of T");
        assert_eq!(claim_late(100_000), CLAIM_LATE);
        assert_eq!(claim_late(T), CLAIM_LATE, "1 rps: 50 ms");
    }

    fn rules() -> Rules {
        Rules {
            interval: T,
            burst: 1,
            max_wait: 60 * T,
            max_queue: 100,
            horizon: 400 * T,
            grace: 2 * T,
        }
    }

    fn ask(ticket: &str, lane: &str, weight: u32, ready_in: i64) -> Ask {
        Ask {
            ticket: ticket.into(),
            lane: lane.into(),
            weight,
            ready_in,
            background: false,
        }
    }

    fn anon(ticket: &str) -> Ask {
        ask(ticket, "anonymous", 1, 3600 * T)
    }

    /// Admits each ticket at `now`; returns the answers.
    fn admit_all(s: &mut Schedule, now: i64, asks: &[Ask]) -> Vec<Answer> {
        asks.iter().map(|a| s.admit(&rules(), now, a).0).collect()
    }

    /// Who gets each slot, claiming in line order at each slot from `now`.
    fn served(s: &mut Schedule, mut now: i64, tickets: &[&str]) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        let mut waiting: Vec<&str> = tickets.to_vec();
        while !waiting.is_empty() {
            let mut granted = None;
            for (i, t) in waiting.iter().enumerate() {
                if s.claim(&rules(), now, t).0 == Answer::Granted {
                    granted = Some(i);
                    break;
                }
            }
            match granted {
                Some(i) => out.push((waiting.remove(i).to_owned(), now)),
                None => now += T / 10,
            }
            assert!(now < 1000 * T, "nobody served: {waiting:?}");
        }
        out
    }

    #[test]
    fn a_free_slot_is_granted_at_once_and_the_next_queued_one_interval_on() {
        let mut s = Schedule::default();
        let answers = admit_all(&mut s, 0, &[anon("a"), anon("b"), anon("c")]);
        assert_eq!(
            answers,
            [Answer::Granted, Answer::Queued(T), Answer::Queued(2 * T)]
        );
        // A claim before the slot says how long; at the slot it is granted.
        assert_eq!(s.claim(&rules(), T / 4, "b").0, Answer::Queued(T * 3 / 4));
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Granted);
        assert_eq!(s.claim(&rules(), T, "c").0, Answer::Queued(T));
    }

    #[test]
    fn a_burst_goes_back_to_back_after_idling_then_one_interval_apart() {
        let r = Rules {
            burst: 3,
            ..rules()
        };
        let mut s = Schedule::default();
        for t in ["a", "b", "c"] {
            assert_eq!(s.admit(&r, 0, &anon(t)).0, Answer::Granted, "{t}");
        }
        assert_eq!(s.admit(&r, 0, &anon("d")).0, Answer::Queued(T));
        // Idle for longer than burst × T: a whole burst again, not more.
        assert_eq!(s.claim(&r, T, "d").0, Answer::Granted);
        let later = 10 * T;
        for t in ["e", "f", "g"] {
            assert_eq!(s.admit(&r, later, &anon(t)).0, Answer::Granted, "{t}");
        }
        assert_eq!(s.admit(&r, later, &anon("h")).0, Answer::Queued(T));
    }

    #[test]
    fn admission_keeps_the_promise_exactly_at_the_deadline() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("first"));
        // The slot is at T: useful until T exactly is admitted.
        assert_eq!(
            s.admit(&rules(), 0, &ask("on-time", "x", 1, T)).0,
            Answer::Queued(T)
        );
        // One µs short is refused, told to come back when its deadline
        // would reach the slot: 1 µs later.
        assert_eq!(
            s.admit(&rules(), 0, &ask("late", "y", 1, 2 * T - 1)).0,
            Answer::Refused(Refusal::Deadline, 1)
        );
        // A deadline already passed, even with a free slot, is refused.
        let mut idle = Schedule::default();
        assert_eq!(
            idle.admit(&rules(), 0, &ask("gone", "x", 1, -1)).0,
            Answer::Refused(Refusal::Deadline, 0)
        );
    }

    #[test]
    fn max_wait_and_the_queue_bound_are_exact() {
        let r = Rules {
            max_wait: 2 * T,
            max_queue: 3,
            ..rules()
        };
        let mut s = Schedule::default();
        assert_eq!(s.admit(&r, 0, &anon("a")).0, Answer::Granted);
        assert_eq!(s.admit(&r, 0, &anon("b")).0, Answer::Queued(T));
        assert_eq!(s.admit(&r, 0, &anon("c")).0, Answer::Queued(2 * T));
        assert_eq!(
            s.admit(&r, 0, &anon("d")).0,
            // The tail's slot at 3T is within max_wait from T on.
            Answer::Refused(Refusal::MaxWait, T)
        );
        let r = Rules {
            max_queue: 2,
            ..rules()
        };
        assert_eq!(
            s.admit(&r, 0, &anon("e")).0,
            // A place frees when the head is served.
            Answer::Refused(Refusal::QueueFull, T)
        );
        assert_eq!(s.waiting(), 2);
    }

    #[test]
    fn a_retried_command_answers_the_same_and_takes_no_second_slot() {
        let mut s = Schedule::default();
        assert_eq!(s.admit(&rules(), 0, &anon("a")).0, Answer::Granted);
        assert_eq!(s.admit(&rules(), 0, &anon("a")).0, Answer::Granted);
        assert_eq!(s.admit(&rules(), 0, &anon("b")).0, Answer::Queued(T));
        assert_eq!(s.admit(&rules(), 0, &anon("b")).0, Answer::Queued(T));
        assert_eq!(s.waiting(), 1);
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Granted);
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Granted);
        assert_eq!(s.admit(&rules(), T, &anon("c")).0, Answer::Queued(T));
        // Remembered for the last 16 grants, then the ticket is unknown.
        assert_eq!(s.claim(&rules(), 2 * T, "c").0, Answer::Granted);
        for i in 0..RECENT - 2 {
            s.admit(&rules(), 100 * T * (i as i64 + 2), &anon(&format!("x{i}")));
        }
        assert_eq!(s.claim(&rules(), 100 * T * 20, "b").0, Answer::Granted);
        s.admit(&rules(), 100 * T * 21, &anon("last"));
        assert_eq!(s.claim(&rules(), 100 * T * 21, "b").0, Answer::Gone);
    }

    fn background(ticket: &str) -> Ask {
        Ask {
            background: true,
            ..anon(ticket)
        }
    }

    #[test]
    fn background_work_takes_only_a_slot_no_waiting_call_can_use() {
        let mut s = Schedule::default();
        assert_eq!(s.admit(&rules(), 0, &background("b1")).0, Answer::Granted);
        // The next slot is T away: refused with when it comes, never queued.
        assert_eq!(
            s.admit(&rules(), T / 4, &background("b2")).0,
            Answer::Refused(Refusal::Deadline, 3 * T / 4)
        );
        assert_eq!(s.waiting(), 0);
        // A call arriving now is served at that slot: one interval at most
        // after the batch item.
        assert_eq!(
            s.admit(&rules(), T / 2, &anon("a")).0,
            Answer::Queued(T / 2)
        );
        // With a call waiting, background work waits even once the slot came,
        // and until the line is empty: the call goes first.
        assert_eq!(
            s.admit(&rules(), T, &background("b3")).0,
            Answer::Refused(Refusal::Deadline, T)
        );
        assert_eq!(s.claim(&rules(), T, "a").0, Answer::Granted);
        assert!(matches!(
            s.admit(&rules(), T, &background("b4")).0,
            Answer::Refused(_, w) if w == T
        ));
        assert_eq!(
            s.admit(&rules(), 2 * T, &background("b5")).0,
            Answer::Granted
        );
        // A background grant moves no caller's fair share.
        assert_eq!(s.vtime, 1.0);
    }

    #[test]
    fn a_caller_leaving_moves_everyone_behind_it_up() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b"), anon("c"), anon("d")]);
        assert!(s.leave(&rules(), T / 2, "b"));
        assert!(!s.leave(&rules(), T / 2, "b"), "nothing left to move");
        assert_eq!(
            served(&mut s, T / 2, &["c", "d"]),
            [("c".into(), T), ("d".into(), 2 * T)]
        );
    }

    #[test]
    fn weighted_callers_share_the_slots_by_weight() {
        let mut s = Schedule::default();
        let mut asks = Vec::new();
        for i in 0..8 {
            asks.push(ask(&format!("a{i}"), "a", 1, 3600 * T));
            asks.push(ask(&format!("b{i}"), "b", 3, 3600 * T));
        }
        s.admit(&rules(), 0, &anon("first"));
        admit_all(&mut s, 0, &asks);
        let names: Vec<_> = asks.iter().map(|a| a.ticket.as_str()).collect();
        let order: Vec<String> = served(&mut s, 0, &names)
            .into_iter()
            .map(|(t, _)| t)
            .take(8)
            .collect();
        let b = order.iter().filter(|t| t.starts_with('b')).count();
        assert_eq!(b, 6, "three of every four slots go to weight 3: {order:?}");
    }

    #[test]
    fn a_lone_call_is_not_stuck_behind_a_flooding_caller() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("first"));
        for i in 0..10 {
            s.admit(&rules(), 0, &ask(&format!("f{i}"), "flood", 1, 3600 * T));
        }
        // Goes before the flood's later calls: second in line.
        assert_eq!(
            s.admit(&rules(), 0, &ask("lone", "lone", 1, 3600 * T)).0,
            Answer::Queued(2 * T)
        );
    }

    #[test]
    fn fair_placement_never_breaks_a_promise_already_made() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("first"));
        // Two of the flood's calls, the second useful until its slot exactly.
        s.admit(&rules(), 0, &ask("f0", "flood", 1, 3600 * T));
        s.admit(&rules(), 0, &ask("f1", "flood", 1, 3600 * T));
        s.admit(&rules(), 0, &ask("f2", "flood", 1, 3 * T));
        // A fresh caller would go before f1, but f2 cannot be pushed: after it.
        assert_eq!(
            s.admit(&rules(), 0, &ask("lone", "lone", 1, 3600 * T)).0,
            Answer::Queued(4 * T)
        );
        let order = served(&mut s, 0, &["f0", "f1", "f2", "lone"]);
        assert_eq!(order[2], ("f2".into(), 3 * T));
    }

    #[test]
    fn an_unclaimed_turn_goes_stale_and_the_next_caller_takes_the_line() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("dead"), anon("b")]);
        // `dead` never claims its slot at T; `b`, due at 2T, waits for the
        // grace (2T) to run out on it, then goes.
        assert_eq!(s.claim(&rules(), 2 * T, "b").0, Answer::Queued(T));
        assert_eq!(s.claim(&rules(), 3 * T, "b").0, Answer::Granted);
        assert_eq!(s.claim(&rules(), 3 * T, "dead").0, Answer::Gone);
    }

    #[test]
    fn a_late_head_is_asked_for_again_one_interval_on() {
        let mut s = Schedule::default();
        let r = Rules {
            grace: 10 * T,
            ..rules()
        };
        for t in ["a", "late", "b"] {
            s.admit(&r, 0, &anon(t));
        }
        // `b`'s own slot (2T) has come, `late` has not claimed: one interval.
        assert_eq!(s.claim(&r, 2 * T, "b").0, Answer::Queued(T));
        assert_eq!(s.claim(&r, 2 * T, "late").0, Answer::Granted);
        assert_eq!(s.claim(&r, 3 * T, "b").0, Answer::Granted);
    }

    #[test]
    fn a_held_request_holds_every_grant_until_it_leaves_then_one_interval() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        // `a` did not leave by its slack: held for up to one interval.
        s.hold(&rules(), T / 100, "a", T);
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Queued(T / 100 + T));
        s.hold(&rules(), T / 2, "a", T);
        assert_eq!(
            s.claim(&rules(), T, "b").0,
            Answer::Queued(T / 2 + T),
            "held again"
        );
        // It leaves at 1.2 T: nothing within one interval of that.
        s.left(&rules(), T * 6 / 5, "a", true);
        assert_eq!(s.claim(&rules(), T * 6 / 5, "b").0, Answer::Queued(T));
        assert_eq!(s.claim(&rules(), T * 11 / 5, "b").0, Answer::Granted);
    }

    #[test]
    fn a_hold_from_a_replica_that_died_lapses() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        s.hold(&rules(), T / 100, "a", T);
        // Never renewed, never left: the line goes on one interval after it lapses.
        assert_eq!(s.claim(&rules(), T * 2 + T / 100, "b").0, Answer::Granted);
    }

    #[test]
    fn a_request_that_never_left_frees_the_line() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        s.hold(&rules(), T / 100, "a", 10 * T);
        s.left(&rules(), T / 2, "a", false);
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Granted);
    }

    #[test]
    fn pushback_holds_the_line_and_never_shortens() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b"), anon("c")]);
        s.pushback(&rules(), 0, 5 * T);
        s.pushback(&rules(), 0, T);
        assert_eq!(s.claim(&rules(), T, "b").0, Answer::Queued(4 * T));
        assert_eq!(s.claim(&rules(), 5 * T, "b").0, Answer::Granted);
        assert_eq!(s.claim(&rules(), 5 * T, "c").0, Answer::Queued(T));
    }

    #[test]
    fn a_next_slot_beyond_the_horizon_is_a_clock_step_and_is_reset() {
        let r = rules();
        let mut s = Schedule::default();
        // Granted and one waiting, an hour from now on the clock...
        let hour = 3600 * T;
        admit_all(&mut s, hour, &[anon("a"), anon("b")]);
        // ...which then steps back an hour: the next slot is an hour out.
        let (answer, reset) = s.admit(&r, 0, &anon("c"));
        assert!(reset, "reset reported");
        // One interval from now for the waiting one, and one more after it.
        assert_eq!(answer, Answer::Queued(2 * T));
        assert_eq!(s.claim(&r, 0, "b").0, Answer::Queued(T));
        assert_eq!(s.claim(&r, T, "b").0, Answer::Granted);
        // Within the horizon, nothing is reset.
        let (_, reset) = s.admit(&r, 0, &anon("d"));
        assert!(!reset);
        let mut far = Schedule::default();
        far.pushback(&r, 0, r.horizon);
        let (answer, reset) = far.admit(&r, 0, &anon("x"));
        let kept = Answer::Refused(Refusal::MaxWait, r.horizon - r.max_wait);
        assert_eq!((answer, reset), (kept, false), "at the horizon: kept");
    }

    #[test]
    fn a_ticket_whose_slot_is_its_deadline_is_granted_to_a_claim_a_little_late() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("first"));
        // Admitted with no time to spare, as a caller coming back when its
        // RetryInfo said is.
        assert_eq!(
            s.admit(&rules(), 0, &ask("exact", "x", 1, T)).0,
            Answer::Queued(T)
        );
        assert_eq!(
            s.admit(&rules(), 0, &ask("other", "y", 1, 2 * T)).0,
            Answer::Queued(2 * T)
        );
        // Its replica wakes 10 ms after the slot: still its.
        assert_eq!(s.claim(&rules(), T + 10_000, "exact").0, Answer::Granted);
        // Beyond the tolerance, a ticket is gone.
        let late = 2 * T + claim_late(T) + 1;
        assert_eq!(s.claim(&rules(), late, "other").0, Answer::Gone);
    }

    #[test]
    fn expired_tickets_leave_on_their_own() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("a"));
        s.admit(&rules(), 0, &ask("short", "x", 1, T * 3 / 2));
        s.admit(&rules(), 0, &anon("b"));
        s.pushback(&rules(), 0, 3 * T);
        assert_eq!(s.claim(&rules(), 2 * T, "short").0, Answer::Gone);
        assert_eq!(s.claim(&rules(), 3 * T, "b").0, Answer::Granted);
    }

    #[test]
    fn a_retried_admission_later_on_answers_with_the_time_left() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        assert_eq!(
            s.admit(&rules(), T / 4, &anon("b")).0,
            Answer::Queued(T * 3 / 4)
        );
    }

    #[test]
    fn a_refusal_later_on_says_how_long_from_then() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        // The tail's slot is at 2T: from T/2, 1.5 T away, and a deadline of
        // T reaches it half an interval later.
        assert_eq!(
            s.admit(&rules(), T / 2, &ask("late", "x", 1, T)).0,
            Answer::Refused(Refusal::Deadline, T / 2)
        );
    }

    #[test]
    fn fair_placement_pushes_a_ticket_that_can_afford_exactly_one_interval() {
        let mut s = Schedule::default();
        s.admit(&rules(), 0, &anon("first"));
        s.admit(&rules(), 0, &ask("f0", "flood", 1, 3600 * T));
        s.admit(&rules(), 0, &ask("f1", "flood", 1, 3600 * T));
        // Slot 3T, useful until 4T: one interval more is still on time.
        s.admit(&rules(), 0, &ask("f2", "flood", 1, 4 * T));
        assert_eq!(
            s.admit(&rules(), 0, &ask("lone", "lone", 1, 3600 * T)).0,
            Answer::Queued(2 * T)
        );
        let order = served(&mut s, 0, &["f0", "lone", "f1", "f2"]);
        assert_eq!(order[3], ("f2".into(), 4 * T), "{order:?}");
    }

    #[test]
    fn a_head_claiming_after_its_grace_still_gets_its_turn_if_nobody_took_it() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("slow"), anon("b")]);
        assert_eq!(s.claim(&rules(), 10 * T, "slow").0, Answer::Granted);
        assert_eq!(s.claim(&rules(), 10 * T, "b").0, Answer::Queued(T));
    }

    #[test]
    fn a_claim_from_behind_before_its_slot_says_when_the_slot_comes() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b"), anon("c")]);
        assert_eq!(s.claim(&rules(), 0, "c").0, Answer::Queued(2 * T));
        assert_eq!(s.claim(&rules(), T / 2, "c").0, Answer::Queued(T * 3 / 2));
    }

    #[test]
    fn left_says_whether_the_request_held_the_line() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        assert!(
            !s.left(&rules(), 0, "a", false),
            "never held: nothing moves"
        );
        s.hold(&rules(), T / 100, "a", T);
        assert!(s.left(&rules(), T / 2, "a", false), "held: the line moves");
        assert!(!s.left(&rules(), T / 2, "a", false), "once");
    }

    #[test]
    fn pushback_spends_the_burst_too() {
        let r = Rules {
            burst: 3,
            ..rules()
        };
        let mut s = Schedule::default();
        s.pushback(&r, 0, 5 * T);
        assert_eq!(s.admit(&r, 0, &anon("a")).0, Answer::Queued(5 * T));
        assert_eq!(s.claim(&r, 5 * T, "a").0, Answer::Granted);
        assert_eq!(s.admit(&r, 5 * T, &anon("b")).0, Answer::Queued(T));
        // A late departure likewise: one interval after it, burst or not.
        let mut s = Schedule::default();
        assert_eq!(s.admit(&r, 0, &anon("c")).0, Answer::Granted);
        s.left(&r, T, "c", true);
        assert_eq!(s.admit(&r, T, &anon("d")).0, Answer::Queued(T));
    }

    #[test]
    fn a_hold_lapses_at_its_end_exactly() {
        let mut s = Schedule::default();
        admit_all(&mut s, 0, &[anon("a"), anon("b")]);
        s.hold(&rules(), 0, "a", T / 2);
        assert_eq!(s.claim(&rules(), T / 2, "b").0, Answer::Queued(T / 2));
    }

    #[test]
    fn a_hold_beyond_the_horizon_is_a_clock_step_and_one_at_it_is_kept() {
        let r = rules();
        let hour = 3600 * T;
        let mut s = Schedule::default();
        assert_eq!(s.admit(&r, hour, &anon("a")).0, Answer::Granted);
        s.hold(&r, hour, "a", 10 * T);
        // The grant is long past (no `tat` left); the hold is not.
        assert_eq!(s.claim(&r, hour + 5 * T, "a").0, Answer::Granted);
        // The clock steps back an hour: the hold alone is beyond the horizon.
        assert_eq!(s.admit(&r, 0, &anon("b")), (Answer::Queued(T), true));
        // A hold as long as the horizon, asked for now, is legitimate.
        let mut s = Schedule::default();
        assert_eq!(s.admit(&r, 0, &anon("c")).0, Answer::Granted);
        s.hold(&r, 0, "c", 10 * r.horizon);
        let kept = Answer::Refused(Refusal::MaxWait, r.horizon + T - r.max_wait);
        assert_eq!(s.admit(&r, 0, &anon("d")), (kept, false));
    }
}
