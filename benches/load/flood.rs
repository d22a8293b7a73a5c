//! Flood: calls that must be refused, as fast as the clients can send them,
//! against the budget at the real 1 request/second, side by side with the
//! bare echo server's throughput at the same concurrency.
//!
//! - `queue full`: 16 patient callers keep `--max-queue 16` full; flood calls
//!   are refused `RESOURCE_EXHAUSTED` / `queue_full`.
//! - `hopeless deadline`: one patient caller keeps the next slot about a
//!   second away; flood calls carry a 500 ms deadline and are refused at once
//!   (`deadline`), or, now and then, get the slot.
//!
//! Each gateway has its own emulator enforcing the vendor's 1 rps, which
//! records every arrival: the upstream must never see more than the budget.
//!
//! Then the release binary, as deployed (JSON logs at `info`, spans on) and
//! with logging at `error` (which also turns the `info` spans off), side by
//! side under the same flood of hopeless calls (64 HTTP/2 connections, 100 ms
//! deadlines): refusals per second of each, their ratio (target ≥ 0.8), and
//! the log lines the deployed one wrote per 40,000 refusals.

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Mock;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::telemetry::metrics::LATE_SENDS;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::Opts;
use crate::harness::{Target, connections, fmt, interleave, request};
use crate::report::{table, verdict, write};
use crate::systems::{GatewayBin, echo_server, emulator, gateway_in_process, results_dir, scrape};

const TARGET: f64 = 0.8;
/// Refusals per second as deployed ÷ with logs at `error`, at least.
const LOG_TARGET: f64 = 0.8;

/// Callers that wait as long as it takes, one call after another.
fn patients(addr: std::net::SocketAddr, n: usize) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut client) =
                    AssociationServiceClient::connect(format!("http://{addr}")).await
                else {
                    return;
                };
                loop {
                    let _ = client.delete_association(request()).await;
                }
            })
        })
        .collect()
}

