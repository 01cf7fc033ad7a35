//! What every stage shares about errors: how a chain of causes reads as one line, and which
//! failures may go away by themselves.
//!
//! # Transient or definite
//!
//! A failure is *transient* when trying again later may succeed without anyone changing
//! anything (the server restarts, a connection drops, a lock is released), and *definite*
//! when a person must fix something first (a password, a privilege, a missing object). Every
//! `is_transient` of the crate decides through the three functions here, so that the
//! replication connection, set-up, the SQL pool and process status agree:
//!
//! - [`is_transient_sqlstate`]: a server error, by its SQLSTATE only, never by its message
//!   (which `lc_messages` translates).
//! - [`is_transient_sqlx`]: an error of the SQL pool.
//! - [`is_transient_io`]: an I/O failure on a connection.
//!
//! A leaf module: every stage uses it, it uses none.

use std::error::Error;
use std::fmt;
use std::io;

/// An error and its causes as one line, `outer: cause: root cause`, each part once.
///
/// Many errors repeat their cause in their own text (sqlx's "error returned from database:
/// X" has the server's "X" as its source), so `{:#}` of an `anyhow::Error` would print "X: X".
/// A cause whose text the line already ends with is left out.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

/// [`Chain`] of an `anyhow::Error`.
pub fn chain(error: &anyhow::Error) -> String {
    Chain(error.as_ref()).to_string()
}

/// Whether a server error with this SQLSTATE may go away by itself. Transient:
///
/// - class `08`, connection exception (08000, 08001, 08003, 08004, 08006, 08P01...): the
///   connection could not be made or was lost; a new one may succeed. The pool's TLS relay
///   reports a failure to reach the server that may pass as 08001 (`replication/relay.rs`).
/// - `57P01` admin_shutdown, `57P02` crash_shutdown: the server is going down (a restart,
///   `pg_terminate_backend`); it may be back soon.
/// - `57P03` cannot_connect_now: the server is starting up or shutting down.
/// - `53300` too_many_connections: others may disconnect.
/// - `55006` object_in_use: the object is held by another session, such as a replication
///   slot still held by a walsender that is dying after the previous session ended.
/// - `40001` serialization_failure and `40P01` deadlock_detected: the transaction lost a
///   race; running it again is what PostgreSQL asks for.
///
/// Everything else is definite, among them the rest of class 57 (`57014` query_canceled: a
/// statement timeout or a cancel someone asked for), class 53 apart from 53300 (a full disk,
/// out of memory: a person must make room), authentication (class 28), missing objects
/// (42704, 3D000), privileges (42501) and internal errors (XX000).
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "53300" // too_many_connections
                | "55006" // object_in_use
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
        )
}

/// Whether an I/O failure on a connection may go away by itself: every kind but
/// `PermissionDenied` (a Unix socket or a file this process may not open, which needs a person
/// to change permissions). Refused, reset, timed out, end of file: the server may be back.
pub fn is_transient_io(error: &io::Error) -> bool {
    error.kind() != io::ErrorKind::PermissionDenied
}

/// Whether an error of the SQL pool (sqlx) may go away by itself:
///
/// - a database error: by its SQLSTATE ([`is_transient_sqlstate`]); one without a code is
///   definite;
/// - an I/O failure: as [`is_transient_io`] says;
/// - `PoolTimedOut`: no connection came free or could be opened in time (the server is
///   unreachable or busy);
/// - `PoolClosed` is definite: the pool is closed only when the process is shutting down,
///   and waiting for it to reopen would wait for ever. Callers stop and let shutdown finish.
///
/// - a protocol error in answer to the TLS request that opens a connection: a server shutting
///   down closes the socket there (seen as `unexpected response from SSLRequest: 0x00`).
///
/// The rest (TLS configuration, other protocol errors, decoding a column, a missing row, a
/// migration that does not apply) is definite.
pub fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(error) => is_transient_io(error),
        sqlx::Error::Protocol(message) => {
            message.starts_with("unexpected response from SSLRequest")
        }
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::PoolClosed => false,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
