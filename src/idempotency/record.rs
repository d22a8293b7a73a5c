//! What is kept per idempotency key, and how it is encoded where bytes are
//! kept (Redis): the request's fingerprint and the call's state (running,
//! ended with an unknown outcome, or done with the `google.rpc.Status` it
//! answered). Bytes that do not decode to a record of this version are no
//! record at all: a caller never sees a panic or a garbled answer because of
//! what it found in storage.

use prost::Message;
use sha2::{Digest, Sha256};
use tonic_types::pb::Status as RpcStatus;

use crate::domain::Association;

/// Encoding version; a record of any other is treated as absent.
const VERSION: u32 = 1;

/// What the request asked for: a SHA-256 of the five fields and
/// `allow_missing`. The same `request_id` with another fingerprint is a
/// different request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub(crate) fn of(association: &Association, allow_missing: bool) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"delete-association/v1\0");
        // The vendor body: the five fields in a fixed order, `null` for an
        // absent entity_id (never confused with an empty one).
        hash.update(association.to_json());
        hash.update([0, u8::from(allow_missing)]);
        Self(hash.finalize().into())
    }
}

/// Where a call with this key stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum State {
    /// A call runs it (under a lease, see the stores).
    Running,
    /// It was sent, but no answer says whether it took effect: a retry sends
    /// again, and an upstream 404 then answers OK.
    Unknown,
    /// The answer, as `google.rpc.Status` (code, message, details).
    Done(RpcStatus),
}

/// One key's record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) state: State,
}

/// The stored form.
#[derive(Clone, PartialEq, Message)]
struct Wire {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(bytes = "vec", tag = "2")]
    fingerprint: Vec<u8>,
    /// 1 running, 2 unknown, 3 done.
    #[prost(uint32, tag = "3")]
    state: u32,
    #[prost(message, optional, tag = "4")]
    status: Option<RpcStatus>,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (state, status) = match &self.state {
            State::Running => (1, None),
            State::Unknown => (2, None),
            State::Done(status) => (3, Some(status.clone())),
        };
        Wire {
            version: VERSION,
            fingerprint: self.fingerprint.0.to_vec(),
            state,
            status,
        }
        .encode_to_vec()
    }

    /// The record these bytes hold; `None` for anything else.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let wire = Wire::decode(bytes).ok()?;
        if wire.version != VERSION {
            return None;
        }
        let fingerprint = Fingerprint(wire.fingerprint.try_into().ok()?);
        let state = match (wire.state, wire.status) {
            (1, None) => State::Running,
            (2, None) => State::Unknown,
            (3, Some(status)) => State::Done(status),
            _ => return None,
        };
        Some(Self { fingerprint, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use proptest::prelude::*;

    fn association(resource_id: &str, entity_id: Option<&str>) -> Association {
        Association::try_from(pb::DeleteAssociationRequest {
            resource_type: pb::ResourceType::Number as i32,
            channel: pb::Channel::Sms as i32,
            application_id: "app".into(),
            entity_id: entity_id.map(Into::into),
            resource_id: resource_id.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_fingerprint_covers_the_five_fields_and_allow_missing() {
        let a = Fingerprint::of(&association("n-1", None), false);
        assert_eq!(a, Fingerprint::of(&association("n-1", None), false));
        assert_ne!(a, Fingerprint::of(&association("n-2", None), false));
        assert_ne!(a, Fingerprint::of(&association("n-1", None), true));
        // An absent entity is not an entity named "null" or "".
        let absent = Fingerprint::of(&association("n-1", None), false);
        let named = Fingerprint::of(&association("n-1", Some("null")), false);
        assert_ne!(absent, named);
    }

    #[test]
    fn every_state_survives_its_encoding() {
        let fingerprint = Fingerprint::of(&association("n-1", None), true);
        let done = RpcStatus {
            code: 5,
            message: "Resource association not found.".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: vec![10, 9, 78, 79, 84, 95, 70, 79, 85, 78, 68],
            }],
        };
        for state in [State::Running, State::Unknown, State::Done(done)] {
            let record = Record { fingerprint, state };
            assert_eq!(Record::decode(&record.encode()), Some(record));
        }
    }

    #[test]
    fn bytes_of_another_shape_are_no_record() {
        let fingerprint = Fingerprint::of(&association("n-1", None), false);
        let wire = |version, fingerprint: Vec<u8>, state, status| {
            Wire {
                version,
                fingerprint,
                state,
                status,
            }
            .encode_to_vec()
        };
        let ok = fingerprint.0.to_vec();
        for bad in [
            Vec::new(),
            b"not a record".to_vec(),
            vec![0xff; 40],
            wire(2, ok.clone(), 1, None),
            wire(1, ok[..31].to_vec(), 1, None),
            wire(1, ok.clone(), 0, None),
            wire(1, ok.clone(), 4, None),
            wire(1, ok.clone(), 3, None),
            wire(1, ok, 1, Some(RpcStatus::default())),
        ] {
            assert_eq!(Record::decode(&bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn no_bytes_make_decoding_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
        }
    }
}