/// What the vendor saw: arrivals, 429s, smallest gap, and whether the count
/// stayed within 1 per second of the time since the first arrival.
fn vendor_view(mock: &Mock) -> serde_json::Value {
    let arrivals = mock.arrivals();
    let span = arrivals
        .first()
        .map_or(0.0, |a| Instant::now().duration_since(a.at).as_secs_f64());
    let min_gap = arrivals
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .min()
        .unwrap_or(Duration::MAX);
    let too_many = arrivals.iter().filter(|a| a.status == 429).count();
    let allowed = span.floor() as usize + 1;
    json!({
        "arrivals": arrivals.len(),
        "allowed_by_budget": allowed,
        "vendor_429s": too_many,
        "min_gap_ms": min_gap.as_secs_f64() * 1e3,
        "within_budget": arrivals.len() <= allowed && too_many == 0 && min_gap >= Duration::from_secs(1),
    })
}

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let c = opts.concurrency.iter().copied().max().unwrap_or(64);
    let echo = echo_server().await?;
    let (mock_full, upstream_full) = emulator(1).await?;
    let (full, metrics) = gateway_in_process(
        upstream_full,
        &[
            "--rate-per-second",
            "1",
            "--max-queue",
            "16",
            "--max-wait",
            "10m",
        ],
    )
    .await?;
    let (mock_deadline, upstream_deadline) = emulator(1).await?;
    let (deadline, _) = gateway_in_process(upstream_deadline, &["--rate-per-second", "1"]).await?;
    let mut background = patients(full, 16);
    background.extend(patients(deadline, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let conns = connections(c);
    let systems = [
        ("echo", Target::grpc(echo, conns, None).await?),
        (
            "gateway: queue full",
            Target::grpc(full, conns, Some(Duration::from_secs(2))).await?,
        ),
        (
            "gateway: hopeless deadline",
            Target::grpc(deadline, conns, Some(Duration::from_millis(500))).await?,
        ),
    ];
    println!(
        "concurrency {c}: {} rounds of {:?} per system, {conns} HTTP/2 connection(s) each",
        opts.rounds, opts.round
    );
    let samples = interleave(&systems, c, opts.rounds, opts.round).await;
    background.iter().for_each(JoinHandle::abort);

    let echo_rate = samples[0].throughput();
    let mut rows = Vec::new();
    let mut results = serde_json::Map::new();
    for ((name, _), s) in systems.iter().zip(&samples) {
        let refused = s.count("ResourceExhausted/BUDGET_EXHAUSTED");
        let per_s = if *name == "echo" {
            s.throughput()
        } else {
            refused as f64 / s.busy.as_secs_f64()
        };
        rows.push(vec![
            name.to_string(),
            s.calls().to_string(),
            refused.to_string(),
            format!("{per_s:.0}/s"),
            format!("{:.2}", per_s / echo_rate),
            fmt(s.p(0.5)),
            fmt(s.p(0.99)),
        ]);
        let mut j = s.to_json();
        j["answers_or_refusals_per_s"] = json!(per_s);
        j["ratio_to_echo"] = json!(per_s / echo_rate);
        results.insert(name.to_string(), j);
    }
    table(
        &[
            "system",
            "calls",
            "refused",
            "answers/s",
            "÷ echo",
            "p50",
            "p99",
        ],
        &rows,
    );
    for (name, s) in systems
        .iter()
        .zip(&samples)
        .skip(1)
        .map(|((n, _), s)| (n, s))
    {
        let ratio =
            s.count("ResourceExhausted/BUDGET_EXHAUSTED") as f64 / s.busy.as_secs_f64() / echo_rate;
        println!(
            "  {name}: refusals/s ÷ echo calls/s = {ratio:.2} (target ≥ {TARGET}: {})",
            verdict(ratio >= TARGET)
        );
        println!("    answers: {:?}", s.outcomes);
    }
    let vendor = json!({
        "queue full": vendor_view(&mock_full),
        "hopeless deadline": vendor_view(&mock_deadline),
    });
    println!("  upstream (vendor emulator at 1 rps): {vendor}");
    // Both gateways run in this process and share its metrics recorder.
    let late_sends = crate::systems::scrape(metrics, LATE_SENDS)
        .await
        .unwrap_or(0.0);
    println!("  upstream requests that left late (next slot moved), both gateways: {late_sends}");
    let binary = binary_logs(opts).await?;
    write(
        "flood",
        json!({"concurrency": c, "target_ratio": TARGET, "systems": results, "upstream": vendor, "late_sends": late_sends, "binary": binary}),
    );
    Ok(())
}

/// The release binary flooded with hopeless calls, logging as deployed vs
/// at `error`, side by side; and the deployed one's log lines.
async fn binary_logs(opts: &Opts) -> anyhow::Result<serde_json::Value> {
    const CONCURRENCY: usize = 64;
    let (_mock, upstream) = emulator(1).await?;
    let flags = &["--rate-per-second", "1"];
    // As the manifests deploy it: a CPU limit of 1, under which the runtime
    // sizes itself to one worker thread (the standard library reads the
    // cgroup quota); the clients take the other core.
    let one_core = ("TOKIO_WORKER_THREADS", "1".to_owned());
    let info = GatewayBin::start(
        "flood-info",
        upstream,
        flags,
        std::slice::from_ref(&one_core),
    )
    .await?;
    // Errors only; the startup module's one info line ("serving") is how
    // the tool learns the bound addresses.
    let quiet = [
        (
            "RUST_LOG",
            "error,provisioning_gateway::startup=info".to_owned(),
        ),
        one_core,
    ];
    let error = GatewayBin::start("flood-error", upstream, flags, &quiet).await?;
    let deadline = Some(Duration::from_millis(100));
    let systems = [
        (
            "binary, logs at info (as deployed)",
            Target::grpc(info.addr, CONCURRENCY, deadline).await?,
        ),
        (
            "binary, logs at error",
            Target::grpc(error.addr, CONCURRENCY, deadline).await?,
        ),
    ];
    println!(
        "\nrelease binary, concurrency {CONCURRENCY} over {CONCURRENCY} HTTP/2 connections, 100 ms deadlines: {} rounds of {:?} per system",
        opts.rounds, opts.round
    );
    let samples = interleave(&systems, CONCURRENCY, opts.rounds, opts.round).await;
    // Every refusal the deployed binary made, warm-up included, as its own
    // metrics count them: what its log lines cover.
    let refused_total = scrape(
        info.metrics_addr,
        provisioning_gateway::telemetry::metrics::REJECTIONS,
    )
    .await
    .unwrap_or(0.0);
    // SIGTERM: the last summary line is written on the way out.
    info.stop().await;
    error.stop().await;
    let log = std::fs::read_to_string(results_dir().join("logs").join("flood-info.log"))?;
    let lines = log.lines().count();
    let refusal_lines = log
        .lines()
        .filter(|l| l.contains("delete failed") || l.contains("refusals held back"))
        .count();

    let rate = |s: &crate::harness::Sample| {
        s.count("ResourceExhausted/BUDGET_EXHAUSTED") as f64 / s.busy.as_secs_f64()
    };
    let rows: Vec<Vec<String>> = systems
        .iter()
        .zip(&samples)
        .map(|((name, _), s)| {
            vec![
                name.to_string(),
                s.calls().to_string(),
                s.count("ResourceExhausted/BUDGET_EXHAUSTED").to_string(),
                format!("{:.0}/s", rate(s)),
                fmt(s.p(0.5)),
                fmt(s.p(0.99)),
            ]
        })
        .collect();
    table(
        &["system", "calls", "refused", "refusals/s", "p50", "p99"],
        &rows,
    );
    let ratio = rate(&samples[0]) / rate(&samples[1]);
    let per_40k = lines as f64 / refused_total.max(1.0) * 40_000.0;
    println!(
        "  refusals/s as deployed ÷ logs at error = {ratio:.2} (target ≥ {LOG_TARGET}: {})",
        verdict(ratio >= LOG_TARGET)
    );
    println!(
        "  log lines as deployed: {lines} in all ({refusal_lines} about refusals) for {refused_total:.0} refusals: {per_40k:.1} per 40,000"
    );
    for ((name, _), s) in systems.iter().zip(&samples) {
        println!("    {name}: {:?}", s.outcomes);
    }
    Ok(json!({
        "concurrency": CONCURRENCY,
        "deadline_ms": 100,
        "as_deployed": samples[0].to_json(),
        "logs_at_error": samples[1].to_json(),
        "ratio": ratio,
        "target_ratio": LOG_TARGET,
        "log_lines": lines,
        "refusal_log_lines": refusal_lines,
        "refusals_total": refused_total,
        "log_lines_per_40000_refusals": per_40k,
    }))
}
