//! Every row of the status mapping table, driven through the real gateway by
//! scripted emulator answers and by real transport failures.

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Scripted;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{API_KEY, Opts, details, request, spawn_app, with_timeout};

fn vendor_body(message_id: &str, text: &str) -> String {
    format!(
        r#"{{"requestError":{{"serviceException":{{"messageId":"{message_id}","text":"{text}"}}}}}}"#
    )
}

/// Checks THE ErrorInfo (exactly one, in the gateway's domain): reason,
/// account and (when given) http_status.
fn assert_info(status: &tonic::Status, reason: &str, http: Option<u16>) {
    let info = details::error_info_with(status, reason);
    assert_eq!(info.metadata["account"], "default");
    assert_eq!(
        info.metadata.get("http_status").map(String::as_str),
        http.map(|h| h.to_string()).as_deref()
    );
    assert!(!format!("{status:?}").contains(API_KEY));
}

#[tokio::test]
async fn every_http_row_maps_with_the_vendor_reason_and_text() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    // 429 and 503 are retried (they provably did not take effect), so they
    // are scripted three times: once per attempt.
    let rows: &[(u16, Code, usize)] = &[
        (400, Code::InvalidArgument, 1),
        (401, Code::Unauthenticated, 1),
        (403, Code::PermissionDenied, 1),
        (404, Code::NotFound, 1),
        (409, Code::Aborted, 1),
        (429, Code::ResourceExhausted, 3),
        (499, Code::Cancelled, 1),
        (500, Code::Internal, 1),
        (501, Code::Unimplemented, 1),
        (502, Code::Unavailable, 1),
        (503, Code::Unavailable, 3),
        (504, Code::DeadlineExceeded, 1),
        (418, Code::FailedPrecondition, 1),
        (507, Code::Unavailable, 1),
    ];
    for (n, &(http, code, attempts)) in rows.iter().enumerate() {
        let before = app.mock.arrivals().len();
        let mut answer = Scripted::new(
            http,
            vendor_body(&format!("VENDOR_{http}"), &format!("vendor says {http}")),
        );
        answer.headers.push(("retry-after".into(), "0".into()));
        app.mock.script(std::iter::repeat_n(answer, attempts));
        let status = client.delete_association(request(n)).await.unwrap_err();
        assert_eq!(status.code(), code, "HTTP {http}");
        assert_eq!(status.message(), format!("vendor says {http}"));
        assert_info(&status, &format!("VENDOR_{http}"), Some(http));
        assert_eq!(
            app.mock.arrivals().len() - before,
            attempts,
            "attempts for HTTP {http}"
        );
        if http == 429 {
            assert!(
                status.get_error_details().retry_info().is_some(),
                "429 carries RetryInfo"
            );
        }
    }
}

#[tokio::test]
async fn non_json_bodies_still_map_by_http_status() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    for (n, (http, code)) in [
        (502, Code::Unavailable),
        (404, Code::NotFound),
        (500, Code::Internal),
    ]
    .into_iter()
    .enumerate()
    {
        let mut html = Scripted::new(http, "<html><body>Bad Gateway</body></html>");
        html.headers = vec![("content-type".into(), "text/html".into())];
        app.mock.script([html]);
        let status = client.delete_association(request(n)).await.unwrap_err();
        assert_eq!(status.code(), code);
        assert_info(&status, &format!("UPSTREAM_HTTP_{http}"), Some(http));
        assert!(!status.message().contains("<html>"));
    }
}

#[tokio::test]
async fn validation_errors_become_field_violations_with_proto_names() {
    let app = spawn_app(Opts::default()).await;
    let body = r#"{"requestError":{"serviceException":{"messageId":"BAD_REQUEST","text":"Bad request","validationErrors":{"applicationId":["application not found"],"resourceId":["unknown number"]}}}}"#;
    app.mock.script([Scripted::new(400, body)]);
    let status = app
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_info(&status, "BAD_REQUEST", Some(400));
    let d = status.get_error_details();
    let fields: Vec<_> = d
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("application_id", "application not found"),
            ("resource_id", "unknown number")
        ]
    );
}

