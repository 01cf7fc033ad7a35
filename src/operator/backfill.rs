//! Backfill: an operator's first run on a slot starts with the rows that already exist, then
//! goes on with the changes after them, with nothing missed and nothing doubled between the two.
//!
//! ```text
//!  pipeline run from S (the slot's confirmed position)
//!    ├─ operators with a checkpoint ──► stream as usual (the slot stays at S for now)
//!    └─ operators without one (backfill on): no inbox, done held at S
//!         │  export a snapshot with a temporary slot ──► consistent point P (≥ S)
//!         │  per operator, one REPEATABLE READ transaction importing it:
//!         │     every row of each subscribed table (readers, chunks) ──► handle_batch(read events)
//!         │     checkpoint R = just before P ──► COMMIT
//!         └─ when every backfill has committed: run the pipeline again from the slot (≤ S ≤ P)
//!               events of transactions committed before P ≤ R: skipped; at or after P: handled
//! ```
//!
//! # Why it is exact
//!
//! - The exported snapshot holds exactly the transactions whose commit record comes before
//!   the temporary slot's consistent point `P`, and none at or after it (that is what
//!   `EXPORT_SNAPSHOT` promises: a slot starting at `P` sends precisely the others).
//! - The rows read are the state after the transactions before `P`. The read events carry the
//!   position `(P - 1, i)`, and the checkpoint stored with the operator's writes is
//!   `R = (P - 1, MAX)`: every event of a transaction committed before `P` has a position
//!   `(commit_lsn, ordinal) ≤ R` and is skipped by the runner, every event of one committed at
//!   or after `P` is after `R` and is handled. Each change therefore reaches the operator
//!   exactly once: inside the rows it reads, or as an event, never both and never neither.
//! - Those later events still reach it: while an operator backfills, its done position stays
//!   at `S`, where the run started, so the coordinator never acknowledges the slot past `S`
//!   (`S ≤ P`: the slot was confirmed before the snapshot was taken); the run after the
//!   backfill starts from the slot, at or before `S`.
//! - Reads, the operator's writes and its checkpoint are one transaction. A crash or an error
//!   at any point rolls all of it back; the next run finds no checkpoint and backfills again,
//!   from a new snapshot. The checkpoint is a compare-and-set from "none", so two instances
//!   cannot both commit a backfill. Whatever the operator reads inside the transaction (a
//!   declarative operator's recomputation reads the source tables) is the same snapshot.
//! - An incremental operator (the blog's tallies: +1 per insert, -1 per delete) therefore ends
//!   exact: `count at P` from the reads, plus every change after `P` once.
//!
//! # Backfill and rebuild on demand
//!
//! `streamex rebuild` runs the operator's reset in the same transaction, before the reads: the
//! state is then the one a first run would have, and the checkpoint moves to `R` as above.
//! `streamex backfill` (no reset) is for recomputable state: the checkpoint stays where it
//! was, so after the rows the operator gets again every change since that checkpoint. Each
//! is recomputed from the tables as they are, and a delete in between (whose row the
//! snapshot no longer has, so the reads cannot show it) removes its derived row as it did the
//! first time.
//!
//! # What it costs the server
//!
//! The backfill's transaction holds one snapshot for as long as it reads (the xmin horizon:
//! vacuum cannot remove rows deleted after it started, on any table), and `ACCESS SHARE` locks
//! on the tables it reads (DDL and TRUNCATE on them wait). The slot keeps the WAL from `S`
//! until the backfill commits. The temporary slot exists only until every backfill has
//! imported the snapshot.
//!
//! # Reading
//!
//! A Rust operator's rows are read by `readers` connections of their own, each in a read-only
//! transaction that imported the same snapshot (so they see exactly what the operator's
//! transaction sees), with `COPY (SELECT ...) TO STDOUT`: each takes the next table, or range
//! of pages of a large one ([`crate::replication::read_tables`]), and converts the rows on its
//! own task with the stream's value conversion. They hand over
//! [`CHUNK_ROWS`](crate::replication::CHUNK_ROWS) rows at a time
//! through a channel of two chunks per reader (memory stays bounded whatever the tables'
//! sizes), and the operator handles the chunks one at a time, in its transaction, in the order
//! they arrive: read events come in no particular order, which is sound because they all
//! carry the same commit position and are of rows that exist together. Why COPY: the server
//! spends a sixth of the time it spends on `to_jsonb(t)::text` per row (measured, 1M rows:
//! 0.33 s against 2.14 s of backend time), which made the server the bottleneck.
//!
//! A declarative operator recomputes every id found in its tables (one statement per id, as
//! after a TRUNCATE) instead of one per row: each id goes to it as a read event holding the
//! id alone, in chunks like rows, so that an id whose recompute fails goes through the
//! failure policy on its own; an operator that delivers at least once reads
//! in a read-only snapshot transaction and gets no transaction of its own, and its
//! checkpoint is stored once it has handled every row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::board::Board;
use super::{Context, Delivery, DynOperator};
use crate::event::{EntityName, Event, EventType};
use crate::lsn::{Lsn, Position};
use crate::replication::{ConnectParams, ExportedSnapshot, SnapshotTable, read_lsn};
use crate::status;

