//! The Infobip emulator: `DELETE /provisioning/1/associations` with the
//! vendor's body validation, error bodies, `Authorization: App <key>` check and
//! its 1 request per second per account limit (429 `TOO_MANY_REQUESTS`). It
//! remembers what it deleted, so a second delete answers 404.
//!
//! Used by `demo`, `mock-upstream` and the tests. Tests can also queue
//! scripted answers (any status, headers, body, delay) to drive every row of
//! the status mapping, read every arrival back, and see which delayed
//! answers the client gave up on (its connection closed first). A leaf:
//! imports nothing of the crate.
// Arrivals are stamped on the real clock (the tests' and the load tool's
// wall-time yardstick), not on tokio's pausable one the gateway runs on.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::delete;
use serde_json::{Value, json};

/// The path the emulator serves.
pub const PATH: &str = "/provisioning/1/associations";

/// How the emulator behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Accepted key; any key when `None`.
    pub api_key: Option<String>,
    /// The vendor's limit per API key.
    pub rate_per_second: u32,
}

/// One request as the emulator saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// What the emulator answered.
    pub status: u16,
}

/// A request whose scripted answer was still delayed when the client went
/// away (closed the connection): the emulator never answered it.
#[derive(Debug, Clone)]
pub struct Abandoned {
    /// When the request arrived.
    pub arrived: Instant,
    /// When the emulator saw the client go.
    pub at: Instant,
    pub body: Bytes,
}

/// A canned answer that takes precedence over the emulation (fault injection).
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Time to wait before answering (a slow or hanging upstream).
    pub delay: Duration,
}

impl Scripted {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Inner {
    deleted: HashSet<String>,
    last_accepted: HashMap<String, Instant>,
    arrivals: Vec<Arrival>,
    abandoned: Vec<Abandoned>,
    script: VecDeque<Scripted>,
}

/// A handle on a running (or about to run) emulator.
#[derive(Clone)]
pub struct Mock {
    config: Arc<MockConfig>,
    inner: Arc<Mutex<Inner>>,
    /// Requests received so far (answered or not), for tests to await.
    received: Arc<tokio::sync::watch::Sender<usize>>,
    /// Scripted answers abandoned so far, for tests to await.
    abandoned: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Mock {
    pub fn new(config: MockConfig) -> Self {
        Self {
            config: Arc::new(config),
            inner: Arc::default(),
            received: Arc::new(tokio::sync::watch::channel(0).0),
            abandoned: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// The axum router serving the endpoint.
    pub fn router(&self) -> Router {
        Router::new()
            .route(PATH, delete(handle))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Queues canned answers, served before any emulation.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.lock().script.extend(answers);
    }

    /// Waits until at least `n` requests have been received (answered or not).
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.received.subscribe();
        let _ = rx.wait_for(|&count| count >= n).await;
    }

    /// Waits until at least `n` scripted answers have been abandoned.
    pub async fn wait_for_abandoned(&self, n: usize) {
        let mut rx = self.abandoned.subscribe();
        let _ = rx.wait_for(|&count| count >= n).await;
    }

    /// Every request whose delayed scripted answer the client did not wait
    /// for, in the order the clients went away.
    pub fn abandoned(&self) -> Vec<Abandoned> {
        self.lock().abandoned.clone()
    }

    /// Every request answered so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.lock().arrivals.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, headers: &HeaderMap, body: &[u8], now: Instant) -> Response {
        let key = match headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("App "))
        {
            Some(k) if self.config.api_key.as_deref().is_none_or(|want| want == k) => k.to_owned(),
            _ => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "Unauthorized",
                    None,
                );
            }
        };
        let mut inner = self.lock();
        let interval = Duration::from_secs(1) / self.config.rate_per_second.max(1);
        if let Some(last) = inner.last_accepted.get(&key)
            && now.duration_since(*last) < interval
        {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                "Too many requests",
                None,
            );
        }
        inner.last_accepted.insert(key.clone(), now);
        let request: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "Bad request", None),
        };
        let violations = validate(&request);
        if !violations.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "Bad request",
                Some(violations),
            );
        }
        // The association's identity: the account and the five fields.
        if inner.deleted.insert(format!("{key}\n{request}")) {
            StatusCode::NO_CONTENT.into_response()
        } else {
            error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Resource association not found.",
                None,
            )
        }
    }
}

