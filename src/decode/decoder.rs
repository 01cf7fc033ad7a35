//! From pgoutput messages to events.
//!
//! ```text
//! XLogData payload ──► pgoutput::decode ──► Relation / Type ──► caches (by OID)
//!                                      └──► Begin / Insert / Update / Delete / Truncate / Commit
//!                                               └──► Decoded::{Begin, Event, Commit} (in order)
//! ```
//!
//! The relation cache is filled by the Relation messages the server sends before a table's
//! first change in each session (and again when the table changes), so it is cleared on every
//! reconnect. Column types are resolved once through the catalog connection and cached; with
//! each Relation message the catalog also says which of the table's columns are generated;
//! those the server sends no value for (every one before PostgreSQL 18, virtual ones on 18)
//! are listed in `unavailable_columns`.
//!
//! # What stops the stream, and what does not
//!
//! Only what makes the stream itself unreadable is a [`DecoderError`]: a malformed message, a
//! change to a relation the server has not described, a column count that disagrees, a value
//! in binary format, or a catalog query that failed (transient: the session is retried). A
//! value that cannot be converted does not stop anything: its column is left out of the
//! record and the event's `decode_error` says which column of which change, and why (never
//! the value). A column whose type no longer exists in the catalog (dropped after the change
//! was written, in the same transaction) is decoded from its text, as a string, with a
//! warning.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tracing::warn;

use super::pgoutput::{
    self, Begin, Commit, OldTuple, PgOutputMessage, ReplicaIdentity, Tuple, TupleValue,
};
use super::types::{PgType, TypeCache, TypeError};
use super::value::{raw_kind, text_to_json};
use crate::event::{Change, Changes, Columns, Event, EventType, Names, Raw, Record};
use crate::lsn::{Lsn, PG_EPOCH_OFFSET_MICROS};

/// What the decoder hands downstream, in WAL order.
// Nearly every item is an Event: boxing it would only add an allocation per change.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A transaction starts; its changes follow, then its [`Decoded::Commit`].
    Begin {
        xid: u32,
        commit_lsn: Lsn,
        /// Commit time, microseconds since the Unix epoch.
        timestamp: i64,
    },
    /// One change, or a transactional message (an event of type `message`).
    Event(Arc<Event>),
    /// A logical decoding message sent outside any transaction
    /// (`pg_logical_emit_message(false, ..)`): not an event, since nothing orders it among the
    /// changes or makes it durable with them.
    Message {
        lsn: Lsn,
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
    /// The transaction is complete. Acknowledge `end_lsn` once all of its changes are durably
    /// processed.
    Commit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        timestamp: i64,
        /// How many events the transaction had.
        events: u64,
    },
    /// The connection was lost in the middle of a transaction: forget its events so far, it
    /// will be sent again in full, from its `Begin`.
    Interrupted,
}

/// A table as the server described it in its last Relation message.
#[derive(Debug)]
pub struct Table {
    pub oid: u32,
    /// The key columns' names, shared by every event of the table: the replica identity's,
    /// or under REPLICA IDENTITY FULL the primary key's (none without one).
    pub key_columns: Arc<[String]>,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    /// The entity name its events carry (see [`crate::event::EntityName`]).
    pub entity: Arc<str>,
    pub replica_identity: ReplicaIdentity,
    /// The columns the server sends, in the order of every tuple's values.
    pub columns: Vec<TableColumn>,
    /// Their names, shared by every record of the table.
    pub(crate) names: Columns,
    /// The generated columns the server leaves out of its messages, in column order, as the
    /// catalog had them when the Relation message was decoded: every one before PostgreSQL
    /// 18; on 18, where streamex publishes stored ones, the virtual ones. They are listed in
    /// every new record's `unavailable_columns`.
    pub generated_columns: Vec<String>,
}

impl Table {
    /// `schema.name`, for messages.
    fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// One column of a [`Table`].
#[derive(Debug)]
pub struct TableColumn {
    pub name: String,
    pub is_key: bool,
    pub type_oid: u32,
    pub ty: Arc<PgType>,
    /// Why the column's values cannot be converted, when its type cannot be described (it
    /// nests deeper than [`super::MAX_DEPTH`]): each of its values is then left out of its
    /// record and reported in the event's `decode_error`.
    pub unconvertible: Option<String>,
}

/// A message that could not be turned into events.
///
/// Each message is complete in itself, cause included, and none has a [`source`]: a chain
/// printed with `{:#}` says each thing once, and so does a log line that shows the error.
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("malformed pgoutput message at {lsn}: {error}")]
    Message {
        lsn: Lsn,
        error: pgoutput::DecodeError,
    },
    #[error(
        "the change at {lsn} refers to relation {oid}, which the server has not described in a Relation message"
    )]
    UnknownRelation { lsn: Lsn, oid: u32 },
    #[error("a {what} message at {lsn} arrived outside a transaction")]
    OutsideTransaction { what: &'static str, lsn: Lsn },
    #[error("the change to {table} at {lsn} has {got} columns, but the table has {expected}")]
    ColumnCount {
        table: String,
        lsn: Lsn,
        got: usize,
        expected: usize,
    },
    /// The catalog query for a column's type failed (only [`TypeError::Query`] comes here).
    #[error("the type (oid {oid}) of column {table}.{column}: {error}")]
    Type {
        table: String,
        column: String,
        oid: u32,
        error: TypeError,
    },
    /// The catalog query for a table's generated columns failed.
    #[error("looking up the generated columns of {table} in the catalog: {error}")]
    GeneratedColumns { table: String, error: sqlx::Error },
    /// The catalog query for the primary key of a table with REPLICA IDENTITY FULL failed.
    #[error("looking up the primary key of {table} in the catalog: {error}")]
    PrimaryKey { table: String, error: sqlx::Error },
    #[error(
        "column {table}.{column} of the change at {lsn} came in binary format, which streamex does not ask for"
    )]
    Binary {
        table: String,
        column: String,
        lsn: Lsn,
    },
}

