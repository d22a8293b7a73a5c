//! The one way to make a [`Config`]: the command line, the demo, tests,
//! benchmarks and examples all set what differs from the defaults and call
//! [`ConfigBuilder::build`], which checks everything.

use std::net::SocketAddr;
use std::time::Duration;

use super::auth::check_mesh_header;
use super::budget::{BudgetSettings, at_most, duration_at_most};
use super::{
    AccountConfig, AuthConfig, BackendConfig, BudgetConfig, Config, ConfigError, LogFormat,
    RedisConfig, TlsConfig, TokenCaller, check_caller_name, check_label, defaults,
};

/// Settings on their way to a [`Config`]; starts from [`defaults`].
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    accounts: Vec<AccountConfig>,
    default_account: Option<String>,
    auth: AuthConfig,
    budget: BudgetSettings,
    backend: BackendConfig,
    upstream_timeout: Duration,
    upstream_proxy: Option<url::Url>,
    insecure_upstream: bool,
    shutdown_grace: Duration,
    log_format: Option<LogFormat>,
    idempotency_max_entries: usize,
    operation_retention: Duration,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self {
            listen: defaults::LISTEN,
            metrics_listen: defaults::METRICS_LISTEN,
            accounts: Vec::new(),
            default_account: None,
            auth: AuthConfig::default(),
            budget: BudgetSettings {
                rate_per_second: defaults::RATE_PER_SECOND,
                burst: defaults::BURST,
                safety_margin: defaults::SAFETY_MARGIN,
                max_wait: defaults::MAX_WAIT,
                max_queue: defaults::MAX_QUEUE,
                upstream_reserve: defaults::UPSTREAM_RESERVE,
            },
            backend: BackendConfig::Memory,
            upstream_timeout: defaults::UPSTREAM_TIMEOUT,
            upstream_proxy: None,
            insecure_upstream: false,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            log_format: None,
            idempotency_max_entries: defaults::IDEMPOTENCY_MAX_ENTRIES,
            operation_retention: defaults::OPERATION_RETENTION,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$($field).+ = value;
            self
        }
    )*};
}

impl ConfigBuilder {
    setters! {
        /// gRPC listen address (port 0: any free port).
        listen: SocketAddr => listen;
        /// `/metrics` and `/healthz` listen address.
        metrics_listen: SocketAddr => metrics_listen;
        /// TLS on the gRPC listener (mTLS with a client CA).
        tls: Option<TlsConfig> => auth.tls;
        /// Bearer-token callers.
        callers: Vec<TokenCaller> => auth.callers;
        /// The header a service mesh's sidecar sets to the caller's identity.
        mesh_identity_header: Option<String> => auth.mesh_header;
        /// Upstream requests per second per account.
        rate_per_second: u32 => budget.rate_per_second;
        /// Requests that may go at once after idling.
        burst: u32 => budget.burst;
        /// Added to 1/rate.
        safety_margin: Duration => budget.safety_margin;
        /// Longest wait for a turn.
        max_wait: Duration => budget.max_wait;
        /// Waiting callers per account.
        max_queue: usize => budget.max_queue;
        /// Least time a call must have left when its slot comes.
        upstream_reserve: Duration => budget.upstream_reserve;
        /// Where the budget lives.
        backend: BackendConfig => backend;
        /// Longest upstream attempt.
        upstream_timeout: Duration => upstream_timeout;
        /// The HTTP(S) proxy for upstream requests (`None`: none, whatever
        /// the environment says).
        upstream_proxy: Option<url::Url> => upstream_proxy;
        /// Allow `http://` upstreams beyond loopback.
        insecure_upstream: bool => insecure_upstream;
        /// Drain time after SIGTERM/SIGINT.
        shutdown_grace: Duration => shutdown_grace;
        /// Log format; `None`: json, or text on a terminal.
        log_format: Option<LogFormat> => log_format;
        /// Request ids kept in memory at most.
        idempotency_max_entries: usize => idempotency_max_entries;
        /// How long a done batch operation is kept.
        operation_retention: Duration => operation_retention;
    }

    /// Adds an account; the first one is the default unless
    /// [`Self::default_account`] names another.
    pub fn account(mut self, account: AccountConfig) -> Self {
        self.accounts.push(account);
        self
    }

    /// The account of calls without `x-infobip-account` metadata.
    pub fn default_account(mut self, name: impl Into<String>) -> Self {
        self.default_account = Some(name.into());
        self
    }

