//! Accuracy: many callers against gateway replicas (release binaries) in
//! front of the Infobip emulator at the vendor's real 1 request/second, for
//! `--duration`. Reports upstream calls per second ÷ configured rate, the
//! smallest gap between upstream arrivals, the vendor's 429s, and how callers
//! fared against their deadlines; draws the arrivals over time.
//!
//! Measured as a client host would see it: the callers join over a
//! one-second ramp-up and run on a thread of their own, the emulator is a
//! host of its own, each replica runs as deployed (one runtime worker, as
//! under the manifests' CPU limit of 1), and a health check timed beside
//! the refusals shows the floor of any call on this machine.
//!
//! Several replicas share one budget only through Redis: with `--replicas`
//! above 1 the tool starts its own `redis-server` on a free loopback port and
//! runs the replicas with `--budget-backend redis`, which needs a binary that
//! has that flag.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use serde_json::json;
use tonic_types::StatusExt;

use crate::Opts;
use crate::harness::{label, request};
use crate::report::{table, verdict, write};
use crate::systems::{GatewayBin, emulator_apart, on_own_thread, scrape};
use provisioning_gateway::telemetry::metrics::{LATE_SENDS, REQUEST_DURATION};

/// The longest caller deadline; caller i calls with a deadline of
/// 1 + (i mod 10) seconds, so deadlines spread over 1 to 10 s.
const DEADLINE: Duration = Duration::from_secs(10);

fn deadline_of(caller: usize) -> Duration {
    Duration::from_secs(1 + (caller % 10) as u64)
}
const RATE_TARGET: f64 = 0.98;
/// Callers start spread evenly over this long.
const RAMP_UP: Duration = Duration::from_secs(1);

/// Whether this build of the binary has the Redis budget backend.
fn has_redis_backend() -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"))
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--budget-backend"))
}

/// A throwaway `redis-server` on a free loopback port (no persistence).
pub async fn redis_server() -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    // `--port 0` would mean "no TCP listener": pick a free port ourselves.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("redis-server must be installed (scripts/test installs it)")?;
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("redis-server did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, addr))
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    late: u64,
    hung: u64,
    /// Each refusal at admission: when it was sent (since the run started)
    /// and how long it took to come back.
    refusal_latency: Vec<(Duration, Duration)>,
}

