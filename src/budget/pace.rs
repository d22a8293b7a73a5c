//! How fast one replica's line moves, for admission: a line shared with
//! other replicas moves slower than the interval.

use std::time::Duration;

use tokio::time::Instant;

/// How fast this replica's line moves: the time between consecutive grants
/// while callers were waiting, smoothed. Alone on its budget it is the
/// interval; with other replicas drawing on the same Redis budget it is
/// longer (about the interval times the busy replicas), and admission must
/// use it, or calls are admitted that then time out in line.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    interval: Duration,
    smoothed: Duration,
    last_grant: Option<Instant>,
}

impl Pace {
    /// Weight of the newest gap, out of 8.
    const NEW_IN_8: u32 = 2;
    /// A gap counts up to this many intervals (a 429 pushback is not a pace).
    const MAX_INTERVALS: u32 = 8;
    /// After this many intervals without a grant the line has been idle:
    /// start again from the interval.
    const STALE_INTERVALS: u32 = 16;

    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            smoothed: interval,
            last_grant: None,
        }
    }

    /// The pace to expect now: at least as long as the line has already
    /// waited since the last grant (a replica the others outrun learns it
    /// at once, not a few grants later).
    pub(super) fn get(&self, now: Instant) -> Duration {
        match self.last_grant {
            Some(last) if now.saturating_duration_since(last) < self.stale() => {
                self.smoothed.max(now - last)
            }
            _ => self.interval,
        }
    }

    /// A slot was granted at `now` to a call that joined at `joined`: if it
    /// was already waiting at the previous grant, the gap is a sample.
    pub(super) fn granted(&mut self, now: Instant, joined: Instant) {
        if let Some(last) = self.last_grant {
            if now.saturating_duration_since(last) >= self.stale() {
                self.smoothed = self.interval;
            } else if joined <= last {
                let gap = (now - last).clamp(self.interval, self.interval * Self::MAX_INTERVALS);
                self.smoothed = (self.smoothed * (8 - Self::NEW_IN_8) + gap * Self::NEW_IN_8) / 8;
            }
        }
        self.last_grant = Some(now);
    }

    fn stale(&self) -> Duration {
        self.interval * Self::STALE_INTERVALS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1010);

    #[test]
    fn pace_follows_gaps_under_a_line_and_forgets_them_after_idle() {
        let t0 = Instant::now();
        let mut pace = Pace::new(T);
        pace.granted(t0, t0);
        assert_eq!(pace.get(t0), T);
        // The next caller was waiting already, and its slot came 3 T later.
        pace.granted(t0 + T * 3, t0);
        assert_eq!(pace.get(t0 + T * 3), T * 3 / 2, "6/8 T + 2/8 of 3 T");
        // A caller that arrived to an empty line says nothing about the pace.
        pace.granted(t0 + T * 9, t0 + T * 8);
        assert_eq!(pace.get(t0 + T * 9), T * 3 / 2);
        // A pushback-long gap (12 T) counts as 8 T at most.
        pace.granted(t0 + T * 21, t0 + T * 9);
        assert_eq!(
            pace.get(t0 + T * 21),
            T * 25 / 8,
            "6/8 of 1.5 T + 2/8 of 8 T"
        );
        // Idle for 16 T: back to the interval.
        assert_eq!(pace.get(t0 + T * 37), T);
        pace.granted(t0 + T * 40, t0 + T * 20);
        assert_eq!(pace.get(t0 + T * 40), T, "a stale gap is no sample");
    }
}
