//! Every validation rule: INVALID_ARGUMENT with a BadRequest naming the proto
//! fields, all violations at once, no budget spent, nothing sent upstream.

use std::time::Duration;

use prost::Message;
use provisioning_gateway::pb::{Channel, DeleteAssociationRequest, ResourceType};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Opts, details, request, spawn_app, with_timeout};

fn fields(status: &tonic::Status) -> Vec<String> {
    let info = details::error_info_with(status, "INVALID_REQUEST");
    assert_eq!(info.metadata["account"], "default");
    status
        .get_error_details()
        .bad_request()
        .expect("a BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

#[tokio::test]
async fn every_rule_is_enforced_before_anything_goes_upstream() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    let long = |n| "é".repeat(n); // two bytes each: the limit counts characters
    type Mutation = Box<dyn Fn(&mut DeleteAssociationRequest)>;
    let cases: Vec<(&str, Mutation, Vec<&str>)> = vec![
        (
            "unset resource type",
            Box::new(|r| r.resource_type = 0),
            vec!["resource_type"],
        ),
        (
            "unknown resource type",
            Box::new(|r| r.resource_type = 42),
            vec!["resource_type"],
        ),
        (
            "unset channel",
            Box::new(|r| r.channel = 0),
            vec!["channel"],
        ),
        (
            "unknown channel",
            Box::new(|r| r.channel = -1),
            vec!["channel"],
        ),
        (
            "empty application id",
            Box::new(|r| r.application_id.clear()),
            vec!["application_id"],
        ),
        (
            "empty resource id",
            Box::new(|r| r.resource_id.clear()),
            vec!["resource_id"],
        ),
        (
            "empty entity id",
            Box::new(|r| r.entity_id = Some(String::new())),
            vec!["entity_id"],
        ),
        (
            "256 characters",
            Box::new(move |r| r.application_id = long(256)),
            vec!["application_id"],
        ),
        (
            "256 character entity",
            Box::new(move |r| r.entity_id = Some(long(256))),
            vec!["entity_id"],
        ),
        (
            "256 character resource",
            Box::new(move |r| r.resource_id = long(256)),
            vec!["resource_id"],
        ),
        (
            "domain over sms",
            Box::new(|r| {
                r.resource_type = ResourceType::Domain as i32;
                r.channel = Channel::Sms as i32;
            }),
            vec!["resource_type"],
        ),
        (
            "everything at once",
            Box::new(|r| {
                r.resource_type = 0;
                r.channel = 0;
                r.application_id.clear();
                r.resource_id.clear();
            }),
            vec!["resource_type", "channel", "application_id", "resource_id"],
        ),
    ];
    for (name, mutate, expected) in cases {
        let mut req = request(0);
        mutate(&mut req);
        let status = client.delete_association(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert_eq!(fields(&status), expected, "{name}");
    }
    assert!(
        app.mock.arrivals().is_empty(),
        "nothing may reach the upstream"
    );
}

#[tokio::test]
async fn the_boundaries_are_accepted() {
    let app = spawn_app(Opts::default()).await;
    let mut client = app.client().await;
    let mut req = request(0);
    req.application_id = "é".repeat(255); // 510 bytes, 255 characters
    req.entity_id = Some("ß".repeat(255));
    req.resource_id = "😀".repeat(255);
    client
        .delete_association(req)
        .await
        .expect("255 characters are allowed");
    let mut domain = request(1);
    domain.resource_type = ResourceType::Domain as i32;
    domain.channel = Channel::Email as i32;
    domain.entity_id = None;
    client
        .delete_association(domain)
        .await
        .expect("a domain over email is allowed");
    assert_eq!(app.mock.arrivals().len(), 2);
}

/// A valid-looking request whose fields encode to exactly `size` bytes (its
/// application id grows; over 255 characters it is invalid, but the size
/// limit is checked first).
fn of_size(size: usize) -> DeleteAssociationRequest {
    let mut req = request(0);
    while req.encoded_len() < size {
        req.application_id.push('a');
    }
    assert_eq!(
        req.encoded_len(),
        size,
        "no request encodes to {size} bytes"
    );
    req
}

#[tokio::test]
async fn requests_over_4_kib_are_refused_by_size_with_one_error_info() {
    // 1/s: a slot spent on a refused request would hold back the next call.
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..Opts::default()
    })
    .await;
    let mut client = app.client().await;
    for size in [5 * 1024, 4 * 1024 + 1] {
        let status = client.delete_association(of_size(size)).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{size} bytes: {status:?}");
        let info = details::error_info_with(&status, "REQUEST_TOO_LARGE");
        assert_eq!(info.metadata["account"], "default");
        assert_eq!(info.metadata["size_bytes"], size.to_string());
        assert_eq!(info.metadata["limit_bytes"], "4096");
    }
    // At the limit: not refused for its size (its 4 KiB application id is
    // what is wrong with it).
    let at_limit = client
        .delete_association(of_size(4 * 1024))
        .await
        .unwrap_err();
    assert_eq!(at_limit.code(), Code::InvalidArgument, "{at_limit:?}");
    assert_eq!(fields(&at_limit), ["application_id"]);
    // Over tonic's own guard (64 KiB) the message is not even decoded.
    let huge = client
        .delete_association(of_size(64 * 1024 + 1))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
    assert!(
        app.mock.arrivals().is_empty(),
        "nothing may reach the upstream"
    );
    // No slot was spent: a call that must be served within 600 ms is (at
    // 1/s it would be refused at once, BUDGET_EXHAUSTED, behind a spent slot).
    client
        .delete_association(with_timeout(request(1), Duration::from_millis(600)))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 1);
}
