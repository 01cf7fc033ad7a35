//! `streamex status`: what the person on call needs first. Whether an instance is active, the
//! slot and the WAL it holds, each operator's position and state (every operator with rows for
//! this slot, those the configuration no longer names marked so), the process status, the dead
//! letters.
//!
//! It only reads: it takes no lock and migrates nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::service::{ConfigArgs, connect};
use crate::config::StatusBackendKind;
use crate::event::micros_rfc3339;
use crate::replication::{Lsn, SlotInfo, setup};
use crate::service::InstanceLock;
use crate::status::{self, OperatorRunState, PostgresStatus, ProcessStatusStorage};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    database: String,
    /// The server the connection reached (of several, the one `target_session_attrs` chose):
    /// its version, whether it is a primary, its address.
    server: String,
    /// Whether a `streamex run` holds the slot's instance lock: only then do operators run.
    instance_active: bool,
    /// The backend pid of the active `streamex run` (the holder of the slot's instance lock).
    active_instance_pid: Option<i32>,
    /// The backend pids of instances waiting to take over (their lock connections).
    standby_instance_pids: Vec<i32>,
    slot_name: String,
    slot: Option<SlotInfo>,
    /// The physical slots `synchronized_standby_slots` names (PostgreSQL 17+): the standbys
    /// the server waits for before it sends streamex a change, and whose flush streamex's
    /// acknowledgement waits for.
    standby_slots: Vec<StandbySlotLine>,
    /// Every operator of the configuration, then every other one with rows for this slot.
    operators: Vec<OperatorLine>,
    /// Rows from before operator state was kept per slot that no slot has adopted yet.
    unadopted_rows: i64,
    /// The streamex schema is older than this binary (no per-slot operator state yet).
    schema_outdated: bool,
    process_status_backend: &'static str,
    process_status: Vec<EntityLine>,
    dead_letters: Vec<DeadLetterLine>,
    /// With `[nats]`: the JetStream stream the events go to.
    jetstream: Option<JetStreamLine>,
}

#[derive(Debug, Serialize)]
struct JetStreamLine {
    stream: String,
    url: String,
    /// Why it could not be read, when it could not.
    error: Option<String>,
    messages: Option<u64>,
    bytes: Option<u64>,
    last_sequence: Option<u64>,
    /// The position of the event its last message holds.
    last_position: Option<String>,
    consumers: Option<usize>,
    /// Each consumer: a worker's operators have one each (its session's).
    consumer_states: Vec<crate::jetstream::ConsumerState>,
}

#[derive(Debug, Serialize)]
struct OperatorLine {
    name: String,
    /// Whether the configuration's `[[operators]]` name it. One that it does not name is not
    /// run with this configuration, so it holds nothing back: the engine acknowledges the slot
    /// over the operators it runs only.
    in_config: bool,
    /// The stored state, `running` or `halted`. `running` means "runs while an instance is
    /// active"; see `processing`.
    state: String,
    /// Whether it is processing now: running, and in the configuration with an instance
    /// active, or on a worker.
    processing: bool,
    /// The backend pid of the lock session of the `streamex worker` that runs it, if one does.
    worker_pid: Option<i32>,
    checkpoint_commit_lsn: Option<Lsn>,
    checkpoint_ordinal: Option<u64>,
    /// Bytes of WAL the server has written after the checkpoint's commit.
    checkpoint_behind_wal_bytes: Option<u64>,
    last_error: Option<String>,
    failed_at: Option<String>,
    dead_letters: i64,
    /// `backfill` or `rebuild` asked for and not done yet.
    backfill_request: Option<String>,
    /// Its partitions on workers (`partitions = N`), by count then index: the configured
    /// count's, and an earlier count's while its rows are still kept.
    partitions: Vec<PartitionLine>,
    /// The running (or last unfinished) backfill's progress, as a line.
    backfill_progress: Option<String>,
}

