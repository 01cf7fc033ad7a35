//! A private PostgreSQL cluster for tests, and a testing kit for operators (the `testing`
//! feature: `streamex = { version = "..", features = ["testing"] }` in your crate's
//! `[dev-dependencies]`).
//!
//! Tests share one cluster per test binary ([`server`]) and take a fresh database each
//! ([`TestServer::create_database`]). Set `STREAMEX_TEST_DATABASE_URL` to a superuser URL of a
//! server with `wal_level = logical` to run them against that server instead.
//!
//! [`OperatorTest`] is for operator authors: a fresh database with your schema, your
//! operator run through the real pipeline over a list of SQL statements, and your derived
//! tables to assert on. [`event`] makes an event by hand, for unit tests of a handler.

mod kit;

use std::sync::OnceLock;

pub use crate::cluster::{
    Cluster, ClusterBuilder, ClusterError, StopMode, create_database_at, find_bindir,
};
pub use kit::{KitError, OperatorTest};

use crate::event::{Event, EventType};
use crate::lsn::Lsn;

/// An event as the decoder would make it, for unit tests of handlers: `new` and `old` are
/// JSON objects (the records) or `null`; `entity` is `table` (of `public`) or `schema.table`. It sits at position `(0/100, ordinal)` of a
/// transaction long committed (xid 3, visible to every snapshot); change the fields you need.
///
/// # Panics
/// When `new` or `old` is neither an object nor null.
pub fn event(
    kind: EventType,
    entity: &str,
    new: serde_json::Value,
    old: serde_json::Value,
    ordinal: u64,
) -> Event {
    let record = |value: serde_json::Value| match value {
        serde_json::Value::Object(map) => Some(crate::event::Record::from(map)),
        serde_json::Value::Null => None,
        other => panic!("not a record: {other}"),
    };
    let name = crate::event::EntityName::parse(entity)
        .unwrap_or_else(|e| panic!("not an entity name: {e}"));
    Event {
        kind,
        schema: name.schema_or(crate::event::DEFAULT_SCHEMA).into(),
        entity: name.canonical(crate::event::DEFAULT_SCHEMA).into(),
        table: name.table.into(),
        new_record: record(new),
        old_record: record(old),
        changes: None,
        unavailable_columns: Vec::new(),
        timestamp: 0,
        lsn: Lsn(0x100),
        commit_lsn: Lsn(0x100),
        xid: 3,
        ordinal,
        decode_error: None,
        message: None,
        key_columns: std::sync::Arc::from([]),
    }
}

/// A handler's [`crate::operator::Context`] on `conn` (a transaction of the test's own), for
/// calling an operator's `handle` or `handle_batch` directly in a unit test.
pub fn context(conn: &mut sqlx::PgConnection) -> crate::operator::Context<'_> {
    crate::operator::Context::new(Some(conn), 1, "test")
}

/// The server the tests of this process share.
#[derive(Debug)]
pub enum TestServer {
    /// A private cluster started for this process, removed when it exits.
    Private(Cluster),
    /// A server named by `STREAMEX_TEST_DATABASE_URL` (an admin URL).
    External(String),
}

impl TestServer {
    /// Creates a new, empty database with a unique name and returns its URL.
    pub async fn create_database(&self) -> Result<String, ClusterError> {
        match self {
            TestServer::Private(cluster) => cluster.create_database().await,
            TestServer::External(url) => create_database_at(url).await,
        }
    }

    /// The private cluster, when the tests run on one (tests that restart the server need it).
    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            TestServer::Private(cluster) => Some(cluster),
            TestServer::External(_) => None,
        }
    }
}

/// The shared test server, started on first use.
///
/// # Panics
/// When no server can be started; the message says why and how to fix it.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("STREAMEX_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => TestServer::External(url),
        _ => TestServer::Private(
            Cluster::start().unwrap_or_else(|e| panic!("starting the test cluster: {e}")),
        ),
    })
}
