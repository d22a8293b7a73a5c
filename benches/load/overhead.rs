//! Overhead: what the gateway adds on top of the two hops it joins.
//!
//! Side by side, in interleaved rounds, at each concurrency:
//! - `echo`: the gateway's own gRPC service shape on a bare tonic server
//!   answering at once (the first hop alone);
//! - `direct HTTP`: the exact upstream request (body, headers, reqwest client
//!   settings) sent straight to the fast upstream (the second hop alone);
//! - `gateway`: the gateway in this process (`App::build`, as the tests run
//!   it) with an effectively unlimited budget, in front of that upstream;
//! - `gateway binary`: the release binary as a child process, logging one
//!   JSON line per call at `info` (its production default) to a file.
//!
//! Reported: gateway ÷ (echo + direct HTTP) at p50 and p99.

use serde_json::json;

use crate::Opts;
use crate::harness::{Target, connections, fmt, interleave};
use crate::report::{table, verdict, write};
use crate::systems::{
    GatewayBin, UNLIMITED, chain_server, echo_server, fast_upstream, gateway_in_process,
};

const P50_TARGET: f64 = 1.10;
const P99_TARGET: f64 = 1.25;

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let (upstream, upstream_calls) = fast_upstream().await?;
    let echo = echo_server().await?;
    let chain = chain_server(upstream).await?;
    let (gateway, _) = gateway_in_process(upstream, UNLIMITED).await?;
    let binary = GatewayBin::start("overhead", upstream, UNLIMITED, &[]).await?;

    let mut results = Vec::new();
    let mut panels = Vec::new();
    for &c in &opts.concurrency {
        let conns = connections(c);
        let systems = [
            ("echo", Target::grpc(echo, conns, None).await?),
            ("direct HTTP", Target::http(upstream)?),
            ("gateway", Target::grpc(gateway, conns, None).await?),
            (
                "gateway binary",
                Target::grpc(binary.addr, conns, None).await?,
            ),
            ("bare chain", Target::grpc(chain, conns, None).await?),
        ];
        if let Some(only) = &opts.only {
            let target = systems.iter().find(|(n, _)| n == only);
            let (name, target) =
                target.ok_or_else(|| anyhow::anyhow!("no system named {only:?}"))?;
            let s = crate::harness::run(target, c, opts.round * opts.rounds as u32).await;
            println!(
                "  {name} alone at concurrency {c}: {:.0}/s, p50 {}, p99 {}",
                s.throughput(),
                fmt(s.p(0.5)),
                fmt(s.p(0.99))
            );
            continue;
        }
        println!(
            "concurrency {c}: {} rounds of {:?} per system, {conns} HTTP/2 connection(s) per gRPC system",
            opts.rounds, opts.round
        );
        let samples = interleave(&systems, c, opts.rounds, opts.round).await;
        let rows: Vec<Vec<String>> = systems
            .iter()
            .zip(&samples)
            .map(|((name, _), s)| {
                let other: u64 = s
                    .outcomes
                    .iter()
                    .filter(|(k, _)| *k != "OK" && *k != "HTTP 204")
                    .map(|(_, v)| v)
                    .sum();
                vec![
                    name.to_string(),
                    s.calls().to_string(),
                    format!("{:.0}/s", s.throughput()),
                    fmt(s.p(0.5)),
                    fmt(s.p(0.9)),
                    fmt(s.p(0.99)),
                    other.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "system",
                "calls",
                "throughput",
                "p50",
                "p90",
                "p99",
                "not OK",
            ],
            &rows,
        );
        let [echo_s, direct_s, gateway_s, binary_s, chain_s] = &samples[..] else {
            unreachable!("five systems")
        };
        let ratio = |g: &crate::harness::Sample, q: f64| {
            g.p(q).as_secs_f64() / (echo_s.p(q) + direct_s.p(q)).as_secs_f64()
        };
        let mut ratios = serde_json::Map::new();
        for (name, g) in [
            ("gateway", gateway_s),
            ("gateway binary", binary_s),
            ("bare chain", chain_s),
        ] {
            let (r50, r99) = (ratio(g, 0.5), ratio(g, 0.99));
            println!(
                "  {name} ÷ (echo + direct HTTP): p50 {r50:.3} (target ≤ {P50_TARGET}: {}), p99 {r99:.3} (target ≤ {P99_TARGET}: {})",
                verdict(r50 <= P50_TARGET),
                verdict(r99 <= P99_TARGET)
            );
            ratios.insert(name.into(), json!({"p50": r50, "p99": r99}));
        }
        results.push(json!({
            "concurrency": c,
            "connections": conns,
            "systems": systems.iter().zip(&samples)
                .map(|((n, _), s)| (n.to_string(), s.to_json()))
                .collect::<serde_json::Map<_, _>>(),
            "ratio_to_echo_plus_direct": ratios,
        }));
        panels.push((
            format!("concurrency {c}"),
            vec![
                ("gateway".to_owned(), gateway_s.latency.clone()),
                ("gateway binary".to_owned(), binary_s.latency.clone()),
                ("direct HTTP".to_owned(), direct_s.latency.clone()),
                ("echo (bare tonic)".to_owned(), echo_s.latency.clone()),
            ],
        ));
    }
    binary.stop().await;
    if opts.only.is_some() {
        return Ok(());
    }
    println!(
        "  upstream answered {} requests",
        upstream_calls.load(std::sync::atomic::Ordering::Relaxed)
    );
    let svg = opts.svg_dir.join("bench-latency.svg");
    crate::plot::latency_cdf(&svg, &panels)?;
    println!("wrote {}", svg.display());
    write(
        "overhead",
        json!({"targets": {"p50": P50_TARGET, "p99": P99_TARGET}, "runs": results}),
    );
    Ok(())
}
