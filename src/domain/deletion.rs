//! The idempotency key a caller may give a call (`request_id`, AIP-155) and
//! the call it names: the association, whether a missing one answers OK, and
//! that key, parsed from the request with every rule checked at once.

use super::association::{Association, FieldViolation, InvalidRequest};
use crate::pb;

/// Longest `request_id`, in characters (a UUID has 36).
pub const MAX_REQUEST_ID: usize = 64;

/// A checked idempotency key: 1 to [`MAX_REQUEST_ID`] characters of
/// `A-Z a-z 0-9 . _ ~ : -` (safe in logs, keys and URLs alike).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// `None` for an empty value (no key); a violation naming `field` when
    /// it breaks a rule.
    pub fn parse(field: &'static str, value: String) -> Result<Option<Self>, FieldViolation> {
        if value.is_empty() {
            return Ok(None);
        }
        let chars = value.chars().count();
        let description = if chars > MAX_REQUEST_ID {
            format!("must be at most {MAX_REQUEST_ID} characters, got {chars}")
        } else if !value.chars().all(is_allowed) {
            "may contain only A-Z, a-z, 0-9 and . _ ~ : - (e.g. a UUID)".to_owned()
        } else {
            return Ok(Some(Self(value)));
        };
        Err(FieldViolation { field, description })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | ':' | '-')
}

/// One `DeleteAssociation` call as the gateway understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub association: Association,
    /// An upstream 404 answers OK.
    pub allow_missing: bool,
    pub request_id: Option<RequestId>,
}

impl TryFrom<pb::DeleteAssociationRequest> for Deletion {
    type Error = InvalidRequest;

    /// Every violation at once: the five fields', then `request_id`'s.
    fn try_from(mut req: pb::DeleteAssociationRequest) -> Result<Self, Self::Error> {
        let allow_missing = req.allow_missing;
        let request_id = RequestId::parse("request_id", std::mem::take(&mut req.request_id));
        match (Association::try_from(req), request_id) {
            (Ok(association), Ok(request_id)) => Ok(Self {
                association,
                allow_missing,
                request_id,
            }),
            (association, request_id) => {
                let mut violations = association.err().map(|e| e.0).unwrap_or_default();
                violations.extend(request_id.err());
                Err(InvalidRequest(violations))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(request_id: &str) -> pb::DeleteAssociationRequest {
        pb::DeleteAssociationRequest {
            resource_type: pb::ResourceType::Number as i32,
            channel: pb::Channel::Sms as i32,
            application_id: "app".into(),
            resource_id: "num-key".into(),
            allow_missing: true,
            request_id: request_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_request_id_is_none_and_a_uuid_is_kept() {
        let none = Deletion::try_from(request("")).unwrap();
        assert_eq!(none.request_id, None);
        assert!(none.allow_missing);
        let uuid = "0b5e7c1e-3f1a-4c39-9d55-8e0f5a0c2b7d";
        let some = Deletion::try_from(request(uuid)).unwrap();
        assert_eq!(some.request_id.unwrap().as_str(), uuid);
        let longest = "a".repeat(MAX_REQUEST_ID);
        assert!(RequestId::parse("request_id", longest).unwrap().is_some());
        let safe = "A-z_0.9~x:y".to_owned();
        assert!(RequestId::parse("request_id", safe).unwrap().is_some());
    }

    #[test]
    fn a_bad_request_id_is_named_with_the_other_violations() {
        for bad in [
            "a".repeat(MAX_REQUEST_ID + 1),
            "with space".into(),
            "slash/".into(),
            "ünïcode".into(),
            "new\nline".into(),
        ] {
            let mut req = request(&bad);
            req.resource_id.clear();
            let err = Deletion::try_from(req).unwrap_err();
            let fields: Vec<_> = err.0.iter().map(|v| v.field).collect();
            assert_eq!(fields, ["resource_id", "request_id"], "{bad:?}");
        }
    }
}
