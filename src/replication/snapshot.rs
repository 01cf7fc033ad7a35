//! An exported snapshot tied to a position in the WAL: what a backfill reads the existing rows
//! under, so that it meets the stream at one well-defined point.
//!
//! `CREATE_REPLICATION_SLOT ... TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT` on a replication
//! connection returns the slot's consistent point `P` and the name of a snapshot that sees
//! exactly the transactions whose commit record comes before `P`: those a logical slot
//! starting at `P` would not send. Other sessions import it (`SET TRANSACTION SNAPSHOT`)
//! while the exporting connection stays open and idle; closing it drops the temporary slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::decode::{CopyColumn, CopyReader, CopyRow, TypeCache};
use crate::event::{Event, EventType};

use super::conn::{ConnectOptions, Connection};
use super::params::ConnectParams;
use super::setup::quote_ident;
use super::stream::SESSION_SETTINGS;
use super::{Lsn, ReplicationError};

/// A snapshot exported with a temporary slot, valid while this value lives.
#[derive(Debug)]
pub struct ExportedSnapshot {
    /// Kept open and idle: the snapshot is importable until it runs another command or closes.
    _conn: Connection,
    /// The name to give `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The consistent point: the snapshot holds every transaction committed before it, and
    /// none committed at or after it.
    pub point: Lsn,
}

impl ExportedSnapshot {
    /// Exports a snapshot through a temporary slot on a new replication connection (needs a
    /// free `max_replication_slots` and `max_wal_senders` entry while it lives).
    pub async fn create(params: &ConnectParams) -> Result<ExportedSnapshot, ReplicationError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let slot = format!(
            "streamex_backfill_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self::with_slot(params, &slot, true).await
    }

    /// Creates logical slot `slot` (pgoutput; temporary: dropped when the connection closes)
    /// and exports the snapshot it starts at. A temporary slot can be streamed from on this
    /// same connection once the snapshot is imported ([`into_connection`](Self::into_connection)).
    pub async fn with_slot(
        params: &ConnectParams,
        slot: &str,
        temporary: bool,
    ) -> Result<ExportedSnapshot, ReplicationError> {
        let settings = SESSION_SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut conn = Connection::connect(
            params,
            &ConnectOptions {
                replication: true,
                settings,
            },
        )
        .await?;
        let temporary = if temporary { " TEMPORARY" } else { "" };
        let rows = conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await?;
        // slot_name, consistent_point, snapshot_name, output_plugin
        let row = rows.first();
        let point = row
            .and_then(|r| r.get_index(1))
            .and_then(|text| text.parse::<Lsn>().ok());
        let name = row.and_then(|r| r.get_index(2)).map(str::to_owned);
        match (point, name) {
            (Some(point), Some(name)) => Ok(ExportedSnapshot {
                _conn: conn,
                name,
                point,
            }),
            _ => Err(ReplicationError::Protocol(
                "CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT returned no consistent point or \
                 snapshot name"
                    .to_owned(),
            )),
        }
    }

    /// The replication connection that exported it: once every reader has imported the
    /// snapshot, a stream of a temporary slot made by [`with_slot`](Self::with_slot) starts
    /// on it (its slot would be gone with another).
    pub fn into_connection(self) -> Connection {
        self._conn
    }
}

/// A table to read under a snapshot, as [`describe_table`] finds it.
#[derive(Clone, Debug)]
pub struct SnapshotTable {
    /// The entity its events carry (unqualified in the default schema).
    pub entity: Arc<str>,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    /// `"schema"."table"`.
    pub sql_name: String,
    /// Every column, in `attnum` order, generated ones too (as `to_jsonb(t)` has them).
    pub columns: Arc<[CopyColumn]>,
    /// The key columns as the stream's events carry them: the replica identity's (the
    /// primary key by default and under FULL, none under NOTHING).
    pub key_columns: Arc<[String]>,
    /// A partitioned table is read with its partitions; another without its inheritance
    /// children (tables of their own).
    pub partitioned: bool,
    /// Its size in pages when described: the reads split it into ranges of pages.
    pub pages: u64,
    /// Whether the server scans a range of pages by itself (a TID range scan, 14 and later;
    /// before, every range would read the whole table).
    pub tid_ranges: bool,
    /// The rows the statistics expect (`reltuples`, partitions included).
    pub estimate: u64,
}

impl SnapshotTable {
    /// The `read` event of one of its rows, read under a snapshot whose consistent point is
    /// `point`: it carries the commit position just before `point` (no commit record can
    /// start there, records being aligned), as every read of that snapshot does, and
    /// `ordinal`, its place among them.
    pub fn read_event(&self, row: CopyRow, point: Lsn, ordinal: u64, timestamp: i64) -> Event {
        Event {
            kind: EventType::Read,
            schema: self.schema.clone(),
            entity: self.entity.clone(),
            table: self.name.clone(),
            new_record: Some(row.record),
            old_record: None,
            changes: None,
            unavailable_columns: Vec::new(),
            timestamp,
            lsn: point,
            commit_lsn: read_lsn(point),
            xid: 0,
            ordinal,
            decode_error: row.problems,
            message: None,
            key_columns: self.key_columns.clone(),
        }
    }
}

