//! Certificates that rotate (issue 15): the real binary re-reads
//! `--tls-cert`/`--tls-key` on SIGHUP (and every few seconds), new TLS
//! clients see the new certificate, and a bad new file is refused with a
//! warning while the current certificate stays in use.

use std::time::Duration;

use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::support::pki::{Ca, Leaf};
use crate::support::process::GatewayProcess;
use crate::support::{request, spawn_mock};

/// A new TLS connection to `addr` trusting only `ca`.
async fn connect(addr: &str, ca: &Ca) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Whether a call over a new connection trusting `ca` succeeds.
async fn served(addr: &str, ca: &Ca, n: usize) -> bool {
    match connect(addr, ca).await {
        Ok(channel) => AssociationServiceClient::new(channel)
            .delete_association(request(n))
            .await
            .is_ok(),
        Err(_) => false,
    }
}

fn write(dir: &std::path::Path, leaf: &Leaf) {
    std::fs::write(dir.join("key.pem"), &leaf.key).unwrap();
    std::fs::write(dir.join("cert.pem"), &leaf.cert).unwrap();
}

/// Log lines so far (what a later wait looks past).
fn mark(gateway: &GatewayProcess) -> usize {
    gateway.logs.lock().unwrap().len()
}

/// SIGHUP, then waits for a log line with `text` written after `seen` lines
/// (the periodic re-read may also be the one that finds the change).
async fn hup_and_wait(gateway: &GatewayProcess, seen: usize, text: &str) -> String {
    let pid = gateway.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = gateway.logs.lock().unwrap()[seen..]
            .iter()
            .find(|l| l.contains(text))
            .cloned();
        if let Some(line) = found {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {text:?} after SIGHUP"
        );
        // Logs arrive through a pipe; look again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_clients_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old-ca"), Ca::new("new-ca"));
    write(dir.path(), &old_ca.server());
    let (_mock, mock_addr, _stop) = spawn_mock(20).await;
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let gateway = GatewayProcess::start(
        &format!("http://{mock_addr}"),
        &[
            ("GATEWAY_TLS_CERT", cert.to_str().unwrap()),
            ("GATEWAY_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .await;
    let addr = gateway.addr.clone();
    assert!(served(&addr, &old_ca, 1).await);
    assert!(!served(&addr, &new_ca, 2).await, "not yet the new one");

    // Rotated in place, as Kubernetes updates a mounted Secret.
    let seen = mark(&gateway);
    write(dir.path(), &new_ca.server());
    hup_and_wait(&gateway, seen, "TLS certificate reloaded").await;
    assert!(served(&addr, &new_ca, 3).await, "new handshakes use it");
    assert!(!served(&addr, &old_ca, 4).await, "the old one is gone");

    // A broken file: refused, named, and the current certificate stays.
    let seen = mark(&gateway);
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let warning = hup_and_wait(&gateway, seen, "TLS certificate reload refused").await;
    assert!(warning.contains("--tls-cert"), "{warning}");
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        served(&addr, &new_ca, 5).await,
        "still served with the last good one"
    );

    let (status, _) = gateway.terminate().await;
    assert!(status.success());
}
