//! streamex: a change-data-capture operator service for PostgreSQL, as a library.
//!
//! It reads the write-ahead log through a logical replication slot (`pgoutput`), turns every
//! committed change into a typed [`Event`], publishes it on an in-process [`pubsub`], runs the
//! [`operator`]s you write (Rust, or declared in SQL) to keep derived tables and side effects
//! up to date, and records per-entity process [`status`], so that it resumes exactly after a
//! crash and your application can ask, in SQL, whether its write has been processed yet.
//!
//! # Using it
//!
//! - Write operators: [`operator::Operator`] with plain `async fn`s, or a declarative
//!   [`operator::SqlOperator`].
//! - Run them: [`Service::builder`] in your own program, or [`cli::main`] with a
//!   [`operator::Registry`] of your operators, which gives your binary every `streamex`
//!   command.
//! - Run them on other machines: [`Worker::builder`] (or `streamex worker`) runs operators
//!   from the NATS JetStream stream that a service with `[nats]` publishes every event to,
//!   with the same checkpoints, retries, halts and dead letters.
//! - Test them: `streamex::testing::OperatorTest` (the `testing` feature) runs an operator
//!   through the real pipeline against a private PostgreSQL.
//!
//! # Layout
//!
//! Data flows one way, and each step is a module:
//!
//! ```text
//! replication ──► decode ──► event ──► operator (dispatch ─► runners ─► coordinator) ──► status
//!      ▲                        └────► pubsub (channels, EntityProcessed)                  │
//!      └────────────────────── acknowledgement of what is durably done ◄─────────────────┘
//! service: wires them (connect, set up, instance lock, pipeline); cli: the command line
//! jetstream (every event to a stream) ──► worker: operators on other machines ──► status
//! ```
//!
//! Leaf modules every stage uses: [`lsn`] (`Lsn`, `Position`), [`backoff`] (the waits of every
//! retry loop), [`error`] (error chains, and the one transient/definite classification of
//! server and I/O errors), [`config`]. The façade is [`Service`], [`Worker`], [`operator`], [`event`],
//! [`config`], [`status`], [`pubsub`], [`cli`] and `testing`; `replication`, `decode`,
//! `metrics` and `http` are internals, public only for streamex's own integration tests.

#![warn(missing_docs)]

pub mod backoff;
pub mod cli;
mod cluster;
pub mod config;
#[doc(hidden)]
pub mod decode;
pub mod error;
pub mod event;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod jetstream;
mod lease;
pub mod lsn;
#[doc(hidden)]
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod pubsub;
#[doc(hidden)]
pub mod replication;
mod service;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod worker;

pub use event::{Event, EventType};
pub use lsn::{Lsn, Position};
pub use service::{Service, ServiceBuilder, ServiceError, ServiceHandle};
pub use worker::{Worker, WorkerBuilder, WorkerError};

/// The sqlx streamex is built with: an operator's `Context::db()` is a connection of this
/// version, so a crate that names sqlx types in its operators uses this one (or the same
/// 0.8 release).
pub use sqlx;

/// The axum streamex is built with: [`ServiceHandle::router`] is a `Router` of this version.
pub use axum;