/// The commit position of the read events of a snapshot whose consistent point is `point`.
pub fn read_lsn(point: Lsn) -> Lsn {
    Lsn(point.0.saturating_sub(1))
}

/// Describes table `schema`.`table` for [`read_tables`], its column types resolved through
/// `types` (with `catalog` for types not cached yet); its entity is unqualified in
/// `default_schema`. `None` when there is no such table.
pub async fn describe_table(
    conn: &mut sqlx::PgConnection,
    catalog: &sqlx::PgPool,
    types: &mut TypeCache,
    (schema, table): (&str, &str),
    default_schema: &str,
) -> Result<Option<SnapshotTable>, anyhow::Error> {
    let sql_name = format!("{}.{}", quote_ident(schema), quote_ident(table));
    type Found = (bool, bool, i64, i64, Vec<String>, Vec<i64>, Vec<String>);
    let found: Option<Found> = sqlx::query_as(
        "SELECT c.relkind = 'p', current_setting('server_version_num')::int4 >= 140000,
                CASE WHEN c.relkind = 'p' THEN 0
                     ELSE pg_relation_size(c.oid) / current_setting('block_size')::int8 END,
                (SELECT coalesce(sum(greatest(p.reltuples, 0)), 0)::int8
                   FROM pg_class p
                  WHERE p.oid = c.oid OR p.oid IN (SELECT relid FROM pg_partition_tree(c.oid))),
                array(SELECT a.attname::text FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       ORDER BY a.attnum),
                array(SELECT a.atttypid::int8 FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       ORDER BY a.attnum),
                array(SELECT a.attname::text FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                         AND a.attnum = ANY (
                              SELECT unnest(i.indkey::int2[]) FROM pg_index i
                               WHERE i.indrelid = c.oid
                                 AND ((c.relreplident IN ('d', 'f') AND i.indisprimary)
                                   OR (c.relreplident = 'i' AND i.indisreplident)))
                       ORDER BY a.attnum)
           FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(&sql_name)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((partitioned, tid_ranges, pages, estimate, names, oids, key_columns)) = found else {
        return Ok(None);
    };
    let mut columns = Vec::with_capacity(names.len());
    for (name, oid) in names.into_iter().zip(oids) {
        let oid = u32::try_from(oid).unwrap_or(0);
        let ty = types.resolve(catalog, oid).await?;
        columns.push(CopyColumn { name, ty });
    }
    Ok(Some(SnapshotTable {
        entity: crate::event::entity_name(schema, table, default_schema).into(),
        schema: schema.into(),
        name: table.into(),
        sql_name,
        columns: columns.into(),
        key_columns: key_columns.into(),
        partitioned,
        pages: u64::try_from(pages).unwrap_or(0),
        tid_ranges,
        estimate: u64::try_from(estimate).unwrap_or(0),
    }))
}

/// Read events of rows of one table: `table` indexes the slice given to [`read_tables`].
#[derive(Debug)]
pub struct SnapshotChunk {
    pub table: usize,
    pub events: Vec<Arc<Event>>,
}

/// How many rows a reader hands over at a time.
pub const CHUNK_ROWS: usize = 5_000;

/// Tables at least this many pages (8 KiB each) long are split into page ranges that several
/// readers read at once; smaller ones are read whole by one.
const SPLIT_PAGES: u64 = 512;

/// Opens `readers` connections (with `connect`'s options: not from the pool, which stays free
/// for the operators), each in a read-only REPEATABLE READ transaction that imports
/// `snapshot`, with the session settings the stream pins so that values read convert exactly
/// as the stream's. Must run while the snapshot's exporting connection is open.
pub async fn open_readers(
    connect: &sqlx::postgres::PgConnectOptions,
    snapshot: &str,
    readers: usize,
) -> Result<Vec<sqlx::PgConnection>, anyhow::Error> {
    let mut conns = Vec::with_capacity(readers);
    let mut statements: Vec<String> = SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("SET {k} = {}", super::setup::quote_literal(v)))
        .collect();
    statements.push("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned());
    statements.push(format!(
        "SET TRANSACTION SNAPSHOT {}",
        super::setup::quote_literal(snapshot)
    ));
    for _ in 0..readers.max(1) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(connect).await?;
        for statement in &statements {
            sqlx::query(statement)
                .execute(&mut conn)
                .await
                .map_err(|e| anyhow::Error::new(e).context("starting a snapshot reader"))?;
        }
        conns.push(conn);
    }
    Ok(conns)
}

