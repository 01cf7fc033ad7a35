//! The replication connection: from PostgreSQL's walsender to decoded messages, and
//! acknowledgements back.

mod ack;
mod lsn;
mod protocol;

pub use ack::Acknowledger;
pub use lsn::{Lsn, ParseLsnError};
pub use protocol::{
    PG_EPOCH_OFFSET_MICROS, ProtocolError, ServerMessage, StatusUpdate, now_unix_micros,
};
