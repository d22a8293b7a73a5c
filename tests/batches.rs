//! Batch deletions as long-running operations on one replica (in memory,
//! and with Redis): results in order as unary calls would have answered,
//! arrivals spaced, interactive calls first, one operation per request id,
//! cancel, who sees what, and batches refused whole.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use provisioning_gateway::config::{BackendConfig, RedisFallback};
use provisioning_gateway::proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::redis::{VENDOR_T, assert_spacing, opts_20};
use crate::support::batch::{batch, codes, done, metadata, ops, resource, results, submit, with};
use crate::support::redis::RedisServer;
use crate::support::{Opts, account, details, request, spawn_app, spawn_config, spawn_open_mock};
use provisioning_gateway::mock::Scripted;

/// The interval of `Opts::default()`: 50 ms + a 40 ms margin.
const T: Duration = Duration::from_millis(90);

/// A batch of six: two deletions of one association (the second is a 404:
/// NOT_FOUND), two of another with `allow_missing` on the second (OK).
async fn six_in_order_as_unary_calls_would_answer(opts: Opts, interval: Duration) {
    let app = spawn_app(opts).await;
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let mut allowed = request(3);
    allowed.allow_missing = true;
    let requests = vec![
        request(0),
        request(1),
        request(1),
        request(3),
        allowed,
        request(5),
    ];
    let before = SystemTime::now() - Duration::from_millis(1);
    let accepted = submit(&mut client, batch(requests, "")).await;
    let after = SystemTime::now();
    assert!(accepted.name.starts_with("operations/"), "{accepted:?}");
    assert!(!accepted.done);
    let meta = metadata(&accepted);
    assert_eq!((meta.total, meta.succeeded, meta.failed), (6, 0, 0));
    let (created, eta) = (meta.create_time.unwrap(), meta.estimated_end_time.unwrap());
    let wall = |seconds: i64, nanos: i32| UNIX_EPOCH + Duration::new(seconds as u64, nanos as u32);
    let created_at = wall(created.seconds, created.nanos);
    assert!(
        before <= created_at && created_at <= after,
        "created when submitted: {created_at:?} not in {before:?}..{after:?}"
    );
    let estimated = Duration::from_secs((eta.seconds - created.seconds) as u64)
        + Duration::from_nanos(eta.nanos as u64)
        - Duration::from_nanos(created.nanos as u64);
    assert_eq!(estimated, 6 * interval, "six intervals, nothing ahead");

    let op = done(&mut ops, &accepted.name).await;
    let (results, error) = results(&op);
    assert!(error.is_none(), "{error:?}");
    use Code::{NotFound, Ok};
    assert_eq!(codes(&results), [Ok, Ok, NotFound, Ok, Ok, Ok]);
    let meta = metadata(&op);
    assert_eq!((meta.total, meta.succeeded, meta.failed), (6, 5, 1));
    assert!(!meta.cancel_requested);
    let ended = meta.end_time.unwrap();
    let ended_at = wall(ended.seconds, ended.nanos);
    assert!(
        created_at < ended_at && ended_at <= SystemTime::now(),
        "ended after it was created, by now: {ended_at:?}"
    );

    let arrivals = app.mock.arrivals();
    let order: Vec<String> = arrivals.iter().map(resource).collect();
    let want = ["0", "1", "1", "3", "3", "5"].map(|n| format!("number-key-{n}"));
    assert_eq!(order, want, "one at a time, in request order");
    let statuses: Vec<u16> = arrivals.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [204, 204, 404, 204, 404, 204]);
    let gaps = arrivals.windows(2).map(|w| w[1].at - w[0].at);
    assert!(
        gaps.clone().all(|g| g >= VENDOR_T),
        "spaced: {:?}",
        gaps.collect::<Vec<_>>()
    );

    // The NOT_FOUND is the very status a unary call gets.
    let unary = client.delete_association(request(1)).await.unwrap_err();
    assert_eq!(results[2], details::rpc_status(&unary));
}

