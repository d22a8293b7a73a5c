//! Traces, metrics and logs: one call followed from the caller's traceparent
//! through the budget wait to the Infobip request (received by an in-test
//! OTLP collector), Prometheus counters that move by code and reason, and no
//! API key anywhere.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::Code;

use crate::support::otlp::{Collector, Received, all_values, attr};
use crate::support::process::GatewayProcess;
use crate::support::{API_KEY, Opts, request, spawn_app, spawn_mock, with_timeout};

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
    assert_eq!(attr(c, "http.response.status_code").as_deref(), Some("204"));
    assert_eq!(attr(c, "http.request.resend_count").as_deref(), Some("0"));
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

    // Error path: the 404 marks the spans as errors and still returns traceresponse.
    let (server, _, client_span) = call_spans(&spans, "1111111111111111");
    assert_eq!(
        attr(&server.span, "rpc.grpc.status_code").as_deref(),
        Some("5")
    );
    assert_eq!(
        server.span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        attr(&client_span.span, "http.response.status_code").as_deref(),
        Some("404")
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
        delta(requests, &[("account", "default"), ("code", "Ok")]),
        1.0
    );
    assert_eq!(delta(requests, &[("code", "InvalidArgument")]), 1.0);
    assert_eq!(delta(requests, &[("code", "ResourceExhausted")]), 1.0);
    assert_eq!(delta(requests, &[("code", "NotFound")]), 1.0);
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
            &[("code", "Ok")]
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
