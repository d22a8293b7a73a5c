//! The latency cost of tracing: the release binary exporting every span over
//! OTLP/gRPC to a receiver in this process, vs the same binary with no OTLP
//! variables set, in interleaved rounds. Both log their JSON line per call as
//! in production; the only difference is the exporter. One process per mode,
//! since the tracing subscriber is global to a process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::Opts;
use crate::harness::{Target, connections, fmt, interleave};
use crate::report::{table, write};
use crate::systems::{GatewayBin, UNLIMITED, fast_upstream};

/// An OTLP trace receiver that counts what it gets.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let collector = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let (upstream, _) = fast_upstream().await?;
    let on_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_SERVICE_NAME", "provisioning-gateway-bench".to_owned()),
    ];
    let on = GatewayBin::start("tracing-on", upstream, UNLIMITED, &on_env).await?;
    let off = GatewayBin::start("tracing-off", upstream, UNLIMITED, &[]).await?;

    let mut results = Vec::new();
    for &c in &opts.concurrency {
        let conns = connections(c);
        let systems = [
            ("OTLP export on", Target::grpc(on.addr, conns, None).await?),
            (
                "OTLP export off",
                Target::grpc(off.addr, conns, None).await?,
            ),
        ];
        println!(
            "concurrency {c}: {} rounds of {:?} per mode",
            opts.rounds, opts.round
        );
        let samples = interleave(&systems, c, opts.rounds, opts.round).await;
        let rows: Vec<Vec<String>> = systems
            .iter()
            .zip(&samples)
            .map(|((n, _), s)| {
                vec![
                    n.to_string(),
                    s.calls().to_string(),
                    format!("{:.0}/s", s.throughput()),
                    fmt(s.p(0.5)),
                    fmt(s.p(0.99)),
                ]
            })
            .collect();
        table(&["mode", "calls", "throughput", "p50", "p99"], &rows);
        let r = |q| samples[0].p(q).as_secs_f64() / samples[1].p(q).as_secs_f64();
        println!("  on ÷ off: p50 {:.3}, p99 {:.3}", r(0.5), r(0.99));
        results.push(json!({
            "concurrency": c,
            "on": samples[0].to_json(),
            "off": samples[1].to_json(),
            "ratio_on_off": {"p50": r(0.5), "p99": r(0.99)},
        }));
    }
    // SIGTERM flushes the batch exporter; then count what arrived.
    on.stop().await;
    off.stop().await;
    let calls: u64 = results
        .iter()
        .map(|r| r["on"]["calls"].as_u64().unwrap_or(0))
        .sum();
    let spans = receiver.spans.load(Ordering::Relaxed);
    println!(
        "  spans received: {spans} for {calls} measured calls (plus warm-up); 3 spans per call \
         (server, budget.wait, http.client); the batch exporter drops spans when its queue is full"
    );
    write(
        "tracing",
        json!({"runs": results, "spans_received": spans, "measured_calls_with_export": calls}),
    );
    Ok(())
}
