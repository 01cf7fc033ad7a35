//! `streamex setup`, `streamex run`, `streamex worker` and `streamex resume`: the service and
//! the worker, through the library's own [`Service`] and [`Worker`].

use std::path::PathBuf;

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::operator::Registry;
use crate::replication::ConnectParams;
use crate::status;
use crate::{Service, Worker};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "STREAMEX_CONFIG",
        default_value = "config/streamex.toml"
    )]
    pub config: PathBuf,
}

/// Reads the configuration and checks that every operator it names can be built, before
/// anything is connected.
pub(super) fn load(args: &ConfigArgs, registry: &Registry) -> anyhow::Result<Config> {
    let config = Config::load(&args.config)?;
    registry.build(&config.operators)?;
    Ok(config)
}

/// The configuration, without building its operators (`status` and `resume` must work when
/// an operator's settings are what is broken), then a pool on the configured database,
/// retrying while it is unreachable.
pub(super) async fn connect(
    args: &ConfigArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Config, ConnectParams, PgPool)> {
    let config = Config::load(&args.config)?;
    let params = ConnectParams::parse(&config.database_url).context("database_url")?;
    let pool = crate::service::connect(&params, 8, None, shutdown).await?;
    Ok((config, params, pool))
}

pub async fn setup_command(
    args: ConfigArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(&args, registry)?;
    let (publication, slot) = (config.publication.clone(), config.slot.clone());
    let stream = config
        .nats
        .as_ref()
        .map(|n| format!(", JetStream stream {:?} ({}.>)", n.stream, n.subject_prefix))
        .unwrap_or_default();
    Service::builder()
        .config(config)
        .registry(registry.clone())
        .build_until(shutdown)
        .await?;
    println!(
        "ready: schema streamex, publication {publication:?} and slot {slot:?}{stream} in place"
    );
    Ok(())
}

pub async fn run_command(
    args: ConfigArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(&args, registry)?;
    let service = Service::builder()
        .config(config)
        .registry(registry.clone())
        .build_until(shutdown.clone())
        .await?;
    service.run_until(shutdown).await?;
    Ok(())
}

