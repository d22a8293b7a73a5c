//! The metrics listener: `/metrics` (Prometheus text) and `/healthz`
//! (process liveness with the budget backend's state, e.g.
//! `{"status":"ok","budget_backend":"redis","degraded":false,…}`). Always 200:
//! a replica on its fallback budget is alive and serving; the detail is for
//! people and dashboards.
//!
//! Served over HTTP/1.1 with bounds a plain `axum::serve` lacks: a client
//! has [`HEADER_READ_TIMEOUT`] to send a request's headers (a half-sent
//! request cannot hold a connection), and shutdown waits at most [`DRAIN`]
//! for connections to finish.

use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::{Backend, BackendReport};
use crate::telemetry::metrics;

/// The router of the metrics listener.
pub(super) fn router(prometheus: PrometheusHandle, backend: Backend) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let report = backend.report();
                async move {
                    Json(Healthz {
                        status: "ok",
                        report,
                    })
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let prometheus = prometheus.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        metrics::render(&prometheus),
                    )
                }
            }),
        )
}

#[derive(Serialize)]
struct Healthz {
    status: &'static str,
    #[serde(flatten)]
    report: BackendReport,
}

/// Longest a client may take to send a request's headers.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest shutdown waits for open connections.
pub(super) const DRAIN: Duration = Duration::from_secs(2);

/// Serves `router` on `listener` until `stop`, then drains within [`DRAIN`].
pub(super) async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("metrics listener: connections still open after the drain; closed");
    }
    // Dropping the set aborts what is left.
}
