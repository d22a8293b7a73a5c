//! `serve`'s flags into a checked [`Config`]: what the flags mean together
//! (one account or an accounts file, where its key comes from, the backend)
//! is decided here; each value is checked by [`Config::builder`].

use std::path::Path;

use super::{BackendArgs, BackendKind, ServeArgs};
use crate::config::{
    AccountConfig, AccountsFile, BackendConfig, CaPem, Config, ConfigBuilder, ConfigError,
    RedisConfig, RedisUrl, TlsConfig, check_label, defaults, endpoint_url,
};
use crate::keys::{ApiKey, KeySource};

const ACCOUNTS_FILE: &str = "--accounts-file (GATEWAY_ACCOUNTS_FILE)";

impl ServeArgs {
    /// The checked configuration; `api_key_env` is the value of
    /// `INFOBIP_API_KEY` (passed in so tests need not touch the process env).
    pub fn config(&self, api_key_env: Option<String>) -> Result<Config, ConfigError> {
        let budget = &self.budget;
        let builder = Config::builder()
            .listen(self.listen)
            .metrics_listen(self.metrics_listen)
            .rate_per_second(budget.rate_per_second)
            .burst(budget.burst)
            .safety_margin(*budget.safety_margin)
            .max_wait(*budget.max_wait)
            .max_queue(budget.max_queue)
            .upstream_reserve(*budget.upstream_reserve)
            .upstream_timeout(*self.upstream_timeout)
            .upstream_proxy(self.proxy()?)
            .insecure_upstream(self.insecure_upstream)
            .shutdown_grace(*self.shutdown_grace)
            .operation_retention(*self.operation_retention)
            .log_format(self.log_format)
            .idempotency_max_entries(self.idempotency_max_entries)
            .tls(self.tls()?)
            .mesh_identity_header(
                self.mesh_identity_header
                    .as_deref()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty()),
            )
            .backend(self.backend.config()?);
        match &self.accounts_file {
            Some(path) => self.accounts_from_file(builder, api_key_env.as_deref(), path)?,
            None => builder.account(self.single_account(api_key_env)?),
        }
        .build()
    }

    /// The one account of `--upstream-url` and its key.
    fn single_account(&self, api_key_env: Option<String>) -> Result<AccountConfig, ConfigError> {
        const FILE: &str = "--api-key-file (INFOBIP_API_KEY_FILE)";
        let base = self.upstream_url.as_deref().ok_or_else(|| {
            ConfigError::new(
                "--upstream-url (INFOBIP_BASE_URL)",
                "is required (or --accounts-file)",
            )
        })?;
        let endpoint = endpoint_url(base)?;
        let key = match (
            api_key_env.filter(|k| !k.is_empty()),
            self.api_key_file.as_deref(),
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    FILE,
                    "set either INFOBIP_API_KEY or --api-key-file, not both",
                ));
            }
            // The environment cannot change under a running process: a fixed key.
            (Some(key), None) => KeySource::Fixed(
                ApiKey::new(key).map_err(|p| ConfigError::new("INFOBIP_API_KEY", p))?,
            ),
            (None, Some(path)) => {
                let source = KeySource::File(path.to_owned());
                source.read().map_err(|p| ConfigError::new(FILE, p))?;
                source
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "INFOBIP_API_KEY",
                    "an API key is required: set INFOBIP_API_KEY or --api-key-file",
                ));
            }
        };
        check_label(&self.account_name)
            .map_err(|p| ConfigError::new("--account-name (GATEWAY_ACCOUNT_NAME)", p))?;
        Ok(AccountConfig::new(&self.account_name, endpoint, key))
    }

    /// The accounts and callers of `--accounts-file`; the single-account
    /// settings must be unset.
    fn accounts_from_file(
        &self,
        mut builder: ConfigBuilder,
        api_key_env: Option<&str>,
        path: &Path,
    ) -> Result<ConfigBuilder, ConfigError> {
        let conflict = [
            (
                self.upstream_url.is_some(),
                "--upstream-url (INFOBIP_BASE_URL)",
            ),
            (
                self.api_key_file.is_some(),
                "--api-key-file (INFOBIP_API_KEY_FILE)",
            ),
            (
                api_key_env.is_some_and(|k| !k.is_empty()),
                "INFOBIP_API_KEY",
            ),
            (
                self.account_name != defaults::ACCOUNT_NAME,
                "--account-name (GATEWAY_ACCOUNT_NAME)",
            ),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name));
        if let Some(other) = conflict {
            return Err(ConfigError::new(
                ACCOUNTS_FILE,
                format!("cannot be combined with {other}: accounts come from the file"),
            ));
        }
        let file =
            AccountsFile::load(path).map_err(|e| ConfigError::new(ACCOUNTS_FILE, e.to_string()))?;
        for account in file.accounts {
            account.key.read().map_err(|p| {
                ConfigError::new(ACCOUNTS_FILE, format!("account {:?}: {p}", account.name))
            })?;
            builder = builder.account(account);
        }
        Ok(builder
            .default_account(file.default_account)
            .callers(file.callers))
    }

    /// `--upstream-proxy`, parsed.
    fn proxy(&self) -> Result<Option<url::Url>, ConfigError> {
        self.upstream_proxy
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                url::Url::parse(p).map_err(|e| {
                    ConfigError::new(
                        "--upstream-proxy (GATEWAY_UPSTREAM_PROXY)",
                        format!("not a valid URL ({e})"),
                    )
                })
            })
            .transpose()
    }

    /// The TLS files of the gRPC listener.
    fn tls(&self) -> Result<Option<TlsConfig>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        TlsConfig::read(cert, key, self.client_ca.as_deref()).map(Some)
    }
}

