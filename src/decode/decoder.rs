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
//! reconnect. Column types are resolved once through the catalog connection and cached.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::pgoutput::{
    self, Begin, Commit, OldTuple, PgOutputMessage, ReplicaIdentity, Tuple, TupleValue,
};
use super::types::{PgType, TypeCache, TypeError};
use super::value::{ValueError, text_to_json};
use crate::event::{Change, Changes, Event, EventType, Record};
use crate::replication::{Lsn, PG_EPOCH_OFFSET_MICROS};

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
    /// One change.
    Event(Event),
    /// A logical decoding message (`pg_logical_emit_message`).
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
    /// The key columns' names, shared by every event of the table.
    pub key_columns: Arc<[String]>,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    /// The entity name its events carry (see [`crate::event::EntityName`]).
    pub entity: Arc<str>,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<TableColumn>,
}

/// One column of a [`Table`].
#[derive(Debug)]
pub struct TableColumn {
    pub name: String,
    pub is_key: bool,
    pub type_oid: u32,
    pub ty: Arc<PgType>,
}

/// A message that could not be turned into events.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("malformed pgoutput message at {lsn}: {source}")]
    Message {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
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
    #[error("looking up the type (oid {oid}) of column {table}.{column}: {source}")]
    Type {
        table: String,
        column: String,
        oid: u32,
        #[source]
        source: TypeError,
    },
    #[error("column {table}.{column} of the change at {lsn}: {source}")]
    Value {
        table: String,
        column: String,
        lsn: Lsn,
        #[source]
        source: ValueError,
    },
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
    /// Whether reconnecting may help: only a failed catalog look-up may be passing.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecoderError::Type { .. })
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
    tables: HashMap<u32, Arc<Table>>,
    types: TypeCache,
    tx: Option<Transaction>,
    default_schema: Arc<str>,
}

impl Decoder {
    /// A decoder that looks column types up through `catalog`, a pool on the same database.
    pub fn new(catalog: sqlx::PgPool) -> Self {
        Decoder {
            catalog,
            tables: HashMap::new(),
            types: TypeCache::new(),
            tx: None,
            default_schema: crate::event::DEFAULT_SCHEMA.into(),
        }
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
            pgoutput::decode(data).map_err(|source| DecoderError::Message { lsn, source })?;
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
            PgOutputMessage::Type(t) => self.types.invalidate(t.oid),
            PgOutputMessage::Relation(relation) => {
                let schema: Arc<str> = if relation.namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    relation.namespace.into()
                };
                let name: Arc<str> = relation.name.into();
                let entity: Arc<str> =
                    crate::event::entity_name(&schema, &name, &self.default_schema).into();
                let mut columns = Vec::with_capacity(relation.columns.len());
                for column in relation.columns {
                    let ty = self
                        .types
                        .resolve(&self.catalog, column.type_oid)
                        .await
                        .map_err(|source| DecoderError::Type {
                            table: format!("{schema}.{name}"),
                            column: column.name.clone(),
                            oid: column.type_oid,
                            source,
                        })?;
                    columns.push(TableColumn {
                        name: column.name,
                        is_key: column.is_key,
                        type_oid: column.type_oid,
                        ty,
                    });
                }
                let key_columns: Arc<[String]> = columns
                    .iter()
                    .filter(|c| c.is_key)
                    .map(|c| c.name.clone())
                    .collect();
                self.tables.insert(
                    relation.oid,
                    Arc::new(Table {
                        oid: relation.oid,
                        key_columns,
                        schema,
                        name,
                        entity,
                        replica_identity: relation.replica_identity,
                        columns,
                    }),
                );
            }
            PgOutputMessage::Insert(insert) => {
                let table = self.lookup(insert.relation, lsn)?;
                let (new, unavailable) = row(&table, &insert.new, None, lsn)?;
                let event = self.event(EventType::Insert, &table, lsn, "Insert")?;
                out.push(Decoded::Event(Event {
                    new_record: Some(new),
                    unavailable_columns: unavailable,
                    ..event
                }));
            }
            PgOutputMessage::Update(update) => {
                let table = self.lookup(update.relation, lsn)?;
                let event = self.event(EventType::Update, &table, lsn, "Update")?;
                let (old, old_is_full) = match &update.old {
                    Some(OldTuple::Full(t)) => (Some(full_old(&table, t, lsn)?), true),
                    Some(OldTuple::Key(t)) => (Some(key_only(&table, t, lsn)?), false),
                    None => (None, false),
                };
                let fill_from = if old_is_full { old.as_ref() } else { None };
                let (new, unavailable) = row(&table, &update.new, fill_from, lsn)?;
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
                out.push(Decoded::Event(Event {
                    new_record: Some(new),
                    old_record: old,
                    changes,
                    unavailable_columns: unavailable,
                    ..event
                }));
            }
            PgOutputMessage::Delete(delete) => {
                let table = self.lookup(delete.relation, lsn)?;
                let event = self.event(EventType::Delete, &table, lsn, "Delete")?;
                let old = match &delete.old {
                    OldTuple::Full(t) => full_old(&table, t, lsn)?,
                    OldTuple::Key(t) => key_only(&table, t, lsn)?,
                };
                out.push(Decoded::Event(Event {
                    old_record: Some(old),
                    ..event
                }));
            }
            PgOutputMessage::Truncate(truncate) => {
                for oid in truncate.relations {
                    let table = self.lookup(oid, lsn)?;
                    let event = self.event(EventType::Truncate, &table, lsn, "Truncate")?;
                    out.push(Decoded::Event(event));
                }
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
        let tx = self
            .tx
            .as_mut()
            .ok_or(DecoderError::OutsideTransaction { what, lsn })?;
        let ordinal = tx.next_ordinal;
        tx.next_ordinal += 1;
        Ok(Event {
            kind,
            schema: table.schema.clone(),
            entity: table.entity.clone(),
            table: table.name.clone(),
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
            key_columns: table.key_columns.clone(),
        })
    }
}