impl DecoderError {
    /// Whether reconnecting may help: only a catalog query may fail in passing, when
    /// [`crate::error::is_transient_sqlx`] says its error is transient. The messages
    /// themselves do not change when they are decoded again.
    pub fn is_transient(&self) -> bool {
        match self {
            DecoderError::Type {
                error: TypeError::Query { error, .. },
                ..
            }
            | DecoderError::GeneratedColumns { error, .. }
            | DecoderError::PrimaryKey { error, .. } => crate::error::is_transient_sqlx(error),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Transaction {
    xid: u32,
    commit_lsn: Lsn,
    timestamp: i64,
    next_ordinal: u64,
}

/// Turns pgoutput messages into [`Decoded`] items; one per replication session.
#[derive(Debug)]
pub struct Decoder {
    catalog: sqlx::PgPool,
    tables: foldhash::HashMap<u32, Arc<Table>>,
    types: TypeCache,
    tx: Option<Transaction>,
    default_schema: Arc<str>,
    /// `schema.name` of the types the server described in Type messages this session.
    type_names: HashMap<u32, String>,
    /// Whether Relation messages look generated columns (and the primary key of a table with
    /// REPLICA IDENTITY FULL) up (only unit tests, whose pool never connects, turn it off).
    generated_lookup: bool,
}

impl Decoder {
    /// A decoder that looks column types up through `catalog`, a pool on the same database.
    pub fn new(catalog: sqlx::PgPool) -> Self {
        Decoder {
            catalog,
            tables: foldhash::HashMap::default(),
            types: TypeCache::new(),
            tx: None,
            default_schema: crate::event::DEFAULT_SCHEMA.into(),
            type_names: HashMap::new(),
            generated_lookup: true,
        }
    }

    /// A decoder that asks the catalog nothing about generated columns, for tests whose pool
    /// never connects (types stay builtin there).
    #[cfg(test)]
    fn offline(mut self) -> Self {
        self.generated_lookup = false;
        self
    }

    /// Tables of `schema` get an unqualified entity name (`public` by default).
    pub fn default_schema(mut self, schema: &str) -> Self {
        self.default_schema = schema.into();
        self
    }

    /// Starts over for a new session: forgets relations and types. Returns whether a
    /// transaction was cut off (downstream must then be sent [`Decoded::Interrupted`]).
    pub fn reset(&mut self) -> bool {
        self.tables.clear();
        self.types = TypeCache::new();
        self.type_names.clear();
        self.tx.take().is_some()
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// The table with relation OID `oid`, as last described by the server.
    pub fn table(&self, oid: u32) -> Option<&Arc<Table>> {
        self.tables.get(&oid)
    }

    /// Decodes one XLogData payload generated at `lsn`, appending what it yields to `out`.
    pub async fn decode(
        &mut self,
        lsn: Lsn,
        data: Bytes,
        out: &mut Vec<Decoded>,
    ) -> Result<(), DecoderError> {
        let message =
            pgoutput::decode(data).map_err(|error| DecoderError::Message { lsn, error })?;
        match message {
            PgOutputMessage::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            }) => {
                let timestamp = commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS);
                self.tx = Some(Transaction {
                    xid,
                    commit_lsn: final_lsn,
                    timestamp,
                    next_ordinal: 0,
                });
                out.push(Decoded::Begin {
                    xid,
                    commit_lsn: final_lsn,
                    timestamp,
                });
            }
            PgOutputMessage::Commit(Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            }) => {
                let tx = self.tx.take().ok_or(DecoderError::OutsideTransaction {
                    what: "Commit",
                    lsn,
                })?;
                out.push(Decoded::Commit {
                    xid: tx.xid,
                    commit_lsn,
                    end_lsn,
                    timestamp: commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS),
                    events: tx.next_ordinal,
                });
            }
            PgOutputMessage::Origin(_) => {}
            PgOutputMessage::Type(t) => {
                self.types.invalidate(t.oid);
                let name = if t.namespace.is_empty() {
                    t.name
                } else {
                    format!("{}.{}", t.namespace, t.name)
                };
                self.type_names.insert(t.oid, name);
            }
            PgOutputMessage::Relation(relation) => {
                let schema: Arc<str> = if relation.namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    relation.namespace.into()
                };
                let name: Arc<str> = relation.name.into();
                let entity: Arc<str> =
                    crate::event::entity_name(&schema, &name, &self.default_schema).into();
                let table = format!("{schema}.{name}");
                let mut columns = Vec::with_capacity(relation.columns.len());
                for column in relation.columns {
                    let (ty, unconvertible) = self.column_type(&table, &column).await?;
                    columns.push(TableColumn {
                        name: column.name,
                        is_key: column.is_key,
                        type_oid: column.type_oid,
                        ty,
                        unconvertible,
                    });
                }
                let generated_columns = if self.generated_lookup {
                    let mut generated = generated_columns(&self.catalog, relation.oid)
                        .await
                        .map_err(|error| DecoderError::GeneratedColumns {
                            table: table.clone(),
                            error,
                        })?;
                    // The ones the server sends (stored ones, from PostgreSQL 18 under
                    // publish_generated_columns = stored) are ordinary columns of the record.
                    generated.retain(|name| !columns.iter().any(|c| &c.name == name));
                    generated
                } else {
                    Vec::new()
                };
                // Under REPLICA IDENTITY FULL the server flags every column as the key: the
                // row's key (its `<entity>/<id>`, its JetStream partition) is then its primary
                // key, none without one.
                let key_columns: Arc<[String]> = if relation.replica_identity
                    == ReplicaIdentity::Full
                    && self.generated_lookup
                {
                    primary_key(&self.catalog, relation.oid)
                        .await
                        .map_err(|error| DecoderError::PrimaryKey {
                            table: table.clone(),
                            error,
                        })?
                        .into()
                } else {
                    columns
                        .iter()
                        .filter(|c| c.is_key)
                        .map(|c| c.name.clone())
                        .collect()
                };
                self.tables.insert(
                    relation.oid,
                    Arc::new(Table {
                        oid: relation.oid,
                        key_columns,
                        schema,
                        name,
                        entity,
                        replica_identity: relation.replica_identity,
                        names: Names::shared(
                            columns.iter().map(|c| c.name.as_str().into()).collect(),
                        ),
                        columns,
                        generated_columns,
                    }),
                );
            }
            PgOutputMessage::Insert(insert) => {
                let table = self.lookup(insert.relation, lsn)?;
                let mut problems = Problems::default();
                let (new, mut unavailable) = row(&table, &insert.new, None, lsn, &mut problems)?;
                unavailable.extend(table.generated_columns.iter().cloned());
                let event = self.event(EventType::Insert, &table, lsn, "Insert")?;
                out.push(Decoded::Event(Arc::new(Event {
                    new_record: Some(new),
                    unavailable_columns: unavailable,
                    decode_error: problems.into_message(),
                    ..event
                })));
            }
            PgOutputMessage::Update(update) => {
                let table = self.lookup(update.relation, lsn)?;
                let event = self.event(EventType::Update, &table, lsn, "Update")?;
                let mut problems = Problems::default();
                let (old, old_is_full) = match &update.old {
                    Some(OldTuple::Full(t)) => {
                        (Some(full_old(&table, t, lsn, &mut problems)?), true)
                    }
                    Some(OldTuple::Key(t)) => {
                        (Some(key_only(&table, t, lsn, &mut problems)?), false)
                    }
                    None => (None, false),
                };
                let fill_from = if old_is_full { old.as_ref() } else { None };
                let (new, mut unavailable) =
                    row(&table, &update.new, fill_from, lsn, &mut problems)?;
                unavailable.extend(table.generated_columns.iter().cloned());
                let changes = if old_is_full {
                    old.as_ref().map(|old| diff(&table, old, &new))
                } else {
                    None
                };
                // Without an old tuple the key did not change: the old key is the new one.
                let old = match old {
                    Some(old) => Some(old),
                    None if !table.key_columns.is_empty() => Some(key_of(&table, &new)),
                    None => None,
                };
                out.push(Decoded::Event(Arc::new(Event {
                    new_record: Some(new),
                    old_record: old,
                    changes,
                    unavailable_columns: unavailable,
                    decode_error: problems.into_message(),
                    ..event
                })));
            }
            PgOutputMessage::Delete(delete) => {
                let table = self.lookup(delete.relation, lsn)?;
                let event = self.event(EventType::Delete, &table, lsn, "Delete")?;
                let mut problems = Problems::default();
                let old = match &delete.old {
                    OldTuple::Full(t) => full_old(&table, t, lsn, &mut problems)?,
                    OldTuple::Key(t) => key_only(&table, t, lsn, &mut problems)?,
                };
                out.push(Decoded::Event(Arc::new(Event {
                    old_record: Some(old),
                    decode_error: problems.into_message(),
                    ..event
                })));
            }
            PgOutputMessage::Truncate(truncate) => {
                for oid in truncate.relations {
                    let table = self.lookup(oid, lsn)?;
                    let event = self.event(EventType::Truncate, &table, lsn, "Truncate")?;
                    out.push(Decoded::Event(Arc::new(event)));
                }
            }
            // A transactional message is one of its transaction's events, in WAL order with
            // its changes (the server sends it at commit, and never for a rollback).
            PgOutputMessage::Message(m) if m.transactional && self.tx.is_some() => {
                let message = crate::event::LogicalMessage::new(&m.prefix, &m.content);
                let prefix: Arc<str> = m.prefix.into();
                let mut event = self.new_event(
                    EventType::Message,
                    (Arc::from(""), prefix.clone(), prefix),
                    Arc::from([]),
                    m.lsn,
                    "Message",
                )?;
                event.message = Some(message);
                out.push(Decoded::Event(Arc::new(event)));
            }
            PgOutputMessage::Message(m) => out.push(Decoded::Message {
                lsn: m.lsn,
                transactional: m.transactional,
                prefix: m.prefix,
                content: m.content,
            }),
        }
        Ok(())
    }

    /// How a column of a Relation message converts. A type the catalog no longer has (dropped
    /// later in the transaction that wrote the change) converts as text; one that nests too
    /// deep to describe makes the column unconvertible. Only a failed query is an error.
    async fn column_type(
        &mut self,
        table: &str,
        column: &pgoutput::Column,
    ) -> Result<(Arc<PgType>, Option<String>), DecoderError> {
        let type_name = self
            .type_names
            .get(&column.type_oid)
            .map_or("(not described by the server)", String::as_str);
        match self.types.resolve(&self.catalog, column.type_oid).await {
            Ok(ty) => Ok((ty, None)),
            Err(TypeError::NotFound { oid }) => {
                warn!(
                    table,
                    column = %column.name,
                    type_oid = column.type_oid,
                    type_name,
                    missing_oid = oid,
                    "the column's type is no longer in the catalog (dropped since the change was \
                     written); its values are decoded from their text, as strings"
                );
                Ok((Arc::new(PgType::Text), None))
            }
            Err(error @ TypeError::TooDeep { .. }) => {
                warn!(
                    table,
                    column = %column.name,
                    type_oid = column.type_oid,
                    type_name,
                    error = %error,
                    "the column's type cannot be described; its values are left out of events, \
                     each of which says so in decode_error"
                );
                Ok((Arc::new(PgType::Text), Some(error.to_string())))
            }
            Err(error @ TypeError::Query { .. }) => Err(DecoderError::Type {
                table: table.to_owned(),
                column: column.name.clone(),
                oid: column.type_oid,
                error,
            }),
        }
    }

    fn lookup(&self, oid: u32, lsn: Lsn) -> Result<Arc<Table>, DecoderError> {
        self.tables
            .get(&oid)
            .cloned()
            .ok_or(DecoderError::UnknownRelation { lsn, oid })
    }

    /// A new event of the current transaction, with no records yet.
    fn event(
        &mut self,
        kind: EventType,
        table: &Table,
        lsn: Lsn,
        what: &'static str,
    ) -> Result<Event, DecoderError> {
        self.new_event(
            kind,
            (
                table.schema.clone(),
                table.entity.clone(),
                table.name.clone(),
            ),
            table.key_columns.clone(),
            lsn,
            what,
        )
    }

    /// A new event of the current transaction: `(schema, entity, table)` name it.
    fn new_event(
        &mut self,
        kind: EventType,
        (schema, entity, table): (Arc<str>, Arc<str>, Arc<str>),
        key_columns: Arc<[String]>,
        lsn: Lsn,
        what: &'static str,
    ) -> Result<Event, DecoderError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or(DecoderError::OutsideTransaction { what, lsn })?;
        let ordinal = tx.next_ordinal;
        tx.next_ordinal += 1;
        Ok(Event {
            kind,
            schema,
            entity,
            table,
            new_record: None,
            old_record: None,
            changes: None,
            unavailable_columns: Vec::new(),
            timestamp: tx.timestamp,
            lsn,
            commit_lsn: tx.commit_lsn,
            xid: tx.xid,
            ordinal,
            decode_error: None,
            message: None,
            key_columns,
        })
    }
}

