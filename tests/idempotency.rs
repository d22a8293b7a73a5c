//! Idempotent calls through the real server (AIP-155): the same request_id
//! answers the first call's outcome without a second upstream request, a
//! retry joins a call still running, another request under the same id is
//! refused, callers and accounts each have their own ids, a call whose
//! outcome is unknown is sent again with a 404 then answering OK, and
//! `allow_missing` turns a 404 into OK. On both backends; two replicas on
//! one Redis share the records.

use std::time::Duration;

use provisioning_gateway::config::RedisFallback;
use provisioning_gateway::mock::{Mock, Scripted};
use provisioning_gateway::pb::DeleteAssociationRequest;
use provisioning_gateway::telemetry::metrics::COALESCED;
use tonic::Code;
use tonic_types::StatusExt;

use crate::redis::{raw, replicas};
use crate::support::redis::RedisServer;
use crate::support::{
    Opts, account, config, details, metric, on_both_backends, request, series, spawn_app,
    spawn_config, spawn_mock, spawn_open_mock, with_timeout,
};

/// `request` under the idempotency key `id`.
fn with_id(
    request: DeleteAssociationRequest,
    id: &str,
) -> tonic::Request<DeleteAssociationRequest> {
    with_timeout(
        DeleteAssociationRequest {
            request_id: id.into(),
            ..request
        },
        Duration::from_secs(10),
    )
}

/// The same, from the anonymous caller `caller` on `account`.
fn from(
    caller: &str,
    account: &str,
    request: DeleteAssociationRequest,
    id: &str,
) -> tonic::Request<DeleteAssociationRequest> {
    let mut r = with_id(request, id);
    r.metadata_mut().insert("x-caller", caller.parse().unwrap());
    r.metadata_mut()
        .insert("x-infobip-account", account.parse().unwrap());
    r
}

fn allow_missing(n: usize) -> DeleteAssociationRequest {
    DeleteAssociationRequest {
        allow_missing: true,
        ..request(n)
    }
}

fn vendor(status: u16, message_id: &str, text: &str, delay: Duration) -> Scripted {
    let body = format!(
        r#"{{"requestError":{{"serviceException":{{"messageId":"{message_id}","text":"{text}"}}}}}}"#
    );
    Scripted {
        delay,
        ..Scripted::new(status, body)
    }
}

/// Waits until the emulator has received `n` requests (answered or not);
/// a test whose request never comes fails rather than hangs.
async fn until_received(mock: &Mock, n: usize) {
    let received = mock.wait_for_requests(n);
    tokio::time::timeout(Duration::from_secs(10), received)
        .await
        .unwrap_or_else(|_| panic!("the emulator never received {n} requests"));
}

on_both_backends!(
    the_same_request_id_twice_sends_once_and_answers_the_same,
    a_retry_while_the_first_call_runs_joins_it,
    the_same_request_id_for_another_request_is_invalid_argument,
    the_same_request_id_from_another_caller_or_account_is_its_own,
    a_retry_after_an_unknown_outcome_answers_ok_though_infobip_now_says_404,
    a_caller_that_leaves_mid_call_frees_its_request_id_for_a_retry_at_once,
    a_retry_after_a_budget_refusal_runs_as_a_new_call,
    allow_missing_answers_ok_where_infobip_says_404,
);

async fn the_same_request_id_twice_sends_once_and_answers_the_same(opts: Opts) {
    let app = spawn_app(opts).await;
    let mut client = app.client().await;
    client
        .delete_association(with_id(request(1), "ok-1"))
        .await
        .unwrap();
    // Without the record, Infobip would answer 404 to a second DELETE.
    client
        .delete_association(with_id(request(1), "ok-1"))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 1);
    // An error answer is kept the same way: code, message, details.
    app.mock
        .script([vendor(403, "FORBIDDEN", "not yours", Duration::ZERO)]);
    let first = client
        .delete_association(with_id(request(2), "denied-1"))
        .await
        .unwrap_err();
    let again = client
        .delete_association(with_id(request(2), "denied-1"))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::PermissionDenied);
    assert_eq!(
        (again.code(), again.message(), again.details()),
        (first.code(), first.message(), first.details())
    );
    details::error_info_with(&again, "FORBIDDEN");
    assert_eq!(app.mock.arrivals().len(), 2, "one request per request_id");
}

