//! The server span of every `AssociationService` call, as a tower layer in
//! front of the tonic router: it continues the caller's context (the
//! propagators of `OTEL_PROPAGATORS`), gives the call its log span, builds
//! the server span when the call answers (`server_call.rs`) with the gRPC
//! status code, and returns the trace id to the caller as `traceresponse`
//! (W3C Trace Context Level 2), on errors too. Health checks and reflection
//! are not traced: a probe every few seconds would drown the traces that
//! matter.
//!
//! The span follows the gRPC semantic conventions: its status is `ERROR`
//! only for the codes that mean the server failed (`is_server_error`); a
//! `NOT_FOUND` or a budget refusal is the service working as designed. A
//! method the service does not have gets one constant name (`_OTHER`), so a
//! caller cannot mint span names before it is even authenticated.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use http::{HeaderValue, Request, Response};
use opentelemetry::trace::SpanContext;
use opentelemetry_http::HeaderExtractor;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing::instrument::Instrumented;

use super::server_call::ServerCall;

/// The service whose calls get a server span.
pub(super) const SERVICE: &str = "infobip.provisioning.v1.AssociationService";
/// Prefix of the paths that get a server span.
const TRACED_PREFIX: &str = "/infobip.provisioning.v1.AssociationService/";
/// The methods the service has, with their span names (`service/method`).
const KNOWN_METHODS: &[(&str, &str)] = &[
    (
        "DeleteAssociation",
        "infobip.provisioning.v1.AssociationService/DeleteAssociation",
    ),
    (
        "BatchDeleteAssociations",
        "infobip.provisioning.v1.AssociationService/BatchDeleteAssociations",
    ),
];
/// `rpc.method` and span name of a method the service does not have (the
/// semantic conventions' value for a method unknown to the instrumentation).
const OTHER_METHOD: &(&str, &str) = &(
    "_OTHER",
    "infobip.provisioning.v1.AssociationService/_OTHER",
);
/// Name of a traced call's tracing span: its log context (the server span
/// itself is built by `server_call.rs`, not by tracing-opentelemetry).
pub(super) const LOG_SPAN: &str = "grpc.server";
/// `rpc.grpc.status_code` of a call whose caller left before the answer.
const CANCELLED: i32 = tonic::Code::Cancelled as i32;

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

pin_project_lite::pin_project! {
    /// A call's answer through [`GrpcTrace`]: a traced one runs as its
    /// [`ServerCall`] inside its log span, and gets its server span built,
    /// `rpc.grpc.status_code` recorded and `traceresponse` added when it
    /// answers (or its span ended as `CANCELLED` if the caller leaves first).
    /// Not boxed, and the inner future held once: every call waiting in line
    /// holds one (BENCHMARKS §5).
    #[project = CallProj]
    pub enum CallFuture<F> {
        Traced {
            #[pin]
            inner: Instrumented<TaskLocalFuture<ServerCall, F>>,
            method: &'static (&'static str, &'static str),
            start: SystemTime,
        },
        Untraced {
            #[pin]
            inner: F,
        },
    }

    impl<F> PinnedDrop for CallFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let CallProj::Traced { inner, method, start } = this.project()
                && let Some(call) = inner.inner_pin_mut().take_value()
            {
                call.end(**method, *start, CANCELLED, false);
            }
        }
    }
}

impl<F, RB, E> Future for CallFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (mut inner, method, start) = match self.project() {
            CallProj::Untraced { inner } => return inner.poll(cx),
            CallProj::Traced {
                inner,
                method,
                start,
            } => (inner, method, start),
        };
        let mut response = ready!(inner.as_mut().poll(cx))?;
        let Some(call) = inner.inner_pin_mut().take_value() else {
            return Poll::Ready(Ok(response));
        };
        // Unary errors are trailers-only responses: grpc-status is in the
        // headers. Its absence means the call succeeded.
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or(0);
        if call.context().is_valid()
            && let Some(value) = traceresponse(call.context())
        {
            response.headers_mut().insert("traceresponse", value);
        }
        let error = is_server_error(tonic::Code::from_i32(code));
        call.end(**method, *start, code, error);
        Poll::Ready(Ok(response))
    }
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
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(method) = request.uri().path().strip_prefix(TRACED_PREFIX) else {
            return CallFuture::Untraced {
                inner: self.inner.call(request),
            };
        };
        let method = KNOWN_METHODS
            .iter()
            .find(|(known, _)| *known == method)
            .unwrap_or(OTHER_METHOD);
        let start = opentelemetry::time::now();
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let call = ServerCall::arrive(parent, method.1);
        // The call's log context. The ids are recorded as fields only when
        // the call writes its log event (`grpc/report.rs`): a refusal whose
        // line is held back skips formatting and storing them.
        let span = tracing::info_span!(
            LOG_SPAN,
            rpc.method = method.0,
            account = Empty,
            caller = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        CallFuture::Traced {
            inner: call.scope(self.inner.call(request)).instrument(span),
            method,
            start,
        }
    }
}

/// Whether `code` marks a server span as failed. The gRPC semantic
/// conventions count only these as the server's errors; every other code
/// (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, …) is an answer the
/// service meant to give, and leaves the span's status unset.
pub(crate) fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// `traceresponse: 00-<trace-id>-<span-id>-<flags>` naming the server span,
/// written straight into its 55 bytes (every answer carries one, refusals
/// in a flood included).
fn traceresponse(context: &SpanContext) -> Option<HeaderValue> {
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex::encode_to_slice(context.trace_id().to_bytes(), &mut value[3..35]).ok()?;
    hex::encode_to_slice(context.span_id().to_bytes(), &mut value[36..52]).ok()?;
    hex::encode_to_slice([context.trace_flags().to_u8()], &mut value[53..55]).ok()?;
    HeaderValue::from_bytes(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceresponse_names_trace_span_and_flags_in_lowercase_hex() {
        use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
        let context = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        assert_eq!(
            traceresponse(&context).unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    #[test]
    fn only_the_six_server_failure_codes_are_span_errors() {
        let errors: Vec<i32> = (0..=16)
            .filter(|c| is_server_error(tonic::Code::from_i32(*c)))
            .collect();
        assert_eq!(errors, [2, 4, 12, 13, 14, 15]);
    }
}
