//! Hardening (issue 15): a vendor 400 with thousands of problems still fits
//! a client's 8 KiB of headers; the metrics listener bounds header reads and
//! shutdown; a TLS handshake that never comes is dropped; proxy variables
//! never reroute the API key unless `--upstream-proxy` says so.

use std::time::{Duration, Instant};

use provisioning_gateway::config::TlsConfig;
use provisioning_gateway::mock::Scripted;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_types::StatusExt;

use crate::support::pki::Ca;
use crate::support::process::GatewayProcess;
use crate::support::{Opts, config, request, spawn_app, spawn_config, spawn_mock};

/// A vendor 400 listing 5,000 validation errors reaches a client that
/// accepts at most 8 KiB of metadata as INVALID_ARGUMENT with a capped
/// BadRequest (not as a protocol error), saying how many were left out.
#[tokio::test]
async fn a_vendor_400_with_5000_problems_fits_8_kib_of_client_metadata() {
    let app = spawn_app(Opts::default()).await;
    let problems: Vec<String> = (0..5000).map(|i| format!("\"e{i}\"")).collect();
    let body = format!(
        r#"{{"requestError":{{"serviceException":{{"messageId":"BAD_REQUEST","text":"Bad request","validationErrors":{{"applicationId":[{}]}}}}}}}}"#,
        problems.join(",")
    );
    assert!(body.len() < 64 * 1024, "the gateway reads it whole");
    app.mock.script([Scripted::new(400, body)]);
    let channel = Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .http2_max_header_list_size(8 * 1024)
        .connect()
        .await
        .unwrap();
    let mut client = AssociationServiceClient::new(channel);
    let status = client.delete_association(request(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let violations = &details
        .bad_request()
        .expect("a BadRequest")
        .field_violations;
    assert!(
        !violations.is_empty() && violations.len() <= 20,
        "{}",
        violations.len()
    );
    assert!(violations.iter().all(|v| v.field == "application_id"));
    let info = details.error_info().expect("an ErrorInfo");
    let omitted: usize = info.metadata["violations_omitted"].parse().unwrap();
    assert_eq!(violations.len() + omitted, 5000);
    assert!(
        status.details().len() < 6 * 1024,
        "{}",
        status.details().len()
    );
    app.shutdown().await.unwrap();
}

/// A request whose headers never finish is dropped after the header read
/// timeout, and shutdown does not wait for one still open.
#[tokio::test]
async fn the_metrics_listener_bounds_header_reads_and_shutdown() {
    let app = spawn_app(Opts::default()).await;
    let half_sent = async || {
        let mut s = TcpStream::connect(app.metrics_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n")
            .await
            .unwrap();
        s
    };
    let mut slow = half_sent().await;
    let started = Instant::now();
    let mut rest = Vec::new();
    // Bounded: the server answers (408) and closes, or just closes.
    let read = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the half-sent request was never dropped");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "{rest:?}"
    );

    let _held = half_sent().await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), app.shutdown())
        .await
        .expect("shutdown does not wait for a half-sent request")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// A TCP client that never starts its TLS handshake is disconnected.
#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_dropped() {
    let ca = Ca::new("hardening-ca");
    let server = ca.server();
    let (mock, _, mock_stop) = spawn_mock(20).await;
    let tls = TlsConfig {
        cert: server.cert.into_bytes(),
        key: server.key.into_bytes(),
        client_ca: None,
        files: None,
    };
    let app = spawn_config(
        config(&Opts::default(), "http://127.0.0.1:9").tls(Some(tls)),
        mock,
        mock_stop,
    )
    .await;
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a connection without a handshake stays open");
    app.shutdown().await.unwrap();
}

/// A one-shot HTTP proxy: answers each request 204 and keeps its request line.
async fn recording_proxy() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&seen).into_owned();
                let _ = tx.send(text.lines().next().unwrap_or_default().to_owned());
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, rx)
}

/// `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` do not reroute the API key;
/// `--upstream-proxy` does, and is then the only proxy.
#[tokio::test]
async fn proxy_variables_are_ignored_unless_upstream_proxy_is_set() {
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let (proxy, mut proxied) = recording_proxy().await;
    let proxy_url = format!("http://{proxy}");
    let env = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
    ];
    let upstream = format!("http://{mock_addr}");
    let direct = GatewayProcess::start(&upstream, &env).await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", direct.addr))
        .await
        .unwrap();
    client.delete_association(request(1)).await.unwrap();
    assert_eq!(mock.arrivals().len(), 1, "straight to the upstream");
    assert!(proxied.try_recv().is_err(), "the proxy saw nothing");
    assert!(direct.terminate().await.0.success());

    let mut with_flag = env.to_vec();
    with_flag.push(("GATEWAY_UPSTREAM_PROXY", proxy_url.as_str()));
    let via = GatewayProcess::start(&upstream, &with_flag).await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", via.addr))
        .await
        .unwrap();
    client.delete_association(request(2)).await.unwrap();
    let line = proxied.recv().await.unwrap();
    assert_eq!(
        line,
        format!("DELETE http://{mock_addr}/provisioning/1/associations HTTP/1.1")
    );
    assert_eq!(
        mock.arrivals().len(),
        1,
        "the proxy answered, not the upstream"
    );
    assert!(via.terminate().await.0.success());
}
