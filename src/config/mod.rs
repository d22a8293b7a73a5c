//! Typed, checked configuration. Everything is validated here, before any port
//! is bound: a bad setting becomes one [`ConfigError`] line naming it.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use url::Url;

use crate::accounts::{Accounts, KeySource};
use crate::auth::TokenCaller;
use crate::cli::{BudgetArgs, LogFormat, ServeArgs};
use crate::keys::KeyCell;

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
    /// Bounded label used in metrics, logs, error details and the Redis key.
    pub name: String,
    /// Full URL of the associations endpoint.
    pub endpoint: Url,
    /// The current key; reloaded in place when its file changes.
    pub api_key: Arc<KeyCell>,
    /// Overrides of the default budget.
    pub rate_per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
    /// Callers allowed to use the account; `None`: any caller.
    pub allowed_callers: Option<Vec<String>>,
}

impl AccountConfig {
    /// An account with a fixed key and the default budget.
    pub fn new(name: impl Into<String>, endpoint: Url, api_key: ApiKey) -> Self {
        Self {
            name: name.into(),
            endpoint,
            api_key: Arc::new(KeyCell::fixed(api_key)),
            rate_per_second: None,
            burst: None,
            allowed_callers: None,
        }
    }

    /// This account's budget: the defaults with its overrides.
    pub fn budget(&self, defaults: &BudgetConfig) -> BudgetConfig {
        BudgetConfig {
            rate_per_second: self.rate_per_second.unwrap_or(defaults.rate_per_second),
            burst: self.burst.unwrap_or(defaults.burst),
            ..defaults.clone()
        }
    }
}

/// TLS on the gRPC listener, read from PEM files at startup.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mtls", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// How callers are identified.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub tls: Option<TlsConfig>,
    /// Bearer-token callers from the accounts file.
    pub callers: Vec<TokenCaller>,
}

impl AuthConfig {
    /// True when calls must prove who they are.
    pub fn required(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) || !self.callers.is_empty()
    }
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
    pub accounts: Vec<AccountConfig>,
    /// The account of calls without `x-infobip-account` metadata.
    pub default_account: String,
    pub auth: AuthConfig,
    /// Default budget of every account, and the admission rules.
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
        if args.upstream_timeout.is_zero() {
            return Err(ConfigError::new(
                "--upstream-timeout (GATEWAY_UPSTREAM_TIMEOUT)",
                "must be greater than zero",
            ));
        }
        let (accounts, default_account, callers) = match &args.accounts_file {
            Some(path) => accounts_from_file(args, api_key_env.as_deref(), path)?,
            None => {
                let account = single_account(args, api_key_env)?;
                let name = account.name.clone();
                (vec![account], name, Vec::new())
            }
        };
        let auth = AuthConfig {
            tls: tls(args)?,
            callers,
        };
        if !auth.required() && accounts.iter().any(|a| a.allowed_callers.is_some()) {
            return Err(ConfigError::new(
                "--accounts-file (GATEWAY_ACCOUNTS_FILE)",
                "allowed_callers needs caller authentication: --client-ca (mTLS) or [[callers]] tokens",
            ));
        }
        Ok(Self {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            accounts,
            default_account,
            auth,
            budget: BudgetConfig::from_args(&args.budget)?,
            backend: BackendConfig::from_args(&args.backend)?,
            upstream_timeout: args.upstream_timeout,
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
        })
    }

    /// The single account of the flags, with a fixed key (tests, demo, benches).
    pub fn account(&self) -> &AccountConfig {
        self.accounts
            .iter()
            .find(|a| a.name == self.default_account)
            .unwrap_or(&self.accounts[0])
    }
}

/// The one account of `--upstream-url` and its key.
fn single_account(
    args: &ServeArgs,
    api_key_env: Option<String>,
) -> Result<AccountConfig, ConfigError> {
    let base = args.upstream_url.as_deref().ok_or_else(|| {
        ConfigError::new(
            "--upstream-url (INFOBIP_BASE_URL)",
            "is required (or --accounts-file)",
        )
    })?;
    let endpoint = endpoint_url(base)?;
    let api_key = match (
        api_key_env.filter(|k| !k.is_empty()),
        args.api_key_file.as_deref(),
    ) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--api-key-file (INFOBIP_API_KEY_FILE)",
                "set either INFOBIP_API_KEY or --api-key-file, not both",
            ));
        }
        // The environment cannot change under a running process: a fixed key.
        (Some(key), None) => Arc::new(KeyCell::fixed(
            ApiKey::new(key).map_err(|p| ConfigError::new("INFOBIP_API_KEY", p))?,
        )),
        (None, Some(path)) => Arc::new(
            KeyCell::load(KeySource::File(path.to_owned()))
                .map_err(|p| ConfigError::new("--api-key-file (INFOBIP_API_KEY_FILE)", p))?,
        ),
        (None, None) => {
            return Err(ConfigError::new(
                "INFOBIP_API_KEY",
                "an API key is required: set INFOBIP_API_KEY or --api-key-file",
            ));
        }
    };
    Ok(AccountConfig {
        name: account_name(&args.account_name)?,
        endpoint,
        api_key,
        rate_per_second: None,
        burst: None,
        allowed_callers: None,
    })
}

