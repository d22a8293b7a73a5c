//! Reading operations back from Redis: an operation's hash fields parsed
//! into a [`Snapshot`], and its results. Bad bytes never panic: a field
//! that is absent or no number reads as absent or zero.

use super::{RedisOperations, unavailable};
use crate::operations::{Snapshot, Unavailable, outcome};

/// An operation's fields as `get` and `list` read them, in this order.
pub(super) const FIELDS: [&str; 11] = [
    "owner",
    "fp",
    "total",
    "ok",
    "failed",
    "create",
    "eta",
    "end",
    "cancel",
    "cancel_from",
    "done",
];

impl RedisOperations {
    /// An operation's fields (or its results), by plain `HMGET`.
    pub(super) async fn hmget(
        &self,
        key: String,
        fields: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, Unavailable> {
        self.connected().await?;
        let run = self.store.run(|mut conn| async move {
            redis::cmd("HMGET")
                .arg(key)
                .arg(fields)
                .query_async(&mut conn)
                .await
        });
        run.await.map_err(unavailable)
    }

    pub(super) async fn snapshot(
        &self,
        account: &str,
        id: &str,
        results: bool,
    ) -> Result<Option<Snapshot>, Unavailable> {
        let key = format!("{}:op:{id}", self.base(account));
        let fields = FIELDS.iter().map(|f| (*f).to_owned()).collect();
        let values = self.hmget(key.clone(), fields).await?;
        let values: Vec<Vec<u8>> = values.into_iter().map(Option::unwrap_or_default).collect();
        let Some(mut snapshot) = parse(id, &values) else {
            return Ok(None);
        };
        if results && snapshot.done {
            let fields = (0..snapshot.total).map(|i| format!("r:{i}")).collect();
            let stored = self.hmget(key.clone(), fields).await?;
            let cancel_from = number(values.get(9)).unwrap_or(i64::MAX);
            let cancelled_from = snapshot.cancel_requested.then_some(cancel_from);
            let outcomes = stored
                .into_iter()
                .zip(0..)
                .map(|(r, i)| outcome(r, i, cancelled_from));
            snapshot.results = Some(outcomes.collect());
        }
        Ok(Some(snapshot))
    }
}

/// An operation from its [`FIELDS`] (`None` when it does not exist).
pub(super) fn parse(id: &str, values: &[Vec<u8>]) -> Option<Snapshot> {
    let owner = values.first().filter(|o| !o.is_empty())?;
    let count = |i: usize| u32::try_from(number(values.get(i)).unwrap_or(0)).unwrap_or(0);
    let flag = |i: usize| values.get(i).is_some_and(|v| v == b"1");
    Some(Snapshot {
        id: id.to_owned(),
        owner: String::from_utf8_lossy(owner).into_owned(),
        fingerprint: values
            .get(1)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default(),
        total: count(2),
        succeeded: count(3),
        failed: count(4),
        create_us: number(values.get(5)).unwrap_or(0),
        estimated_end_us: number(values.get(6)).unwrap_or(0),
        end_us: number(values.get(7)),
        cancel_requested: flag(8),
        done: flag(10),
        results: None,
    })
}

/// A decimal integer field; `None` when absent or not one.
fn number(value: Option<&Vec<u8>>) -> Option<i64> {
    std::str::from_utf8(value?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_stored_fields_read_as_absent_or_zero_never_a_panic() {
        assert!(parse("x", &[]).is_none());
        assert!(
            parse("x", &[Vec::new()]).is_none(),
            "no owner: no operation"
        );
        let odd: Vec<Vec<u8>> = [
            "o",
            "\u{1}",
            "-3",
            "x",
            "99999999999",
            "",
            "1e5",
            "",
            "1",
            "",
            "2",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let s = parse("x", &odd).unwrap();
        assert_eq!((s.total, s.succeeded, s.failed), (0, 0, 0));
        assert_eq!((s.create_us, s.end_us, s.done), (0, None, false));
        assert!(s.cancel_requested);
    }
}
