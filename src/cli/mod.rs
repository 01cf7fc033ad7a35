//! The `streamex` command line: argument parsing and one module per command.
//!
//! Commands return `anyhow::Result`: this is the edge where typed errors become messages for
//! a person.

mod demo;
mod service;
mod status;
mod tail;

use clap::{Parser, Subcommand, ValueEnum};

pub use service::{ConfigArgs, connect, prepare, run_service};
use tokio_util::sync::CancellationToken;

/// Change-data-capture operator service for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "streamex", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "STREAMEX_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The blog example end to end on a private PostgreSQL cluster: service, operators, live
    /// figures. Ctrl-C stops it and removes the cluster.
    Demo(demo::DemoArgs),
    /// Print every committed change as one JSON object per line on stdout.
    Tail(tail::TailArgs),
    /// Create the streamex schema, the publication and the slot when missing; safe to run again.
    Setup(service::ConfigArgs),
    /// Run the service until SIGINT or SIGTERM.
    Run(service::ConfigArgs),
    /// Show the slot, the WAL it retains, each operator's position and state, process status
    /// and dead letters.
    Status(status::StatusArgs),
    /// Restart a halted operator.
    Resume(service::ResumeArgs),
}

/// Runs the command until it ends or `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args, shutdown).await,
        Command::Tail(args) => tail::run(args, shutdown).await,
        Command::Setup(args) => service::setup_command(args, shutdown).await,
        Command::Run(args) => service::run_command(args, shutdown).await,
        Command::Status(args) => status::status_command(args, shutdown).await,
        Command::Resume(args) => service::resume_command(args, shutdown).await,
    }
}

/// Sets up `tracing` on stderr: the level from `RUST_LOG` (default `info`, sqlx `warn`),
/// human or JSON.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // sqlx reports server notices ("schema already exists, skipping") at info: too chatty.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
