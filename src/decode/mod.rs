//! The pgoutput decoder and the conversion of column values to JSON.

mod pgoutput;

pub use pgoutput::{
    Begin, Column, Commit, DecodeError, Delete, Insert, LogicalMessage, MAX_MESSAGE_SIZE, OldTuple,
    Origin, PG_EPOCH_OFFSET_MICROS, PgOutputMessage, Relation, ReplicaIdentity, Truncate, Tuple,
    TupleValue, TypeMessage, Update, decode, pg_epoch_to_unix_micros,
};