async fn handle(State(mock): State<Mock>, headers: HeaderMap, body: Bytes) -> Response {
    let now = Instant::now();
    mock.received.send_modify(|n| *n += 1);
    let scripted = mock.lock().script.pop_front();
    let response = match scripted {
        Some(s) => {
            // The server drops this handler when the client's connection
            // closes: the guard then records the abandoned request.
            let waiting = Waiting {
                mock: &mock,
                arrived: now,
                body: Some(body.clone()),
            };
            tokio::time::sleep(s.delay).await;
            waiting.answered();
            let mut r = (
                StatusCode::from_u16(s.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                s.body,
            )
                .into_response();
            for (k, v) in s.headers {
                if let (Ok(k), Ok(v)) = (k.parse::<header::HeaderName>(), v.parse()) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        None => mock.answer(&headers, &body, now),
    };
    let mut inner = mock.lock();
    let at = inner.arrivals.partition_point(|a| a.at <= now);
    inner.arrivals.insert(
        at,
        Arrival {
            at: now,
            headers,
            body,
            status: response.status().as_u16(),
        },
    );
    response
}

/// A scripted answer being delayed; dropped before [`Waiting::answered`],
/// the client went away first.
struct Waiting<'a> {
    mock: &'a Mock,
    arrived: Instant,
    /// `None` once answered.
    body: Option<Bytes>,
}

impl Waiting<'_> {
    fn answered(mut self) {
        self.body = None;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else { return };
        let abandoned = Abandoned {
            arrived: self.arrived,
            at: Instant::now(),
            body,
        };
        self.mock.lock().abandoned.push(abandoned);
        self.mock.abandoned.send_modify(|n| *n += 1);
    }
}

fn error(
    status: StatusCode,
    message_id: &str,
    text: &str,
    validation: Option<HashMap<&'static str, Vec<String>>>,
) -> Response {
    let mut exception = json!({ "messageId": message_id, "text": text });
    if let Some(v) = validation {
        exception["validationErrors"] = json!(v);
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "requestError": { "serviceException": exception } }).to_string(),
    )
        .into_response()
}

/// The vendor's `ResourceAssociationRequest` schema.
fn validate(v: &Value) -> HashMap<&'static str, Vec<String>> {
    const RESOURCE_TYPES: &[&str] = &[
        "NUMBER",
        "DOMAIN",
        "ALPHA",
        "RCS_RESOURCE",
        "APPLE_RESOURCE",
    ];
    const CHANNELS: &[&str] = &["SMS", "MMS", "EMAIL", "WHATSAPP", "RCS", "APPLE"];
    let mut errors: HashMap<&'static str, Vec<String>> = HashMap::new();
    let mut enumerated = |field: &'static str, allowed: &[&str]| match v.get(field) {
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => {}
        _ => errors
            .entry(field)
            .or_default()
            .push(format!("must be one of {}", allowed.join(", "))),
    };
    enumerated("resourceType", RESOURCE_TYPES);
    enumerated("channel", CHANNELS);
    for (field, nullable) in [
        ("applicationId", false),
        ("entityId", true),
        ("resourceId", false),
    ] {
        let problem = match v.get(field) {
            None => Some("is required".to_owned()),
            Some(Value::Null) if nullable => None,
            Some(Value::String(s)) if s.is_empty() && !nullable => Some("must not be blank".into()),
            Some(Value::String(s)) if s.chars().count() > 255 => {
                Some("size must be between 0 and 255".into())
            }
            Some(Value::String(_)) => None,
            Some(_) => Some("must be a string".into()),
        };
        if let Some(p) = problem {
            errors.entry(field).or_default().push(p);
        }
    }
    if v.get("resourceType") == Some(&json!("DOMAIN")) && v.get("channel") != Some(&json!("EMAIL"))
    {
        errors
            .entry("resourceType")
            .or_default()
            .push("DOMAIN is available only for the EMAIL channel".into());
    }
    errors
}
