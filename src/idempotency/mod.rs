//! Idempotent calls (AIP-155): a call that carries a `request_id` runs at
//! most once per (account, caller, request_id) within [`RETENTION`]; a
//! retry answers the first call's outcome, or joins it while it runs.
//!
//! - [`record`]: what is kept per key (the request's fingerprint, the
//!   call's state, its answer as `google.rpc.Status`) and its encoding;
//! - [`Store`]: where records live: [`memory`] in this process (bounded,
//!   oldest first out), [`redis`] beside the budget in Redis (every
//!   replica sees them);
//! - [`Records`] (`records.rs`): the door the request path uses: picks the
//!   store (the memory one while Redis is lost and `--redis-fallback` is
//!   `local`), claims a key, waits for a call that runs, and hands out a
//!   [`Claim`](records::Claim) that records how the call ended, even when its caller goes
//!   away.
//!
//! A running call holds a lease (its deadline plus [`LEASE_MARGIN`]): a
//! record still running after its lease lapsed (its replica died) reads as
//! an unknown outcome, so nothing waits for it forever.
//!
//! A mechanism: imports the leaves (`domain`, `config`) and the Redis
//! connection the budget holds (`budget::redis`, `budget::shared`) only.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tonic_types::pb::Status as RpcStatus;

use crate::domain::RequestId;

mod memory;
pub(crate) mod record;
mod records;
mod redis;

pub(crate) use record::{Fingerprint, State};
pub use records::Refused;
pub(crate) use records::{Begun, End, Records};
pub(crate) use redis::RedisRecords;

/// A key and a fingerprint for the stores' and the door's unit tests.
#[cfg(test)]
mod fixtures {
    use super::{Fingerprint, Key};
    use crate::domain::{Association, RequestId};
    use crate::pb;

    /// The key of request id `r-<n>` from the anonymous caller on `default`.
    pub(super) fn key(n: usize) -> Key {
        let id = RequestId::parse("request_id", format!("r-{n}"))
            .unwrap()
            .unwrap();
        Key::new("default", "anonymous", &id)
    }

    /// The fingerprint of one valid request, with `allow_missing`.
    pub(super) fn fingerprint(allow_missing: bool) -> Fingerprint {
        let association = Association::try_from(pb::DeleteAssociationRequest {
            resource_type: pb::ResourceType::Number as i32,
            channel: pb::Channel::Sms as i32,
            application_id: "app".into(),
            resource_id: "n-1".into(),
            ..Default::default()
        })
        .unwrap();
        Fingerprint::of(&association, allow_missing)
    }
}

/// How long a key is remembered, from its first call.
pub(crate) const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Added to a running call's deadline for its lease: its replica answers by
/// its deadline, and records the end a moment later.
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// One key: the account (in clear: Redis Cluster's hash tag) and a SHA-256
/// of the caller and the request_id (neither shows in a key or a log).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    account: Arc<str>,
    digest: [u8; 32],
}

impl Key {
    pub(crate) fn new(account: &str, caller: &str, request_id: &RequestId) -> Self {
        let mut hash = Sha256::new();
        // Length first: ("ab", "c") and ("a", "bc") are different keys.
        hash.update((caller.len() as u64).to_be_bytes());
        hash.update(caller);
        hash.update(request_id.as_str());
        Self {
            account: account.into(),
            digest: hash.finalize().into(),
        }
    }

    /// The digest in lowercase hex.
    fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A claim's proof of ownership: unique within the process (the Redis
/// store makes it unique across replicas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token(u64);

/// A record a call holds: its key, what it asked for, its token.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    key: Key,
    fingerprint: Fingerprint,
    token: Token,
}

impl Held {
    /// What a claim of `key` that found [`Found::Claimed`] with `token` holds.
    pub(crate) fn new(key: Key, fingerprint: Fingerprint, token: Token) -> Self {
        Self {
            key,
            fingerprint,
            token,
        }
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found {
    /// The caller runs the call. `prior_unknown`: an earlier call with this
    /// key may have taken effect (an upstream 404 then answers OK).
    Claimed { token: Token, prior_unknown: bool },
    /// It ended with this answer.
    Done(RpcStatus),
    /// The key was used for another request.
    Reused,
    /// A call runs it: look again by `look_again` at the latest (sooner on
    /// a change).
    Running { look_again: tokio::time::Instant },
}

/// The store could not be asked (Redis lost).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the idempotency store is unavailable")]
pub(crate) struct Unavailable;

/// Where records live. Every store bumps the `changes` it was built with
/// when a record of this process ends, so waiters on this replica wake at
/// once.
pub(crate) trait Store: Send + Sync {
    /// Claims `key` for a call of `fingerprint` running until `lease` from
    /// now, or says what holds it. Takes over a record whose call ended
    /// unknown or whose lease lapsed.
    fn claim<'a>(
        &'a self,
        key: &'a Key,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Found, Unavailable>>;

    /// Ends what `held` holds: the record gets `end`, or is forgotten
    /// (`None`). Ignored when another call took the record over meanwhile.
    fn finish<'a>(
        &'a self,
        held: &'a Held,
        end: Option<State>,
    ) -> BoxFuture<'a, Result<(), Unavailable>>;

    /// [`Self::finish`] with an unknown outcome, from a destructor (the
    /// caller went away mid-call): done at once, or in a task.
    fn abandon(self: Arc<Self>, held: Held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_accounts_callers_and_ids_and_hide_them() {
        let id = |s: &str| RequestId::parse("request_id", s.into()).unwrap().unwrap();
        let key = Key::new("default", "token:billing", &id("r-1"));
        assert_eq!(key, Key::new("default", "token:billing", &id("r-1")));
        assert_ne!(key, Key::new("other", "token:billing", &id("r-1")));
        assert_ne!(key, Key::new("default", "token:orders", &id("r-1")));
        assert_ne!(key, Key::new("default", "token:billing", &id("r-2")));
        assert_ne!(
            Key::new("default", "ab", &id("c")),
            Key::new("default", "a", &id("bc"))
        );
        let hex = key.hex();
        assert_eq!(hex.len(), 64);
        assert!(!hex.contains("billing") && !hex.contains("r-1"));
    }
}
