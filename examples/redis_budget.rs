//! Figures for the Redis backend (a benchmark, not a test):
//!
//! (a) budget decision latency on the Redis backend against one Redis PING
//!     round trip, interleaved in one run, on each topology: one endpoint,
//!     Sentinel (a primary, a replica, three sentinels) and Cluster (three
//!     primaries; PING there goes to every node, the decision to one);
//! (b) 3 gateway replicas × 50 concurrent callers for 30 s at the default
//!     1 request/second: upstream calls per second ÷ the configured rate, the
//!     smallest gap between arrivals at the (emulated) vendor, calls served.
//!
//! `cargo run --release --example redis_budget` (needs `redis-server` on PATH;
//! everything runs on loopback). `-- --seconds N` shortens (b); `-- --latency`
//! runs (a) alone.
// Measures wall time on the real clock, outside any paused runtime: the
// library's tokio-clock rule (clippy.toml) does not apply here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::TcpListener as StdListener;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioning_gateway::config::{
    AccountConfig, Config, RedisConfig, RedisUrl, defaults, endpoint_url,
};
use provisioning_gateway::mock::{Mock, MockConfig};
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::pb::{Channel, DeleteAssociationRequest, ResourceType};
use provisioning_gateway::startup::App;
use provisioning_gateway::testing::{self, Answer, Ask, RedisStore, TIMEOUT};
use provisioning_gateway::{ApiKey, KeySource};
use tokio_util::sync::CancellationToken;
use tonic_types::StatusExt;

const KEY: &str = "bench-api-key";