/// One partition of an operator on workers (`<operator>#<index>/<count>`).
#[derive(Debug, Serialize)]
struct PartitionLine {
    name: String,
    index: u32,
    count: u32,
    /// Whether `count` is the operator's configured `partitions`: otherwise an earlier count,
    /// whose rows go once every partition of the new count is past them.
    current: bool,
    halted: bool,
    last_error: Option<String>,
    worker_pid: Option<i32>,
    checkpoint_commit_lsn: Option<Lsn>,
    checkpoint_ordinal: Option<u64>,
    checkpoint_behind_wal_bytes: Option<u64>,
    dead_letters: i64,
}

#[derive(Debug, Serialize)]
struct StandbySlotLine {
    name: String,
    /// Whether the slot exists on the server.
    exists: bool,
    /// Whether a standby streams from it now.
    active: bool,
    /// Bytes of WAL the server has written after what the standby confirmed.
    behind_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
struct EntityLine {
    entity: String,
    timestamp: String,
    timestamp_micros: i64,
    lsn: Lsn,
}

#[derive(Debug, Serialize)]
struct DeadLetterLine {
    operator: String,
    count: i64,
}

pub async fn status_command(args: StatusArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, params, pool) = connect(&args.config, &shutdown).await?;
    let slot = setup::slot_info(&pool, &config.slot).await?;
    let standby_slots = standby_slots(&pool).await?;
    let server: String = sqlx::query_scalar(
        "SELECT 'PostgreSQL ' || current_setting('server_version')
                || CASE WHEN pg_is_in_recovery() THEN ', a standby (in recovery)' ELSE ', primary' END
                || coalesce(', ' || host(inet_server_addr()) || ':' || inet_server_port(),
                            ', over a Unix socket')",
    )
    .fetch_one(&pool)
    .await
    .context("asking the server what it is")?;
    // The migration creates every table in one transaction: one of them stands for all.
    let (has_schema, per_slot): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('streamex.process_status') IS NOT NULL,
                EXISTS (SELECT 1 FROM information_schema.columns
                         WHERE table_schema = 'streamex' AND table_name = 'operator_state'
                           AND column_name = 'slot')",
    )
    .fetch_one(&pool)
    .await
    .context("looking for the streamex schema")?;
    let items = match (has_schema, config.process_status.backend) {
        (true, StatusBackendKind::Postgres) => PostgresStatus::new(pool.clone()).load().await?,
        _ => Vec::new(),
    };
    let (checkpoints, states, dead, unadopted_rows) = if per_slot {
        (
            status::load_checkpoints(&pool, &config.slot).await?,
            status::load_operator_states(&pool, &config.slot).await?,
            count_dead_letters(&pool, &config.slot).await?,
            status::count_unkeyed_rows(&pool).await?,
        )
    } else {
        Default::default()
    };
    let active_instance_pid = InstanceLock::holder(&pool, &config.slot).await?;
    let instance_active = active_instance_pid.is_some();
    let current_wal: Option<String> = sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                     ELSE pg_current_wal_lsn() END::text",
    )
    .fetch_one(&pool)
    .await
    .context("reading the server's WAL position")?;
    let current_wal: Option<Lsn> = current_wal.and_then(|text| text.parse().ok());

    // The configuration's operators in its order, then the others with rows for this slot;
    // a partition's rows go under its operator.
    let configured: Vec<&str> = config.operators.iter().map(|o| o.name.as_str()).collect();
    let names: BTreeSet<&str> = checkpoints
        .keys()
        .chain(states.keys())
        .chain(dead.keys())
        .map(String::as_str)
        .collect();
    let looked_up = names.iter().chain(&configured).copied();
    let workers = InstanceLock::worker_holders(&pool, &config.slot, looked_up)
        .await
        .context("looking for workers' lock sessions (pg_locks)")?;
    let behind = |checkpoint: Option<&crate::lsn::Position>| {
        checkpoint
            .zip(current_wal)
            .map(|(c, wal)| wal.0.saturating_sub(c.commit_lsn.0))
    };
    let mut partitions: BTreeMap<&str, Vec<PartitionLine>> = BTreeMap::new();
    for name in &names {
        let Some((operator, index, count)) = crate::worker::split_partition(name) else {
            continue;
        };
        let configured_count = config
            .operators
            .iter()
            .find(|o| o.name == operator)
            .map_or(1, |o| o.partitions.unwrap_or(1));
        let checkpoint = checkpoints.get(*name);
        let state = states.get(*name);
        partitions.entry(operator).or_default().push(PartitionLine {
            name: (*name).to_owned(),
            index,
            count,
            current: count == configured_count,
            halted: state.is_some_and(|s| s.state == OperatorRunState::Halted),
            last_error: state.and_then(|s| s.last_error.clone()),
            worker_pid: workers.get(*name).copied(),
            checkpoint_commit_lsn: checkpoint.map(|c| c.commit_lsn),
            checkpoint_ordinal: checkpoint.map(|c| c.ordinal),
            checkpoint_behind_wal_bytes: behind(checkpoint),
            dead_letters: dead.get(*name).copied().unwrap_or(0),
        });
    }
    for lines in partitions.values_mut() {
        lines.sort_by_key(|p| (!p.current, p.count, p.index));
    }
    let others: BTreeSet<&str> = names
        .iter()
        .copied()
        .filter(|name| crate::worker::split_partition(name).is_none())
        .chain(partitions.keys().copied())
        .filter(|name| !configured.contains(name))
        .collect();
    let operators = configured
        .iter()
        .map(|name| (*name, true))
        .chain(others.into_iter().map(|name| (name, false)))
        .map(|(name, in_config)| {
            let checkpoint = checkpoints.get(name);
            let state = states.get(name);
            let halted = state.is_some_and(|s| s.state == OperatorRunState::Halted);
            let worker_pid = workers.get(name).copied();
            let partitions = partitions.remove(name).unwrap_or_default();
            OperatorLine {
                name: name.to_owned(),
                in_config,
                state: if halted { "halted" } else { "running" }.into(),
                // A partitioned operator runs under the active instance, or on workers (one
                // session per partition).
                processing: !halted
                    && if partitions.iter().any(|p| p.current) {
                        (in_config && instance_active)
                            || partitions
                                .iter()
                                .any(|p| p.current && p.worker_pid.is_some())
                    } else {
                        (in_config && instance_active) || worker_pid.is_some()
                    },
                worker_pid,
                checkpoint_commit_lsn: checkpoint.map(|c| c.commit_lsn),
                checkpoint_ordinal: checkpoint.map(|c| c.ordinal),
                checkpoint_behind_wal_bytes: behind(checkpoint),
                last_error: state.and_then(|s| s.last_error.clone()),
                failed_at: state
                    .and_then(|s| Some(format!("{}#{}", s.failed_commit_lsn?, s.failed_ordinal?))),
                dead_letters: dead.get(name).copied().unwrap_or(0),
                partitions,
                backfill_request: state.and_then(|s| {
                    s.backfill_request.as_ref().map(|r| {
                        let what = if r.rebuild { "rebuild" } else { "backfill" };
                        match &r.tables {
                            Some(tables) => format!("{what} of {}", tables.join(", ")),
                            None => what.to_owned(),
                        }
                    })
                }),
                backfill_progress: state.and_then(|s| {
                    s.backfill_progress.as_ref().map(|p| {
                        format!(
                            "{}, updated {}",
                            super::service::progress_line(p),
                            micros_rfc3339::format(p.updated_at_micros)
                        )
                    })
                }),
            }
        })
        .collect();
    let jetstream = match &config.nats {
        Some(nats) => Some(jetstream_line(nats).await),
        None => None,
    };
    let report = Report {
        database: params.redacted_url(),
        server,
        instance_active,
        active_instance_pid,
        standby_instance_pids: InstanceLock::standbys(&pool, &config.slot, active_instance_pid)
            .await?,
        slot_name: config.slot.clone(),
        slot,
        standby_slots,
        operators,
        unadopted_rows,
        schema_outdated: has_schema && !per_slot,
        process_status_backend: match config.process_status.backend {
            StatusBackendKind::Postgres => "postgres",
            StatusBackendKind::Memory => "memory",
        },
        process_status: items
            .into_iter()
            .map(|i| EntityLine {
                entity: i.entity,
                timestamp: micros_rfc3339::format(i.timestamp),
                timestamp_micros: i.timestamp,
                lsn: i.lsn,
            })
            .collect(),
        dead_letters: dead
            .into_iter()
            .map(|(operator, count)| DeadLetterLine { operator, count })
            .collect(),
        jetstream,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, has_schema));
    }
    Ok(())
}