    /// The budget on Redis, shared by every replica.
    pub fn redis(self, redis: RedisConfig) -> Self {
        self.backend(BackendConfig::Redis(Box::new(redis)))
    }

    /// Checks every setting; the first problem found is named.
    pub fn build(self) -> Result<Config, ConfigError> {
        const ACCOUNTS: &str = "--accounts-file (GATEWAY_ACCOUNTS_FILE)";
        const TIMEOUT: &str = "--upstream-timeout (GATEWAY_UPSTREAM_TIMEOUT)";
        if self.upstream_timeout.is_zero() {
            return Err(ConfigError::new(TIMEOUT, "must be greater than zero"));
        }
        duration_at_most(
            TIMEOUT,
            self.upstream_timeout,
            defaults::MAX_UPSTREAM_TIMEOUT,
        )?;
        duration_at_most(
            "--shutdown-grace (GATEWAY_SHUTDOWN_GRACE)",
            self.shutdown_grace,
            defaults::MAX_SHUTDOWN_GRACE,
        )?;
        const ENTRIES: &str = "--idempotency-max-entries (GATEWAY_IDEMPOTENCY_MAX_ENTRIES)";
        if self.idempotency_max_entries == 0 {
            return Err(ConfigError::new(ENTRIES, "must be at least 1"));
        }
        at_most(
            ENTRIES,
            self.idempotency_max_entries,
            defaults::MAX_IDEMPOTENCY_MAX_ENTRIES,
        )?;
        const RETENTION: &str = "--operation-retention (GATEWAY_OPERATION_RETENTION)";
        if self.operation_retention < Duration::from_secs(1) {
            return Err(ConfigError::new(RETENTION, "must be at least 1s"));
        }
        duration_at_most(
            RETENTION,
            self.operation_retention,
            defaults::MAX_OPERATION_RETENTION,
        )?;
        let budget = BudgetConfig::check(&self.budget)?;
        if let BackendConfig::Redis(redis) = &self.backend {
            redis.check()?;
        }
        let Some(first) = self.accounts.first() else {
            return Err(ConfigError::new(
                "--upstream-url (INFOBIP_BASE_URL)",
                "is required (or --accounts-file)",
            ));
        };
        let names_setting = if self.accounts.len() == 1 {
            "--account-name (GATEWAY_ACCOUNT_NAME)"
        } else {
            ACCOUNTS
        };
        for (i, account) in self.accounts.iter().enumerate() {
            check_label(&account.name).map_err(|p| ConfigError::new(names_setting, p))?;
            // The accounts file checks these with file:line; an account built
            // in code meets the same bounds.
            if let Some(rate) = account.rate_per_second {
                at_most(ACCOUNTS, rate.get(), defaults::MAX_RATE_PER_SECOND)?;
            }
            if let Some(burst) = account.burst {
                at_most(ACCOUNTS, burst.get(), defaults::MAX_BURST)?;
            }
            if account.endpoint.scheme() == "http" && !self.insecure_upstream {
                let setting = if self.accounts.len() == 1 {
                    "--upstream-url (INFOBIP_BASE_URL)"
                } else {
                    ACCOUNTS
                };
                if !is_loopback(&account.endpoint) {
                    return Err(ConfigError::new(
                        setting,
                        format!(
                            "account {:?}: http:// would send the API key in clear; use https:// \
                             (http:// only to loopback, or with --insecure-upstream)",
                            account.name
                        ),
                    ));
                }
            }
            if self.accounts[..i].iter().any(|a| a.name == account.name) {
                return Err(ConfigError::new(
                    ACCOUNTS,
                    format!("duplicate account {:?}", account.name),
                ));
            }
        }
        let default_account = self.default_account.unwrap_or_else(|| first.name.clone());
        if !self.accounts.iter().any(|a| a.name == default_account) {
            return Err(ConfigError::new(
                ACCOUNTS,
                format!("default_account names no account: {default_account:?}"),
            ));
        }
        if !self.auth.required() && self.accounts.iter().any(|a| a.allowed_callers.is_some()) {
            return Err(ConfigError::new(
                ACCOUNTS,
                "allowed_callers needs caller authentication: --client-ca (mTLS), [[callers]] tokens or --mesh-identity-header",
            ));
        }
        let allowed = self
            .accounts
            .iter()
            .flat_map(|a| a.allowed_callers.iter().flatten());
        for name in allowed {
            check_caller_name(name).map_err(|p| ConfigError::new(ACCOUNTS, p))?;
        }
        if let Some(header) = &self.auth.mesh_header {
            check_mesh_header(header).map_err(|p| {
                ConfigError::new("--mesh-identity-header (GATEWAY_MESH_IDENTITY_HEADER)", p)
            })?;
        }
        if let Some(proxy) = &self.upstream_proxy
            && !matches!(proxy.scheme(), "http" | "https")
        {
            return Err(ConfigError::new(
                "--upstream-proxy (GATEWAY_UPSTREAM_PROXY)",
                "must be an http:// or https:// proxy URL",
            ));
        }
        Ok(Config {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            accounts: self.accounts,
            default_account,
            auth: self.auth,
            budget,
            backend: self.backend,
            upstream_timeout: self.upstream_timeout,
            upstream_proxy: self.upstream_proxy,
            insecure_upstream: self.insecure_upstream,
            shutdown_grace: self.shutdown_grace,
            log_format: self.log_format,
            idempotency_max_entries: self.idempotency_max_entries,
            operation_retention: self.operation_retention,
        })
    }
}