/// Reads every row of `tables` on `readers` (from [`open_readers`]) at once: each reader takes
/// the next table, or range of pages of a large table ([`SnapshotTable::tid_ranges`]), and
/// streams it with `COPY (SELECT ...) TO STDOUT`, converting the rows on its own task.
/// Chunks of at most [`CHUNK_ROWS`] rows, as read events of a snapshot whose consistent point is
/// `point` ([`SnapshotTable::read_event`]; ordinals from 0, unique, in no particular order),
/// come out of the returned channel, which holds at most two per reader (memory stays bounded
/// whatever the tables' sizes); it closes when everything is read, after an error (the last
/// item), or never fills again once dropped (the readers end, and their connections close).
pub fn read_tables(
    readers: Vec<sqlx::PgConnection>,
    tables: Arc<[SnapshotTable]>,
    (point, timestamp): (Lsn, i64),
) -> tokio::sync::mpsc::Receiver<Result<SnapshotChunk, anyhow::Error>> {
    let count = readers.len().max(1);
    let mut work = std::collections::VecDeque::new();
    for (index, table) in tables.iter().enumerate() {
        let split = !table.partitioned && table.tid_ranges && table.pages >= SPLIT_PAGES;
        if !split || count == 1 {
            work.push_back((index, None));
            continue;
        }
        // Four ranges per reader, so that one that happens to be slow is not left alone at the
        // end; the last range is open-ended (the table may have grown since it was measured).
        let parts = (count as u64 * 4).min(table.pages);
        for part in 0..parts {
            let from = table.pages * part / parts;
            let to = (part + 1 < parts).then(|| table.pages * (part + 1) / parts);
            work.push_back((index, Some((from, to))));
        }
    }
    let work = Arc::new(std::sync::Mutex::new(work));
    let ordinals = Arc::new(AtomicU64::new(0));
    let (tx, rx) = tokio::sync::mpsc::channel(count * 2);
    for mut conn in readers {
        let (work, tables, tx) = (work.clone(), tables.clone(), tx.clone());
        let ordinals = ordinals.clone();
        tokio::spawn(async move {
            loop {
                let next = work.lock().map(|mut w| w.pop_front()).unwrap_or(None);
                let Some((index, range)) = next else { break };
                let table = &tables[index];
                let read = copy_rows(&mut conn, table, range, |rows| {
                    // The events are made here, on the reader's task, not by the one consumer.
                    let first = ordinals.fetch_add(rows.len() as u64, Ordering::Relaxed);
                    let events = rows
                        .into_iter()
                        .zip(first..)
                        .map(|(row, ordinal)| {
                            Arc::new(table.read_event(row, point, ordinal, timestamp))
                        })
                        .collect();
                    let tx = tx.clone();
                    async move {
                        tx.send(Ok(SnapshotChunk {
                            table: index,
                            events,
                        }))
                        .await
                        .is_ok()
                    }
                })
                .await;
                match read {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        let _ = tx
                            .send(Err(e.context(format!("reading {}", table.sql_name))))
                            .await;
                        break;
                    }
                }
            }
        });
    }
    rx
}

/// Streams `table` (or the pages `range` of it) through COPY into chunks of [`CHUNK_ROWS`]
/// rows, each given to `send`; `Ok(false)` when `send` said the receiver is gone.
async fn copy_rows<F, Fut>(
    conn: &mut sqlx::PgConnection,
    table: &SnapshotTable,
    range: Option<(u64, Option<u64>)>,
    send: F,
) -> Result<bool, anyhow::Error>
where
    F: Fn(Vec<CopyRow>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use futures_util::StreamExt as _;
    // An empty list for a table without columns: its rows are empty lines.
    let columns = table
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let only = if table.partitioned { "" } else { "ONLY " };
    let filter = match range {
        None => String::new(),
        Some((from, None)) => format!(" WHERE ctid >= '({from},0)'::tid"),
        Some((from, Some(to))) => {
            format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
        }
    };
    let statement = format!(
        "COPY (SELECT {columns} FROM {only}{}{filter}) TO STDOUT",
        table.sql_name
    );
    let mut reader = CopyReader::new(table.columns.clone());
    let mut rows = Vec::with_capacity(CHUNK_ROWS);
    let mut out = conn.copy_out_raw(&statement).await?;
    while let Some(data) = out.next().await {
        reader.push(&data?, &mut rows)?;
        if rows.len() >= CHUNK_ROWS {
            let full = std::mem::replace(&mut rows, Vec::with_capacity(CHUNK_ROWS));
            if !send(full).await {
                return Ok(false);
            }
        }
    }
    reader.finish()?;
    if !rows.is_empty() && !send(rows).await {
        return Ok(false);
    }
    Ok(true)
}