type FromFile = (Vec<AccountConfig>, String, Vec<TokenCaller>);

/// The accounts of `--accounts-file`; the single-account settings must be unset.
fn accounts_from_file(
    args: &ServeArgs,
    api_key_env: Option<&str>,
    path: &Path,
) -> Result<FromFile, ConfigError> {
    const SETTING: &str = "--accounts-file (GATEWAY_ACCOUNTS_FILE)";
    let conflict = [
        (
            args.upstream_url.is_some(),
            "--upstream-url (INFOBIP_BASE_URL)",
        ),
        (
            args.api_key_file.is_some(),
            "--api-key-file (INFOBIP_API_KEY_FILE)",
        ),
        (
            api_key_env.is_some_and(|k| !k.is_empty()),
            "INFOBIP_API_KEY",
        ),
        (
            args.account_name != Config::DEFAULT_ACCOUNT,
            "--account-name (GATEWAY_ACCOUNT_NAME)",
        ),
    ]
    .into_iter()
    .find_map(|(set, name)| set.then_some(name));
    if let Some(other) = conflict {
        return Err(ConfigError::new(
            SETTING,
            format!("cannot be combined with {other}: accounts come from the file"),
        ));
    }
    let file = Accounts::load(path).map_err(|e| ConfigError::new(SETTING, e.to_string()))?;
    let mut accounts = Vec::with_capacity(file.accounts.len());
    for spec in file.accounts {
        let api_key = KeyCell::load(spec.key)
            .map_err(|p| ConfigError::new(SETTING, format!("account {:?}: {p}", spec.name)))?;
        accounts.push(AccountConfig {
            name: spec.name,
            endpoint: spec.endpoint,
            api_key: Arc::new(api_key),
            rate_per_second: spec.rate_per_second,
            burst: spec.burst,
            allowed_callers: spec.allowed_callers,
        });
    }
    Ok((accounts, file.default_account, file.callers))
}

/// The TLS files of the gRPC listener.
fn tls(args: &ServeArgs) -> Result<Option<TlsConfig>, ConfigError> {
    let read = |setting: &'static str, path: &Path| {
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::new(setting, format!("cannot read {}: {e}", path.display()))
        })?;
        if !pem.windows(10).any(|w| w == b"-----BEGIN") {
            return Err(ConfigError::new(
                setting,
                format!("{} holds no PEM block", path.display()),
            ));
        }
        Ok(pem)
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    Ok(Some(TlsConfig {
        cert: read("--tls-cert (GATEWAY_TLS_CERT)", cert)?,
        key: read("--tls-key (GATEWAY_TLS_KEY)", key)?,
        client_ca: args
            .client_ca
            .as_deref()
            .map(|ca| read("--client-ca (GATEWAY_CLIENT_CA)", ca))
            .transpose()?,
    }))
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

    fn args(extra: &[&str]) -> ServeArgs {
        use clap::Parser;
        let argv = ["provisioning-gateway", "serve"].iter().chain(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Serve(args) => *args,
            _ => unreachable!("parsed a serve command line"),
        }
    }

    #[test]
    fn api_key_sources_are_exclusive_and_required() {
        let url = ["--upstream-url", "https://x.example"];
        let missing = Config::from_args(&args(&url), None).unwrap_err();
        assert!(missing.to_string().contains("INFOBIP_API_KEY"), "{missing}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "from-file\n").unwrap();
        let path = file.path().to_str().unwrap();
        let both = Config::from_args(
            &args(&[url[0], url[1], "--api-key-file", path]),
            Some("k".into()),
        )
        .unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        let config =
            Config::from_args(&args(&[url[0], url[1], "--api-key-file", path]), None).unwrap();
        assert_eq!(config.account().api_key.current().expose(), "from-file");
    }

    #[test]
    fn the_accounts_file_replaces_the_single_account_flags() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "[[accounts]]\nname = \"a\"\nbase_url = \"https://a.example\"\napi_key_env = \"PG_TEST_UNSET_VARIABLE\"\n").unwrap();
        let path = file.path().to_str().unwrap();
        let both = Config::from_args(
            &args(&[
                "--accounts-file",
                path,
                "--upstream-url",
                "https://x.example",
            ]),
            None,
        )
        .unwrap_err();
        assert!(
            both.to_string()
                .contains("cannot be combined with --upstream-url"),
            "{both}"
        );
        let unset = Config::from_args(&args(&["--accounts-file", path]), None).unwrap_err();
        assert!(
            unset
                .to_string()
                .contains("PG_TEST_UNSET_VARIABLE is not set"),
            "{unset}"
        );
    }
}
