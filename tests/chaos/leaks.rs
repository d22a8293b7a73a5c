//! 10,000 failing calls in a row (invalid requests, unknown accounts,
//! upstream 500s), then: live tasks back to where they were (in process,
//! tokio's runtime metrics) and no growth of the binary's resident memory.
//!
//! Both compare against a warm-up run of the same mix, so connection pools,
//! allocator arenas and metric series already exist: what is left is growth
//! per call, which 10,000 calls would make plain.

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::DeleteAssociationRequest;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;

use super::{Outcome, assert_definite, storm, tally};
use crate::support::process::GatewayProcess;
use crate::support::{Opts, request, spawn_app, spawn_mock};

/// Failing calls per test after the warm-up: the 10,000 (a debug
/// build does ~500 such calls a second on 2 cores); `CHAOS_FAILING_CALLS`
/// lowers it for a quick local run.
fn calls() -> usize {
    std::env::var("CHAOS_FAILING_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const CONCURRENCY: usize = 16;

/// `n` failing calls: 2/5 invalid, 2/5 for an account that does not exist,
/// 1/5 answered 500 by Infobip.
fn failing(n: usize) -> Vec<(tonic::Request<DeleteAssociationRequest>, Duration)> {
    (0..n)
        .map(|i| {
            let mut r = match i % 5 {
                0 | 1 => tonic::Request::new(DeleteAssociationRequest::default()),
                _ => tonic::Request::new(request(i)),
            };
            if i % 5 >= 2 && i % 5 <= 3 {
                r.metadata_mut()
                    .insert("x-infobip-account", "nobody".parse().unwrap());
            }
            (r, Duration::from_secs(5))
        })
        .collect()
}

fn script_500s(mock: &provisioning_gateway::mock::Mock, n: usize) {
    mock.script(std::iter::repeat_n(Scripted::new(500, "{}"), n.div_ceil(5)));
}

fn assert_all_failed(outcomes: &[Outcome]) {
    assert_definite(outcomes);
    let t = tally(outcomes);
    assert!(!t.contains_key("OK"), "{t:?}");
    assert_eq!(
        t.get("InvalidArgument/INVALID_REQUEST")
            .copied()
            .unwrap_or(0)
            + t.get("InvalidArgument/UNKNOWN_ACCOUNT")
                .copied()
                .unwrap_or(0)
            + t.get("Internal/UPSTREAM_HTTP_500").copied().unwrap_or(0),
        outcomes.len(),
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_failing_calls_leave_no_tasks_behind() {
    let app = spawn_app(Opts {
        rate_per_second: 1000,
        safety_margin: Duration::ZERO,
        ..Opts::default()
    })
    .await;
    let client = app.client().await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };

    script_500s(&app.mock, 1000);
    assert_all_failed(&storm(&client, failing(1000), CONCURRENCY).await);
    let warm = tasks();

    let calls = calls();
    script_500s(&app.mock, calls);
    assert_all_failed(&storm(&client, failing(calls), CONCURRENCY).await);
    // Per-stream tasks end just after their answer is written: allow them a moment.
    let started = Instant::now();
    let mut now = tasks();
    while now > warm + CONCURRENCY && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = tasks();
    }
    assert!(
        now <= warm + CONCURRENCY,
        "live tasks grew from {warm} to {now} over {calls} failing calls"
    );
}

/// `VmRSS` of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS in /proc/<pid>/status")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_failing_calls_do_not_grow_the_binarys_memory() {
    let (mock, mock_addr, _stop) = spawn_mock(1000).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("GATEWAY_RATE_PER_SECOND", "1000"),
            ("GATEWAY_SAFETY_MARGIN", "0ms"),
        ],
    )
    .await;
    let pid = gateway.child.id().unwrap();
    let client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();

    script_500s(&mock, 1000);
    assert_all_failed(&storm(&client, failing(1000), CONCURRENCY).await);
    let warm = rss(pid);
    let calls = calls();
    script_500s(&mock, calls);
    assert_all_failed(&storm(&client, failing(calls), CONCURRENCY).await);
    let after = rss(pid);

    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "RSS after warm-up {:.1} MiB, after {calls} more failing calls {:.1} MiB",
        mib(warm),
        mib(after)
    );
    // A leak of 1 KiB per call would add about 10 MiB.
    assert!(
        after <= warm + 4 * 1024 * 1024,
        "RSS grew from {:.1} MiB to {:.1} MiB over {calls} failing calls",
        mib(warm),
        mib(after)
    );
    let (status, _) = gateway.terminate().await;
    assert!(status.success());
}
