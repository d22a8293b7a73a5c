//! Memory: resident set size (VmRSS from /proc) of the release binary with
//! 10,000 callers queued on one account, and of the budget state for 10,000
//! accounts.
//!
//! Budget state for 10,000 accounts: the binary with an `--accounts-file` of
//! 10,000 accounts against one of a single account, both idle after one call;
//! and, in this process, the RSS growth from 10,000 in-process lines (a
//! line, a GCRA limiter and a parked dispatcher task each),
//! measured first thing in the process.
//!
//! The bare tonic floor and the gateway (as deployed, and with per-call
//! spans off) alternate `--rounds` times; the figure is the median ratio.

use std::time::{Duration, Instant};

use provisioning_gateway::pb::DeleteAssociationResponse;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::testing::MemoryLines;
use serde_json::json;
use tonic::transport::Endpoint;

use crate::Opts;
use crate::harness::request;
use crate::report::{verdict, write};
use crate::systems::{GatewayBin, config, emulator, rss, scrape};

const CALLERS: usize = 10_000;
const ACCOUNTS: usize = 10_000;
const TARGET_MIB: f64 = 64.0;
const QUEUE_DEPTH: &str = "provisioning_gateway_budget_queue_depth";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Polls the gateway's queue depth until `done` says so (bounded).
async fn wait_depth(
    metrics: std::net::SocketAddr,
    limit: Duration,
    mut done: impl FnMut(f64) -> bool,
) -> f64 {
    let started = Instant::now();
    loop {
        let depth = scrape(metrics, QUEUE_DEPTH).await.unwrap_or(-1.0);
        if done(depth) || started.elapsed() > limit {
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 12 connections × up to 1024 streams each (the server's limit) hold 10,000 calls.
async fn connections(
    addr: std::net::SocketAddr,
) -> anyhow::Result<Vec<AssociationServiceClient<tonic::transport::Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..12 {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        clients.push(AssociationServiceClient::new(channel));
    }
    Ok(clients)
}

/// 10,000 calls at once, spread over `clients`, each a task of its own.
fn call_all(
    clients: &[AssociationServiceClient<tonic::transport::Channel>],
) -> Vec<tokio::task::JoinHandle<Result<tonic::Response<DeleteAssociationResponse>, tonic::Status>>>
{
    (0..CALLERS)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let req = request();
            tokio::spawn(async move { client.delete_association(req).await })
        })
        .collect()
}

/// Budget state for 10,000 accounts: the release binary with an accounts
/// file of 10,000 accounts against the same binary with one, and the growth
/// from 10,000 in-process lines in this process.
async fn accounts() -> anyhow::Result<serde_json::Value> {
    let budget_config = config("127.0.0.1:9".parse()?, &[])?.budget;
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("account-{i:05}")).collect();
    let (before, _) = rss(0);
    let lines = MemoryLines::new(names.iter().map(String::as_str), &budget_config);
    // Let every dispatcher run once and park on its queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (after, _) = rss(0);
    drop(lines);
    let in_process = after.saturating_sub(before);
    println!(
        "  budget state for {ACCOUNTS} accounts (in-process lines): +{:.1} MiB RSS, {:.0} bytes per account",
        mib(in_process),
        in_process as f64 / ACCOUNTS as f64
    );

    let (_mock, upstream) = emulator(1_000_000).await?;
    let file = |n: usize| -> anyhow::Result<std::path::PathBuf> {
        let mut toml = String::from("default_account = \"account-00000\"\n");
        for i in 0..n {
            toml.push_str(&format!(
                "\n[[accounts]]\nname = \"account-{i:05}\"\nbase_url = \"http://{upstream}\"\napi_key_env = \"BENCH_API_KEY\"\n"
            ));
        }
        let path = crate::systems::results_dir().join(format!("accounts-{n}.toml"));
        std::fs::write(&path, toml)?;
        Ok(path)
    };
    let mut idle = Vec::new();
    for n in [1, ACCOUNTS] {
        let path = file(n)?;
        let path = path.to_string_lossy().into_owned();
        let env = [("BENCH_API_KEY", crate::harness::API_KEY.to_owned())];
        let flags = ["--accounts-file", path.as_str()];
        let gateway = GatewayBin::start(&format!("accounts-{n}"), upstream, &flags, &env).await?;
        let mut client =
            AssociationServiceClient::connect(format!("http://{}", gateway.addr)).await?;
        client.delete_association(request()).await?;
        idle.push(rss(gateway.pid()).0);
        gateway.stop().await;
    }
    let binary = idle[1].saturating_sub(idle[0]);
    println!(
        "  release binary idle after one call: {:.1} MiB with 1 account, {:.1} MiB with {ACCOUNTS}: +{:.1} MiB, {:.0} bytes per account",
        mib(idle[0]),
        mib(idle[1]),
        mib(binary),
        binary as f64 / (ACCOUNTS - 1) as f64
    );
    Ok(json!({
        "accounts": ACCOUNTS,
        "in_process_rss_delta_bytes": in_process,
        "binary_rss_1_account_bytes": idle[0],
        "binary_rss_10000_accounts_bytes": idle[1],
        "binary_bytes_per_account": binary as f64 / (ACCOUNTS - 1) as f64,
    }))
}

