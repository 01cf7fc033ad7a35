//! Connecting to the database, retrying while it is unreachable; a definite refusal (a wrong
//! password, no pg_hba.conf entry, a missing database) is said with its fix.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ServiceError;
use crate::replication::{self, ConnectParams, setup};

/// A pool on the database `params` names, once it answers.
pub(crate) async fn connect(
    params: &ConnectParams,
    shutdown: &CancellationToken,
) -> Result<PgPool, ServiceError> {
    let mut wait = Duration::from_millis(500);
    loop {
        // One plain connection first: it fails at once when nothing listens, where a pool
        // would keep trying for its whole acquire timeout before saying anything.
        let attempt = async {
            use sqlx::Connection as _;
            replication::catalog_connection(params)
                .await?
                .close()
                .await?;
            replication::catalog_pool(params, 8).await
        };
        match attempt.await {
            Ok(pool) => return Ok(pool),
            Err(e) if setup::is_transient_sql(&e) && !shutdown.is_cancelled() => {
                warn!(
                    database = %params.redacted_url(),
                    error = %e,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "database unreachable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Err(ServiceError::Shutdown),
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                let fix = match &e {
                    sqlx::Error::Database(db) => match db.code().as_deref() {
                        Some("28P01") => "; check the user and password in database_url",
                        Some("28000") => {
                            "; the server's pg_hba.conf has no entry for this user, database and \
                             address: add one, or connect as another role"
                        }
                        Some("3D000") => "; the database in database_url does not exist: create it",
                        _ => "",
                    },
                    _ => "",
                };
                return Err(ServiceError::Connect(
                    anyhow::Error::new(e)
                        .context(format!("connecting to {}{fix}", params.redacted_url())),
                ));
            }
        }
    }
}
