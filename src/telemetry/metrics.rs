//! Prometheus metrics (the `metrics` facade, rendered by
//! metrics-exporter-prometheus at `/metrics`). Labels stay bounded: accounts
//! come from configuration, codes and statuses from fixed sets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "provisioning_gateway_requests_total";
pub const REQUEST_DURATION: &str = "provisioning_gateway_request_duration_seconds";
pub const UPSTREAM_REQUESTS: &str = "provisioning_gateway_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "provisioning_gateway_upstream_duration_seconds";
pub const BUDGET_WAIT: &str = "provisioning_gateway_budget_wait_seconds";
pub const QUEUE_DEPTH: &str = "provisioning_gateway_budget_queue_depth";
pub const REJECTIONS: &str = "provisioning_gateway_budget_rejections_total";
pub const DEGRADED: &str = "provisioning_gateway_budget_backend_degraded";
pub const BACKEND_ERRORS: &str = "provisioning_gateway_budget_backend_errors_total";
pub const CLOCK_SKEW: &str = "provisioning_gateway_budget_redis_clock_skew_seconds";
pub const COALESCED: &str = "provisioning_gateway_coalesced_calls_total";
pub const LATE_SENDS: &str = "provisioning_gateway_upstream_late_sends_total";
pub const CLOCK_RESETS: &str = "provisioning_gateway_budget_clock_resets_total";

/// Histogram buckets in seconds: a few ms (refusals, fast upstream) to the
/// longest waits (`--max-wait` defaults to 30 s).
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The process-wide Prometheus recorder, installed on first use (several
/// gateways in one test process share it). `App::build` calls it before it
/// builds anything that emits, so no early value is lost.
pub(crate) fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("the bucket list is a non-empty constant")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; metrics then
            // go there and /metrics renders an empty page rather than crash.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            gauge!(DEGRADED).set(0.0);
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        REQUESTS,
        "DeleteAssociation calls answered, by account, caller and gRPC code"
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "DeleteAssociation call duration, by gRPC code"
    );
    describe_counter!(
        UPSTREAM_REQUESTS,
        "Infobip attempts, by account and HTTP status (or timeout/unreachable)"
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        metrics::Unit::Seconds,
        "Infobip attempt duration"
    );
    describe_histogram!(
        BUDGET_WAIT,
        metrics::Unit::Seconds,
        "Time calls waited for their budget slot, by account"
    );
    describe_gauge!(QUEUE_DEPTH, "Calls waiting for a budget slot, by account");
    describe_counter!(
        REJECTIONS,
        "Calls refused by the budget, by account and reason"
    );
    describe_gauge!(
        DEGRADED,
        "1 while the shared budget backend is unreachable and a fallback applies"
    );
    describe_counter!(
        BACKEND_ERRORS,
        "Failed or timed-out calls to the shared budget backend (Redis)"
    );
    describe_gauge!(
        CLOCK_SKEW,
        metrics::Unit::Seconds,
        "Redis' clock minus this replica's (informational: decisions use Redis' clock)"
    );
    describe_counter!(
        LATE_SENDS,
        "Upstream requests that left later than their slot allowed for (the next slot moved), by account"
    );
    describe_counter!(
        CLOCK_RESETS,
        "Times an account's next slot was found beyond any horizon the gateway sets (a clock stepped back) and reset to now, by account"
    );
    describe_counter!(
        COALESCED,
        "Calls that joined an identical call's upstream call (counted as they join), by account"
    );
}

/// A call that joined an identical call's upstream call (counted as it joins).
pub fn coalesced(account: &str) {
    counter!(COALESCED, "account" => account.to_owned()).increment(1);
}

/// An upstream request left late; the account's next slot moved.
pub fn late_send(account: &str) {
    counter!(LATE_SENDS, "account" => account.to_owned()).increment(1);
}

/// One answered call; `caller` is a bounded label (configured names,
/// `anonymous`, `unlisted`, `unknown`).
pub fn request(account: &str, caller: &str, code: tonic::Code, elapsed: Duration) {
    let code = format!("{code:?}");
    counter!(REQUESTS, "account" => account.to_owned(), "caller" => caller.to_owned(), "code" => code.clone()).increment(1);
    histogram!(REQUEST_DURATION, "code" => code).record(elapsed.as_secs_f64());
}

/// One upstream attempt; `status` is the HTTP status or `timeout`/`unreachable`.
pub fn upstream(account: &str, status: String, elapsed: Duration) {
    counter!(UPSTREAM_REQUESTS, "account" => account.to_owned(), "status" => status).increment(1);
    histogram!(UPSTREAM_DURATION, "account" => account.to_owned()).record(elapsed.as_secs_f64());
}

/// A granted budget slot and how long it took.
pub fn budget_wait(account: &str, waited: Duration) {
    histogram!(BUDGET_WAIT, "account" => account.to_owned()).record(waited.as_secs_f64());
}

/// A call refused by the budget.
pub fn rejection(account: &str, reason: &'static str) {
    counter!(REJECTIONS, "account" => account.to_owned(), "reason" => reason).increment(1);
}

/// Calls waiting on an account now.
pub fn queue_depth(account: &str, depth: usize) {
    gauge!(QUEUE_DEPTH, "account" => account.to_owned()).set(depth as f64);
}

/// The store found its next slot beyond any horizon (a clock stepped back) and reset it.
pub fn clock_reset(account: &str) {
    counter!(CLOCK_RESETS, "account" => account.to_owned()).increment(1);
}
