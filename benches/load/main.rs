//! The load tool: starts what it needs on 127.0.0.1, drives it with tonic
//! clients, and reports latency and throughput as ratios measured side by side
//! in one run (the compared systems alternate in short rounds, so machine
//! noise hits them all alike). See BENCHMARKS.md for the figures.
//!
//! ```text
//! cargo bench --bench load -- <scenario> [options]
//!   overhead   gateway vs bare tonic echo + direct HTTP, concurrency 1 and 64
//!   flood      refusals per second vs echo throughput; upstream stays in budget
//!   tracing    release binary with OTLP export on vs off
//!   accuracy   callers against replicas at 1 rps, memory then Redis: rate
//!              used, smallest gap, admitted calls served, refusal latency
//!   fairness   two callers weighted 1:3 flooding (on two replicas on Redis)
//!   memory     RSS with 10,000 queued callers; budget state for 10,000 accounts
//!   batch      a 10,000-item batch draining on Redis: upstream use, memory,
//!              unary p99 wait next to an account without one (`--duration 10m`)
//!   all        every scenario above (memory first)
//!   replot     redraw the arrivals picture from the last accuracy.json
//! options:
//!   --rounds N           interleaved rounds per comparison (default 5)
//!   --round DURATION     length of one round (default 1s)
//!   --concurrency LIST   e.g. 1,64 (overhead, tracing; default 1,64)
//!   --duration DURATION  accuracy and batch run length (default 60s)
//!   --callers N          accuracy callers (default 200)
//!   --replicas N         accuracy replicas on Redis (default 3; 1: memory only)
//!   --svg-dir DIR        where pictures go (default target/bench-results)
//!   --only NAME          overhead: run only the system named NAME (for profiling)
//! ```
//! Results: a table on stdout and `target/bench-results/<scenario>.json`.
// Measures wall time on the real clock, outside any paused runtime: the
// library's tokio-clock rule (clippy.toml) does not apply here.
#![allow(clippy::disallowed_types)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

mod accuracy;
mod batch;
mod fairness;
mod flood;
mod harness;
mod memory;
mod overhead;
mod plot;
mod report;
mod systems;
mod tracing_cost;

/// Command-line options shared by the scenarios.
#[derive(Debug, Clone)]
pub struct Opts {
    pub rounds: usize,
    pub round: Duration,
    pub concurrency: Vec<usize>,
    pub duration: Duration,
    pub callers: usize,
    /// Accuracy replicas; default 3 when the binary has the Redis backend, else 1.
    pub replicas: Option<usize>,
    pub svg_dir: PathBuf,
    /// Run only the systems whose name starts with this (for profiling one).
    pub only: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            rounds: 5,
            round: Duration::from_secs(1),
            concurrency: vec![1, 64],
            duration: Duration::from_secs(60),
            callers: 200,
            replicas: None,
            svg_dir: systems::results_dir(),
            only: None,
        }
    }
}

/// In the order `all` runs them: memory first, while this process's own heap
/// is still fresh (one of its figures is an in-process RSS delta).
const SCENARIOS: &[&str] = &[
    "memory", "overhead", "flood", "tracing", "accuracy", "fairness", "batch",
];

fn parse(args: &[String]) -> anyhow::Result<(Vec<String>, Opts)> {
    let mut opts = Opts::default();
    let mut scenarios = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        let duration = |v: &String| humantime::parse_duration(v).with_context(|| arg.clone());
        match arg.as_str() {
            "--bench" => {}
            "--rounds" => opts.rounds = value()?.parse()?,
            "--round" => opts.round = duration(value()?)?,
            "--duration" => opts.duration = duration(value()?)?,
            "--callers" => opts.callers = value()?.parse()?,
            "--replicas" => opts.replicas = Some(value()?.parse()?),
            "--svg-dir" => opts.svg_dir = PathBuf::from(value()?),
            "--only" => opts.only = Some(value()?.clone()),
            "--concurrency" => {
                opts.concurrency = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "all" => scenarios.extend(SCENARIOS.iter().map(|s| s.to_string())),
            s if SCENARIOS.contains(&s) || s == "replot" || s == "park-server" => {
                scenarios.push(s.to_owned())
            }
            other => bail!("unknown argument {other:?}; scenarios: {SCENARIOS:?} or all"),
        }
    }
    Ok((scenarios, opts))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (scenarios, opts) = parse(&args)?;
    if scenarios.is_empty() {
        // `cargo bench` with no filter lands here: the load scenarios take
        // minutes, so they run only when named.
        println!(
            "load: name a scenario: cargo bench --bench load -- <{}|all>",
            SCENARIOS.join("|")
        );
        return Ok(());
    }
    std::fs::create_dir_all(&opts.svg_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for scenario in &scenarios {
            if scenario != "park-server" {
                println!("\n=== {scenario} ===");
            }
            match scenario.as_str() {
                "overhead" => overhead::run(&opts).await?,
                "flood" => flood::run(&opts).await?,
                "tracing" => tracing_cost::run(&opts).await?,
                "accuracy" => accuracy::run(&opts).await?,
                "fairness" => fairness::run(&opts).await?,
                "batch" => batch::run(&opts).await?,
                "memory" => memory::run(&opts).await?,
                "replot" => accuracy::replot(&opts)?,
                // Internal: the memory scenario's bare tonic floor, as a child.
                "park-server" => systems::park_server().await?,
                _ => unreachable!("parse accepts only known scenarios"),
            }
        }
        anyhow::Ok(())
    })?;
    // Servers spawned by the scenarios run until the process exits.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
