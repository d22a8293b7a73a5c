//! Binary entry: parse the command line, set up logs, run the subcommand.
//! Bad configuration exits 2 with one line naming the setting.

use clap::Parser;
use provisioning_gateway::cli::{self, Cli, Command, LogFormat};
use provisioning_gateway::config::Config;
use provisioning_gateway::mock::{Mock, MockConfig};
use provisioning_gateway::startup::{App, shutdown_signal};
use provisioning_gateway::{demo, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return refused(&error),
    };
    let result = match cli.command {
        Command::Serve(args) => {
            let config = match args.config(std::env::var("INFOBIP_API_KEY").ok()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("provisioning-gateway: {e}");
                    return ExitCode::from(2);
                }
            };
            let format = config.log_format;
            let telemetry = match tokio::task::spawn_blocking(move || telemetry::init(format)).await
            {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("provisioning-gateway: telemetry setup failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = serve(config).await;
            // Flush spans still in the batch (blocking; off the async threads).
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            result
        }
        Command::MockUpstream(args) => {
            telemetry::init_logs(None);
            mock_upstream(args).await
        }
        Command::Demo(args) => {
            let format = Some(LogFormat::Text);
            let telemetry = tokio::task::spawn_blocking(move || telemetry::init(format)).await;
            let result = demo::run(args).await;
            if let Ok(t) = telemetry {
                let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
            }
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provisioning-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command line clap did not accept: `--help` and `--version` as clap
/// prints them (status 0); a bad setting as one line (status 2).
fn refused(error: &clap::Error) -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match cli::refusal(error, &args) {
        Some(line) => {
            eprintln!("{line}");
            ExitCode::from(2)
        }
        None => {
            let _ = error.print();
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    app.run_until_stopped(shutdown_signal()).await
}

async fn mock_upstream(args: provisioning_gateway::cli::MockArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "Infobip emulator listening");
    let mock = Mock::new(MockConfig {
        api_key: args.api_key,
        rate_per_second: args.rate_per_second,
    });
    mock.serve(listener, shutdown_signal()).await?;
    Ok(())
}
