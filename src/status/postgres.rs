//! The PostgreSQL backend: the `streamex` schema, its migrations, and the queries on it.
//!
//! Every query is a free function generic over [`PgExecutor`], so it runs on a pool, a
//! connection or inside a caller's transaction (`&mut *tx`): the engine writes process status,
//! its checkpoint and dead letters in the same transaction, and they commit or roll back
//! together. [`PostgresStatus`] implements [`ProcessStatusStorage`] with them on a pool.
//!
//! LSNs travel as text (`'16/B374D848'`) and are cast to and from `pg_lsn` in SQL; ordinals are
//! `u64` in Rust and `bigint` in SQL (an ordinal above `i64::MAX` is refused).

use std::collections::{BTreeMap, HashMap};

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgExecutor, PgPool, Row};

use super::{ProcessStatusStorage, StatusError, StatusItem};
use crate::lsn::{Lsn, Position};

/// The embedded migrations in `sql/`.
static MIGRATOR: Migrator = sqlx::migrate!("./sql");

/// Key of the transaction-level advisory lock taken around `CREATE SCHEMA` (ASCII "strmxsch").
const SCHEMA_LOCK: i64 = 0x7374_726d_7873_6368;

/// Creates the `streamex` schema if missing and applies the embedded migrations, keeping
/// sqlx's bookkeeping table in `streamex` (not `public`).
///
/// Idempotent, and safe to run from several processes at once: the schema is created under an
/// advisory lock and sqlx serializes the migrations with its own. It works on a connection of
/// its own, detached from the pool and closed at the end, so no pooled connection is left with
/// a changed `search_path` (or, after an error, a held advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StatusError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(StatusError::sql(
            "connecting to migrate the streamex schema",
        ))?
        .detach();

    let mut tx = conn
        .begin()
        .await
        .map_err(StatusError::sql("creating the streamex schema"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(StatusError::sql("locking to create the streamex schema"))?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS streamex")
        .execute(&mut *tx)
        .await
        .map_err(StatusError::sql("creating the streamex schema"))?;
    tx.commit()
        .await
        .map_err(StatusError::sql("creating the streamex schema"))?;

    sqlx::query("SET search_path TO streamex")
        .execute(&mut conn)
        .await
        .map_err(StatusError::sql("setting search_path to streamex"))?;
    // run_direct, not run: run's `Acquire` bound makes the future not `Send` for every
    // lifetime, so a caller could not spawn it.
    MIGRATOR
        .run_direct(&mut conn)
        .await
        .map_err(StatusError::Migrate)?;
    // Closing sends Terminate; a failure there does not undo the migration.
    let _ = conn.close().await;
    Ok(())
}

fn lsn_text(lsn: Lsn) -> String {
    lsn.to_string()
}

fn parse_lsn(context: &'static str, text: &str) -> Result<Lsn, StatusError> {
    text.parse().map_err(|e| StatusError::Invalid {
        context,
        detail: format!("{e}"),
    })
}

fn ordinal_to_sql(context: &'static str, ordinal: u64) -> Result<i64, StatusError> {
    i64::try_from(ordinal).map_err(|_| StatusError::Invalid {
        context,
        detail: format!("ordinal {ordinal} does not fit in a bigint"),
    })
}

fn ordinal_from_sql(context: &'static str, ordinal: i64) -> Result<u64, StatusError> {
    u64::try_from(ordinal).map_err(|_| StatusError::Invalid {
        context,
        detail: format!("negative ordinal {ordinal} in the database"),
    })
}

/// A position stored as its commit LSN's text and its ordinal.
fn position_from_sql(
    context: &'static str,
    lsn: &str,
    ordinal: i64,
) -> Result<Position, StatusError> {
    Ok(Position::new(
        parse_lsn(context, lsn)?,
        ordinal_from_sql(context, ordinal)?,
    ))
}

fn attempts_to_sql(context: &'static str, attempts: u32) -> Result<i32, StatusError> {
    i32::try_from(attempts).map_err(|_| StatusError::Invalid {
        context,
        detail: format!("attempts {attempts} does not fit in an int"),
    })
}

fn attempts_from_sql(context: &'static str, attempts: i32) -> Result<u32, StatusError> {
    u32::try_from(attempts).map_err(|_| StatusError::Invalid {
        context,
        detail: format!("negative attempts {attempts} in the database"),
    })
}

// ---------------------------------------------------------------------------------------------
// Process status.

/// Records that `entity` has been processed up to `timestamp` (µs since the Unix epoch) and
/// `lsn`. Never moves backwards: each of timestamp and lsn keeps its maximum.
pub async fn store_item<'c, E: PgExecutor<'c>>(
    executor: E,
    entity: &str,
    timestamp: i64,
    lsn: Lsn,
) -> Result<(), StatusError> {
    sqlx::query(
        "INSERT INTO streamex.process_status AS s (entity, timestamp, lsn) \
         VALUES ($1, $2, $3::text::pg_lsn) \
         ON CONFLICT (entity) DO UPDATE SET \
             timestamp = GREATEST(s.timestamp, EXCLUDED.timestamp), \
             lsn = GREATEST(s.lsn, EXCLUDED.lsn), \
             updated_at = now() \
         WHERE EXCLUDED.timestamp > s.timestamp OR EXCLUDED.lsn > s.lsn",
    )
    .bind(entity)
    .bind(timestamp)
    .bind(lsn_text(lsn))
    .execute(executor)
    .await
    .map_err(StatusError::sql("storing process status"))?;
    Ok(())
}

/// Records several items in one statement, with the same rule as [`store_item`]: never moves
/// backwards. An entity listed more than once is collapsed first to the maximum of each field.
/// Rows are written in entity order, so concurrent batches cannot deadlock on each other.
pub async fn store_items<'c, E: PgExecutor<'c>>(
    executor: E,
    items: &[StatusItem],
) -> Result<(), StatusError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut collapsed: BTreeMap<&str, (i64, Lsn)> = BTreeMap::new();
    for item in items {
        let entry = collapsed
            .entry(item.entity.as_str())
            .or_insert((item.timestamp, item.lsn));
        entry.0 = entry.0.max(item.timestamp);
        entry.1 = entry.1.max(item.lsn);
    }
    let entities: Vec<&str> = collapsed.keys().copied().collect();
    let timestamps: Vec<i64> = collapsed.values().map(|&(t, _)| t).collect();
    let lsns: Vec<String> = collapsed.values().map(|&(_, l)| lsn_text(l)).collect();
    sqlx::query(
        "INSERT INTO streamex.process_status AS s (entity, timestamp, lsn) \
         SELECT u.entity, u.timestamp, u.lsn::pg_lsn \
           FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(entity, timestamp, lsn) \
         ON CONFLICT (entity) DO UPDATE SET \
             timestamp = GREATEST(s.timestamp, EXCLUDED.timestamp), \
             lsn = GREATEST(s.lsn, EXCLUDED.lsn), \
             updated_at = now() \
         WHERE EXCLUDED.timestamp > s.timestamp OR EXCLUDED.lsn > s.lsn",
    )
    .bind(entities)
    .bind(timestamps)
    .bind(lsns)
    .execute(executor)
    .await
    .map_err(StatusError::sql("storing process status"))?;
    Ok(())
}

