//! Traces, metrics and logs: one call followed from the caller's traceparent
//! through the budget wait to the Infobip request (received by an in-test
//! OTLP collector), Prometheus counters that move by code and reason, and no
//! API key anywhere (logs at trace included, on every error path).

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::Code;

use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::support::otlp::{Collector, Received, all_values, attr, attr_value};
use crate::support::process::GatewayProcess;
use crate::support::{API_KEY, Opts, details, request, spawn_app, spawn_mock, with_timeout};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced<T>(msg: T, caller_span: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{caller_span}-01").parse().unwrap(),
    );
    r.metadata_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    r
}

/// The spans of the call whose caller span was `caller_span`: (server, budget.wait, http.client).
fn call_spans(spans: &[Received], caller_span: &str) -> (Received, Received, Received) {
    let server = spans
        .iter()
        .find(|r| hex(&r.span.parent_span_id) == caller_span)
        .unwrap_or_else(|| panic!("no server span under {caller_span}: {spans:#?}"))
        .clone();
    assert_eq!(
        hex(&server.span.trace_id),
        TRACE_ID,
        "the caller's trace continues"
    );
    let child = |name: &str| {
        spans
            .iter()
            .find(|r| r.span.parent_span_id == server.span.span_id && r.span.name == name)
            .unwrap_or_else(|| panic!("no {name} child of the server span"))
            .clone()
    };
    (server.clone(), child("budget.wait"), child("DELETE"))
}