async fn a_retry_while_the_first_call_runs_joins_it(opts: Opts) {
    let app = spawn_app(Opts {
        account_name: "joins".into(),
        ..opts
    })
    .await;
    // Infobip takes its time to answer the first call.
    let slow = Duration::from_millis(800);
    app.mock.script([vendor(409, "CONFLICT", "busy", slow)]);
    let client = app.client().await;
    let mut first = client.clone();
    let first = tokio::spawn(async move {
        first
            .delete_association(with_id(request(1), "join-1"))
            .await
    });
    until_received(&app.mock, 1).await; // the first call is upstream
    let retry = client
        .clone()
        .delete_association(with_id(request(1), "join-1"))
        .await
        .unwrap_err();
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(first.code(), Code::Aborted);
    assert_eq!(
        (retry.code(), retry.message(), retry.details()),
        (first.code(), first.message(), first.details())
    );
    assert_eq!(app.mock.arrivals().len(), 1, "no second upstream request");
    // It waited for the first call's record, not in its flight.
    let coalesced = metric(app.metrics_addr, &series(COALESCED, "joins")).await;
    assert_eq!(coalesced.unwrap_or(0.0), 0.0);
}

async fn the_same_request_id_for_another_request_is_invalid_argument(opts: Opts) {
    let app = spawn_app(opts).await;
    let mut client = app.client().await;
    client
        .delete_association(with_id(request(1), "reused-1"))
        .await
        .unwrap();
    for other in [request(2), allow_missing(1)] {
        let status = client
            .delete_association(with_id(other, "reused-1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let violations = status.get_error_details().bad_request().cloned().unwrap();
        let fields: Vec<_> = violations
            .field_violations
            .iter()
            .map(|v| &v.field)
            .collect();
        assert_eq!(fields, ["request_id"]);
        details::error_info_with(&status, "REQUEST_ID_REUSED");
    }
    assert_eq!(app.mock.arrivals().len(), 1);
    // A request_id the gateway cannot keep is refused up front, like any field.
    let status = client
        .delete_association(with_id(request(3), "no spaces/or slashes"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status.get_error_details().bad_request().cloned().unwrap();
    assert_eq!(violations.field_violations[0].field, "request_id");
    details::error_info_with(&status, "INVALID_REQUEST");
    assert_eq!(app.mock.arrivals().len(), 1);
}

async fn the_same_request_id_from_another_caller_or_account_is_its_own(opts: Opts) {
    let (mock, addr, stop) = spawn_open_mock(opts.rate_per_second).await;
    let upstream = format!("http://{addr}");
    let two_accounts = config(&opts, &upstream).account(account("second", &upstream, "key-2"));
    let app = spawn_config(two_accounts, mock, stop).await;
    let mut client = app.client().await;
    let id = "shared-id";
    client
        .delete_association(from("orders", "default", request(1), id))
        .await
        .unwrap();
    // Another caller's id of the same name runs: Infobip says 404 now.
    let other_caller = client
        .delete_association(from("billing", "default", request(1), id))
        .await
        .unwrap_err();
    assert_eq!(other_caller.code(), Code::NotFound);
    // On another account, too (its own key: the association exists there).
    client
        .delete_association(from("orders", "second", request(1), id))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 3);
    // The first caller's id still answers its own outcome.
    client
        .delete_association(from("orders", "default", request(1), id))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 3);
}

async fn a_retry_after_an_unknown_outcome_answers_ok_though_infobip_now_says_404(opts: Opts) {
    let app = spawn_app(Opts {
        upstream_timeout: Duration::from_millis(300),
        ..opts
    })
    .await;
    // The first DELETE takes effect, but its answer comes too late; by the
    // retry the association is gone.
    app.mock.script([
        vendor(204, "", "", Duration::from_secs(2)),
        vendor(
            404,
            "NOT_FOUND",
            "Resource association not found.",
            Duration::ZERO,
        ),
    ]);
    let mut client = app.client().await;
    let first = client
        .delete_association(with_id(request(1), "unknown-1"))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::DeadlineExceeded, "{first:?}");
    details::error_info_with(&first, "UPSTREAM_TIMEOUT");
    client
        .delete_association(with_id(request(1), "unknown-1"))
        .await
        .expect("the first call may have deleted it: OK, not NOT_FOUND");
    until_received(&app.mock, 2).await;
    let arrivals = app.mock.arrivals();
    assert_eq!(arrivals.last().map(|a| a.status), Some(404));
    // That answer is the id's outcome from now on.
    client
        .delete_association(with_id(request(1), "unknown-1"))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), arrivals.len());
}