/// 10,000 callers queued on the binary; `log` is its `RUST_LOG`.
async fn queued(log: &str) -> anyhow::Result<serde_json::Value> {
    let (mock, upstream) = emulator(1).await?;
    // The 10,000th caller's turn is 10,000 × 1.01 s ≈ 2.8 h away: --max-wait
    // must allow that, or the tail is refused at once (MAX_WAIT).
    let flags = [
        "--rate-per-second",
        "1",
        "--max-queue",
        "20000",
        "--max-wait",
        "3h",
    ];
    let env = [("RUST_LOG", log.to_owned())];
    let gateway = GatewayBin::start("memory", upstream, &flags, &env).await?;
    let mut warm = AssociationServiceClient::connect(format!("http://{}", gateway.addr)).await?;
    warm.delete_association(request()).await?;
    let (idle, _) = rss(gateway.pid());

    let clients = connections(gateway.addr).await?;
    let started = Instant::now();
    let callers = call_all(&clients);
    // All are in line when those waiting plus those already served (one a
    // second, after the warm-up call) make 10,000.
    let depth = wait_depth(gateway.metrics_addr, Duration::from_secs(60), |d| {
        d + (mock.arrivals().len() - 1) as f64 >= CALLERS as f64
    })
    .await;
    let joined = started.elapsed();
    let (loaded, peak) = rss(gateway.pid());
    callers.iter().for_each(|c| c.abort());
    let drained = wait_depth(gateway.metrics_addr, Duration::from_secs(30), |d| d == 0.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, _) = rss(gateway.pid());
    gateway.stop().await;

    let ok = mib(loaded) <= TARGET_MIB;
    println!(
        "  release binary with RUST_LOG={log}, idle after one call: {:.1} MiB RSS",
        mib(idle)
    );
    println!(
        "  with {depth} callers queued on one account (all in line after {joined:.1?}): {:.1} MiB RSS \
         (target ≤ {TARGET_MIB} MiB: {}), peak {:.1} MiB, {:.0} bytes per queued caller",
        mib(loaded),
        verdict(ok),
        mib(peak),
        loaded.saturating_sub(idle) as f64 / CALLERS as f64
    );
    println!(
        "  after every caller left (queue depth {drained}): {:.1} MiB RSS",
        mib(after)
    );
    Ok(json!({
        "rust_log": log, "callers": CALLERS, "queue_depth_seen": depth, "seconds_to_queue_all": joined.as_secs_f64(),
        "rss_idle_bytes": idle, "rss_queued_bytes": loaded, "rss_peak_bytes": peak,
        "rss_after_bytes": after, "target_mib": TARGET_MIB, "met": ok,
    }))
}

/// The floor: 10,000 calls pending on a bare tonic server (a child process
/// of this tool, `park-server`) whose handler never answers.
async fn bare_floor() -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("park-server")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("park-server exited"))?;
        if let Some(addr) = line.strip_prefix("listening ") {
            break addr.to_owned();
        }
    };
    let clients = connections(addr.parse()?).await?;
    let mut warm = clients[0].clone();
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        warm.delete_association(request()),
    )
    .await;
    let (idle, _) = rss(pid);
    let callers = call_all(&clients);
    let started = Instant::now();
    let mut parked = 0;
    while parked < CALLERS + 1 && started.elapsed() < Duration::from_secs(60) {
        match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                parked = line
                    .strip_prefix("parked ")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(parked)
            }
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (loaded, _) = rss(pid);
    callers.iter().for_each(|c| c.abort());
    drop(child);
    let per_call = loaded.saturating_sub(idle) as f64 / CALLERS as f64;
    println!(
        "  bare tonic server (the floor), {} calls pending: {:.1} MiB RSS (idle {:.1} MiB), {per_call:.0} bytes per pending call",
        parked.saturating_sub(1),
        mib(loaded),
        mib(idle)
    );
    Ok(json!({
        "pending": parked.saturating_sub(1), "rss_idle_bytes": idle, "rss_pending_bytes": loaded,
        "bytes_per_pending_call": per_call,
    }))
}

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let accounts = accounts().await?;
    // The floor and the gateway alternate, `--rounds` times: the floor's RSS
    // moves by several MiB from one run to the next, so one pair says little.
    let ratio = |gateway: &serde_json::Value, floor: &serde_json::Value| {
        let gateway = gateway["rss_queued_bytes"].as_f64().unwrap_or(f64::NAN);
        gateway / floor["rss_pending_bytes"].as_f64().unwrap_or(f64::NAN)
    };
    let (mut rounds, mut deployed_ratios, mut quiet_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=opts.rounds.max(1) {
        println!("  round {round}");
        let floor = bare_floor().await?;
        // As deployed (spans and a log line per call), then with the
        // per-call spans filtered out, to show what telemetry holds per
        // waiting call.
        let deployed = queued("info").await?;
        let quiet = queued("warn,provisioning_gateway::startup=info").await?;
        let (d, q) = (ratio(&deployed, &floor), ratio(&quiet, &floor));
        println!("  round {round}: ÷ the floor, as deployed {d:.3}, spans off {q:.3}");
        deployed_ratios.push(d);
        quiet_ratios.push(q);
        rounds.push(json!({
            "bare_tonic_floor": floor, "queued_callers": deployed, "queued_callers_spans_off": quiet,
            "ratio": d, "ratio_spans_off": q,
        }));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, q) = (median(deployed_ratios), median(quiet_ratios));
    println!(
        "  median of {} rounds, 10,000 queued ÷ the bare tonic floor: as deployed {d:.3} (target ≤ 1.3: {}), spans off {q:.3}",
        rounds.len(),
        verdict(d <= 1.3)
    );
    write(
        "memory",
        json!({"accounts": accounts, "rounds": rounds, "median_ratio": d, "median_ratio_spans_off": q}),
    );
    Ok(())
}
