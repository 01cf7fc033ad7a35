//! A lease on a lock's database session: the server ends the session once its holder stops
//! renewing it, which releases the session's advisory locks. The instance lock
//! (`service::lock`) and a worker's operator lock (`worker::lock`) are held this way, so that
//! a frozen holder (SIGSTOP, a paused VM, a cut network) loses its lock after the lease
//! instead of keeping it for as long as its socket stays open.
//!
//! `idle_session_timeout` came in PostgreSQL 14. On 13 the session instead stays in an open
//! transaction that holds no snapshot and no transaction id, ended by
//! `idle_in_transaction_session_timeout`; each renewal commits it and opens the next.

use std::time::Duration;

/// How the server ends the lock's session once the holder stops renewing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseKind {
    /// `idle_session_timeout` (PostgreSQL 14 and later): the session is idle between renewals.
    IdleSession,
    /// `idle_in_transaction_session_timeout` (PostgreSQL 13): the session sits in an open
    /// transaction between renewals.
    IdleTransaction,
}

impl LeaseKind {
    /// For the server whose `server_version_num` is `version`.
    pub(crate) fn for_server(version: i32) -> LeaseKind {
        if version >= 140_000 {
            LeaseKind::IdleSession
        } else {
            LeaseKind::IdleTransaction
        }
    }

    /// The statements that start the lease on the lock's session.
    pub(crate) fn start(self, lease: Duration) -> String {
        let ms = lease.as_millis();
        match self {
            LeaseKind::IdleSession => format!("SET idle_session_timeout = {ms}"),
            LeaseKind::IdleTransaction => {
                format!("SET idle_in_transaction_session_timeout = {ms}; BEGIN")
            }
        }
    }

    /// The statement that renews it.
    pub(crate) fn renew(self) -> &'static str {
        match self {
            LeaseKind::IdleSession => "SELECT 1",
            LeaseKind::IdleTransaction => "COMMIT; BEGIN",
        }
    }
}

/// Starts the lease of `lease` on the lock's session. Only the holder's session has the
/// timeout: a standby's would be ended while it waits (it is idle between polls).
pub(crate) async fn start_lease(
    conn: &mut sqlx::PgConnection,
    lease: Duration,
) -> Result<LeaseKind, sqlx::Error> {
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut *conn)
        .await?;
    let kind = LeaseKind::for_server(version);
    begin_lease(conn, lease, kind).await?;
    Ok(kind)
}

/// Starts the lease as `kind` says, as a simple query (`kind.start` may be two statements).
pub(crate) async fn begin_lease(
    conn: &mut sqlx::PgConnection,
    lease: Duration,
    kind: LeaseKind,
) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, kind.start(lease).as_str()).await?;
    Ok(())
}

/// One renewal of the lease, `kind`'s statement(s) as a simple query.
pub(crate) async fn renew(
    conn: &mut sqlx::PgConnection,
    kind: LeaseKind,
) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, kind.renew()).await?;
    Ok(())
}
