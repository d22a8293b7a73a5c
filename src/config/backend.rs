//! Where the budget lives: the `--budget-backend` flags, checked. Secrets in
//! them (the Redis password) never print.

use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

use url::Url;

use super::{ConfigError, defaults};

/// A Redis URL. It may carry a password, so `Debug` and `Display` show it
/// with the password replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Checks a `redis://` or `rediss://` URL. Problems are described without
    /// echoing the URL, which may hold a password.
    pub fn new(url: impl Into<String>) -> Result<Self, String> {
        let url = url.into().trim().to_owned();
        let parsed = Url::parse(&url).map_err(|e| format!("not a valid URL ({e})"))?;
        if !matches!(parsed.scheme(), "redis" | "rediss") {
            return Err("must start with redis:// or rediss:// (TLS)".into());
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        if redis::Client::open(url.as_str()).is_err() {
            return Err("is not a Redis URL the client accepts (redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB])".into());
        }
        Ok(Self(url))
    }

    /// The URL with its password, for the Redis client only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    fn redacted(&self) -> String {
        match Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                url.to_string()
            }
            Err(_) => "<redacted>".into(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

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
    Redis(RedisConfig),
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
        if self.ca.is_some() && !self.url.expose().starts_with("rediss://") {
            return Err(ConfigError::new(
                CA_FILE,
                "needs a rediss:// (TLS) --redis-url",
            ));
        }
        Ok(())
    }
}

const CA_FILE: &str = "--redis-ca-file (GATEWAY_REDIS_CA_FILE)";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_never_prints_its_password() {
        let url = RedisUrl::new("rediss://user:s3cr3t-pw@redis.example:6380/2").unwrap();
        let shown = format!("{url:?} {url}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("redis.example:6380"), "{shown}");
        assert_eq!(url.expose(), "rediss://user:s3cr3t-pw@redis.example:6380/2");
        for bad in [
            "http://x",
            "redis://",
            "redis://:s3cr3t@x:notaport",
            "redis://:s3cr3t@x/notadb",
        ] {
            let problem = RedisUrl::new(bad).unwrap_err();
            assert!(!problem.contains("s3cr3t"), "{problem}");
        }
    }
}
