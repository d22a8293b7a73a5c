//! Spawns the real gateway (`App::build` + `run_until_stopped`, exactly as
//! `main` does) on 127.0.0.1:0 in front of the Infobip emulator, and hands
//! tests a gRPC client.

#![allow(dead_code)]

pub mod batch;
pub mod details;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod redis;
pub mod stall;
pub mod topology;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use provisioning_gateway::config::{
    AccountConfig, BackendConfig, Config, ConfigBuilder, RedisConfig, RedisFallback, RedisUrl,
    defaults, endpoint_url,
};
use provisioning_gateway::mock::{Mock, MockConfig};
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::pb::{Channel as PbChannel, DeleteAssociationRequest, ResourceType};
use provisioning_gateway::{ApiKey, KeySource, testing};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const API_KEY: &str = "test-api-key-0123456789";

/// Knobs of a test gateway.
#[derive(Clone)]
pub struct Opts {
    pub rate_per_second: u32,
    pub safety_margin: Duration,
    pub max_wait: Duration,
    pub max_queue: usize,
    pub upstream_timeout: Duration,
    pub upstream_reserve: Duration,
    pub shutdown_grace: Duration,
    /// Point the gateway somewhere else than the emulator (transport failures).
    pub upstream_url: Option<String>,
    /// Where the budget lives (memory unless a test says otherwise).
    pub backend: BackendConfig,
    pub account_name: String,
    pub api_key: String,
    /// This replica's wall clock, off the system's by this much.
    pub clock_offset_ms: i64,
}

impl Opts {
    /// These options on the Redis backend at `url`.
    pub fn redis(self, url: &str, fallback: RedisFallback, expected_replicas: u32) -> Self {
        let mut redis = RedisConfig::new(RedisUrl::new(url).unwrap());
        redis.key_prefix = "provisioning-gateway:test:".into();
        redis.fallback = fallback;
        redis.expected_replicas = NonZeroU32::new(expected_replicas).unwrap();
        Self {
            backend: BackendConfig::Redis(Box::new(redis)),
            ..self
        }
    }

    /// The same, with this replica's wall clock shifted by `offset_ms`.
    pub fn clock_offset_ms(self, offset_ms: i64) -> Self {
        Self {
            clock_offset_ms: offset_ms,
            ..self
        }
    }
}

/// A client of the gateway's gRPC API.
pub type GrpcClient = AssociationServiceClient<Channel>;

impl Default for Opts {
    fn default() -> Self {
        Self {
            // 20/s keeps the suite fast; one test runs the real 1 rps.
            rate_per_second: 20,
            // Wider than the product's 10 ms default: the emulator checks
            // arrivals, and a loaded 2-core CI machine can delay a send.
            safety_margin: Duration::from_millis(40),
            max_wait: Duration::from_secs(30),
            max_queue: 1000,
            upstream_timeout: Duration::from_secs(5),
            upstream_reserve: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            upstream_url: None,
            backend: BackendConfig::Memory,
            account_name: defaults::ACCOUNT_NAME.into(),
            api_key: API_KEY.into(),
            clock_offset_ms: 0,
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub mock: Mock,
    pub stop: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
    mock_stop: CancellationToken,
}

impl TestApp {
    pub async fn client(&self) -> AssociationServiceClient<Channel> {
        AssociationServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("the gateway is bound before it serves, so connecting succeeds")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Triggers shutdown and waits for `run_until_stopped` to return.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let r = self.server.await.expect("server task panicked");
        self.mock_stop.cancel();
        r
    }
}

/// The configuration of a test gateway in front of `upstream`, to build on.
pub fn config(opts: &Opts, upstream: &str) -> ConfigBuilder {
    Config::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .metrics_listen("127.0.0.1:0".parse().unwrap())
        .account(account(&opts.account_name, upstream, &opts.api_key))
        .rate_per_second(opts.rate_per_second)
        .safety_margin(opts.safety_margin)
        .max_wait(opts.max_wait)
        .max_queue(opts.max_queue)
        .upstream_reserve(opts.upstream_reserve)
        .backend(opts.backend.clone())
        .upstream_timeout(opts.upstream_timeout)
        .shutdown_grace(opts.shutdown_grace)
}

/// An account at `upstream` with a fixed key.
pub fn account(name: &str, upstream: &str, key: &str) -> AccountConfig {
    AccountConfig::new(
        name,
        endpoint_url(upstream).unwrap(),
        KeySource::Fixed(ApiKey::new(key).unwrap()),
    )
}

/// The emulator on a free loopback port, enforcing the same rate as the gateway.
pub async fn spawn_mock(rate_per_second: u32) -> (Mock, SocketAddr, CancellationToken) {
    let mock = Mock::new(MockConfig {
        api_key: Some(API_KEY.into()),
        rate_per_second,
    });
    let (addr, stop) = serve_apart(&mock);
    (mock, addr, stop)
}

/// Serves `mock` on a thread and runtime of its own until the token is
/// cancelled: its arrival stamps never wait behind the gateways' tasks on
/// the test's runtime (a stamp made late by a busy worker reads as two
/// arrivals too close, and the emulator answers 429).
fn serve_apart(mock: &Mock) -> (SocketAddr, CancellationToken) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let (mock, stopped) = (mock.clone(), stop.clone().cancelled_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the emulator's runtime");
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("a bound listener");
            let _ = mock.serve(listener, stopped).await;
        });
    });
    (addr, stop)
}

