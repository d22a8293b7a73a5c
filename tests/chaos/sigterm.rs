//! SIGTERM to the real binary with 50 callers on it: the one in flight
//! upstream finishes, the 49 queued are answered UNAVAILABLE/SHUTTING_DOWN,
//! and calls sent during the drain are refused, never left hanging.

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::Code;
use tonic_types::StatusExt;

use super::{Outcome, call, tally};
use crate::support::process::GatewayProcess;
use crate::support::{request, spawn_mock};

const CALLERS: usize = 50;

/// The gateway's current queue depth, from its /metrics.
async fn queue_depth(metrics_addr: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://{metrics_addr}/metrics")).await else {
        return -1.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("provisioning_gateway_budget_queue_depth{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn sigterm_under_load_answers_every_caller() {
    let (mock, mock_addr, _stop) = spawn_mock(1).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("GATEWAY_RATE_PER_SECOND", "1"),
            ("GATEWAY_MAX_WAIT", "120s"),
            ("GATEWAY_SHUTDOWN_GRACE", "10s"),
        ],
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = AssociationServiceClient::new(channel);

    // The first caller's request stays with Infobip for 1.5 s; the other 49
    // line up behind it (1 rps).
    let mut slow = Scripted::new(204, "");
    slow.delay = Duration::from_millis(1500);
    mock.script([slow]);
    // Long enough for all 49 to be admitted: the 49th's turn is ~49.5 s away.
    let deadline = Duration::from_secs(60);
    let callers: Vec<_> = (0..CALLERS)
        .map(|n| {
            let mut c = client.clone();
            tokio::spawn(async move { call(&mut c, request(n), deadline).await })
        })
        .collect();
    mock.wait_for_requests(1).await;
    let started = Instant::now();
    // All are in: those in line plus those served since (at most one a second).
    while queue_depth(&gateway.metrics_addr).await + started.elapsed().as_secs_f64().floor()
        < (CALLERS - 1) as f64
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "callers did not line up: depth {}",
            queue_depth(&gateway.metrics_addr).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pid = gateway.child.id().unwrap().to_string();
    let signalled = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Calls sent while it drains, on the same connection.
    let late: Vec<_> = (0..10)
        .map(|n| {
            let mut c = client.clone();
            tokio::spawn(
                async move { call(&mut c, request(1000 + n), Duration::from_secs(5)).await },
            )
        })
        .collect();

    let mut outcomes: Vec<Outcome> = Vec::new();
    for c in callers {
        outcomes.push(c.await.unwrap());
    }
    let (status, logs) = gateway.terminate().await; // a second SIGTERM is harmless
    assert!(status.success(), "exit {status:?}: {logs:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "drained within the grace"
    );

    let t = tally(&outcomes);
    let ok = t.get("OK").copied().unwrap_or(0);
    assert!(ok >= 1, "the call in flight upstream finished: {t:?}");
    assert_eq!(
        ok + t.get("Unavailable/SHUTTING_DOWN").copied().unwrap_or(0),
        CALLERS,
        "every caller got OK or UNAVAILABLE/SHUTTING_DOWN: {t:?}"
    );
    for o in &outcomes {
        assert!(o.elapsed < o.deadline, "{o:?}");
    }
    assert_eq!(
        mock.arrivals().len(),
        ok,
        "only the served calls reached Infobip"
    );

    // Calls that reach the draining gateway are answered SHUTTING_DOWN; calls
    // refused before they reach it (GOAWAY, connection refused) fail in the
    // client as UNAVAILABLE without details. Both say "not done, try
    // elsewhere"; neither hangs, none is anything else, none went upstream.
    let mut late_outcomes = Vec::new();
    for c in late {
        late_outcomes.push(c.await.unwrap());
    }
    for o in &late_outcomes {
        let status = o.result.as_ref().expect_err("the gateway is draining");
        // A call that arrives before the process has handled the signal is
        // served by the normal rules: behind 49 queued calls at 1 rps it is
        // refused at once as hopeless. That is a definite answer too.
        let hopeless = status.code() == Code::ResourceExhausted
            && status
                .get_error_details()
                .error_info()
                .map(|i| i.reason.as_str())
                == Some("BUDGET_EXHAUSTED");
        assert!(status.code() == Code::Unavailable || hopeless, "{o:?}");
        assert!(o.elapsed < o.deadline, "{o:?}");
    }
    assert_eq!(mock.arrivals().len(), ok);
    eprintln!("late calls: {:?}", tally(&late_outcomes));
}
