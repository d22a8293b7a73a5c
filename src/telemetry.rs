//! Logs (tracing, JSON or text, `RUST_LOG` filtered) and the HTTP endpoints of
//! the metrics listener.

use std::io::IsTerminal;

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

use crate::budget::{BackendHealth, BackendReport};
use crate::cli::LogFormat;

/// Installs the global subscriber. Default filter `info`; JSON unless stderr
/// is a terminal or `format` says otherwise. Safe to call more than once (later
/// calls are no-ops), which tests rely on.
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

/// The metrics listener's routes: `/healthz`, process liveness with the
/// budget backend's state (`{"status":"ok","budget_backend":"redis",
/// "degraded":false,…}`). Always 200: a replica on its fallback budget is
/// alive and serving; the detail is for people and dashboards.
pub fn metrics_router(budget: BackendHealth) -> Router {
    Router::new().route(
        "/healthz",
        get(move || {
            let report = budget.report();
            async move {
                Json(Healthz {
                    status: "ok",
                    report,
                })
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