#[tokio::test]
async fn a_503_then_success_is_retried_to_ok() {
    let app = spawn_app(Opts::default()).await;
    app.mock.script([Scripted::new(
        503,
        vendor_body("SERVICE_UNAVAILABLE", "try later"),
    )]);
    app.client()
        .await
        .delete_association(request(0))
        .await
        .unwrap();
    let statuses: Vec<_> = app.mock.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(statuses, [503, 204]);
}

#[tokio::test]
async fn connection_refused_is_unavailable_upstream_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app(Opts {
        upstream_url: Some(format!("http://127.0.0.1:{port}")),
        ..Opts::default()
    })
    .await;
    let status = app
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_info(&status, "UPSTREAM_UNREACHABLE", None);
}

#[tokio::test]
async fn a_reset_after_the_request_is_sent_is_unavailable_and_not_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await; // the request arrived...
            let _ = conn.set_zero_linger(); // ...and the connection is reset (RST).
            drop(conn);
        }
    });
    let app = spawn_app(Opts {
        upstream_url: Some(format!("http://{addr}")),
        ..Opts::default()
    })
    .await;
    let status = app
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_info(&status, "UPSTREAM_UNREACHABLE", None);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "it may have taken effect: no retry"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_deadline_exceeded_at_the_upstream_timeout() {
    let app = spawn_app(Opts {
        upstream_timeout: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    let mut slow = Scripted::new(204, "");
    slow.delay = Duration::from_secs(5);
    app.mock.script([slow]);
    let started = Instant::now();
    let status = app
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_info(&status, "UPSTREAM_TIMEOUT", None);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the upstream timeout, not when the upstream did"
    );
    // And the gateway let go of the request: its connection closed.
    app.mock.wait_for_abandoned(1).await;
    let abandoned = &app.mock.abandoned()[0];
    assert!(abandoned.at - abandoned.arrived < Duration::from_secs(4));
}

/// The attempt runs under the deadline of the caller that started it, even
/// while another caller with more time shares it: the upstream request is
/// abandoned at that deadline, not at `--upstream-timeout`. (A lone caller
/// cannot show the cap: its own patience ends at the same moment and drops
/// the attempt anyway. A follower keeps the work alive past its leader.)
#[tokio::test]
async fn the_callers_deadline_caps_the_upstream_attempt() {
    let app = spawn_app(Opts {
        upstream_timeout: Duration::from_secs(30),
        ..Opts::default()
    })
    .await;
    let mut slow = Scripted::new(204, "");
    slow.delay = Duration::from_secs(20);
    app.mock.script([slow]);
    let started = Instant::now();
    let leader = tokio::spawn({
        let mut client = app.client().await;
        async move {
            let status = client
                .delete_association(with_timeout(request(0), Duration::from_secs(1)))
                .await
                .unwrap_err();
            (status, started.elapsed())
        }
    });
    app.mock.wait_for_requests(1).await; // the leader's attempt is upstream
    // The same call with six seconds to spare shares the leader's attempt.
    let follower = app
        .client()
        .await
        .delete_association(with_timeout(request(0), Duration::from_secs(6)))
        .await
        .unwrap_err();
    let followed = started.elapsed();
    let (leader, led) = leader.await.unwrap();
    for (who, status) in [("leader", &leader), ("follower", &follower)] {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{who}: {status:?}");
        assert_info(status, "UPSTREAM_TIMEOUT", None);
    }
    assert!(
        led < Duration::from_secs(2),
        "the leader at its deadline ({led:?})"
    );
    // The emulator saw the gateway give up on its request at the leader's
    // deadline: well before the follower's, let alone --upstream-timeout.
    app.mock.wait_for_abandoned(1).await;
    let abandoned = &app.mock.abandoned()[0];
    let held = abandoned.at - abandoned.arrived;
    assert!(
        held < Duration::from_secs(2),
        "the upstream request was abandoned after {held:?}"
    );
    assert_eq!(
        app.mock.arrivals().len(),
        0,
        "never answered, never retried"
    );
    assert!(
        followed < Duration::from_secs(3),
        "the follower got the capped attempt's outcome, not its own deadline ({followed:?})"
    );
}
