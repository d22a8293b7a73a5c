//! Logs, traces and metrics.
//!
//! - Logs: tracing, JSON or text, `RUST_LOG` filtered; events inside a call
//!   carry the call's `trace_id` and the current `span_id`.
//! - Traces: tracing-opentelemetry with the propagators of `OTEL_PROPAGATORS`
//!   (default W3C Trace Context and Baggage); OTLP export (gRPC or
//!   HTTP/protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, so an unconfigured gateway
//!   exports nothing and logs no exporter errors (`otel.rs` reads the
//!   variables). Sampler and batch settings come from the SDK's own
//!   `OTEL_*` variables.
//! - Metrics: [`metrics`] (Prometheus text at `/metrics`).
//! - Refusal logs that survive a flood: `refusals.rs`.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

mod after;
mod json_fields;
pub mod metrics;
mod otel;
pub(crate) mod refusals;
pub(crate) mod server_call;
pub mod trace_layer;

pub use after::child_span;
pub use trace_layer::GrpcTraceLayer;

/// The installed telemetry; flush it with [`Telemetry::shutdown`] on exit.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Flushes and stops the span exporter. Blocking: call it outside async
    /// code (e.g. in `spawn_blocking`).
    pub fn shutdown(self) {
        if self.exporting
            && let Err(e) = self.provider.shutdown()
        {
            eprintln!("provisioning-gateway: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber, propagator and tracer provider. Blocking:
/// the OTLP/HTTP exporter builds a blocking client, so call it from
/// `spawn_blocking` inside the runtime (the gRPC exporter needs the runtime).
pub fn init(format: Option<LogFormat>) -> Telemetry {
    let warnings = otel::install_propagator();
    let (provider, sampler, exporting, export_error) = otel::tracer_provider();
    let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
    server_call::install(tracer.clone(), sampler);

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The exporter's own HTTP/2 and HTTP client events would otherwise be
    // traced and exported in a loop.
    let filter = [
        "h2",
        "hyper",
        "hyper_util",
        "tonic",
        "tower",
        "reqwest",
        "opentelemetry",
    ]
    .iter()
    .fold(filter, |f, target| {
        f.add_directive(
            format!("{target}=warn")
                .parse()
                .expect("a static target=level directive parses"),
        )
    });
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            // Span fields appended, not re-parsed on every record.
            .fmt_fields(json_fields::AppendJsonFields)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            // Lean spans: the attributes the README lists, not the layer's
            // extras (source location, thread, target, busy/idle time), and no
            // OpenTelemetry context switch on every enter (the upstream
            // traceparent comes from the client span explicitly). The server
            // span is not this layer's: it is built when the call ends
            // (`server_call.rs`), and its tracing span is the call's log
            // context only.
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    meta.name() != trace_layer::LOG_SPAN
                })),
        )
        .with(fmt)
        .try_init();
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "OTLP trace export disabled");
    }
    Telemetry {
        provider,
        exporting,
    }
}

/// Logs only, no spans: for `mock-upstream`, the emulator on its own.
pub fn init_logs(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
