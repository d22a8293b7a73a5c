//! Telemetry that fits its conventions (issue 15): span statuses and names
//! per the gRPC semantic conventions, the default resource, the propagators
//! of `OTEL_PROPAGATORS`, exported through a real OTLP receiver from the
//! real binary.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::pb::{DeleteAssociationRequest, DeleteAssociationResponse};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::otlp::{Collector, Received, attr};
use crate::support::process::GatewayProcess;
use crate::support::{Opts, metrics_page, request, spawn_app, spawn_mock, with_timeout};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `msg` under the caller span `caller_span` of [`TRACE_ID`], with baggage.
fn traced<T>(msg: T, caller_span: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let parent = format!("00-{TRACE_ID}-{caller_span}-01");
    r.metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    r.metadata_mut()
        .insert("baggage", "tenant=acme".parse().unwrap());
    r
}

/// The server span of the call made under `caller_span`.
fn server_span<'a>(spans: &'a [Received], caller_span: &str) -> &'a Received {
    spans
        .iter()
        .find(|r| hex(&r.span.parent_span_id) == caller_span)
        .unwrap_or_else(|| panic!("no server span under {caller_span}: {spans:#?}"))
}

/// The HTTP client span under `server`.
fn client_span<'a>(spans: &'a [Received], server: &Received) -> &'a Received {
    spans
        .iter()
        .find(|r| r.span.parent_span_id == server.span.span_id && r.span.name == "DELETE")
        .expect("an HTTP client span under the server span")
}

/// The span's status code (unset when absent).
fn status(r: &Received) -> i32 {
    r.span.status.as_ref().map_or(0, |s| s.code)
}

/// Calls `method` of the gateway's service, whatever it is, with `msg`.
async fn call_method(
    channel: Channel,
    method: &str,
    msg: tonic::Request<DeleteAssociationRequest>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = format!("/infobip.provisioning.v1.AssociationService/{method}")
        .parse()
        .unwrap();
    let codec =
        tonic_prost::ProstCodec::<DeleteAssociationRequest, DeleteAssociationResponse>::default();
    grpc.unary(msg, path, codec).await.unwrap_err()
}

