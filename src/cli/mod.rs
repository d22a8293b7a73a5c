//! The command line: three subcommands, every `serve` flag also read from its
//! environment variable (Kubernetes passes settings as env from a ConfigMap).
//!
//! Values are parsed here only as far as clap does it cheaply; `serve.rs` hands
//! them to [`crate::config::Config::builder`], which checks them before
//! anything binds. The defaults shown in `--help` are [`defaults`]'.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use humantime::Duration;

use crate::config::defaults;
pub use crate::config::{LogFormat, RedisFallback};

mod refusal;
mod serve;

pub use refusal::refusal;

/// gRPC gateway for Infobip's DELETE /provisioning/1/associations, holding its
/// 1 request/second budget per account for every caller.
#[derive(Debug, Parser)]
#[command(name = "provisioning-gateway", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the production gateway.
    Serve(Box<ServeArgs>),
    /// Run the built-in Infobip emulator (vendor validation, error bodies, 1 rps limit).
    MockUpstream(MockArgs),
    /// Run the gateway and the emulator together on loopback and print grpcurl commands to try.
    Demo(DemoArgs),
}

/// Flags of `serve`. The API key is read from `INFOBIP_API_KEY` (environment
/// only, so it never shows in a process list) or from `--api-key-file`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "GATEWAY_LISTEN", default_value_t = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Metrics and liveness HTTP listen address (/metrics, /healthz).
    #[arg(long, env = "GATEWAY_METRICS_LISTEN", default_value_t = defaults::METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// The Infobip account's base URL; /provisioning/1/associations is appended.
    #[arg(long, env = "INFOBIP_BASE_URL")]
    pub upstream_url: Option<String>,
    /// File holding the API key (a mounted Kubernetes Secret). Alternative to INFOBIP_API_KEY.
    #[arg(long, env = "INFOBIP_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Name of the account in metrics, logs, error details and its Redis key
    /// (two gateways for different Infobip accounts may share one Redis).
    #[arg(long, env = "GATEWAY_ACCOUNT_NAME", default_value = defaults::ACCOUNT_NAME)]
    pub account_name: String,
    /// TOML file of several accounts and bearer-token callers (replaces the
    /// single-account flags).
    #[arg(long, env = "GATEWAY_ACCOUNTS_FILE")]
    pub accounts_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the gRPC listener.
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mTLS); the
    /// caller is the certificate's URI SAN (SPIFFE ID), else its DNS SAN.
    #[arg(long, env = "GATEWAY_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Header a service mesh's sidecar sets to the caller's verified
    /// identity (`l5d-client-id` for Linkerd, `x-forwarded-client-cert` for
    /// Istio/Envoy: its URI=, else DNS=). The caller is then `mesh:<value>`.
    /// Only safe when the pod is reachable through the sidecar alone (see
    /// docs/deploying.md): anyone else can send the header.
    #[arg(long, env = "GATEWAY_MESH_IDENTITY_HEADER")]
    pub mesh_identity_header: Option<String>,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Longest time one upstream attempt may take (capped by the caller's deadline).
    #[arg(long, env = "GATEWAY_UPSTREAM_TIMEOUT", default_value_t = defaults::UPSTREAM_TIMEOUT.into(), value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// HTTP(S) proxy for the requests to Infobip. Without it the gateway
    /// connects directly and ignores HTTP_PROXY/HTTPS_PROXY/ALL_PROXY (a
    /// variable meant for something else must not reroute the API key).
    #[arg(long, env = "GATEWAY_UPSTREAM_PROXY")]
    pub upstream_proxy: Option<String>,
    /// Allow an http:// Infobip URL that is not loopback (the API key then
    /// crosses the network in clear). Only for a TLS-terminating proxy on a
    /// trusted network.
    #[arg(long, env = "GATEWAY_INSECURE_UPSTREAM")]
    pub insecure_upstream: bool,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value_t = defaults::SHUTDOWN_GRACE.into(), value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a finished batch operation is kept (GetOperation, ListOperations) before it is forgotten.
    #[arg(long, env = "GATEWAY_OPERATION_RETENTION", default_value_t = defaults::OPERATION_RETENTION.into(), value_parser = parse_duration)]
    pub operation_retention: Duration,
    /// Log format; default json unless stderr is a terminal.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Request ids (idempotency keys) kept in memory, the oldest forgotten
    /// first (memory backend, and the `local` fallback while Redis is lost).
    #[arg(long, env = "GATEWAY_IDEMPOTENCY_MAX_ENTRIES", default_value_t = defaults::IDEMPOTENCY_MAX_ENTRIES)]
    pub idempotency_max_entries: usize,
}

