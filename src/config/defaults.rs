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
