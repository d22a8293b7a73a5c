//! The chaos suite: the real server under upstream faults, floods, SIGTERM
//! and long runs of failing calls. Every scenario is bounded in time (seconds
//! each) and runs in the normal suite (`scripts/test`).
//!
//! What every scenario asserts about every call: it ends with a *definite*
//! status before its deadline. Definite means OK, or a status the gateway
//! made itself (exactly one `ErrorInfo` in the `provisioning-gateway`
//! domain), received by the caller. The caller's tonic channel enforces the
//! `grpc-timeout` it sends (as tonic's server does too): an answer that
//! reaches the caller after its deadline shows as `CANCELLED "Timeout
//! expired"` without details, and fails the check; a hang fails the `HANG`
//! bound below.
//!
//! Scenarios: [`upstream_faults`] (500 storm, hanging upstream, connection
//! resets, 429 storms), [`redis_outage`] (Redis killed and restarted under
//! load), [`sigterm`] (SIGTERM to the binary under load), [`leaks`] (10,000
//! failing calls: live tasks and resident memory afterwards).

mod leaks;
mod redis_outage;
mod sigterm;
mod upstream_faults;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provisioning_gateway::pb::DeleteAssociationRequest;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::IntoRequest;
use tonic::transport::Channel;

use crate::support::details;

/// How far past its deadline a call may come back before it counts as a
/// hang: the caller's own scheduling on a loaded 2-core machine, not the
/// gateway's (whose lateness shows as a status without ErrorInfo).
const HANG: Duration = Duration::from_millis(750);

/// One call as its caller saw it.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<(), tonic::Status>,
    pub elapsed: Duration,
    pub deadline: Duration,
}

impl Outcome {
    /// `OK`, or `Code/REASON` of a status with an ErrorInfo, or
    /// `Code/no-details` of one without.
    pub fn label(&self) -> String {
        match &self.result {
            Ok(()) => "OK".into(),
            Err(s) => match details::error_infos(s).as_slice() {
                [info] => format!("{:?}/{}", s.code(), info.reason),
                [] => format!("{:?}/no-details", s.code()),
                many => format!("{:?}/{}-error-infos", s.code(), many.len()),
            },
        }
    }

    /// OK, or exactly one ErrorInfo in the gateway's domain.
    pub fn is_definite(&self) -> bool {
        match &self.result {
            Ok(()) => true,
            Err(s) => matches!(
                details::error_infos(s).as_slice(),
                [info] if info.domain == details::DOMAIN
            ),
        }
    }
}

/// Sends one call with `deadline` as its gRPC timeout; a call that has not
/// come back `HANG` after its deadline fails the test.
pub async fn call(
    client: &mut AssociationServiceClient<Channel>,
    request: impl IntoRequest<DeleteAssociationRequest>,
    deadline: Duration,
) -> Outcome {
    let mut request = request.into_request();
    request.set_timeout(deadline);
    let started = Instant::now();
    let answer = tokio::time::timeout(deadline + HANG, client.delete_association(request))
        .await
        .unwrap_or_else(|_| panic!("no answer {HANG:?} after a {deadline:?} deadline: a hang"));
    Outcome {
        result: answer.map(|_| ()),
        elapsed: started.elapsed(),
        deadline,
    }
}

/// Sends `requests` with at most `concurrency` in flight.
pub async fn storm<R: IntoRequest<DeleteAssociationRequest> + Send>(
    client: &AssociationServiceClient<Channel>,
    requests: impl IntoIterator<Item = (R, Duration)>,
    concurrency: usize,
) -> Vec<Outcome> {
    futures::stream::iter(requests)
        .map(|(request, deadline)| {
            let mut client = client.clone();
            async move { call(&mut client, request, deadline).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Every call ended with a definite status before its deadline.
pub fn assert_definite(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(
            o.is_definite(),
            "not a definite status: {:?} after {:?}",
            o.result,
            o.elapsed
        );
        assert!(
            o.elapsed < o.deadline + HANG,
            "{} came back after {:?}, past its {:?} deadline",
            o.label(),
            o.elapsed,
            o.deadline
        );
    }
}

/// Outcomes counted by label.
pub fn tally(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for o in outcomes {
        *t.entry(o.label()).or_default() += 1;
    }
    t
}

/// Gaps between consecutive upstream arrivals.
pub fn gaps(arrivals: &[provisioning_gateway::mock::Arrival]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1].at - w[0].at).collect()
}
