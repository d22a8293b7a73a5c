//! The Redis backend against a real `redis-server` (each test starts its own
//! on a free port): replicas sharing one budget,
//! clock skew, shared pushback, and losing Redis under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use provisioning_gateway::config::RedisFallback;
use provisioning_gateway::mock::{Arrival, Mock, Scripted};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::redis::RedisServer;
use crate::support::{
    Opts, TestApp, healthz, request, spawn_gateway, spawn_mock, spawn_open_mock, with_timeout,
};

/// The vendor's interval at the 20/s these tests run (the gateway adds a
/// 70 ms margin, T = 120 ms: three replicas' sends may jitter by that much on
/// a loaded 2-core machine).
pub(crate) const VENDOR_T: Duration = Duration::from_millis(50);

pub(crate) fn opts_20() -> Opts {
    Opts {
        rate_per_second: 20,
        safety_margin: Duration::from_millis(70),
        ..Opts::default()
    }
}

pub(crate) async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `n` replicas of the gateway in front of one emulator.
pub(crate) async fn replicas(
    n: usize,
    opts: &[Opts],
    mock: &Mock,
    addr: std::net::SocketAddr,
) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for i in 0..n {
        let o = opts[i % opts.len()].clone();
        apps.push(spawn_gateway(o, mock.clone(), addr, CancellationToken::new()).await);
    }
    apps
}

pub(crate) fn gaps(arrivals: &[Arrival]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1].at - w[0].at).collect()
}

/// Redis errors the process saw (all replicas of a test share the recorder):
/// tells a spacing failure from jitter apart from one caused by a fallback.
pub(crate) async fn backend_errors(app: &TestApp) -> String {
    let text = crate::support::metrics_page(app.metrics_addr).await;
    text.lines()
        .find(|l| l.starts_with("provisioning_gateway_budget_backend_errors_total"))
        .unwrap_or("provisioning_gateway_budget_backend_errors_total 0")
        .to_owned()
}

pub(crate) fn assert_spacing(arrivals: &[Arrival], what: &str) {
    let seen: Vec<(u16, u128)> = arrivals
        .windows(2)
        .map(|w| (w[1].status, (w[1].at - w[0].at).as_millis()))
        .collect();
    assert!(
        arrivals.iter().all(|a| a.status == 204),
        "{what}: the vendor refused some (status, ms after the previous): {seen:?}"
    );
    let min = gaps(arrivals).into_iter().min();
    let min = min.unwrap_or_else(|| panic!("{what}: fewer than two arrivals: {seen:?}"));
    assert!(
        min >= VENDOR_T,
        "{what}: arrivals only {min:?} apart: {seen:?}"
    );
}

