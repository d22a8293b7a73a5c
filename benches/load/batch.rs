//! Batch: one 10,000-item `BatchDeleteAssociations` draining on account
//! `busy` of one release binary on the Redis backend (the items live in
//! Redis), at the vendor's real 1 request/second, for `--duration` (the
//! issue's figure: `--duration 10m`), then cancelled. Side by side in the
//! same process, account `quiet` (its own emulator, same rate) has no batch.
//! A prober calls each account alternately with a unary call every 2 to 3.5
//! s, at random (a fixed period would lock its calls to the slot grid).
//!
//! Reports: upstream use on `busy` (arrivals/s ÷ rate, target ≥ 0.98), the
//! gateway's resident memory while the batch is pending ÷ idle (≤ 1.2), and
//! the unary p99 wait on `busy` minus on `quiet` (≤ one interval).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use provisioning_gateway::pb::{BatchDeleteAssociationsMetadata, BatchDeleteAssociationsRequest};
use provisioning_gateway::proto::google::longrunning::operations_client::OperationsClient;
use provisioning_gateway::proto::google::longrunning::{
    CancelOperationRequest, GetOperationRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::Opts;
use crate::accuracy::{jitter, redis_server};
use crate::harness::{API_KEY, request};
use crate::report::{table, verdict, write};
use crate::systems::{GatewayBin, emulator, results_dir, rss};

const ITEMS: usize = 10_000;
/// The gateway's interval T at 1 request/second: 1 s and the default 10 ms
/// safety margin.
const INTERVAL: Duration = Duration::from_millis(1010);
const PROBE_EVERY: Duration = Duration::from_millis(2000);
const DEADLINE: Duration = Duration::from_secs(10);

/// Two accounts, each in front of its own emulator at 1 request/second.
fn accounts_file(busy: SocketAddr, quiet: SocketAddr) -> anyhow::Result<String> {
    let mut toml = String::from("default_account = \"busy\"\n");
    for (name, addr) in [("busy", busy), ("quiet", quiet)] {
        toml.push_str(&format!(
            "\n[[accounts]]\nname = \"{name}\"\nbase_url = \"http://{addr}\"\napi_key_env = \"BENCH_API_KEY\"\nrate_per_second = 1\n"
        ));
    }
    let path = results_dir().join("batch-accounts.toml");
    std::fs::write(&path, toml)?;
    Ok(path.to_string_lossy().into_owned())
}

fn on_account<T>(msg: T, account: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(DEADLINE);
    req.metadata_mut()
        .insert("x-infobip-account", account.parse().expect("ASCII"));
    req
}

/// One unary call on `account`: how long it took, if served.
async fn probe(client: &mut AssociationServiceClient<Channel>, account: &str) -> Option<Duration> {
    let started = Instant::now();
    let answer = client
        .delete_association(on_account(request(), account))
        .await;
    answer.ok().map(|_| started.elapsed())
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default()
}

async fn metadata(
    ops: &mut OperationsClient<Channel>,
    name: &str,
) -> anyhow::Result<(bool, BatchDeleteAssociationsMetadata)> {
    let op = ops
        .get_operation(on_account(
            GetOperationRequest { name: name.into() },
            "busy",
        ))
        .await?
        .into_inner();
    let any = op.metadata.context("the operation has no metadata")?;
    Ok((
        op.done,
        BatchDeleteAssociationsMetadata::decode(any.value.as_slice())?,
    ))
}

pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let (busy_mock, busy) = emulator(1).await?;
    let (quiet_mock, quiet) = emulator(1).await?;
    let (_redis, redis) = redis_server().await?;
    let file = accounts_file(busy, quiet)?;
    let url = format!("redis://{redis}");
    let flags = [
        "--accounts-file",
        file.as_str(),
        "--budget-backend",
        "redis",
        "--redis-url",
        url.as_str(),
    ];
    let env = [("BENCH_API_KEY", API_KEY.to_owned())];
    let gateway = GatewayBin::start("batch", busy, &flags, &env).await?;
    let channel = Channel::from_shared(format!("http://{}", gateway.addr))?
        .connect()
        .await?;
    let mut client = AssociationServiceClient::new(channel.clone());
    let mut ops = OperationsClient::new(channel);

    // Warm both accounts and the batch path (a one-request batch, drained:
    // the operations store's connection, the drainer), then the idle
    // footprint: nothing pending.
    for account in ["busy", "quiet"] {
        probe(&mut client, account).await;
    }
    let warm = BatchDeleteAssociationsRequest {
        requests: vec![request()],
        request_id: String::new(),
    };
    let warm = client
        .batch_delete_associations(on_account(warm, "busy"))
        .await?
        .into_inner();
    while !metadata(&mut ops, &warm.name).await?.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss(gateway.pid()).0;

    let batch = BatchDeleteAssociationsRequest {
        requests: (0..ITEMS).map(|_| request()).collect(),
        request_id: String::new(),
    };
    let op = client
        .batch_delete_associations(on_account(batch, "busy"))
        .await
        .context("the batch was refused")?
        .into_inner();
    if op.done {
        bail!("a 10,000-item batch cannot be done at once: {op:?}");
    }
    println!(
        "  {ITEMS}-item batch {} on `busy`, probing both accounts for {:?}",
        op.name, opts.duration
    );

    let started = Instant::now();
    let end = started + opts.duration;
    let (mut busy_waits, mut quiet_waits) = (Vec::new(), Vec::new());
    let mut pending_rss = 0;
    let mut turn = 0usize;
    while Instant::now() < end {
        let account = if turn.is_multiple_of(2) {
            "busy"
        } else {
            "quiet"
        };
        turn += 1;
        if let Some(took) = probe(&mut client, account).await {
            if account == "busy" {
                busy_waits.push(took);
            } else {
                quiet_waits.push(took);
            }
        }
        pending_rss = pending_rss.max(rss(gateway.pid()).0);
        tokio::time::sleep(PROBE_EVERY + INTERVAL.mul_f64(1.5 * jitter())).await;
    }
    let (done, progress) = metadata(&mut ops, &op.name).await?;
    ops.cancel_operation(on_account(
        CancelOperationRequest {
            name: op.name.clone(),
        },
        "busy",
    ))
    .await?;
    gateway.stop().await;

    let arrivals: Vec<_> = busy_mock
        .arrivals()
        .into_iter()
        .filter(|a| a.at >= started && a.at <= end)
        .collect();
    let span = match (arrivals.first(), arrivals.last()) {
        (Some(a), Some(b)) => (b.at - a.at).as_secs_f64(),
        _ => 0.0,
    };
    let use_ratio = arrivals.len().saturating_sub(1) as f64 / span.max(1e-9);
    let rss_ratio = pending_rss as f64 / idle.max(1) as f64;
    let (busy_p99, quiet_p99) = (p99(busy_waits.clone()), p99(quiet_waits.clone()));
    let extra = busy_p99.saturating_sub(quiet_p99);
    let quiet_arrivals = quiet_mock.arrivals().len();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    table(
        &["figure", "value", "target"],
        &[
            vec![
                "upstream use on `busy` (arrivals/s ÷ rate)".into(),
                format!("{use_ratio:.4} ({} arrivals)", arrivals.len()),
                format!("≥ 0.98: {}", verdict(use_ratio >= 0.98)),
            ],
            vec![
                "resident memory, batch pending ÷ idle".into(),
                format!(
                    "{rss_ratio:.2} ({} / {} KiB)",
                    pending_rss / 1024,
                    idle / 1024
                ),
                format!("≤ 1.2: {}", verdict(rss_ratio <= 1.2)),
            ],
            vec![
                "unary p99 wait, busy − quiet".into(),
                format!(
                    "{} ({} vs {}; {} / {} probes)",
                    ms(extra),
                    ms(busy_p99),
                    ms(quiet_p99),
                    busy_waits.len(),
                    quiet_waits.len()
                ),
                format!("≤ {}: {}", ms(INTERVAL), verdict(extra <= INTERVAL)),
            ],
            vec![
                "batch progress when cancelled".into(),
                format!(
                    "{} ok, {} failed of {} (done: {done})",
                    progress.succeeded, progress.failed, progress.total
                ),
                String::new(),
            ],
        ],
    );
    write(
        "batch",
        json!({
            "items": ITEMS, "duration_s": opts.duration.as_secs_f64(),
            "busy_arrivals": arrivals.len(), "quiet_arrivals": quiet_arrivals,
            "upstream_use_ratio": use_ratio,
            "rss_idle_bytes": idle, "rss_pending_max_bytes": pending_rss, "rss_ratio": rss_ratio,
            "unary_p99_busy_ms": busy_p99.as_secs_f64() * 1e3,
            "unary_p99_quiet_ms": quiet_p99.as_secs_f64() * 1e3,
            "probes_busy": busy_waits.len(), "probes_quiet": quiet_waits.len(),
            "succeeded": progress.succeeded, "failed": progress.failed,
        }),
    );
    Ok(())
}
