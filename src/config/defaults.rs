//! The documented defaults, in one place: `serve --help` shows these, and
//! [`super::ConfigBuilder`] starts from them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

pub const LISTEN: SocketAddr = SocketAddr::new(ANY, 50051);
pub const METRICS_LISTEN: SocketAddr = SocketAddr::new(ANY, 9090);
/// Name of the single account configured by flags.
pub const ACCOUNT_NAME: &str = "default";
pub const RATE_PER_SECOND: u32 = 1;
pub const BURST: u32 = 1;
pub const SAFETY_MARGIN: Duration = Duration::from_millis(10);
pub const MAX_WAIT: Duration = Duration::from_secs(30);
pub const MAX_QUEUE: usize = 1000;
pub const UPSTREAM_RESERVE: Duration = Duration::from_millis(200);
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
pub const REDIS_KEY_PREFIX: &str = "provisioning-gateway:budget:";
pub const EXPECTED_REPLICAS: u32 = 1;
/// Request ids remembered in memory (the memory backend, and the `local`
/// fallback while Redis is lost), the oldest forgotten first.
pub const IDEMPOTENCY_MAX_ENTRIES: usize = 100_000;
/// How long a done batch operation is kept (a week).
pub const OPERATION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

// Bounds: every duration and rate is checked against these before anything
// binds, so no later sum or instant can overflow (a panic on a request path)
// and a typo ("30000s" for "30s") is caught at startup.

/// Most upstream requests per second per account (interval ≥ 1 ms).
pub const MAX_RATE_PER_SECOND: u32 = 1000;
/// Most requests at once after idling (the load tool's "unlimited" budget).
pub const MAX_BURST: u32 = 1_000_000_000;
pub const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(10);
/// Longest `--max-wait` (a day: a deep queue at 1 request/second can
/// legitimately wait hours; far from any overflow).
pub const MAX_MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
pub const MAX_MAX_QUEUE: usize = 1_000_000;
pub const MAX_UPSTREAM_RESERVE: Duration = Duration::from_secs(60);
pub const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);
pub const MAX_EXPECTED_REPLICAS: u32 = 1000;
pub const MAX_IDEMPOTENCY_MAX_ENTRIES: usize = 10_000_000;
/// Longest `--operation-retention` (a year).
pub const MAX_OPERATION_RETENTION: Duration = Duration::from_secs(366 * 24 * 3600);
