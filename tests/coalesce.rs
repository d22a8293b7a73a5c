//! Single flight through the real server: identical calls at the same time
//! cost one slot and one upstream call, and each caller keeps its own
//! deadline.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tonic::Code;
use tonic_types::StatusExt;

use provisioning_gateway::telemetry::metrics::{COALESCED, QUEUE_DEPTH};

use crate::support::{
    Opts, details, metric, request, series, spawn_app, until_metric, with_timeout,
};

#[tokio::test]
async fn identical_concurrent_calls_share_one_upstream_call() {
    let app = spawn_app(Opts {
        rate_per_second: 5,
        // The first call opens the connection: keep a retry (429) out of it.
        safety_margin: Duration::from_millis(50),
        ..Opts::default()
    })
    .await;
    let client = app.client().await;
    // Take the slot first, so the storm below waits in line together.
    client.clone().delete_association(request(9)).await.unwrap();
    // A retry storm: ten callers, the same association, at the same time;
    // and one other association among them.
    let calls = (0..11).map(|i| {
        let mut c = client.clone();
        let n = if i == 5 { 1 } else { 0 };
        async move { c.delete_association(request(n)).await }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let arrivals = app.mock.arrivals();
    let seen: Vec<_> = arrivals
        .iter()
        .map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
        .collect();
    assert_eq!(
        arrivals.len(),
        3,
        "one upstream call per association: {seen:?}"
    );
    // Later, the same call again is a new call (Infobip answers 404 now).
    let status = client
        .clone()
        .delete_association(request(0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_follower_answers_by_its_own_deadline_without_disturbing_the_leader() {
    // 1/s: after the first call the next slot is ~1 s away.
    let app = spawn_app(Opts {
        rate_per_second: 1,
        safety_margin: Duration::from_millis(50),
        account_name: "follower-deadline".into(),
        ..Opts::default()
    })
    .await;
    let client = app.client().await;
    client.clone().delete_association(request(0)).await.unwrap();
    let mut leader = client.clone();
    let leading = tokio::spawn(async move {
        leader
            .delete_association(with_timeout(request(1), Duration::from_secs(5)))
            .await
    });
    // It waits for the slot.
    let depth = series(QUEUE_DEPTH, "follower-deadline");
    until_metric(app.metrics_addr, &depth, 1.0).await;
    let started = Instant::now();
    let status = client
        .clone()
        .delete_association(with_timeout(request(1), Duration::from_millis(400)))
        .await
        .unwrap_err();
    let refused_by = Instant::now();
    let took = refused_by - started;
    assert!(
        took < Duration::from_millis(400),
        "answered in time ({took:?})"
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = details::error_info_with(&status, "BUDGET_EXHAUSTED");
    assert_eq!(info.metadata["rejection"], "timed_out");
    // When a slot could be had: not before the leader's (T = 1.05 s after
    // the first call's; ~0.6 s after the refusal on a quiet machine), not
    // "now". Counted from the first arrival, which the emulator stamps a
    // little after its grant (allowed: 250 ms), so a machine too loaded to
    // refuse the follower in time shortens the bound instead of failing.
    let retry = status.get_error_details().retry_info().unwrap().retry_delay;
    let retry = retry.expect("a retry delay");
    let leaders_slot = app.mock.arrivals()[0].at + Duration::from_millis(1050);
    let floor = leaders_slot.saturating_duration_since(refused_by + Duration::from_millis(250));
    assert!(
        retry >= floor && retry <= Duration::from_secs(3),
        "{retry:?}, expected at least {floor:?}"
    );
    // It followed the leader's flight (no line of its own), and the leader
    // is served at its slot, once.
    let coalesced = series(COALESCED, "follower-deadline");
    assert_eq!(metric(app.metrics_addr, &coalesced).await, Some(1.0));
    leading.await.unwrap().unwrap();
    assert_eq!(app.mock.arrivals().len(), 2);
}

#[tokio::test]
async fn the_call_goes_on_for_a_follower_when_its_leader_leaves() {
    let app = spawn_app(Opts {
        rate_per_second: 2,
        // The first call opens the connection: keep a retry (429) out of it.
        safety_margin: Duration::from_millis(50),
        account_name: "leader-leaves".into(),
        ..Opts::default()
    })
    .await;
    let (depth, coalesced) = (
        series(QUEUE_DEPTH, "leader-leaves"),
        series(COALESCED, "leader-leaves"),
    );
    let client = app.client().await;
    client.clone().delete_association(request(0)).await.unwrap(); // next slot ~550 ms away
    let mut leader = client.clone();
    let leading = tokio::spawn(async move { leader.delete_association(request(1)).await });
    until_metric(app.metrics_addr, &depth, 1.0).await; // the leader waits for the slot
    let mut follower = client.clone();
    let following = tokio::spawn(async move { follower.delete_association(request(1)).await });
    until_metric(app.metrics_addr, &coalesced, 1.0).await; // the follower joined its flight
    assert_eq!(
        app.mock.arrivals().len(),
        1,
        "the flight waits for its slot"
    );
    leading.abort(); // the leader's caller goes away
    following.await.unwrap().unwrap();
    let arrivals = app.mock.arrivals();
    assert_eq!(arrivals.len(), 2);
    assert!(String::from_utf8_lossy(&arrivals[1].body).contains("number-key-1"));
    assert!(leading.await.unwrap_err().is_cancelled());
    assert_eq!(
        metric(app.metrics_addr, &coalesced).await,
        Some(1.0),
        "one flight: the follower did not start its own"
    );
}
