//! Where the budget lives: the `--budget-backend` flags, checked. Secrets in
//! them (the Redis password) never print.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use super::redis_url::{RedisUrl, Topology};
use super::{ConfigError, defaults};

/// CA certificates (PEM) that verify the Redis server, for a private CA.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem(pub Vec<u8>);

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPem({} bytes)", self.0.len())
    }
}

/// What a replica does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisFallback {
    /// Serve from a per-replica budget of rate / expected replicas.
    Local,
    /// Refuse calls with UNAVAILABLE (BUDGET_BACKEND_UNAVAILABLE).
    Deny,
}

impl RedisFallback {
    /// The label used in logs and `/healthz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Deny => "deny",
        }
    }
}

/// Where the budget lives.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// In this process: right for one replica.
    Memory,
    /// In Redis, shared by every replica.
    Redis(Box<RedisConfig>),
}

/// The Redis backend, checked.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    pub url: RedisUrl,
    /// Trust these CAs for `rediss://` instead of the Mozilla root store.
    pub ca: Option<CaPem>,
    /// Keys are `<prefix><account name>`.
    pub key_prefix: String,
    pub fallback: RedisFallback,
    /// Replicas sharing the budget; the `local` fallback runs each at rate / this.
    pub expected_replicas: NonZeroU32,
    /// ACL user, instead of the URL's.
    pub username: Option<String>,
    /// File holding the password, re-read at every (re)connect (a mounted
    /// Secret that rotates); instead of a password in the URL.
    pub password_file: Option<PathBuf>,
    /// File holding the sentinels' own password, where it differs from the
    /// data nodes' (an empty file: sentinels without authentication).
    pub sentinel_password_file: Option<PathBuf>,
}

impl RedisConfig {
    /// Redis at `url` with the documented defaults (one replica, `local` fallback).
    pub fn new(url: RedisUrl) -> Self {
        Self {
            url,
            ca: None,
            key_prefix: defaults::REDIS_KEY_PREFIX.into(),
            fallback: RedisFallback::Local,
            expected_replicas: NonZeroU32::new(defaults::EXPECTED_REPLICAS)
                .unwrap_or(NonZeroU32::MIN),
            username: None,
            password_file: None,
            sentinel_password_file: None,
        }
    }

    /// Checks what the types cannot.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.key_prefix.is_empty() || self.key_prefix.len() > 200 {
            return Err(ConfigError::new(
                "--redis-key-prefix (GATEWAY_REDIS_KEY_PREFIX)",
                "must be 1 to 200 bytes long",
            ));
        }
        if self.ca.is_some() && !self.url.tls() {
            return Err(ConfigError::new(
                CA_FILE,
                "needs a TLS --redis-url (rediss://, rediss+sentinel:// or rediss+cluster://)",
            ));
        }
        if let Some(file) = &self.password_file {
            if self.url.has_password() {
                return Err(ConfigError::new(
                    PASSWORD_FILE,
                    "cannot be combined with a password in --redis-url (GATEWAY_REDIS_URL)",
                ));
            }
            read_secret(file).map_err(|p| ConfigError::new(PASSWORD_FILE, p))?;
        }
        if let Some(file) = &self.sentinel_password_file {
            if !matches!(self.url.topology(), Topology::Sentinel { .. }) {
                return Err(ConfigError::new(
                    SENTINEL_PASSWORD_FILE,
                    "needs a redis+sentinel:// (or rediss+sentinel://) --redis-url",
                ));
            }
            read_secret(file).map_err(|p| ConfigError::new(SENTINEL_PASSWORD_FILE, p))?;
        }
        if self.username.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "--redis-username (GATEWAY_REDIS_USERNAME)",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

const CA_FILE: &str = "--redis-ca-file (GATEWAY_REDIS_CA_FILE)";
const PASSWORD_FILE: &str = "--redis-password-file (GATEWAY_REDIS_PASSWORD_FILE)";
const SENTINEL_PASSWORD_FILE: &str =
    "--redis-sentinel-password-file (GATEWAY_REDIS_SENTINEL_PASSWORD_FILE)";

/// A password file's content: one line, surrounding whitespace dropped (a
/// Secret often ends in a newline). The error names the file, never the
/// content.
pub(crate) fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

impl CaPem {
    /// Reads the Redis CA file (`--redis-ca-file`).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        const SETTING: &str = CA_FILE;
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::new(SETTING, format!("cannot read {}: {e}", path.display()))
        })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(ConfigError::new(
                SETTING,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        Ok(Self(pem))
    }
}
