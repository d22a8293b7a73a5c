//! The Infobip REST client: one `DELETE /provisioning/1/associations` per
//! attempt, over pooled rustls connections, with the vendor's error body
//! parsed (and size-capped) for the status mapping.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use opentelemetry_http::HeaderInjector;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Deserialize;

use url::Url;

use crate::keys::KeyCell;
use crate::telemetry::metrics;

/// Most of an error body the gateway reads; Infobip's are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest Retry-After the gateway honours, whatever the header says.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Infobip's `ApiRequestErrorDetails`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceException {
    pub message_id: Option<String>,
    pub text: Option<String>,
    #[serde(default)]
    pub validation_errors: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiException {
    request_error: ApiRequestError,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiRequestError {
    service_exception: ServiceException,
}

/// What Infobip answered to one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The parsed error body, when it was Infobip's JSON shape.
    pub error: Option<ServiceException>,
    pub retry_after: Option<Duration>,
}

impl Reply {
    /// Builds a reply from a status, headers and (capped) body bytes.
    pub fn new(status: u16, headers: &HeaderMap, body: &[u8]) -> Self {
        let error = serde_json::from_slice::<ApiException>(body)
            .ok()
            .map(|e| e.request_error.service_exception);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, SystemTime::now()));
        Self {
            status,
            error,
            retry_after,
        }
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A `Retry-After` value as a delay from `now`, in either of its forms
/// (RFC 9110): seconds (fractions tolerated), or an HTTP date (a past one
/// is no delay). At most [`MAX_RETRY_AFTER`]; `None` when unreadable.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => {
            Duration::from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64()))
        }
        Ok(_) => return None,
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// An attempt that got no HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection was established (refused, DNS, TLS handshake): the
    /// request provably did not reach Infobip.
    #[error("could not connect to Infobip")]
    Connect,
    /// The connection broke after the request may have been sent.
    #[error("the connection to Infobip failed")]
    Broken,
    /// No answer within the attempt's timeout.
    #[error("Infobip did not answer in time")]
    Timeout,
}

/// Where one attempt goes: the account's name (for spans and metrics), its
/// endpoint, and its key as of the moment the attempt sends.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub account: &'a str,
    pub url: &'a Url,
    pub key: &'a KeyCell,
}

/// The Infobip client, shared by all calls (its connection pool is the point).
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
}

impl Upstream {
    /// The client; `proxy` is the only proxy it uses (`None`: connect
    /// directly, whatever `HTTP(S)_PROXY`/`ALL_PROXY` say, so a variable set
    /// for something else cannot reroute the API key).
    pub fn new(connect_timeout: Duration, proxy: Option<&Url>) -> Result<Self, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .user_agent(crate::USER_AGENT)
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A pooled connection whose peer vanished (a NAT or load balancer
            // dropped it) is found and closed instead of eating an attempt.
            .tcp_keepalive(Duration::from_secs(30))
            // A redirect would replay a DELETE somewhere unplanned: map it instead.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        let builder = match proxy {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy.as_str())?),
            None => builder,
        };
        Ok(Self {
            client: builder.build()?,
        })
    }

    /// Sends one DELETE with `body` to `target`, giving up after `timeout`.
    /// `attempt` counts from 1; each attempt is its own HTTP client span, whose
    /// `traceparent` goes upstream.
    pub(crate) async fn delete(
        &self,
        target: Target<'_>,
        body: reqwest::Body,
        timeout: Duration,
        attempt: u32,
    ) -> Result<Reply, TransportError> {
        let url = target.url;
        // Integers as i64: tracing-opentelemetry exports unsigned fields as
        // strings, and the HTTP semantic conventions type these as int.
        let span = tracing::info_span!(
            "http.client",
            otel.name = "DELETE",
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = "DELETE",
            server.address = url.host_str().unwrap_or_default(),
            server.port = url.port_or_known_default().map(i64::from),
            // The endpoint is checked at startup to carry no credentials.
            url.full = url.as_str(),
            http.request.resend_count = i64::from(attempt.saturating_sub(1)),
            http.response.status_code = Empty,
            error.type = Empty,
            account = target.account,
            trace_id = Empty,
            span_id = Empty,
        );
        crate::telemetry::server_call::adopt(&span);
        let started = Instant::now();
        let result = self
            .send(&target, body, timeout, &span)
            .instrument(span.clone())
            .await;
        let (status_label, error_type) = match &result {
            Ok(reply) => (
                reply.status.to_string(),
                (reply.status >= 400).then(|| reply.status.to_string()),
            ),
            Err(e) => (e.label().to_owned(), Some(e.label().to_owned())),
        };
        if let Ok(reply) = &result {
            span.record("http.response.status_code", i64::from(reply.status));
        }
        if let Some(error_type) = error_type {
            span.record("error.type", error_type);
            span.record("otel.status_code", "ERROR");
        }
        metrics::upstream(target.account, status_label, started.elapsed());
        result
    }

    async fn send(
        &self,
        target: &Target<'_>,
        body: reqwest::Body,
        timeout: Duration,
        span: &tracing::Span,
    ) -> Result<Reply, TransportError> {
        // Read once per attempt: a reloaded key applies from the next attempt on.
        let key = target.key.current();
        let mut auth = HeaderValue::from_str(&format!("App {}", key.expose()))
            .map_err(|_| TransportError::Connect)?;
        auth.set_sensitive(true);
        let json = HeaderValue::from_static("application/json");
        // The traceparent names this attempt's client span, so the vendor's
        // side (or a proxy) can be joined to the caller's trace.
        let mut trace_headers = HeaderMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&span.context(), &mut HeaderInjector(&mut trace_headers))
        });
        let send = self
            .client
            .delete(target.url.clone())
            .header(AUTHORIZATION, auth)
            .header(CONTENT_TYPE, json.clone())
            .header(ACCEPT, json)
            .headers(trace_headers)
            .body(body)
            .send();
        // One deadline covers connect, send and reading the capped body.
        tokio::time::timeout(timeout, async {
            let mut response = send.await.map_err(classify)?;
            let status = response.status().as_u16();
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while body.len() < MAX_BODY {
                match response.chunk().await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    // A body cut short still has a status worth mapping.
                    Ok(None) | Err(_) => break,
                }
            }
            body.truncate(MAX_BODY);
            Ok(Reply::new(status, &headers, &body))
        })
        .await
        .unwrap_or(Err(TransportError::Timeout))
    }
}

