//! The request as the gateway understands it. A [`pb::DeleteAssociationRequest`]
//! becomes an [`Association`] through `TryFrom`, which checks every rule at
//! once; past that point nothing checks lengths or enums again.

use serde::Serialize;

use crate::pb;

/// Longest string Infobip accepts in any field, in Unicode characters (JSON
/// Schema `maxLength` counts characters, not bytes).
pub const MAX_LEN: usize = 255;

/// The kind of resource, spelled as Infobip spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResourceType {
    Number,
    Domain,
    Alpha,
}

/// The channel, spelled as Infobip spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Channel {
    Sms,
    Mms,
    Email,
}

/// A checked, non-empty identifier of at most [`MAX_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Id(String);

/// A resource association to delete: the body of Infobip's
/// `ResourceAssociationRequest`, serialised exactly as the vendor expects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Association {
    pub resource_type: ResourceType,
    pub channel: Channel,
    pub application_id: Id,
    /// `None` goes out as `"entityId": null` (the vendor requires the key).
    pub entity_id: Option<Id>,
    pub resource_id: Id,
}

/// One broken rule, naming the proto field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

/// Every rule the request broke, all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
pub struct InvalidRequest(pub Vec<FieldViolation>);

impl Association {
    /// The JSON body sent upstream.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and enums into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl TryFrom<pb::DeleteAssociationRequest> for Association {
    type Error = InvalidRequest;

    fn try_from(req: pb::DeleteAssociationRequest) -> Result<Self, Self::Error> {
        let mut violations = Vec::new();
        let mut violate =
            |field, description: String| violations.push(FieldViolation { field, description });

        let resource_type = match pb::ResourceType::try_from(req.resource_type) {
            Ok(pb::ResourceType::Number) => Some(ResourceType::Number),
            Ok(pb::ResourceType::Domain) => Some(ResourceType::Domain),
            Ok(pb::ResourceType::Alpha) => Some(ResourceType::Alpha),
            Ok(pb::ResourceType::Unspecified) => {
                violate("resource_type", "must be set".into());
                None
            }
            Err(_) => {
                violate(
                    "resource_type",
                    format!("unknown value {}", req.resource_type),
                );
                None
            }
        };
        let channel = match pb::Channel::try_from(req.channel) {
            Ok(pb::Channel::Sms) => Some(Channel::Sms),
            Ok(pb::Channel::Mms) => Some(Channel::Mms),
            Ok(pb::Channel::Email) => Some(Channel::Email),
            Ok(pb::Channel::Unspecified) => {
                violate("channel", "must be set".into());
                None
            }
            Err(_) => {
                violate("channel", format!("unknown value {}", req.channel));
                None
            }
        };
        if resource_type == Some(ResourceType::Domain)
            && channel.is_some_and(|c| c != Channel::Email)
        {
            violate(
                "resource_type",
                "RESOURCE_TYPE_DOMAIN is only valid with CHANNEL_EMAIL".into(),
            );
        }
        let application_id = id("application_id", req.application_id, &mut violate);
        let entity_id = match req.entity_id {
            None => Some(None),
            Some(e) => id("entity_id", e, &mut violate).map(Some),
        };
        let resource_id = id("resource_id", req.resource_id, &mut violate);

        match (
            resource_type,
            channel,
            application_id,
            entity_id,
            resource_id,
        ) {
            (
                Some(resource_type),
                Some(channel),
                Some(application_id),
                Some(entity_id),
                Some(resource_id),
            ) if violations.is_empty() => Ok(Association {
                resource_type,
                channel,
                application_id,
                entity_id,
                resource_id,
            }),
            _ => Err(InvalidRequest(violations)),
        }
    }
}

fn id(
    field: &'static str,
    value: String,
    violate: &mut impl FnMut(&'static str, String),
) -> Option<Id> {
    let chars = value.chars().count();
    if value.is_empty() {
        violate(field, "must not be empty".into());
        None
    } else if chars > MAX_LEN {
        violate(
            field,
            format!("must be at most {MAX_LEN} characters, got {chars}"),
        );
        None
    } else {
        Some(Id(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> pb::DeleteAssociationRequest {
        pb::DeleteAssociationRequest {
            resource_type: pb::ResourceType::Number as i32,
            channel: pb::Channel::Sms as i32,
            application_id: "app".into(),
            entity_id: None,
            resource_id: "num-key".into(),
            ..Default::default()
        }
    }

    #[test]
    fn encodes_exactly_the_vendor_body() {
        let a = Association::try_from(valid()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&a.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"resourceType":"NUMBER","channel":"SMS","applicationId":"app","entityId":null,"resourceId":"num-key"})
        );
    }

    #[test]
    fn reports_every_violation_at_once() {
        let err = Association::try_from(pb::DeleteAssociationRequest::default()).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            ["resource_type", "channel", "application_id", "resource_id"]
        );
    }

    proptest! {
        #[test]
        fn any_request_is_refused_with_violations_or_encoded_within_schema(
            rt in -2i32..6, ch in -2i32..6,
            app in ".{0,300}", ent in proptest::option::of(".{0,300}"), res in ".{0,300}",
        ) {
            let req = pb::DeleteAssociationRequest {
                resource_type: rt, channel: ch,
                application_id: app, entity_id: ent, resource_id: res,
                ..Default::default()
            };
            match Association::try_from(req) {
                Err(InvalidRequest(v)) => prop_assert!(!v.is_empty()),
                Ok(a) => {
                    let json: serde_json::Value = serde_json::from_slice(&a.to_json()).unwrap();
                    let obj = json.as_object().unwrap();
                    prop_assert_eq!(obj.len(), 5);
                    for k in ["applicationId", "resourceId"] {
                        let n = obj[k].as_str().unwrap().chars().count();
                        prop_assert!((1..=MAX_LEN).contains(&n));
                    }
                    prop_assert!(["NUMBER","DOMAIN","ALPHA"].contains(&obj["resourceType"].as_str().unwrap()));
                    prop_assert!(["SMS","MMS","EMAIL"].contains(&obj["channel"].as_str().unwrap()));
                    if obj["resourceType"] == "DOMAIN" { prop_assert_eq!(&obj["channel"], "EMAIL"); }
                }
            }
        }
    }
}
