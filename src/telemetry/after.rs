//! Spans built after the fact: a child of the current call's server span
//! whose start and end are given, made directly with OpenTelemetry once the
//! work it stands for is over, and only when the call's span is sampled. A
//! call waiting in line (10,000 of them, say) then holds no span state for
//! its wait, and an unsampled call pays nothing for it.

use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};

use super::server_call::{current_context, tracer};

/// Records a finished child span of the current call's server span, named
/// `name`, from `start` to now, with `attributes` (asked for only when it is
/// recorded), failed if `error`.
pub fn child_span(
    name: &'static str,
    start: SystemTime,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    error: bool,
) {
    let Some(tracer) = tracer() else { return };
    let Some(parent) = current_context().filter(|p| p.span().span_context().is_sampled()) else {
        return;
    };
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
