//! `holdfast` command line: `run` the daemon, `check-config` a file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast::broker::Broker;
use holdfast::config::Config;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Edge MQTT gateway: local broker, durable sessions, store-and-forward bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        /// TOML configuration file (defaults are used for everything it omits; HOLDFAST_*
        /// environment variables override both).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => check_config(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(Some(&file))?;
    print!("{}", cfg.to_toml());
    eprintln!("holdfast: {} is valid", file.display());
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(config.as_deref())?;
    holdfast::observe::init_tracing(&cfg.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("holdfast")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        info!(version = env!("CARGO_PKG_VERSION"), config = ?config, "holdfast starting");
        let broker = Broker::start(&cfg).await?;
        wait_for_signal().await?;
        broker.shutdown().await;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
