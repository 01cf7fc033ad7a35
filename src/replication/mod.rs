//! The replication connection: from PostgreSQL's walsender to decoded messages, and
//! acknowledgements back.

mod lsn;

pub use lsn::{Lsn, ParseLsnError};
