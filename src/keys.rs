//! API keys that change without a restart. Kubernetes updates a mounted
//! Secret in place (an atomic symlink swap), so file-sourced keys are re-read
//! every few seconds and on SIGHUP; a call reads the key once, when it sends,
//! so calls in flight finish with the key they started with.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::accounts::KeySource;
use crate::config::ApiKey;

/// How often key files are re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// One account's current key and where it comes from.
#[derive(Debug)]
pub struct KeyCell {
    source: KeySource,
    current: RwLock<ApiKey>,
}

impl KeyCell {
    /// Reads the key for the first time; the error names the source.
    pub fn load(source: KeySource) -> Result<Self, String> {
        let key = read(&source)?;
        Ok(Self {
            source,
            current: RwLock::new(key),
        })
    }

    /// A cell holding a fixed key (demo, tests).
    pub fn fixed(key: ApiKey) -> Self {
        Self {
            source: KeySource::Env(String::new()),
            current: RwLock::new(key),
        }
    }

    /// The key to send now.
    pub fn current(&self) -> ApiKey {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the source; `Ok(true)` when the key changed. A source that
    /// became unreadable or empty keeps the old key (and says why).
    pub fn reload(&self) -> Result<bool, String> {
        if matches!(&self.source, KeySource::Env(name) if name.is_empty()) {
            return Ok(false);
        }
        let key = read(&self.source)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if *current == key {
            return Ok(false);
        }
        *current = key;
        Ok(true)
    }

    /// Where the key comes from, for logs (never the key).
    pub fn describe(&self) -> String {
        match &self.source {
            KeySource::Env(v) => format!("environment variable {v}"),
            KeySource::File(p) => format!("file {}", p.display()),
        }
    }
}

fn read(source: &KeySource) -> Result<ApiKey, String> {
    match source {
        KeySource::Env(name) => {
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            ApiKey::new(value).map_err(|p| format!("environment variable {name} {p}"))
        }
        KeySource::File(path) => {
            let value = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            ApiKey::new(value).map_err(|p| format!("{}: {p}", path.display()))
        }
    }
}

/// Reloads every key every [`RELOAD_EVERY`] and on SIGHUP, until dropped.
pub async fn watch(cells: Vec<(String, Arc<KeyCell>)>) {
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
                Ok(true) => tracing::info!(account, source = %cell.describe(), "API key reloaded"),
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