/// Whether `url` names this machine (127.0.0.0/8, ::1, `localhost`): an
/// `http://` upstream there never crosses a network.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost") || name.ends_with(".localhost")
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::endpoint_url;
    use crate::keys::{ApiKey, KeySource};

    fn account(name: &str) -> AccountConfig {
        let key = KeySource::Fixed(ApiKey::new("k").unwrap());
        AccountConfig::new(name, endpoint_url("https://x.example").unwrap(), key)
    }

    #[test]
    fn the_first_account_is_the_default_and_defaults_apply() {
        let c = Config::builder()
            .account(account("a"))
            .account(account("b"))
            .build()
            .unwrap();
        assert_eq!(c.default_account, "a");
        assert_eq!(c.budget.max_wait, defaults::MAX_WAIT);
        assert_eq!(c.budget.interval(), Duration::from_millis(1010));
        assert_eq!(
            c.default_deadline(),
            defaults::MAX_WAIT + defaults::UPSTREAM_TIMEOUT
        );
    }

    #[test]
    fn http_upstreams_only_to_loopback_unless_insecure() {
        let at = |url: &str| {
            let key = KeySource::Fixed(ApiKey::new("k").unwrap());
            Config::builder().account(AccountConfig::new("a", endpoint_url(url).unwrap(), key))
        };
        for ok in [
            "https://x.example",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "http://localhost:8080",
        ] {
            assert!(at(ok).build().is_ok(), "{ok}");
        }
        let e = at("http://x.example").build().unwrap_err();
        assert!(e.setting.starts_with("--upstream-url"), "{e}");
        assert!(e.problem.contains("--insecure-upstream"), "{e}");
        assert!(
            at("http://x.example")
                .insecure_upstream(true)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn allowed_callers_name_their_identity_source() {
        let token = TokenCaller::with_token("billing", "t", std::num::NonZeroU32::MIN);
        let with = |name: &str| {
            Config::builder()
                .account(account("a").allowed_callers(vec![name.into()]))
                .callers(vec![token.clone()])
                .build()
        };
        for ok in [
            "token:billing",
            "dns:billing.svc",
            "mesh:x",
            "spiffe://c/ns/a/sa/b",
        ] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        for ambiguous in ["billing", "token:", "://x"] {
            let e = with(ambiguous).unwrap_err();
            assert!(e.problem.contains("token:NAME"), "{ambiguous}: {e}");
        }
    }

    #[test]
    fn each_refusal_names_its_setting() {
        let cases: [(ConfigBuilder, &str); 8] = [
            (Config::builder(), "--upstream-url"),
            (Config::builder().account(account("a b")), "--account-name"),
            (
                Config::builder()
                    .account(account("a"))
                    .account(account("a")),
                "--accounts-file",
            ),
            (
                Config::builder().account(account("a")).default_account("z"),
                "--accounts-file",
            ),
            (
                Config::builder().account(account("a").allowed_callers(vec!["token:x".into()])),
                "--accounts-file",
            ),
            (
                Config::builder()
                    .account(account("a"))
                    .upstream_timeout(Duration::ZERO),
                "--upstream-timeout",
            ),
            (
                Config::builder()
                    .account(account("a"))
                    .mesh_identity_header(Some("authorization".into())),
                "--mesh-identity-header",
            ),
            (
                Config::builder()
                    .account(account("a"))
                    .mesh_identity_header(Some("L5d Client".into())),
                "--mesh-identity-header",
            ),
        ];
        for (builder, setting) in cases {
            let e = builder.build().unwrap_err();
            assert!(e.setting.starts_with(setting), "{e}");
        }
    }
}