/// One binary, default OTEL settings but the endpoint: the resource names
/// the gateway; only server failures mark the server span; an upstream 4xx
/// still marks the client span; unknown methods share one span name; the
/// caller's trace and baggage go upstream.
#[tokio::test]
async fn spans_follow_the_grpc_conventions_and_the_resource_names_the_gateway() {
    let collector = Collector::default();
    let (grpc, _) = collector.start().await;
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{grpc}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // A call must have 5 s left for its slot: 2 s deadlines are
            // refused at once.
            ("GATEWAY_UPSTREAM_RESERVE", "5s"),
        ],
    )
    .await;
    let channel = Channel::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AssociationServiceClient::new(channel.clone());

    let vendor = |http: u16| {
        Scripted::new(
            http,
            format!(
                r#"{{"requestError":{{"serviceException":{{"messageId":"E{http}","text":"vendor {http}"}}}}}}"#
            ),
        )
    };
    mock.script([vendor(500), vendor(400)]);
    let internal = client
        .delete_association(traced(request(1), "1000000000000001"))
        .await
        .unwrap_err();
    assert_eq!(internal.code(), Code::Internal);
    let invalid = client
        .delete_association(traced(request(2), "1000000000000002"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    client
        .delete_association(traced(request(3), "1000000000000003"))
        .await
        .unwrap();
    // Two identical budget refusals: the first is logged, the second held
    // back; both spans are sampled, so both are exported whole.
    for caller_span in ["1000000000000006", "1000000000000007"] {
        let mut call = traced(request(6), caller_span);
        call.set_timeout(Duration::from_secs(2));
        let refused = client.delete_association(call).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    for (method, caller_span) in [("Nope", "1000000000000004"), ("Other", "1000000000000005")] {
        let status = call_method(channel.clone(), method, traced(request(4), caller_span)).await;
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }

    let (exit, _) = gateway.terminate().await; // flushes the batch exporter
    assert!(exit.success());
    let spans = collector.spans();
    assert!(!spans.is_empty());
    for r in &spans {
        assert_eq!(r.service_name, "provisioning-gateway");
        assert!(
            r.resource
                .contains(&("service.version".into(), env!("CARGO_PKG_VERSION").into())),
            "{:?}",
            r.resource
        );
    }

    // INTERNAL is the server's failure; INVALID_ARGUMENT is not. The HTTP
    // client span of either upstream answer (500, 400) is an error.
    let failed = server_span(&spans, "1000000000000001");
    assert_eq!(
        attr(&failed.span, "rpc.grpc.status_code").as_deref(),
        Some("13")
    );
    assert_eq!(status(failed), StatusCode::Error as i32);
    assert_eq!(
        status(client_span(&spans, failed)),
        StatusCode::Error as i32
    );
    let refused = server_span(&spans, "1000000000000002");
    assert_eq!(
        attr(&refused.span, "rpc.grpc.status_code").as_deref(),
        Some("3")
    );
    assert_eq!(status(refused), StatusCode::Unset as i32);
    assert_eq!(
        status(client_span(&spans, refused)),
        StatusCode::Error as i32
    );
    let ok = server_span(&spans, "1000000000000003");
    assert_eq!(status(ok), StatusCode::Unset as i32);

    // A sampled refusal names its account and caller on its span, logged
    // or held back.
    for caller_span in ["1000000000000006", "1000000000000007"] {
        let refused = server_span(&spans, caller_span);
        assert_eq!(
            attr(&refused.span, "account").as_deref(),
            Some("default"),
            "{caller_span}: {:?}",
            refused.span.attributes
        );
        assert_eq!(attr(&refused.span, "caller").as_deref(), Some("anonymous"));
        assert_eq!(status(refused), StatusCode::Unset as i32);
    }

    // Methods the service does not have: one name, whatever the caller sent.
    for caller_span in ["1000000000000004", "1000000000000005"] {
        let unknown = server_span(&spans, caller_span);
        assert_eq!(
            unknown.span.name,
            "infobip.provisioning.v1.AssociationService/_OTHER"
        );
        assert_eq!(attr(&unknown.span, "rpc.method").as_deref(), Some("_OTHER"));
        assert_eq!(status(unknown), StatusCode::Error as i32, "UNIMPLEMENTED");
    }
    assert!(spans.iter().all(|r| !r.span.name.contains("Nope")));

    // Default propagators (tracecontext, baggage): both go upstream.
    let arrivals = mock.arrivals();
    let last = arrivals.last().expect("the OK call arrived");
    let ok_client = client_span(&spans, ok);
    assert_eq!(
        last.headers["traceparent"].to_str().unwrap(),
        format!("00-{TRACE_ID}-{}-01", hex(&ok_client.span.span_id))
    );
    assert_eq!(last.headers["baggage"].to_str().unwrap(), "tenant=acme");
}

/// `OTEL_PROPAGATORS=baggage`: the caller's `traceparent` is neither read
/// (the call starts a trace of its own) nor sent upstream; baggage is both.
#[tokio::test]
async fn otel_propagators_choose_what_is_read_and_sent() {
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[("OTEL_PROPAGATORS", "baggage")],
    )
    .await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    let answer = client
        .delete_association(traced(request(1), "2000000000000001"))
        .await
        .unwrap();
    let traceresponse = answer
        .metadata()
        .get("traceresponse")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(traceresponse.starts_with("00-"), "{traceresponse}");
    assert!(
        !traceresponse.contains(TRACE_ID),
        "the caller's traceparent is not read: {traceresponse}"
    );
    let arrivals = mock.arrivals();
    let headers = &arrivals[0].headers;
    assert!(headers.get("traceparent").is_none(), "{headers:?}");
    assert_eq!(headers["baggage"].to_str().unwrap(), "tenant=acme");
    let (exit, logs) = gateway.terminate().await;
    assert!(exit.success());
    assert!(
        logs.iter().all(|l| !l.contains("OTEL_PROPAGATORS")),
        "known names raise no warning: {logs:?}"
    );
}

/// The finite `le` bounds of histogram `name` on a `/metrics` page.
fn buckets(page: &str, name: &str) -> Vec<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut les: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
        .filter(|le: &f64| le.is_finite())
        .collect();
    les.sort_by(f64::total_cmp);
    les.dedup();
    les
}

