//! Redis killed and restarted under load, twice, with two replicas on the
//! `deny` fallback: while Redis is gone every call is answered at once
//! (UNAVAILABLE / BUDGET_BACKEND_UNAVAILABLE), nothing goes upstream, and the
//! shared spacing holds over the whole run. (tests/redis.rs covers the
//! `local` fallback under load.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use provisioning_gateway::config::RedisFallback;
use tokio_util::sync::CancellationToken;

use super::{Outcome, assert_definite, call, gaps, tally};
use crate::support::redis::RedisServer;
use crate::support::{Opts, request, spawn_gateway, spawn_mock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_every_call_answered_in_time() {
    let mut redis = RedisServer::start();
    // 10/s with a 100 ms margin (T = 200 ms): the vendor's 100 ms interval
    // holds unless a request is delayed on its way by over 100 ms, which a
    // first connection of a debug build on a loaded machine can otherwise be.
    let (mock, addr, _stop) = spawn_mock(10).await;
    let opts = Opts {
        rate_per_second: 10,
        safety_margin: Duration::from_millis(100),
        ..Opts::default()
    }
    .redis(&redis.url(), RedisFallback::Deny, 2);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas
            .push(spawn_gateway(opts.clone(), mock.clone(), addr, CancellationToken::new()).await);
    }

    // 8 callers per replica, one call after another, 1 s deadlines.
    let stop = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for app in &replicas {
        let client = app.client().await;
        for _ in 0..8 {
            let (mut c, stop, ids) = (client.clone(), Arc::clone(&stop), Arc::clone(&ids));
            load.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let n = ids.fetch_add(1, Ordering::Relaxed);
                    let o = call(&mut c, request(n), Duration::from_secs(1)).await;
                    let refused = o.result.is_err();
                    outcomes.push((Instant::now(), o));
                    if refused {
                        tokio::time::sleep(Duration::from_millis(20)).await; // no hot loop
                    }
                }
                outcomes
            }));
        }
    }
    let mut outages = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        redis.kill();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_millis(800)).await;
        redis.restart();
        outages.push((down, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes: Vec<(Instant, Outcome)> = Vec::new();
    for l in load {
        outcomes.extend(l.await.unwrap());
    }

    let (_, plain): (Vec<Instant>, Vec<Outcome>) = outcomes.into_iter().unzip();
    assert_definite(&plain);
    let t = tally(&plain);
    assert!(t.get("OK").copied().unwrap_or(0) >= 3, "{t:?}");
    assert!(
        t.get("Unavailable/BUDGET_BACKEND_UNAVAILABLE")
            .copied()
            .unwrap_or(0)
            > 0,
        "the outages were seen: {t:?}"
    );
    // Only 204s upstream, never closer than the vendor's 100 ms, across both
    // outages and recoveries; nothing sent while Redis was down.
    let arrivals = mock.arrivals();
    let statuses: Vec<u16> = arrivals.iter().map(|a| a.status).collect();
    let gaps = gaps(&arrivals);
    assert!(
        statuses.iter().all(|s| *s == 204),
        "the vendor refused some: {statuses:?}, gaps {gaps:?}, outages {outages:?}, {t:?}"
    );
    let min = gaps.iter().min().unwrap();
    assert!(
        *min >= Duration::from_millis(100),
        "arrivals {min:?} apart: {gaps:?}"
    );
    for &(down, up) in &outages {
        let during = arrivals
            .iter()
            .filter(|a| a.at > down + Duration::from_millis(300) && a.at < up)
            .count();
        assert_eq!(
            during, 0,
            "sent upstream while Redis was down (deny fallback)"
        );
    }
    let served_after = arrivals
        .iter()
        .filter(|a| a.at > Instant::now() - Duration::from_millis(1400))
        .count();
    assert!(
        served_after > 0,
        "back on the shared budget after the restart"
    );
}
