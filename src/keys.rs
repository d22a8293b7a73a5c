//! API keys: the secret type, where a key comes from, and the cell that holds
//! an account's current key while the process runs.
//!
//! Kubernetes updates a mounted Secret in place (an atomic symlink swap), so
//! file-sourced keys are re-read every few seconds and on SIGHUP ([`watch`]);
//! an attempt reads the key once, when it sends, so calls in flight finish
//! with the key they started with. A leaf: imports nothing of the crate.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often key files are re-read.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(2);

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
    pub(crate) fn expose(&self) -> &str {
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

/// Where an account's API key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key given once (`INFOBIP_API_KEY`, the demo, tests): never reloaded.
    Fixed(ApiKey),
    /// An environment variable, by name (accounts file `api_key_env`).
    Env(String),
    /// A file, re-read on reload (a mounted Secret).
    File(PathBuf),
}

impl KeySource {
    /// Reads the key; the error names the source, never the key.
    pub fn read(&self) -> Result<ApiKey, String> {
        match self {
            Self::Fixed(key) => Ok(key.clone()),
            Self::Env(name) => {
                let value = std::env::var(name)
                    .map_err(|_| format!("environment variable {name} is not set"))?;
                ApiKey::new(value).map_err(|p| format!("environment variable {name} {p}"))
            }
            Self::File(path) => {
                let value = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                ApiKey::new(value).map_err(|p| format!("{}: {p}", path.display()))
            }
        }
    }

    /// Where the key comes from, for logs (never the key).
    fn describe(&self) -> String {
        match self {
            Self::Fixed(_) => "a fixed key".into(),
            Self::Env(v) => format!("environment variable {v}"),
            Self::File(p) => format!("file {}", p.display()),
        }
    }
}

/// One account's current key and where it comes from.
#[derive(Debug)]
pub(crate) struct KeyCell {
    source: KeySource,
    current: RwLock<ApiKey>,
}

impl KeyCell {
    /// Reads the key for the first time; the error names the source.
    pub(crate) fn load(source: KeySource) -> Result<Self, String> {
        let key = source.read()?;
        Ok(Self {
            source,
            current: RwLock::new(key),
        })
    }

    /// The key to send now.
    pub(crate) fn current(&self) -> ApiKey {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the source; `Ok(true)` when the key changed. A source that
    /// became unreadable or empty keeps the old key (and says why).
    pub(crate) fn reload(&self) -> Result<bool, String> {
        if matches!(self.source, KeySource::Fixed(_)) {
            return Ok(false);
        }
        let key = self.source.read()?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if *current == key {
            return Ok(false);
        }
        *current = key;
        Ok(true)
    }
}

/// Reloads every key every [`RELOAD_EVERY`] and on SIGHUP, until dropped.
pub(crate) async fn watch(cells: Vec<(String, Arc<KeyCell>)>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let by_signal = tokio::select! {
            _ = tick.tick() => false,
            () = hangup => true,
        };
        for (account, cell) in &cells {
            match cell.reload() {
                Ok(true) => {
                    tracing::info!(account, source = %cell.source.describe(), "API key reloaded")
                }
                Ok(false) if by_signal => tracing::info!(account, "SIGHUP: API key unchanged"),
                Ok(false) => {}
                Err(problem) => {
                    tracing::warn!(account, %problem, "API key reload failed; keeping the current key")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey::new("s3cr3t-key").unwrap();
        assert!(!format!("{key:?} {key}").contains("s3cr3t"));
        let source = KeySource::Fixed(key);
        assert!(!format!("{source:?} {}", source.describe()).contains("s3cr3t"));
    }

    #[test]
    fn a_changed_file_is_picked_up_and_a_broken_one_keeps_the_old_key() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "first-key\n").unwrap();
        let cell = KeyCell::load(KeySource::File(file.path().into())).unwrap();
        assert_eq!(cell.current().expose(), "first-key");
        assert!(!cell.reload().unwrap());
        std::fs::write(file.path(), "second-key").unwrap();
        assert!(cell.reload().unwrap());
        assert_eq!(cell.current().expose(), "second-key");
        std::fs::write(file.path(), "").unwrap();
        let problem = cell.reload().unwrap_err();
        assert!(!problem.contains("second-key"), "{problem}");
        assert_eq!(cell.current().expose(), "second-key");
    }
}
