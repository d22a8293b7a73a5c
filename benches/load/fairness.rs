//! Fair shares: two token callers weighted 1 and 3 on one account, both
//! flooding (16 calls at a time each, coming back after `RetryInfo`), for
//! `--duration` (default 20 s here), at 20 requests/second. In memory both
//! call one replica; on Redis each calls its own replica, so their shares
//! are decided by the line in Redis alone. Reports each caller's share of
//! the calls served (target 25/75 ± 5 %).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic_types::StatusExt;

use crate::Opts;
use crate::harness::{API_KEY, request};
use crate::report::{table, verdict, write};
use crate::systems::{GatewayBin, emulator, results_dir};

const RATE: u32 = 20;
const LOOPS: usize = 16;
const DEADLINE: Duration = Duration::from_secs(10);
const CALLERS: [(&str, u32); 2] = [("light", 1), ("heavy", 3)];

fn token(name: &str) -> String {
    format!("bench-token-{name}")
}

/// The accounts file: one account at 20/s, the two token callers.
fn accounts_file(upstream: SocketAddr) -> anyhow::Result<String> {
    let mut toml = format!(
        "[[accounts]]\nname = \"main\"\nbase_url = \"http://{upstream}\"\napi_key_env = \"BENCH_API_KEY\"\nrate_per_second = {RATE}\n"
    );
    for (name, weight) in CALLERS {
        let hash = Sha256::digest(token(name).as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        toml.push_str(&format!(
            "\n[[callers]]\nname = \"{name}\"\ntoken_sha256 = \"{hex}\"\nweight = {weight}\n"
        ));
    }
    let path = results_dir().join("fairness-accounts.toml");
    std::fs::write(&path, toml)?;
    Ok(path.to_string_lossy().into_owned())
}

/// One of a caller's loops: calls served until `end`.
async fn flood(addr: SocketAddr, name: &'static str, end: Instant) -> u64 {
    let Ok(mut client) = AssociationServiceClient::connect(format!("http://{addr}")).await else {
        return 0;
    };
    let mut served = 0;
    while Instant::now() < end {
        let mut req = tonic::Request::new(request());
        req.set_timeout(DEADLINE);
        let bearer = format!("Bearer {}", token(name));
        req.metadata_mut()
            .insert("authorization", bearer.parse().expect("ASCII"));
        match client.delete_association(req).await {
            Ok(_) => served += 1,
            Err(s) => {
                let delay = s
                    .get_error_details()
                    .retry_info()
                    .and_then(|r| r.retry_delay);
                let pause = delay.unwrap_or(Duration::from_millis(50));
                tokio::time::sleep(pause.min(end.saturating_duration_since(Instant::now()))).await;
            }
        }
    }
    served
}

async fn run_one(opts: &Opts, redis: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let (_mock, upstream) = emulator(RATE).await?;
    let file = accounts_file(upstream)?;
    let mut flags = vec!["--accounts-file", file.as_str()];
    if let Some(url) = redis {
        flags.extend(["--budget-backend", "redis", "--redis-url", url]);
        flags.extend(["--expected-replicas", "2"]);
    }
    let env = [("BENCH_API_KEY", API_KEY.to_owned())];
    let replicas = if redis.is_some() { 2 } else { 1 };
    let mut gateways = Vec::new();
    for r in 0..replicas {
        gateways.push(GatewayBin::start(&format!("fairness-{r}"), upstream, &flags, &env).await?);
    }
    let duration = opts.duration.min(Duration::from_secs(20));
    let end = Instant::now() + duration;
    let mut loops = Vec::new();
    for (i, (name, _)) in CALLERS.iter().enumerate() {
        let addr = gateways[i % replicas].addr;
        for _ in 0..LOOPS {
            loops.push((*name, tokio::spawn(flood(addr, name, end))));
        }
    }
    let mut served: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, task) in loops {
        *served.entry(name).or_default() += task.await?;
    }
    for g in gateways {
        g.stop().await;
    }
    let total: u64 = served.values().sum();
    let heavy = served.get("heavy").copied().unwrap_or(0) as f64 / total.max(1) as f64;
    let backend = if redis.is_some() {
        "redis, one replica each"
    } else {
        "memory, one replica"
    };
    Ok(json!({
        "backend": backend, "duration_s": duration.as_secs_f64(),
        "served": served, "heavy_share": heavy,
    }))
}

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    println!(
        "  callers light (weight 1) and heavy (weight 3), {LOOPS} calls at a time each, {RATE}/s"
    );
    let memory = run_one(opts, None).await?;
    let (_redis, addr) = crate::accuracy::redis_server().await?;
    let url = format!("redis://{addr}");
    let shared = run_one(opts, Some(&url)).await?;
    let mut rows = Vec::new();
    for r in [&memory, &shared] {
        let heavy = r["heavy_share"].as_f64().unwrap_or(0.0);
        rows.push(vec![
            r["backend"].as_str().unwrap_or_default().to_owned(),
            format!("{}", r["served"]),
            format!("{:.1} / {:.1} %", 100.0 * (1.0 - heavy), 100.0 * heavy),
            format!("25/75 ± 5: {}", verdict((heavy - 0.75).abs() <= 0.05)),
        ]);
    }
    table(&["backend", "served", "light / heavy", "target"], &rows);
    write("fairness", json!({ "runs": [memory, shared] }));
    Ok(())
}
