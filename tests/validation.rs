//! Every validation rule: INVALID_ARGUMENT with a BadRequest naming the proto
//! fields, all violations at once, no budget spent, nothing sent upstream.

use provisioning_gateway::pb::{Channel, DeleteAssociationRequest, ResourceType};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Opts, details, request, spawn_app};

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
