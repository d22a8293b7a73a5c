//! Spans built after the fact: a child of the current span whose start and
//! end are given, made directly with OpenTelemetry once the work it stands
//! for is over, and only when the current span is recorded. A call waiting
//! in line (10,000 of them, say) then holds no span state for its wait, and
//! an unsampled call pays nothing for it.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry_sdk::trace::SdkTracer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer `telemetry::init` installed; none in processes that did not.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

pub(super) fn install(tracer: SdkTracer) {
    let _ = TRACER.set(tracer);
}

/// Records a finished child span of the current span, named `name`, from
/// `start` to now, with `attributes` (asked for only when it is recorded),
/// failed if `error`.
pub fn child_span(
    name: &'static str,
    start: SystemTime,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    error: bool,
) {
    let Some(tracer) = TRACER.get() else { return };
    let parent = tracing::Span::current().context();
    if !parent.span().span_context().is_sampled() {
        return;
    }
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes())
        .start_with_context(tracer, &parent);
    if error {
        span.set_status(Status::error(""));
    }
    span.end();
}
