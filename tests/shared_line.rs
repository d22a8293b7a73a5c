//! One line across replicas, against a real `redis-server` (each test
//! starts its own): admission on any replica knows the whole line, a caller
//! leaving on one replica gives its slot to one waiting on another, a clock
//! that stepped back is corrected, late replies neither break spacing nor
//! switch to the fallback, and a pushback learnt while degraded reaches
//! Redis when it returns.

use std::time::{Duration, Instant};

use provisioning_gateway::config::RedisFallback;
use provisioning_gateway::mock::Scripted;
use tonic::Code;

use crate::redis::{VENDOR_T, assert_spacing, opts_20, raw, replicas, until_degraded_is, warm_up};
use crate::support::redis::RedisServer;
use crate::support::stall::StallProxy;
use crate::support::{healthz, metric, request, series, spawn_gateway, spawn_mock, with_timeout};

/// The interval of `opts_20`: 50 ms + a 70 ms margin.
const T: Duration = Duration::from_millis(120);
/// The key of the default account's line under the tests' prefix.
const LINE: &str = "provisioning-gateway:test:default:line";

/// Calls waiting in the shared line, as Redis holds it.
async fn waiting(redis: &RedisServer) -> usize {
    let mut c = raw(redis).await;
    redis::cmd("LLEN")
        .arg(LINE)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Waits until exactly `n` calls wait in the shared line.
async fn until_waiting(redis: &RedisServer, n: usize) {
    let started = Instant::now();
    while waiting(redis).await != n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} wait in line, never {n}",
            waiting(redis).await
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn resource(arrival: &provisioning_gateway::mock::Arrival) -> String {
    let body = String::from_utf8_lossy(&arrival.body).into_owned();
    let at = body.find("number-key-").expect("a resource id");
    body[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_thirty_over_three_replicas_is_served_in_admission_order() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Deny, 3);
    let apps = replicas(3, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    let skip = warm_up(&apps, &mock).await;
    let mut clients = Vec::new();
    for app in &apps {
        clients.push(app.client().await);
    }
    // Thirty calls, one after another over the replicas, each in line
    // before the next comes; deadlines leave every one time to be served.
    let mut calls = Vec::new();
    for n in 0..30 {
        let mut c = clients[n % 3].clone();
        let deadline = Duration::from_secs(10);
        calls.push(tokio::spawn(async move {
            c.delete_association(with_timeout(request(n), deadline))
                .await
        }));
        if n > 0 {
            // In line, or already served (a loaded machine may admit the
            // next call only after the head's slot came).
            let started = Instant::now();
            while waiting(&redis).await + mock.arrivals().len() - skip - 1 < n {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "call {n} never admitted"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            mock.wait_for_requests(skip + 1).await;
        }
    }
    // A call that cannot be served in time is refused at once, whichever
    // replica it asks: the line ahead (29 × T) is longer than its second.
    for client in &clients {
        let started = Instant::now();
        let refused = client
            .clone()
            .delete_association(with_timeout(request(99), Duration::from_secs(1)))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(took < Duration::from_millis(50), "refused after {took:?}");
    }
    for call in calls {
        call.await.unwrap().expect("every admitted call is served");
    }
    let arrivals = mock.arrivals().split_off(skip);
    let order: Vec<String> = arrivals.iter().map(resource).collect();
    let admitted: Vec<String> = (0..30).map(|n| format!("number-key-{n}")).collect();
    assert_eq!(order, admitted, "served in the order admitted");
    assert_spacing(&arrivals, "a line over three replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_on_one_replica_gives_its_slot_to_a_caller_on_another() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Deny, 2);
    let apps = replicas(2, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    let skip = warm_up(&apps, &mock).await;
    let (a, b) = (apps[0].client().await, apps[1].client().await);
    let call = |client: &crate::support::GrpcClient, n| {
        let mut c = client.clone();
        tokio::spawn(async move { c.delete_association(request(n)).await })
    };
    let first = call(&a, 0);
    mock.wait_for_requests(skip + 1).await;
    let leaving = call(&a, 1);
    until_waiting(&redis, 1).await;
    let staying = call(&b, 2);
    until_waiting(&redis, 2).await;
    // Gone before its slot: the client cancels, the server drops the call.
    leaving.abort();
    until_waiting(&redis, 1).await;
    first.await.unwrap().unwrap();
    staying.await.unwrap().unwrap();
    let arrivals = mock.arrivals().split_off(skip);
    assert_eq!(arrivals.len(), 2, "the one that left never went");
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap < T * 2 - Duration::from_millis(30),
        "the slot of the one that left went unused: {gap:?} between arrivals"
    );
    assert_spacing(&arrivals, "after a caller left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_slot_an_hour_ahead_is_a_clock_step_corrected_within_two_intervals() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let gateway = crate::support::process::GatewayProcess::start(
        &format!("http://{addr}"),
        &[
            ("GATEWAY_BUDGET_BACKEND", "redis"),
            ("GATEWAY_REDIS_URL", &redis.url()),
            ("GATEWAY_REDIS_KEY_PREFIX", "provisioning-gateway:test:"),
            ("GATEWAY_RATE_PER_SECOND", "20"),
            ("GATEWAY_SAFETY_MARGIN", "70ms"),
        ],
    )
    .await;
    let mut client =
        provisioning_gateway::pb::association_service_client::AssociationServiceClient::connect(
            format!("http://{}", gateway.addr),
        )
        .await
        .unwrap();
    client.delete_association(request(0)).await.unwrap();
    // Redis' clock stepped back an hour (or a failover to a node whose
    // clock lags): the next slot now reads an hour ahead.
    let mut c = raw(&redis).await;
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let hour_ahead = secs * 1_000_000 + micros + 3_600_000_000;
    let () = redis::cmd("SET")
        .arg("provisioning-gateway:test:default")
        .arg(hour_ahead)
        .query_async(&mut c)
        .await
        .unwrap();
    let asked = Instant::now();
    client
        .delete_association(with_timeout(request(1), Duration::from_secs(2)))
        .await
        .expect("served, not refused for an hour");
    let resumed_after = asked.elapsed();
    assert!(resumed_after < T * 2, "served after {resumed_after:?}");
    for n in 2..=3 {
        client
            .delete_association(with_timeout(request(n), Duration::from_secs(2)))
            .await
            .unwrap();
    }
    let arrivals = mock.arrivals();
    let resumed = arrivals[1].at - arrivals[0].at;
    assert!(resumed >= VENDOR_T, "{resumed:?}");
    assert_spacing(&arrivals, "after a clock step");
    let metrics: std::net::SocketAddr = gateway.metrics_addr.parse().unwrap();
    let resets = metric(
        metrics,
        &series("provisioning_gateway_budget_clock_resets_total", "default"),
    )
    .await;
    assert_eq!(resets, Some(1.0), "counted once");
    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    let warned = logs
        .iter()
        .any(|l| l.contains("WARN") && l.contains("a clock stepped back"));
    assert!(warned, "a warn log says so: {logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_held_back_past_the_timeout_keep_spacing_and_no_replica_degrades() {
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port()).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&url, RedisFallback::Local, 2);
    let apps = replicas(2, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    let skip = warm_up(&apps, &mock).await;
    // Callers on both replicas, for about two seconds.
    let mut calls = Vec::new();
    for n in 0..16 {
        let mut c = apps[n % 2].client().await;
        calls.push(tokio::spawn(async move {
            c.delete_association(with_timeout(request(n), Duration::from_secs(10)))
                .await
        }));
    }
    // Replies held back 400 ms (the command timeout is 250 ms), three
    // times, while /healthz is watched on both replicas.
    let watch = {
        let metrics: Vec<_> = apps.iter().map(|a| a.metrics_addr).collect();
        tokio::spawn(async move {
            let mut seen = false;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {
                for m in &metrics {
                    seen |= healthz(*m).await["degraded"] == true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.stall(Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for call in calls {
        call.await.unwrap().expect("served");
    }
    assert!(!watch.await.unwrap(), "a replica switched to its fallback");
    let errors = crate::redis::backend_errors(&apps[0]).await;
    assert!(!errors.ends_with(" 0"), "no reply was late: {errors}");
    let arrivals = mock.arrivals().split_off(skip);
    assert_spacing(&arrivals, &format!("replies held back ({errors})"));
    assert_eq!(arrivals.len(), 16, "one upstream call each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushback_received_while_degraded_reaches_redis_when_it_returns() {
    let mut redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&redis.url(), RedisFallback::Local, 2);
    let a = spawn_gateway(opts.clone(), mock.clone(), addr, Default::default()).await;
    until_degraded_is(std::slice::from_ref(&a), false, Duration::from_secs(2)).await;
    redis = redis.kill_async().await;
    until_degraded_is(std::slice::from_ref(&a), true, Duration::from_secs(5)).await;
    // While degraded, the vendor pushes back: no call for 2 s.
    let mut busy = Scripted::new(429, "{}");
    busy.headers.push(("retry-after".into(), "2".into()));
    mock.script([busy]);
    let mut ca = a.client().await;
    let pushed = ca
        .delete_association(with_timeout(request(0), Duration::from_millis(600)))
        .await
        .unwrap_err();
    assert_eq!(pushed.code(), Code::ResourceExhausted, "{pushed:?}");
    let pushed_at = mock.arrivals()[0].at;
    redis = redis.restart_async().await;
    until_degraded_is(std::slice::from_ref(&a), false, Duration::from_secs(5)).await;
    // Replica A's next command carries the pushback to Redis (it is refused:
    // its deadline comes before the pushback ends).
    let _ = ca
        .delete_association(with_timeout(request(1), Duration::from_millis(300)))
        .await;
    // A replica that never heard of the 429 waits it out on the shared line.
    let b = spawn_gateway(opts, mock.clone(), addr, Default::default()).await;
    let mut cb = b.client().await;
    cb.delete_association(with_timeout(request(2), Duration::from_secs(5)))
        .await
        .unwrap();
    let arrivals = mock.arrivals();
    let served = arrivals.last().unwrap().at - pushed_at;
    assert!(
        served >= Duration::from_secs(2),
        "the other replica called {served:?} after the 429 with Retry-After: 2"
    );
    drop(redis);
}

/// A request held up on its way out on replica A (a real dropped SYN, as in
/// `budget::a_request_held_up_on_its_way_out_holds_back_the_next_slots`)
/// while replica B has callers waiting: no arrival within the vendor's
/// interval of another, and all are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_up_on_one_replica_holds_the_line_on_another() {
    use crate::budget::{full_accept_queue, listen_overflows, until_syn_dropped};
    use provisioning_gateway::mock::{Mock, MockConfig};

    let redis = RedisServer::start();
    let (listener, addr, unaccepted) = full_accept_queue().await;
    let overflows = listen_overflows();
    let mock = Mock::new(MockConfig {
        api_key: Some(crate::support::API_KEY.into()),
        rate_per_second: 10,
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let opts = crate::support::Opts {
        rate_per_second: 10,
        account_name: "held-up".into(),
        ..Default::default()
    }
    .redis(&redis.url(), RedisFallback::Deny, 2);
    let a = spawn_gateway(opts.clone(), mock.clone(), addr, stop.clone()).await;
    let b = spawn_gateway(opts, mock.clone(), addr, stop.clone()).await;
    for app in [&a, &b] {
        until_degraded_is(std::slice::from_ref(app), false, Duration::from_secs(2)).await;
    }
    let call = |client: &crate::support::GrpcClient, n| {
        let mut c = client.clone();
        tokio::spawn(async move { c.delete_association(request(n)).await })
    };
    let first = call(&a.client().await, 0);
    until_syn_dropped(overflows).await;
    let on_b = b.client().await;
    let others: Vec<_> = (1..=6).map(|n| call(&on_b, n)).collect();
    // B's callers are in line behind the held-up request before it connects.
    tokio::spawn(mock.clone().serve(listener, stop.cancelled_owned()));
    first.await.unwrap().unwrap();
    for other in others {
        other.await.unwrap().unwrap();
    }
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 7);
    assert!(
        resource(&arrivals[0]) == "number-key-0",
        "the held-up request went first"
    );
    let gaps: Vec<_> = arrivals.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        arrivals.iter().all(|a| a.status == 204)
            && gaps.iter().all(|g| *g >= Duration::from_millis(100)),
        "arrivals closer than the vendor's 100 ms: {gaps:?}"
    );
    drop(unaccepted);
}

#[tokio::test]
async fn an_answer_lost_past_the_timeout_counts_for_the_local_budget_as_a_slot_taken_when_asked() {
    // Every reply held back 5 s from now: the admission script runs in Redis
    // (the slot is taken there) but no answer comes within the command
    // timeout, three times, and the replica falls back. Its local budget
    // must treat each unanswered command as a slot taken when asked.
    let redis = RedisServer::start();
    let proxy = StallProxy::start(redis.port()).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let (mock, addr, _stop) = spawn_mock(1).await;
    let opts = crate::support::Opts {
        rate_per_second: 1,
        ..crate::support::Opts::default()
    }
    .redis(&url, RedisFallback::Local, 1);
    let apps = replicas(1, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(2)).await;
    let mut client = apps[0].client().await;
    proxy.stall(Duration::from_secs(5));
    let asked = Instant::now();
    client
        .delete_association(with_timeout(request(0), Duration::from_secs(10)))
        .await
        .unwrap();
    let sent = mock.arrivals()[0].at - asked;
    // T = 1010 ms after the first unanswered command at the earliest; taking
    // none as a slot, the fallback grants at once (~0.8 s, three timeouts).
    assert!(
        sent >= Duration::from_millis(1010),
        "the local budget granted {sent:?} after the first unanswered command"
    );
}
