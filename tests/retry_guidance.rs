//! Retry guidance for callers: budget refusals carry the gRPC retry
//! design's `grpc-retry-pushback-ms` next to `RetryInfo` (and nothing else
//! does), and `deploy/grpc-service-config.json` is a client service config
//! whose retry policy is safe with this API.

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message;
use provisioning_gateway::mock::Scripted;
use serde_json::Value;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Opts, request, spawn_app, with_timeout};

const PUSHBACK: &str = "grpc-retry-pushback-ms";

fn pushback(status: &tonic::Status) -> Option<u64> {
    let value = status.metadata().get(PUSHBACK)?;
    Some(value.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn only_budget_refusals_carry_grpc_retry_pushback_ms() {
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..Opts::default()
    })
    .await;
    let mut client = app.client().await;
    client.delete_association(request(0)).await.unwrap(); // the next slot is ~1 s away
    let refused = client
        .delete_association(with_timeout(request(1), Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry = refused
        .get_error_details()
        .retry_info()
        .unwrap()
        .retry_delay;
    let retry = retry.unwrap().as_millis() as u64;
    assert_eq!(
        pushback(&refused),
        Some(retry),
        "the same delay as RetryInfo"
    );
    // Served calls' errors carry none: a 404, and Infobip's own 429 (a
    // RESOURCE_EXHAUSTED with RetryInfo too, after three attempts).
    let not_found = client.delete_association(request(0)).await.unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    assert_eq!(pushback(&not_found), None);
    let mut vendor_429 = Scripted::new(429, "");
    vendor_429.headers.push(("retry-after".into(), "0".into()));
    app.mock.script(std::iter::repeat_n(vendor_429, 3));
    let throttled = client.delete_association(request(2)).await.unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted);
    assert!(throttled.get_error_details().retry_info().is_some());
    assert_eq!(pushback(&throttled), None, "{throttled:?}");
}

/// Status codes a client may retry with this API: the gateway refused
/// before sending (budget, shutting down, backend lost), or Infobip's
/// answer says it did not take effect (429, 503); and a caller that sets
/// request_id gets the first outcome back in any case.
const SAFE: &[&str] = &["UNAVAILABLE", "RESOURCE_EXHAUSTED"];

#[test]
fn the_client_service_config_retries_only_what_is_safe_here() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grpc-service-config.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let config: Value = serde_json::from_str(&text).expect("valid JSON");
    let descriptors =
        prost_types::FileDescriptorSet::decode(provisioning_gateway::pb::FILE_DESCRIPTOR_SET)
            .unwrap();
    let services: Vec<(String, Vec<String>)> = descriptors
        .file
        .iter()
        .flat_map(|f| {
            f.service.iter().map(move |s| {
                let methods = s.method.iter().map(|m| m.name().to_owned()).collect();
                (format!("{}.{}", f.package(), s.name()), methods)
            })
        })
        .collect();
    let mut named = BTreeSet::new();
    let method_configs = config["methodConfig"].as_array().expect("methodConfig");
    for method_config in method_configs {
        for name in method_config["name"].as_array().expect("name") {
            let service = name["service"].as_str().expect("name.service");
            let (_, methods) = services
                .iter()
                .find(|(s, _)| s == service)
                .unwrap_or_else(|| panic!("{service} is no service of the contract"));
            if let Some(method) = name.get("method") {
                assert!(methods.iter().any(|m| method == m), "{service}/{method}");
            }
            named.insert(service.to_owned());
        }
        let policy = &method_config["retryPolicy"];
        let attempts = policy["maxAttempts"].as_u64().expect("maxAttempts");
        assert!((2..=5).contains(&attempts), "{attempts}");
        for backoff in ["initialBackoff", "maxBackoff"] {
            let seconds = policy[backoff].as_str().expect(backoff);
            let seconds: f64 = seconds.strip_suffix('s').unwrap().parse().unwrap();
            assert!(seconds > 0.0, "{backoff}");
        }
        assert!(policy["backoffMultiplier"].as_f64().unwrap() > 0.0);
        let codes = policy["retryableStatusCodes"].as_array().unwrap();
        assert!(!codes.is_empty());
        for code in codes {
            let code = code.as_str().expect("codes by name");
            assert!(SAFE.contains(&code), "{code} is not safe to retry here");
        }
    }
    let want = [
        "google.longrunning.Operations",
        "infobip.provisioning.v1.AssociationService",
    ];
    assert!(want.iter().all(|s| named.contains(*s)), "{named:?}");
}
