//! One worker per operator: a session-level advisory lock keyed on (slot, operator)
//! ([`crate::status::operator_lock_key`]), held by the worker that runs the operator. A
//! second worker started with the same operator (a rolling deploy, a spare machine) stands
//! by and takes over within about a second of the first one's lock session ending (its
//! exit, its SIGKILL, or its connection lost). The active `streamex run` of the slot holds
//! the same keys for its own operators, so a worker never runs one of them meanwhile.
//!
//! Each session of an operator makes its consumer anew (see `consumer.rs`); two workers
//! doing so in turn would keep cutting each other's deliveries. Nothing would be applied
//! twice without the lock (the checkpoint's compare-and-set), but the lock keeps them from
//! wasting their time.

use std::time::Duration;

use sqlx::{Connection as _, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;

/// How often a standby tries to take the lock, and the holder checks it still has it.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// The waits between attempts while the database cannot be reached.
const OUTAGE: Backoff = Backoff::new(Duration::from_millis(250), 2.0, Duration::from_secs(10));

/// The lock of one operator, on a connection of its own.
pub(super) struct OperatorLock {
    conn: sqlx::PgConnection,
}

impl OperatorLock {
    /// Takes the lock of `operator` on `slot`, standing by while another worker holds it.
    /// `None` on shutdown. Its session is named `streamex worker <slot> <operator>`
    /// (`pg_stat_activity.application_name`), so the holder can be found.
    pub(super) async fn acquire(
        pool: &PgPool,
        slot: &str,
        operator: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<OperatorLock>, sqlx::Error> {
        let key = crate::status::operator_lock_key(slot, operator);
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&key);
        let mut announced = false;
        let mut outage = OUTAGE;
        loop {
            let attempt = async {
                let mut conn = sqlx::PgConnection::connect_with(&options).await?;
                let taken: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                        .bind(&key)
                        .fetch_one(&mut conn)
                        .await?;
                if taken {
                    Ok(Some(conn))
                } else {
                    let _ = conn.close().await;
                    Ok(None)
                }
            };
            match attempt.await {
                Ok(Some(conn)) => {
                    if announced {
                        info!(operator, slot, "the other worker is gone; taking over");
                    }
                    return Ok(Some(OperatorLock { conn }));
                }
                Ok(None) => {
                    outage.reset();
                    if !announced {
                        info!(
                            operator,
                            slot,
                            "standby: another worker, or the active `streamex run` of this slot, \
                             runs this operator (a worker's lock session is named {key:?} in \
                             pg_stat_activity); waiting to take over"
                        );
                        announced = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) if crate::error::is_transient_sqlx(&error) => {
                    let wait = outage.next().unwrap_or(outage.max);
                    warn!(
                        operator, slot, error = %error,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "cannot reach the database to take the operator's worker lock; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Whether the lock's session still answers (and so still holds the lock).
    pub(super) async fn held(&mut self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&mut self.conn);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), ping).await,
            Ok(Ok(_))
        )
    }

    /// Lets go of the lock (closing its session).
    pub(super) async fn release(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.close()).await;
    }
}
