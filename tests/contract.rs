//! The upstream request is exactly Infobip's contract: method, path, body,
//! headers; and the emulator behaves like the vendor (404 on a second delete).

use serde_json::json;
use tonic::Code;

use crate::support::{API_KEY, Opts, details, request, spawn_app};

#[tokio::test]
async fn sends_exactly_the_vendor_body_and_headers() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    client.delete_association(request(7)).await.unwrap();
    let mut no_entity = request(8);
    no_entity.entity_id = None;
    client.delete_association(no_entity).await.unwrap();

    let arrivals = app.mock.arrivals();
    assert_eq!(arrivals.len(), 2);
    let body: serde_json::Value = serde_json::from_slice(&arrivals[0].body).unwrap();
    assert_eq!(
        body,
        json!({"resourceType": "NUMBER", "channel": "SMS", "applicationId": "app-1",
               "entityId": "entity-1", "resourceId": "number-key-7"})
    );
    let body: serde_json::Value = serde_json::from_slice(&arrivals[1].body).unwrap();
    assert_eq!(
        body["entityId"],
        serde_json::Value::Null,
        "absent entity is sent as null"
    );
    assert!(body.as_object().unwrap().contains_key("entityId"));

    let h = &arrivals[0].headers;
    assert_eq!(h["authorization"], format!("App {API_KEY}").as_str());
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["accept"], "application/json");
    let length = arrivals[0].body.len().to_string();
    assert_eq!(h["content-length"], length.as_str(), "a sized body");
    assert!(!h.contains_key("transfer-encoding"), "not chunked");
    let ua = h["user-agent"].to_str().unwrap();
    assert_eq!(
        ua,
        concat!("provisioning-gateway/", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn deleting_twice_answers_not_found_with_the_vendor_reason() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    client.delete_association(request(1)).await.unwrap();
    let status = client.delete_association(request(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let info = details::error_info_with(&status, "NOT_FOUND");
    assert_eq!(info.metadata["http_status"], "404");
    assert_eq!(info.metadata["account"], "default");
    assert!(!status.message().contains(API_KEY));
}
