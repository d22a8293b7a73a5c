//! Fair-share lanes of anonymous callers. An anonymous call names its lane
//! with `x-caller`, which costs nothing to vary: one client could open a lane
//! per call and so go before everyone with more than one call in line. Each
//! connection may open at most [`PER_CONNECTION`] such lanes; its further
//! names share the lane `anonymous`. Anonymous lanes are kept apart from
//! authenticated callers' (`anon:<name>`), so `x-caller: token:billing`
//! does not join the token caller `billing`'s share.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::Caller;

/// Distinct `x-caller` lanes one connection may open.
pub(crate) const PER_CONNECTION: usize = 8;
/// Connections remembered; beyond it, those idle longest are forgotten.
const CONNECTIONS: usize = 10_000;
/// A connection idle this long is forgotten first.
const IDLE: Duration = Duration::from_secs(600);

/// The lanes each connection opened.
#[derive(Default)]
pub(super) struct AnonymousLanes(Mutex<HashMap<SocketAddr, Opened>>);

struct Opened {
    names: Vec<Arc<str>>,
    used: Instant,
}

impl AnonymousLanes {
    /// The fairness lane of an anonymous `caller` on connection `peer`.
    pub(super) fn lane(&self, peer: Option<SocketAddr>, caller: &Caller) -> Caller {
        let anonymous = Caller::anonymous();
        if caller.id == anonymous.id {
            return anonymous;
        }
        let Some(peer) = peer else {
            return anonymous;
        };
        let now = Instant::now();
        let mut all = self.lock();
        if all.len() >= CONNECTIONS && !all.contains_key(&peer) {
            all.retain(|_, o| now.saturating_duration_since(o.used) < IDLE);
            if all.len() >= CONNECTIONS {
                all.clear();
            }
        }
        let opened = all.entry(peer).or_insert_with(|| Opened {
            names: Vec::new(),
            used: now,
        });
        opened.used = now;
        let known = opened.names.iter().any(|n| **n == *caller.id);
        if !known {
            if opened.names.len() >= PER_CONNECTION {
                return anonymous;
            }
            opened.names.push(Arc::clone(&caller.id));
        }
        Caller::new(format!("anon:{}", caller.id), caller.weight)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Opened>> {
        // Map updates only: a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn named(name: &str) -> Caller {
        Caller::new(name, NonZeroU32::MIN)
    }

    #[test]
    fn a_connection_opens_at_most_its_share_of_lanes_then_shares_anonymous() {
        let lanes = AnonymousLanes::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:1001".parse().unwrap(),
        );
        for i in 0..PER_CONNECTION {
            let lane = lanes.lane(Some(a), &named(&format!("c{i}")));
            assert_eq!(&*lane.id, format!("anon:c{i}"));
        }
        assert_eq!(lanes.lane(Some(a), &named("one-more")), Caller::anonymous());
        // A name it opened before keeps its lane; another connection has its own.
        assert_eq!(&*lanes.lane(Some(a), &named("c0")).id, "anon:c0");
        assert_eq!(
            &*lanes.lane(Some(b), &named("one-more")).id,
            "anon:one-more"
        );
    }

    #[test]
    fn anonymous_lanes_are_apart_from_authenticated_callers() {
        let lanes = AnonymousLanes::default();
        let peer = Some("127.0.0.1:1000".parse().unwrap());
        assert_eq!(
            &*lanes.lane(peer, &named("token:billing")).id,
            "anon:token:billing"
        );
        assert_eq!(lanes.lane(peer, &Caller::anonymous()), Caller::anonymous());
        assert_eq!(lanes.lane(None, &named("x")), Caller::anonymous());
    }
}