/// The test suite's Sentinel and Cluster fixtures (real processes on loopback).
#[allow(dead_code)]
#[path = "../tests/support"]
mod support {
    pub mod redis;
    pub mod topology;
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> anyhow::Result<(Redis, String)> {
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = std::env::temp_dir();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run redis-server (install it): {e}"))?;
    let redis = Redis(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((redis, format!("redis://127.0.0.1:{port}")))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "  {name:<34} p50 {:>7.1} µs   p99 {:>7.1} µs   mean {:>7.1} µs",
        percentile(&v, 0.5).as_secs_f64() * 1e6,
        percentile(&v, 0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6
    );
    percentile(&v, 0.5)
}

fn redis_config(url: &str, replicas: u32) -> anyhow::Result<RedisConfig> {
    let mut redis = RedisConfig::new(RedisUrl::new(url).map_err(anyhow::Error::msg)?);
    redis.key_prefix = "provisioning-gateway:bench:".into();
    redis.expected_replicas = NonZeroU32::new(replicas).expect("replicas > 0");
    Ok(redis)
}

fn ask(ticket: String) -> Ask {
    Ask {
        ticket,
        lane: "bench".into(),
        weight: 1,
        ready_in: 60_000_000,
        background: false,
    }
}

/// (a) admission latency vs PING, interleaved: admission into a free line
/// (granted: the script's grant path) and behind 20 waiting calls (queued:
/// its fair-placement path), each one EVALSHA round trip.
async fn latency(url: &str, n: usize) -> anyhow::Result<()> {
    println!("(a) admission latency, {n} admissions each, interleaved with PINGs");
    let store = Arc::new(RedisStore::new(&redis_config(url, 1)?, TIMEOUT));
    store.connect().await?;
    let prefix = "provisioning-gateway:bench:{raw}";
    // A 1 µs interval: every admission is a grant.
    let free = testing::redis_line(
        Arc::clone(&store),
        prefix,
        testing::bench_rules(Duration::from_micros(1)),
    );
    // A 1 s interval with 20 calls waiting: every admission is queued (and
    // leaves again, so the line stays 20 long).
    let busy_base = "provisioning-gateway:bench:{busy}";
    let busy = testing::redis_line(
        Arc::clone(&store),
        busy_base,
        testing::bench_rules(Duration::from_secs(1)),
    );
    for i in 0..20 {
        busy.admit(&ask(format!("w{i}"))).await?;
    }
    let key = prefix;
    let mut count = 0u64;
    let mut next = || {
        count += 1;
        format!("t{count}")
    };
    for _ in 0..200 {
        store.ping().await?;
        store.keyed_round_trip(key).await?;
        free.admit(&ask(next())).await?;
        let t = next();
        busy.admit(&ask(t.clone())).await?;
        busy.leave(&t).await?;
    }
    let (mut ping, mut keyed, mut granted_rt, mut queued_rt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut granted, mut queued) = (0, 0);
    for _ in 0..n {
        let t = Instant::now();
        store.ping().await?;
        ping.push(t.elapsed());
        let t = Instant::now();
        store.keyed_round_trip(key).await?;
        keyed.push(t.elapsed());
        let ticket = next();
        let t = Instant::now();
        let a = free.admit(&ask(ticket)).await?;
        granted_rt.push(t.elapsed());
        granted += usize::from(a.answer == Answer::Granted);
        let ticket = next();
        let t = Instant::now();
        let a = busy.admit(&ask(ticket.clone())).await?;
        queued_rt.push(t.elapsed());
        queued += usize::from(matches!(a.answer, Answer::Queued(_)));
        busy.leave(&ticket).await?;
    }
    let p = summary("PING round trip", ping);
    let k = summary("keyed read (EXISTS) round trip", keyed);
    let g = summary("admission, free line (granted)", granted_rt);
    let q = summary("admission, 20 waiting (queued)", queued_rt);
    println!(
        "  ratio to PING (p50): granted {:.2}×, queued {:.2}×; to the keyed read: granted {:.2}×, queued {:.2}×   ({granted}/{n} granted, {queued}/{n} queued)",
        g.as_secs_f64() / p.as_secs_f64(),
        q.as_secs_f64() / p.as_secs_f64(),
        g.as_secs_f64() / k.as_secs_f64(),
        q.as_secs_f64() / k.as_secs_f64(),
    );
    Ok(())
}

fn request(n: u64) -> DeleteAssociationRequest {
    DeleteAssociationRequest {
        resource_type: ResourceType::Number as i32,
        channel: Channel::Sms as i32,
        application_id: "bench-app".into(),
        entity_id: None,
        resource_id: format!("number-{n}"),
        ..Default::default()
    }
}

/// (b) 3 replicas × 50 callers at 1 rps.
async fn spacing(url: &str, seconds: u64) -> anyhow::Result<()> {
    const REPLICAS: usize = 3;
    const CALLERS: usize = 50;
    println!(
        "\n(b) {REPLICAS} replicas × {CALLERS} concurrent callers for {seconds} s, 1 request/second, \
         10 ms safety margin, callers with a 5 s deadline that come back after RetryInfo"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock_addr = listener.local_addr()?;
    let mock = Mock::new(MockConfig {
        api_key: Some(KEY.into()),
        rate_per_second: 1,
    });
    let stop = CancellationToken::new();
    tokio::spawn(mock.clone().serve(listener, stop.clone().cancelled_owned()));

    let mut addrs = Vec::new();
    for _ in 0..REPLICAS {
        let key = ApiKey::new(KEY).map_err(anyhow::Error::msg)?;
        let config = Config::builder()
            .listen("127.0.0.1:0".parse()?)
            .metrics_listen("127.0.0.1:0".parse()?)
            .account(AccountConfig::new(
                defaults::ACCOUNT_NAME,
                endpoint_url(&format!("http://{mock_addr}"))?,
                KeySource::Fixed(key),
            ))
            .redis(redis_config(url, REPLICAS as u32)?)
            .shutdown_grace(Duration::from_secs(5))
            .build()?;
        let app = App::build(config).await?;
        addrs.push(app.grpc_addr());
        tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    }

    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut callers = Vec::new();
    for (r, addr) in addrs.iter().enumerate() {
        let client = AssociationServiceClient::connect(format!("http://{addr}")).await?;
        for c in 0..CALLERS {
            let mut client = client.clone();
            callers.push(tokio::spawn(async move {
                let (mut ok, mut refused, mut other) = (0u32, Vec::new(), Vec::new());
                let mut n = ((r * CALLERS + c) as u64) << 32;
                while Instant::now() < end {
                    n += 1;
                    let mut req = tonic::Request::new(request(n));
                    req.set_timeout(Duration::from_secs(5));
                    match client.delete_association(req).await {
                        Ok(_) => ok += 1,
                        Err(s) => {
                            let info = s.get_error_details().error_info().cloned();
                            match info {
                                Some(i) if i.reason == "BUDGET_EXHAUSTED" => refused
                                    .push(i.metadata.get("rejection").cloned().unwrap_or_default()),
                                Some(i) => other.push(i.reason),
                                None => other.push(format!("{:?} {}", s.code(), s.message())),
                            }
                            let back = s
                                .get_error_details()
                                .retry_info()
                                .and_then(|r| r.retry_delay)
                                .unwrap_or(Duration::from_secs(1))
                                .clamp(Duration::from_millis(100), Duration::from_secs(5));
                            tokio::time::sleep(
                                back.min(end.saturating_duration_since(Instant::now())),
                            )
                            .await;
                        }
                    }
                }
                (ok, refused, other)
            }));
        }
    }
    let mut ok = 0u32;
    let mut refused = std::collections::BTreeMap::<String, u32>::new();
    let mut others = std::collections::BTreeMap::<String, u32>::new();
    for c in callers {
        let (o, r, x) = c.await?;
        ok += o;
        for reason in r {
            *refused.entry(reason).or_default() += 1;
        }
        for reason in x {
            *others.entry(reason).or_default() += 1;
        }
    }
    let refused_total: u32 = refused.values().sum();
    let other: u32 = others.values().sum();
    let elapsed = started.elapsed();
    stop.cancel();

    let arrivals = mock.arrivals();
    let accepted = arrivals.iter().filter(|a| a.status == 204).count();
    let throttled = arrivals.iter().filter(|a| a.status == 429).count();
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1].at - w[0].at).collect();
    let min_gap = gaps.iter().min().copied().unwrap_or_default();
    let span = arrivals
        .last()
        .zip(arrivals.first())
        .map(|(l, f)| l.at - f.at)
        .unwrap_or_default();
    let steady = (arrivals.len().saturating_sub(1)) as f64 / span.as_secs_f64();
    let calls = ok + refused_total + other;
    println!(
        "  upstream arrivals: {} in {:.1} s ({accepted} accepted, {throttled} answered 429 by the vendor)",
        arrivals.len(),
        elapsed.as_secs_f64()
    );
    let window = Duration::from_secs(seconds);
    let in_window = arrivals.iter().filter(|a| a.at < started + window).count();
    println!(
        "  upstream calls/s ÷ configured rate: {:.3} in the {seconds} s window, {:.3} first-to-last arrival \
         (the most the 10 ms margin allows: {:.3})",
        in_window as f64 / window.as_secs_f64(),
        steady,
        1.0 / 1.010
    );
    println!(
        "  smallest gap between arrivals: {:.1} ms (interval 1/rate = 1000 ms, T with margin = 1010 ms)",
        min_gap.as_secs_f64() * 1e3
    );
    println!(
        "  calls: {calls}; served {ok} ({:.1}%), refused BUDGET_EXHAUSTED {refused_total} ({:.1}%) {refused:?}, other errors {other} {others:?}",
        100.0 * f64::from(ok) / f64::from(calls.max(1)),
        100.0 * f64::from(refused_total) / f64::from(calls.max(1)),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30);
    let (_redis, url) = start_redis()?;
    println!("(a) one endpoint");
    latency(&url, 2000).await?;
    let sentinels = support::topology::Sentinels::start_async(None, None).await;
    println!("(a) Sentinel");
    latency(&sentinels.url(), 2000).await?;
    drop(sentinels);
    let cluster = support::topology::Cluster::start_async(None).await;
    println!("(a) Cluster");
    latency(&cluster.url(), 2000).await?;
    drop(cluster);
    if std::env::args().any(|a| a == "--latency") {
        return Ok(());
    }
    spacing(&url, seconds).await?;
    Ok(())
}