/// Every item in `streamex.process_status`, ordered by entity.
pub async fn load_items<'c, E: PgExecutor<'c>>(
    executor: E,
) -> Result<Vec<StatusItem>, StatusError> {
    const CONTEXT: &str = "loading process status";
    let rows = sqlx::query(
        "SELECT entity, timestamp, lsn::text AS lsn FROM streamex.process_status ORDER BY entity",
    )
    .fetch_all(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    rows.iter()
        .map(|row| {
            Ok(StatusItem {
                entity: row.try_get("entity").map_err(StatusError::sql(CONTEXT))?,
                timestamp: row
                    .try_get("timestamp")
                    .map_err(StatusError::sql(CONTEXT))?,
                lsn: parse_lsn(
                    CONTEXT,
                    row.try_get("lsn").map_err(StatusError::sql(CONTEXT))?,
                )?,
            })
        })
        .collect()
}

/// Deletes every item in `streamex.process_status`.
pub async fn reset_items<'c, E: PgExecutor<'c>>(executor: E) -> Result<(), StatusError> {
    sqlx::query("DELETE FROM streamex.process_status")
        .execute(executor)
        .await
        .map_err(StatusError::sql("resetting process status"))?;
    Ok(())
}

/// Whether `entity` has been processed up to `timestamp` (µs): the rule of
/// `streamex.processed`, stored timestamp `>= timestamp`, false for an unknown entity, and
/// no operator of a worker listening to it behind `timestamp` (`streamex.worker_progress`).
pub async fn is_processed<'c, E: PgExecutor<'c>>(
    executor: E,
    entity: &str,
    timestamp: i64,
) -> Result<bool, StatusError> {
    sqlx::query_scalar(
        "SELECT COALESCE((SELECT s.timestamp >= $2 FROM streamex.process_status AS s \
                           WHERE s.entity = $1), false) \
            AND NOT EXISTS (SELECT 1 FROM streamex.worker_progress AS w \
                             WHERE w.entity = $1 AND w.timestamp < $2)",
    )
    .bind(entity)
    .bind(timestamp)
    .fetch_one(executor)
    .await
    .map_err(StatusError::sql("reading process status"))
}

/// Process status in `streamex.process_status`, on a pool. Run [`migrate`] first.
#[derive(Clone, Debug)]
pub struct PostgresStatus {
    pub pool: PgPool,
}

impl PostgresStatus {
    pub fn new(pool: PgPool) -> Self {
        PostgresStatus { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl ProcessStatusStorage for PostgresStatus {
    async fn item_processed(
        &self,
        entity: &str,
        timestamp: i64,
        lsn: Lsn,
    ) -> Result<(), StatusError> {
        store_item(&self.pool, entity, timestamp, lsn).await
    }

    async fn items_processed(&self, items: &[StatusItem]) -> Result<(), StatusError> {
        store_items(&self.pool, items).await
    }

    async fn load(&self) -> Result<Vec<StatusItem>, StatusError> {
        load_items(&self.pool).await
    }

    async fn reset(&self) -> Result<(), StatusError> {
        reset_items(&self.pool).await
    }

    async fn processed(&self, entity: &str, timestamp: i64) -> Result<bool, StatusError> {
        is_processed(&self.pool, entity, timestamp).await
    }
}

// ---------------------------------------------------------------------------------------------
// Operator checkpoints.

/// Every checkpoint of `slot`'s operators: operator → the position of the last event it has
/// durably processed.
pub async fn load_checkpoints<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
) -> Result<HashMap<String, Position>, StatusError> {
    const CONTEXT: &str = "loading operator checkpoints";
    let rows = sqlx::query(
        "SELECT operator, commit_lsn::text AS commit_lsn, ordinal \
           FROM streamex.operator_checkpoints WHERE slot = $1",
    )
    .bind(slot)
    .fetch_all(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    rows.iter()
        .map(|row| {
            let operator: String = row.try_get("operator").map_err(StatusError::sql(CONTEXT))?;
            let lsn = parse_lsn(
                CONTEXT,
                row.try_get("commit_lsn")
                    .map_err(StatusError::sql(CONTEXT))?,
            )?;
            let ordinal = ordinal_from_sql(
                CONTEXT,
                row.try_get("ordinal").map_err(StatusError::sql(CONTEXT))?,
            )?;
            Ok((operator, Position::new(lsn, ordinal)))
        })
        .collect()
}

/// Stores `operator`'s checkpoint on `slot`. Never moves backwards: an existing checkpoint is only
/// replaced by a greater `(commit_lsn, ordinal)`. Returns whether the checkpoint moved
/// (false when it was already at or past this position).
pub async fn store_checkpoint<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    commit_lsn: Lsn,
    ordinal: u64,
) -> Result<bool, StatusError> {
    const CONTEXT: &str = "storing an operator checkpoint";
    let result = sqlx::query(
        "INSERT INTO streamex.operator_checkpoints AS c (slot, operator, commit_lsn, ordinal) \
         VALUES ($4, $1, $2::text::pg_lsn, $3) \
         ON CONFLICT (slot, operator) DO UPDATE SET \
             commit_lsn = EXCLUDED.commit_lsn, ordinal = EXCLUDED.ordinal, updated_at = now() \
         WHERE (EXCLUDED.commit_lsn, EXCLUDED.ordinal) > (c.commit_lsn, c.ordinal)",
    )
    .bind(operator)
    .bind(lsn_text(commit_lsn))
    .bind(ordinal_to_sql(CONTEXT, ordinal)?)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    Ok(result.rows_affected() > 0)
}

/// Moves `operator`'s checkpoint on `slot` from `from` (`None`: it has none yet) to `to`, only if it is
/// still at `from`, or has no row (deleted by hand): a compare-and-set inside the operator's
/// transaction. Returns false, having
/// changed nothing, when the stored checkpoint is elsewhere: another instance (one that lost
/// its instance lock but had a transaction in flight), or an earlier commit of this one whose
/// reply was lost, has already applied some of these events; committing now would apply them
/// twice. Two transactions racing on the same checkpoint are serialized by its row lock, and
/// the second one sees the first one's checkpoint, so it fails.
pub async fn advance_checkpoint<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    from: Option<Position>,
    to: Position,
) -> Result<bool, StatusError> {
    const CONTEXT: &str = "storing an operator checkpoint";
    let (from_lsn, from_ordinal) = match from {
        Some(p) => (
            Some(lsn_text(p.commit_lsn)),
            Some(ordinal_to_sql(CONTEXT, p.ordinal)?),
        ),
        None => (None, None),
    };
    let result = sqlx::query(
        "INSERT INTO streamex.operator_checkpoints AS c (slot, operator, commit_lsn, ordinal) \
         VALUES ($6, $1, $2::text::pg_lsn, $3) \
         ON CONFLICT (slot, operator) DO UPDATE SET \
             commit_lsn = EXCLUDED.commit_lsn, ordinal = EXCLUDED.ordinal, updated_at = now() \
         WHERE c.commit_lsn = $4::text::pg_lsn AND c.ordinal = $5 \
           AND (EXCLUDED.commit_lsn, EXCLUDED.ordinal) > (c.commit_lsn, c.ordinal)",
    )
    .bind(operator)
    .bind(lsn_text(to.commit_lsn))
    .bind(ordinal_to_sql(CONTEXT, to.ordinal)?)
    .bind(from_lsn)
    .bind(from_ordinal)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    Ok(result.rows_affected() > 0)
}

/// The key (and `application_name`) of the advisory lock held by whatever runs `operator` of
/// `slot`: a `streamex worker`, or the active `streamex run`, which holds its operators'
/// keys on its instance lock's session. So an operator runs in one place at a time.
pub fn operator_lock_key(slot: &str, operator: &str) -> String {
    format!("streamex worker {slot} {operator}")
}

/// The sessions of this database holding an advisory lock keyed on one of `keys` (as
/// `pg_advisory_lock(hashtextextended(key, 0))` takes it, in any mode): `(key, backend pid)`,
/// by key. Found in `pg_locks` by the key's hash, not by `application_name`, which the server
/// cuts to 63 bytes.
pub(crate) async fn advisory_lock_holders<'c, E: PgExecutor<'c>>(
    executor: E,
    keys: &[String],
) -> Result<Vec<(String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT k.key, l.pid
           FROM unnest($1::text[]) AS k(key)
           JOIN pg_locks l
             ON ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(k.key, 0)
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid IS NOT NULL
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY k.key, l.pid",
    )
    .bind(keys)
    .fetch_all(executor)
    .await
}

/// `operator`'s stored checkpoint on `slot`, if it has one.
pub async fn load_checkpoint<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<Option<Position>, StatusError> {
    const CONTEXT: &str = "loading an operator checkpoint";
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT commit_lsn::text, ordinal FROM streamex.operator_checkpoints \
          WHERE slot = $2 AND operator = $1",
    )
    .bind(operator)
    .bind(slot)
    .fetch_optional(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    row.map(|(lsn, ordinal)| position_from_sql(CONTEXT, &lsn, ordinal))
        .transpose()
}

/// Whether `operator` has a checkpoint on `slot`, whole or of any of its partitions (named
/// `<operator>#<index>/<count>`): whether it has run there, so that its first run's backfill
/// is behind it.
pub(crate) async fn has_any_checkpoint(
    pool: &sqlx::PgPool,
    slot: &str,
    operator: &str,
) -> Result<bool, StatusError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM streamex.operator_checkpoints \
          WHERE slot = $1 AND (operator = $2 OR starts_with(operator, $2 || '#')))",
    )
    .bind(slot)
    .bind(operator)
    .fetch_one(pool)
    .await
    .map_err(StatusError::sql("looking for an operator's checkpoints"))
}

