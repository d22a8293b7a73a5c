//! One Infobip account: where to send, with which key, under which name.

use std::num::NonZeroU32;

use url::Url;

use super::{BudgetConfig, ConfigError};
use crate::keys::KeySource;

/// The path Infobip serves the operation on, appended to the base URL.
const ASSOCIATIONS_PATH: &str = "provisioning/1/associations";

/// One account as configured.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AccountConfig {
    /// Bounded label used in metrics, logs, error details and the Redis key.
    pub name: String,
    /// Full URL of the associations endpoint.
    pub endpoint: Url,
    /// Where its API key comes from.
    pub key: KeySource,
    /// Overrides of the default budget.
    pub rate_per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
    /// Callers allowed to use the account; `None`: any caller.
    pub allowed_callers: Option<Vec<String>>,
}

impl AccountConfig {
    /// An account with the default budget, open to any caller.
    pub fn new(name: impl Into<String>, endpoint: Url, key: KeySource) -> Self {
        Self {
            name: name.into(),
            endpoint,
            key,
            rate_per_second: None,
            burst: None,
            allowed_callers: None,
        }
    }

    /// Only these callers may use the account.
    pub fn allowed_callers(mut self, callers: Vec<String>) -> Self {
        self.allowed_callers = Some(callers);
        self
    }

    /// This account's budget: the defaults with its overrides.
    pub(crate) fn budget(&self, defaults: &BudgetConfig) -> BudgetConfig {
        BudgetConfig {
            rate_per_second: self.rate_per_second.unwrap_or(defaults.rate_per_second),
            burst: self.burst.unwrap_or(defaults.burst),
            ..defaults.clone()
        }
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

/// A bounded label: 1–63 of A-Z a-z 0-9 - _ . (account and caller names in
/// metrics, logs and Redis keys).
pub(crate) fn check_label(name: &str) -> Result<(), &'static str> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 63 characters of A-Z, a-z, 0-9, '-', '_', '.'")
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
    fn names_are_bounded_labels() {
        assert!(check_label("acme-prod_1.eu").is_ok());
        for bad in ["", "a b", "ä", &"x".repeat(64)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }
}
