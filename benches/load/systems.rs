//! What the scenarios start, all on 127.0.0.1: a fast upstream answering 204,
//! a bare tonic echo server, the Infobip emulator, and the gateway itself,
//! in process (`App::build`, as the tests do) or as the release binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use provisioning_gateway::cli::{Cli, Command};
use provisioning_gateway::config::Config;

use crate::harness::API_KEY;
use provisioning_gateway::mock::{Mock, MockConfig};
use provisioning_gateway::pb::association_service_server::{
    AssociationService, AssociationServiceServer,
};
use provisioning_gateway::pb::{
    BatchDeleteAssociationsRequest, DeleteAssociationRequest, DeleteAssociationResponse,
};
use provisioning_gateway::proto::google::longrunning::Operation;
use provisioning_gateway::startup::App;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Budget flags under which the budget never refuses nor delays a call in a
/// benchmark run: 1000/s (the highest allowed rate), no margin, a burst of a
/// billion slots.
pub const UNLIMITED: &[&str] = &[
    "--rate-per-second",
    "1000",
    "--burst",
    "1000000000",
    "--safety-margin",
    "0ms",
    "--max-queue",
    "100000",
];

/// The upstream for overhead runs: answers every DELETE with 204 at once, and
/// counts them.
pub async fn fast_upstream() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    let router = axum::Router::new().route(
        provisioning_gateway::mock::PATH,
        axum::routing::delete(move |_body: axum::body::Bytes| {
            counter.fetch_add(1, Ordering::Relaxed);
            std::future::ready(axum::http::StatusCode::NO_CONTENT)
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((addr, count))
}

/// The gateway's own service shape with nothing behind it: the bare cost of a
/// tonic unary call with identical messages.
struct Echo;

#[tonic::async_trait]
impl AssociationService for Echo {
    async fn delete_association(
        &self,
        _request: Request<DeleteAssociationRequest>,
    ) -> Result<Response<DeleteAssociationResponse>, Status> {
        Ok(Response::new(DeleteAssociationResponse {}))
    }

    async fn batch_delete_associations(
        &self,
        _request: Request<BatchDeleteAssociationsRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented("not part of this system"))
    }
}

/// `service` on a bare tonic server (as `Server::serve` sets it up, with the
/// gateway's stream limit) on a free loopback port.
async fn bare_server(service: impl AssociationService) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1024))
            .add_service(AssociationServiceServer::new(service))
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

/// A bare tonic server with the echo service.
pub async fn echo_server() -> anyhow::Result<SocketAddr> {
    bare_server(Echo).await
}

/// The two hops joined with nothing else: a bare tonic server whose handler
/// sends the direct HTTP request and answers when it returns. What joining
/// the hops in one process costs before any gateway logic (a diagnostic).
struct Chain(crate::harness::Target);

#[tonic::async_trait]
impl AssociationService for Chain {
    async fn delete_association(
        &self,
        _request: Request<DeleteAssociationRequest>,
    ) -> Result<Response<DeleteAssociationResponse>, Status> {
        self.0.call(0).await;
        Ok(Response::new(DeleteAssociationResponse {}))
    }

    async fn batch_delete_associations(
        &self,
        _request: Request<BatchDeleteAssociationsRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented("not part of this system"))
    }
}

/// [`Chain`] on a bare tonic server, in front of `upstream`.
pub async fn chain_server(upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
    bare_server(Chain(crate::harness::Target::http(upstream)?)).await
}

/// The Infobip emulator enforcing `rate_per_second` (any API key).
pub async fn emulator(rate_per_second: u32) -> anyhow::Result<(Mock, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mock = Mock::new(MockConfig {
        api_key: None,
        rate_per_second,
    });
    tokio::spawn(mock.clone().serve(listener, std::future::pending()));
    Ok((mock, addr))
}

