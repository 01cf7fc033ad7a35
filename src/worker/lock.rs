//! One worker per operator: a session-level advisory lock keyed on (slot, operator)
//! ([`crate::status::operator_lock_key`]), held by the worker that runs the operator as a
//! lease of `[lock] lease` (`crate::lease`). A second worker started with the same operator
//! (a rolling deploy, a spare machine) stands by and takes over within about a second of the
//! first one's lock session ending: its exit, its SIGKILL, its connection lost, or, when it
//! is frozen (SIGSTOP, a paused VM) or cut off, the server ending the session once the lease
//! has gone unrenewed. The frozen worker, once it runs again, finds its lease over before it
//! renews it, stops taking messages and stands by. The active `streamex run` of the slot holds
//! the same keys for its own operators, so a worker never runs one of them meanwhile.
//!
//! Each session of an operator makes its consumer anew (see `consumer.rs`); two workers
//! doing so in turn would keep cutting each other's deliveries. Nothing would be applied
//! twice without the lock (the checkpoint's compare-and-set), but the lock keeps them from
//! wasting their time.

use std::time::Duration;

use sqlx::{Connection as _, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::lease::{LeaseKind, renew, start_lease};

/// How often a standby tries to take the lock, and the holder renews it.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// The waits between attempts while the database cannot be reached.
const OUTAGE: Backoff = Backoff::new(Duration::from_millis(250), 2.0, Duration::from_secs(10));

/// The lock of one operator, on a connection of its own.
///
/// A task of its own renews the lease, whatever the operator's task is doing (a long batch,
/// a halt waiting for `streamex resume`, a JetStream outage); [`OperatorLock::held`] says
/// whether it still does.
pub(super) struct OperatorLock {
    /// Cancelled by the renewal task when the lock is lost.
    lost: CancellationToken,
    /// Ends the renewal task (on release, or when the lock is dropped).
    stop: CancellationToken,
    /// The renewal task; it gives the lock's session back when it ends.
    renewal: Option<tokio::task::JoinHandle<sqlx::PgConnection>>,
}

impl OperatorLock {
    /// Takes the lock of `operator` on `slot`, standing by while another worker holds it,
    /// and starts its lease of `lease`. `None` on shutdown. Its session is named `streamex
    /// worker <slot> <operator>` (`pg_stat_activity.application_name`), so the holder can be
    /// found. The session also holds the locks `also` names, and tries only while
    /// `also.may_take` says so (a worker sharing an operator's partitions takes no more than
    /// its share).
    pub(super) async fn acquire(
        pool: &PgPool,
        slot: &str,
        operator: &str,
        also: &Also<'_>,
        lease: Duration,
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
            if also.may_take.is_some_and(|may| !may()) {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => continue,
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
            let attempt = async {
                let mut conn = sqlx::PgConnection::connect_with(&options).await?;
                // The shared locks first: a session that cannot take one takes nothing (and
                // closing it lets go of what it took).
                let mut taken = true;
                for shared in &also.shared {
                    taken = taken
                        && sqlx::query_scalar::<_, bool>(
                            "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))",
                        )
                        .bind(shared)
                        .fetch_one(&mut conn)
                        .await?;
                }
                let taken = taken
                    && (also.shared_only
                        || sqlx::query_scalar::<_, bool>(
                            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                        )
                        .bind(&key)
                        .fetch_one(&mut conn)
                        .await?);
                if taken {
                    let sent = Instant::now();
                    let kind = start_lease(&mut conn, lease).await?;
                    Ok(Some((conn, kind, sent)))
                } else {
                    let _ = conn.close().await;
                    Ok(None)
                }
            };
            match attempt.await {
                Ok(Some((conn, kind, renewed))) => {
                    if announced {
                        info!(operator, slot, "the other worker is gone; taking over");
                    }
                    let (lost, stop) = (CancellationToken::new(), CancellationToken::new());
                    let renewal = tokio::spawn(keep(
                        Lease {
                            conn,
                            lease,
                            kind,
                            renewed,
                        },
                        operator.to_owned(),
                        lost.clone(),
                        stop.clone(),
                    ));
                    return Ok(Some(OperatorLock {
                        lost,
                        stop,
                        renewal: Some(renewal),
                    }));
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

    /// Whether the lock is still held: false once a renewal failed, was not answered in
    /// time, or came after the lease had run out (this process was paused or starved: the
    /// server ends, or has ended, the session, and another worker may run the operator).
    pub(super) fn held(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Lets go of the lock (closing its session).
    pub(super) async fn release(mut self) {
        self.stop.cancel();
        if let Some(renewal) = self.renewal.take()
            && let Ok(conn) = renewal.await
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
        }
    }
}

impl Drop for OperatorLock {
    /// A lock dropped without [`OperatorLock::release`] ends its renewal task, which drops
    /// the session (the server then lets go of the lock).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What else a lock's session holds, and when it may be taken.
#[derive(Default)]
pub(super) struct Also<'a> {
    /// Keys (`hashtextextended` text) held in shared mode beside the lock.
    pub shared: Vec<String>,
    /// Asked before each attempt; `None`: always.
    pub may_take: Option<&'a (dyn Fn() -> bool + Send + Sync)>,
    /// Only the shared locks, not the operator's own (a worker's presence among those
    /// sharing an operator's partitions).
    pub shared_only: bool,
}

/// The key of the lock every worker running one of `operator`'s partitions holds in shared
/// mode: the worker lock key of the operator itself, so that it never runs whole (on a worker
/// or under `streamex run`, which hold that key alone) while its partitions run.
pub(super) fn whole_key(slot: &str, operator: &str) -> String {
    crate::status::operator_lock_key(slot, operator)
}

/// The key of the lock each worker sharing `operator`'s partitions holds in shared mode
/// while it lives, so that the workers can count each other.
pub(super) fn members_key(slot: &str, operator: &str, partitions: u32) -> String {
    format!("streamex members {slot} {operator} {partitions}")
}

/// How many sessions hold the shared lock `key` (see [`members_key`]).
pub(super) async fn count_shared(pool: &PgPool, key: &str) -> Result<usize, sqlx::Error> {
    // Nothing takes the key exclusively: every holder shares it.
    Ok(
        crate::status::advisory_lock_holders(pool, &[key.to_owned()])
            .await?
            .len(),
    )
}

/// The lock's session and its lease.
struct Lease {
    conn: sqlx::PgConnection,
    lease: Duration,
    kind: LeaseKind,
    /// When the last successful renewal (or the start of the lease) was sent.
    renewed: Instant,
}

/// Renews `lease` every third of it (at most every [`POLL`]) until `stop`; cancels `lost` and
/// ends when a renewal fails, is not answered within 5 s, or comes after the lease ran out.
/// Gives the session back.
async fn keep(
    mut lease: Lease,
    operator: String,
    lost: CancellationToken,
    stop: CancellationToken,
) -> sqlx::PgConnection {
    let every = (lease.lease / 3).min(POLL);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return lease.conn,
        }
        let now = Instant::now();
        let expires = lease.renewed + lease.lease;
        let Some(left) = expires.checked_duration_since(now).filter(|d| !d.is_zero()) else {
            warn!(
                operator,
                late_ms =
                    u64::try_from(now.duration_since(expires).as_millis()).unwrap_or(u64::MAX),
                "the operator's worker lock lease ran out before it was renewed (this process \
                 was paused or starved): another worker may run the operator now"
            );
            lost.cancel();
            return lease.conn;
        };
        let wait = left.min(Duration::from_secs(5));
        match tokio::time::timeout(wait, renew(&mut lease.conn, lease.kind)).await {
            Ok(Ok(())) => lease.renewed = now,
            Ok(Err(error)) => {
                warn!(operator, error = %error, "the operator's worker lock session failed");
                lost.cancel();
                return lease.conn;
            }
            Err(_) => {
                warn!(
                    operator,
                    waited_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "the operator's worker lock renewal was not answered in time"
                );
                lost.cancel();
                return lease.conn;
            }
        }
    }
}