/// A checkpoint as `lsn#ordinal`, when there is one.
fn checkpoint_text(lsn: Option<Lsn>, ordinal: Option<u64>) -> Option<String> {
    Some(format!("{}#{}", lsn?, ordinal?))
}

/// `, N behind the WAL` for a checkpoint that far behind, or nothing.
fn behind_wal(bytes_behind: Option<u64>) -> String {
    bytes_behind
        .map(|n| {
            format!(
                ", {} behind the WAL",
                bytes(i64::try_from(n).unwrap_or(i64::MAX))
            )
        })
        .unwrap_or_default()
}

/// An operator's partitions under its line: each one's worker, checkpoint and lag, the
/// current count first, then an earlier one's with what happens to it.
fn render_partitions(out: &mut String, o: &OperatorLine, width: usize) {
    use std::fmt::Write;
    let mut earlier_said = BTreeSet::new();
    for p in &o.partitions {
        if !p.current && earlier_said.insert(p.count) {
            let _ = writeln!(
                out,
                "  {:width$}  partitions of an earlier count ({}): kept until every partition of                  the configured count is past them, then removed by the workers",
                "", p.count
            );
        }
        let state = match (p.halted, p.worker_pid) {
            (true, _) => "halted".to_owned(),
            (false, Some(pid)) => format!("on a worker (backend pid {pid})"),
            (false, None) if p.current => "no worker holds it".to_owned(),
            (false, None) => "not run".to_owned(),
        };
        let checkpoint = checkpoint_text(p.checkpoint_commit_lsn, p.checkpoint_ordinal)
            .unwrap_or_else(|| "-".into());
        let behind = behind_wal(p.checkpoint_behind_wal_bytes);
        let dead = if p.dead_letters > 0 {
            format!(", {} dead letters", p.dead_letters)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:width$}  partition {}/{}  {state}  checkpoint {checkpoint}{behind}{dead}",
            "", p.index, p.count
        );
        if p.halted {
            let _ = writeln!(
                out,
                "  {:width$}    {}: fix the cause, then `streamex resume '{}'`",
                "",
                p.last_error.as_deref().unwrap_or("-"),
                p.name
            );
        }
    }
}

