//! A deletion as the handler runs it: through the flight (identical calls
//! share one), its outcome settled by the caller's `allow_missing`; and,
//! when it carries a `request_id`, at most once per (account, caller,
//! request_id) within 24 hours: a retry answers the stored outcome, joins
//! the call still running, or runs again where the first call's outcome is
//! unknown (then an upstream 404 answers OK: the first may have deleted it).

use futures::FutureExt;
use futures::future::Either;
use tokio::time::timeout_at;
use tonic::Code;
use tonic_types::pb::Status as RpcStatus;

use super::attempt::{ANSWER_MARGIN, Sender};
use super::flight::{Call, Flights};
use super::outcome::{Effect, effect, settle};
use super::report::Report;
use super::status::{CallError, to_rpc};
use crate::domain::{Association, Deletion, RequestId};
use crate::idempotency::{Begun, End, Fingerprint, Key, Records};

/// What a deletion runs with.
pub(super) struct Deleter<'a> {
    pub(super) flights: &'a Flights,
    pub(super) sender: &'a Sender,
    pub(super) records: &'a Records,
}

impl Deleter<'_> {
    /// Runs `deletion` for `caller` (the identity as `auth` knows it). Not
    /// an async fn around the flight: a waiting call holds the flight's
    /// future only; the `request_id` path is boxed, so a call without one
    /// holds no room for the record.
    pub(super) fn delete<'a>(
        &'a self,
        call: Call<'a>,
        caller: &'a str,
        deletion: Deletion,
        report: &'a mut Report,
    ) -> impl Future<Output = Result<(), CallError>> + Send + 'a {
        let Deletion {
            association,
            allow_missing,
            request_id,
        } = deletion;
        match request_id {
            None => Either::Left(
                self.flights
                    .fly(self.sender, call, association, report)
                    .map(move |result| settle(result, allow_missing)),
            ),
            Some(request_id) => Either::Right(Box::pin(self.once(
                call,
                caller,
                association,
                allow_missing,
                request_id,
                report,
            ))),
        }
    }

    /// [`Self::delete`] of a deletion with a `request_id`.
    async fn once(
        &self,
        call: Call<'_>,
        caller: &str,
        association: Association,
        allow_missing: bool,
        request_id: RequestId,
        report: &mut Report,
    ) -> Result<(), CallError> {
        let (account, deadline) = (call.account, call.deadline);
        let key = Key::new(account.name(), caller, &request_id);
        let fingerprint = Fingerprint::of(&association, allow_missing);
        let patience = deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline);
        let records = self.records;
        let claim = match records.begin(key, fingerprint, deadline, patience).await? {
            Begun::Run(claim) => claim,
            Begun::Replay(status) => {
                report.replayed = true;
                return match status.code == Code::Ok as i32 {
                    true => Ok(()),
                    false => Err(CallError::Replayed(status)),
                };
            }
        };
        let result = self.flights.fly(self.sender, call, association, report);
        let result = settle(result.await, allow_missing || claim.prior_unknown());
        let end = match effect(&result, report.coalesced) {
            Effect::None => End::NothingSent,
            Effect::Unknown => End::Unknown,
            Effect::Definitive => End::Done(match &result {
                Ok(()) => RpcStatus::default(),
                Err(error) => to_rpc(&error.to_status(account.name())),
            }),
        };
        // Recorded before the answer leaves, so a retry right after it finds
        // it; never past the deadline (unrecorded, the lease lapses and the
        // record reads as unknown).
        let _ = timeout_at(deadline, claim.finish(end)).await;
        result
    }
}
