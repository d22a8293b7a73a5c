//! The accounts file (`--accounts-file`, TOML): several Infobip accounts,
//! each with its own budget, and the bearer-token callers. Unknown keys and
//! impossible values are refused with the file, line and key named.
//!
//! ```toml
//! default_account = "main"
//!
//! [[accounts]]
//! name = "main"
//! base_url = "https://xxxxx.api.infobip.com"
//! api_key_file = "/var/run/secrets/infobip/main"   # or api_key_env = "VAR"
//! rate_per_second = 1
//! burst = 1
//! allowed_callers = ["spiffe://cluster.local/ns/orders/sa/orders", "token:billing"]
//!
//! [[callers]]
//! name = "billing"
//! token_sha256 = "<hex SHA-256 of the token>"
//! weight = 1
//! ```

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::{AccountConfig, TokenCaller, check_caller_name, check_label, defaults, endpoint_url};
use crate::keys::KeySource;

/// A refusal naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid accounts file {file}:{line}: {key}: {problem}")]
pub struct AccountsError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub problem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default_account: Option<Spanned<String>>,
    #[serde(default)]
    accounts: Vec<Spanned<AccountEntry>>,
    #[serde(default)]
    callers: Vec<Spanned<CallerEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountEntry {
    name: Spanned<String>,
    base_url: Spanned<String>,
    api_key_file: Option<Spanned<PathBuf>>,
    api_key_env: Option<Spanned<String>>,
    rate_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    allowed_callers: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: Spanned<String>,
    token_sha256: Spanned<String>,
    weight: Option<Spanned<u32>>,
}

/// The whole file, checked.
#[derive(Debug, Clone)]
pub struct AccountsFile {
    pub default_account: String,
    pub accounts: Vec<AccountConfig>,
    pub callers: Vec<TokenCaller>,
}