/// The stream `[nats]` names, as JetStream has it; an error line (not a failure) when it
/// cannot be read within a few seconds: the rest of the status matters as much.
async fn jetstream_line(nats: &crate::config::NatsConfig) -> JetStreamLine {
    use crate::jetstream;
    let mut line = JetStreamLine {
        stream: nats.stream.clone(),
        url: nats.url.clone(),
        error: None,
        messages: None,
        bytes: None,
        last_sequence: None,
        last_position: None,
        consumers: None,
        consumer_states: Vec::new(),
    };
    let read = async {
        let client = jetstream::connect(nats).await?;
        let context = jetstream::context(client, nats);
        let (state, tip) = jetstream::state_and_tip(&context, &nats.stream, None).await?;
        let consumers = jetstream::consumer_states(&context, &nats.stream).await?;
        Ok::<_, jetstream::JetStreamError>((state, tip, consumers))
    };
    match tokio::time::timeout(nats.timeout.max(std::time::Duration::from_secs(3)), read).await {
        Ok(Ok((state, tip, consumers))) => {
            line.messages = Some(state.messages);
            line.bytes = Some(state.bytes);
            line.last_sequence = Some(state.last_sequence);
            line.consumers = Some(state.consumer_count);
            line.last_position = tip.position.map(|p| p.to_string());
            line.consumer_states = consumers;
        }
        Ok(Err(e)) => line.error = Some(e.to_string()),
        Err(_) => {
            line.error = Some(format!(
                "no answer from NATS at {} within {:?} (nats.url)",
                nats.url,
                nats.timeout.max(std::time::Duration::from_secs(3))
            ))
        }
    }
    line
}

