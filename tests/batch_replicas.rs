//! Batches across real gateway processes sharing one Redis: a replica
//! killed (SIGKILL) while it drains loses nothing; the others take the
//! account over and finish the batch, each request sent at least once and
//! at most twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::Code;

use crate::support::batch::{batch, codes, done, metadata, ops, resource, results, submit};
use crate::support::process::GatewayProcess;
use crate::support::redis::RedisServer;
use crate::support::{request, spawn_mock};

/// Logged by the replica that takes an account's batches.
const DRAINING: &str = "draining the account's batches";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_draining_loses_nothing_the_others_finish_the_batch() {
    let redis = RedisServer::start();
    let (mock, addr, _stop) = spawn_mock(20).await;
    let upstream = format!("http://{addr}");
    let url = redis.url();
    let env = [
        ("GATEWAY_BUDGET_BACKEND", "redis"),
        ("GATEWAY_REDIS_URL", url.as_str()),
        ("GATEWAY_REDIS_FALLBACK", "deny"),
        ("GATEWAY_EXPECTED_REPLICAS", "3"),
        ("GATEWAY_RATE_PER_SECOND", "20"),
        ("GATEWAY_SAFETY_MARGIN", "70ms"),
    ];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(GatewayProcess::start(&upstream, &env).await);
    }
    let mut client = AssociationServiceClient::connect(format!("http://{}", replicas[0].addr))
        .await
        .unwrap();
    let accepted = submit(&mut client, batch((0..10).map(request).collect(), "")).await;

    // The third request reached the emulator: kill whoever drains.
    mock.wait_for_requests(3).await;
    let started = Instant::now();
    let holder = loop {
        let holding: Vec<usize> = (0..3)
            .filter(|&i| {
                replicas[i]
                    .logs
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains(DRAINING))
            })
            .collect();
        if let [one] = holding[..] {
            break one;
        }
        assert!(
            holding.len() < 2,
            "two replicas drained one account at once"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no replica says it drains"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut killed = replicas.remove(holder);
    killed.child.kill().await.unwrap();
    let sent_before = mock.arrivals().len();

    // A survivor answers for the operation until the others finished it.
    let mut ops = ops(&replicas[0].addr).await;
    let op = done(&mut ops, &accepted.name).await;
    let (results, error) = results(&op);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(codes(&results), [Code::Ok; 10], "{results:?}");
    let meta = metadata(&op);
    assert_eq!((meta.succeeded, meta.failed), (10, 0));
    assert!(
        replicas
            .iter()
            .any(|r| r.logs.lock().unwrap().iter().any(|l| l.contains(DRAINING))),
        "a survivor took the account over"
    );

    let mut sent: HashMap<String, usize> = HashMap::new();
    for arrival in mock.arrivals() {
        *sent.entry(resource(&arrival)).or_default() += 1;
    }
    for n in 0..10 {
        let times = sent.get(&format!("number-key-{n}")).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&times),
            "request {n} sent {times} times: {sent:?}"
        );
    }
    assert!(
        mock.arrivals().len() > sent_before,
        "the survivors sent the rest"
    );
}

/// `cmdstat_<name>` calls in Redis' `INFO commandstats`.
fn calls(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn idle_drainers_of_many_accounts_read_one_set_a_second_not_each_account() {
    const ACCOUNTS: usize = 40;
    let redis = RedisServer::start();
    let (_mock, addr, _stop) = spawn_mock(20).await;
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    let mut toml = String::from("default_account = \"a0\"\n");
    for i in 0..ACCOUNTS {
        toml.push_str(&format!(
            "\n[[accounts]]\nname = \"a{i}\"\nbase_url = \"http://{addr}\"\napi_key_env = \"ACCOUNT_KEY\"\n"
        ));
    }
    std::fs::write(&accounts, toml).unwrap();
    let url = redis.url();
    let gateway = GatewayProcess::start_with(&[
        ("GATEWAY_ACCOUNTS_FILE", accounts.to_str().unwrap()),
        ("ACCOUNT_KEY", "test-key"),
        ("GATEWAY_BUDGET_BACKEND", "redis"),
        ("GATEWAY_REDIS_URL", url.as_str()),
    ])
    .await;
    let mut conn = crate::redis::raw(&redis).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    // An observation window: what 40 idle drainers cost Redis in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (scripts, reads) = (calls(&info, "evalsha"), calls(&info, "smembers"));
    assert!(
        scripts < ACCOUNTS as u64,
        "{scripts} account commands in 3 s for {ACCOUNTS} idle accounts"
    );
    assert!((1..=8).contains(&reads), "{reads} reads of the set in 3 s");
    drop(gateway);
}

/// A drainer that finds its account's queue empty takes the account out of
/// the active set, unless work is queued by then: other replicas then still
/// see it.
#[tokio::test]
async fn an_emptied_account_leaves_the_active_set_unless_work_came_meanwhile() {
    use provisioning_gateway::testing::ActiveAccounts;
    use redis::AsyncCommands;

    let redis = RedisServer::start();
    let store = redis.store().await;
    let mut conn = crate::redis::raw(&redis).await;
    let active = ActiveAccounts::new("t:");
    let members = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let mut m: Vec<String> = conn.smembers("t:ops:active").await.unwrap();
            m.sort();
            m
        }
    };

    active.add(&store, "a").await.unwrap();
    active.add(&store, "b").await.unwrap();
    assert_eq!(members(&mut conn).await, ["a", "b"]);
    active.quiet(&store, "a", "t:{a}:queue").await.unwrap();
    assert_eq!(members(&mut conn).await, ["b"], "a's queue is empty");
    let _: String = conn.xadd("t:{b}:queue", "*", &[("r", "1")]).await.unwrap();
    active.quiet(&store, "b", "t:{b}:queue").await.unwrap();
    assert_eq!(members(&mut conn).await, ["b"], "b's queue has work again");
}
