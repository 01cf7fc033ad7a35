//! One active instance per slot: a session-level advisory lock keyed on the slot's name.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;

/// The session-level advisory lock, keyed on the slot's name, that makes one instance per
/// slot the active one. PostgreSQL releases it when the holder's connection ends, even when
/// the holder is killed, so a standby takes over within a poll interval.
pub(crate) struct InstanceLock {
    conn: sqlx::PgConnection,
}

impl InstanceLock {
    const POLL: Duration = Duration::from_secs(1);
    /// The waits between attempts while the database cannot be reached.
    const OUTAGE: Backoff = Backoff::new(Duration::from_millis(250), 2.0, Duration::from_secs(10));

    /// Takes the lock, waiting as a standby while another instance holds it. `None` when
    /// `shutdown` came first.
    pub(super) async fn acquire(
        pool: &PgPool,
        slot: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<InstanceLock>> {
        use sqlx::Connection as _;
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&Self::application_name(slot));
        let mut announced = false;
        let mut outage = Self::OUTAGE;
        let mut conn: Option<sqlx::PgConnection> = None;
        loop {
            let attempt = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(sqlx::PgConnection::connect_with(&options).await?),
                };
                sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                )
                .bind(format!("streamex slot {slot}"))
                .fetch_one(c)
                .await
            };
            match attempt.await {
                Ok(true) => {
                    if announced {
                        info!(slot, "the active instance is gone; taking over");
                    }
                    let conn = conn.take().expect("connected when the lock was taken");
                    return Ok(Some(InstanceLock { conn }));
                }
                Ok(false) => {
                    outage.reset();
                    if !announced {
                        info!(
                            slot,
                            "standby: another instance is active on this slot; waiting to take over"
                        );
                        announced = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Self::POLL) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) if crate::error::is_transient_sqlx(&error) => {
                    // The server is restarting or unreachable: connect again, with backoff.
                    conn = None;
                    let wait = outage.next().unwrap_or(outage.max);
                    warn!(
                        slot, error = %error,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "cannot reach the database to take the instance lock; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) => {
                    return Err(error).context("taking the instance lock");
                }
            }
        }
    }

    /// The `application_name` of the lock's connection, the same for the active instance and
    /// its standbys, so that `streamex status` can list them (cut to PostgreSQL's 63 bytes;
    /// slot names are ASCII).
    fn application_name(slot: &str) -> String {
        let mut name = format!("streamex instance {slot}");
        name.truncate(63);
        name
    }

    /// The backend pids of the instances waiting as standbys on `slot`'s lock.
    pub(crate) async fn standbys(
        pool: &PgPool,
        slot: &str,
        active: Option<i32>,
    ) -> anyhow::Result<Vec<i32>> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
              WHERE application_name = $1 AND datname = current_database()
                AND pid IS DISTINCT FROM $2
              ORDER BY backend_start",
        )
        .bind(Self::application_name(slot))
        .bind(active)
        .fetch_all(pool)
        .await
        .context("looking for standby instances")
    }

    /// The backend pid of the connection holding the lock of `slot`: the active instance.
    pub(crate) async fn holder(pool: &PgPool, slot: &str) -> anyhow::Result<Option<i32>> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        )
        .bind(format!("streamex slot {slot}"))
        .fetch_optional(pool)
        .await
        .context("looking for the active instance's lock")
    }

    /// Checks the lock's connection until `shutdown`; cancels `lost` if it fails.
    pub(super) async fn watch(mut self, lost: CancellationToken, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Self::POLL * 2) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(error) = sqlx::query("SELECT 1").execute(&mut self.conn).await {
                warn!(error = %error, "the instance lock's connection failed");
                lost.cancel();
                return;
            }
        }
    }
}