async fn traced_calls_are_exported(protocol: &str) {
    let collector = Collector::default();
    let (grpc, http) = collector.start().await;
    let endpoint = if protocol == "grpc" {
        format!("http://{grpc}")
    } else {
        format!("http://{http}")
    };
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_SERVICE_NAME", "pg-under-test"),
            // OTEL_SERVICE_NAME wins over the attributes' service.name.
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attributes,service.version=9.9.9-test",
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();

    // A successful call, then the same one again: Infobip answers 404.
    let ok = client
        .delete_association(traced(request(0), CALLER_SPAN))
        .await
        .unwrap();
    let err = client
        .delete_association(traced(request(0), "1111111111111111"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let (status, logs) = gateway.terminate().await; // flushes the batch exporter
    assert!(status.success());
    let spans = collector.spans();
    assert!(spans.iter().all(|r| r.service_name == "pg-under-test"));
    assert!(
        spans.iter().all(|r| r
            .resource
            .contains(&("service.version".into(), "9.9.9-test".into()))),
        "OTEL_RESOURCE_ATTRIBUTES overrides the version"
    );

    // Success: server → budget.wait, server → HTTP client; attributes; upstream traceparent.
    let (server, wait, client_span) = call_spans(&spans, CALLER_SPAN);
    let s = &server.span;
    assert_eq!(s.kind, SpanKind::Server as i32);
    assert_eq!(
        s.name,
        "infobip.provisioning.v1.AssociationService/DeleteAssociation"
    );
    assert_eq!(attr(s, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attr(s, "rpc.service").as_deref(),
        Some("infobip.provisioning.v1.AssociationService")
    );
    assert_eq!(attr(s, "rpc.method").as_deref(), Some("DeleteAssociation"));
    assert_eq!(attr(s, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(attr(s, "account").as_deref(), Some("default"));
    assert_eq!(
        attr(&wait.span, "budget.outcome").as_deref(),
        Some("granted")
    );
    assert!(attr(&wait.span, "budget.queue_position").is_some());
    assert!(attr(&wait.span, "budget.waited_ms").is_some());
    let c = &client_span.span;
    assert_eq!(c.kind, SpanKind::Client as i32);
    assert_eq!(attr(c, "http.request.method").as_deref(), Some("DELETE"));
    assert_eq!(attr(c, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        attr(c, "url.full"),
        Some(format!("http://{mock_addr}/provisioning/1/associations"))
    );
    // Ints, as the HTTP semantic conventions type them (not "204").
    assert_eq!(
        attr_value(c, "http.response.status_code"),
        Some(Value::IntValue(204))
    );
    assert_eq!(
        attr_value(c, "http.request.resend_count"),
        Some(Value::IntValue(0))
    );
    assert_eq!(
        attr_value(c, "server.port"),
        Some(Value::IntValue(i64::from(mock_addr.port())))
    );
    assert_eq!(
        attr_value(s, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    let arrivals = mock.arrivals();
    let upstream_parent = arrivals[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        upstream_parent,
        format!("00-{TRACE_ID}-{}-01", hex(&c.span_id)),
        "the upstream's parent is the HTTP client span"
    );
    let traceresponse = ok
        .metadata()
        .get("traceresponse")
        .expect("traceresponse on success")
        .to_str()
        .unwrap();
    assert_eq!(
        traceresponse,
        format!("00-{TRACE_ID}-{}-01", hex(&s.span_id))
    );

    // Error path: the 404 marks the HTTP client span as an error, not the
    // server span (NOT_FOUND is no server failure in the gRPC conventions),
    // and still returns traceresponse.
    let (server, _, client_span) = call_spans(&spans, "1111111111111111");
    assert_eq!(
        attr(&server.span, "rpc.grpc.status_code").as_deref(),
        Some("5")
    );
    assert_eq!(
        server.span.status.as_ref().map_or(0, |s| s.code),
        StatusCode::Unset as i32
    );
    assert_eq!(
        attr_value(&client_span.span, "http.response.status_code"),
        Some(Value::IntValue(404))
    );
    assert_eq!(
        client_span.span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    let traceresponse = err
        .metadata()
        .get("traceresponse")
        .expect("traceresponse on errors")
        .to_str()
        .unwrap();
    assert!(traceresponse.starts_with(&format!("00-{TRACE_ID}-")));

    // Logs carry trace ids; nothing carries the key.
    let call_log = logs
        .iter()
        .find(|l| l.contains("association deleted"))
        .expect("one event per call");
    assert!(call_log.contains(TRACE_ID), "{call_log}");
    assert!(!all_values(&spans).contains(API_KEY));
    assert!(logs.iter().all(|l| !l.contains(API_KEY)));
}

#[tokio::test]
async fn a_call_is_one_trace_from_caller_to_infobip_over_otlp_grpc() {
    traced_calls_are_exported("grpc").await;
}

#[tokio::test]
async fn a_call_is_one_trace_from_caller_to_infobip_over_otlp_http() {
    traced_calls_are_exported("http/protobuf").await;
}

#[tokio::test]
async fn without_otel_variables_nothing_is_exported_and_nothing_complains() {
    let (_mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(&format!("http://{mock_addr}"), &[]).await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    let ok = client
        .delete_association(traced(request(0), CALLER_SPAN))
        .await
        .unwrap();
    assert!(
        ok.metadata().get("traceresponse").is_some(),
        "ids exist without export"
    );
    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    let noise: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        // The one intended warning: this gateway runs without caller authentication.
        .filter(|l| !l.contains("every caller is anonymous"))
        .collect();
    assert!(noise.is_empty(), "{noise:?}");
}

/// Parses `/metrics` and returns the value of the sample with these labels.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => {
                h.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_move_by_code_and_reason_and_never_carry_the_key() {
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..Opts::default()
    })
    .await;
    let url = format!("http://{}/metrics", app.metrics_addr);
    let scrape = || async { reqwest::get(&url).await.unwrap().text().await.unwrap() };
    let before = scrape().await;
    let mut client = app.client().await;
    client.delete_association(request(0)).await.unwrap();
    let mut bad = request(1);
    bad.application_id.clear();
    assert_eq!(
        client.delete_association(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let refused = client
        .delete_association(with_timeout(request(2), Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    client.delete_association(request(0)).await.unwrap_err(); // waits ~1 s, then 404
    let after = scrape().await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let requests = "provisioning_gateway_requests_total";
    assert_eq!(
        delta(requests, &[("account", "default"), ("code", "OK")]),
        1.0
    );
    assert_eq!(delta(requests, &[("code", "INVALID_ARGUMENT")]), 1.0);
    assert_eq!(delta(requests, &[("code", "RESOURCE_EXHAUSTED")]), 1.0);
    assert_eq!(delta(requests, &[("code", "NOT_FOUND")]), 1.0);
    let upstream = "provisioning_gateway_upstream_requests_total";
    assert_eq!(delta(upstream, &[("status", "204")]), 1.0);
    assert_eq!(delta(upstream, &[("status", "404")]), 1.0);
    assert_eq!(
        delta(
            "provisioning_gateway_budget_rejections_total",
            &[("reason", "deadline")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "provisioning_gateway_budget_wait_seconds_count",
            &[("account", "default")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "provisioning_gateway_request_duration_seconds_count",
            &[("code", "OK")]
        ),
        1.0
    );
    assert!(after.contains("provisioning_gateway_upstream_duration_seconds_bucket"));
    assert!(after.contains("provisioning_gateway_budget_queue_depth{account=\"default\"}"));
    assert_eq!(
        sample(&after, "provisioning_gateway_budget_backend_degraded", &[]),
        0.0
    );
    assert!(!after.contains(API_KEY));
}

/// Whether `bytes` contain the API key.
fn holds_key(bytes: &[u8]) -> bool {
    bytes
        .windows(API_KEY.len())
        .any(|w| w == API_KEY.as_bytes())
}

/// The key in no part of an answer: message, details, metadata.
fn assert_no_key_in(status: &tonic::Status) {
    assert!(!status.message().contains(API_KEY), "{status:?}");
    assert!(!holds_key(status.details()), "{status:?}");
    for entry in status.metadata().iter() {
        let leaked = match entry {
            tonic::metadata::KeyAndValueRef::Ascii(_, v) => holds_key(v.as_encoded_bytes()),
            tonic::metadata::KeyAndValueRef::Binary(_, v) => {
                holds_key(v.as_encoded_bytes()) || v.to_bytes().is_ok_and(|b| holds_key(&b))
            }
        };
        assert!(!leaked, "{entry:?} on {status:?}");
    }
}

/// Every error path of the mapping table through the real binary logging at
/// `trace` (the gateway's and every library's events): the API key appears
/// in no log line, no status message, no detail and no metadata.
#[tokio::test]
async fn the_api_key_is_in_no_log_line_at_trace_on_any_error_path() {
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    // Both accounts use the one key: "main" reaches the emulator, "dead" a
    // port where nothing listens (refused connections).
    std::fs::write(
        &accounts,
        format!(
            "default_account = \"main\"\n\
             [[accounts]]\nname = \"main\"\nbase_url = \"http://{mock_addr}\"\n\
             api_key_env = \"TEST_INFOBIP_KEY\"\nrate_per_second = 20\n\
             [[accounts]]\nname = \"dead\"\nbase_url = \"http://127.0.0.1:{dead_port}\"\n\
             api_key_env = \"TEST_INFOBIP_KEY\"\nrate_per_second = 20\n"
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start_with(&[
        ("GATEWAY_ACCOUNTS_FILE", accounts.to_str().unwrap()),
        ("TEST_INFOBIP_KEY", API_KEY),
        ("GATEWAY_UPSTREAM_TIMEOUT", "500ms"),
        ("GATEWAY_SAFETY_MARGIN", "40ms"),
        ("RUST_LOG", "trace"),
    ])
    .await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();

    let vendor = |http: u16, times: usize, extra: &str| {
        let body = format!(
            r#"{{"requestError":{{"serviceException":{{"messageId":"VENDOR_{http}","text":"vendor says {http}"{extra}}}}}}}"#
        );
        let mut answer = Scripted::new(http, body);
        answer.headers.push(("retry-after".into(), "0".into()));
        std::iter::repeat_n(answer, times)
    };
    // (what, scripted answers, request, expected code, expected reason)
    let mut paths: Vec<(&str, Vec<Scripted>, tonic::Request<_>, Code, String)> = Vec::new();
    let validation = r#","validationErrors":{"applicationId":["application not found"]}"#;
    for (http, times, code) in [
        (400, 1, Code::InvalidArgument),
        (401, 1, Code::Unauthenticated),
        (403, 1, Code::PermissionDenied),
        (429, 3, Code::ResourceExhausted),
        (500, 1, Code::Internal),
        (503, 3, Code::Unavailable),
    ] {
        let extra = if http == 400 { validation } else { "" };
        paths.push((
            "upstream error",
            vendor(http, times, extra).collect(),
            tonic::Request::new(request(http.into())),
            code,
            format!("VENDOR_{http}"),
        ));
    }
    let mut hanging = Scripted::new(204, "");
    hanging.delay = Duration::from_secs(5);
    paths.push((
        "hanging upstream",
        vec![hanging],
        tonic::Request::new(request(1)),
        Code::DeadlineExceeded,
        "UPSTREAM_TIMEOUT".into(),
    ));
    let mut dead = tonic::Request::new(request(2));
    dead.metadata_mut()
        .insert("x-infobip-account", "dead".parse().unwrap());
    paths.push((
        "refused connection",
        vec![],
        dead,
        Code::Unavailable,
        "UPSTREAM_UNREACHABLE".into(),
    ));
    paths.push((
        // Less time than --upstream-reserve: hopeless at once.
        "budget refusal",
        vec![],
        with_timeout(request(3), Duration::from_millis(180)),
        Code::ResourceExhausted,
        "BUDGET_EXHAUSTED".into(),
    ));
    let mut invalid = request(4);
    invalid.application_id.clear();
    paths.push((
        "invalid request",
        vec![],
        tonic::Request::new(invalid),
        Code::InvalidArgument,
        "INVALID_REQUEST".into(),
    ));
    let mut unknown = tonic::Request::new(request(5));
    unknown
        .metadata_mut()
        .insert("x-infobip-account", "nope".parse().unwrap());
    paths.push((
        "unknown account",
        vec![],
        unknown,
        Code::InvalidArgument,
        "UNKNOWN_ACCOUNT".into(),
    ));
    let mut large = request(6);
    large.application_id = "a".repeat(5000);
    paths.push((
        "request too large",
        vec![],
        tonic::Request::new(large),
        Code::OutOfRange,
        "REQUEST_TOO_LARGE".into(),
    ));
    let failures = paths.len();
    for (what, script, req, code, reason) in paths {
        mock.script(script);
        let status = client.delete_association(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        details::error_info_with(&status, &reason);
        assert_no_key_in(&status);
    }
    // A success and a 404 too (what the info-level test already covers).
    client.delete_association(request(7)).await.unwrap();
    let gone = client.delete_association(request(7)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert_no_key_in(&gone);

    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    // The filter really is below info (the libraries' debug events show),
    // and every call is in the logs.
    assert!(
        logs.iter().any(|l| l.contains(r#""level":"DEBUG""#)),
        "no debug-level line: is RUST_LOG=trace applied?"
    );
    assert!(
        logs.iter().filter(|l| l.contains("delete failed")).count() > failures,
        "one event per failed call"
    );
    let leaks: Vec<_> = logs.iter().filter(|l| l.contains(API_KEY)).collect();
    assert!(leaks.is_empty(), "the API key is logged: {leaks:#?}");
}