/// Dead letters per operator of `slot`, by name.
async fn count_dead_letters(
    pool: &sqlx::PgPool,
    slot: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT operator, count(*) FROM streamex.dead_letters WHERE slot = $1
          GROUP BY operator ORDER BY operator",
    )
    .bind(slot)
    .fetch_all(pool)
    .await
    .context("counting dead letters")?;
    Ok(rows.into_iter().collect())
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn render(report: &Report, has_schema: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "database  {}", report.database);
    let _ = writeln!(out, "server    {}", report.server);
    match report.active_instance_pid {
        Some(pid) => {
            let _ = writeln!(
                out,
                "instance  active: `streamex run` holds the slot's lock (backend pid {pid}); others wait as standbys"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "instance  NONE ACTIVE for this slot: nothing is processed until `streamex run` starts"
            );
            if let Some(pid) = report.slot.as_ref().and_then(|s| s.active_pid) {
                let _ = writeln!(
                    out,
                    "          yet the slot is streaming to walsender pid {pid}: another client \
                     (`streamex tail --slot`, or a program of your own) is reading it"
                );
            }
        }
    }
    if !report.standby_instance_pids.is_empty() {
        let pids: Vec<String> = report
            .standby_instance_pids
            .iter()
            .map(i32::to_string)
            .collect();
        let _ = writeln!(
            out,
            "standby   {} waiting to take over (backend pids {})",
            pids.len(),
            pids.join(", ")
        );
    }
    match &report.slot {
        None => {
            let _ = writeln!(
                out,
                "slot      {:?} does not exist: run `streamex setup`",
                report.slot_name
            );
        }
        Some(slot) => {
            let active = match slot.active_pid {
                Some(pid) => format!("streaming (walsender pid {pid})"),
                None => "not streaming".into(),
            };
            let _ = writeln!(out, "slot      {:?}: {active}", slot.name);
            let _ = writeln!(
                out,
                "          confirmed {}, WAL retained {}, behind by {}, wal_status {}",
                slot.confirmed_flush_lsn
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into()),
                slot.retained_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                slot.lag_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                slot.wal_status.as_deref().unwrap_or("-"),
            );
            let _ = writeln!(
                out,
                "          failover {}",
                match slot.failover {
                    Some(true) => "yes: synchronized to standbys that ask for it",
                    Some(false) => "NO: a promoted standby would not have this slot",
                    None => "not available before PostgreSQL 17: a failover loses the slot",
                }
            );
            if slot.failover == Some(true) {
                if report.standby_slots.is_empty() {
                    let _ = writeln!(
                        out,
                        "          standbys  none in synchronized_standby_slots: a promoted \
                         standby's copy of the slot may be behind what was processed (see the \
                         README's failover notes)"
                    );
                }
                for standby in &report.standby_slots {
                    let state = match (standby.exists, standby.active) {
                        (false, _) => "MISSING: the server sends streamex nothing until it \
                                       exists; create it or remove it from \
                                       synchronized_standby_slots"
                            .to_owned(),
                        (true, false) => "NOT STREAMING: the server sends streamex nothing \
                                          the standby has not confirmed; start the standby or \
                                          remove it from synchronized_standby_slots"
                            .to_owned(),
                        (true, true) => format!(
                            "streaming, behind by {}",
                            standby
                                .behind_bytes
                                .map(bytes)
                                .unwrap_or_else(|| "-".into())
                        ),
                    };
                    let _ = writeln!(out, "          standby slot {:?}: {state}", standby.name);
                }
            }
            if slot.wal_status.as_deref() == Some("lost") {
                let _ = writeln!(
                    out,
                    "          INVALIDATED: its WAL was removed; see `streamex run` for how to recreate it"
                );
            }
        }
    }
    if !has_schema {
        let _ = writeln!(
            out,
            "schema    streamex does not exist yet: run `streamex setup`"
        );
    } else if report.schema_outdated {
        let _ = writeln!(
            out,
            "schema    streamex predates per-slot operator state: run `streamex setup` to migrate \
             it (operator state is left out below)"
        );
    }
    if report.unadopted_rows > 0 {
        let _ = writeln!(
            out,
            "note      {} operator rows from before they were kept per slot belong to no slot yet: \
             the next `streamex setup` or `run` adopts them for its slot",
            report.unadopted_rows
        );
    }
    if let Some(js) = &report.jetstream {
        match &js.error {
            Some(error) => {
                let _ = writeln!(
                    out,
                    "jetstream stream {:?} at {}: UNREADABLE: {error}",
                    js.stream, js.url
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "jetstream stream {:?} at {}: {} messages ({}), last sequence {}, last event \
                     {}, {} consumers",
                    js.stream,
                    js.url,
                    js.messages.unwrap_or(0),
                    bytes(i64::try_from(js.bytes.unwrap_or(0)).unwrap_or(i64::MAX)),
                    js.last_sequence.unwrap_or(0),
                    js.last_position.as_deref().unwrap_or("none"),
                    js.consumers.unwrap_or(0)
                );
                // A filtered consumer's floor is its last message's sequence: what is left to
                // it is what it has not been sent, and what it has not acknowledged.
                for c in &js.consumer_states {
                    let _ = writeln!(
                        out,
                        "  consumer {}{}: {} messages not yet delivered, {} delivered and not \
                         acknowledged; acknowledged through sequence {}",
                        c.name,
                        c.description
                            .as_deref()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default(),
                        c.pending,
                        c.ack_pending,
                        c.ack_floor,
                    );
                }
            }
        }
    }
    let _ = writeln!(out, "operators");
    let label = |o: &OperatorLine| {
        if o.in_config {
            o.name.clone()
        } else {
            format!("{} (not in config)", o.name)
        }
    };
    let state = |o: &OperatorLine| match (o.state.as_str(), o.in_config, report.instance_active) {
        ("halted", _, _) => "halted".to_owned(),
        _ if o.partitions.iter().any(|p| p.current) => {
            let current: Vec<&PartitionLine> = o.partitions.iter().filter(|p| p.current).collect();
            let held = current.iter().filter(|p| p.worker_pid.is_some()).count();
            if held == 0 && o.in_config && report.instance_active {
                format!(
                    "in {} partitions, run by the active instance",
                    current[0].count
                )
            } else {
                format!(
                    "in {} partitions on workers ({held} held now)",
                    current[0].count
                )
            }
        }
        _ if o.worker_pid.is_some() => format!(
            "running on a worker (backend pid {})",
            o.worker_pid.unwrap_or_default()
        ),
        (_, false, _) => "not run".to_owned(),
        (_, true, true) => "running".to_owned(),
        (_, true, false) => "will run (no instance active)".to_owned(),
    };
    let width = report
        .operators
        .iter()
        .map(|o| label(o).len())
        .max()
        .unwrap_or(0);
    let state_width = report
        .operators
        .iter()
        .map(|o| state(o).len())
        .max()
        .unwrap_or(0);
    for o in &report.operators {
        let checkpoint = checkpoint_text(o.checkpoint_commit_lsn, o.checkpoint_ordinal)
            .unwrap_or_else(|| {
                if o.partitions.is_empty() {
                    "-"
                } else {
                    "per partition:"
                }
                .into()
            });
        let behind = behind_wal(o.checkpoint_behind_wal_bytes);
        let _ = writeln!(
            out,
            "  {:width$}  {:state_width$}  checkpoint {checkpoint}{behind}",
            label(o),
            state(o)
        );
        render_partitions(&mut out, o, width);
        if let Some(progress) = &o.backfill_progress {
            let _ = writeln!(out, "  {:width$}  backfilling: {progress}", "");
        } else if let Some(request) = &o.backfill_request {
            let _ = writeln!(
                out,
                "  {:width$}  {request} asked for: a running instance starts it within a second",
                ""
            );
        }
        if o.state == "halted" {
            let _ = writeln!(
                out,
                "  {:width$}  failed at {}: {}",
                "",
                o.failed_at.as_deref().unwrap_or("-"),
                o.last_error.as_deref().unwrap_or("-")
            );
            if o.in_config {
                let _ = writeln!(
                    out,
                    "  {:width$}  the slot cannot move past it: fix the cause, then `streamex resume {}`",
                    "", o.name
                );
            }
        }
        if !o.in_config {
            let pad = "";
            let _ = writeln!(
                out,
                "  {pad:width$}  not run by this configuration, so it holds nothing back: the slot \
                 is acknowledged without it"
            );
            let _ = writeln!(
                out,
                "  {pad:width$}  added back, it starts at the slot's position (what came in between \
                 is not replayed to it){}",
                if o.state == "halted" {
                    ", and halted until resumed"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "  {pad:width$}  to forget it: DELETE FROM streamex.operator_state WHERE slot = '{}' \
                 AND operator = '{}'; likewise streamex.operator_checkpoints and \
                 streamex.dead_letters",
                report.slot_name.replace('\'', "''"),
                o.name.replace('\'', "''")
            );
        }
    }
    let _ = writeln!(out, "process status ({})", report.process_status_backend);
    if report.process_status.is_empty() {
        let note = if report.process_status_backend == "memory" {
            "kept in the running process only"
        } else {
            "nothing processed yet"
        };
        let _ = writeln!(out, "  ({note})");
    }
    let mut by_entity: BTreeMap<&str, &EntityLine> = BTreeMap::new();
    for e in &report.process_status {
        by_entity.insert(&e.entity, e);
    }
    for (entity, e) in by_entity {
        let _ = writeln!(out, "  {entity:20} {}  lsn {}", e.timestamp, e.lsn);
    }
    let total: i64 = report.dead_letters.iter().map(|d| d.count).sum();
    let _ = writeln!(out, "dead letters: {total}");
    for d in &report.dead_letters {
        let _ = writeln!(out, "  {:20} {}", d.operator, d.count);
    }
    out
}

/// The physical slots of `synchronized_standby_slots` and their state (none before 17).
async fn standby_slots(pool: &sqlx::PgPool) -> anyhow::Result<Vec<StandbySlotLine>> {
    let rows: Vec<(String, bool, bool, Option<i64>)> = sqlx::query_as(
        "SELECT s.name, r.slot_name IS NOT NULL, coalesce(r.active, false),
                CASE WHEN r.restart_lsn IS NOT NULL AND NOT pg_is_in_recovery()
                     THEN pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn)::bigint END
           FROM unnest(string_to_array(
                  nullif(current_setting('synchronized_standby_slots', true), ''), ','))
                  WITH ORDINALITY AS u(raw, n)
          CROSS JOIN LATERAL (SELECT trim(u.raw) AS name) s
           LEFT JOIN pg_replication_slots r ON r.slot_name = s.name
          ORDER BY u.n",
    )
    .fetch_all(pool)
    .await
    .context("reading synchronized_standby_slots")?;
    Ok(rows
        .into_iter()
        .map(|(name, exists, active, behind_bytes)| StandbySlotLine {
            name,
            exists,
            active,
            behind_bytes,
        })
        .collect())
}
