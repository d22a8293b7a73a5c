//! Where the budget lives: the `--budget-backend` flags, checked. Secrets in
//! them (the Redis password) never print.

use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

use url::Url;

use super::ConfigError;
use crate::budget::WallClock;
use crate::cli::{BackendArgs, BackendKind, RedisFallback};

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
    pub fn expose(&self) -> &str {
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

/// Where the budget lives.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// In this process: right for one replica.
    Memory,
    /// In Redis, shared by every replica.
    Redis(RedisConfig),
}

impl BackendConfig {
    /// The label used in metrics, logs and `/healthz`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Checks the backend flags.
    pub fn from_args(args: &BackendArgs) -> Result<Self, ConfigError> {
        const URL: &str = "--redis-url (GATEWAY_REDIS_URL)";
        let replicas = NonZeroU32::new(args.expected_replicas).ok_or_else(|| {
            ConfigError::new(
                "--expected-replicas (GATEWAY_EXPECTED_REPLICAS)",
                "must be at least 1",
            )
        })?;
        let url = args.redis_url.as_deref().filter(|u| !u.trim().is_empty());
        match (args.budget_backend, url) {
            (BackendKind::Memory, None) => Ok(Self::Memory),
            // A URL without the backend is most likely a forgotten setting; running
            // on per-replica budgets instead would multiply the vendor's rate.
            (BackendKind::Memory, Some(_)) => Err(ConfigError::new(
                URL,
                "is set but --budget-backend (GATEWAY_BUDGET_BACKEND) is memory: set it to redis, or unset the URL",
            )),
            (BackendKind::Redis, None) => Err(ConfigError::new(
                URL,
                "is required with --budget-backend redis",
            )),
            (BackendKind::Redis, Some(url)) => {
                let url = RedisUrl::new(url).map_err(|p| ConfigError::new(URL, p))?;
                let key_prefix = args.redis_key_prefix.clone();
                if key_prefix.is_empty() || key_prefix.len() > 200 {
                    return Err(ConfigError::new(
                        "--redis-key-prefix (GATEWAY_REDIS_KEY_PREFIX)",
                        "must be 1 to 200 bytes long",
                    ));
                }
                let ca = match &args.redis_ca_file {
                    None => None,
                    Some(path) => Some(ca_file(path, &url)?),
                };
                Ok(Self::Redis(RedisConfig {
                    url,
                    ca,
                    key_prefix,
                    fallback: args.redis_fallback,
                    expected_replicas: replicas,
                    clock: WallClock::system(),
                }))
            }
        }
    }
}

/// The Redis backend, checked.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: RedisUrl,
    /// Trust these CAs for `rediss://` instead of the Mozilla root store.
    pub ca: Option<CaPem>,
    /// Keys are `<prefix><account name>`.
    pub key_prefix: String,
    pub fallback: RedisFallback,
    /// Replicas sharing the budget; the `local` fallback runs each at rate / this.
    pub expected_replicas: NonZeroU32,
    /// This process' wall clock. Budget decisions never read it (they use Redis
    /// `TIME`); it only measures the skew reported in `/healthz`. Tests skew it.
    pub clock: WallClock,
}

/// Reads the Redis CA file; it only makes sense with TLS.
fn ca_file(path: &Path, url: &RedisUrl) -> Result<CaPem, ConfigError> {
    const SETTING: &str = "--redis-ca-file (GATEWAY_REDIS_CA_FILE)";
    if !url.expose().starts_with("rediss://") {
        return Err(ConfigError::new(
            SETTING,
            "needs a rediss:// (TLS) --redis-url",
        ));
    }
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(SETTING, format!("cannot read {}: {e}", path.display())))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError::new(
            SETTING,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(CaPem(pem))
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