fn check_width(table: &Table, tuple: &Tuple, lsn: Lsn) -> Result<(), DecoderError> {
    if tuple.0.len() != table.columns.len() {
        return Err(DecoderError::ColumnCount {
            table: table.qualified(),
            lsn,
            got: tuple.0.len(),
            expected: table.columns.len(),
        });
    }
    Ok(())
}

/// The values of one change that could not be converted, as the event's `decode_error` will
/// say: column, position and reason, never the value.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, table: &Table, column: &TableColumn, lsn: Lsn, reason: &str) {
        let table = table.qualified();
        warn!(
            table = %table,
            column = %column.name,
            lsn = %lsn,
            reason,
            "a value could not be decoded: its column is left out of the event, whose \
             decode_error says so"
        );
        self.0.push(format!(
            "column {table}.{} of the change at {lsn} could not be decoded and is left out \
             of the record: {reason}",
            column.name
        ));
    }

    fn into_message(self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("; "))
    }
}

/// One column's value in a change.
enum Converted<'a> {
    Value(Value),
    /// Kept as its text, which is a value of this kind (converted when first read).
    Raw(Raw, &'a [u8]),
    /// Not sent (an unchanged TOASTed value).
    Unsent,
    /// Sent, but it could not be converted (noted in the [`Problems`]).
    Undecodable,
}