/// The value of the first sample of `name` (any labels) on a page.
fn first_value(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `/metrics` as Prometheus and gRPC dashboards expect it: canonical code
/// names, buckets that fit each histogram, build and process information;
/// and the shipped alert rules name only metrics the gateway exports,
/// including the upstream-429 and p90-budget-wait alerts.
#[tokio::test]
async fn metrics_speak_grpc_codes_with_fitting_buckets_build_and_process_info() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    client.delete_association(request(0)).await.unwrap();
    let gone = client.delete_association(request(0)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let refused = client
        .delete_association(with_timeout(request(1), Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let mut busy = Scripted::new(429, "");
    busy.headers.push(("retry-after".into(), "0".into()));
    app.mock.script(std::iter::repeat_n(busy, 3));
    let pushed_back = client.delete_association(request(2)).await.unwrap_err();
    assert_eq!(pushed_back.code(), Code::ResourceExhausted);

    let page = metrics_page(app.metrics_addr).await;
    let requests = |code: &str| {
        format!(
            "provisioning_gateway_requests_total{{account=\"default\",caller=\"anonymous\",code=\"{code}\"}}"
        )
    };
    for code in ["OK", "NOT_FOUND", "RESOURCE_EXHAUSTED"] {
        assert!(page.contains(&requests(code)), "{code} in {page}");
    }
    assert!(
        !page.contains("code=\"Ok\"") && !page.contains("code=\"NotFound\""),
        "no Debug names: {page}"
    );
    assert!(page.contains("provisioning_gateway_request_duration_seconds_count{code=\"OK\"}"));

    // Budget waits: up to a minute, several buckets between 1 s and 30 s.
    let wait = buckets(&page, "provisioning_gateway_budget_wait_seconds");
    assert_eq!(wait.last(), Some(&60.0), "{wait:?}");
    let between = wait.iter().filter(|le| **le > 1.0 && **le < 30.0).count();
    assert!(between >= 6, "{wait:?}");
    // Upstream attempts: millisecond steps up to the default timeout.
    let upstream = buckets(&page, "provisioning_gateway_upstream_duration_seconds");
    assert_eq!(upstream.last(), Some(&10.0), "{upstream:?}");
    let fine = upstream
        .iter()
        .filter(|le| **le >= 0.005 && **le <= 1.0)
        .count();
    assert!(fine >= 12, "{upstream:?}");
    let call = buckets(&page, "provisioning_gateway_request_duration_seconds");
    assert_eq!(call.last(), Some(&60.0), "{call:?}");

    let build = format!(
        "provisioning_gateway_build_info{{version=\"{}\",rustc=\"",
        env!("CARGO_PKG_VERSION")
    );
    let build_line = page.lines().find(|l| l.starts_with(&build));
    assert!(build_line.is_some_and(|l| l.ends_with(" 1")), "{page}");
    for process in ["process_resident_memory_bytes", "process_open_fds"] {
        let v = first_value(&page, process).unwrap_or_else(|| panic!("{process} in {page}"));
        assert!(v > 0.0, "{process} {v}");
    }
    assert!(
        first_value(&page, "process_cpu_seconds_total").is_some(),
        "{page}"
    );

    // The shipped alert rules: a 429 alert and a p90 budget-wait alert, and
    // every gateway metric they read is one this page has.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/components/monitoring/prometheusrule.yaml"
    ))
    .unwrap();
    assert!(rules.contains(r#"provisioning_gateway_upstream_requests_total{status="429"}"#));
    assert!(rules.contains("histogram_quantile(0.9"));
    assert!(rules.contains("provisioning_gateway_budget_wait_seconds_bucket"));
    let named = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("provisioning_gateway_"));
    for name in named {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "the rules read {name}, which /metrics does not have"
        );
    }
    app.shutdown().await.unwrap();
}

/// A flood of refusals writes a handful of log lines, and their counts add
/// up: the first refusal of a kind in full, then one summary line per kind
/// and interval (and at shutdown) with the count held back. Every served
/// call keeps its own line.
#[tokio::test]
async fn a_flood_of_refusals_writes_a_few_lines_whose_counts_add_up() {
    // The load tool floods the release binary with 40,000 (BENCHMARKS.md);
    // a debug build on a shared CI machine refuses a few thousand a second.
    const FLOOD: usize = 2_000;
    const CALLERS: usize = 64;
    let (_mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("GATEWAY_RATE_PER_SECOND", "20"),
            ("GATEWAY_SAFETY_MARGIN", "40ms"),
            // A call must have 5 s left for its slot to be any use.
            ("GATEWAY_UPSTREAM_RESERVE", "5s"),
        ],
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = Channel::from_shared(format!("http://{}", gateway.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(AssociationServiceClient::new(channel));
    }
    for n in 0..3 {
        let call = with_timeout(request(n), Duration::from_secs(10));
        clients[0].delete_association(call).await.unwrap();
    }
    // 64 callers, 2 s deadlines (less than --upstream-reserve): every call
    // is refused at once, long before the deadline even on a busy machine.
    let mut flood = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let mut client = clients[caller % clients.len()].clone();
        flood.spawn(async move {
            let mut refused = 0;
            for n in (caller..FLOOD).step_by(CALLERS) {
                let call = with_timeout(request(1000 + n), Duration::from_secs(2));
                let status = client.delete_association(call).await.unwrap_err();
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
            refused
        });
    }
    let refused: usize = flood.join_all().await.into_iter().sum();
    assert_eq!(refused, FLOOD);

    let (exit, logs) = gateway.terminate().await; // the last summary is written on the way out
    assert!(exit.success());
    let lines = |text: &'static str| logs.iter().filter(move |l| l.contains(text));
    assert_eq!(
        lines("association deleted").count(),
        3,
        "one line per served call"
    );
    let first = lines("delete failed").count();
    let summaries: Vec<serde_json::Value> = lines("refusals held back")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for s in &summaries {
        assert_eq!(s["account"], "default", "{s}");
        assert_eq!(s["caller"], "anonymous", "{s}");
        assert_eq!(s["refusal"], "deadline", "{s}");
    }
    let held: u64 = summaries
        .iter()
        .map(|s| s["refused"].as_u64().unwrap())
        .sum();
    assert_eq!(
        first as u64 + held,
        FLOOD as u64,
        "every refusal is counted once"
    );
    assert!(
        first + summaries.len() <= 6,
        "{first} + {}",
        summaries.len()
    );
    assert!(
        logs.len() <= 30,
        "{} lines for {FLOOD} refusals",
        logs.len()
    );
}

/// A caller that leaves while its call waits in line: the server span is
/// still exported, from the call's arrival to its departure, as `CANCELLED`
/// (no server failure), with nothing sent upstream under it.
#[tokio::test]
async fn a_call_whose_caller_leaves_in_line_is_exported_as_cancelled() {
    use provisioning_gateway::telemetry::metrics::QUEUE_DEPTH;
    use std::time::{SystemTime, UNIX_EPOCH};

    use crate::support::{series, until_metric};

    let collector = Collector::default();
    let (grpc, _) = collector.start().await;
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{grpc}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // Slots 3 s apart: the waiting call is in line long enough to
            // be seen there however busy the machine.
            ("GATEWAY_SAFETY_MARGIN", "2s"),
        ],
    )
    .await;
    let metrics = gateway.metrics_addr.parse().unwrap();
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    // Takes the slot: the next call waits about 3 s in line.
    client
        .delete_association(traced(request(1), "2000000000000001"))
        .await
        .unwrap();
    let mut waiting = client.clone();
    let call = tokio::spawn(async move {
        let mut call = traced(request(2), "2000000000000002");
        call.set_timeout(Duration::from_secs(30));
        waiting.delete_association(call).await
    });
    let depth = series(QUEUE_DEPTH, "default");
    until_metric(metrics, &depth, 1.0).await;
    let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let left = nanos(SystemTime::now());
    call.abort();
    // The gateway saw the caller go: the call is out of line.
    until_metric(metrics, &depth, 0.0).await;
    // A caller whose trace is not sampled: the decision made on arrival
    // holds for the whole call (nothing exported), and its ids still flow.
    let mut unsampled = tonic::Request::new(request(3));
    let parent = format!("00-{TRACE_ID}-2000000000000003-00");
    unsampled
        .metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    let answer = client.delete_association(unsampled).await.unwrap();
    let traceresponse = answer.metadata().get("traceresponse").unwrap();
    let traceresponse = traceresponse.to_str().unwrap();
    assert!(
        traceresponse.starts_with(&format!("00-{TRACE_ID}-")) && traceresponse.ends_with("-00"),
        "{traceresponse}"
    );
    let upstream = mock.arrivals().last().unwrap().headers["traceparent"].clone();
    let upstream = upstream.to_str().unwrap();
    assert!(
        upstream.starts_with(&format!("00-{TRACE_ID}-")) && upstream.ends_with("-00"),
        "{upstream}"
    );

    let (exit, _) = gateway.terminate().await; // flushes the batch exporter
    assert!(exit.success());
    let spans = collector.spans();
    let cancelled = server_span(&spans, "2000000000000002");
    assert_eq!(
        attr(&cancelled.span, "rpc.grpc.status_code").as_deref(),
        Some("1")
    );
    assert_eq!(status(cancelled), StatusCode::Unset as i32);
    assert!(
        cancelled.span.start_time_unix_nano < left && cancelled.span.end_time_unix_nano >= left,
        "the span covers the wait: {} – {} around {left}",
        cancelled.span.start_time_unix_nano,
        cancelled.span.end_time_unix_nano
    );
    assert!(
        spans
            .iter()
            .all(|r| r.span.parent_span_id != cancelled.span.span_id || r.span.name != "DELETE"),
        "nothing went upstream for the call that left"
    );
    assert_eq!(mock.arrivals().len(), 2);
    assert!(
        spans
            .iter()
            .all(|r| hex(&r.span.trace_id) != TRACE_ID
                || !traceresponse.contains(&hex(&r.span.span_id))),
        "the unsampled call exported nothing"
    );
}
