//! The real binary as a child process (for signals, environment-driven
//! configuration and OTLP export), with its stderr log lines collected.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::API_KEY;

pub struct GatewayProcess {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl GatewayProcess {
    /// Starts `serve` against `upstream` with JSON logs and the extra
    /// environment; returns once it logs its bound address.
    pub async fn start(upstream: &str, env: &[(&str, &str)]) -> Self {
        let mut all = vec![("INFOBIP_BASE_URL", upstream), ("INFOBIP_API_KEY", API_KEY)];
        all.extend_from_slice(env);
        Self::start_with(&all).await
    }

    /// Starts `serve` with exactly this environment (plus JSON logs at info).
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env_clear()
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the binary starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr, metrics_addr) = loop {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("the gateway starts within 20 s")
                .unwrap()
                .unwrap_or_else(|| panic!("the gateway exited early: {:?}", logs.lock().unwrap()));
            logs.lock().unwrap().push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["message"] == "serving" {
                break (
                    v["grpc_addr"].as_str().unwrap().to_owned(),
                    v["metrics_addr"].as_str().unwrap().to_owned(),
                );
            }
        };
        let reader = tokio::spawn({
            let logs = Arc::clone(&logs);
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            }
        });
        Self {
            child,
            addr,
            metrics_addr,
            logs,
            reader,
        }
    }

    /// Waits until a log line contains `text`.
    pub async fn wait_for_log(&self, text: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.logs.lock().unwrap().iter().any(|l| l.contains(text)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {text:?} within {within:?}"
            );
            // Logs arrive through a pipe; look again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns the status and all log lines.
    pub async fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits within 20 s of SIGTERM")
            .unwrap();
        let _ = self.reader.await;
        let logs = self.logs.lock().unwrap().clone();
        (status, logs)
    }
}
