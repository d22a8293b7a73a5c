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

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Mock;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::telemetry::metrics::LATE_SENDS;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::Opts;
use crate::harness::{Target, connections, fmt, interleave, request};
use crate::report::{table, verdict, write};
use crate::systems::{echo_server, emulator, gateway_in_process};

const TARGET: f64 = 0.8;

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
    write(
        "flood",
        json!({"concurrency": c, "target_ratio": TARGET, "systems": results, "upstream": vendor, "late_sends": late_sends}),
    );
    Ok(())
}
