//! The replication connection: from PostgreSQL's walsender to decoded items, and
//! acknowledgements back.
//!
//! ```text
//! ConnectParams ─► Connection (startup, TLS, auth) ─► START_REPLICATION ─► CopyReader/CopyWriter
//!                                                                   │
//!          stream: XLogData ─► Decoder ─► bounded channel ─► downstream ─► Acknowledger
//!                  status task ◄──────────── flush position ◄──────────────────┘
//! ```
//!
//! - [`ConnectParams`]: a `postgres://` URL parsed as libpq does (params.rs).
//! - [`Transport`] and [`SslMode`]: TCP, Unix socket or TLS, negotiated as libpq (tls.rs).
//! - [`catalog_pool`]: the SQL pool beside it, whose TLS is tls.rs's too whenever the server's
//!   certificate is verified, through a relay (catalog.rs, relay.rs).
//! - [`Connection`]: startup, authentication, simple queries, and the switch into CopyBoth
//!   mode as a [`CopyReader`] and a [`CopyWriter`] (conn.rs).
//! - [`ReplicationError`]: typed errors, classified as transient or definite (error.rs).
//! - [`spawn`]: the stream itself, with status updates, acknowledgement and reconnects
//!   (stream.rs); [`setup`]: publication and slot.

mod ack;
mod catalog;
mod conn;
mod error;
mod params;
mod protocol;
mod relay;
pub mod setup;
mod stats;
mod stream;
mod tls;

pub use crate::lsn::PG_EPOCH_OFFSET_MICROS;
pub use crate::lsn::{Lsn, ParseLsnError};
pub use ack::Acknowledger;
pub use catalog::{catalog_connection, catalog_pool};
pub use conn::{
    ConnectOptions, Connection, CopyMessage, CopyReader, CopyWriter, MAX_BACKEND_MESSAGE, SimpleRow,
};
pub use error::{DbError, ReplicationError};
pub use params::{ConnectParams, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PORT, Host};
pub use protocol::{ProtocolError, ServerMessage, StatusUpdate, now_unix_micros};
pub use setup::{PublicationTables, SetupError, SlotInfo};
pub use stats::StreamStats;
pub use stream::{Backoff, ReplicationStream, SESSION_SETTINGS, StreamConfig, StreamError, spawn};
pub use tls::{SslMode, Transport};