/// One call through each replica, so every upstream connection is open
/// before spacing is measured (a first connection can delay one arrival by
/// tens of ms on a loaded machine). Returns how many arrivals to skip.
pub(crate) async fn warm_up(apps: &[TestApp], mock: &Mock) -> usize {
    for (i, app) in apps.iter().enumerate() {
        app.client()
            .await
            .delete_association(request(1_000_000 + i))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    mock.arrivals().len()
}

/// Polls `/healthz` of every app until `degraded` is `want`; returns how long it took.
pub(crate) async fn until_degraded_is(apps: &[TestApp], want: bool, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for app in apps {
            all &= healthz(app.metrics_addr).await["degraded"] == want;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "replicas did not report degraded={want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----------------------------------------------------------- the gateway

// Several gateways and their callers: give them both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 3);
    let apps = replicas(3, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    let skip = warm_up(&apps, &mock).await;
    let mut clients = Vec::new();
    for app in &apps {
        clients.push(app.client().await);
    }
    let calls = (0..30).map(|n| {
        let mut c = clients[n % 3].clone();
        async move { c.delete_association(request(n)).await }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let arrivals = mock.arrivals().split_off(skip);
    let what = format!("three replicas ({})", backend_errors(&apps[0]).await);
    assert_spacing(&arrivals, &what);
    assert_eq!(arrivals.len(), 30, "one upstream call each");
}

// Several gateways and their callers: give them both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_on_one_redis_do_not_share_a_budget() {
    let redis = RedisServer::start();
    // 5/s: T = 210 ms, so sharing would show as arrivals ≥ 200 ms apart.
    let (mock, addr, _stop) = spawn_open_mock(5).await;
    let base = Opts {
        rate_per_second: 5,
        ..Opts::default()
    }
    .redis(&redis.url(), RedisFallback::Local, 1);
    let alpha = Opts {
        account_name: "alpha".into(),
        api_key: "key-alpha".into(),
        ..base.clone()
    };
    let beta = Opts {
        account_name: "beta".into(),
        api_key: "key-beta".into(),
        ..base
    };
    let apps = replicas(2, &[alpha, beta], &mock, addr).await;
    let (a, b) = (apps[0].client().await, apps[1].client().await);
    let calls = (0..8).map(|n| {
        let mut c = if n % 2 == 0 { a.clone() } else { b.clone() };
        async move { c.delete_association(request(n)).await }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let arrivals = mock.arrivals();
    let key = |a: &Arrival| a.headers["authorization"].to_str().unwrap().to_owned();
    for k in ["App key-alpha", "App key-beta"] {
        let mine: Vec<Arrival> = arrivals.iter().filter(|a| key(a) == k).cloned().collect();
        assert_eq!(mine.len(), 4, "{k}");
        for gap in gaps(&mine) {
            assert!(gap >= Duration::from_millis(200), "{k}: {gap:?}");
        }
    }
    let closest = gaps(&arrivals).into_iter().min().unwrap();
    assert!(
        closest < Duration::from_millis(150),
        "the two accounts' calls interleave freely (closest {closest:?})"
    );
    let mut c = raw(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("provisioning-gateway:test:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        keys.contains(&"provisioning-gateway:test:alpha".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"provisioning-gateway:test:beta".to_owned()),
        "{keys:?}"
    );
}

// Several gateways and their callers: give them both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_clocks_disagree_keep_the_spacing() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 3);
    // One replica 5 s ahead, one on time, one 5 s behind.
    let offsets = [5_000, 0, -5_000];
    let skewed: Vec<Opts> = offsets
        .iter()
        .map(|&ms| opts.clone().clock_offset_ms(ms))
        .collect();
    let apps = replicas(3, &skewed, &mock, addr).await;
    // The replicas do see clocks 10 s apart...
    for (app, offset) in apps.iter().zip(offsets) {
        let h = healthz(app.metrics_addr).await;
        let skew = h["redis_clock_skew_ms"].as_i64().unwrap();
        assert!(
            (skew + offset).abs() < 500,
            "replica with offset {offset} ms reports skew {skew} ms: {h}"
        );
    }
    // ...and the spacing holds, because only Redis' clock decides.
    let skip = warm_up(&apps, &mock).await;
    let mut clients = Vec::new();
    for app in &apps {
        clients.push(app.client().await);
    }
    let calls = (0..30).map(|n| {
        let mut c = clients[n % 3].clone();
        async move { c.delete_association(request(n)).await }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let arrivals = mock.arrivals().split_off(skip);
    let what = format!("skewed clocks ({})", backend_errors(&apps[0]).await);
    assert_spacing(&arrivals, &what);
    assert_eq!(arrivals.len(), 30);
}

// Several gateways and their callers: give them both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replicas_429_holds_back_every_replica() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 2);
    let apps = replicas(2, &[opts], &mock, addr).await;
    let mut busy = Scripted::new(
        429,
        r#"{"requestError":{"serviceException":{"messageId":"TOO_MANY_REQUESTS","text":"Too many requests"}}}"#,
    );
    busy.headers.push(("retry-after".into(), "1".into()));
    mock.script([busy]);
    let mut a = apps[0].client().await;
    let first = tokio::spawn(async move { a.delete_association(request(0)).await });
    mock.wait_for_requests(1).await;
    tokio::time::sleep(Duration::from_millis(50)).await; // the pushback is in Redis
    let mut b = apps[1].client().await;
    b.delete_association(request(1)).await.unwrap();
    first.await.unwrap().unwrap(); // retried after the pushback
    let arrivals = mock.arrivals();
    assert_eq!(
        arrivals.len(),
        3,
        "the 429, the other replica's call, the retry"
    );
    assert_eq!(arrivals[0].status, 429);
    for later in &arrivals[1..] {
        let after = later.at - arrivals[0].at;
        assert!(
            after >= Duration::from_secs(1),
            "a call reached the vendor {after:?} after its 429 with Retry-After: 1"
        );
    }
}

#[tokio::test]
async fn redis_down_at_start_local_fallback_serves_and_recovers() {
    let mut redis = RedisServer::start();
    redis = redis.kill_async().await;
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 2);
    let apps = replicas(1, &[opts], &mock, addr).await;
    let app = &apps[0];
    let h = healthz(app.metrics_addr).await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["budget_backend"], "redis");
    assert_eq!(h["degraded"], true, "{h}");
    assert_eq!(h["fallback"], "local");
    // Still SERVING, and serving: from the local budget (rate / 2).
    let mut health = HealthClient::new(app.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: provisioning_gateway::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    let mut client = app.client().await;
    let started = Instant::now();
    client.delete_association(request(0)).await.unwrap();
    client.delete_association(request(1)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the local budget is rate / expected replicas: 2 × 90 ms ({:?})",
        started.elapsed()
    );
    redis = redis.restart_async().await;
    let took = until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    assert!(
        took < Duration::from_millis(1200),
        "back on Redis after {took:?}"
    );
    client.delete_association(request(2)).await.unwrap();
    let mut c = raw(&redis).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("provisioning-gateway:test:default")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(exists, "the decision was made in Redis");
}

#[tokio::test]
async fn deny_fallback_answers_unavailable_at_once_until_redis_returns() {
    let mut redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Deny, 1);
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap();
    redis = redis.kill_async().await;
    for n in 1..3 {
        let started = Instant::now();
        let status = client
            .delete_association(with_timeout(request(n), Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "answered at once, not at the deadline ({:?})",
            started.elapsed()
        );
        assert_eq!(status.code(), Code::Unavailable);
        let d = status.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "BUDGET_BACKEND_UNAVAILABLE");
    }
    let h = healthz(apps[0].metrics_addr).await;
    assert_eq!(
        (h["degraded"].clone(), h["fallback"].clone()),
        (true.into(), "deny".into())
    );
    let _redis = redis.restart_async().await;
    let took = until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    assert!(
        took < Duration::from_millis(1200),
        "back on Redis after {took:?}"
    );
    client.delete_association(request(3)).await.unwrap();
    assert_eq!(mock.arrivals().len(), 2, "nothing sent while denied");
}

/// One call of the load: when it was made, how long it took, and what it got.
struct Outcome {
    elapsed: Duration,
    deadline: Duration,
    result: Result<(), tonic::Status>,
}

// Several gateways and their callers: give them both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_no_call_outlives_its_deadline_and_the_spacing_returns() {
    let mut redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 3);
    let apps = replicas(3, &[opts], &mock, addr).await;
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Duration::from_millis(1000);
    let mut load = Vec::new();
    for (r, app) in apps.iter().enumerate() {
        let client = app.client().await;
        // Warm up: connections to the gateway and on to the vendor are open.
        client
            .clone()
            .delete_association(request(900_000 + r))
            .await
            .unwrap();
        for l in 0..4 {
            let (mut c, stop) = (client.clone(), Arc::clone(&stop));
            load.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut n = (r * 100 + l) * 1000;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let started = Instant::now();
                    let result = c
                        .delete_association(with_timeout(request(n), deadline))
                        .await
                        .map(drop);
                    let refused = result.is_err();
                    outcomes.push(Outcome {
                        elapsed: started.elapsed(),
                        deadline,
                        result,
                    });
                    if refused {
                        // No hot loop on refusals.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
                outcomes
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis = redis.kill_async().await;
    let killed = Instant::now();
    until_degraded_is(&apps, true, Duration::from_secs(2)).await;
    tokio::time::sleep(
        (killed + Duration::from_millis(1200)).saturating_duration_since(Instant::now()),
    )
    .await;
    let _redis = redis.restart_async().await;
    let restarted = Instant::now();
    let took = until_degraded_is(&apps, false, Duration::from_secs(3)).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = join_all(load)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();

    // No call outlived its deadline: every answer is the gateway's own,
    // with its ErrorInfo (a client- or server-side timeout carries none).
    assert!(outcomes.len() > 30, "{} calls", outcomes.len());
    for o in &outcomes {
        assert!(
            o.elapsed < o.deadline + Duration::from_millis(100),
            "a call took {:?}",
            o.elapsed
        );
        if let Err(status) = &o.result {
            // Exactly one ErrorInfo, the gateway's: not a bare transport error.
            let info = crate::support::details::error_info(status);
            assert_ne!(info.reason, "BUDGET_BACKEND_UNAVAILABLE", "local fallback");
        }
    }
    // The local fallback served while Redis was down.
    let arrivals = mock.arrivals();
    let during = arrivals
        .iter()
        .filter(|a| {
            a.at > killed + Duration::from_millis(100) && a.at < restarted && a.status == 204
        })
        .count();
    assert!(during > 0, "nothing served during the outage");
    // Back on the shared budget quickly, and the spacing holds again.
    assert!(
        took < Duration::from_millis(1500),
        "back on Redis after {took:?}"
    );
    let after: Vec<Arrival> = arrivals
        .into_iter()
        .filter(|a| a.at > recovered + Duration::from_millis(100))
        .collect();
    assert!(after.len() >= 5, "{} calls after recovery", after.len());
    assert_spacing(&after, "after Redis returned");
}

#[tokio::test]
async fn rediss_with_a_password_and_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::redis::tls_files(certs.path());
    let tls_port = crate::support::redis::free_port();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let redis = RedisServer::start_with(
        Some("s3cr3t-pw".into()),
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(&cert),
            "--tls-key-file".into(),
            path(&key),
            "--tls-ca-cert-file".into(),
            path(&ca),
            "--tls-auth-clients".into(),
            "no".into(),
        ],
    );
    let url = format!("rediss://:s3cr3t-pw@127.0.0.1:{tls_port}");
    let (mock, addr, _stop) = spawn_mock(20).await;
    let trusted = {
        let mut o = opts_20().redis(&url, RedisFallback::Deny, 1);
        if let provisioning_gateway::config::BackendConfig::Redis(r) = &mut o.backend {
            r.ca = Some(provisioning_gateway::config::CaPem::read(&ca).unwrap());
        }
        o
    };
    let apps = replicas(1, &[trusted], &mock, addr).await;
    // TLS + AUTH with the private CA (a loaded machine may need a reconnect).
    until_degraded_is(&apps, false, Duration::from_secs(3)).await;
    apps[0]
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap();
    let mut c = raw(&redis).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("provisioning-gateway:test:default")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(exists, "the decision was made in Redis, over TLS");
    // Without the CA (Mozilla roots only) the server is not trusted: no
    // budget from an unverified Redis.
    let untrusted = opts_20().redis(&url, RedisFallback::Deny, 1);
    let apps = replicas(1, &[untrusted], &mock, addr).await;
    assert_eq!(healthz(apps[0].metrics_addr).await["degraded"], true);
}

/// 1/s with one replica: T = 1010 ms, wide enough to see a handover.
fn opts_1(redis: &RedisServer) -> Opts {
    Opts {
        rate_per_second: 1,
        ..Opts::default()
    }
    .redis(&redis.url(), RedisFallback::Local, 1)
}

#[tokio::test]
async fn losing_redis_the_local_budget_starts_after_the_last_shared_slot() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(1).await;
    let apps = replicas(1, &[opts_1(&redis)], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a shared slot
    let _redis = redis.kill_async().await;
    client.delete_association(request(1)).await.unwrap(); // a local one
    let arrivals = mock.arrivals();
    assert_eq!(arrivals[1].status, 204, "the vendor accepted it");
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "{gap:?} after the shared slot"
    );
}

#[tokio::test]
async fn redis_lost_between_calls_the_local_budget_still_starts_after_the_last_shared_slot() {
    // T = 5 s: the probe finds Redis gone (three failed pings, ~3 s) well
    // inside one interval, so the next call goes to the local budget with no
    // failed command of its own: only what the shared answer said (the slot
    // it granted) keeps the local budget from granting at once.
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(1).await;
    let opts = Opts {
        safety_margin: Duration::from_secs(4),
        ..opts_1(&redis)
    };
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a shared slot
    let _redis = redis.kill_async().await;
    until_degraded_is(&apps, true, Duration::from_secs(4)).await;
    client.delete_association(request(1)).await.unwrap(); // a local one
    let arrivals = mock.arrivals();
    // Arrivals, not grants: the first request's transit may take a few ms
    // more than the second's. Without the shared answer's bound: ~1 s.
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_millis(4900),
        "{gap:?} after the shared slot (T = 5 s)"
    );
}

#[tokio::test]
async fn a_call_queued_on_redis_whose_claim_goes_local_waits_an_interval_past_its_shared_slot() {
    // T = 2 s. A call queued for the slot after the first one; Redis lost
    // meanwhile, found by the probe (~1 s) before that slot: its claim goes
    // to the local budget with no failed command of its own, and must wait
    // an interval past the slot Redis gave it (it may have been granted
    // there by an answer that never came).
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(1).await;
    let opts = Opts {
        safety_margin: Duration::from_secs(1),
        ..opts_1(&redis)
    };
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a shared slot
    let mut second = apps[0].client().await;
    let queued = tokio::spawn(async move {
        second
            .delete_association(with_timeout(request(1), Duration::from_secs(10)))
            .await
    });
    let depth = r#"provisioning_gateway_budget_queue_depth{account="default"}"#;
    crate::support::until_metric(apps[0].metrics_addr, depth, 1.0).await;
    let _redis = redis.kill_async().await;
    queued.await.unwrap().unwrap();
    let arrivals = mock.arrivals();
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_millis(3900),
        "{gap:?} after the first slot (its own shared slot at T = 2 s, then one more)"
    );
}

#[tokio::test]
async fn a_429_that_could_not_reach_redis_reaches_it_when_redis_returns_even_unserved_meanwhile() {
    // `deny`: while Redis is lost nothing is served here, so only the
    // pushback itself, kept unsent, can carry the vendor's Retry-After.
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = Opts {
        upstream_timeout: Duration::from_secs(2),
        ..opts_20().redis(&redis.url(), RedisFallback::Deny, 1)
    };
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut client = apps[0].client().await;
    let mut pushed = Scripted::new(
        429,
        r#"{"requestError":{"serviceException":{"messageId":"TOO_MANY_REQUESTS","text":"slow down"}}}"#,
    );
    pushed.headers.push(("retry-after".into(), "4".into()));
    pushed.delay = Duration::from_millis(400);
    mock.script([pushed]);
    let call = tokio::spawn(async move {
        client
            .delete_association(with_timeout(request(0), Duration::from_millis(1500)))
            .await
    });
    mock.wait_for_requests(1).await;
    let redis = redis.kill_async().await; // before the 429 comes back
    let _ = call.await.unwrap();
    let pushed_at = mock.arrivals()[0].at + Duration::from_millis(400);
    let _redis = redis.restart_async().await; // empty: it knows nothing of the 429
    until_degraded_is(&apps, false, Duration::from_secs(3)).await;
    let mut client = apps[0].client().await;
    client
        .delete_association(with_timeout(request(1), Duration::from_secs(8)))
        .await
        .unwrap();
    let arrivals = mock.arrivals();
    let after = arrivals.last().unwrap().at - pushed_at;
    assert!(
        after >= Duration::from_millis(3900),
        "sent {after:?} after a 429 with Retry-After: 4"
    );
}

#[tokio::test]
async fn back_on_a_new_redis_the_first_grant_waits_an_interval_after_the_last_one() {
    // Redis restarts empty between two calls, no failure seen by a command:
    // the new connection alone says the shared state may be gone, and a
    // grant given just before it must still be an interval behind.
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(1).await;
    let apps = replicas(1, &[opts_1(&redis)], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a shared slot
    let redis = redis.kill_async().await;
    let _redis = redis.restart_async().await;
    client.delete_association(request(1)).await.unwrap();
    let arrivals = mock.arrivals();
    assert_eq!(arrivals[1].status, 204, "the vendor accepted it");
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "{gap:?} after the grant before the restart"
    );
}

#[tokio::test]
async fn back_on_redis_the_shared_budget_starts_after_the_last_local_grant() {
    let mut redis = RedisServer::start();
    redis = redis.kill_async().await;
    let (mock, addr, _stop) = spawn_mock(1).await;
    let apps = replicas(1, &[opts_1(&redis)], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a local slot
    let _redis = redis.restart_async().await; // empty: the shared budget knows nothing of it
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    client.delete_association(request(1)).await.unwrap(); // a shared one
    let arrivals = mock.arrivals();
    assert_eq!(arrivals[1].status, 204, "the vendor accepted it");
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "{gap:?} after the local slot"
    );
}

#[tokio::test]
async fn the_real_binary_logs_a_lost_redis_without_its_password() {
    let redis = RedisServer::with_password("right-pw");
    let (_mock, addr, _stop) = spawn_mock(20).await;
    let url = format!("redis://:wr0ng-s3cr3t@127.0.0.1:{}", redis.port());
    let gateway = crate::support::process::GatewayProcess::start(
        &format!("http://{addr}"),
        &[
            ("GATEWAY_BUDGET_BACKEND", "redis"),
            ("GATEWAY_REDIS_URL", &url),
            ("GATEWAY_RATE_PER_SECOND", "20"),
        ],
    )
    .await;
    // Wrong password: it starts degraded, and serves from the local budget.
    let metrics: std::net::SocketAddr = gateway.metrics_addr.parse().unwrap();
    assert_eq!(healthz(metrics).await["degraded"], true);
    let mut client =
        provisioning_gateway::pb::association_service_client::AssociationServiceClient::connect(
            format!("http://{}", gateway.addr),
        )
        .await
        .unwrap();
    client.delete_association(request(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // a few probe rounds
    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    let all = logs.join("\n");
    assert!(
        all.contains("Redis unreachable"),
        "the degraded state is logged: {all}"
    );
    assert!(all.contains("127.0.0.1"), "the log names the Redis: {all}");
    assert!(!all.contains("wr0ng-s3cr3t"), "password in the logs: {all}");
}
