//! The `streamex` command line, for the stock binary and for yours.
//!
//! [`main`] is the whole of a binary: it parses the arguments, sets up logging, handles
//! SIGINT/SIGTERM, runs the command with the operators of the [`Registry`] it is given, and
//! returns the exit code. The stock `streamex` is `cli::main(streamex::operators::registry())`;
//! a binary of your own passes a registry with your operators, and gets every command with
//! them: `run`, `worker`, `setup`, `status`, `resume`, `backfill`, `rebuild`, `tail`, `demo`.
//!
//! ```no_run
//! use streamex::operator::Registry;
//! # use streamex::{event::Event, operator::{Context, Operator, Subscription}};
//! # struct MyOperator;
//! # impl Operator for MyOperator {
//! #     fn name(&self) -> &str { "my_operator" }
//! #     fn subscriptions(&self) -> Vec<Subscription> { vec![Subscription::all("posts")] }
//! #     async fn handle(&self, _: &Event, _: &mut Context<'_>) -> anyhow::Result<()> { Ok(()) }
//! # }
//!
//! fn main() -> std::process::ExitCode {
//!     streamex::cli::main(
//!         streamex::operators::registry()
//!             .merge(Registry::new().register("my_operator", || MyOperator)),
//!     )
//! }
//! ```
//!
//! `examples/blog-app` in streamex's repository is such a binary, with an operator of its
//! own, its configuration, its schema and its tests.
//!
//! Commands return `anyhow::Result`: this is the edge where typed errors become messages for
//! a person.

mod demo;
mod service;
mod status;
mod tail;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::operator::Registry;

/// Change-data-capture operator service for PostgreSQL.
#[derive(Debug, clap::Parser)]
#[command(name = "streamex", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "STREAMEX_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event, for a person.
    Human,
    /// One JSON object per event, for a log collector.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The blog example end to end on a private PostgreSQL cluster: service, operators, live
    /// figures. Ctrl-C stops it and removes the cluster.
    Demo(demo::DemoArgs),
    /// Print every committed change as one JSON object per line on stdout.
    Tail(tail::TailArgs),
    /// Create the streamex schema, the publication and the slot when missing; safe to run again.
    Setup(service::ConfigArgs),
    /// Run the service until SIGINT or SIGTERM.
    Run(service::ConfigArgs),
    /// Run the configuration's operators from the JetStream stream of `[nats]` (that a
    /// `streamex run` publishes to) instead of the slot, until SIGINT or SIGTERM.
    Worker(service::ConfigArgs),
    /// Show the slot, the WAL it retains, each operator's position and state, process status
    /// and dead letters.
    Status(status::StatusArgs),
    /// Restart a halted operator.
    Resume(service::ResumeArgs),
    /// Re-send an operator the rows that exist (as `read` events), then the changes after
    /// them: for derived state a row's event recomputes.
    Backfill(service::BackfillArgs),
    /// Reset an operator (its reset: `reset_query`, or a Rust operator's `reset`) and backfill
    /// it, in one transaction: for incremental derived state.
    Rebuild(service::BackfillArgs),
}

/// The whole `streamex` command line with `registry`'s operators: parses the arguments, sets
/// up logging ([`init_logging`]), runs the command until it ends or a signal asks it to stop
/// (SIGINT or SIGTERM: what is in flight is finished, progress stored and acknowledged; a
/// second signal exits at once), and returns the exit code (1 with the error on stderr).
/// [`App`] does the same under your binary's own name and version.
pub fn main(registry: Registry) -> ExitCode {
    App::new(registry).main()
}

/// [`main`] for a binary of your own, under its name, version and description in `--help`,
/// `--version` and usage errors:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     streamex::cli::App::new(streamex::operators::registry())
///         .name("blog-app")
///         .version(env!("CARGO_PKG_VERSION"))
///         .about("The blog application's change-data-capture service")
///         .main()
/// }
/// ```
#[derive(Clone)]
pub struct App {
    registry: Registry,
    name: Option<&'static str>,
    version: Option<&'static str>,
    about: Option<&'static str>,
}

impl App {
    /// The command line with `registry`'s operators, as `streamex` until renamed.
    pub fn new(registry: Registry) -> Self {
        App {
            registry,
            name: None,
            version: None,
            about: None,
        }
    }

    /// The binary's name.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = Some(name);
        self
    }

    /// The version `--version` prints.
    pub fn version(mut self, version: &'static str) -> Self {
        self.version = Some(version);
        self
    }

    /// The line `--help` starts with.
    pub fn about(mut self, about: &'static str) -> Self {
        self.about = Some(about);
        self
    }

    /// Parses the arguments and runs the command, as [`main`] does.
    pub fn main(self) -> ExitCode {
        let mut command = Cli::command();
        if let Some(name) = self.name {
            command = command.name(name).bin_name(name);
        }
        if let Some(version) = self.version {
            command = command.version(version);
        }
        if let Some(about) = self.about {
            command = command.about(about);
        }
        let cli = match Cli::from_arg_matches(&command.get_matches()) {
            Ok(cli) => cli,
            Err(error) => error.exit(),
        };
        init_logging(cli.log_format);
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: starting the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        let registry = self.registry;
        let result = runtime.block_on(async {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            run(cli.command, &registry, shutdown).await
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {}", crate::error::chain(&error));
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the command until it ends or `shutdown` is cancelled.
async fn run(
    command: Command,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => demo::run(args, registry, shutdown).await,
        Command::Tail(args) => tail::run(args, shutdown).await,
        Command::Setup(args) => service::setup_command(args, registry, shutdown).await,
        Command::Run(args) => service::run_command(args, registry, shutdown).await,
        Command::Worker(args) => service::worker_command(args, registry, shutdown).await,
        Command::Status(args) => status::status_command(args, shutdown).await,
        Command::Resume(args) => service::resume_command(args, shutdown).await,
        Command::Backfill(args) => service::backfill_command(args, registry, false, shutdown).await,
        Command::Rebuild(args) => service::backfill_command(args, registry, true, shutdown).await,
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            tracing::info!("shutting down: finishing what is in flight");
            shutdown.cancel();
        }
    }
    tracing::warn!("second signal: exiting without a clean shutdown");
    std::process::exit(130);
}

/// Sets up `tracing` on stderr: the level from `RUST_LOG` (default `info`, sqlx `warn`),
/// human or JSON; colours only when stderr is a terminal. Does nothing when the program has
/// set up a subscriber of its own.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    // sqlx reports server notices ("schema already exists, skipping") at info: too chatty.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