/// How often a running backfill logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often it stores its progress for `streamex status` and the commands' display.
const STORE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One operator to backfill.
pub(crate) struct Job {
    pub index: usize,
    pub operator: Arc<dyn DynOperator>,
    /// The retry policy, which counts failed backfills.
    pub retry: crate::config::RetryConfig,
    /// Its stored checkpoint (a backfill asked for with `streamex backfill` or `rebuild`
    /// replaces it; a first one has none).
    pub checkpoint: Option<Position>,
    /// What `streamex backfill` / `rebuild` asked for, if that is why it runs.
    pub request: Option<status::BackfillRequest>,
}

/// How one operator's backfill ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Committed with its checkpoint.
    Done,
    /// Another instance stored a checkpoint first: nothing committed here.
    Superseded,
    /// Failed (everything rolled back).
    Failed(anyhow::Error),
}

/// What every backfill of a run shares.
pub(crate) struct Backfills<'a> {
    pub pool: &'a PgPool,
    pub params: &'a ConnectParams,
    pub slot: &'a str,
    pub default_schema: &'a str,
    pub board: &'a Board,
    pub shutdown: &'a CancellationToken,
    /// How many connections read each Rust operator's tables at once.
    pub readers: usize,
}

/// The checkpoint a backfill whose snapshot's consistent point is `point` stores: after every
/// event of a transaction committed before `point`, before every other.
pub(crate) fn checkpoint_for(point: Lsn) -> Position {
    Position::new(read_lsn(point), i64::MAX as u64)
}