fn check_width(table: &Table, tuple: &Tuple, lsn: Lsn) -> Result<(), DecoderError> {
    if tuple.0.len() != table.columns.len() {
        return Err(DecoderError::ColumnCount {
            table: format!("{}.{}", table.schema, table.name),
            lsn,
            got: tuple.0.len(),
            expected: table.columns.len(),
        });
    }
    Ok(())
}

/// Converts one sent value; `None` when it was not sent (unchanged TOAST).
fn value(
    table: &Table,
    column: &TableColumn,
    value: &TupleValue,
    lsn: Lsn,
) -> Result<Option<Value>, DecoderError> {
    match value {
        TupleValue::Null => Ok(Some(Value::Null)),
        TupleValue::Unchanged => Ok(None),
        TupleValue::Text(text) => {
            text_to_json(&column.ty, text)
                .map(Some)
                .map_err(|source| DecoderError::Value {
                    table: format!("{}.{}", table.schema, table.name),
                    column: column.name.clone(),
                    lsn,
                    source,
                })
        }
        TupleValue::Binary(_) => Err(DecoderError::Binary {
            table: format!("{}.{}", table.schema, table.name),
            column: column.name.clone(),
            lsn,
        }),
    }
}

/// A new row; unchanged TOAST values are taken from `fill_from` (the full old row) when it
/// has them, and are otherwise left out and listed.
fn row(
    table: &Table,
    tuple: &Tuple,
    fill_from: Option<&Record>,
    lsn: Lsn,
) -> Result<(Record, Vec<String>), DecoderError> {
    check_width(table, tuple, lsn)?;
    let mut record = Record::with_capacity(table.columns.len());
    let mut unavailable = Vec::new();
    for (column, v) in table.columns.iter().zip(&tuple.0) {
        match value(table, column, v, lsn)? {
            Some(v) => {
                record.insert(column.name.clone(), v);
            }
            None => match fill_from.and_then(|old| old.get(&column.name)) {
                Some(old) => {
                    record.insert(column.name.clone(), old.clone());
                }
                None => unavailable.push(column.name.clone()),
            },
        }
    }
    Ok((record, unavailable))
}

/// The whole old row (REPLICA IDENTITY FULL). PostgreSQL flattens TOAST values into it, so an
/// unsent value here would be unusual; it is left out.
fn full_old(table: &Table, tuple: &Tuple, lsn: Lsn) -> Result<Record, DecoderError> {
    row(table, tuple, None, lsn).map(|(record, _)| record)
}

/// The old key (REPLICA IDENTITY DEFAULT or USING INDEX): the server sends NULL for the
/// columns outside the key, so only key columns are kept.
fn key_only(table: &Table, tuple: &Tuple, lsn: Lsn) -> Result<Record, DecoderError> {
    check_width(table, tuple, lsn)?;
    let mut record = Record::new();
    for (column, v) in table.columns.iter().zip(&tuple.0) {
        if column.is_key {
            if let Some(v) = value(table, column, v, lsn)? {
                record.insert(column.name.clone(), v);
            }
        }
    }
    Ok(record)
}

/// The key columns of `record`.
fn key_of(table: &Table, record: &Record) -> Record {
    table
        .columns
        .iter()
        .filter(|c| c.is_key)
        .filter_map(|c| record.get(&c.name).map(|v| (c.name.clone(), v.clone())))
        .collect()
}

/// The columns whose value differs between the old and the new row, in column order.
fn diff(table: &Table, old: &Record, new: &Record) -> Changes {
    Changes(
        table
            .columns
            .iter()
            .filter_map(|c| {
                let (o, n) = (old.get(&c.name)?, new.get(&c.name)?);
                (o != n).then(|| Change {
                    column: c.name.clone(),
                    old_value: o.clone(),
                    new_value: n.clone(),
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
        Decoder::new(pool)
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
        let bad_number = Msg::new(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(3)
            .text(b"one")
            .text(b"2")
            .text(b"x")
            .done();
        let error = run(vec![begin(), relation(), bad_number])
            .await
            .unwrap_err();
        assert!(matches!(error, DecoderError::Value { .. }), "{error}");
        assert!(
            !error.to_string().contains("one"),
            "values never go into errors: {error}"
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
