//! One active instance per slot: a session-level advisory lock keyed on the slot's name,
//! held as a lease.
//!
//! ```text
//! standby:  pg_try_advisory_lock every second ──► taken ──► end the slot's leftover walsender
//!                                                            │
//! active:   renew every lease/3 (SELECT 1) ◄─────────────────┘
//!             │ renewal fails, or is not answered before lease after the last one was sent
//!             ▼
//!           stop processing at once, stand by for the lock again
//! server:   ends the lock's session when it sits idle for the lease (idle_session_timeout),
//!           which releases the lock, and any of the instance's transactions idle as long
//!           (idle_in_transaction_session_timeout)
//! ```
//!
//! # Why a lease
//!
//! PostgreSQL releases a session lock when the session ends. A killed holder's session ends
//! at once, but a frozen one (SIGSTOP, a VM paused, a process starved for minutes) keeps its
//! socket open, so without a lease the standby would wait for as long as the freeze lasts.
//! With the lease, the server ends the session of a holder that stopped renewing it, and a
//! standby takes over about `[lock] lease` later. The holder itself counts from the moment it
//! sent its last successful renewal, which is before the server starts counting, so it
//! knows its lease is over no later than the server does.
//!
//! The instance that wakes up after its lease ran out may still finish what it was doing
//! before it notices: its operators' checkpoints are a compare-and-set
//! (`status::advance_checkpoint`), so a write based on a checkpoint the new active instance
//! has moved is rolled back; process status only moves forward; its replication session was
//! ended when the new instance took the lock, and the slot, now streamed by the new
//! instance, refuses it (55006), so it acknowledges nothing.
//!
//! # PostgreSQL 13
//!
//! `idle_session_timeout` came in PostgreSQL 14. On 13 the lock's session instead stays in
//! an open transaction that holds no snapshot and no transaction id, ended by
//! `idle_in_transaction_session_timeout`; each renewal commits it and opens the next, so it
//! never looks old to monitoring.

use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::lease::{LeaseKind, renew, start_lease};

/// The session-level advisory lock, keyed on the slot's name, that makes one instance per
/// slot the active one, held as a lease of `lease`: see the module's documentation.
pub(crate) struct InstanceLock {
    conn: sqlx::PgConnection,
    lease: Duration,
    /// How the server ends the session when it is not renewed.
    kind: LeaseKind,
    /// When the last successful renewal (or the start of the lease) was sent.
    renewed: Instant,
}

impl InstanceLock {
    const POLL: Duration = Duration::from_secs(1);
    /// The waits between attempts while the database cannot be reached.
    const OUTAGE: Backoff = Backoff::new(Duration::from_millis(250), 2.0, Duration::from_secs(10));