/// The emulator as a host of its own: its own thread and single-threaded
/// runtime, so the load tool's callers never delay the moment it stamps an
/// arrival (on the callers' runtime a stamp can come 10 ms late, and its
/// own limiter then answers 429 to a request the gateway spaced correctly).
/// Stops when the returned guard drops.
pub fn emulator_apart(
    rate_per_second: u32,
) -> anyhow::Result<(Mock, SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let mock = Mock::new(MockConfig {
        api_key: None,
        rate_per_second,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = mock.clone();
    drop(on_own_thread(async move {
        let listener = TcpListener::from_std(listener)?;
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    }));
    Ok((mock, addr, stop))
}

/// Runs `work` on a thread and single-threaded runtime of its own.
pub fn on_own_thread<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
            .block_on(work)
    })
}

/// `serve` flags, parsed exactly as the binary parses them.
pub fn config(upstream: SocketAddr, flags: &[&str]) -> anyhow::Result<Config> {
    let url = format!("http://{upstream}");
    let mut argv = vec![
        "provisioning-gateway",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream-url",
        &url,
    ];
    argv.extend_from_slice(flags);
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command else {
        unreachable!("the argv names the serve subcommand")
    };
    Ok(args.config(Some(API_KEY.into()))?)
}

/// The gateway in this process, as the tests run it; returns its gRPC address.
pub async fn gateway_in_process(
    upstream: SocketAddr,
    flags: &[&str],
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let app = App::build(config(upstream, flags)?).await?;
    let addrs = (app.grpc_addr(), app.metrics_addr());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Ok(addrs)
}

/// Where results, logs and pictures go: `target/bench-results/`.
pub fn results_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("bench-results");
    let _ = std::fs::create_dir_all(dir.join("logs"));
    dir
}

/// The release binary (`serve`) as a child process, logging JSON at `info`
/// (its production default) to `target/bench-results/logs/<name>.log`, with
/// the image's malloc setting.
pub struct GatewayBin {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

impl GatewayBin {
    pub async fn start(
        name: &str,
        upstream: SocketAddr,
        flags: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let log = results_dir().join("logs").join(format!("{name}.log"));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(flags)
        .env_clear()
        .env("RUST_LOG", "info")
        // As the image sets it (deploy/Dockerfile): large buffers always
        // go back to the system when freed.
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true);
        // An accounts file names the upstreams and keys itself (and refuses
        // the single-account settings next to it).
        if !flags.contains(&"--accounts-file") {
            cmd.env("INFOBIP_BASE_URL", format!("http://{upstream}"))
                .env("INFOBIP_API_KEY", API_KEY);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("cannot start the gateway binary")?;
        // The binary logs its bound addresses once it has bound them.
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(v) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "serving")
            {
                let addr = |k: &str| v[k].as_str().unwrap_or_default().parse();
                return Ok(Self {
                    child,
                    addr: addr("grpc_addr")?,
                    metrics_addr: addr("metrics_addr")?,
                });
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the gateway did not start within 20 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn stop(mut self) {
        let pid = self.pid().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let path = if pid == 0 {
        "/proc/self/status".to_owned()
    } else {
        format!("/proc/{pid}/status")
    };
    let status = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One sample of a Prometheus metric from the gateway's `/metrics`
/// (the first series whose name matches, labels ignored).
pub async fn scrape(metrics_addr: SocketAddr, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A bare tonic server whose handler never answers: what holding a pending
/// unary call costs tonic and hyper alone (the floor under the memory
/// figure). Runs in a child process of the load tool (`park-server`), so its
/// resident set is its own; prints its address, then the number of calls
/// parked whenever it changes.
struct Park(Arc<AtomicU64>);

#[tonic::async_trait]
impl AssociationService for Park {
    async fn delete_association(
        &self,
        _request: Request<DeleteAssociationRequest>,
    ) -> Result<Response<DeleteAssociationResponse>, Status> {
        self.0.fetch_add(1, Ordering::Relaxed);
        std::future::pending().await
    }

    async fn batch_delete_associations(
        &self,
        _request: Request<BatchDeleteAssociationsRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(Status::unimplemented("not part of this system"))
    }
}

/// The `park-server` entry point (see [`Park`]).
pub async fn park_server() -> anyhow::Result<()> {
    let parked = Arc::new(AtomicU64::new(0));
    println!(
        "listening {}",
        bare_server(Park(Arc::clone(&parked))).await?
    );
    let mut last = u64::MAX;
    loop {
        let now = parked.load(Ordering::Relaxed);
        if now != last {
            println!("parked {now}");
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