impl TransportError {
    /// Metric label and `error.type` of the failure.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "unreachable",
            Self::Broken => "broken",
            Self::Timeout => "timeout",
        }
    }
}

fn classify(e: reqwest::Error) -> TransportError {
    if e.is_connect() {
        TransportError::Connect
    } else if e.is_timeout() {
        TransportError::Timeout
    } else {
        TransportError::Broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn parses_the_vendor_error_body() {
        let body = br#"{"requestError":{"serviceException":{"messageId":"BAD_REQUEST","text":"Bad request","validationErrors":{"applicationId":["size must be between 1 and 255"]}}}}"#;
        let reply = Reply::new(400, &HeaderMap::new(), body);
        let e = reply.error.unwrap();
        assert_eq!(e.message_id.as_deref(), Some("BAD_REQUEST"));
        assert_eq!(e.validation_errors["applicationId"].len(), 1);
    }

    proptest::proptest! {
        /// Any status, headers and body (huge, non-UTF-8, almost-JSON) map to
        /// a status with exactly one ErrorInfo, without panicking.
        #[test]
        fn any_upstream_response_maps_to_a_status(
            status in 100u16..1000,
            retry_after in proptest::option::of(".{0,20}"),
            body in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
                ".{0,200}".prop_map(|t| format!(r#"{{"requestError":{{"serviceException":{{"messageId":{t:?},"text":{t:?},"validationErrors":{{{t:?}:[{t:?}]}}}}}}}}"#).into_bytes()),
                proptest::strategy::Just(vec![b'{'; MAX_BODY]),
            ],
        ) {
            let mut headers = HeaderMap::new();
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(RETRY_AFTER, v);
            }
            let reply = Reply::new(status, &headers, &body);
            proptest::prop_assert!(reply.retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER));
            let s = crate::grpc::status::CallError::Upstream(reply).to_status("acct");
            use tonic_types::StatusExt;
            let details = s.get_error_details();
            proptest::prop_assert!(details.error_info().is_some());
        }
    }

    #[test]
    fn tolerates_non_json_and_reads_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        let reply = Reply::new(429, &h, b"<html>busy</html>");
        assert_eq!(reply.error, None);
        assert_eq!(reply.retry_after, Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("99999"));
        assert_eq!(Reply::new(429, &h, b"").retry_after, Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        let cases = [
            ("120", Some(Duration::from_secs(120))),
            (" 1.5 ", Some(Duration::from_millis(1500))),
            (
                "Wed, 21 Oct 2026 07:28:30 GMT",
                Some(Duration::from_secs(30)),
            ),
            // A date in the past: come back now.
            ("Wed, 21 Oct 2026 07:27:00 GMT", Some(Duration::ZERO)),
            ("Thu, 22 Oct 2026 07:28:00 GMT", Some(MAX_RETRY_AFTER)),
            ("-1", None),
            ("soon", None),
        ];
        for (value, want) in cases {
            assert_eq!(retry_after(value, now), want, "{value}");
        }
        // Through the header, relative to the real clock.
        let mut h = HeaderMap::new();
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let delay = Reply::new(429, &h, b"").retry_after.unwrap();
        assert!(
            delay > Duration::from_secs(55) && delay <= Duration::from_secs(60),
            "{delay:?}"
        );
    }
}