impl BackendArgs {
    /// Where the budget lives.
    fn config(&self) -> Result<BackendConfig, ConfigError> {
        const URL: &str = "--redis-url (GATEWAY_REDIS_URL)";
        const REPLICAS: &str = "--expected-replicas (GATEWAY_EXPECTED_REPLICAS)";
        let expected_replicas = std::num::NonZeroU32::new(self.expected_replicas)
            .ok_or_else(|| ConfigError::new(REPLICAS, "must be at least 1"))?;
        if self.expected_replicas > defaults::MAX_EXPECTED_REPLICAS {
            return Err(ConfigError::new(
                REPLICAS,
                format!("must be at most {}", defaults::MAX_EXPECTED_REPLICAS),
            ));
        }
        let url = self.redis_url.as_deref().filter(|u| !u.trim().is_empty());
        match (self.budget_backend, url) {
            (BackendKind::Memory, None) => {
                let redis_only = [
                    (
                        self.redis_password_file.is_some(),
                        "--redis-password-file (GATEWAY_REDIS_PASSWORD_FILE)",
                    ),
                    (
                        self.redis_username.is_some(),
                        "--redis-username (GATEWAY_REDIS_USERNAME)",
                    ),
                    (
                        self.redis_sentinel_password_file.is_some(),
                        "--redis-sentinel-password-file (GATEWAY_REDIS_SENTINEL_PASSWORD_FILE)",
                    ),
                    (
                        self.redis_ca_file.is_some(),
                        "--redis-ca-file (GATEWAY_REDIS_CA_FILE)",
                    ),
                ];
                match redis_only.into_iter().find(|(set, _)| *set) {
                    Some((_, setting)) => Err(ConfigError::new(
                        setting,
                        "is set but --budget-backend (GATEWAY_BUDGET_BACKEND) is memory",
                    )),
                    None => Ok(BackendConfig::Memory),
                }
            }
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
                let mut redis =
                    RedisConfig::new(RedisUrl::new(url).map_err(|p| ConfigError::new(URL, p))?);
                redis.key_prefix = self.redis_key_prefix.clone();
                redis.fallback = self.redis_fallback;
                redis.expected_replicas = expected_replicas;
                redis.ca = self.redis_ca_file.as_deref().map(CaPem::read).transpose()?;
                redis.username = self.redis_username.clone();
                redis.password_file = self.redis_password_file.clone();
                redis.sentinel_password_file = self.redis_sentinel_password_file.clone();
                Ok(BackendConfig::Redis(Box::new(redis)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command, ServeArgs};
    use clap::Parser;

    fn args(extra: &[&str]) -> ServeArgs {
        let argv = ["provisioning-gateway", "serve"].iter().chain(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => *args,
            _ => unreachable!("parsed a serve command line"),
        }
    }

    #[test]
    fn api_key_sources_are_exclusive_and_required() {
        let url = ["--upstream-url", "https://x.example"];
        let missing = args(&url).config(None).unwrap_err();
        assert!(missing.to_string().contains("INFOBIP_API_KEY"), "{missing}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "from-file\n").unwrap();
        let path = file.path().to_str().unwrap();
        let with_file = args(&[url[0], url[1], "--api-key-file", path]);
        let both = with_file.config(Some("k".into())).unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        let config = with_file.config(None).unwrap();
        let key = config.accounts[0].key.read().unwrap();
        assert_eq!(key.expose(), "from-file");
    }

    #[test]
    fn the_defaults_shown_are_the_builders() {
        let config = args(&["--upstream-url", "https://x.example"])
            .config(Some("k".into()))
            .unwrap();
        let built = crate::config::Config::builder()
            .account(config.accounts[0].clone())
            .build()
            .unwrap();
        assert_eq!(format!("{config:?}"), format!("{built:?}"));
    }

    #[test]
    fn the_accounts_file_replaces_the_single_account_flags() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "[[accounts]]\nname = \"a\"\nbase_url = \"https://a.example\"\napi_key_env = \"PG_TEST_UNSET_VARIABLE\"\n").unwrap();
        let path = file.path().to_str().unwrap();
        let both = args(&[
            "--accounts-file",
            path,
            "--upstream-url",
            "https://x.example",
        ])
        .config(None)
        .unwrap_err();
        assert!(
            both.to_string()
                .contains("cannot be combined with --upstream-url"),
            "{both}"
        );
        let unset = args(&["--accounts-file", path]).config(None).unwrap_err();
        assert!(
            unset
                .to_string()
                .contains("PG_TEST_UNSET_VARIABLE is not set"),
            "{unset}"
        );
    }
}