/// Converts one sent value (or checks that its text can be kept, see [`raw_kind`]).
fn value<'a>(
    table: &Table,
    column: &TableColumn,
    value: &'a TupleValue,
    lsn: Lsn,
    problems: &mut Problems,
) -> Result<Converted<'a>, DecoderError> {
    match value {
        TupleValue::Null => Ok(Converted::Value(Value::Null)),
        TupleValue::Unchanged => Ok(Converted::Unsent),
        TupleValue::Text(text) => {
            if let Some(reason) = &column.unconvertible {
                problems.add(table, column, lsn, reason);
                return Ok(Converted::Undecodable);
            }
            if let Some(kind) = raw_kind(&column.ty, text) {
                return Ok(Converted::Raw(kind, text));
            }
            match text_to_json(&column.ty, text) {
                Ok(v) => Ok(Converted::Value(v)),
                Err(error) => {
                    problems.add(table, column, lsn, &error.to_string());
                    Ok(Converted::Undecodable)
                }
            }
        }
        TupleValue::Binary(_) => Err(DecoderError::Binary {
            table: table.qualified(),
            column: column.name.clone(),
            lsn,
        }),
    }
}

/// A new row; unchanged TOAST values are taken from `fill_from` (the full old row) when it
/// has them, and are otherwise left out and listed. Values that cannot be converted are left
/// out and noted in `problems`.
fn row(
    table: &Table,
    tuple: &Tuple,
    fill_from: Option<&Record>,
    lsn: Lsn,
    problems: &mut Problems,
) -> Result<(Record, Vec<String>), DecoderError> {
    check_width(table, tuple, lsn)?;
    let mut record = Record::with_text_capacity(&table.names, text_len(tuple));
    let mut unavailable = Vec::new();
    for (i, (column, v)) in table.columns.iter().zip(&tuple.0).enumerate() {
        match value(table, column, v, lsn, problems)? {
            Converted::Value(v) => record.set(i, v),
            Converted::Raw(kind, text) => record.set_raw(i, kind, text),
            Converted::Undecodable => {}
            // The full old row is a record of the same table: its columns are these.
            Converted::Unsent => {
                if !fill_from.is_some_and(|old| record.copy_from(old, i)) {
                    unavailable.push(column.name.clone());
                }
            }
        }
    }
    Ok((record, unavailable))
}