/// Whether the logical replication slot `slot` exists in the current database.
pub(crate) async fn logical_slot_exists(
    pool: &sqlx::PgPool,
    slot: &str,
) -> Result<bool, StatusError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots \
          WHERE slot_name = $1 AND slot_type = 'logical' AND database = current_database())",
    )
    .bind(slot)
    .fetch_one(pool)
    .await
    .map_err(StatusError::sql("looking for the replication slot"))
}

// ---------------------------------------------------------------------------------------------
// Operator state.

/// Whether an operator runs or has halted on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperatorRunState {
    Running,
    Halted,
}

impl OperatorRunState {
    /// The value in `streamex.operator_state.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRunState::Running => "running",
            OperatorRunState::Halted => "halted",
        }
    }
}

/// A row of `streamex.operator_state`. The error fields are set while halted and cleared by
/// [`set_operator_running`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorState {
    pub operator: String,
    pub state: OperatorRunState,
    pub last_error: Option<String>,
    /// When the operator halted, µs since the Unix epoch.
    pub error_at_micros: Option<i64>,
    pub failed_commit_lsn: Option<Lsn>,
    pub failed_ordinal: Option<u64>,
    pub attempts: Option<u32>,
    /// An event to set aside as a dead letter instead of handling it, `(commit_lsn,
    /// ordinal)`: the one it halted on, when resumed with `--skip-current`.
    pub skip: Option<Position>,
    /// A backfill asked for (`streamex backfill` / `rebuild`) and not yet done.
    pub backfill_request: Option<BackfillRequest>,
    /// The progress of the operator's running (or last unfinished) backfill.
    pub backfill_progress: Option<BackfillProgress>,
}

