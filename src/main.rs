//! Binary entry: parse the command line, set up logs, run the subcommand.
//! Bad configuration exits 2 with one line naming the setting.

use clap::Parser;
use provisioning_gateway::cli::{Cli, Command};
use provisioning_gateway::config::Config;
use provisioning_gateway::mock::{Mock, MockConfig};
use provisioning_gateway::startup::{App, shutdown_signal};
use provisioning_gateway::{demo, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let config = match Config::from_args(&args, std::env::var("INFOBIP_API_KEY").ok()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("provisioning-gateway: {e}");
                    return ExitCode::from(2);
                }
            };
            telemetry::init_logs(config.log_format);
            serve(config).await
        }
        Command::MockUpstream(args) => {
            telemetry::init_logs(None);
            mock_upstream(args).await
        }
        Command::Demo(args) => {
            telemetry::init_logs(Some(provisioning_gateway::cli::LogFormat::Text));
            demo::run(args).await
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
