//! The `streamex` binary: parses the command line, handles signals, runs the command.

use clap::Parser;
use tokio_util::sync::CancellationToken;

// Every event is a few dozen small allocations (a JSON map per record, a key and a value per
// column); with mimalloc instead of glibc's allocator a drain takes 12-15% fewer instructions
// (callgrind, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = streamex::cli::Cli::parse();
    streamex::cli::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        streamex::cli::run(cli, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", streamex::error::chain(&error));
            std::process::ExitCode::FAILURE
        }
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