/// A backfill asked for with `streamex backfill` or `streamex rebuild`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillRequest {
    /// Run the operator's reset first (`rebuild`).
    pub rebuild: bool,
    /// Only these tables (`--table`); `None`: every table the operator subscribes to.
    pub tables: Option<Vec<String>>,
}

/// How far a backfill is, as it last stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillProgress {
    pub rows: u64,
    /// The rows its tables held, as the statistics estimate.
    pub estimate: u64,
    /// When it started and when it last stored its progress, µs since the Unix epoch.
    pub started_at_micros: i64,
    pub updated_at_micros: i64,
}

/// Asks the running service (or the next `streamex run`) to backfill `operator` of `slot`
/// again (`rebuild`: after its reset), with only `tables` when given.
pub async fn request_backfill<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    rebuild: bool,
    tables: Option<&[String]>,
) -> Result<(), StatusError> {
    sqlx::query(
        "INSERT INTO streamex.operator_state (slot, operator, state, backfill_request, backfill_tables) \
         VALUES ($1, $2, 'running', $3, $4) \
         ON CONFLICT (slot, operator) DO UPDATE SET \
             backfill_request = EXCLUDED.backfill_request, backfill_tables = EXCLUDED.backfill_tables",
    )
    .bind(slot)
    .bind(operator)
    .bind(if rebuild { "rebuild" } else { "backfill" })
    .bind(tables)
    .execute(executor)
    .await
    .map_err(StatusError::sql("storing a backfill request"))?;
    Ok(())
}

