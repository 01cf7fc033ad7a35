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
//! - [`ConnectParams`] and [`SslMode`]: a `postgres://` URL parsed as libpq does (params.rs).
//! - [`Transport`]: TCP, Unix socket or TLS, negotiated as libpq says `sslmode` (tls.rs).
//! - [`catalog_pool`]: the SQL pool beside it, whose TLS is tls.rs's too whenever the server's
//!   certificate is verified, through a relay (catalog.rs, relay.rs).
//! - [`Connection`]: startup, authentication, simple queries, and the switch into CopyBoth
//!   mode as a [`CopyReader`] and a [`CopyWriter`] (conn.rs), reading backend messages that
//!   frame.rs takes out of the read buffer, without I/O.
//! - [`ReplicationError`]: typed errors, classified as transient or definite (error.rs).
//! - [`spawn`]: the stream itself, with status updates, acknowledgement and reconnects
//!   (stream.rs); [`setup`]: publication and slot; [`ServerVersion`]: what differs between
//!   the supported PostgreSQL versions (version.rs).
//!
//! # Layout
//!
//! Imports between the files point one way, from the stream down to the leaves:
//!
//! - `stream` → `conn`, `params`, `protocol`, `setup`, `version`, `ack`, `error`; outside,
//!   the decoder ([`crate::decode`], which imports nothing from here), [`crate::backoff`],
//!   `stats` (its figures, which the metrics module reads) and `config::parse_duration`
//! - `catalog` → `relay`, `tls`, `params`; `relay` → `tls`, `params`, `error`
//! - `conn` → `tls`, `params`, `frame`, `error`, `version`; `tls` → `params`, `error`
//! - `frame` → `error`; `params` → `error`
//! - `setup` → `version`
//! - leaves: `error`, `ack`, `protocol`, `version` (the server's version and what streamex
//!   asks of it because of it), which use only the crate's leaves ([`crate::lsn`],
//!   [`crate::error`])

mod ack;
mod catalog;
mod conn;
mod error;
mod frame;
mod params;
mod protocol;
mod relay;
pub mod setup;
mod snapshot;
mod stats;
mod stream;
mod tls;
mod version;

pub use crate::lsn::PG_EPOCH_OFFSET_MICROS;
pub use crate::lsn::{Lsn, ParseLsnError};
pub use ack::Acknowledger;
pub(crate) use catalog::catalog_pool_with;
pub use catalog::{catalog_connection, catalog_pool};
pub use conn::{ConnectOptions, Connection, CopyMessage, CopyReader, CopyWriter, SimpleRow};
pub use error::{DbError, ReplicationError};
pub use frame::MAX_BACKEND_MESSAGE;
pub use params::{
    ConnectParams, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PORT, Host, ServerState, SslMode,
    TargetSessionAttrs,
};
pub use protocol::{ProtocolError, ServerMessage, StatusUpdate, now_unix_micros};
pub use setup::{PublicationTables, SetupError, SlotInfo};
pub use snapshot::{
    CHUNK_ROWS, ExportedSnapshot, SnapshotChunk, SnapshotTable, describe_table, open_readers,
    read_lsn, read_tables,
};
pub use stats::StreamStats;
pub use stream::{
    ReplicationStream, SESSION_SETTINGS, ServerIdentity, StreamConfig, StreamError, spawn,
};
pub use tls::Transport;
pub use version::{OLDEST_SUPPORTED_MAJOR, ServerVersion};
