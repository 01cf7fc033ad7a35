//! A private PostgreSQL cluster for tests and demos, and a testing kit for operators.
//!
//! Tests share one cluster per test binary ([`server`]) and take a fresh database each
//! ([`TestServer::create_database`]). Set `STREAMEX_TEST_DATABASE_URL` to a superuser URL of a
//! server with `wal_level = logical` to run them against that server instead.
//!
//! [`OperatorTest`] is for operator authors: a fresh database with your schema, your
//! operator run through the real pipeline over a list of SQL statements, and your derived
//! tables to assert on.

mod cluster;
mod kit;

use std::sync::OnceLock;

pub use cluster::{
    Cluster, ClusterBuilder, ClusterError, StopMode, create_database_at, find_bindir,
};
pub use kit::{KitError, OperatorTest};

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
