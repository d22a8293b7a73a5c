//! The Redis that production runs: passwords from files that rotate,
//! Sentinel failover and Cluster slot moves, with real `redis-server`
//! processes on loopback (each test starts its own).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use provisioning_gateway::config::{BackendConfig, RedisFallback};
use provisioning_gateway::mock::Arrival;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::redis::{gaps, opts_20, replicas, until_degraded_is, warm_up};
use crate::support::process::GatewayProcess;
use crate::support::redis::RedisServer;
use crate::support::topology::{Cluster, Sentinels};
use crate::support::{
    Opts, TestApp, account, config as support_config, healthz, metrics_page, request, spawn_config,
    spawn_mock, spawn_open_mock, with_timeout,
};

/// `opts` with its Redis password read from `file`.
fn with_password_file(mut opts: Opts, file: &Path) -> Opts {
    if let BackendConfig::Redis(r) = &mut opts.backend {
        r.password_file = Some(file.to_owned());
    }
    opts
}

fn secret_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[tokio::test]
async fn a_rotated_password_file_applies_at_the_next_reconnect_without_a_restart() {
    let redis = RedisServer::with_password("first-s3cr3t");
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "redis-password", "first-s3cr3t\n");
    let (mock, addr, _stop) = spawn_mock(20).await;
    let url = format!("redis://127.0.0.1:{}", redis.port());
    let opts = with_password_file(opts_20().redis(&url, RedisFallback::Deny, 1), &file);
    let apps = replicas(1, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(3)).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap();

    // Rotate as an operator does: Redis first, then the Secret; then drop
    // the gateway's connections (a failover or a restart does the same).
    let mut admin = crate::redis::raw(&redis).await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("second-s3cr3t")
        .exec_async(&mut admin)
        .await
        .unwrap();
    std::fs::write(&file, "second-s3cr3t\n").unwrap();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .exec_async(&mut admin)
        .await
        .unwrap();

    // The next command fails on the killed connection; the probe reconnects
    // with the file's new password, no restart.
    until_degraded_is(&apps, true, Duration::from_secs(3)).await;
    let back = until_degraded_is(&apps, false, Duration::from_secs(3)).await;
    client.delete_association(request(1)).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg("provisioning-gateway:test:default")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(exists, "the call took its slot from the shared budget");
    eprintln!("back on the shared budget {back:?} after the password rotated");

    let shown = format!(
        "{}\n{}",
        healthz(apps[0].metrics_addr).await,
        metrics_page(apps[0].metrics_addr).await
    );
    assert!(
        !shown.contains("s3cr3t"),
        "a password on /healthz or /metrics"
    );
}