/// A caller that goes away while its call runs upstream leaves the
/// record's outcome unknown at once (not held until the call's deadline):
/// a retry runs straight away, and the vendor's 404 answers OK.
async fn a_caller_that_leaves_mid_call_frees_its_request_id_for_a_retry_at_once(opts: Opts) {
    let app = spawn_app(opts).await;
    app.mock.script([
        vendor(204, "", "", Duration::from_secs(30)),
        vendor(404, "NOT_FOUND", "no such association", Duration::ZERO),
    ]);
    let call = |timeout| {
        let request = DeleteAssociationRequest {
            request_id: "left-1".into(),
            ..request(1)
        };
        with_timeout(request, timeout)
    };
    let mut client = app.client().await;
    let leaving = tokio::spawn({
        let (mut client, call) = (client.clone(), call(Duration::from_secs(20)));
        async move {
            let _ = client.delete_association(call).await;
        }
    });
    until_received(&app.mock, 1).await;
    leaving.abort();
    // Within 5 s, where the first call's lease would last 20.
    client
        .delete_association(call(Duration::from_secs(5)))
        .await
        .expect("run again at once; the first may have deleted it: OK");
    assert_eq!(app.mock.arrivals().last().map(|a| a.status), Some(404));
}

async fn a_retry_after_a_budget_refusal_runs_as_a_new_call(opts: Opts) {
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..opts
    })
    .await;
    let mut client = app.client().await;
    client.delete_association(request(0)).await.unwrap(); // the next slot is ~1 s away
    let mut hurried = with_id(request(1), "refused-1");
    hurried.set_timeout(Duration::from_millis(500));
    let refused = client.delete_association(hurried).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    details::error_info_with(&refused, "BUDGET_EXHAUSTED");
    // Nothing was sent: the retry runs, and is served.
    client
        .delete_association(with_id(request(1), "refused-1"))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 2);
}

async fn allow_missing_answers_ok_where_infobip_says_404(opts: Opts) {
    let app = spawn_app(opts).await;
    let mut client = app.client().await;
    client.delete_association(request(1)).await.unwrap();
    client.delete_association(allow_missing(1)).await.unwrap();
    let status = client.delete_association(request(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let statuses: Vec<u16> = app.mock.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(statuses, [204, 404, 404]);
    // Only a 404: any other refusal stays what it is.
    app.mock
        .script([vendor(403, "FORBIDDEN", "not yours", Duration::ZERO)]);
    let status = client
        .delete_association(allow_missing(2))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Identical calls with and without allow_missing share one upstream call,
/// and each answers by its own flag.
#[tokio::test]
async fn identical_calls_share_a_404_and_each_settles_it_by_its_own_flag() {
    let app = spawn_app(Opts::default()).await;
    app.mock.script([vendor(
        404,
        "NOT_FOUND",
        "Resource association not found.",
        Duration::from_millis(500),
    )]);
    let client = app.client().await;
    let mut strict = client.clone();
    let strict = tokio::spawn(async move { strict.delete_association(request(1)).await });
    until_received(&app.mock, 1).await;
    client
        .clone()
        .delete_association(allow_missing(1))
        .await
        .unwrap();
    let status = strict.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(app.mock.arrivals().len(), 1);
}

/// Two replicas sharing one Redis: a retry on the other replica joins the
/// call still running on the first, then answers its outcome; nothing is
/// sent twice. The record's keys say nothing of the caller or the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_send_a_request_id_once() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = Opts::default().redis(&redis.url(), RedisFallback::Deny, 2);
    let apps = replicas(2, &[opts], &mock, addr).await;
    mock.script([vendor(204, "", "", Duration::from_millis(800))]);
    let mut on_a = apps[0].client().await;
    let mut on_b = apps[1].client().await;
    let first = tokio::spawn(async move {
        on_a.delete_association(with_id(request(1), "replicas-1"))
            .await
    });
    until_received(&mock, 1).await; // running on replica A
    let mut c = raw(&redis).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut c)
        .await
        .unwrap();
    on_b.delete_association(with_id(request(1), "replicas-1"))
        .await
        .expect("joined the call on A");
    // B looked again every POLL (50 ms) while A ran (~800 ms): a handful
    // of script calls, not a tight loop.
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let scripts = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(scripts <= 60, "{scripts} script calls while B waited");
    first.await.unwrap().unwrap();
    on_b.delete_association(with_id(request(1), "replicas-1"))
        .await
        .expect("A's outcome");
    assert_eq!(mock.arrivals().len(), 1, "one upstream request");

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("provisioning-gateway:test:idem:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one record, no lease left: {keys:?}");
    let digest = keys[0]
        .strip_prefix("provisioning-gateway:test:idem:{default}:")
        .unwrap_or_else(|| panic!("{}", keys[0]));
    assert!(digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut c)
        .await
        .unwrap();
    let day = 24 * 3600 * 1000;
    assert!(ttl > day - 60_000 && ttl <= day, "{ttl}");
}

/// A replica killed (SIGKILL) while its call with a request_id runs: a retry
/// on another replica waits while the dead call's lease lasts, then takes
/// the record over and runs again; the first may have deleted it, so the
/// vendor's 404 answers OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_takes_over_once_the_lease_of_a_killed_replicas_call_lapses() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let url = redis.url();
    let upstream = format!("http://{addr}");
    let mut first = crate::support::process::GatewayProcess::start(
        &upstream,
        &[
            ("GATEWAY_BUDGET_BACKEND", "redis"),
            ("GATEWAY_REDIS_URL", url.as_str()),
            ("GATEWAY_REDIS_KEY_PREFIX", "provisioning-gateway:test:"),
            ("GATEWAY_REDIS_FALLBACK", "deny"),
            ("GATEWAY_EXPECTED_REPLICAS", "2"),
            ("GATEWAY_RATE_PER_SECOND", "20"),
        ],
    )
    .await;
    mock.script([
        vendor(204, "", "", Duration::from_secs(30)),
        vendor(404, "NOT_FOUND", "no such association", Duration::ZERO),
    ]);
    let mut on_first =
        provisioning_gateway::pb::association_service_client::AssociationServiceClient::connect(
            format!("http://{}", first.addr),
        )
        .await
        .unwrap();
    let call = DeleteAssociationRequest {
        request_id: "killed-1".into(),
        ..request(1)
    };
    let running = tokio::spawn({
        let call = call.clone();
        async move {
            let _ = on_first
                .delete_association(with_timeout(call, Duration::from_secs(1)))
                .await;
        }
    });
    until_received(&mock, 1).await;
    first.child.kill().await.unwrap();
    running.abort();

    let opts = Opts::default().redis(&url, RedisFallback::Deny, 2);
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut on_second = apps[0].client().await;
    let started = std::time::Instant::now();
    on_second
        .delete_association(with_timeout(call, Duration::from_secs(10)))
        .await
        .expect("taken over, and the 404 answers OK");
    // Answered arrivals: the retry's (the first one's answer never came).
    assert_eq!(mock.arrivals().len(), 1, "sent again once the lease lapsed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}: the lease lasts the first call's second",
        started.elapsed()
    );
}