impl Backfills<'_> {
    /// Runs `jobs` on one exported snapshot, concurrently; one outcome per job, in order.
    /// An error before any of them started (the snapshot could not be exported) is returned
    /// as is.
    pub async fn run(&self, jobs: &[Job]) -> anyhow::Result<Vec<Outcome>> {
        let snapshot = ExportedSnapshot::create(self.params).await.context(
            "exporting a snapshot for the backfill (a temporary replication slot: the database \
             role needs REPLICATION, and the server a free max_replication_slots and \
             max_wal_senders entry)",
        )?;
        info!(
            operators = %jobs.iter().map(|j| j.operator.name()).collect::<Vec<_>>().join(", "),
            point = %snapshot.point,
            "backfill: reading the existing rows under a snapshot; the changes from this \
             position on come from the slot afterwards"
        );
        // Every transaction imports the snapshot while its exporting connection is open: each
        // operator's own, and its readers' (a declarative operator reads in its own).
        let mut started = Vec::with_capacity(jobs.len());
        let connect = self.pool.connect_options();
        for job in jobs {
            let begun = self.begin(job, &snapshot.name).await;
            let readers = if begun.is_ok() && job.operator.as_sql().is_none() {
                crate::replication::open_readers(&connect, &snapshot.name, self.readers)
                    .await
                    .context("opening the backfill's readers")
            } else {
                Ok(Vec::new())
            };
            started.push(begun.and_then(|tx| readers.map(|readers| (tx, readers))));
        }
        let point = snapshot.point;
        drop(snapshot);
        let runs = jobs.iter().zip(started).map(|(job, begun)| async move {
            match begun {
                Ok((tx, readers)) => self.backfill(job, tx, readers, point).await,
                Err(e) => Outcome::Failed(e),
            }
        });
        Ok(futures_util::future::join_all(runs).await)
    }

    /// A REPEATABLE READ transaction on the exported snapshot.
    async fn begin(
        &self,
        job: &Job,
        snapshot: &str,
    ) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        let read_only = if job.operator.delivery() == Delivery::ExactlyOnce {
            ""
        } else {
            ", READ ONLY"
        };
        sqlx::query(&format!(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ{read_only}"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            crate::replication::setup::quote_literal(snapshot)
        ))
        .execute(&mut *tx)
        .await
        .context("importing the backfill's snapshot")?;
        Ok(tx)
    }

    async fn backfill(
        &self,
        job: &Job,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        readers: Vec<sqlx::PgConnection>,
        point: Lsn,
    ) -> Outcome {
        let name = job.operator.name().to_owned();
        let began = Instant::now();
        let exactly_once = job.operator.delivery() == Delivery::ExactlyOnce;
        let tables = job.request.as_ref().and_then(|r| r.tables.as_deref());
        let read = async {
            if job.request.as_ref().is_some_and(|r| r.rebuild) {
                let mut ctx = Context::new(exactly_once.then_some(&mut *tx), 1, &name);
                super::runner::guarded(job.operator.reset(&mut ctx))
                    .await
                    .map_err(|e| {
                        anyhow::Error::new(Halt(format!("the rebuild's reset failed: {e:#}")))
                    })?;
            }
            let rows = if let Some(sql) = job.operator.as_sql() {
                self.recompute(job, sql, &mut tx, point, tables).await?
            } else {
                self.read_tables(job, &mut tx, readers, point, began, tables)
                    .await?
            };
            let checkpoint = checkpoint_for(point);
            let from = job.checkpoint;
            // `streamex backfill` of an operator that has run: its state is recomputable, so
            // the changes since its checkpoint come again after the rows (a delete in between,
            // which the rows cannot show, is applied then); only a first run or a rebuild
            // (whose reset cleared everything) starts at the snapshot's point.
            let keep = from.is_some() && job.request.as_ref().is_some_and(|r| !r.rebuild);
            let stored = if keep {
                true
            } else if exactly_once {
                status::advance_checkpoint(&mut *tx, self.slot, &name, from, checkpoint).await?
            } else {
                status::advance_checkpoint(self.pool, self.slot, &name, from, checkpoint).await?
            };
            if !stored {
                return Ok(None);
            }
            if job.request.is_some() {
                status::finish_backfill(&mut *tx, self.slot, &name).await?;
            }
            tx.commit().await?;
            // The progress row is written outside the transaction (a row it updated would
            // be a serialization failure for it): gone once the backfill is.
            if let Err(e) = status::clear_backfill_progress(self.pool, self.slot, &name).await {
                tracing::debug!(operator = %name, error = %e, "could not clear the backfill's progress");
            }
            Ok::<_, anyhow::Error>(Some(rows))
        };
        let result = tokio::select! {
            result = read => result,
            _ = self.shutdown.cancelled() => {
                return Outcome::Failed(anyhow::anyhow!("stopped before the backfill ended"));
            }
        };
        match result {
            Ok(Some(rows)) => {
                let secs = began.elapsed().as_secs_f64();
                info!(
                    operator = %name, rows, seconds = format!("{secs:.2}"),
                    rows_per_second = format!("{:.0}", rows as f64 / secs.max(1e-6)),
                    checkpoint = %checkpoint_for(point),
                    "backfill done"
                );
                Outcome::Done
            }
            Ok(None) => {
                warn!(operator = %name, "another instance stored this operator's checkpoint first: its backfill is theirs; rolled back");
                Outcome::Superseded
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Hands every row of each table the operator subscribes to (for read events) to it, in
    /// chunks, inside `tx`; `readers` read them at once (see
    /// [`crate::replication::read_tables`]), the operator handles them one chunk at a time.
    /// Returns how many.
    async fn read_tables(
        &self,
        job: &Job,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        readers: Vec<sqlx::PgConnection>,
        point: Lsn,
        began: Instant,
        only: Option<&[String]>,
    ) -> anyhow::Result<u64> {
        let mut entities: Vec<String> = job
            .operator
            .subscriptions()
            .into_iter()
            .filter(|s| s.takes(EventType::Read))
            .map(|s| s.entity)
            .filter(|entity| only.is_none_or(|only| only.contains(entity)))
            .collect();
        entities.sort();
        entities.dedup();
        let mut types = crate::decode::TypeCache::new();
        let mut tables = Vec::new();
        for entity in &entities {
            tables.push(self.table(tx, &mut types, entity).await?);
        }
        let estimate: u64 = tables.iter().map(|t| t.estimate).sum();
        self.board.backfill_started(job.index, estimate);
        self.progress(job, 0, estimate, true).await;
        let timestamp: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM now()) * 1000000)::int8")
                .fetch_one(&mut **tx)
                .await?;
        let mut chunks =
            crate::replication::read_tables(readers, tables.into(), (point, timestamp));
        let mut rows: u64 = 0;
        let mut logged = Instant::now();
        let mut stored = Instant::now();
        while let Some(chunk) = chunks.recv().await {
            let events = chunk?.events;
            rows += events.len() as u64;
            self.handle_chunk(job, tx, &events).await?;
            self.board.backfill_rows(job.index, rows);
            if stored.elapsed() >= STORE_PROGRESS_EVERY {
                stored = Instant::now();
                self.progress(job, rows, estimate, false).await;
            }
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = Instant::now();
                log_progress(job.operator.name(), rows, estimate, began);
            }
        }
        Ok(rows)
    }

    /// A declarative operator's backfill: its reaction to every row is the recomputation of
    /// every id found in its tables, one statement per id instead of one per row. Each id
    /// goes to it as a read event of its entity carrying only the id, a chunk at a time
    /// through [`handle_chunk`](Self::handle_chunk): a chunk in one round trip, and an id
    /// that fails every retry set aside or halting the operator by its policy, as a row does.
    /// Returns how many ids.
    async fn recompute(
        &self,
        job: &Job,
        sql: &super::sql::SqlOperator,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        point: Lsn,
        only: Option<&[String]>,
    ) -> anyhow::Result<u64> {
        self.progress(job, 0, 0, true).await;
        let ids = sql.table_ids(tx, only).await?;
        let estimate = ids.len() as u64;
        self.board.backfill_started(job.index, estimate);
        self.progress(job, 0, estimate, true).await;
        let timestamp: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM now()) * 1000000)::int8")
                .fetch_one(&mut **tx)
                .await?;
        // What the read events of one entity share: its names and the id column's.
        let mut shapes: std::collections::BTreeMap<&str, IdShape> = Default::default();
        for (entity, _) in &ids {
            if !shapes.contains_key(&**entity) {
                let field = sql.id_column(entity).unwrap_or_default();
                shapes.insert(entity, IdShape::new(entity, field, self.default_schema)?);
            }
        }
        let mut done: u64 = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let events: Vec<Arc<Event>> = chunk
                .iter()
                .filter_map(|(entity, id)| {
                    let event = shapes.get(&**entity)?.event(id, point, timestamp, done);
                    done += 1;
                    Some(Arc::new(event))
                })
                .collect();
            self.handle_chunk(job, tx, &events).await?;
            self.board.backfill_rows(job.index, done);
            self.progress(job, done, estimate, false).await;
        }
        Ok(done)
    }

    /// Stores how far `job` is, outside its transaction (for `streamex status`); a failure to
    /// is logged at debug only: the progress is for display.
    async fn progress(&self, job: &Job, rows: u64, estimate: u64, started: bool) {
        if let Err(e) = status::store_backfill_progress(
            self.pool,
            self.slot,
            job.operator.name(),
            rows,
            estimate,
            started,
        )
        .await
        {
            tracing::debug!(operator = job.operator.name(), error = %e, "could not store the backfill's progress");
        }
    }

    /// Hands `events` to the operator as one batch, inside a savepoint of `tx`. When the batch
    /// fails, it is rolled back to the savepoint and the rows are handled one by one, each in
    /// its own savepoint, with the retry policy: a row that fails every time is stored as a
    /// dead letter (in `tx`, so only if the backfill commits) under `dead_letter`, or halts
    /// the operator under `halt` ([`Halt`]); a database outage fails the whole backfill.
    async fn handle_chunk(
        &self,
        job: &Job,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        events: &[Arc<Event>],
    ) -> anyhow::Result<()> {
        let name = job.operator.name();
        let exactly_once = job.operator.delivery() == Delivery::ExactlyOnce;
        let savepoint = |what: &'static str| exactly_once.then_some(what);
        savepoint_step(tx, savepoint("SAVEPOINT")).await?;
        let batch = {
            let mut ctx = Context::new(exactly_once.then_some(&mut **tx), 1, name);
            super::runner::guarded(job.operator.handle_batch(events, &mut ctx)).await
        };
        let error = match batch {
            Ok(()) => return savepoint_step(tx, savepoint("RELEASE SAVEPOINT")).await,
            Err(error) => error,
        };
        if super::runner::is_database_outage(&error) {
            return Err(error);
        }
        savepoint_step(tx, savepoint("ROLLBACK TO SAVEPOINT")).await?;
        warn!(
            operator = name, rows = events.len(), error = %crate::error::chain(&error),
            "a chunk of the backfill failed; handling its rows one by one"
        );
        for event in events {
            let mut attempt = 1;
            loop {
                savepoint_step(tx, savepoint("SAVEPOINT")).await?;
                let result = {
                    let mut ctx = Context::new(exactly_once.then_some(&mut **tx), attempt, name);
                    super::runner::guarded(job.operator.handle(event, &mut ctx)).await
                };
                let error = match result {
                    Ok(()) => {
                        savepoint_step(tx, savepoint("RELEASE SAVEPOINT")).await?;
                        break;
                    }
                    Err(error) => error,
                };
                if super::runner::is_database_outage(&error) {
                    return Err(error);
                }
                savepoint_step(tx, savepoint("ROLLBACK TO SAVEPOINT")).await?;
                let message = format!(
                    "operator {name} failed on a row of {} during its backfill: {}",
                    event.entity,
                    crate::error::chain(&error)
                );
                if attempt <= job.retry.retries {
                    tokio::time::sleep(job.retry.delay(attempt)).await;
                    attempt += 1;
                    continue;
                }
                match job.retry.on_failure {
                    crate::config::FailurePolicy::Halt => {
                        return Err(Halt(message).into());
                    }
                    crate::config::FailurePolicy::DeadLetter => {
                        let json = serde_json::to_value(&**event)?;
                        // In the backfill's transaction when the operator's writes are in it.
                        let mut own;
                        let conn: &mut sqlx::PgConnection = if exactly_once {
                            tx
                        } else {
                            own = self.pool.acquire().await?;
                            &mut own
                        };
                        status::insert_dead_letter(
                            conn,
                            self.slot,
                            name,
                            event.position(),
                            &json,
                            &message,
                            attempt,
                        )
                        .await?;
                        tracing::error!(
                            operator = name, entity = %event.entity, attempts = attempt, error = %message,
                            "backfill row stored in streamex.dead_letters; going on"
                        );
                        self.board.dead_lettered(job.index);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The table an entity names, as the backfill reads it.
    async fn table(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        types: &mut crate::decode::TypeCache,
        entity: &str,
    ) -> anyhow::Result<SnapshotTable> {
        let parsed = EntityName::parse(entity)?;
        let schema = parsed
            .schema
            .clone()
            .unwrap_or_else(|| self.default_schema.to_owned());
        let name = (schema.as_str(), parsed.table.as_str());
        crate::replication::describe_table(tx, self.pool, types, name, self.default_schema)
            .await
            .with_context(|| format!("looking up table {entity} for the backfill"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "table {entity} ({schema}.{}) does not exist: it cannot be backfilled",
                    parsed.table
                )
            })
    }
}

/// How many ids of a declarative operator's backfill go to it at once (one round trip).
const ID_CHUNK: usize = 2_000;

/// What the read events a declarative operator's backfill gives it for the ids of one
/// entity share.
struct IdShape {
    schema: Arc<str>,
    entity: Arc<str>,
    table: Arc<str>,
    columns: crate::event::Columns,
    no_key: Arc<[String]>,
}

impl IdShape {
    fn new(entity: &str, field: &str, default_schema: &str) -> anyhow::Result<IdShape> {
        let name = EntityName::parse(entity)?;
        Ok(IdShape {
            schema: name.schema.as_deref().unwrap_or(default_schema).into(),
            entity: entity.into(),
            table: name.table.as_str().into(),
            columns: crate::event::Names::shared(vec![field.into()]),
            no_key: Arc::from(Vec::<String>::new()),
        })
    }

    /// The read event of `id`: a record of the id column alone, at the position of the
    /// snapshot's reads (`ordinal` among them).
    fn event(&self, id: &str, point: Lsn, timestamp: i64, ordinal: u64) -> Event {
        let mut record = crate::event::Record::of(&self.columns);
        record.set(0, serde_json::Value::String(id.to_owned()));
        Event {
            kind: EventType::Read,
            schema: self.schema.clone(),
            entity: self.entity.clone(),
            table: self.table.clone(),
            new_record: Some(record),
            old_record: None,
            changes: None,
            unavailable_columns: Vec::new(),
            timestamp,
            lsn: point,
            commit_lsn: read_lsn(point),
            xid: 0,
            ordinal,
            decode_error: None,
            message: None,
            key_columns: self.no_key.clone(),
        }
    }
}

/// Runs `<what> streamex_backfill_rows` (a savepoint step) in `tx`, when there is one.
async fn savepoint_step(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    what: Option<&'static str>,
) -> anyhow::Result<()> {
    if let Some(what) = what {
        sqlx::query(&format!("{what} streamex_backfill_rows"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// A row failed every retry under the `halt` policy: the operator halts (its backfill is
/// rolled back and runs again, from a new snapshot, once it is resumed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Halt(pub String);

fn log_progress(operator: &str, rows: u64, estimate: u64, began: Instant) {
    let secs = began.elapsed().as_secs_f64().max(1e-6);
    let rate = rows as f64 / secs;
    let left = estimate.saturating_sub(rows);
    info!(
        operator,
        rows,
        estimated = estimate,
        rows_per_second = format!("{rate:.0}"),
        seconds_left = format!("{:.0}", left as f64 / rate.max(1e-6)),
        "backfilling"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_splits_transactions_at_the_consistent_point() {
        let point = Lsn(0x1_6B37_4D48);
        let checkpoint = checkpoint_for(point);
        let before = Position::new(Lsn(point.0 - 8), 3);
        let at = Position::new(point, 0);
        let after = Position::new(Lsn(point.0 + 0x30), 0);
        assert!(
            before <= checkpoint,
            "committed before the point: in the snapshot"
        );
        assert!(
            at > checkpoint,
            "committed at the point: not in the snapshot"
        );
        assert!(after > checkpoint);
        // Every read event's position is at or before the checkpoint.
        assert!(Position::new(read_lsn(point), 1_000_000) <= checkpoint);
        assert_eq!(checkpoint_for(Lsn(0)).commit_lsn, Lsn(0));
    }
}
