//! The accounts registry: everything the gateway holds per Infobip account
//! (its configuration, its line in front of the budget, its live API key),
//! built once at startup and looked up once per call.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::metadata::MetadataMap;

use super::status::CallError;
use crate::budget::{Backend, Line};
use crate::config::{AccountConfig, Config};
use crate::keys::KeyCell;
use crate::upstream::Target;

/// One account and its live state.
pub(crate) struct Account {
    pub(crate) config: AccountConfig,
    pub(crate) line: Arc<Line>,
    pub(crate) key: Arc<KeyCell>,
}

impl Account {
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// Where this account's upstream attempts go.
    pub(crate) fn target(&self) -> Target<'_> {
        Target {
            account: &self.config.name,
            url: &self.config.endpoint,
            key: &self.key,
        }
    }
}

/// Every configured account, by name.
pub(crate) struct Accounts {
    by_name: HashMap<String, Arc<Account>>,
    default: Arc<Account>,
}

impl Accounts {
    /// Each account's line on `backend` and its key, read for the first time.
    /// The error names the account whose key cannot be read.
    pub(crate) fn build(config: &Config, backend: &Backend) -> Result<Self, String> {
        let mut by_name = HashMap::with_capacity(config.accounts.len());
        for account in &config.accounts {
            let key = crate::keys::KeyCell::load(account.key.clone())
                .map_err(|p| format!("account {:?}: {p}", account.name))?;
            let line = backend.line(&account.name, &account.budget(&config.budget));
            let entry = Account {
                config: account.clone(),
                line,
                key: Arc::new(key),
            };
            by_name.insert(account.name.clone(), Arc::new(entry));
        }
        let default = by_name
            .get(&config.default_account)
            .cloned()
            .ok_or_else(|| format!("no account named {:?}", config.default_account))?;
        Ok(Self { by_name, default })
    }

    /// The account a call names with `x-infobip-account` (absent: the default).
    pub(crate) fn find(&self, metadata: &MetadataMap) -> Result<&Arc<Account>, CallError> {
        match metadata.get("x-infobip-account") {
            None => Some(&self.default),
            Some(name) => name.to_str().ok().and_then(|n| self.by_name.get(n)),
        }
        .ok_or(CallError::UnknownAccount)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.by_name.values()
    }
}
