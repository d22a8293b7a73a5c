//! Typed, checked configuration. Everything is validated here, before any port
//! is bound: a bad setting becomes one [`ConfigError`] line naming it.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use url::Url;

use crate::cli::{BudgetArgs, LogFormat, ServeArgs};

mod backend;

pub use backend::{BackendConfig, CaPem, RedisConfig, RedisUrl};

/// The path Infobip serves the operation on, appended to the base URL.
pub const ASSOCIATIONS_PATH: &str = "provisioning/1/associations";

/// A refused setting: `setting` names the flag or variable, `problem` says why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// An API key. Never printed: `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, refusing an empty one or one that cannot go in a header.
    pub fn new(key: impl Into<String>) -> Result<Self, &'static str> {
        let key = key.into().trim().to_owned();
        if key.is_empty() {
            return Err("is empty");
        }
        if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err("contains characters that cannot be sent in an HTTP header");
        }
        Ok(Self(key))
    }

    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One Infobip account: where to send, with which key, under which name.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Bounded label used in metrics, logs and error details.
    pub name: String,
    /// Full URL of the associations endpoint.
    pub endpoint: Url,
    pub api_key: ApiKey,
}

/// The per-account budget: GCRA interval, burst and admission limits.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub rate_per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub safety_margin: Duration,
    pub max_wait: Duration,
    pub max_queue: NonZeroUsize,
    pub upstream_reserve: Duration,
}

impl BudgetConfig {
    /// The emission interval T: 1/rate plus the safety margin.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.rate_per_second.get() + self.safety_margin
    }

    /// Checks the budget flags.
    pub fn from_args(args: &BudgetArgs) -> Result<Self, ConfigError> {
        let rate_per_second = NonZeroU32::new(args.rate_per_second).ok_or_else(|| {
            ConfigError::new(
                "--rate-per-second (GATEWAY_RATE_PER_SECOND)",
                "must be at least 1",
            )
        })?;
        if args.rate_per_second > 1000 {
            return Err(ConfigError::new(
                "--rate-per-second (GATEWAY_RATE_PER_SECOND)",
                "must be at most 1000",
            ));
        }
        let burst = NonZeroU32::new(args.burst)
            .ok_or_else(|| ConfigError::new("--burst (GATEWAY_BURST)", "must be at least 1"))?;
        let max_queue = NonZeroUsize::new(args.max_queue).ok_or_else(|| {
            ConfigError::new("--max-queue (GATEWAY_MAX_QUEUE)", "must be at least 1")
        })?;
        if args.safety_margin > Duration::from_secs(10) {
            return Err(ConfigError::new(
                "--safety-margin (GATEWAY_SAFETY_MARGIN)",
                "must be at most 10s",
            ));
        }
        if args.max_wait.is_zero() {
            return Err(ConfigError::new(
                "--max-wait (GATEWAY_MAX_WAIT)",
                "must be greater than zero",
            ));
        }
        Ok(Self {
            rate_per_second,
            burst,
            safety_margin: args.safety_margin,
            max_wait: args.max_wait,
            max_queue,
            upstream_reserve: args.upstream_reserve,
        })
    }
}

/// Everything `serve` needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub account: AccountConfig,
    pub budget: BudgetConfig,
    pub backend: BackendConfig,
    pub upstream_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Default name of the single account configured by the flags.
    pub const DEFAULT_ACCOUNT: &'static str = "default";

    /// Builds the config from parsed flags; `api_key_env` is the value of
    /// `INFOBIP_API_KEY` (passed in so tests need not touch the process env).
    pub fn from_args(args: &ServeArgs, api_key_env: Option<String>) -> Result<Self, ConfigError> {
        let base = args
            .upstream_url
            .as_deref()
            .ok_or_else(|| ConfigError::new("--upstream-url (INFOBIP_BASE_URL)", "is required"))?;
        let endpoint = endpoint_url(base)?;
        let api_key = api_key(api_key_env, args.api_key_file.as_deref())?;
        if args.upstream_timeout.is_zero() {
            return Err(ConfigError::new(
                "--upstream-timeout (GATEWAY_UPSTREAM_TIMEOUT)",
                "must be greater than zero",
            ));
        }
        Ok(Self {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            account: AccountConfig {
                name: account_name(&args.account_name)?,
                endpoint,
                api_key,
            },
            budget: BudgetConfig::from_args(&args.budget)?,
            backend: BackendConfig::from_args(&args.backend)?,
            upstream_timeout: args.upstream_timeout,
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
        })
    }
}

