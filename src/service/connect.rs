//! Connecting to the database, retrying while it is unreachable; a definite refusal (a wrong
//! password, no pg_hba.conf entry, a missing database) is said with its fix.
//!
//! `run`, `setup` and `status` wait for the database ([`connect`]); `tail` tries once
//! ([`connect_once`]) and says why it could not, in the same words ([`explain`]).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ServiceError;
use crate::backoff::Backoff;
use crate::replication::{self, ConnectParams, Host};

/// The waits between attempts while the database is unreachable.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), 2.0, Duration::from_secs(30));

/// A pool of `size` connections on the database `params` names, once it answers. With `lease`, every session of
/// the pool has the server end a transaction left idle that long
/// (`idle_in_transaction_session_timeout`): an instance or worker frozen in the middle of an
/// operator's transaction must not hold its rows locked after another has taken over.
pub(crate) async fn connect(
    params: &ConnectParams,
    size: u32,
    lease: Option<Duration>,
    shutdown: &CancellationToken,
) -> Result<PgPool, ServiceError> {
    let mut backoff = RETRY;
    loop {
        match try_connect(params, size, lease).await {
            Ok(pool) => return Ok(pool),
            Err(e) if crate::error::is_transient_sqlx(&e) && !shutdown.is_cancelled() => {
                let wait = backoff.next().unwrap_or(backoff.max);
                warn!(
                    database = %params.redacted_url(),
                    error = %crate::error::chain(&explain(params, e, "database_url")),
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "database unreachable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Err(ServiceError::Shutdown),
                }
            }
            Err(e) => return Err(ServiceError::Connect(explain(params, e, "database_url"))),
        }
    }
}

/// A pool of at most `max` connections on the database `params` names, in one attempt.
///
/// One plain connection first: it fails at once when nothing listens, where a pool would keep
/// trying for its whole acquire timeout before saying anything (and then only "timed out").
pub(crate) async fn connect_once(params: &ConnectParams, max: u32) -> Result<PgPool, sqlx::Error> {
    try_connect(params, max, None).await
}

async fn try_connect(
    params: &ConnectParams,
    max: u32,
    lease: Option<Duration>,
) -> Result<PgPool, sqlx::Error> {
    use sqlx::Connection as _;
    replication::catalog_connection(params)
        .await?
        .close()
        .await?;
    replication::catalog_pool_with(params, max, lease).await
}

/// A failed connection as a person reads it: the database tried, the fix when it is known,
/// then the error. `setting` is where the URL came from (`database_url`, `--database-url`).
pub(crate) fn explain(params: &ConnectParams, error: sqlx::Error, setting: &str) -> anyhow::Error {
    let fix = match &error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") => format!("; check the user and password in {setting}"),
            Some("28000") => "; the server's pg_hba.conf has no entry for this user, database and \
                              address: add one, or connect as another role"
                .to_owned(),
            Some("3D000") => format!("; the database in {setting} does not exist: create it"),
            _ => String::new(),
        },
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!(
            "; connection refused: nothing listens on {}: start the server, or fix the host and \
             port in {setting}",
            params.target()
        ),
        sqlx::Error::Io(io)
            if io.kind() == std::io::ErrorKind::NotFound
                && matches!(params.host, Host::Unix(_)) =>
        {
            format!(
                "; no server socket at {}: start the server, or fix the host and port in \
                 {setting}",
                params.target()
            )
        }
        _ => String::new(),
    };
    anyhow::Error::new(error).context(format!("connecting to {}{fix}", params.redacted_url()))
}