/// Clears `operator`'s backfill request, and the rows of workers that ran it before, whole
/// or by partitions (`<operator>#<p>/<N>`, their checkpoints too: its tables now follow this
/// slot): in the backfill's own transaction.
pub async fn finish_backfill<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<(), StatusError> {
    sqlx::query(
        "WITH progress AS (DELETE FROM streamex.worker_progress \
                            WHERE slot = $1 AND regexp_replace(operator, '#[0-9]+/[0-9]+$', '') = $2), \
              consumers AS (DELETE FROM streamex.worker_consumers \
                             WHERE slot = $1 AND regexp_replace(operator, '#[0-9]+/[0-9]+$', '') = $2), \
              partitions AS (DELETE FROM streamex.operator_checkpoints \
                              WHERE slot = $1 AND operator ~ '#[0-9]+/[0-9]+$' \
                                AND regexp_replace(operator, '#[0-9]+/[0-9]+$', '') = $2) \
         UPDATE streamex.operator_state SET backfill_request = NULL, backfill_tables = NULL \
          WHERE slot = $1 AND operator = $2 AND backfill_request IS NOT NULL",
    )
    .bind(slot)
    .bind(operator)
    .execute(executor)
    .await
    .map_err(StatusError::sql("clearing a finished backfill's request"))?;
    Ok(())
}

/// Forgets `operator`'s backfill progress, once the backfill has committed.
pub async fn clear_backfill_progress<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<(), StatusError> {
    sqlx::query("DELETE FROM streamex.backfill_progress WHERE slot = $1 AND operator = $2")
        .bind(slot)
        .bind(operator)
        .execute(executor)
        .await
        .map_err(StatusError::sql("clearing a backfill's progress"))?;
    Ok(())
}

/// Stores how far `operator`'s running backfill is (outside its transaction, so that others
/// see it); `started` says it has just begun.
pub async fn store_backfill_progress<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    rows: u64,
    estimate: u64,
    started: bool,
) -> Result<(), StatusError> {
    sqlx::query(
        "INSERT INTO streamex.backfill_progress AS b (slot, operator, rows, estimate, started_at, updated_at) \
         VALUES ($1, $2, $3, $4, now(), now()) \
         ON CONFLICT (slot, operator) DO UPDATE SET rows = EXCLUDED.rows, \
             estimate = EXCLUDED.estimate, updated_at = now(), \
             started_at = CASE WHEN $5 THEN now() ELSE b.started_at END",
    )
    .bind(slot)
    .bind(operator)
    .bind(i64::try_from(rows).unwrap_or(i64::MAX))
    .bind(i64::try_from(estimate).unwrap_or(i64::MAX))
    .bind(started)
    .execute(executor)
    .await
    .map_err(StatusError::sql("storing a backfill's progress"))?;
    Ok(())
}

