//! A real `redis-server` per test, on a free loopback port, with no
//! persistence. It can be killed (SIGKILL, like a crashed pod) and restarted
//! empty on the same port. The process dies with the value.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without a password.
    pub fn start() -> Self {
        Self::start_with(None, Vec::new())
    }

    /// Starts a server that requires `password`.
    pub fn with_password(password: &str) -> Self {
        Self::start_with(Some(password.to_owned()), Vec::new())
    }

    /// Starts a server with extra `redis-server` arguments (TLS tests).
    pub fn start_with(password: Option<String>, extra: Vec<String>) -> Self {
        // Another process may take a free port between the check and the
        // bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                port,
                password: password.clone(),
                dir: tempfile::tempdir().expect("a temp dir for redis-server"),
                extra: extra.clone(),
                child: None,
            };
            if server.spawn().is_ok() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A Redis store of the gateway's, connected to this server.
    pub async fn store(&self) -> std::sync::Arc<provisioning_gateway::testing::RedisStore> {
        use provisioning_gateway::config::{RedisConfig, RedisUrl};
        use provisioning_gateway::testing::{RedisStore, TIMEOUT};
        let config = RedisConfig::new(RedisUrl::new(self.url()).unwrap());
        let store = RedisStore::new(&config, TIMEOUT);
        store.connect().await.unwrap();
        std::sync::Arc::new(store)
    }

    /// `redis://[:password@]127.0.0.1:port`
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// [`Self::kill`] off the async runtime: the gateways under test share
    /// the test's runtime and must not stall while the process is reaped.
    pub async fn kill_async(mut self) -> Self {
        tokio::task::spawn_blocking(move || {
            self.kill();
            self
        })
        .await
        .expect("kill does not panic")
    }

    /// [`Self::restart`] off the async runtime (starting redis-server and
    /// waiting for its PING takes a while on a loaded machine).
    pub async fn restart_async(mut self) -> Self {
        tokio::task::spawn_blocking(move || {
            self.restart();
            self
        })
        .await
        .expect("restart panics only when redis-server cannot start")
    }

    /// Starts it again, empty, on the same port.
    // A child process is polled for a few ms: blocking is what is wanted.
    #[allow(clippy::disallowed_methods)]
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("redis-server did not restart on port {}: {e}", self.port),
            }
        }
    }

    #[allow(clippy::disallowed_methods)] // polls a child process, as `restart`
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH: the Redis tests need it (Debian/Ubuntu: \
                 apt-get install redis-server; scripts/test installs it)"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        self.child = Some(child);
        // Wait until it answers, or until the process has exited (port taken).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("redis-server exited with {status}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        Err("redis-server did not answer PING within 10 s".into())
    }

    /// Whether the server answers PING now.
    pub fn ping(&self) -> bool {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        let mut command = String::new();
        if let Some(p) = &self.password {
            command.push_str(&format!("AUTH {p}\r\n"));
        }
        command.push_str("PING\r\n");
        if conn.write_all(command.as_bytes()).is_err() {
            return false;
        }
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        if self.password.is_some() && (reader.read_line(&mut line).is_err() || line != "+OK\r\n") {
            return false;
        }
        line.clear();
        reader.read_line(&mut line).is_ok() && line == "+PONG\r\n"
    }

    /// The server's working directory (for TLS files).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with the
/// `openssl` CLI: (ca.crt, server.crt, server.key) in `dir`.
pub fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("the TLS test needs the openssl CLI on PATH: {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=gateway-test-ca",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}
