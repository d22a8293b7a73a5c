//! Background turns: slots no waiting call can use, for work that must
//! never delay an interactive call by more than one interval (batch items).

use std::time::Duration;

use tokio::time::Instant;

use super::{Line, Turn};
use crate::budget::BudgetError;
use crate::budget::store::{Answer, Ask, duration, new_ticket};
use crate::domain::Caller;

/// Shortest pause before background work asks again for an idle slot.
const IDLE_MIN_WAIT: Duration = Duration::from_millis(1);

impl Line {
    /// Waits for a slot no waiting call can use (the line empty, the slot
    /// free), for background work such as a batch item: interactive calls
    /// always go first, and one arriving just after waits one interval at
    /// most. No deadline: drop the future to stop waiting.
    pub(crate) async fn idle_turn(&self, caller: &Caller) -> Result<Turn, BudgetError> {
        let joined = Instant::now();
        let mut moved = self.store.moved();
        loop {
            moved.mark_unchanged();
            let ask = Ask {
                ticket: new_ticket(),
                lane: caller.id.to_string(),
                weight: caller.weight.get(),
                ready_in: 0,
                background: true,
            };
            let (answer, asked) = self.ask(&ask.ticket, self.store.admit(&ask)).await?;
            let wait = match answer {
                Answer::Granted => {
                    self.learn(Instant::now() + self.interval);
                    return Ok(Turn {
                        position: 0,
                        waited: Instant::now().saturating_duration_since(joined),
                        granted_at: asked,
                        ticket: ask.ticket,
                    });
                }
                Answer::Refused(_, wait) | Answer::Queued(wait) => duration(wait),
                Answer::Gone => self.interval,
            };
            // Ask again when the slot comes, or when a caller leaves the line.
            tokio::select! {
                biased;
                () = self.closing.cancelled() => return Err(BudgetError::ShuttingDown),
                () = tokio::time::sleep(wait.max(IDLE_MIN_WAIT)) => {}
                changed = moved.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(wait.max(IDLE_MIN_WAIT)).await;
                    }
                }
            }
        }
    }
}