/// The whole old row (REPLICA IDENTITY FULL). PostgreSQL flattens TOAST values into it, so an
/// unsent value here would be unusual; it is left out.
fn full_old(
    table: &Table,
    tuple: &Tuple,
    lsn: Lsn,
    problems: &mut Problems,
) -> Result<Record, DecoderError> {
    row(table, tuple, None, lsn, problems).map(|(record, _)| record)
}

/// The old key (REPLICA IDENTITY DEFAULT or USING INDEX): the server sends NULL for the
/// columns outside the key, so only key columns are kept.
fn key_only(
    table: &Table,
    tuple: &Tuple,
    lsn: Lsn,
    problems: &mut Problems,
) -> Result<Record, DecoderError> {
    check_width(table, tuple, lsn)?;
    let mut record = Record::with_text_capacity(&table.names, text_len(tuple));
    for (i, (column, v)) in table.columns.iter().zip(&tuple.0).enumerate() {
        if column.is_key {
            match value(table, column, v, lsn, problems)? {
                Converted::Value(v) => record.set(i, v),
                Converted::Raw(kind, text) => record.set_raw(i, kind, text),
                Converted::Unsent | Converted::Undecodable => {}
            }
        }
    }
    Ok(record)
}

/// The generated columns of relation `oid` (stored, and from PostgreSQL 18 virtual), in
/// column order.
async fn generated_columns(catalog: &sqlx::PgPool, oid: u32) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT attname::text FROM pg_catalog.pg_attribute \
         WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped \
           AND attgenerated <> '' \
         ORDER BY attnum",
    )
    .bind(i64::from(oid))
    .fetch_all(catalog)
    .await
}

/// The primary key columns of the table `oid`, in column order (as the server flags a
/// default replica identity's); none without a primary key.
async fn primary_key(catalog: &sqlx::PgPool, oid: u32) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
          WHERE a.attrelid = $1::int8::oid AND a.attnum = ANY ( \
                SELECT unnest(i.indkey::int2[]) FROM pg_catalog.pg_index i \
                 WHERE i.indrelid = a.attrelid AND i.indisprimary) \
          ORDER BY a.attnum",
    )
    .bind(i64::from(oid))
    .fetch_all(catalog)
    .await
}

