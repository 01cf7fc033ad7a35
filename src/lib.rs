//! streamex: a change-data-capture operator service for PostgreSQL.
//!
//! # Layout
//!
//! Data flows one way, and each step is a module:
//!
//! ```text
//! replication ──► decode ──► event ──► (pubsub ──► operator ──► status) ──► ack back to replication
//! ```
//!
//! - [`replication`]: the replication connection (startup, authentication, TLS), the CopyBoth
//!   stream, standby status updates and acknowledgement, publication and slot set-up.
//! - [`decode`]: the pgoutput decoder, the relation and type caches, and the conversion of
//!   PostgreSQL text values to JSON exactly as `to_jsonb` gives them.
//! - [`event`]: the typed change event every later stage works on.
//! - [`metrics`] and [`http`]: the optional HTTP endpoint (Prometheus metrics, health,
//!   process status, Server-Sent Events of the pub/sub channels).
//! - [`cli`]: the `streamex` command line.
//! - [`testing`]: a private PostgreSQL cluster for tests and demos, and `OperatorTest`, the
//!   kit for testing an operator.

pub mod cli;
mod cluster;
pub mod config;
pub mod decode;
pub mod error;
pub mod event;
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod pubsub;
pub mod replication;
mod service;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use event::{Event, EventType};
pub use lsn::{Lsn, Position};
pub use service::{Service, ServiceBuilder, ServiceError, ServiceHandle};
