//! The pgoutput decoder and the conversion of column values to JSON.
//!
//! ```text
//! XLogData ─► pgoutput::decode ─► Decoder (relation cache, TypeCache) ─► Decoded items
//!                                          └─ value::text_to_json per column
//!                                               └─ json::parse for json and jsonb
//! ```
//!
//! Each event's records hold the values PostgreSQL sent, converted as `to_jsonb` would (see
//! `value.rs`). Two kinds of column are absent from a new record and listed in the event's
//! `unavailable_columns`: an unchanged TOASTed value the server did not send (with no old row
//! to take it from), and a generated column (`GENERATED ALWAYS AS ... STORED`), which
//! PostgreSQL 15 never sends; the decoder learns those from the catalog with each Relation
//! message. A value that cannot be converted (nested deeper than [`MAX_VALUE_DEPTH`], or text
//! the conversion does not understand) does not stop the stream either: its column is left
//! out and the event's `decode_error` says which column, where and why, never the value.
//! Errors of the protocol itself (malformed messages, unknown relations, a wrong column count)
//! still stop the session.
//!
//! # Layout
//!
//! Imports point one way, from the decoder down to the leaves, and nothing here imports from
//! `replication` (positions and the PostgreSQL epoch are [`crate::lsn`]'s):
//!
//! - `decoder` (relation cache, events) → `pgoutput`, `types`, `value`
//! - `value` (`to_jsonb` of a value's text) → `json`, `numeric`, `types`, `value_error`
//! - `json` (`json`/`jsonb` documents) → `numeric`, `value_error`
//! - `numeric` (numbers as `numeric` writes them) → `value_error`
//! - `copy` (rows of `COPY ... TO STDOUT`, for backfills) → `value`, `types`
//! - leaves: `pgoutput` (the messages), `types` (type descriptions), `value_error`
//!   ([`ValueError`], [`MAX_VALUE_DEPTH`])

mod copy;
mod decoder;
mod json;
mod numeric;
mod pgoutput;
mod types;
mod value;
mod value_error;

pub use copy::{CopyColumn, CopyError, CopyReader, CopyRow};
pub use decoder::{Decoded, Decoder, DecoderError, Table, TableColumn};
pub use pgoutput::{
    Begin, Column, Commit, DecodeError, Delete, Insert, LogicalMessage, MAX_MESSAGE_SIZE, OldTuple,
    Origin, PG_EPOCH_OFFSET_MICROS, PgOutputMessage, Relation, ReplicaIdentity, Truncate, Tuple,
    TupleValue, TypeMessage, Update, decode, pg_epoch_to_unix_micros,
};
pub use types::{MAX_DEPTH, PgType, TypeCache, TypeError};
pub use value::text_to_json;
pub use value_error::{MAX_VALUE_DEPTH, ValueError};

/// Parses an event's JSON form, as `streamex tail` prints it and `streamex.dead_letters`
/// stores it: its values may be [`MAX_VALUE_DEPTH`] deep inside the event's own two levels
/// (event, record), deeper than `serde_json` reads.
pub fn event_json(text: &str) -> Result<serde_json::Value, ValueError> {
    json::parse_within(text.as_bytes(), "event", MAX_VALUE_DEPTH + 2)
}
