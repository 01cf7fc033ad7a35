//! The replication connection: from PostgreSQL's walsender to decoded messages, and
//! acknowledgements back.
//!
//! The lower layer speaks the wire protocol itself (neither tokio-postgres nor sqlx supports
//! CopyBoth):
//!
//! - [`ConnectParams`]: a `postgres://` URL parsed as libpq does (params.rs).
//! - [`Transport`] and [`SslMode`]: TCP, Unix socket or TLS, negotiated as libpq (tls.rs).
//! - [`Connection`]: startup, authentication, simple queries, and the switch into CopyBoth
//!   mode as a [`CopyReader`] and a [`CopyWriter`] (conn.rs).
//! - [`ReplicationError`]: typed errors, classified as transient or definite (error.rs).

mod conn;
mod error;
mod lsn;
mod params;
mod tls;

pub use conn::{
    ConnectOptions, Connection, CopyMessage, CopyReader, CopyWriter, MAX_BACKEND_MESSAGE, SimpleRow,
};
pub use error::{DbError, ReplicationError};
pub use lsn::{Lsn, ParseLsnError};
pub use params::{ConnectParams, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PORT, Host};
pub use tls::{SslMode, Transport};
