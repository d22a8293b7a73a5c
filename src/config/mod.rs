//! Typed, checked, inert configuration: what `serve` runs with. Everything is
//! validated in [`ConfigBuilder::build`], before any port is bound; a bad
//! setting becomes one [`ConfigError`] line naming it. No live state here (no
//! key cells, no clocks, no command-line types): the mechanisms build theirs
//! from this data. A leaf: imports only `keys` (the key source type).

use std::net::SocketAddr;
use std::time::Duration;

mod account;
mod accounts_file;
mod auth;
mod backend;
mod budget;
mod builder;
pub mod defaults;
mod redis_url;

pub(crate) use account::check_label;
pub use account::{AccountConfig, endpoint_url};
pub use accounts_file::{AccountsError, AccountsFile};
pub(crate) use auth::check_caller_name;
pub use auth::{AuthConfig, TlsConfig, TlsFiles, TokenCaller};
pub(crate) use backend::read_secret;
pub use backend::{BackendConfig, CaPem, RedisConfig, RedisFallback};
pub use budget::BudgetConfig;
pub use builder::ConfigBuilder;
pub use redis_url::{RedisUrl, Topology};

/// A refused setting: `setting` names the flag or variable, `problem` says why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Everything `serve` needs, checked. Built only through [`Config::builder`]
/// (or the command line, which uses it), so every setting has one home.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub accounts: Vec<AccountConfig>,
    /// The account of calls without `x-infobip-account` metadata.
    pub default_account: String,
    pub auth: AuthConfig,
    /// Default budget of every account, and the admission rules.
    pub budget: BudgetConfig,
    pub backend: BackendConfig,
    pub upstream_timeout: Duration,
    /// The HTTP(S) proxy upstream requests go through; `None`: straight to
    /// Infobip, whatever `HTTP(S)_PROXY` say.
    pub upstream_proxy: Option<url::Url>,
    /// `http://` upstreams beyond loopback are allowed (the key goes in clear).
    pub insecure_upstream: bool,
    pub shutdown_grace: Duration,
    pub log_format: Option<LogFormat>,
    /// Request ids (idempotency keys) kept in memory at most.
    pub idempotency_max_entries: usize,
    /// How long a done batch operation is kept before it is forgotten.
    pub operation_retention: Duration,
}

impl Config {
    /// A builder holding the documented defaults (the same as `serve --help`).
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Deadline of a call that sets none: the longest wait plus one attempt.
    pub(crate) fn default_deadline(&self) -> Duration {
        self.budget.max_wait + self.upstream_timeout
    }
}