    /// Takes the lock, waiting as a standby while another instance holds it, and starts its
    /// lease of `lease`. `None` when `shutdown` came first.
    pub(super) async fn acquire(
        pool: &PgPool,
        slot: &str,
        lease: Duration,
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
                let taken = sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                )
                .bind(Self::key(slot))
                .fetch_one(&mut *c)
                .await?;
                if !taken {
                    return Ok(None);
                }
                end_leftover_walsender(c, slot).await;
                let sent = Instant::now();
                let kind = start_lease(c, lease).await?;
                Ok::<_, sqlx::Error>(Some((kind, sent)))
            };
            match attempt.await {
                Ok(Some((kind, renewed))) => {
                    if announced {
                        info!(slot, "the active instance is gone; taking over");
                    }
                    if kind == LeaseKind::IdleTransaction {
                        info!(
                            slot,
                            lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
                            "PostgreSQL 13 has no idle_session_timeout: the instance lock's \
                             session is held in an open transaction that \
                             idle_in_transaction_session_timeout ends (it holds no snapshot \
                             and is renewed with COMMIT; BEGIN)"
                        );
                    }
                    let conn = conn.take().expect("connected when the lock was taken");
                    return Ok(Some(InstanceLock {
                        conn,
                        lease,
                        kind,
                        renewed,
                    }));
                }
                Ok(None) => {
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
                    // The server is restarting or unreachable: connect again (which lets go
                    // of a lock taken on the failed connection), with backoff.
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

    /// Takes, on the lock's session, the lock of each of `operators` that a worker takes to
    /// run it (`worker::lock`), so that an operator runs in one place: a worker started with
    /// one of them stands by while this instance is active, and this instance refuses to
    /// start while a worker runs one. Held with the instance lock, and let go with it.
    ///
    /// An operator's lock can still be held for a moment by this slot's previous instance
    /// session: a backend that was ended releases its locks one lock partition at a time,
    /// after its client already saw the connection fail, so the instance lock may be free
    /// while an operator's is not yet. Only a worker's session is a reason to refuse; any
    /// other holder is waited for (it is going away: this instance holds the instance lock).
    ///
    /// `Ok(false)` when the lock's connection failed meanwhile (the server restarted, or the
    /// session was ended): the instance lock is lost with it, and is to be taken again.
    pub(super) async fn claim_operators(
        &mut self,
        slot: &str,
        operators: &[&str],
    ) -> anyhow::Result<bool> {
        const RETRY: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + self.lease.max(Duration::from_secs(5));
        for operator in operators {
            let key = crate::status::operator_lock_key(slot, operator);
            loop {
                let taken = sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                )
                .bind(&key)
                .fetch_one(&mut self.conn)
                .await;
                let taken = match taken {
                    Ok(taken) => taken,
                    Err(error) => {
                        return lost_or_failed(slot, error, "taking the operators' locks");
                    }
                };
                if taken {
                    break;
                }
                let holder = sqlx::query_as::<_, (i32, Option<String>, Option<String>)>(
                    "SELECT a.pid, a.client_addr::text, a.application_name
                       FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                        AND l.database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                        AND ((l.classid::bigint << 32) | l.objid::bigint)
                            = hashtextextended($1, 0)
                      LIMIT 1",
                )
                .bind(&key)
                .fetch_optional(&mut self.conn)
                .await;
                let holder = match holder {
                    Ok(holder) => holder,
                    Err(error) => {
                        return lost_or_failed(
                            slot,
                            error,
                            "looking for the holder of an operator's lock",
                        );
                    }
                };
                let worker = holder
                    .as_ref()
                    .is_some_and(|(_, _, name)| name.as_deref() == Some(key.as_str()));
                if !worker && Instant::now() < deadline {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                let holder = match holder {
                    Some((pid, Some(addr), _)) => format!("backend pid {pid}, from {addr}"),
                    Some((pid, None, _)) => format!("backend pid {pid}"),
                    None => "a session that is gone".to_owned(),
                };
                if worker {
                    bail!(
                        "operator {operator:?} of slot {slot:?} is run by a `streamex worker` \
                         ({holder}, application_name {key:?} in pg_stat_activity): an operator \
                         runs in one place, here or on workers; take it out of the \
                         [[operators]] of one of the two configurations"
                    );
                }
                bail!(
                    "the lock of operator {operator:?} of slot {slot:?} is still held by \
                     {holder}, which is not a `streamex worker`, after this instance took the \
                     instance lock; end that session (pg_terminate_backend) and start again"
                );
            }
        }
        Ok(true)
    }

    /// The backend pid of the connection holding the lock of `slot`: the active instance.
    pub(crate) async fn holder(pool: &PgPool, slot: &str) -> anyhow::Result<Option<i32>> {
        let holders = crate::status::advisory_lock_holders(pool, &[Self::key(slot)])
            .await
            .context("looking for the active instance's lock")?;
        Ok(holders.first().map(|(_, pid)| *pid))
    }

    /// The key of the instance lock of `slot`.
    pub(crate) fn key(slot: &str) -> String {
        format!("streamex slot {slot}")
    }

    /// The backend pid of the `streamex worker` session running each of `names` of `slot`
    /// (operators or partitions, `<operator>#<p>/<N>`) that one runs, by name: the holder of
    /// the name's lock ([`crate::status::operator_lock_key`]) other than the active
    /// instance, which holds the keys of what it runs on its instance lock's session.
    pub(crate) async fn worker_holders<'n>(
        pool: &PgPool,
        slot: &str,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<std::collections::HashMap<String, i32>, sqlx::Error> {
        let instance = Self::key(slot);
        let names: Vec<(String, &str)> = names
            .into_iter()
            .map(|name| (crate::status::operator_lock_key(slot, name), name))
            .collect();
        let keys: Vec<String> = names
            .iter()
            .map(|(key, _)| key.clone())
            .chain([instance.clone()])
            .collect();
        let held = crate::status::advisory_lock_holders(pool, &keys).await?;
        let instances: Vec<i32> = held
            .iter()
            .filter(|(key, _)| *key == instance)
            .map(|(_, pid)| *pid)
            .collect();
        Ok(names
            .into_iter()
            .filter_map(|(key, name)| {
                held.iter()
                    .find(|(k, pid)| *k == key && !instances.contains(pid))
                    .map(|(_, pid)| (name.to_owned(), *pid))
            })
            .collect())
    }

    /// Renews the lease every third of it until `shutdown`; cancels `lost` when a renewal
    /// fails or the lease has run out before it could be renewed (the process was paused, or
    /// the server did not answer in time): from then on another instance may be active.
    pub(super) async fn watch(mut self, lost: CancellationToken, shutdown: CancellationToken) {
        let every = self.lease / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let expires = self.renewed + self.lease;
            let Some(left) = expires.checked_duration_since(now).filter(|d| !d.is_zero()) else {
                warn!(
                    late_ms =
                        u64::try_from(now.duration_since(expires).as_millis()).unwrap_or(u64::MAX),
                    "the instance lock's lease ran out before it was renewed (this process was \
                     paused or starved): the server ends the lock's session and another \
                     instance may be active; stopped processing"
                );
                lost.cancel();
                return;
            };
            match tokio::time::timeout(left, renew(&mut self.conn, self.kind)).await {
                Ok(Ok(_)) => self.renewed = now,
                Ok(Err(error)) => {
                    warn!(error = %error, "the instance lock's connection failed");
                    lost.cancel();
                    return;
                }
                Err(_) => {
                    warn!(
                        lease_ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
                        "the instance lock's renewal was not answered before the lease ran \
                         out: another instance may be active; stopped processing"
                    );
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// What [`InstanceLock::claim_operators`] makes of a failed statement on the lock's session:
/// `Ok(false)` (the lock is lost, take it again) when the connection failed, else the error
/// with `doing` as its context.
fn lost_or_failed(slot: &str, error: sqlx::Error, doing: &'static str) -> anyhow::Result<bool> {
    if crate::error::is_transient_sqlx(&error) {
        warn!(
            slot, error = %error,
            "the instance lock's connection failed while taking the operators' locks"
        );
        return Ok(false);
    }
    Err(error).context(doing)
}

/// Ends the walsender still streaming from `slot`, if any. Only the lock's holder streams,
/// so whoever streams when the lock is taken is left over from an instance that lost it (one
/// frozen or cut off, whose walsender would hold the slot until `wal_sender_timeout`).
/// Failing to is not fatal: the slot is then taken when the walsender times out.
async fn end_leftover_walsender(conn: &mut sqlx::PgConnection, slot: &str) {
    let ended = sqlx::query_as::<_, (i32, bool)>(
        "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots
          WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()",
    )
    .bind(slot)
    .fetch_optional(conn)
    .await;
    match ended {
        Ok(None) => {}
        Ok(Some((pid, true))) => info!(
            slot,
            pid,
            "ended the replication session left streaming from the slot by the previous active instance"
        ),
        Ok(Some((pid, false))) => warn!(
            slot,
            pid,
            "the replication session left on the slot by the previous active instance had already ended"
        ),
        Err(error) => warn!(
            slot, error = %error,
            "could not end the replication session left on the slot by the previous active \
             instance: the slot is taken once its wal_sender_timeout ends it (grant the role \
             pg_signal_backend, or use the role that owns that session)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;

    use super::*;
    use crate::lease::begin_lease;

    /// A session of its own that takes `slot`'s lock, if it is free, and starts a lease of
    /// `lease` as `kind`.
    async fn take(
        url: &str,
        slot: &str,
        lease: Duration,
        kind: LeaseKind,
    ) -> anyhow::Result<Option<sqlx::PgConnection>> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let taken: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(InstanceLock::key(slot))
                .fetch_one(&mut conn)
                .await?;
        if !taken {
            return Ok(None);
        }
        begin_lease(&mut conn, lease, kind).await?;
        Ok(Some(conn))
    }

    /// Both ways of holding the lease (the PostgreSQL 13 one on every server), on the real
    /// server: renewed, the lock stays; no longer renewed, the server ends the session and
    /// another takes the lock. The waiting session, idle between its attempts, is not ended.
    #[tokio::test]
    async fn the_server_ends_a_lease_that_is_no_longer_renewed() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&pool)
            .await?;
        let mut kinds = vec![LeaseKind::IdleTransaction];
        if version >= 140_000 {
            kinds.push(LeaseKind::IdleSession);
        }
        let lease = Duration::from_secs(1);
        for kind in kinds {
            let slot = format!("lease_{kind:?}").to_lowercase();
            let mut holder = take(&url, &slot, lease, kind).await?.expect("a free lock");
            for _ in 0..6 {
                tokio::time::sleep(lease / 3).await;
                renew(&mut holder, kind).await?;
                assert!(
                    take(&url, &slot, lease, kind).await?.is_none(),
                    "{kind:?}: another session took the lock of a holder that renews it"
                );
            }
            // The holder stops renewing: the server ends its session and the lock is free.
            let deadline = Instant::now() + Duration::from_secs(30);
            let standby = loop {
                if let Some(conn) = take(&url, &slot, lease, kind).await? {
                    break conn;
                }
                assert!(Instant::now() < deadline, "{kind:?}: the lease never ended");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert!(
                renew(&mut holder, kind).await.is_err(),
                "{kind:?}: the session whose lease ended still answers"
            );
            drop(standby);
        }
        Ok(())
    }

    /// A holder that wakes up after its lease ran out (it was paused) stops at once, before
    /// anything else, without asking the server.
    #[tokio::test]
    async fn a_holder_woken_after_its_lease_ran_out_stops_at_once() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let lease = Duration::from_secs(3);
        let kind = LeaseKind::IdleTransaction;
        let conn = take(&url, "woken", lease, kind)
            .await?
            .expect("a free lock");
        let lock = InstanceLock {
            conn,
            lease,
            kind,
            renewed: Instant::now() - lease * 2,
        };
        let (lost, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let watch = tokio::spawn(lock.watch(lost.clone(), shutdown.clone()));
        tokio::time::timeout(lease * 2, lost.cancelled())
            .await
            .expect("a lease that ran out is lost at the first renewal");
        watch.await?;
        Ok(())
    }

    /// Every session of the service's pool, the first ones included, has its transaction
    /// ended by the server once it sits idle for the lease.
    #[tokio::test]
    async fn the_pool_s_idle_transactions_end_with_the_lease() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let params = crate::replication::ConnectParams::parse(&url)?;
        let shutdown = CancellationToken::new();
        let pool =
            crate::service::connect(&params, 2, Some(Duration::from_secs(1)), &shutdown).await?;
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT 1").execute(&mut *tx).await?;
            open.push(tx);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for mut tx in open {
            assert!(
                sqlx::query("SELECT 1").execute(&mut *tx).await.is_err(),
                "a transaction left idle longer than the lease goes on"
            );
        }
        Ok(())
    }

    #[test]
    fn postgres_13_holds_the_lease_in_a_transaction() {
        assert_eq!(LeaseKind::for_server(130_016), LeaseKind::IdleTransaction);
        assert_eq!(LeaseKind::for_server(140_000), LeaseKind::IdleSession);
        assert_eq!(
            LeaseKind::IdleSession.start(Duration::from_secs(30)),
            "SET idle_session_timeout = 30000"
        );
    }
}