/// The per-account budget and its admission rules.
#[derive(Debug, Args, Clone)]
pub struct BudgetArgs {
    /// Upstream requests per second allowed per account (Infobip: 1).
    #[arg(long, env = "GATEWAY_RATE_PER_SECOND", default_value_t = defaults::RATE_PER_SECOND)]
    pub rate_per_second: u32,
    /// Requests that may go at once after an idle period.
    #[arg(long, env = "GATEWAY_BURST", default_value_t = defaults::BURST)]
    pub burst: u32,
    /// Added to the interval 1/rate so arrivals at Infobip, not departures, keep the spacing.
    #[arg(long, env = "GATEWAY_SAFETY_MARGIN", default_value_t = defaults::SAFETY_MARGIN.into(), value_parser = parse_duration)]
    pub safety_margin: Duration,
    /// Longest a call may wait for its turn before it is refused.
    #[arg(long, env = "GATEWAY_MAX_WAIT", default_value_t = defaults::MAX_WAIT.into(), value_parser = parse_duration)]
    pub max_wait: Duration,
    /// Most calls that may wait per account; more are refused at once.
    #[arg(long, env = "GATEWAY_MAX_QUEUE", default_value_t = defaults::MAX_QUEUE)]
    pub max_queue: usize,
    /// Least time a call must have left when its slot comes (for the upstream round trip).
    #[arg(long, env = "GATEWAY_UPSTREAM_RESERVE", default_value_t = defaults::UPSTREAM_RESERVE.into(), value_parser = parse_duration)]
    pub upstream_reserve: Duration,
}

/// Where the budget lives: in this process, or in Redis shared by every replica.
#[derive(Debug, Args, Clone)]
pub struct BackendArgs {
    /// `memory`: one replica holds the budget; `redis`: every replica shares it through Redis.
    #[arg(
        long,
        env = "GATEWAY_BUDGET_BACKEND",
        value_enum,
        default_value = "memory"
    )]
    pub budget_backend: BackendKind,
    /// Redis URL, required with `--budget-backend redis`. One endpoint (standalone or managed primary):
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`; Sentinel: `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`;
    /// Cluster: `redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]`. `rediss…` for TLS.
    #[arg(
        long,
        env = "GATEWAY_REDIS_URL",
        hide_env_values = true,
        verbatim_doc_comment
    )]
    pub redis_url: Option<String>,
    /// File holding the Redis password (a mounted Secret), re-read at every reconnect; instead of a password in the URL.
    #[arg(long, env = "GATEWAY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// Redis ACL user name (instead of the URL's).
    #[arg(long, env = "GATEWAY_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// File holding the sentinels' own password, where it differs from the data nodes' (empty file: sentinels without auth).
    #[arg(long, env = "GATEWAY_REDIS_SENTINEL_PASSWORD_FILE")]
    pub redis_sentinel_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the Redis servers' certificates (`rediss…` with a private CA); default: the Mozilla root store.
    #[arg(long, env = "GATEWAY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Prefix of the budget keys in Redis (the account name follows it) and of the `moved` channel.
    #[arg(
        long,
        env = "GATEWAY_REDIS_KEY_PREFIX",
        default_value = defaults::REDIS_KEY_PREFIX
    )]
    pub redis_key_prefix: String,
    /// While Redis is unreachable: `local` serves from a budget of rate / --expected-replicas per replica; `deny` answers UNAVAILABLE.
    #[arg(
        long,
        env = "GATEWAY_REDIS_FALLBACK",
        value_enum,
        default_value = "local"
    )]
    pub redis_fallback: RedisFallback,
    /// Replicas sharing the budget (the Deployment's replicas); divides the rate for the `local` fallback.
    #[arg(long, env = "GATEWAY_EXPECTED_REPLICAS", default_value_t = defaults::EXPECTED_REPLICAS)]
    pub expected_replicas: u32,
}

/// Where the budget lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Memory,
    Redis,
}

/// Flags of `mock-upstream`.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Address the emulator listens on.
    #[arg(long, env = "MOCK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The API key the emulator accepts (`Authorization: App <key>`); any key when absent.
    #[arg(long, env = "MOCK_API_KEY")]
    pub api_key: Option<String>,
    /// Requests per second the emulator allows per API key before answering 429.
    #[arg(long, env = "MOCK_RATE_PER_SECOND", default_value_t = 1)]
    pub rate_per_second: u32,
}

/// Flags of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// gRPC listen address of the demo gateway.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Metrics listen address of the demo gateway.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
}

/// Parses `10ms`, `1s`, `2m 30s`, … (humantime).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map(Duration::from)
        .map_err(|e| format!("{e} (expected e.g. 250ms, 10s, 1m)"))
}