/// The state of every operator of `slot`, by operator name. An operator without a row has
/// never halted.
pub async fn load_operator_states<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
) -> Result<HashMap<String, OperatorState>, StatusError> {
    const CONTEXT: &str = "loading operator states";
    let rows = sqlx::query(
        "SELECT operator, state, last_error, streamex.epoch_micros(error_at) AS error_at, \
                failed_commit_lsn::text AS failed_commit_lsn, failed_ordinal, attempts, \
                skip_commit_lsn::text AS skip_commit_lsn, skip_ordinal, \
                backfill_request, backfill_tables, b.rows AS backfill_rows, \
                b.estimate AS backfill_estimate, \
                streamex.epoch_micros(b.started_at) AS backfill_started_at, \
                streamex.epoch_micros(b.updated_at) AS backfill_updated_at \
           FROM streamex.operator_state o \
           LEFT JOIN streamex.backfill_progress b USING (slot, operator) \
          WHERE slot = $1 \
         UNION ALL \
         SELECT b.operator, 'running', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                b.rows, b.estimate, streamex.epoch_micros(b.started_at), \
                streamex.epoch_micros(b.updated_at) \
           FROM streamex.backfill_progress b \
          WHERE b.slot = $1 AND NOT EXISTS (SELECT 1 FROM streamex.operator_state o \
                                             WHERE o.slot = b.slot AND o.operator = b.operator)",
    )
    .bind(slot)
    .fetch_all(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    let sql = StatusError::sql;
    rows.iter()
        .map(|row| {
            let operator: String = row.try_get("operator").map_err(sql(CONTEXT))?;
            let state = match row.try_get::<&str, _>("state").map_err(sql(CONTEXT))? {
                "running" => OperatorRunState::Running,
                "halted" => OperatorRunState::Halted,
                other => {
                    return Err(StatusError::Invalid {
                        context: CONTEXT,
                        detail: format!("unknown state {other:?} for operator {operator:?}"),
                    });
                }
            };
            let failed_commit_lsn = row
                .try_get::<Option<&str>, _>("failed_commit_lsn")
                .map_err(sql(CONTEXT))?
                .map(|text| parse_lsn(CONTEXT, text))
                .transpose()?;
            let failed_ordinal = row
                .try_get::<Option<i64>, _>("failed_ordinal")
                .map_err(sql(CONTEXT))?
                .map(|o| ordinal_from_sql(CONTEXT, o))
                .transpose()?;
            let attempts = row
                .try_get::<Option<i32>, _>("attempts")
                .map_err(sql(CONTEXT))?
                .map(|a| attempts_from_sql(CONTEXT, a))
                .transpose()?;
            let skip_lsn = row
                .try_get::<Option<&str>, _>("skip_commit_lsn")
                .map_err(sql(CONTEXT))?
                .map(|text| parse_lsn(CONTEXT, text))
                .transpose()?;
            let skip_ordinal = row
                .try_get::<Option<i64>, _>("skip_ordinal")
                .map_err(sql(CONTEXT))?
                .map(|o| ordinal_from_sql(CONTEXT, o))
                .transpose()?;
            let state = OperatorState {
                operator: operator.clone(),
                state,
                last_error: row.try_get("last_error").map_err(sql(CONTEXT))?,
                error_at_micros: row.try_get("error_at").map_err(sql(CONTEXT))?,
                failed_commit_lsn,
                failed_ordinal,
                attempts,
                skip: skip_lsn
                    .zip(skip_ordinal)
                    .map(|(lsn, ordinal)| Position::new(lsn, ordinal)),
                backfill_request: row
                    .try_get::<Option<&str>, _>("backfill_request")
                    .map_err(sql(CONTEXT))?
                    .map(|request| {
                        Ok::<_, StatusError>(BackfillRequest {
                            rebuild: request == "rebuild",
                            tables: row.try_get("backfill_tables").map_err(sql(CONTEXT))?,
                        })
                    })
                    .transpose()?,
                backfill_progress: match (
                    row.try_get::<Option<i64>, _>("backfill_rows")
                        .map_err(sql(CONTEXT))?,
                    row.try_get::<Option<i64>, _>("backfill_estimate")
                        .map_err(sql(CONTEXT))?,
                    row.try_get::<Option<i64>, _>("backfill_started_at")
                        .map_err(sql(CONTEXT))?,
                    row.try_get::<Option<i64>, _>("backfill_updated_at")
                        .map_err(sql(CONTEXT))?,
                ) {
                    (Some(rows), estimate, Some(started), Some(updated)) => {
                        Some(BackfillProgress {
                            rows: u64::try_from(rows).unwrap_or(0),
                            estimate: estimate.and_then(|e| u64::try_from(e).ok()).unwrap_or(0),
                            started_at_micros: started,
                            updated_at_micros: updated,
                        })
                    }
                    _ => None,
                },
            };
            Ok((operator, state))
        })
        .collect()
}

/// Marks `operator` of `slot` halted on `error` at the event `(commit_lsn, ordinal)` after `attempts`
/// tries, with `error_at = now()`. Idempotent: the row is created or replaced.
pub async fn set_operator_halted<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    error: &str,
    commit_lsn: Lsn,
    ordinal: u64,
    attempts: u32,
) -> Result<(), StatusError> {
    const CONTEXT: &str = "marking an operator halted";
    sqlx::query(
        "INSERT INTO streamex.operator_state AS o \
             (slot, operator, state, last_error, error_at, failed_commit_lsn, failed_ordinal, \
              attempts) \
         VALUES ($6, $1, 'halted', $2, now(), $3::text::pg_lsn, $4, $5) \
         ON CONFLICT (slot, operator) DO UPDATE SET \
             state = 'halted', last_error = EXCLUDED.last_error, error_at = EXCLUDED.error_at, \
             failed_commit_lsn = EXCLUDED.failed_commit_lsn, \
             failed_ordinal = EXCLUDED.failed_ordinal, attempts = EXCLUDED.attempts",
    )
    .bind(operator)
    .bind(error)
    .bind(lsn_text(commit_lsn))
    .bind(ordinal_to_sql(CONTEXT, ordinal)?)
    .bind(attempts_to_sql(CONTEXT, attempts)?)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    Ok(())
}