/// While Redis is lost, `--redis-fallback` decides: `deny` refuses a call
/// with a request_id (UNAVAILABLE), `local` keeps its record in the replica.
#[tokio::test]
async fn while_redis_is_lost_request_ids_follow_the_fallback() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let deny = Opts::default().redis(&redis.url(), RedisFallback::Deny, 1);
    let local = Opts::default().redis(&redis.url(), RedisFallback::Local, 1);
    let apps = replicas(2, &[deny, local], &mock, addr).await;
    let _redis = redis.kill_async().await;
    let status = apps[0]
        .client()
        .await
        .delete_association(with_id(request(1), "lost-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    details::error_info_with(&status, "IDEMPOTENCY_BACKEND_UNAVAILABLE");
    let mut local = apps[1].client().await;
    for _ in 0..2 {
        local
            .delete_association(with_id(request(1), "lost-1"))
            .await
            .unwrap();
    }
    assert_eq!(mock.arrivals().len(), 1);
}

/// A call whose lease lapsed (its replica stalled past it) and whose record
/// another call took over: its late end changes nothing; the record stays
/// the new call's until that one ends. Each claim has an owner of its own.
#[tokio::test]
async fn a_late_end_of_a_call_whose_record_was_taken_over_changes_nothing() {
    use provisioning_gateway::testing::{RedisRecords, Taken};

    let redis = RedisServer::start();
    let records = RedisRecords::new(redis.store().await, "t:");
    let lease = Duration::from_millis(200);
    let first = records.claim("r-1", lease).await.expect("free: claimed");
    // The lease lapses: the next claim takes the record over (bounded poll).
    let started = std::time::Instant::now();
    let second = loop {
        match records.claim("r-1", Duration::from_secs(60)).await {
            Ok(held) => break held,
            Err(taken) => assert_eq!(taken, Taken::Running, "still the first call's"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    records.finish(&first, 0).await;
    assert_eq!(
        records.claim("r-1", lease).await.err(),
        Some(Taken::Running),
        "the first call's late end left the second call's record running"
    );
    records.finish(&second, 5).await;
    assert_eq!(
        records.claim("r-1", lease).await.err(),
        Some(Taken::Done(5))
    );
}