/// Checks a base URL and appends the associations path.
pub fn endpoint_url(base: &str) -> Result<Url, ConfigError> {
    const SETTING: &str = "--upstream-url (INFOBIP_BASE_URL)";
    let mut url = Url::parse(base)
        .map_err(|e| ConfigError::new(SETTING, format!("not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            SETTING,
            "must start with https:// (or http://)",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(SETTING, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(SETTING, "must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            SETTING,
            "must not have a query or fragment",
        ));
    }
    let path = format!("{}/{ASSOCIATIONS_PATH}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

/// An account name: a bounded label for metrics, logs, ErrorInfo and the Redis key.
fn account_name(name: &str) -> Result<String, ConfigError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(ConfigError::new(
            "--account-name (GATEWAY_ACCOUNT_NAME)",
            "must be 1 to 63 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ))
    }
}

fn api_key(env: Option<String>, file: Option<&Path>) -> Result<ApiKey, ConfigError> {
    const ENV: &str = "INFOBIP_API_KEY";
    const FILE: &str = "--api-key-file (INFOBIP_API_KEY_FILE)";
    match (env.filter(|k| !k.is_empty()), file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            FILE,
            "set either INFOBIP_API_KEY or --api-key-file, not both",
        )),
        (Some(key), None) => ApiKey::new(key).map_err(|p| ConfigError::new(ENV, p)),
        (None, Some(path)) => {
            let key = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(FILE, format!("cannot read {}: {e}", path.display()))
            })?;
            ApiKey::new(key).map_err(|p| ConfigError::new(FILE, format!("{}: {p}", path.display())))
        }
        (None, None) => Err(ConfigError::new(
            ENV,
            "an API key is required: set INFOBIP_API_KEY or --api-key-file",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_appends_the_associations_path() {
        let url = endpoint_url("https://abc.api.infobip.com").unwrap();
        assert_eq!(
            url.as_str(),
            "https://abc.api.infobip.com/provisioning/1/associations"
        );
        let url = endpoint_url("http://127.0.0.1:9/base/").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/base/provisioning/1/associations"
        );
    }

    #[test]
    fn endpoint_refuses_bad_urls() {
        for bad in [
            "not a url",
            "ftp://x",
            "https://user:pw@x",
            "https://x/?a=b",
        ] {
            let err = endpoint_url(bad).unwrap_err();
            assert!(err.to_string().contains("INFOBIP_BASE_URL"), "{err}");
        }
    }

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey::new("s3cr3t-key").unwrap();
        assert!(!format!("{key:?} {key}").contains("s3cr3t"));
    }

    #[test]
    fn account_names_are_bounded_labels() {
        assert_eq!(account_name("acme-prod_1.eu").unwrap(), "acme-prod_1.eu");
        for bad in ["", "a b", "ä", &"x".repeat(64)] {
            assert!(account_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn api_key_sources_are_exclusive_and_required() {
        assert!(
            api_key(None, None)
                .unwrap_err()
                .to_string()
                .contains("INFOBIP_API_KEY")
        );
        let both = api_key(Some("k".into()), Some(Path::new("/x"))).unwrap_err();
        assert!(both.to_string().contains("not both"));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "from-file\n").unwrap();
        assert_eq!(
            api_key(None, Some(file.path())).unwrap().expose(),
            "from-file"
        );
    }
}