/// Marks `operator` of `slot` running and clears its error fields. Idempotent.
pub async fn set_operator_running<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<(), StatusError> {
    sqlx::query(
        "INSERT INTO streamex.operator_state AS o (slot, operator, state) \
         VALUES ($2, $1, 'running') \
         ON CONFLICT (slot, operator) DO UPDATE SET \
             state = 'running', last_error = NULL, error_at = NULL, \
             failed_commit_lsn = NULL, failed_ordinal = NULL, attempts = NULL",
    )
    .bind(operator)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql("marking an operator running"))?;
    Ok(())
}

/// Marks a halted `operator` of `slot` running, to set aside the event it halted on as a dead letter
/// when it meets it again (`streamex resume --skip-current`). Returns that event's position;
/// `None` when the operator is not halted on an event (nothing is changed then).
pub async fn set_operator_running_skipping<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<Option<Position>, StatusError> {
    const CONTEXT: &str = "marking an operator running past its failed event";
    let row: Option<(String, i64)> = sqlx::query_as(
        "UPDATE streamex.operator_state SET \
             state = 'running', skip_commit_lsn = failed_commit_lsn, skip_ordinal = failed_ordinal, \
             last_error = NULL, error_at = NULL, failed_commit_lsn = NULL, failed_ordinal = NULL, \
             attempts = NULL \
         WHERE slot = $2 AND operator = $1 AND state = 'halted' AND failed_commit_lsn IS NOT NULL \
         RETURNING skip_commit_lsn::text, skip_ordinal",
    )
    .bind(operator)
    .bind(slot)
    .fetch_optional(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    row.map(|(lsn, ordinal)| position_from_sql(CONTEXT, &lsn, ordinal))
        .transpose()
}

/// Forgets the event `operator` of `slot` was to set aside (it has been).
pub async fn clear_operator_skip<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
) -> Result<(), StatusError> {
    sqlx::query(
        "UPDATE streamex.operator_state SET skip_commit_lsn = NULL, skip_ordinal = NULL \
         WHERE slot = $2 AND operator = $1",
    )
    .bind(operator)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql("clearing an operator's event to skip"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dead letters.

/// A row of `streamex.dead_letters`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub operator: String,
    pub commit_lsn: Lsn,
    pub ordinal: u64,
    /// The event in its JSON form.
    pub event: serde_json::Value,
    pub error: String,
    pub attempts: u32,
    /// µs since the Unix epoch.
    pub created_at_micros: i64,
}

/// Sets the event at `at` aside for `operator` of `slot`. Idempotent: a dead letter already
/// stored for the same (slot, operator, commit_lsn, ordinal), as after a replay, is left as it
/// is. Returns whether a row was inserted.
pub async fn insert_dead_letter<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    operator: &str,
    at: Position,
    event: &serde_json::Value,
    error: &str,
    attempts: u32,
) -> Result<bool, StatusError> {
    const CONTEXT: &str = "storing a dead letter";
    let result = sqlx::query(
        "INSERT INTO streamex.dead_letters \
             (slot, operator, commit_lsn, ordinal, event, error, attempts) \
         VALUES ($7, $1, $2::text::pg_lsn, $3, $4::text::jsonb, $5, $6) \
         ON CONFLICT (slot, operator, commit_lsn, ordinal) DO NOTHING",
    )
    .bind(operator)
    .bind(lsn_text(at.commit_lsn))
    .bind(ordinal_to_sql(CONTEXT, at.ordinal)?)
    .bind(event.to_string())
    .bind(error)
    .bind(attempts_to_sql(CONTEXT, attempts)?)
    .bind(slot)
    .execute(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    Ok(result.rows_affected() > 0)
}

/// Up to `limit` dead letters of `slot`'s operators, oldest first.
pub async fn list_dead_letters<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
    limit: i64,
) -> Result<Vec<DeadLetter>, StatusError> {
    const CONTEXT: &str = "listing dead letters";
    let sql = StatusError::sql;
    let rows = sqlx::query(
        "SELECT id, operator, commit_lsn::text AS commit_lsn, ordinal, event::text AS event, \
                error, attempts, streamex.epoch_micros(created_at) AS created_at \
           FROM streamex.dead_letters WHERE slot = $2 ORDER BY id LIMIT $1",
    )
    .bind(limit)
    .bind(slot)
    .fetch_all(executor)
    .await
    .map_err(sql(CONTEXT))?;
    rows.iter()
        .map(|row| {
            let event: &str = row.try_get("event").map_err(sql(CONTEXT))?;
            Ok(DeadLetter {
                id: row.try_get("id").map_err(sql(CONTEXT))?,
                operator: row.try_get("operator").map_err(sql(CONTEXT))?,
                commit_lsn: parse_lsn(CONTEXT, row.try_get("commit_lsn").map_err(sql(CONTEXT))?)?,
                ordinal: ordinal_from_sql(CONTEXT, row.try_get("ordinal").map_err(sql(CONTEXT))?)?,
                event: crate::decode::event_json(event).map_err(|e| StatusError::Invalid {
                    context: CONTEXT,
                    detail: format!("event is not JSON: {e}"),
                })?,
                error: row.try_get("error").map_err(sql(CONTEXT))?,
                attempts: attempts_from_sql(
                    CONTEXT,
                    row.try_get("attempts").map_err(sql(CONTEXT))?,
                )?,
                created_at_micros: row.try_get("created_at").map_err(sql(CONTEXT))?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rows from before operator state was kept per slot.

/// The rows [`adopt_unkeyed_rows`] gave a slot, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub checkpoints: u64,
    pub states: u64,
    pub dead_letters: u64,
}

impl Adopted {
    /// Whether nothing was adopted.
    pub fn is_empty(&self) -> bool {
        self.checkpoints == 0 && self.states == 0 && self.dead_letters == 0
    }
}

/// Gives `slot` the rows from before operator state was kept per slot that migration 0003
/// could not attribute (slot `''`: the database had no logical pgoutput slot when it ran; see
/// `sql/0003_operator_state_per_slot.sql`). One statement, so that two instances of different
/// slots cannot split them: the first one takes them all. A row whose operator already has a
/// row of its own on `slot` is left where it is (the slot's own row is the newer).
pub async fn adopt_unkeyed_rows<'c, E: PgExecutor<'c>>(
    executor: E,
    slot: &str,
) -> Result<Adopted, StatusError> {
    const CONTEXT: &str = "adopting operator rows from before they were kept per slot";
    let (checkpoints, states, dead_letters): (i64, i64, i64) = sqlx::query_as(
        "WITH c AS (
             UPDATE streamex.operator_checkpoints AS o SET slot = $1
              WHERE o.slot = '' AND NOT EXISTS (
                    SELECT 1 FROM streamex.operator_checkpoints AS k
                     WHERE k.slot = $1 AND k.operator = o.operator)
             RETURNING 1),
         s AS (
             UPDATE streamex.operator_state AS o SET slot = $1
              WHERE o.slot = '' AND NOT EXISTS (
                    SELECT 1 FROM streamex.operator_state AS k
                     WHERE k.slot = $1 AND k.operator = o.operator)
             RETURNING 1),
         d AS (
             UPDATE streamex.dead_letters AS o SET slot = $1
              WHERE o.slot = '' AND NOT EXISTS (
                    SELECT 1 FROM streamex.dead_letters AS k
                     WHERE k.slot = $1 AND k.operator = o.operator
                       AND k.commit_lsn = o.commit_lsn AND k.ordinal = o.ordinal)
             RETURNING 1)
         SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM s), (SELECT count(*) FROM d)",
    )
    .bind(slot)
    .fetch_one(executor)
    .await
    .map_err(StatusError::sql(CONTEXT))?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Adopted {
        checkpoints: count(checkpoints),
        states: count(states),
        dead_letters: count(dead_letters),
    })
}

/// How many rows from before operator state was kept per slot still wait for a slot to adopt
/// them (see [`adopt_unkeyed_rows`]).
pub async fn count_unkeyed_rows<'c, E: PgExecutor<'c>>(executor: E) -> Result<i64, StatusError> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM streamex.operator_checkpoints WHERE slot = '')
              + (SELECT count(*) FROM streamex.operator_state WHERE slot = '')
              + (SELECT count(*) FROM streamex.dead_letters WHERE slot = '')",
    )
    .fetch_one(executor)
    .await
    .map_err(StatusError::sql(
        "counting operator rows from before they were kept per slot",
    ))
}