/// How many bytes of text `tuple` holds (what its record keeps of it at most).
fn text_len(tuple: &Tuple) -> usize {
    tuple
        .0
        .iter()
        .map(|v| match v {
            TupleValue::Text(text) => text.len(),
            _ => 0,
        })
        .sum()
}

/// The key columns of `record` (a record of `table`).
fn key_of(table: &Table, record: &Record) -> Record {
    let mut key = Record::of(&table.names);
    for (i, column) in table.columns.iter().enumerate() {
        if column.is_key {
            key.copy_from(record, i);
        }
    }
    key
}

/// The columns whose value differs between the old and the new row, in column order.
fn diff(table: &Table, old: &Record, new: &Record) -> Changes {
    Changes(
        table
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let same = old.same_at(new, i)?;
                (!same).then(|| Change {
                    column: c.name.clone(),
                    old_value: old.value_at(i).unwrap_or_default(),
                    new_value: new.value_at(i).unwrap_or_default(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The pgoutput test encoder, written from the format description.
    use super::super::pgoutput::tests::Enc as Msg;

    /// A decoder for builtin types only: its pool never connects.
    fn decoder() -> Decoder {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        Decoder::new(pool).offline()
    }

    /// Relation 16384 `public.docs (id int4 key, n int4, body text)`, REPLICA IDENTITY DEFAULT.
    fn relation() -> Bytes {
        Msg::new(b'R')
            .i32(16384)
            .str("public")
            .str("docs")
            .u8(b'd')
            .i16(3)
            .u8(1)
            .str("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .str("n")
            .i32(23)
            .i32(-1)
            .u8(0)
            .str("body")
            .i32(25)
            .i32(-1)
            .done()
    }

    async fn run(messages: Vec<Bytes>) -> Result<Vec<Decoded>, DecoderError> {
        let mut d = decoder();
        let mut out = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            d.decode(Lsn(0x100 + i as u64), m, &mut out).await?;
        }
        Ok(out)
    }

    fn begin() -> Bytes {
        Msg::new(b'B').i64(0x900).i64(0).i32(77).done()
    }

    fn commit() -> Bytes {
        Msg::new(b'C').u8(0).i64(0x900).i64(0x928).i64(0).done()
    }

    #[tokio::test]
    async fn a_transactional_message_is_an_event_in_order_and_one_outside_is_not() {
        let insert = Msg::new(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(3)
            .text(b"1")
            .text(b"2")
            .text(b"x")
            .done();
        let message = |content: &[u8]| {
            Msg::new(b'M')
                .u8(1)
                .u64(0x950)
                .str("orders")
                .len_bytes(content)
                .done()
        };
        let outside = Msg::new(b'M')
            .u8(0)
            .u64(0x960)
            .str("ping")
            .len_bytes(b"{}")
            .done();
        let out = run(vec![
            relation(),
            begin(),
            message(br#"{"order": 7, "total": "12.50"}"#),
            insert,
            message(b"plain text"),
            message(&[0xff, 0x00, 0x7f]),
            commit(),
            outside,
        ])
        .await
        .unwrap();
        let events = events(&out);
        let seen: Vec<_> = events.iter().map(|e| (e.kind, e.ordinal)).collect();
        assert_eq!(
            seen,
            [
                (EventType::Message, 0),
                (EventType::Insert, 1),
                (EventType::Message, 2),
                (EventType::Message, 3)
            ]
        );
        let first = events[0];
        assert_eq!((&*first.entity, &*first.schema), ("orders", ""));
        assert_eq!(
            (first.commit_lsn, first.xid, first.lsn),
            (Lsn(0x900), 77, Lsn(0x950))
        );
        assert_eq!(first.new_record, None);
        let contents: Vec<_> = [0, 2, 3]
            .iter()
            .map(|&i| events[i].message.clone().unwrap().content)
            .collect();
        assert_eq!(
            contents,
            [
                json!({"order": 7, "total": "12.50"}),
                json!("plain text"),
                json!("\\xff007f")
            ]
        );
        assert_eq!(
            serde_json::to_value(first).unwrap()["message"],
            json!({"prefix": "orders", "content": {"order": 7, "total": "12.50"}})
        );
        assert!(matches!(
            out.last(),
            Some(Decoded::Message { transactional: false, prefix, .. }) if prefix == "ping"
        ));
        let Some(Decoded::Commit { events: n, .. }) =
            out.iter().find(|d| matches!(d, Decoded::Commit { .. }))
        else {
            panic!("a commit: {out:?}");
        };
        assert_eq!(*n, 4);
    }

    #[tokio::test]
    async fn an_update_without_old_tuple_keeps_the_key_and_lists_unsent_values() {
        let update = Msg::new(b'U')
            .i32(16384)
            .u8(b'N')
            .i16(3)
            .text(b"1")
            .text(b"2")
            .u8(b'u')
            .done();
        let out = run(vec![begin(), relation(), update, commit()])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        let Decoded::Event(event) = &out[1] else {
            panic!("an event: {:?}", out[1]);
        };
        assert_eq!(event.kind, EventType::Update);
        assert_eq!(
            serde_json::to_value(&event.new_record).unwrap(),
            json!({"id": 1, "n": 2})
        );
        assert_eq!(
            serde_json::to_value(&event.old_record).unwrap(),
            json!({"id": 1})
        );
        assert_eq!(event.unavailable_columns, ["body"]);
        assert_eq!(
            (event.commit_lsn, event.xid, event.ordinal),
            (Lsn(0x900), 77, 0)
        );
        assert_eq!(event.lsn, Lsn(0x102));
        assert_eq!(&*event.key_columns, ["id".to_owned()]);
        assert_eq!(
            out[2],
            Decoded::Commit {
                xid: 77,
                commit_lsn: Lsn(0x900),
                end_lsn: Lsn(0x928),
                timestamp: PG_EPOCH_OFFSET_MICROS,
                events: 1
            }
        );
    }

    #[tokio::test]
    async fn a_change_outside_a_transaction_or_of_an_unknown_table_is_an_error() {
        let insert = || {
            Msg::new(b'I')
                .i32(16384)
                .u8(b'N')
                .i16(3)
                .text(b"1")
                .text(b"2")
                .text(b"x")
                .done()
        };
        assert!(matches!(
            run(vec![relation(), insert()]).await,
            Err(DecoderError::OutsideTransaction { .. })
        ));
        assert!(matches!(
            run(vec![begin(), insert()]).await,
            Err(DecoderError::UnknownRelation { oid: 16384, .. })
        ));
        let narrow = Msg::new(b'I').i32(16384).u8(b'N').i16(1).text(b"1").done();
        assert!(matches!(
            run(vec![begin(), relation(), narrow]).await,
            Err(DecoderError::ColumnCount {
                got: 1,
                expected: 3,
                ..
            })
        ));
        let binary = Msg::new(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(3)
            .text(b"1")
            .u8(b'b')
            .i32(4)
            .raw(&[0, 0, 0, 2])
            .text(b"x")
            .done();
        assert!(matches!(
            run(vec![begin(), relation(), binary]).await,
            Err(DecoderError::Binary { .. })
        ));
        assert!(matches!(
            run(vec![Bytes::from_static(b"Z")]).await,
            Err(DecoderError::Message { .. })
        ));
    }

    /// `public.docs (id int4 key, doc jsonb, note text)`, REPLICA IDENTITY FULL.
    fn docs_relation() -> Bytes {
        Msg::new(b'R')
            .i32(16385)
            .str("public")
            .str("deep")
            .u8(b'f')
            .i16(3)
            .u8(1)
            .str("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .str("doc")
            .i32(3802)
            .i32(-1)
            .u8(0)
            .str("note")
            .i32(25)
            .i32(-1)
            .done()
    }

    fn deep_doc(depth: usize) -> Vec<u8> {
        format!("{}\"s3cr3t\"{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
    }

    fn events(out: &[Decoded]) -> Vec<&Event> {
        out.iter()
            .filter_map(|d| match d {
                Decoded::Event(e) => Some(&**e),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_value_that_cannot_be_converted_is_left_out_and_reported() {
        let insert = |id: &[u8], doc: &[u8]| {
            Msg::new(b'I')
                .i32(16385)
                .u8(b'N')
                .i16(3)
                .text(id)
                .text(doc)
                .text(b"note")
                .done()
        };
        let too_deep = deep_doc(crate::decode::MAX_VALUE_DEPTH + 1);
        let out = run(vec![
            begin(),
            docs_relation(),
            insert(b"1", b"{}"),
            insert(b"2", &too_deep),
            insert(b"3", &deep_doc(crate::decode::MAX_VALUE_DEPTH)),
            insert(b"one", b"[}"),
            commit(),
        ])
        .await
        .unwrap();
        let events = events(&out);
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].decode_error, None);
        let bad = events[1];
        assert_eq!(
            (bad.kind, bad.ordinal, bad.lsn),
            (EventType::Insert, 1, Lsn(0x103))
        );
        assert_eq!(
            serde_json::to_value(&bad.new_record).unwrap(),
            json!({"id": 2, "note": "note"})
        );
        assert!(bad.unavailable_columns.is_empty());
        let message = bad.decode_error.as_deref().expect("decode_error is set");
        assert_eq!(
            message,
            format!(
                "column public.deep.doc of the change at 0/103 could not be decoded and is left \
                 out of the record: jsonb: {}",
                super::super::value_error::TOO_DEEP
            )
        );
        // Just at the limit it decodes.
        assert_eq!(events[2].decode_error, None);
        assert!(events[2].new_record.as_ref().unwrap().contains_key("doc"));
        // Two columns wrong: both are named; no value is.
        let both = events[3].decode_error.as_deref().unwrap();
        assert!(both.contains("public.deep.id ") && both.contains("public.deep.doc "));
        assert!(both.contains("number: invalid number syntax"), "{both}");
        assert_eq!(
            serde_json::to_value(&events[3].new_record).unwrap(),
            json!({"note": "note"})
        );
        for e in &events {
            if let Some(m) = &e.decode_error {
                assert!(!m.contains("s3cr3t") && !m.contains("one"), "{m}");
            }
        }
        let Decoded::Commit { events: n, .. } = out.last().unwrap() else {
            panic!("ends with a commit")
        };
        assert_eq!(*n, 4);
    }

    #[tokio::test]
    async fn an_old_row_that_cannot_be_converted_is_reported_too() {
        let too_deep = deep_doc(crate::decode::MAX_VALUE_DEPTH + 1);
        let update = Msg::new(b'U')
            .i32(16385)
            .u8(b'O')
            .i16(3)
            .text(b"1")
            .text(&too_deep)
            .text(b"a")
            .u8(b'N')
            .i16(3)
            .text(b"1")
            .text(b"[]")
            .text(b"b")
            .done();
        let delete = Msg::new(b'D')
            .i32(16385)
            .u8(b'O')
            .i16(3)
            .text(b"1")
            .text(&too_deep)
            .text(b"b")
            .done();
        let out = run(vec![begin(), docs_relation(), update, delete, commit()])
            .await
            .unwrap();
        let events = events(&out);
        let update = events[0];
        assert_eq!(
            serde_json::to_value(&update.old_record).unwrap(),
            json!({"id": 1, "note": "a"})
        );
        assert_eq!(
            serde_json::to_value(&update.new_record).unwrap(),
            json!({"id": 1, "doc": [], "note": "b"})
        );
        // Only what both rows have can be compared.
        let changed: Vec<&str> = update
            .changes
            .as_ref()
            .unwrap()
            .0
            .iter()
            .map(|c| c.column.as_str())
            .collect();
        assert_eq!(changed, ["note"]);
        assert!(
            update
                .decode_error
                .as_deref()
                .unwrap()
                .contains("public.deep.doc ")
        );
        assert!(events[1].decode_error.is_some());
        assert_eq!(
            serde_json::to_value(&events[1].old_record).unwrap(),
            json!({"id": 1, "note": "b"})
        );
    }

    #[test]
    fn error_chains_say_each_thing_once() {
        use std::error::Error as _;
        let value = super::super::text_to_json(&PgType::Json, b"{").unwrap_err();
        let decode = pgoutput::decode(Bytes::from_static(b"B")).unwrap_err();
        let errors = [
            DecoderError::Message {
                lsn: Lsn(0x10),
                error: decode.clone(),
            },
            DecoderError::Type {
                table: "public.t".into(),
                column: "m".into(),
                oid: 70_000,
                error: TypeError::Query {
                    oid: 70_000,
                    error: sqlx::Error::PoolTimedOut,
                },
            },
            DecoderError::GeneratedColumns {
                table: "public.t".into(),
                error: sqlx::Error::PoolTimedOut,
            },
        ];
        for error in errors {
            assert!(error.source().is_none(), "{error}");
            let chain = format!("{:#}", anyhow::Error::from(error).context("streaming"));
            let parts: Vec<&str> = chain.split(": ").collect();
            let mut seen = std::collections::HashSet::new();
            for part in &parts {
                assert!(seen.insert(*part), "{part:?} twice in {chain:?}");
            }
            for cause in [decode.to_string(), sqlx::Error::PoolTimedOut.to_string()] {
                assert!(chain.matches(&cause).count() <= 1, "{chain}");
            }
        }
        assert_eq!(value.to_string(), "json: invalid json syntax");
        assert!(value.source().is_none());
    }

    #[test]
    fn only_a_failed_catalog_query_is_transient() {
        let query = DecoderError::Type {
            table: "public.t".into(),
            column: "m".into(),
            oid: 1,
            error: TypeError::Query {
                oid: 1,
                error: sqlx::Error::PoolTimedOut,
            },
        };
        assert!(query.is_transient());
        let generated = |error| DecoderError::GeneratedColumns {
            table: "public.t".into(),
            error,
        };
        assert!(generated(sqlx::Error::PoolTimedOut).is_transient());
        // A closed pool means shutting down; a missing row will be missing again.
        assert!(!generated(sqlx::Error::PoolClosed).is_transient());
        assert!(!generated(sqlx::Error::RowNotFound).is_transient());
        let not_found = DecoderError::Type {
            table: "public.t".into(),
            column: "m".into(),
            oid: 1,
            error: TypeError::NotFound { oid: 1 },
        };
        assert!(!not_found.is_transient());
        assert!(
            !DecoderError::UnknownRelation {
                lsn: Lsn(1),
                oid: 1
            }
            .is_transient()
        );
    }

    #[tokio::test]
    async fn reset_forgets_relations_and_reports_a_cut_transaction() {
        let mut d = decoder();
        let mut out = Vec::new();
        d.decode(Lsn(1), begin(), &mut out).await.unwrap();
        d.decode(Lsn(2), relation(), &mut out).await.unwrap();
        assert!(d.in_transaction());
        assert!(d.reset(), "a transaction was open");
        assert!(!d.reset());
        assert!(d.table(16384).is_none());
    }
}
