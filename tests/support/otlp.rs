//! An in-test OpenTelemetry collector: the OTLP `TraceService/Export` over
//! gRPC (tonic) and `POST /v1/traces` over HTTP/protobuf, both on loopback,
//! keeping every span it receives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// A received span with its resource's `service.name` and every resource
/// attribute (as text).
#[derive(Debug, Clone)]
pub struct Received {
    pub service_name: String,
    pub resource: Vec<(String, String)>,
    pub span: Span,
}

#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    fn keep(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.resource_spans {
            let service_name = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            let resource: Vec<(String, String)> = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?))))
                .collect();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service_name: service_name.clone(),
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Starts both endpoints; returns (gRPC address, HTTP address).
    pub async fn start(&self) -> (SocketAddr, SocketAddr) {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(grpc)),
        );
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let collector = self.clone();
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let collector = collector.clone();
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("OTLP/HTTP protobuf body");
                    collector.keep(request);
                    ExportTraceServiceResponse::default().encode_to_vec()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(http, router).await });
        (grpc_addr, http_addr)
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.keep(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// An attribute of a span as exported, with its type.
pub fn attr_value(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .clone()
}

/// An attribute of a span, as text (strings, ints, bools).
pub fn attr(span: &Span, key: &str) -> Option<String> {
    Some(text(&attr_value(span, key)?))
}

/// A value as text.
fn text(v: &Value) -> String {
    match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Every attribute value of every span, as text (for secret scans).
pub fn all_values(spans: &[Received]) -> String {
    spans
        .iter()
        .flat_map(|r| {
            r.span
                .attributes
                .iter()
                .map(|kv| format!("{}={:?}", kv.key, kv.value))
                .chain([r.span.name.clone()])
        })
        .collect::<Vec<_>>()
        .join("\n")
}
