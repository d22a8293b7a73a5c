//! The metrics listener: `/metrics` (Prometheus text) and `/healthz`
//! (process liveness with the budget backend's state, e.g.
//! `{"status":"ok","budget_backend":"redis","degraded":false,…}`). Always 200:
//! a replica on its fallback budget is alive and serving; the detail is for
//! people and dashboards.

use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

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
