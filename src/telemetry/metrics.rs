//! Prometheus metrics (the `metrics` facade, rendered by
//! metrics-exporter-prometheus at `/metrics`), with the process metrics of
//! metrics-process and a build-info gauge. Labels stay bounded: accounts
//! come from configuration, codes (gRPC's canonical names) and statuses
//! from fixed sets. Each histogram has buckets that fit what it measures.

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

pub const BUILD_INFO: &str = "provisioning_gateway_build_info";

/// Buckets of a whole call (seconds): refusals in a millisecond or two,
/// served calls in a budget wait plus an upstream round trip.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Buckets of the budget wait (seconds): up to a minute (`--max-wait` is
/// 30 s by default), with room between 1 s and 30 s, where the queue of a
/// 1 request/second account spends its time (a p90 alert reads them).
const BUDGET_WAIT_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];
/// Buckets of one upstream attempt (seconds, millisecond steps): Infobip
/// answers in tens to hundreds of milliseconds; the attempt's timeout
/// (`--upstream-timeout`, 10 s by default) ends the scale.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use (several
/// gateways in one test process share it). `App::build` calls it before it
/// builds anything that emits, so no early value is lost.
pub(crate) fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = |builder: PrometheusBuilder, name: &str, buckets: &[f64]| {
                builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("each bucket list is a non-empty constant")
            };
            let builder = buckets(PrometheusBuilder::new(), REQUEST_DURATION, REQUEST_BUCKETS);
            let builder = buckets(builder, BUDGET_WAIT, BUDGET_WAIT_BUCKETS);
            let builder = buckets(builder, UPSTREAM_DURATION, UPSTREAM_BUCKETS);
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; metrics then
            // go there and /metrics renders an empty page rather than crash.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            process().describe();
            gauge!(DEGRADED).set(0.0);
            gauge!(
                BUILD_INFO,
                "version" => env!("CARGO_PKG_VERSION"),
                "rustc" => env!("PG_RUSTC_VERSION"),
            )
            .set(1.0);
            handle
        })
        .clone()
}

/// The process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, …), read from the OS.
fn process() -> &'static metrics_process::Collector {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    PROCESS.get_or_init(metrics_process::Collector::default)
}

/// The `/metrics` page: the process metrics read now, then every metric.
pub(crate) fn render(handle: &PrometheusHandle) -> String {
    process().collect();
    handle.render()
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
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the gateway's version and the Rust compiler that built it"
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
    let code = code_name(code);
    counter!(REQUESTS, "account" => account.to_owned(), "caller" => caller.to_owned(), "code" => code).increment(1);
    histogram!(REQUEST_DURATION, "code" => code).record(elapsed.as_secs_f64());
}

/// The canonical name of a gRPC status code (`OK`, `NOT_FOUND`, …), as
/// gRPC's own libraries and dashboards spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpcs_canonical_names() {
        let names: Vec<&str> = (0..=16)
            .map(|c| code_name(tonic::Code::from_i32(c)))
            .collect();
        assert_eq!(
            names.join(" "),
            "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS \
             PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE \
             UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED"
        );
    }
}