pub async fn worker_command(
    args: ConfigArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = load(&args, registry)?;
    let worker = Worker::builder()
        .config(config)
        .registry(registry.clone())
        .build_until(shutdown.clone())
        .await?;
    worker.run_until(shutdown).await?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The halted operator.
    pub operator: String,
    /// Set the event it halted on aside as a dead letter (in `streamex.dead_letters`) instead
    /// of handling it again: for a change that can never succeed, such as a delete whose old
    /// record lacks a column (it was written under REPLICA IDENTITY DEFAULT and cannot be
    /// re-read otherwise).
    #[arg(long)]
    pub skip_current: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn resume_command(args: ResumeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, _, pool) = connect(&args.config, &shutdown).await?;
    status::migrate(&pool).await?;
    let states = status::load_operator_states(&pool, &config.slot).await?;
    // An operator in partitions: its halted partitions (`<operator>#<p>/<N>`), all of them.
    let mut halted_partitions: Vec<&String> = states
        .iter()
        .filter(|(name, state)| {
            state.state == status::OperatorRunState::Halted
                && crate::operator::partition::split_partition(name)
                    .is_some_and(|(operator, _, _)| operator == args.operator)
        })
        .map(|(name, _)| name)
        .collect();
    halted_partitions.sort();
    if !halted_partitions.is_empty() && args.skip_current {
        let names: Vec<&str> = halted_partitions.iter().map(|n| n.as_str()).collect();
        bail!(
            "operator {:?} runs in partitions, and --skip-current sets aside the event one of \
             them halted on: name the partition (halted: {})",
            args.operator,
            names.join(", ")
        );
    }
    if !halted_partitions.is_empty() {
        for name in halted_partitions {
            status::set_operator_running(&pool, &config.slot, name).await?;
            println!(
                "partition {name:?} set to running; a running service picks it up within seconds \
                 and replays from the slot's position"
            );
        }
        return Ok(());
    }
    // An operator left out of the configuration may still have a halt stored for this slot.
    if !config.operators.iter().any(|o| o.name == args.operator)
        && !states.contains_key(&args.operator)
    {
        let names: Vec<&str> = config.operators.iter().map(|o| o.name.as_str()).collect();
        bail!(
            "no operator {:?} in {} nor stored for slot {:?}: configured operators are {}",
            args.operator,
            args.config.config.display(),
            config.slot,
            names.join(", ")
        );
    }
    if !states
        .get(&args.operator)
        .is_some_and(|s| s.state == status::OperatorRunState::Halted)
    {
        println!("operator {:?} is not halted; nothing to do", args.operator);
        return Ok(());
    }
    if args.skip_current {
        match status::set_operator_running_skipping(&pool, &config.slot, &args.operator).await? {
            Some(position) => println!(
                "operator {:?} set to running; it sets the event at {position} aside in \
                 streamex.dead_letters instead of handling it",
                args.operator
            ),
            None => bail!(
                "operator {:?} is halted, but not on an event: nothing to skip; resume it without \
                 --skip-current",
                args.operator
            ),
        }
        return Ok(());
    }
    status::set_operator_running(&pool, &config.slot, &args.operator).await?;
    println!(
        "operator {:?} set to running; a running service picks it up within seconds and replays from the slot's position",
        args.operator
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// The operator, as the configuration names it.
    pub operator: String,
    /// Only this table of the operator's (repeat for several); every one by default.
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// Ask for it and return, instead of following it to the end.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `streamex backfill` (and, with `rebuild`, `streamex rebuild`): asks the running service to
/// re-send the operator the rows that exist (after its reset, for a rebuild), then follows it
/// until it is done, with a progress bar on a terminal.
pub async fn backfill_command(
    args: BackfillArgs,
    registry: &Registry,
    rebuild: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let what = if rebuild { "rebuild" } else { "backfill" };
    let config = load(&args.config, registry)?;
    let Some(entry) = config.operators.iter().find(|o| o.name == args.operator) else {
        let names: Vec<&str> = config.operators.iter().map(|o| o.name.as_str()).collect();
        bail!(
            "no operator {:?} in {}: configured operators are {}",
            args.operator,
            args.config.config.display(),
            names.join(", ")
        );
    };
    if let Some(partitions) = entry.partitions.filter(|&p| p > 1) {
        bail!(
            "operator {:?} runs in partitions = {partitions}, which do not {what} (each has a \
             checkpoint of its own): take partitions out of its [[operators]] entry, restart, \
             run the {what}, then give them again (the partitions take over from the whole \
             operator's checkpoint)",
            args.operator
        );
    }
    if rebuild && entry.query.is_some() && entry.reset_query.is_none() {
        bail!(
            "operator {:?} has no reset_query, which a rebuild runs before its backfill: set \
             one in its [[operators]] entry (for example a DELETE of every derived row), or use \
             `streamex backfill {}`, which recomputes every id without it",
            args.operator,
            args.operator
        );
    }
    let operator = registry
        .build(std::slice::from_ref(entry))?
        .pop()
        .context("the registry built no operator")?;
    let entities: Vec<String> = operator
        .subscriptions()
        .into_iter()
        .filter(|s| !s.is_messages())
        .map(|s| s.entity)
        .collect();
    if let Some(unknown) = args.tables.iter().find(|t| !entities.contains(t)) {
        bail!(
            "--table {unknown}: operator {:?} does not subscribe to it (it reads {})",
            args.operator,
            entities.join(", ")
        );
    }
    let (_, _, pool) = connect(&args.config, &shutdown).await?;
    status::migrate(&pool).await?;
    let workers =
        crate::service::InstanceLock::worker_holders(&pool, &config.slot, [args.operator.as_str()])
            .await?;
    if let Some(pid) = workers.get(&args.operator) {
        bail!(
            "operator {:?} runs on a `streamex worker` (its lock's backend pid {pid}), and a \
             worker carries out only an operator's first backfill, not `streamex {what}`: stop \
             the operator on the worker, run it under `streamex run` for the {what} (its request \
             waits for it there), then move it back",
            args.operator
        );
    }
    let tables = (!args.tables.is_empty()).then_some(args.tables.as_slice());
    status::request_backfill(&pool, &config.slot, &args.operator, rebuild, tables).await?;
    println!(
        "{what} of {:?} asked for: the running service starts it within a second (or the next \
         `streamex run` does)",
        args.operator
    );
    if args.no_wait {
        return Ok(());
    }
    follow_backfill(&pool, &config.slot, &args.operator, what, &shutdown).await
}

/// Shows the backfill's progress until its request is cleared (done) or the operator halts.
async fn follow_backfill(
    pool: &PgPool,
    slot: &str,
    operator: &str,
    what: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let terminal = std::io::stderr().is_terminal();
    let began = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    let mut said_waiting = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => {
                eprintln!("\nstopped following; the {what} stands and the service carries it out");
                return Ok(());
            }
        }
        let states = status::load_operator_states(pool, slot).await?;
        let state = states.get(operator);
        if state.is_some_and(|s| s.state == status::OperatorRunState::Halted) {
            if terminal {
                eprintln!();
            }
            bail!(
                "operator {operator:?} halted: {}",
                state.and_then(|s| s.last_error.clone()).unwrap_or_default()
            );
        }
        if state.is_none_or(|s| s.backfill_request.is_none()) {
            if terminal {
                eprintln!();
            }
            println!(
                "{what} of {operator:?} done in {:.1} s",
                began.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let line = match state.and_then(|s| s.backfill_progress.clone()) {
            Some(p) => progress_line(&p),
            None => {
                if !said_waiting && began.elapsed() > std::time::Duration::from_secs(3) {
                    said_waiting = true;
                    eprintln!(
                        "waiting for a service to start it: is `streamex run` running on slot {slot:?}?"
                    );
                }
                continue;
            }
        };
        if terminal {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else if last_line.elapsed() >= std::time::Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            eprintln!("{line}");
        }
    }
}

/// `[#####.....] 12000 of ~200000 rows, 50000 rows/s, 4 s left`.
pub(super) fn progress_line(p: &status::BackfillProgress) -> String {
    let secs = (p.updated_at_micros - p.started_at_micros).max(1) as f64 / 1e6;
    let rate = p.rows as f64 / secs;
    let width = 30usize;
    let done = p
        .rows
        .min(p.estimate)
        .saturating_mul(width as u64)
        .checked_div(p.estimate)
        .map_or(0, |d| usize::try_from(d).unwrap_or(width));
    let left = if rate > 0.0 && p.estimate > p.rows {
        format!(", {:.0} s left", (p.estimate - p.rows) as f64 / rate)
    } else {
        String::new()
    };
    format!(
        "[{}{}] {} of ~{} rows, {rate:.0} rows/s{left}",
        "#".repeat(done),
        ".".repeat(width - done),
        p.rows,
        p.estimate
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_the_share_done_the_rate_and_the_time_left() {
        let progress = status::BackfillProgress {
            rows: 50_000,
            estimate: 200_000,
            started_at_micros: 1_000_000,
            updated_at_micros: 11_000_000,
        };
        assert_eq!(
            progress_line(&progress),
            "[#######.......................] 50000 of ~200000 rows, 5000 rows/s, 30 s left"
        );
        let unknown = status::BackfillProgress {
            estimate: 0,
            ..progress
        };
        assert!(progress_line(&unknown).starts_with("[..............................] 50000"));
    }
}
