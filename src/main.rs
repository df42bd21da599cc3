//! The `pullthrough` command: parses flags, loads configuration, runs.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pullthrough::config::{Config, Overrides};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A pull-through cache and mirror for OCI container registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as human text or as JSON.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the pull API.
    Serve {
        /// A TOML configuration file, merged over the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides `[server] listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (overrides `[storage] path`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Never contact any upstream; serve only what the store holds.
        #[arg(long)]
        offline: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), not a debug dump.
            eprintln!("pullthrough: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", pullthrough::config::DEFAULT_CONFIG);
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            data,
            offline,
        } => {
            let overrides = Overrides {
                listen,
                data,
                offline,
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("binding {}", config.server.listen))?;
                pullthrough::run(listener, config, shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
