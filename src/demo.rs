//! `demo`: the emulator and the gateway in one process on loopback, with the
//! grpcurl commands to try printed on stdout. The gateway runs with the
//! production defaults except where a demo needs otherwise.

use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::config::{AccountConfig, Config, LogFormat, defaults, endpoint_url};
use crate::keys::{ApiKey, KeySource};
use crate::mock::{Mock, MockConfig};
use crate::startup::{App, shutdown_signal};

const DEMO_KEY: &str = "demo-api-key";

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mock_listener = TcpListener::bind("127.0.0.1:0").await?;
    let mock_addr = mock_listener.local_addr()?;
    let stop = CancellationToken::new();
    let mock = Mock::new(MockConfig {
        api_key: Some(DEMO_KEY.into()),
        rate_per_second: defaults::RATE_PER_SECOND,
    });
    tokio::spawn(mock.serve(mock_listener, stop.clone().cancelled_owned()));

    let key = ApiKey::new(DEMO_KEY).expect("the demo key is a valid key");
    let config = Config::builder()
        .listen(args.listen)
        .metrics_listen(args.metrics_listen)
        .account(AccountConfig::new(
            defaults::ACCOUNT_NAME,
            endpoint_url(&format!("http://{mock_addr}"))?,
            KeySource::Fixed(key),
        ))
        // A demo stops at Ctrl-C without a drain worth waiting 20 s for.
        .shutdown_grace(Duration::from_secs(5))
        .log_format(Some(LogFormat::Text))
        .build()?;
    let app = App::build(config)
        .await
        .context("cannot start the demo gateway")?;
    let addr = app.grpc_addr();
    println!(
        "{}",
        instructions(&addr.to_string(), &mock_addr.to_string())
    );
    app.run_until_stopped(shutdown_signal()).await?;
    stop.cancel();
    Ok(())
}
fn instructions(addr: &str, mock: &str) -> String {
    format!(
        r#"provisioning-gateway demo: gateway on {addr}, Infobip emulator on http://{mock}
Try (Ctrl-C to stop):
  grpcurl -plaintext {addr} list
  grpcurl -plaintext {addr} describe infobip.provisioning.v1.AssociationService
  grpcurl -plaintext {addr} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"resource_type":"RESOURCE_TYPE_NUMBER","channel":"CHANNEL_SMS","application_id":"demo-app","resource_id":"number-key-1"}}' {addr} infobip.provisioning.v1.AssociationService/DeleteAssociation
  (the same call again answers NotFound: the emulator remembers what it deleted)
  grpcurl -plaintext -d '{{"resource_type":"RESOURCE_TYPE_DOMAIN","channel":"CHANNEL_SMS","application_id":"","resource_id":"x"}}' {addr} infobip.provisioning.v1.AssociationService/DeleteAssociation
  (InvalidArgument with a BadRequest naming every bad field)"#
    )
}
