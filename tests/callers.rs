//! Callers and accounts: mTLS and bearer-token identity, per-account allowed
//! callers, separate budgets per account, fair shares between callers, and
//! API key reload without restart.

use std::time::{Duration, Instant};

use futures::future::join_all;
use provisioning_gateway::KeySource;
use provisioning_gateway::config::{TlsConfig, TokenCaller};
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_types::StatusExt;

use crate::support::pki::{Ca, Leaf};
use crate::support::process::GatewayProcess;
use crate::support::{
    Opts, TestApp, account as upstream_account, config, details, request, spawn_config,
    spawn_open_mock,
};

const ORDERS: &str = "spiffe://cluster.test/ns/orders/sa/orders";
const BILLING: &str = "spiffe://cluster.test/ns/billing/sa/billing";
/// A caller known by its certificate's DNS SAN (no URI SAN).
const REPORTS_DNS: &str = "reports.cluster.test";

/// Two accounts on one open emulator: `main` (any authenticated caller) and
/// `restricted` (only ORDERS, REPORTS_DNS and the token caller `reports`).
async fn two_accounts(tls: Option<TlsConfig>, tokens: Vec<TokenCaller>) -> TestApp {
    let (mock, addr, stop) = spawn_open_mock(20).await;
    let upstream = format!("http://{addr}");
    let restricted =
        upstream_account("restricted", &upstream, "key-restricted").allowed_callers(vec![
            ORDERS.into(),
            format!("dns:{REPORTS_DNS}"),
            "token:reports".into(),
        ]);
    let c = provisioning_gateway::Config::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .metrics_listen("127.0.0.1:0".parse().unwrap())
        .rate_per_second(Opts::default().rate_per_second)
        .safety_margin(Opts::default().safety_margin)
        .account(upstream_account("main", &upstream, "key-main"))
        .account(restricted)
        .tls(tls)
        .callers(tokens);
    spawn_config(c, mock, stop).await
}

fn account<T>(msg: T, name: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-infobip-account", name.parse().unwrap());
    r
}

async fn tls_client(
    app: &TestApp,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<AssociationServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AssociationServiceClient::new(channel))
}

/// The gateway with TLS, requiring client certificates from `ca`.
async fn mtls_gateway(ca: &Ca) -> TestApp {
    let server = ca.server();
    let tls = TlsConfig {
        cert: server.cert.clone().into(),
        key: server.key.clone().into(),
        client_ca: Some(ca.pem().into()),
        files: None,
    };
    two_accounts(Some(tls), Vec::new()).await
}

/// How a connection with `identity` is refused: the whole error chain, from
/// connecting or (TLS 1.3: the client's side of the handshake completes
/// before the server has checked its certificate) from its first call, as
/// the server's TLS alert reached the client. Panics if the call is answered.
async fn tls_refusal(app: &TestApp, ca: &Ca, identity: Option<&Leaf>) -> String {
    let chain = |mut e: Option<&(dyn std::error::Error + 'static)>| {
        let mut chain = Vec::new();
        while let Some(err) = e {
            chain.push(err.to_string());
            e = err.source();
        }
        chain.join(": ")
    };
    match tls_client(app, ca, identity).await {
        Err(e) => chain(Some(&e)),
        Ok(mut client) => {
            let status = client
                .delete_association(request(0))
                .await
                .expect_err("the connection must be refused");
            // A transport failure on the caller's side, not an answer of the gateway.
            assert!(
                matches!(status.code(), Code::Unknown | Code::Unavailable),
                "{status:?}"
            );
            assert!(status.details().is_empty(), "{status:?}");
            format!(
                "{}: {}",
                status.message(),
                chain(std::error::Error::source(&status))
            )
        }
    }
}

