//! The server span of a traced call, built after the fact. Its ids and its
//! sampling decision are chosen when the call arrives, so that its children
//! (`budget.wait`, the HTTP client span), its log lines, the upstream
//! `traceparent` and `traceresponse` all name it from the start, but the
//! OpenTelemetry span itself is built only when the call ends, from a
//! [`ServerCall`] of a few words held in the call's future. A call waiting in
//! line (10,000 of them, say) holds no span builder, no started span and no
//! OpenTelemetry data in the tracing registry (BENCHMARKS §5).
//!
//! The SDK takes the chosen ids through [`ChosenIds`], the provider's id
//! generator: it hands out the ids set for the span being built on this
//! thread, and random ones otherwise. The sampler is asked once when the call
//! arrives, and again by the SDK when the span is built; the samplers
//! `OTEL_TRACES_SAMPLER` can name decide from the parent and the trace id
//! alone, so both answers agree.

use std::cell::{Cell, OnceCell};
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SamplingDecision, SdkTracer, ShouldSample,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer and the sampler `telemetry::init` installed; none in processes
/// that did not (calls then have no server span, only their log context).
static TRACING: OnceLock<(SdkTracer, Box<dyn ShouldSample>)> = OnceLock::new();

pub(super) fn install(tracer: SdkTracer, sampler: Box<dyn ShouldSample>) {
    let _ = TRACING.set((tracer, sampler));
}

pub(super) fn tracer() -> Option<&'static SdkTracer> {
    TRACING.get().map(|(tracer, _)| tracer)
}

tokio::task_local! {
    /// The server call whose work is running: its future, and a flight's
    /// work it started (which may finish in a task of its own).
    static CALL: ServerCall;
}

/// What a traced call's server span needs while the call runs.
#[derive(Debug)]
pub struct ServerCall {
    /// The span's ids, chosen when the call arrived; invalid without a tracer.
    context: SpanContext,
    /// The caller's context: its span (if any) and its baggage.
    parent: Context,
    /// Whether the span will be built (sampled, or recorded only).
    recording: bool,
    /// The account and caller, set as the call answers, for a recorded span.
    labels: OnceCell<(Box<str>, Box<str>)>,
}

impl ServerCall {
    /// Chooses the ids and asks the sampler for a server span named `name`
    /// under `parent` (the caller's propagated context).
    pub fn arrive(parent: Context, name: &str) -> Self {
        let Some((_, sampler)) = TRACING.get() else {
            return Self::untraced(parent);
        };
        let ids = RandomIdGenerator::default();
        let caller = parent.span().span_context().clone();
        let (trace_id, flags) = if caller.is_valid() {
            (caller.trace_id(), caller.trace_flags())
        } else {
            (ids.new_trace_id(), TraceFlags::default())
        };
        let sampling =
            sampler.should_sample(Some(&parent), trace_id, name, &SpanKind::Server, &[], &[]);
        let sampled = sampling.decision == SamplingDecision::RecordAndSample;
        let context = SpanContext::new(
            trace_id,
            ids.new_span_id(),
            flags.with_sampled(sampled),
            false,
            sampling.trace_state,
        );
        Self {
            context,
            parent,
            recording: sampling.decision != SamplingDecision::Drop,
            labels: OnceCell::new(),
        }
    }

    fn untraced(parent: Context) -> Self {
        Self {
            context: SpanContext::empty_context(),
            parent,
            recording: false,
            labels: OnceCell::new(),
        }
    }

    /// The span's ids (invalid when nothing traces).
    pub fn context(&self) -> &SpanContext {
        &self.context
    }

    /// Runs `future` as this call (see [`current_context`]).
    pub fn scope<F: Future>(self, future: F) -> tokio::task::futures::TaskLocalFuture<Self, F> {
        CALL.scope(self, future)
    }

    /// Builds and ends the span: `method` names it, it started at `start`,
    /// and answered `code` (`rpc.grpc.status_code`), marked failed if `error`.
    pub fn end(
        self,
        (method, name): (&str, &'static str),
        start: SystemTime,
        code: i32,
        error: bool,
    ) {
        let Some(tracer) = tracer().filter(|_| self.recording) else {
            return;
        };
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", super::trace_layer::SERVICE),
            KeyValue::new("rpc.method", method.to_owned()),
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
        ];
        if let Some((account, caller)) = self.labels.into_inner() {
            attributes.push(KeyValue::new("account", String::from(account)));
            attributes.push(KeyValue::new("caller", String::from(caller)));
        }
        let builder = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(attributes);
        CHOSEN.set(Some((self.context.trace_id(), self.context.span_id())));
        let mut span = tracer.build_with_context(builder, &self.parent);
        CHOSEN.set(None);
        if error {
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// Runs `future` (a flight's work) as the current call, wherever it is
/// polled: its child spans keep their parent if it moves to a task of its
/// own.
pub fn carry<F: Future>(future: F) -> tokio::task::futures::TaskLocalFuture<ServerCall, F> {
    let call = CALL
        .try_with(|call| ServerCall {
            context: call.context.clone(),
            parent: call.parent.clone(),
            recording: call.recording,
            labels: OnceCell::new(),
        })
        .unwrap_or_else(|_| ServerCall::untraced(Context::new()));
    CALL.scope(call, future)
}

/// The current call's context, the parent of its child spans: the caller's
/// context with the server span in it. `None` outside a traced call.
pub fn current_context() -> Option<Context> {
    CALL.try_with(|call| {
        call.context
            .is_valid()
            .then(|| call.parent.with_remote_span_context(call.context.clone()))
    })
    .ok()
    .flatten()
}

/// Makes `span`, a span the OpenTelemetry layer exports (the HTTP client
/// span), a child of the current call's server span, and records its ids as
/// `trace_id`/`span_id` for the lines written inside it.
pub(crate) fn adopt(span: &tracing::Span) {
    if let Some(parent) = current_context() {
        let _ = span.set_parent(parent);
    }
    let context = span.context().span().span_context().clone();
    if context.is_valid() {
        span.record("trace_id", context.trace_id().to_string());
        span.record("span_id", context.span_id().to_string());
    }
}

/// Gives the current call's span its account and caller, if it is recorded.
pub(crate) fn label(account: &str, caller: &str) {
    let _ = CALL.try_with(|call| {
        if call.recording {
            let _ = call.labels.set((account.into(), caller.into()));
        }
    });
}

/// Records the current call's ids as `trace_id`/`span_id` on `span` (its
/// log context), for the lines written inside it.
pub(crate) fn record_ids(span: &tracing::Span) {
    let _ = CALL.try_with(|call| {
        if call.context.is_valid() {
            span.record("trace_id", call.context.trace_id().to_string());
            span.record("span_id", call.context.span_id().to_string());
        }
    });
}

thread_local! {
    /// The ids of the server span being built on this thread, if any.
    static CHOSEN: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The provider's id generator: the ids chosen for a server span as it is
/// built, random ids for every other span.
#[derive(Debug, Default)]
pub(super) struct ChosenIds(RandomIdGenerator);

impl IdGenerator for ChosenIds {
    fn new_trace_id(&self) -> TraceId {
        CHOSEN
            .get()
            .map_or_else(|| self.0.new_trace_id(), |(trace, _)| trace)
    }

    fn new_span_id(&self) -> SpanId {
        CHOSEN
            .get()
            .map_or_else(|| self.0.new_span_id(), |(_, span)| span)
    }
}