/// One caller, joining at `joins` a run that `started`: calls with its
/// deadline, one after another; when refused it
/// comes back after the RetryInfo delay (jittered), as a well-behaved client
/// does.
async fn caller(
    addr: SocketAddr,
    (started, joins): (Instant, Instant),
    end: Instant,
    deadline: Duration,
) -> Tally {
    let mut tally = Tally::default();
    tokio::time::sleep_until(joins.into()).await;
    let Ok(mut client) = AssociationServiceClient::connect(format!("http://{addr}")).await else {
        tally.hung += 1;
        return tally;
    };
    while Instant::now() < end {
        let mut req = tonic::Request::new(request());
        req.set_timeout(deadline);
        let t0 = Instant::now();
        let answer = tokio::time::timeout(deadline * 2, client.delete_association(req)).await;
        let took = t0.elapsed();
        if took > deadline {
            tally.late += 1;
        }
        let (outcome, back_off) = match answer {
            Err(_) => {
                tally.hung += 1;
                continue;
            }
            Ok(Ok(_)) => ("OK".to_owned(), None),
            Ok(Err(s)) => (
                label(&s),
                s.get_error_details()
                    .retry_info()
                    .and_then(|r| r.retry_delay),
            ),
        };
        if outcome.contains("BUDGET_EXHAUSTED") && !outcome.ends_with("timed_out") {
            tally.refusal_latency.push((t0 - started, took));
        }
        *tally.outcomes.entry(outcome).or_default() += 1;
        if let Some(delay) = back_off {
            // Up to a fifth more, at random, as gRPC clients jitter their
            // backoff: refused callers do not all come back in one instant.
            let delay = delay + delay.mul_f64(jitter() / 5.0);
            tokio::time::sleep(
                delay
                    .min(DEADLINE)
                    .min(end.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }
    tally
}

/// The floor under a refusal's latency on this machine: a health check
/// (the cheapest call a gateway answers, no budget, no Redis) sent to
/// `addr` every 2 to 12 ms on its own connection until `end`, each round
/// trip timed at the client like the refusals.
async fn health_probe(addr: SocketAddr, end: Instant) -> Vec<Duration> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut took = Vec::new();
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a loopback address is a valid URI")
        .connect()
        .await
    else {
        return took;
    };
    let mut client = HealthClient::new(channel);
    while Instant::now() < end {
        let t0 = Instant::now();
        if client.check(HealthCheckRequest::default()).await.is_ok() {
            took.push(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_micros(2_000 + (jitter() * 10_000.0) as u64)).await;
    }
    took
}

/// The `q`th percentile of `sorted`.
fn percentile(sorted: &[Duration], q: usize) -> Duration {
    sorted
        .get(sorted.len().saturating_sub(1) * q / 100)
        .copied()
        .unwrap_or_default()
}

/// A number in [0, 1), different at every call.
pub fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let n = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// Redraws the arrivals picture from the last `accuracy.json`.
pub fn replot(opts: &Opts) -> anyhow::Result<()> {
    let path = crate::systems::results_dir().join("accuracy.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let runs = doc["results"]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for r in &runs {
        let times: Vec<f64> = serde_json::from_value(r["arrival_times_s"].clone())?;
        let backend = r["backend"].as_str().unwrap_or("memory");
        let title = format!(
            "Upstream arrivals: {} callers, {} replica(s) ({backend}), budget 1 rps (T = 1010 ms)",
            r["callers"], r["replicas"]
        );
        let svg = opts.svg_dir.join(svg_name(backend));
        crate::plot::arrivals(&svg, &title, &times, 1000.0, &[])?;
        println!("wrote {} from {}", svg.display(), path.display());
    }
    Ok(())
}

/// The arrivals picture of a run on `backend`.
fn svg_name(backend: &str) -> String {
    if backend == "redis" {
        "bench-arrivals.svg".into()
    } else {
        format!("bench-arrivals-{backend}.svg")
    }
}

/// Both backends, one after the other in one run: one replica on the
/// in-memory budget, then `--replicas` (default 3) sharing one line in Redis.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let mut results = vec![run_one(opts, 1).await?];
    let replicas = opts.replicas.unwrap_or(3);
    if replicas > 1 {
        if !has_redis_backend() {
            bail!("{replicas} replicas share a budget only through the Redis backend");
        }
        results.push(run_one(opts, replicas).await?);
    }
    write("accuracy", json!({ "runs": results }));
    Ok(())
}

async fn run_one(opts: &Opts, replicas: usize) -> anyhow::Result<serde_json::Value> {
    let (mock, upstream, _emulator) = emulator_apart(1)?;
    let redis = if replicas > 1 {
        Some(redis_server().await?)
    } else {
        None
    };
    let redis_url = redis.as_ref().map(|(_, a)| format!("redis://{a}"));
    let mut flags = vec!["--rate-per-second", "1"];
    if let Some(url) = &redis_url {
        flags.extend(["--budget-backend", "redis", "--redis-url", url]);
        flags.extend(["--expected-replicas", "3"]);
    }
    // Each replica as the manifests deploy it: a CPU limit of 1, under
    // which its runtime sizes itself to one worker thread (the standard
    // library reads the cgroup quota). Three replicas share two cores here.
    let as_deployed = [("TOKIO_WORKER_THREADS", "1".to_owned())];
    let mut gateways = Vec::new();
    for r in 0..replicas {
        gateways.push(
            GatewayBin::start(&format!("accuracy-{r}"), upstream, &flags, &as_deployed).await?,
        );
    }
    let backend = if replicas > 1 { "redis" } else { "memory" };
    println!(
        "\n  {backend}: {} callers, {replicas} replica(s), {:?}, deadlines 1 to 10 s",
        opts.callers, opts.duration
    );
    let started = Instant::now();
    let end = started + opts.duration;
    // Callers join over the first second (a ramp-up, as load generators
    // do): 200 calls sent in the same millisecond queue behind each other on
    // 2 cores whatever the gateway does, and would measure that burst.
    let ramp = RAMP_UP.div_f64(opts.callers.max(1) as f64);
    let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.addr).collect();
    let n = opts.callers;
    // The callers share one thread of their own and each probe has one, as
    // client hosts would: none waits behind the tool's other work.
    let callers = on_own_thread(async move {
        let each = (0..n).map(|i| {
            caller(
                addrs[i % replicas],
                (started, started + ramp * i as u32),
                end,
                deadline_of(i),
            )
        });
        futures::future::join_all(each).await
    });
    let probes: Vec<_> = gateways
        .iter()
        .map(|g| on_own_thread(health_probe(g.addr, end)))
        .collect();
    let mut tally = Tally::default();
    for t in callers.await? {
        tally.late += t.late;
        tally.hung += t.hung;
        tally.refusal_latency.extend(t.refusal_latency);
        for (k, v) in t.outcomes {
            *tally.outcomes.entry(k).or_default() += v;
        }
    }
    let mut health = Vec::new();
    for p in futures::future::join_all(probes).await {
        health.extend(p?);
    }
    health.sort();
    // Requests that left later than their slot allowed for (a cold upstream
    // connection, a starved thread): each moved the next slot.
    let mut late_sends = 0.0;
    // Refusals inside the gateways: how many of them the handler answered
    // within 5 ms (its request-duration histogram), to tell the gateway's
    // share of a slow refusal from the time the call spent on this shared
    // machine before and after it.
    let (mut within_5ms, mut refusals_inside) = (0.0, 0.0);
    for g in &gateways {
        late_sends += scrape(g.metrics_addr, LATE_SENDS).await.unwrap_or(0.0);
        let bucket = |le: &str| {
            format!("{REQUEST_DURATION}_bucket{{code=\"RESOURCE_EXHAUSTED\",le=\"{le}\"}}")
        };
        within_5ms += scrape(g.metrics_addr, &bucket("0.005"))
            .await
            .unwrap_or(0.0);
        refusals_inside += scrape(g.metrics_addr, &bucket("+Inf")).await.unwrap_or(0.0);
    }
    let inside_share = within_5ms / refusals_inside.max(1.0);
    for g in gateways {
        g.stop().await;
    }

    let arrivals: Vec<_> = mock
        .arrivals()
        .into_iter()
        .filter(|a| a.at >= started && a.at <= end)
        .collect();
    let times: Vec<f64> = arrivals
        .iter()
        .map(|a| (a.at - arrivals[0].at).as_secs_f64())
        .collect();
    let span = times.last().copied().unwrap_or(0.0);
    let rate = (times.len().saturating_sub(1)) as f64 / span.max(1e-9);
    let min_gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::MAX, f64::min);
    let vendor_429 = arrivals.iter().filter(|a| a.status == 429).count();
    let total: u64 = tally.outcomes.values().sum();
    let ok = tally.outcomes.get("OK").copied().unwrap_or(0);
    let refused: u64 = tally
        .outcomes
        .iter()
        .filter(|(k, _)| k.contains("BUDGET_EXHAUSTED"))
        .map(|(_, v)| v)
        .sum();
    let timed_out: u64 = tally
        .outcomes
        .iter()
        .filter(|(k, _)| k.ends_with("timed_out"))
        .map(|(_, v)| v)
        .sum();
    let admitted = total - refused + timed_out;
    let served_share = ok as f64 / admitted.max(1) as f64;
    let mut slowest = tally.refusal_latency.clone();
    slowest.sort_by_key(|(_, took)| std::cmp::Reverse(*took));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|(at, took)| {
            format!(
                "{:.1} ms at {:.3} s",
                took.as_secs_f64() * 1e3,
                at.as_secs_f64()
            )
        })
        .collect();
    println!("  slowest refusals: {}", slowest.join(", "));
    let mut refusals: Vec<Duration> = tally.refusal_latency.iter().map(|(_, t)| *t).collect();
    refusals.sort();
    let (p50, p99) = (percentile(&refusals, 50), percentile(&refusals, 99));
    let (health_p50, health_p99) = (percentile(&health, 50), percentile(&health, 99));
    table(
        &["figure", "value", "target"],
        &[
            vec![
                "upstream calls/s ÷ configured rate".into(),
                format!("{rate:.4}"),
                format!("≥ {RATE_TARGET}: {}", verdict(rate >= RATE_TARGET)),
            ],
            vec![
                "smallest gap between arrivals".into(),
                format!("{:.1} ms", min_gap * 1e3),
                format!("≥ 1000 ms: {}", verdict(min_gap >= 1.0)),
            ],
            vec![
                "vendor 429s".into(),
                vendor_429.to_string(),
                format!("0: {}", verdict(vendor_429 == 0)),
            ],
            vec![
                "calls (all answered)".into(),
                format!(
                    "{total} ({} hung, {} after deadline)",
                    tally.hung, tally.late
                ),
                format!("none late: {}", verdict(tally.hung + tally.late == 0)),
            ],
            vec!["served (OK)".into(), ok.to_string(), String::new()],
            vec![
                "refused at once (BUDGET_EXHAUSTED)".into(),
                (refused - timed_out).to_string(),
                String::new(),
            ],
            vec![
                "refusal answered, p99 (p50)".into(),
                format!(
                    "{:.2} ms ({:.2} ms)",
                    p99.as_secs_f64() * 1e3,
                    p50.as_secs_f64() * 1e3
                ),
                format!("< 5 ms: {}", verdict(p99 < Duration::from_millis(5))),
            ],
            vec![
                "health check beside them, p99 (p50)".into(),
                format!(
                    "{:.2} ms ({:.2} ms), {} checks",
                    health_p99.as_secs_f64() * 1e3,
                    health_p50.as_secs_f64() * 1e3,
                    health.len()
                ),
                format!(
                    "refusal ÷ health p99 = {:.2}",
                    p99.as_secs_f64() / health_p99.as_secs_f64().max(1e-9)
                ),
            ],
            vec![
                "refusals answered within 5 ms inside the gateway".into(),
                format!(
                    "{:.2} % ({within_5ms} of {refusals_inside})",
                    100.0 * inside_share
                ),
                String::new(),
            ],
            vec![
                "admitted and served within deadline".into(),
                format!("{:.2} % ({ok} of {admitted})", 100.0 * served_share),
                format!("≥ 99 %: {}", verdict(served_share >= 0.99)),
            ],
        ],
    );
    println!("  answers: {:?}", tally.outcomes);
    println!("  upstream requests that left late (next slot moved): {late_sends}");
    let svg = opts.svg_dir.join(svg_name(backend));
    let title = format!(
        "Upstream arrivals: {} callers, {replicas} replica(s) ({backend}), budget 1 rps (T = 1010 ms)",
        opts.callers
    );
    crate::plot::arrivals(&svg, &title, &times, 1000.0, &[])?;
    println!("wrote {}", svg.display());
    drop(redis);
    Ok(json!({
        "replicas": replicas, "backend": backend,
        "callers": opts.callers, "duration_s": opts.duration.as_secs_f64(),
        "deadlines_s": "1 + (caller mod 10)",
        "upstream_rate_ratio": rate, "min_gap_ms": min_gap * 1e3, "vendor_429s": vendor_429,
        "arrivals": times.len(), "calls": total, "ok": ok, "refused": refused - timed_out,
        "timed_out_in_queue": timed_out, "late": tally.late, "hung": tally.hung,
        "refusal_p99_ms": p99.as_secs_f64() * 1e3,
        "refusal_p50_ms": p50.as_secs_f64() * 1e3,
        "refusals_within_5ms_inside_gateway": inside_share,
        "health_p99_ms": health_p99.as_secs_f64() * 1e3,
        "health_p50_ms": health_p50.as_secs_f64() * 1e3,
        "late_sends": late_sends,
        "served_share_of_admitted": served_share,
        "outcomes": tally.outcomes, "arrival_times_s": times,
    }))
}