#[tokio::test]
async fn the_password_file_never_reaches_logs_spans_metrics_healthz_or_statuses() {
    let redis = RedisServer::with_password("right-s3cr3t");
    let dir = tempfile::tempdir().unwrap();
    let wrong = secret_file(dir.path(), "redis-password", "wr0ng-s3cr3t\n");
    let collector = crate::support::otlp::Collector::default();
    let (_grpc, http) = collector.start().await;
    let (_mock, addr, _stop) = spawn_mock(20).await;
    let endpoint = format!("http://{http}");
    let url = format!("redis://127.0.0.1:{}", redis.port());
    let gateway = GatewayProcess::start(
        &format!("http://{addr}"),
        &[
            ("GATEWAY_BUDGET_BACKEND", "redis"),
            ("GATEWAY_REDIS_URL", &url),
            ("GATEWAY_REDIS_PASSWORD_FILE", wrong.to_str().unwrap()),
            ("GATEWAY_REDIS_FALLBACK", "deny"),
            ("GATEWAY_RATE_PER_SECOND", "20"),
            ("RUST_LOG", "trace"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    // The wrong password: degraded, and `deny` refuses with UNAVAILABLE.
    let metrics: std::net::SocketAddr = gateway.metrics_addr.parse().unwrap();
    let health = healthz(metrics).await;
    assert_eq!(health["degraded"], true);
    let mut client =
        provisioning_gateway::pb::association_service_client::AssociationServiceClient::connect(
            format!("http://{}", gateway.addr),
        )
        .await
        .unwrap();
    let refused = client.delete_association(request(0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    let page = metrics_page(metrics).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // a few probe rounds
    let (status, logs) = gateway.terminate().await; // flushes the spans
    assert!(status.success());
    let logs = logs.join("\n");
    assert!(logs.contains("Redis unreachable"), "{logs}");
    let spans = crate::support::otlp::all_values(&collector.spans());
    for (what, text) in [
        ("logs", logs.as_str()),
        ("spans", spans.as_str()),
        ("/metrics", page.as_str()),
        ("/healthz", &health.to_string()),
        ("the status", &format!("{refused:?}")),
    ] {
        assert!(!text.contains("s3cr3t"), "a password in {what}: {text}");
    }
}

/// The vendor's interval at the 20/s of `opts_20`; the gateway adds a 70 ms
/// margin for jitter on a loaded machine, and an early slot (a failover that
/// lost a write) would land far inside it.
const VENDOR_INTERVAL: Duration = Duration::from_millis(50);

/// Callers in a loop through every app, on every account, until stopped;
/// counts what they were answered.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Code>>>,
}

impl Load {
    async fn start(apps: &[TestApp], accounts: &[&str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (a, app) in apps.iter().enumerate() {
            for (b, account) in accounts.iter().enumerate() {
                for c in 0..2 {
                    let mut client = app.client().await;
                    let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
                    let account = account.to_string();
                    let base = ((a * 10 + b) * 10 + c) * 100_000;
                    tasks.push(tokio::spawn(async move {
                        let mut refused = Vec::new();
                        let mut n = base;
                        while !stop.load(Ordering::Relaxed) {
                            n += 1;
                            let mut r = with_timeout(request(n), Duration::from_secs(2));
                            r.metadata_mut()
                                .insert("x-infobip-account", account.parse().unwrap());
                            match client.delete_association(r).await {
                                Ok(_) => {
                                    served.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(status) => {
                                    refused.push(status.code());
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                        refused
                    }));
                }
            }
        }
        Self {
            stop,
            served,
            tasks,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `more` calls were served after `since`; how long it took.
    async fn until_served(&self, since: usize, more: usize, within: Duration) -> Duration {
        let started = Instant::now();
        while self.served() < since + more {
            assert!(
                started.elapsed() < within,
                "fewer than {more} calls served within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    /// Stops the callers; the codes of every refusal.
    async fn stop(self) -> Vec<Code> {
        self.stop.store(true, Ordering::Relaxed);
        let mut refused = Vec::new();
        for task in self.tasks {
            refused.extend(task.await.unwrap());
        }
        refused
    }
}

/// Every arrival accepted, none closer than 0.9 of the vendor's interval.
fn assert_spaced(arrivals: &[Arrival], what: &str) -> Duration {
    assert!(
        arrivals.iter().all(|a| a.status == 204),
        "{what}: the vendor refused some"
    );
    let min = gaps(arrivals).into_iter().min();
    let min = min.unwrap_or_else(|| panic!("{what}: fewer than two arrivals"));
    assert!(
        min >= VENDOR_INTERVAL * 9 / 10,
        "{what}: two arrivals only {min:?} apart"
    );
    min
}

#[tokio::test]
async fn a_sentinel_failover_under_load_is_followed_and_keeps_the_spacing() {
    let sentinels = Sentinels::start_async(None, None).await;
    let (mock, addr, _stop) = spawn_mock(20).await;
    let opts = opts_20().redis(&sentinels.url(), RedisFallback::Deny, 2);
    let apps = replicas(2, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(5)).await;
    let skip = warm_up(&apps, &mock).await;
    let load = Load::start(&apps, &["default"]).await;
    load.until_served(0, 10, Duration::from_secs(5)).await;

    let old = sentinels.primary_port();
    let failover = Instant::now();
    let (sentinels, new) = sentinels.force_failover_async().await;
    let failed_over = failover.elapsed();
    assert_ne!(old, new);
    // Served again: both gateways found the new primary (deny: no fallback
    // would serve them otherwise).
    let served = load.served();
    let followed = load.until_served(served, 10, Duration::from_secs(5)).await;
    until_degraded_is(&apps, false, Duration::from_secs(5)).await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut sentinels.connection(new))
        .unwrap();
    // Everyone but the sentinels, the replica and this very connection.
    let gateways = clients
        .lines()
        .filter(|l| {
            !l.contains("name=sentinel-") && !l.contains("flags=S") && !l.contains("cmd=client")
        })
        .count();
    assert!(
        gateways >= 2,
        "the new primary serves both gateways: {clients}"
    );
    let refused = load.stop().await;

    let arrivals = &mock.arrivals()[skip..];
    let min = assert_spaced(arrivals, "across the failover");
    assert!(
        refused
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::ResourceExhausted)),
        "{refused:?}"
    );
    eprintln!(
        "sentinel failover: {failed_over:?} to fail over, served again {followed:?} after it, \
         {} refused meanwhile, {} arrivals, smallest gap {min:?}",
        refused.len(),
        arrivals.len()
    );
}

#[tokio::test]
async fn on_a_cluster_each_account_keeps_its_spacing_through_a_slot_move() {
    let cluster = Cluster::start_async(None).await;
    let key = |name: &str| format!("provisioning-gateway:test:{{{name}}}");
    let (a, b) = cluster.names_on_different_nodes(key);
    let (mock, addr, _stop) = spawn_open_mock(20).await;
    let upstream = format!("http://{addr}");
    let opts = opts_20().redis(&cluster.url(), RedisFallback::Deny, 2);
    let mut apps = Vec::new();
    for _ in 0..2 {
        let config = support_config(&opts, &upstream)
            .account(account(&a, &upstream, "key-a"))
            .account(account(&b, &upstream, "key-b"))
            .default_account(a.clone());
        apps.push(spawn_config(config, mock.clone(), CancellationToken::new()).await);
    }
    until_degraded_is(&apps, false, Duration::from_secs(5)).await;
    let load = Load::start(&apps, &[&a, &b]).await;
    load.until_served(0, 10, Duration::from_secs(5)).await;
    assert_ne!(
        cluster.node_for_key(&key(&a)),
        cluster.node_for_key(&key(&b))
    );

    // a's slot moves to b's node under load.
    let to = cluster.node_for_key(&key(&b));
    let cluster = cluster.migrate_slot_of_async(key(&a), to).await;
    assert_eq!(cluster.node_for_key(&key(&a)), to);
    let served = load.served();
    let after = load.until_served(served, 10, Duration::from_secs(5)).await;
    let refused = load.stop().await;

    let arrivals = mock.arrivals();
    for (name, api_key) in [(&a, "App key-a"), (&b, "App key-b")] {
        let own: Vec<Arrival> = arrivals
            .iter()
            .filter(|r| r.headers["authorization"] == api_key)
            .cloned()
            .collect();
        assert!(own.len() >= 5, "{name}: only {} arrivals", own.len());
        let min = assert_spaced(&own, name);
        eprintln!(
            "cluster, account {name}: {} arrivals, smallest gap {min:?}",
            own.len()
        );
    }
    eprintln!(
        "cluster slot move: served again {after:?} after it, {} refused",
        refused.len()
    );
}

#[tokio::test]
async fn a_new_primary_that_lost_the_latest_write_gives_no_slot_early() {
    // What a failover to a replica that had not received the latest write
    // looks like to the gateway: the same address, the budget key gone.
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(1).await;
    let opts = Opts {
        rate_per_second: 1,
        ..Opts::default()
    }
    .redis(&redis.url(), RedisFallback::Deny, 1);
    let apps = replicas(1, &[opts], &mock, addr).await;
    let mut client = apps[0].client().await;
    client.delete_association(request(0)).await.unwrap(); // a shared slot
    let redis = redis.restart_async().await; // empty: the write is lost
    // At once: the first try finds the connection gone (`deny`: UNAVAILABLE)
    // and the probe reconnects within a few hundred ms.
    let started = Instant::now();
    loop {
        let call = with_timeout(request(1), Duration::from_secs(5));
        match client.delete_association(call).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrivals = mock.arrivals();
    assert_eq!(arrivals[1].status, 204, "the vendor accepted it");
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "{gap:?} after the slot the lost write held"
    );
    drop(redis);
}

#[tokio::test]
async fn sentinels_without_a_password_in_front_of_a_primary_with_one() {
    let sentinels = Sentinels::start_async(Some("data-s3cr3t"), None).await;
    let dir = tempfile::tempdir().unwrap();
    // An empty file: the sentinels take no password; the data nodes take
    // the URL's.
    let none = secret_file(dir.path(), "sentinel-password", "");
    let (mock, addr, _stop) = spawn_mock(20).await;
    let mut opts = opts_20().redis(&sentinels.url(), RedisFallback::Deny, 1);
    if let BackendConfig::Redis(r) = &mut opts.backend {
        r.sentinel_password_file = Some(none);
    }
    let apps = replicas(1, &[opts], &mock, addr).await;
    until_degraded_is(&apps, false, Duration::from_secs(5)).await;
    apps[0]
        .client()
        .await
        .delete_association(request(0))
        .await
        .unwrap();
    let served: Vec<u16> = mock.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(
        served,
        [204],
        "served on the shared budget (deny: no fallback)"
    );
}