pub async fn spawn_app(opts: Opts) -> TestApp {
    let (mock, mock_addr, mock_stop) = spawn_mock(opts.rate_per_second).await;
    spawn_gateway(opts, mock, mock_addr, mock_stop).await
}

/// The emulator accepting any key (one rate limit per key: per account).
pub async fn spawn_open_mock(rate_per_second: u32) -> (Mock, SocketAddr, CancellationToken) {
    let mock = Mock::new(MockConfig {
        api_key: None,
        rate_per_second,
    });
    let (addr, stop) = serve_apart(&mock);
    (mock, addr, stop)
}

/// A gateway in front of an emulator that already runs (replicas share one).
/// `mock_stop` is cancelled when this gateway shuts down.
pub async fn spawn_gateway(
    opts: Opts,
    mock: Mock,
    mock_addr: SocketAddr,
    mock_stop: CancellationToken,
) -> TestApp {
    let upstream = opts
        .upstream_url
        .clone()
        .unwrap_or_else(|| format!("http://{mock_addr}"));
    let config = config(&opts, &upstream).build().unwrap();
    let app = testing::build_with_clock_offset(config, opts.clock_offset_ms)
        .await
        .unwrap();
    serve(app, mock, mock_stop)
}

/// A gateway built from an explicit configuration (several accounts, TLS, callers).
pub async fn spawn_config(
    config: ConfigBuilder,
    mock: Mock,
    mock_stop: CancellationToken,
) -> TestApp {
    let app = provisioning_gateway::App::build(config.build().unwrap())
        .await
        .unwrap();
    serve(app, mock, mock_stop)
}

fn serve(app: provisioning_gateway::App, mock: Mock, mock_stop: CancellationToken) -> TestApp {
    let addr = app.grpc_addr();
    let metrics_addr = app.metrics_addr();
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    TestApp {
        addr,
        metrics_addr,
        mock,
        stop,
        server,
        mock_stop,
    }
}

/// A valid request; `n` makes it unique (the emulator 404s a second delete).
pub fn request(n: usize) -> DeleteAssociationRequest {
    DeleteAssociationRequest {
        resource_type: ResourceType::Number as i32,
        channel: PbChannel::Sms as i32,
        application_id: "app-1".into(),
        entity_id: Some("entity-1".into()),
        resource_id: format!("number-key-{n}"),
        ..Default::default()
    }
}

/// A request with a gRPC deadline.
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// The gateway's `/healthz` JSON.
pub async fn healthz(metrics_addr: SocketAddr) -> serde_json::Value {
    reqwest::get(format!("http://{metrics_addr}/healthz"))
        .await
        .expect("/healthz answers")
        .json()
        .await
        .expect("/healthz is JSON")
}

/// The series `name{account="…"}` of one account's metric.
pub fn series(name: &str, account: &str) -> String {
    format!("{name}{{account=\"{account}\"}}")
}

/// The gateway's `/metrics` page.
pub async fn metrics_page(metrics_addr: SocketAddr) -> String {
    reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics is text")
}

/// The value of `series` (a metric name with all its labels, as rendered)
/// on the gateway's `/metrics`; `None` while it was never recorded.
pub async fn metric(metrics_addr: SocketAddr, series: &str) -> Option<f64> {
    let page = metrics_page(metrics_addr).await;
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().expect("a number"))
    })
}

/// Waits until `series` on `/metrics` reads `want` (absent reads 0): a
/// bounded poll on what the gateway shows, for tests that must know a call
/// is in line (the queue-depth gauge) or has joined a flight (the
/// coalesced counter) before they go on.
pub async fn until_metric(metrics_addr: SocketAddr, series: &str, want: f64) {
    let started = std::time::Instant::now();
    loop {
        let seen = metric(metrics_addr, series).await.unwrap_or(0.0);
        if seen == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{series} reads {seen}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs each named `async fn name(opts: Opts)` of the calling module on both
/// budget backends: in memory, and on Redis (one replica on its own
/// `redis-server`, `--redis-fallback deny`): one behaviour.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Opts::default()).await
                }
            )*
        }
        mod on_redis {
            use provisioning_gateway::config::RedisFallback;
            use crate::support::redis::RedisServer;
            $(
                #[tokio::test]
                async fn $test() {
                    let redis = RedisServer::start();
                    let opts = super::Opts::default().redis(&redis.url(), RedisFallback::Deny, 1);
                    super::$test(opts).await
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
