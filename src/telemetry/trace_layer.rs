//! The server span of every `AssociationService` call, as a tower layer in
//! front of the tonic router: it continues the caller's W3C trace
//! (`traceparent`/`tracestate` metadata), records the gRPC status code, and
//! returns the trace id to the caller as `traceresponse` (W3C Trace Context
//! Level 2), on errors too. Health checks and reflection are not traced: a
//! probe every few seconds would drown the traces that matter.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_http::HeaderExtractor;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Prefix of the paths that get a server span.
const TRACED_PREFIX: &str = "/infobip.provisioning.v1.AssociationService/";

/// Adds [`GrpcTrace`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> GrpcTrace<S> {
        GrpcTrace { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for GrpcTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(method) = request.uri().path().strip_prefix(TRACED_PREFIX) else {
            return Box::pin(self.inner.call(request));
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = format!("infobip.provisioning.v1.AssociationService/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = "infobip.provisioning.v1.AssociationService",
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            account = Empty,
            caller = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        // Only fails when no OpenTelemetry layer is installed (tests without
        // a subscriber); the call is served either way.
        let _ = span.set_parent(parent);
        let context = record_ids(&span);
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.instrument(span.clone()).await?;
            // Unary errors are trailers-only responses: grpc-status is in the
            // headers. Its absence means the call succeeded.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(0);
            span.record("rpc.grpc.status_code", code);
            if code != 0 {
                span.record("otel.status_code", "ERROR");
            }
            if let Some(value) = context.as_ref().and_then(traceresponse) {
                response.headers_mut().insert("traceresponse", value);
            }
            Ok(response)
        })
    }
}

/// Records the span's OpenTelemetry ids as `trace_id`/`span_id` fields (so
/// every log event inside carries them) and returns its span context.
pub fn record_ids(span: &tracing::Span) -> Option<SpanContext> {
    let context = span.context().span().span_context().clone();
    if !context.is_valid() {
        return None;
    }
    span.record("trace_id", context.trace_id().to_string());
    span.record("span_id", context.span_id().to_string());
    Some(context)
}

/// `traceresponse: 00-<trace-id>-<span-id>-<flags>` naming the server span.
fn traceresponse(context: &SpanContext) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    ))
    .ok()
}
