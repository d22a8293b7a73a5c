//! Promises the README makes that nothing else pins down: bounded caller
//! labels, the shutdown grace cut short, and which call's log event says it
//! shared another's upstream call.

use std::time::{Duration, Instant};

use provisioning_gateway::config::TlsConfig;
use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::pki::Ca;
use crate::support::process::GatewayProcess;
use crate::support::{
    Opts, config, metrics_page, request, spawn_app, spawn_config, spawn_open_mock,
};

/// The `caller` label values of this account's request counter.
async fn caller_labels(metrics: std::net::SocketAddr, account: &str) -> Vec<String> {
    let page = metrics_page(metrics).await;
    let mut labels: Vec<String> = page
        .lines()
        .filter(|l| l.starts_with("provisioning_gateway_requests_total{"))
        .filter(|l| l.contains(&format!("account=\"{account}\"")))
        .filter_map(|l| l.split("caller=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect();
    labels.sort();
    labels.dedup();
    labels
}

#[tokio::test]
async fn names_callers_give_themselves_never_become_metric_labels() {
    let app = spawn_app(Opts {
        account_name: "labels-anonymous".into(),
        ..Opts::default()
    })
    .await;
    let mut client = app.client().await;
    for (n, name) in ["who-1", "who-2", "who-3"].into_iter().enumerate() {
        let mut r = tonic::Request::new(request(n));
        r.metadata_mut().insert("x-caller", name.parse().unwrap());
        client.delete_association(r).await.unwrap();
    }
    assert_eq!(
        caller_labels(app.metrics_addr, "labels-anonymous").await,
        ["anonymous"]
    );
}

#[tokio::test]
async fn an_authenticated_caller_no_account_names_is_labelled_unlisted() {
    let ca = Ca::new("labels-ca");
    let server = ca.server();
    let tls = TlsConfig {
        cert: server.cert.clone().into(),
        key: server.key.clone().into(),
        client_ca: Some(ca.pem().into()),
        files: None,
    };
    let (mock, addr, stop) = spawn_open_mock(20).await;
    let opts = Opts {
        account_name: "labels-mtls".into(),
        ..Opts::default()
    };
    let app = spawn_config(
        config(&opts, &format!("http://{addr}")).tls(Some(tls)),
        mock,
        stop,
    )
    .await;
    let leaf = ca.client("spiffe://cluster.test/ns/x/sa/nobody-listed");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&leaf.cert, &leaf.key));
    let channel = Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    AssociationServiceClient::new(channel)
        .delete_association(request(0))
        .await
        .unwrap();
    assert_eq!(
        caller_labels(app.metrics_addr, "labels-mtls").await,
        ["unlisted"]
    );
}

#[tokio::test]
async fn a_drain_longer_than_the_grace_is_cut_short() {
    let app = spawn_app(Opts {
        shutdown_grace: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    let mut hanging = Scripted::new(204, "");
    hanging.delay = Duration::from_secs(30);
    app.mock.script([hanging]);
    let mut client = app.client().await;
    let in_flight = tokio::spawn(async move { client.delete_association(request(0)).await });
    app.mock.wait_for_requests(1).await;
    let started = Instant::now();
    app.stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), app.server)
        .await
        .expect("run_until_stopped returns once the grace is over")
        .unwrap();
    let took = started.elapsed();
    stopped.expect("a cut-short drain is still a clean stop");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "stopped after {took:?} with a 300 ms grace"
    );
    // In the binary, returning ends the process and the call with it.
    assert!(!in_flight.is_finished(), "the call was still upstream");
    in_flight.abort();
}

#[tokio::test]
async fn the_log_event_of_a_call_says_whether_it_shared_another_calls_upstream_call() {
    use sha2::Digest;
    let hex = |token: &str| -> String {
        sha2::Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let (mock, mock_addr, _stop) = spawn_open_mock(20).await;
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(
        &accounts,
        format!(
            "[[accounts]]\nname = \"main\"\nbase_url = \"http://{mock_addr}\"\napi_key_env = \"PG_TEST_KEY\"\n\n\
             [[callers]]\nname = \"lead\"\ntoken_sha256 = \"{}\"\n\n\
             [[callers]]\nname = \"follow\"\ntoken_sha256 = \"{}\"\n",
            hex("lead-token"),
            hex("follow-token")
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start_with(&[
        ("GATEWAY_ACCOUNTS_FILE", accounts.to_str().unwrap()),
        ("PG_TEST_KEY", "test-key"),
    ])
    .await;
    let client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    // The leader's request is held upstream while the identical one joins it.
    let mut slow = Scripted::new(204, "");
    slow.delay = Duration::from_millis(800);
    mock.script([slow]);
    let mut first = client.clone();
    let leading =
        tokio::spawn(async move { first.delete_association(as_caller("lead-token")).await });
    mock.wait_for_requests(1).await;
    client
        .clone()
        .delete_association(as_caller("follow-token"))
        .await
        .unwrap();
    leading.await.unwrap().unwrap();
    assert_eq!(mock.arrivals().len(), 1, "one upstream call for both");
    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    let event = |caller: &str| {
        logs.iter()
            .find(|l| {
                l.contains("association deleted") && l.contains(&format!("\"caller\":\"{caller}\""))
            })
            .unwrap_or_else(|| panic!("no event of {caller}: {logs:?}"))
            .clone()
    };
    assert!(
        event("token:lead").contains("\"coalesced\":false"),
        "{}",
        event("token:lead")
    );
    assert!(
        event("token:follow").contains("\"coalesced\":true"),
        "{}",
        event("token:follow")
    );
}

/// A call with `token` as its bearer credentials.
fn as_caller(token: &str) -> tonic::Request<provisioning_gateway::pb::DeleteAssociationRequest> {
    let mut r = tonic::Request::new(request(0));
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
