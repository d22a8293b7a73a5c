//! What the standard `OTEL_*` variables say, read once at startup: the
//! resource (who exports), the propagators (which headers carry context in
//! and out), and the span exporter (where spans go, if anywhere).
//!
//! - Resource: `service.name` = `provisioning-gateway` and `service.version`
//!   = the crate version unless `OTEL_RESOURCE_ATTRIBUTES` says otherwise;
//!   `OTEL_SERVICE_NAME` wins over both (the specification's order).
//! - Propagators: `OTEL_PROPAGATORS` (default `tracecontext,baggage`);
//!   `tracecontext`, `baggage` and `none` are known, others are named in a
//!   warning and skipped.
//! - Export: only when `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set.

use opentelemetry::KeyValue;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{Config, Sampler, SdkTracerProvider, ShouldSample};

use super::server_call::ChosenIds;

/// The default `service.name`.
const SERVICE_NAME: &str = env!("CARGO_PKG_NAME");
/// The default `service.version`.
const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A variable's value, unset when empty (the specification treats both alike).
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The resource every span is exported with.
fn resource() -> Resource {
    let builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", SERVICE_NAME),
            KeyValue::new("service.version", SERVICE_VERSION),
        ])
        // Later merges win: OTEL_RESOURCE_ATTRIBUTES over the defaults.
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    match var("OTEL_SERVICE_NAME") {
        Some(name) => builder.with_service_name(name),
        None => builder,
    }
    .build()
}

/// The propagators `OTEL_PROPAGATORS` names (`None`: the default), and a
/// warning for each name this gateway does not know.
pub(super) fn propagator(setting: Option<&str>) -> (TextMapCompositePropagator, Vec<String>) {
    let setting = setting.filter(|s| !s.trim().is_empty());
    let mut warnings = Vec::new();
    let mut chosen: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
    let mut seen = Vec::new();
    for name in setting.unwrap_or("tracecontext,baggage").split(',') {
        let name = name.trim().to_ascii_lowercase();
        if seen.contains(&name) {
            continue;
        }
        match name.as_str() {
            "tracecontext" => chosen.push(Box::new(TraceContextPropagator::new())),
            "baggage" => chosen.push(Box::new(BaggagePropagator::new())),
            // "none" alone means no propagation; with others it adds nothing.
            "none" | "" => {}
            other => warnings.push(format!(
                "OTEL_PROPAGATORS: {other:?} is not supported (tracecontext, baggage, none); skipped"
            )),
        }
        seen.push(name);
    }
    (TextMapCompositePropagator::new(chosen), warnings)
}

/// The propagators of `OTEL_PROPAGATORS`, installed globally; returns the
/// warnings to log once logging is up.
pub(super) fn install_propagator() -> Vec<String> {
    let (propagator, warnings) = propagator(var("OTEL_PROPAGATORS").as_deref());
    opentelemetry::global::set_text_map_propagator(propagator);
    warnings
}

/// A provider that always creates span ids (for logs and `traceresponse`),
/// and exports only when an OTLP endpoint is configured; and its sampler,
/// which the server span asks when a call arrives (`server_call.rs`).
/// Returns whether it exports, and why not when export was configured but
/// failed.
pub(super) fn tracer_provider() -> (
    SdkTracerProvider,
    Box<dyn ShouldSample>,
    bool,
    Option<String>,
) {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| var(v).is_some());
    let sampler: Box<dyn ShouldSample> = if configured {
        // OTEL_TRACES_SAMPLER(_ARG), read by the SDK's own defaults.
        Config::default().sampler
    } else {
        // Nothing would export them: spans are not recorded (ids still flow
        // to logs, `traceresponse` and upstream), unless the caller's trace
        // is sampled, whose flag is kept.
        Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
    };
    let builder = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_id_generator(ChosenIds::default())
        .with_sampler(sampler.clone());
    if !configured {
        return (builder.build(), sampler, false, None);
    }
    match span_exporter() {
        Ok(exporter) => (
            builder.with_batch_exporter(exporter).build(),
            sampler,
            true,
            None,
        ),
        Err(e) => (builder.build(), sampler, false, Some(e)),
    }
}

/// The OTLP exporter for `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`: `grpc` or
/// `http/protobuf` (the specification's default).
fn span_exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (use grpc or http/protobuf)"
            ));
        }
    };
    exporter.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(setting: Option<&str>) -> (Vec<String>, usize) {
        let (p, warnings) = propagator(setting);
        let mut fields: Vec<String> = p.fields().map(str::to_owned).collect();
        fields.sort();
        (fields, warnings.len())
    }

    #[test]
    fn propagators_follow_otel_propagators() {
        let both = (
            vec!["baggage".into(), "traceparent".into(), "tracestate".into()],
            0,
        );
        assert_eq!(fields(None), both);
        assert_eq!(fields(Some(" ")), both);
        assert_eq!(fields(Some("baggage")), (vec!["baggage".into()], 0));
        assert_eq!(
            fields(Some("TraceContext, b3")),
            (vec!["traceparent".into(), "tracestate".into()], 1)
        );
        assert_eq!(fields(Some("none")), (vec![], 0));
    }
}
