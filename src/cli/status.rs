//! `streamex status`: what the person on call needs first. The slot and the WAL it holds,
//! each operator's position and state, the process status, the dead letters.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::service::{ConfigArgs, connect};
use crate::config::StatusBackendKind;
use crate::event::micros_rfc3339;
use crate::operator::Registry;
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
    /// The backend pid of the active `streamex run` (the holder of the slot's instance lock).
    active_instance_pid: Option<i32>,
    /// The backend pids of instances waiting to take over (their lock connections).
    standby_instance_pids: Vec<i32>,
    slot_name: String,
    slot: Option<SlotInfo>,
    operators: Vec<OperatorLine>,
    process_status_backend: &'static str,
    process_status: Vec<EntityLine>,
    dead_letters: Vec<DeadLetterLine>,
}

#[derive(Debug, Serialize)]
struct OperatorLine {
    name: String,
    state: String,
    checkpoint_commit_lsn: Option<Lsn>,
    checkpoint_ordinal: Option<u64>,
    last_error: Option<String>,
    failed_at: Option<String>,
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

pub async fn status_command(
    args: StatusArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (config, params, pool) = connect(&args.config, registry, &shutdown).await?;
    let slot = setup::slot_info(&pool, &config.slot).await?;
    // The migration creates every table in one transaction: one of them stands for all.
    let has_schema: bool =
        sqlx::query_scalar("SELECT to_regclass('streamex.process_status') IS NOT NULL")
            .fetch_one(&pool)
            .await
            .context("looking for the streamex schema")?;
    let (checkpoints, states, items, dead) = if has_schema {
        let items = match config.process_status.backend {
            StatusBackendKind::Postgres => PostgresStatus::new(pool.clone()).load().await?,
            StatusBackendKind::Memory => Vec::new(),
        };
        (
            status::load_checkpoints(&pool, &config.slot).await?,
            status::load_operator_states(&pool, &config.slot).await?,
            items,
            count_dead_letters(&pool, &config.slot).await?,
        )
    } else {
        Default::default()
    };
    let operators = config
        .operators
        .iter()
        .map(|o| {
            let checkpoint = checkpoints.get(&o.name);
            let state = states.get(&o.name);
            OperatorLine {
                name: o.name.clone(),
                state: if state.is_some_and(|s| s.state == OperatorRunState::Halted) {
                    "halted".into()
                } else {
                    "running".into()
                },
                checkpoint_commit_lsn: checkpoint.map(|c| c.commit_lsn),
                checkpoint_ordinal: checkpoint.map(|c| c.ordinal),
                last_error: state.and_then(|s| s.last_error.clone()),
                failed_at: state
                    .and_then(|s| Some(format!("{}#{}", s.failed_commit_lsn?, s.failed_ordinal?))),
            }
        })
        .collect();
    let active_instance_pid = InstanceLock::holder(&pool, &config.slot).await?;
    let report = Report {
        database: params.redacted_url(),
        active_instance_pid,
        standby_instance_pids: InstanceLock::standbys(&pool, &config.slot, active_instance_pid)
            .await?,
        slot_name: config.slot.clone(),
        slot,
        operators,
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
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, has_schema));
    }
    Ok(())
}

/// Dead letters per operator of `slot`.
async fn count_dead_letters(pool: &sqlx::PgPool, slot: &str) -> anyhow::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT operator, count(*) FROM streamex.dead_letters WHERE slot = $1
          GROUP BY operator ORDER BY operator",
    )
    .bind(slot)
    .fetch_all(pool)
    .await
    .context("counting dead letters")
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
    match report.active_instance_pid {
        Some(pid) => {
            let _ = writeln!(
                out,
                "instance  active: `streamex run` holds the slot's lock (backend pid {pid}); others wait as standbys"
            );
        }
        None => {
            let _ = writeln!(out, "instance  none running for this slot");
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
    }
    let _ = writeln!(out, "operators");
    let width = report
        .operators
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(0);
    for o in &report.operators {
        let checkpoint = match (o.checkpoint_commit_lsn, o.checkpoint_ordinal) {
            (Some(lsn), Some(ordinal)) => format!("{lsn}#{ordinal}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {:width$}  {:8} checkpoint {checkpoint}",
            o.name, o.state
        );
        if o.state == "halted" {
            let _ = writeln!(
                out,
                "  {:width$}  failed at {}: {}",
                "",
                o.failed_at.as_deref().unwrap_or("-"),
                o.last_error.as_deref().unwrap_or("-")
            );
            let _ = writeln!(
                out,
                "  {:width$}  the slot cannot move past it: fix the cause, then `streamex resume {}`",
                "", o.name
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
