//! Who a call is for, as fair shares know it.

use std::num::NonZeroU32;
use std::sync::Arc;

/// Who is waiting: the fairness key and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Authenticated identity, `x-caller` for anonymous callers, or `anonymous`.
    pub id: Arc<str>,
    pub weight: NonZeroU32,
}

impl Caller {
    pub fn new(id: impl Into<Arc<str>>, weight: NonZeroU32) -> Self {
        Self {
            id: id.into(),
            weight,
        }
    }

    /// The caller of calls that say nothing about themselves.
    pub fn anonymous() -> Self {
        Self::new("anonymous", NonZeroU32::MIN)
    }
}
