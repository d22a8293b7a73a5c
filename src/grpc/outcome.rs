//! What a flight's outcome means for one caller: [`settle`] applies the
//! caller's `allow_missing` to the outcome every caller of the flight shares,
//! and [`effect`] says whether it may have changed anything at Infobip,
//! which decides what an idempotency record keeps. Batch items use both too.

use super::status::CallError;
use crate::budget::{BudgetError, Rejection};
use crate::upstream::TransportError;

/// The outcome as this caller answers it: with `allow_missing` (the caller's
/// flag, or an earlier attempt that may have deleted it: a retry after an
/// unknown outcome, a redelivered batch request), an upstream 404 is OK
/// (the association is gone either way).
pub(super) fn settle(result: Result<(), CallError>, allow_missing: bool) -> Result<(), CallError> {
    match result {
        Err(CallError::Upstream(reply)) if allow_missing && reply.status == 404 => Ok(()),
        other => other,
    }
}

/// Whether an outcome may have changed anything upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// Nothing was sent, or Infobip's answer says it did not take effect
    /// (429, 503; no connection): the attempts' own retry rule.
    None,
    /// Sent, and nothing says whether it took effect: no answer in time, a
    /// broken connection, a server error that is not a refusal (500, 502,
    /// 504, …).
    Unknown,
    /// Infobip's answer settles it (2xx, or a 4xx other than 429).
    Definitive,
}

/// The effect of a caller's `result`. A caller that shared another's flight
/// (`coalesced`) and gave up waiting for it before anything was sent cannot
/// know: the flight goes on for the others and may still send.
pub(super) fn effect(result: &Result<(), CallError>, coalesced: bool) -> Effect {
    match result {
        Ok(()) => Effect::Definitive,
        Err(CallError::Upstream(reply)) => match reply.status {
            429 | 503 => Effect::None,
            400..=499 | 200..=299 => Effect::Definitive,
            _ => Effect::Unknown,
        },
        Err(CallError::Transport(TransportError::Connect)) => Effect::None,
        Err(CallError::Transport(_)) => Effect::Unknown,
        Err(CallError::Budget(BudgetError::Exhausted {
            reason: Rejection::TimedOut,
            ..
        })) if coalesced => Effect::Unknown,
        Err(_) => Effect::None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::Reply;

    fn http(status: u16) -> Result<(), CallError> {
        Err(CallError::Upstream(Reply::new(
            status,
            &Default::default(),
            b"",
        )))
    }

    #[test]
    fn allow_missing_turns_a_404_and_nothing_else_into_ok() {
        assert!(settle(http(404), true).is_ok());
        assert!(matches!(settle(http(404), false), Err(CallError::Upstream(r)) if r.status == 404));
        for other in [400, 403, 409, 429, 500] {
            assert!(settle(http(other), true).is_err(), "{other}");
        }
        assert!(settle(Ok(()), false).is_ok());
        let timeout = Err(CallError::Transport(TransportError::Timeout));
        assert!(settle(timeout, true).is_err());
    }

    #[test]
    fn only_what_may_have_taken_effect_is_kept_as_such() {
        let timed_out = || {
            Err(CallError::Budget(BudgetError::Exhausted {
                reason: Rejection::TimedOut,
                retry_after: Duration::from_secs(1),
            }))
        };
        let table = [
            (Ok(()), false, Effect::Definitive),
            (http(204), false, Effect::Definitive),
            (http(400), false, Effect::Definitive),
            (http(404), false, Effect::Definitive),
            (http(409), false, Effect::Definitive),
            (http(429), false, Effect::None),
            (http(503), false, Effect::None),
            (http(500), false, Effect::Unknown),
            (http(502), false, Effect::Unknown),
            (http(504), false, Effect::Unknown),
            (Err(TransportError::Connect.into()), false, Effect::None),
            (Err(TransportError::Broken.into()), false, Effect::Unknown),
            (Err(TransportError::Timeout.into()), false, Effect::Unknown),
            (Err(BudgetError::ShuttingDown.into()), false, Effect::None),
            (
                Err(BudgetError::BackendUnavailable.into()),
                true,
                Effect::None,
            ),
            (timed_out(), false, Effect::None),
            (timed_out(), true, Effect::Unknown),
        ];
        for (result, coalesced, want) in table {
            assert_eq!(effect(&result, coalesced), want, "{result:?} {coalesced}");
        }
    }
}