impl AccountsFile {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, AccountsError> {
        let text = std::fs::read_to_string(path).map_err(|e| AccountsError {
            file: path.display().to_string(),
            line: 0,
            key: "--accounts-file (GATEWAY_ACCOUNTS_FILE)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and checks the text of an accounts file named `file`.
    pub fn parse(file: &str, text: &str) -> Result<Self, AccountsError> {
        let at = |span: std::ops::Range<usize>, key: &str, problem: String| AccountsError {
            file: file.to_owned(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
            key: key.to_owned(),
            problem,
        };
        let parsed: File = toml::from_str(text).map_err(|e| {
            let key = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("(syntax)")
                .to_owned();
            at(
                e.span().unwrap_or(0..0),
                &key,
                e.message().trim().to_owned(),
            )
        })?;

        let mut callers: Vec<TokenCaller> = Vec::new();
        for entry in &parsed.callers {
            let c = entry.get_ref();
            let name = label(&c.name).map_err(|p| at(c.name.span(), "callers.name", p))?;
            if callers.iter().any(|k| *k.name == *name) {
                return Err(at(
                    c.name.span(),
                    "callers.name",
                    format!("duplicate caller {name:?}"),
                ));
            }
            let token_sha256 = hex32(c.token_sha256.get_ref()).ok_or_else(|| {
                at(
                    c.token_sha256.span(),
                    "callers.token_sha256",
                    "must be 64 hex digits (SHA-256 of the token)".into(),
                )
            })?;
            let weight = within(c.weight.as_ref(), "callers.weight", MAX_WEIGHT, &at)?
                .unwrap_or(NonZeroU32::MIN);
            callers.push(TokenCaller {
                name: Arc::from(name),
                token_sha256,
                weight,
            });
        }

        let mut accounts: Vec<AccountConfig> = Vec::new();
        for entry in &parsed.accounts {
            let a = entry.get_ref();
            let name = label(&a.name).map_err(|p| at(a.name.span(), "accounts.name", p))?;
            if accounts.iter().any(|k| k.name == name) {
                return Err(at(
                    a.name.span(),
                    "accounts.name",
                    format!("duplicate account {name:?}"),
                ));
            }
            let endpoint = endpoint_url(a.base_url.get_ref())
                .map_err(|e| at(a.base_url.span(), "accounts.base_url", e.problem))?;
            let key = match (&a.api_key_file, &a.api_key_env) {
                (Some(f), None) => KeySource::File(f.get_ref().clone()),
                (None, Some(v)) if !v.get_ref().is_empty() => KeySource::Env(v.get_ref().clone()),
                (None, Some(v)) => {
                    return Err(at(
                        v.span(),
                        "accounts.api_key_env",
                        "must name a variable".into(),
                    ));
                }
                (Some(f), Some(_)) => {
                    return Err(at(
                        f.span(),
                        "accounts.api_key_file",
                        "set api_key_file or api_key_env, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(at(
                        entry.span(),
                        "accounts.api_key_file",
                        format!(
                            "account {name:?} needs api_key_file or api_key_env (keys are never inline)"
                        ),
                    ));
                }
            };
            let allowed_callers = a
                .allowed_callers
                .as_ref()
                .map(|list| list.get_ref().clone());
            if let Some(list) = &a.allowed_callers
                && list.get_ref().iter().any(|c| c.trim().is_empty())
            {
                return Err(at(
                    list.span(),
                    "accounts.allowed_callers",
                    "caller names must not be empty".into(),
                ));
            }
            if let Some(list) = &a.allowed_callers
                && let Some(problem) = list
                    .get_ref()
                    .iter()
                    .find_map(|c| check_caller_name(c).err())
            {
                return Err(at(list.span(), "accounts.allowed_callers", problem));
            }
            accounts.push(AccountConfig {
                name,
                endpoint,
                key,
                rate_per_second: within(
                    a.rate_per_second.as_ref(),
                    "accounts.rate_per_second",
                    defaults::MAX_RATE_PER_SECOND,
                    &at,
                )?,
                burst: within(a.burst.as_ref(), "accounts.burst", defaults::MAX_BURST, &at)?,
                allowed_callers,
            });
        }
        if accounts.is_empty() {
            return Err(at(
                0..0,
                "accounts",
                "at least one [[accounts]] entry is required".into(),
            ));
        }
        let default_account = match &parsed.default_account {
            Some(d) if accounts.iter().any(|a| a.name == *d.get_ref()) => d.get_ref().clone(),
            Some(d) => {
                return Err(at(
                    d.span(),
                    "default_account",
                    format!("names no account: {:?}", d.get_ref()),
                ));
            }
            None if accounts.len() == 1 => accounts[0].name.clone(),
            None => {
                return Err(at(
                    0..0,
                    "default_account",
                    "is required when there are several accounts".into(),
                ));
            }
        };
        Ok(Self {
            default_account,
            accounts,
            callers,
        })
    }
}

/// A bounded name (see [`check_label`]).
fn label(name: &Spanned<String>) -> Result<String, String> {
    check_label(name.get_ref())
        .map(|()| name.get_ref().clone())
        .map_err(str::to_owned)
}

/// Largest fair-share weight of a caller (turns per round).
const MAX_WEIGHT: u32 = 1000;

/// 1 ≤ value ≤ `max`.
fn within(
    value: Option<&Spanned<u32>>,
    key: &str,
    max: u32,
    at: &impl Fn(std::ops::Range<usize>, &str, String) -> AccountsError,
) -> Result<Option<NonZeroU32>, AccountsError> {
    value
        .map(|v| {
            let n = NonZeroU32::new(*v.get_ref())
                .ok_or_else(|| at(v.span(), key, "must be at least 1".into()))?;
            if n.get() > max {
                return Err(at(v.span(), key, format!("must be at most {max}")));
            }
            Ok(n)
        })
        .transpose()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
default_account = "main"

[[accounts]]
name = "main"
base_url = "https://abc.api.infobip.com"
api_key_file = "/var/run/secrets/infobip/main"
rate_per_second = 1
allowed_callers = ["spiffe://cluster.local/ns/orders/sa/orders", "token:billing"]

[[accounts]]
name = "marketing"
base_url = "https://def.api.infobip.com"
api_key_env = "MARKETING_KEY"

[[callers]]
name = "billing"
token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
weight = 2
"#;

    #[test]
    fn parses_the_documented_shape() {
        let a = AccountsFile::parse("accounts.toml", GOOD).unwrap();
        assert_eq!(a.default_account, "main");
        assert_eq!(a.accounts.len(), 2);
        assert_eq!(
            a.accounts[0].endpoint.as_str(),
            "https://abc.api.infobip.com/provisioning/1/associations"
        );
        assert_eq!(a.accounts[1].key, KeySource::Env("MARKETING_KEY".into()));
        assert_eq!(a.callers[0].weight.get(), 2);
    }

    #[test]
    fn refusals_name_file_line_and_key() {
        let cases = [
            (
                GOOD.replace("rate_per_second = 1", "rate_per_sec = 1"),
                8,
                "rate_per_sec",
            ),
            (
                GOOD.replace("rate_per_second = 1", "rate_per_second = 0"),
                8,
                "accounts.rate_per_second",
            ),
            (
                GOOD.replace("https://def.api", "ftp://def.api"),
                13,
                "accounts.base_url",
            ),
            (
                GOOD.replace("weight = 2", "weight = 0"),
                19,
                "callers.weight",
            ),
            (
                GOOD.replace("ba7816bf", "zz7816bf"),
                18,
                "callers.token_sha256",
            ),
            (
                GOOD.replace("default_account = \"main\"", "default_account = \"nope\""),
                2,
                "default_account",
            ),
            (
                GOOD.replace("api_key_env = \"MARKETING_KEY\"", "api_key = \"inline\""),
                14,
                "api_key",
            ),
        ];
        for (text, line, key) in cases {
            let e = AccountsFile::parse("accounts.toml", &text).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
            assert!(
                e.to_string().starts_with(&format!(
                    "invalid accounts file accounts.toml:{line}: {key}"
                )),
                "{e}"
            );
        }
    }
}
