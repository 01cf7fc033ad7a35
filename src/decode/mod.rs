//! The pgoutput decoder and the conversion of column values to JSON.
//!
//! ```text
//! XLogData ─► pgoutput::decode ─► Decoder (relation cache, TypeCache) ─► Decoded items
//!                                          └─ value::text_to_json per column
//! ```

mod decoder;
mod pgoutput;
mod types;
mod value;

pub use decoder::{Decoded, Decoder, DecoderError, Table, TableColumn};
pub use pgoutput::{
    Begin, Column, Commit, DecodeError, Delete, Insert, LogicalMessage, MAX_MESSAGE_SIZE, OldTuple,
    Origin, PG_EPOCH_OFFSET_MICROS, PgOutputMessage, Relation, ReplicaIdentity, Truncate, Tuple,
    TupleValue, TypeMessage, Update, decode, pg_epoch_to_unix_micros,
};
pub use types::{MAX_DEPTH, PgType, TypeCache, TypeError};
pub use value::{ValueError, text_to_json};