#[tokio::test]
async fn a_batch_of_six_ends_with_results_in_request_order_in_memory() {
    six_in_order_as_unary_calls_would_answer(Opts::default(), T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_six_ends_with_results_in_request_order_with_redis() {
    let redis = RedisServer::start();
    let opts = opts_20().redis(&redis.url(), RedisFallback::Deny, 1);
    six_in_order_as_unary_calls_would_answer(opts, Duration::from_millis(120)).await;
}

#[tokio::test]
async fn a_unary_call_during_a_batch_of_fifteen_is_served_within_two_intervals() {
    let app = spawn_app(Opts::default()).await;
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let accepted = submit(&mut client, batch((0..15).map(request).collect(), "")).await;
    app.mock.wait_for_requests(3).await;
    let started = Instant::now();
    client.delete_association(request(100)).await.unwrap();
    let took = started.elapsed();
    assert!(took < 2 * T, "served after {took:?}, over two intervals");
    let op = done(&mut ops, &accepted.name).await;
    assert_eq!(codes(&results(&op).0), [Code::Ok; 15]);
    let arrivals = app.mock.arrivals();
    assert_eq!(arrivals.len(), 16);
    assert_spacing(&arrivals, "a batch with a unary call in between");
}

#[tokio::test]
async fn one_operation_per_request_id_and_a_cancel_sends_nothing_more_in_memory() {
    one_operation_per_request_id_and_a_cancel_sends_nothing_more(Opts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operation_per_request_id_and_a_cancel_sends_nothing_more_with_redis() {
    let redis = RedisServer::start();
    let opts = Opts::default().redis(&redis.url(), RedisFallback::Deny, 1);
    one_operation_per_request_id_and_a_cancel_sends_nothing_more(opts).await;
}

async fn one_operation_per_request_id_and_a_cancel_sends_nothing_more(opts: Opts) {
    let app = spawn_app(opts).await;
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let requests: Vec<_> = (0..20).map(request).collect();
    let first = submit(&mut client, batch(requests.clone(), "job-1")).await;
    let again = submit(&mut client, batch(requests, "job-1")).await;
    assert_eq!(again.name, first.name, "the same operation");
    let other = client
        .batch_delete_associations(batch(vec![request(7)], "job-1"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    details::error_info_with(&other, "REQUEST_ID_REUSED");

    app.mock.wait_for_requests(3).await;
    let cancel = CancelOperationRequest {
        name: first.name.clone(),
    };
    ops.cancel_operation(cancel).await.unwrap();
    let op = done(&mut ops, &first.name).await;
    let (results, error) = results(&op);
    let error = error.expect("a cancelled operation ends in an error");
    assert_eq!(Code::from_i32(error.code), Code::Cancelled);
    let sent = codes(&results)
        .iter()
        .take_while(|c| **c == Code::Ok)
        .count();
    assert!((3..20).contains(&sent), "{:?}", codes(&results));
    assert_eq!(codes(&results)[sent..], vec![Code::Cancelled; 20 - sent]);
    let meta = metadata(&op);
    assert!(meta.cancel_requested);
    assert_eq!(
        (meta.succeeded, meta.failed),
        (sent as i32, 20 - sent as i32)
    );

    // A batch behind it is drained past the cancelled requests: they never go.
    let next = submit(&mut client, batch(vec![request(999)], "")).await;
    done(&mut ops, &next.name).await;
    let arrivals: Vec<String> = app.mock.arrivals().iter().map(resource).collect();
    let want: Vec<String> = (0..sent)
        .map(|n| format!("number-key-{n}"))
        .chain(["number-key-999".to_owned()])
        .collect();
    assert_eq!(
        arrivals, want,
        "each sent request once, none after the cancel"
    );
}

#[tokio::test]
async fn only_the_caller_and_account_that_created_an_operation_see_it_in_memory() {
    only_the_caller_and_account_that_created_an_operation_see_it(BackendConfig::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_caller_and_account_that_created_an_operation_see_it_with_redis() {
    let redis = RedisServer::start();
    let opts = Opts::default().redis(&redis.url(), RedisFallback::Deny, 1);
    only_the_caller_and_account_that_created_an_operation_see_it(opts.backend).await;
}

async fn only_the_caller_and_account_that_created_an_operation_see_it(backend: BackendConfig) {
    let (mock, addr, stop) = spawn_open_mock(20).await;
    let upstream = format!("http://{addr}");
    let config = provisioning_gateway::Config::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .metrics_listen("127.0.0.1:0".parse().unwrap())
        .rate_per_second(20)
        .safety_margin(Opts::default().safety_margin)
        .account(account("main", &upstream, "key-main"))
        .account(account("other", &upstream, "key-other"))
        .backend(backend);
    let app = spawn_config(config, mock, stop).await;
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let mut alices = Vec::new();
    for n in 0..3 {
        let submitted = client
            .batch_delete_associations(with(batch(vec![request(n)], ""), "x-caller", "alice"))
            .await
            .unwrap();
        alices.push(submitted.into_inner().name);
    }
    let bobs = client
        .batch_delete_associations(with(batch(vec![request(9)], ""), "x-caller", "bob"))
        .await
        .unwrap()
        .into_inner()
        .name;
    let get = |name: &str| GetOperationRequest { name: name.into() };

    // Bob, or Alice on another account, sees nothing of Alice's.
    let not_found = [
        ops.get_operation(bob(get(&alices[0]))).await.unwrap_err(),
        ops.cancel_operation(bob(CancelOperationRequest {
            name: alices[0].clone(),
        }))
        .await
        .unwrap_err(),
        ops.delete_operation(bob(DeleteOperationRequest {
            name: alices[0].clone(),
        }))
        .await
        .unwrap_err(),
        {
            let mut r = with(get(&alices[0]), "x-caller", "alice");
            r.metadata_mut()
                .insert("x-infobip-account", "other".parse().unwrap());
            ops.get_operation(r).await.unwrap_err()
        },
    ];
    for status in not_found {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        details::error_info_with(&status, "OPERATION_NOT_FOUND");
    }

    // Alice's list, newest first, in pages of two; Bob's holds his alone.
    let list = |token: &str, caller: &str| {
        let request = ListOperationsRequest {
            page_size: 2,
            page_token: token.into(),
            ..Default::default()
        };
        with(request, "x-caller", caller)
    };
    let first = ops
        .list_operations(list("", "alice"))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = first.operations.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, [alices[2].as_str(), alices[1].as_str()]);
    assert!(!first.next_page_token.is_empty());
    let rest = ops
        .list_operations(list(&first.next_page_token, "alice"))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = rest.operations.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        (names, rest.next_page_token.as_str()),
        (vec![alices[0].as_str()], "")
    );
    // Exactly a page's worth: no next page.
    let mut whole = list("", "alice");
    whole.get_mut().page_size = 3;
    let whole = ops.list_operations(whole).await.unwrap().into_inner();
    assert_eq!(
        (whole.operations.len(), whole.next_page_token.as_str()),
        (3, "")
    );
    let bob_list = ops
        .list_operations(list("", "bob"))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = bob_list
        .operations
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(names, [bobs.as_str()]);
    // A page token this method did not return is refused, naming it.
    let forged = ops
        .list_operations(list("not-a-page-token", "alice"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument, "{forged:?}");
    let bad = forged.get_error_details();
    let fields: Vec<&str> = bad
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| v.field.as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(fields, ["page_token"]);

    // Alice forgets a done operation of hers; a running one is kept.
    let long = client
        .batch_delete_associations(alice(batch((10..25).map(request).collect(), "")))
        .await
        .unwrap()
        .into_inner()
        .name;
    let running = ops
        .delete_operation(alice(DeleteOperationRequest { name: long.clone() }))
        .await
        .unwrap_err();
    assert_eq!(running.code(), Code::FailedPrecondition, "{running:?}");
    let mut wait = tonic::Request::new(
        provisioning_gateway::proto::google::longrunning::WaitOperationRequest {
            name: alices[0].clone(),
            timeout: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
        },
    );
    wait.metadata_mut()
        .insert("x-caller", "alice".parse().unwrap());
    assert!(ops.wait_operation(wait).await.unwrap().into_inner().done);
    ops.delete_operation(alice(DeleteOperationRequest {
        name: alices[0].clone(),
    }))
    .await
    .unwrap();
    let gone = ops.get_operation(alice(get(&alices[0]))).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

#[tokio::test]
async fn an_invalid_request_refuses_the_whole_batch_naming_its_index() {
    let app = spawn_app(Opts::default()).await;
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let mut requests: Vec<_> = (0..6).map(request).collect();
    requests[3].resource_id.clear();
    let refused = client
        .batch_delete_associations(batch(requests, ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    details::error_info_with(&refused, "INVALID_REQUEST");
    let bad = refused.get_error_details();
    let fields: Vec<&str> = bad
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["requests[3].resource_id"]);
    let empty = client
        .batch_delete_associations(batch(Vec::new(), ""))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");

    // Nothing was queued: the next batch is the first to reach the emulator.
    let next = submit(&mut client, batch(vec![request(42)], "")).await;
    done(&mut ops, &next.name).await;
    let arrivals: Vec<String> = app.mock.arrivals().iter().map(resource).collect();
    assert_eq!(arrivals, ["number-key-42"]);
    let listed = ops
        .list_operations(ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.operations.len(), 1);
}

/// Field `field` of operation `name`'s hash in Redis (see
/// `src/operations/redis.rs` for the keys).
async fn op_field<T: redis::FromRedisValue>(redis: &RedisServer, name: &str, field: &str) -> T {
    let id = name.strip_prefix("operations/").unwrap();
    let mut conn = crate::redis::raw(redis).await;
    redis::cmd("HGET")
        .arg(format!("provisioning-gateway:test:{{default}}:ops:op:{id}"))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Shutdown stops the drainer between requests: the request in flight
/// upstream finishes and is recorded, and no other is taken; the rest stay
/// untaken in Redis for the next holder (the operation's `taken` count
/// stays at one).
#[tokio::test]
async fn a_stopping_drainer_finishes_the_request_in_flight_and_takes_no_other() {
    let redis = RedisServer::start();
    let opts = Opts::default().redis(&redis.url(), RedisFallback::Deny, 1);
    let app = spawn_app(opts).await;
    let slow = Scripted {
        delay: Duration::from_millis(300),
        ..Scripted::new(204, "")
    };
    app.mock.script([slow]);
    let mut client = app.client().await;
    let accepted = submit(&mut client, batch((0..3).map(request).collect(), "")).await;
    app.mock.wait_for_requests(1).await;
    let mock = app.mock.clone();
    app.shutdown().await.unwrap();

    assert_eq!(mock.arrivals().len(), 1, "sent after the stop");
    let first: Option<Vec<u8>> = op_field(&redis, &accepted.name, "r:0").await;
    assert!(first.is_some(), "the request in flight was recorded");
    let taken: Option<i64> = op_field(&redis, &accepted.name, "taken").await;
    assert_eq!(taken, Some(1), "requests taken from the queue");
}

/// A request taken from the queue and waiting for its turn when the
/// gateway shuts down is left queued, with no result: the next holder
/// sends it (an answer of SHUTTING_DOWN stored for it would lose it).
#[tokio::test]
async fn a_request_waiting_for_its_turn_at_shutdown_stays_queued_without_a_result() {
    let redis = RedisServer::start();
    let opts = Opts {
        rate_per_second: 1,
        ..Opts::default()
    }
    .redis(&redis.url(), RedisFallback::Deny, 1);
    let app = spawn_app(opts).await;
    let mut client = app.client().await;
    let accepted = submit(&mut client, batch((0..3).map(request).collect(), "")).await;
    // The second request is taken (the first has its result) and waits a
    // second for its turn.
    let started = Instant::now();
    let taken = || op_field::<Option<i64>>(&redis, &accepted.name, "taken");
    while taken().await != Some(2) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the second request was never taken"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mock = app.mock.clone();
    app.shutdown().await.unwrap();

    assert_eq!(mock.arrivals().len(), 1, "sent after the stop");
    let result = |i| op_field::<Option<Vec<u8>>>(&redis, &accepted.name, i);
    assert!(result("r:0").await.is_some(), "the first request's result");
    assert_eq!(result("r:1").await, None, "no result for the one in line");
    let mut conn = crate::redis::raw(&redis).await;
    let (pending, ..): (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg("provisioning-gateway:test:{default}:ops:queue")
        .arg("drainers")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending, 1, "still queued for the next holder");
}

/// A request whose first attempt the vendor answered 503, and whose
/// operation is cancelled while its retry waits for a turn, answers what the
/// vendor said (UNAVAILABLE), not CANCELLED: it had gone upstream.
#[tokio::test]
async fn a_request_cancelled_between_its_attempts_answers_what_the_vendor_said() {
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..Opts::default()
    })
    .await;
    app.mock.script([Scripted::new(503, "")]);
    let (mut client, mut ops) = (app.client().await, ops(app.addr).await);
    let accepted = submit(&mut client, batch(vec![request(0)], "")).await;
    // The first attempt went; its retry waits a second for its turn.
    app.mock.wait_for_requests(1).await;
    let cancel = CancelOperationRequest {
        name: accepted.name.clone(),
    };
    ops.cancel_operation(cancel).await.unwrap();
    let op = done(&mut ops, &accepted.name).await;
    let (results, _) = results(&op);
    assert_eq!(codes(&results), [Code::Unavailable], "{results:?}");
    assert_eq!(app.mock.arrivals().len(), 1, "no retry after the cancel");
}

/// `msg` from the anonymous caller `alice` (`x-caller`).
fn alice<T>(msg: T) -> tonic::Request<T> {
    with(msg, "x-caller", "alice")
}

/// `msg` from the anonymous caller `bob`.
fn bob<T>(msg: T) -> tonic::Request<T> {
    with(msg, "x-caller", "bob")
}
