//! One operation as the memory store keeps it: counters, times, the cancel
//! point and a result slot per request.

use std::collections::HashSet;

use crate::operations::{Snapshot, outcome};

/// One operation.
pub(super) struct Op {
    pub(super) owner: String,
    pub(super) fingerprint: String,
    pub(super) request_id: String,
    pub(super) total: u32,
    pub(super) succeeded: u32,
    pub(super) failed: u32,
    pub(super) create_us: i64,
    pub(super) estimated_end_us: i64,
    pub(super) end_us: Option<i64>,
    pub(super) cancel: bool,
    /// Requests from this index on were never taken when cancelled.
    pub(super) cancel_from: u32,
    /// Requests taken so far (they are taken in order).
    pub(super) taken: u32,
    pub(super) results: Vec<Option<Vec<u8>>>,
    pub(super) started: HashSet<u32>,
}

impl Op {
    pub(super) fn done(&self) -> bool {
        self.end_us.is_some()
    }

    /// Done once every request has a result (cancelled ones counted).
    pub(super) fn settle(&mut self, now: i64) {
        if !self.done() && self.succeeded + self.failed >= self.total {
            self.end_us = Some(now);
        }
    }

    pub(super) fn snapshot(&self, id: &str, results: bool) -> Snapshot {
        let cancelled_from = self.cancel.then_some(i64::from(self.cancel_from));
        let results = (results && self.done()).then(|| {
            let results = self.results.iter().cloned().zip(0..);
            results
                .map(|(r, i)| outcome(r, i, cancelled_from))
                .collect()
        });
        Snapshot {
            id: id.to_owned(),
            owner: self.owner.clone(),
            fingerprint: self.fingerprint.clone(),
            total: self.total,
            succeeded: self.succeeded,
            failed: self.failed,
            create_us: self.create_us,
            estimated_end_us: self.estimated_end_us,
            end_us: self.end_us,
            cancel_requested: self.cancel,
            done: self.done(),
            results,
        }
    }
}