#[tokio::test]
async fn mtls_identifies_callers_and_accounts_restrict_them() {
    let ca = Ca::new("callers-ca");
    let app = mtls_gateway(&ca).await;

    // No client certificate: the server's handshake refuses it.
    let refused = tls_refusal(&app, &ca, None).await;
    assert!(
        refused.contains("received fatal alert: CertificateRequired"),
        "a connection without a client certificate is refused at the handshake: {refused}"
    );
    // A certificate from another CA: refused at the handshake as well.
    let rogue = Ca::new("rogue-ca").client(ORDERS);
    let refused = tls_refusal(&app, &ca, Some(&rogue)).await;
    assert!(
        refused.contains("received fatal alert: UnknownCA"),
        "a certificate from an unknown CA is refused at the handshake: {refused}"
    );
    assert!(app.mock.arrivals().is_empty());

    // ORDERS may use both accounts; BILLING only the unrestricted one.
    let mut orders = tls_client(&app, &ca, Some(&ca.client(ORDERS)))
        .await
        .unwrap();
    orders.delete_association(request(2)).await.unwrap();
    orders
        .delete_association(account(request(3), "restricted"))
        .await
        .unwrap();
    let mut billing = tls_client(&app, &ca, Some(&ca.client(BILLING)))
        .await
        .unwrap();
    billing.delete_association(request(4)).await.unwrap();
    let denied = billing
        .delete_association(account(request(5), "restricted"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let info = details::error_info_with(&denied, "CALLER_NOT_ALLOWED");
    assert_eq!(info.metadata["account"], "restricted");
    assert_eq!(
        info.metadata["caller"], "unlisted",
        "BILLING is named by no account"
    );
    assert_eq!(
        app.mock.arrivals().len(),
        3,
        "the denied call spent nothing"
    );
}

#[tokio::test]
async fn mtls_falls_back_to_the_dns_san_when_there_is_no_uri_san() {
    let ca = Ca::new("callers-ca");
    let app = mtls_gateway(&ca).await;
    // Known by its DNS SAN alone: the restricted account lets it in.
    let mut reports = tls_client(&app, &ca, Some(&ca.client_dns(REPORTS_DNS)))
        .await
        .unwrap();
    reports
        .delete_association(account(request(0), "restricted"))
        .await
        .expect("identified as its DNS SAN, which the account allows");
    // Another DNS name: identified (the open account serves it), not allowed.
    let mut stranger = tls_client(&app, &ca, Some(&ca.client_dns("stranger.cluster.test")))
        .await
        .unwrap();
    stranger.delete_association(request(1)).await.unwrap();
    let denied = stranger
        .delete_association(account(request(2), "restricted"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    details::error_info_with(&denied, "CALLER_NOT_ALLOWED");
    // A URI SAN comes first: BILLING with REPORTS_DNS beside it is BILLING.
    let both = ca.client_uri_and_dns(BILLING, REPORTS_DNS);
    let mut billing = tls_client(&app, &ca, Some(&both)).await.unwrap();
    let denied = billing
        .delete_association(account(request(3), "restricted"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    details::error_info_with(&denied, "CALLER_NOT_ALLOWED");
    assert_eq!(
        app.mock.arrivals().len(),
        2,
        "the denied calls spent nothing"
    );
}

/// Behind a mesh: the sidecar's identity header authenticates the caller
/// as `mesh:<value>`, usable in `allowed_callers`; a call without it is
/// unauthenticated, and the header's value never passes for a token caller.
#[tokio::test]
async fn the_mesh_identity_header_identifies_callers_in_their_own_namespace() {
    const ORDERS_L5D: &str = "orders.orders.serviceaccount.identity.linkerd.cluster.local";
    let (mock, addr, stop) = spawn_open_mock(20).await;
    let upstream = format!("http://{addr}");
    let restricted = upstream_account("restricted", &upstream, "key-restricted")
        .allowed_callers(vec![format!("mesh:{ORDERS_L5D}"), "token:reports".into()]);
    let c = config(&Opts::default(), &upstream)
        .account(restricted)
        .mesh_identity_header(Some("l5d-client-id".into()));
    let app = spawn_config(c, mock, stop).await;
    let mut client = app.client().await;
    let meshed = |mut r: tonic::Request<_>, id: &str| {
        r.metadata_mut()
            .insert("l5d-client-id", id.parse().unwrap());
        r
    };
    client
        .delete_association(meshed(account(request(1), "restricted"), ORDERS_L5D))
        .await
        .unwrap();
    for other in [
        "billing.billing.serviceaccount.identity.linkerd.cluster.local",
        "reports",
        "token:reports",
    ] {
        let denied = client
            .delete_association(meshed(account(request(2), "restricted"), other))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{other}: {denied:?}");
        details::error_info_with(&denied, "CALLER_NOT_ALLOWED");
    }
    let anonymous = client
        .delete_association(account(request(3), "restricted"))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    // Any meshed caller may use the open account, and is labelled as such.
    client
        .delete_association(meshed(tonic::Request::new(request(4)), ORDERS_L5D))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 2, "refused calls spent nothing");
    let page = crate::support::metrics_page(app.metrics_addr).await;
    assert!(
        page.contains(&format!("caller=\"mesh:{ORDERS_L5D}\"")),
        "{page}"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn bearer_tokens_identify_callers() {
    let token =
        |name: &str, secret: &str| TokenCaller::with_token(name, secret, std::num::NonZeroU32::MIN);
    let app = two_accounts(
        None,
        vec![
            token("reports", "reports-secret"),
            token("audit", "audit-secret"),
        ],
    )
    .await;
    let mut client = app.client().await;
    let bearer = |mut r: tonic::Request<_>, secret: &str| {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        r
    };
    let none = client.delete_association(request(0)).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    details::error_info_with(&none, "UNAUTHENTICATED");
    let wrong = client
        .delete_association(bearer(tonic::Request::new(request(0)), "guess"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    details::error_info_with(&wrong, "UNAUTHENTICATED");
    assert!(
        !format!("{wrong:?}").contains("guess"),
        "the token is not echoed"
    );
    client
        .delete_association(bearer(account(request(1), "restricted"), "reports-secret"))
        .await
        .unwrap();
    let denied = client
        .delete_association(bearer(account(request(2), "restricted"), "audit-secret"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let info = details::error_info_with(&denied, "CALLER_NOT_ALLOWED");
    assert_eq!(info.metadata["caller"], "token:audit");
    client
        .delete_association(bearer(tonic::Request::new(request(3)), "audit-secret"))
        .await
        .unwrap();
    assert_eq!(app.mock.arrivals().len(), 2);
}

#[tokio::test]
async fn accounts_keep_separate_budgets_and_unknown_ones_are_refused() {
    let (mock, addr, stop) = spawn_open_mock(1).await;
    let upstream = format!("http://{addr}");
    let c = provisioning_gateway::Config::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .metrics_listen("127.0.0.1:0".parse().unwrap())
        .rate_per_second(1)
        .safety_margin(Opts::default().safety_margin)
        .account(upstream_account("a", &upstream, "key-a"))
        .account(upstream_account("b", &upstream, "key-b"));
    let app = spawn_config(c, mock, stop).await;
    let client = app.client().await;
    let calls = ["a", "b", "a", "b"]
        .into_iter()
        .enumerate()
        .map(|(n, acct)| {
            let mut c = client.clone();
            async move { c.delete_association(account(request(n), acct)).await }
        });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let arrivals = app.mock.arrivals();
    let key = |i: usize| {
        arrivals[i].headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    // One from each account at once, then one from each a second later.
    let first_b = (0..4).find(|&i| key(i) == "App key-b").unwrap();
    let first_a = (0..4).find(|&i| key(i) == "App key-a").unwrap();
    let apart = arrivals[first_a].at.max(arrivals[first_b].at)
        - arrivals[first_a].at.min(arrivals[first_b].at);
    assert!(
        apart < Duration::from_millis(500),
        "two accounts do not wait for each other ({apart:?})"
    );

    let unknown = client
        .clone()
        .delete_association(account(request(9), "nope"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    details::error_info_with(&unknown, "UNKNOWN_ACCOUNT");
    let d = unknown.get_error_details();
    assert_eq!(
        d.bad_request().unwrap().field_violations[0].field,
        "x-infobip-account"
    );
}

#[tokio::test]
async fn a_single_call_is_served_within_two_intervals_of_a_flood() {
    let (mock, addr, stop) = spawn_open_mock(5).await;
    let opts = Opts {
        rate_per_second: 5,
        ..Opts::default()
    };
    let app = spawn_config(config(&opts, &format!("http://{addr}")), mock, stop).await;
    let client = app.client().await;
    let named = |n: usize, who: &str| {
        let mut r = tonic::Request::new(request(n));
        r.metadata_mut().insert("x-caller", who.parse().unwrap());
        r
    };
    let flood: Vec<_> = (0..30)
        .map(|n| {
            let mut c = client.clone();
            let r = named(n, "flood");
            tokio::spawn(async move { c.delete_association(r).await })
        })
        .collect();
    app.mock.wait_for_requests(2).await; // the flood is flowing
    let joined = Instant::now();
    let mut c = client.clone();
    c.delete_association(named(100, "single")).await.unwrap();
    let waited = joined.elapsed();
    let interval = Duration::from_secs(1) / 5 + opts.safety_margin;
    // Round-robin: at most the flood call already holding the slot, and one
    // more, before it — not the 28 still waiting.
    assert!(
        waited <= interval * 2 + Duration::from_millis(150),
        "waited {waited:?}"
    );
    for f in flood {
        f.abort();
    }
}

#[tokio::test]
async fn a_changed_key_file_is_used_without_restart_and_a_call_in_flight_keeps_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "first-key").unwrap();
    let (mock, mock_addr, _stop) = spawn_open_mock(20).await;
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(
        &accounts,
        format!("[[accounts]]\nname = \"main\"\nbase_url = \"http://{mock_addr}\"\napi_key_file = {:?}\n", key_file),
    )
    .unwrap();
    let gateway =
        GatewayProcess::start_with(&[("GATEWAY_ACCOUNTS_FILE", accounts.to_str().unwrap())]).await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    // The first call is upstream, its answer held back, while the key turns.
    let mut slow = provisioning_gateway::mock::Scripted::new(204, "");
    slow.delay = Duration::from_millis(1500);
    mock.script([slow]);
    let mut first = client.clone();
    let in_flight = tokio::spawn(async move { first.delete_association(request(0)).await });
    mock.wait_for_requests(1).await;
    std::fs::write(&key_file, "second-key").unwrap();
    // SIGHUP reloads at once (the file is also re-read every 2 s).
    let pid = gateway.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    gateway
        .wait_for_log("API key reloaded", Duration::from_secs(10))
        .await;
    assert!(
        !in_flight.is_finished(),
        "rotated while the call was upstream"
    );
    in_flight
        .await
        .unwrap()
        .expect("the call in flight finishes");
    client.delete_association(request(1)).await.unwrap();
    let keys: Vec<_> = mock
        .arrivals()
        .iter()
        .map(|a| a.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        ["App first-key", "App second-key"],
        "one request each, the first with the key it was sent with"
    );
    let (status, logs) = gateway.terminate().await;
    assert!(status.success());
    assert!(
        logs.iter()
            .all(|l| !l.contains("first-key") && !l.contains("second-key")),
        "no key in logs"
    );
}

#[test]
fn key_sources_read_env_variables_by_name() {
    // The accounts file's api_key_env names a variable; PATH always exists.
    assert!(KeySource::Env("PATH".into()).read().is_ok());
    assert!(
        KeySource::Env("PG_SURELY_UNSET_VARIABLE".into())
            .read()
            .is_err()
    );
}
