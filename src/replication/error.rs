//! Errors of the replication connection.
//!
//! Every failure is a [`ReplicationError`]. Callers decide between "retry later" and "stop
//! and tell the operator" with [`ReplicationError::is_transient`], which classifies server
//! errors by SQLSTATE only (never by message text, which is translated by `lc_messages`),
//! through the crate's one classification in [`crate::error`].
//!
//! Messages are lowercase, name the object concerned and, where there is one, the fix. No
//! error ever contains the password: errors are built from the parsed parameters, never from
//! the URL as given, and the SQL text of queries is not included either (an `ALTER ROLE ...
//! PASSWORD` would leak).

use std::fmt;
use std::time::Duration;

/// An error reported by the server (the fields of an ErrorResponse or NoticeResponse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbError {
    /// `ERROR`, `FATAL`, `PANIC` (or `WARNING`, `NOTICE`... for notices); never localized.
    pub severity: String,
    /// The SQLSTATE code, e.g. `28P01`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail message.
    pub detail: Option<String>,
    /// The optional hint.
    pub hint: Option<String>,
}

impl DbError {
    /// Parses the body of an ErrorResponse ('E') or NoticeResponse ('N'): fields of one type
    /// byte and a NUL-terminated string each, ended by a zero byte.
    ///
    /// The non-localized severity (`V`) is preferred over the localized one (`S`).
    pub fn parse(body: &[u8]) -> Result<DbError, ReplicationError> {
        let mut severity = None;
        let mut localized_severity = None;
        let mut code = None;
        let mut message = None;
        let mut detail = None;
        let mut hint = None;
        let mut rest = body;
        loop {
            let Some((&kind, tail)) = rest.split_first() else {
                return Err(ReplicationError::Protocol(
                    "error response without its terminating zero byte".to_owned(),
                ));
            };
            if kind == 0 {
                break;
            }
            let Some(end) = tail.iter().position(|&b| b == 0) else {
                return Err(ReplicationError::Protocol(
                    "error response field without its terminating zero byte".to_owned(),
                ));
            };
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            rest = &tail[end + 1..];
            match kind {
                b'V' => severity = Some(value),
                b'S' => localized_severity = Some(value),
                b'C' => code = Some(value),
                b'M' => message = Some(value),
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        Ok(DbError {
            severity: severity
                .or(localized_severity)
                .unwrap_or_else(|| "ERROR".to_owned()),
            code: code.unwrap_or_else(|| "XX000".to_owned()),
            message: message.unwrap_or_default(),
            detail,
            hint,
        })
    }

    /// Whether this SQLSTATE means the failure may go away by itself (retry later), as
    /// [`crate::error::is_transient_sqlstate`] says.
    pub fn is_transient(&self) -> bool {
        crate::error::is_transient_sqlstate(&self.code)
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong on the replication connection.
///
/// New variants (stream-level failures) are expected; match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The database URL could not be parsed or holds a bad value.
    #[error("invalid database url: {reason}")]
    InvalidUrl {
        /// What is wrong, naming the parameter and the accepted values.
        reason: String,
    },
    /// Connecting to the server failed (refused, unreachable, no such socket...).
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// `host:port` or the socket path.
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing an established connection failed (reset, end of file...).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A time limit passed.
    #[error("{context} timed out after {}s", .after.as_secs())]
    Timeout {
        /// What timed out, naming the setting that controls the limit.
        context: String,
        /// The limit.
        after: Duration,
    },
    /// The server does not offer TLS but the sslmode demands it.
    #[error(
        "the server at {target} does not support tls, but sslmode={sslmode} requires it: \
         enable ssl on the server or set sslmode=prefer in the database url"
    )]
    TlsUnavailable {
        /// `host:port`.
        target: String,
        /// The sslmode from the URL.
        sslmode: String,
    },
    /// The server's certificate was rejected.
    #[error(
        "tls certificate verification failed for {target} (sslmode={sslmode}): {reason}; \
         check sslrootcert and sslmode in the database url"
    )]
    TlsVerification {
        /// `host:port`.
        target: String,
        /// The sslmode from the URL.
        sslmode: String,
        /// Why the certificate was rejected.
        reason: String,
    },
    /// Another TLS failure: a bad sslrootcert file, a failed handshake.
    #[error("tls: {0}")]
    Tls(String),
    /// None of the servers the URL names would do: each was unreachable or not what
    /// `target_session_attrs` asks for (during a failover, until a standby is promoted).
    #[error(
        "no server of {targets} is {attrs} (target_session_attrs in the database url): {tried}"
    )]
    NoServer {
        /// The servers tried, `host:port` each.
        targets: String,
        /// What was asked for.
        attrs: String,
        /// What each server was, or why it could not be asked.
        tried: String,
    },
    /// The server reported an error.
    #[error("{context}: {error}")]
    Server {
        /// What failed, and for known SQLSTATEs the fix.
        context: String,
        /// The server's error (boxed to keep the error type small).
        error: Box<DbError>,
    },
    /// Authentication could not proceed on our side (no password, unsupported method,
    /// the server's SCRAM proof did not verify).
    #[error("{0}")]
    Auth(String),
    /// The server sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ReplicationError {
    /// Whether retrying later may succeed: I/O failures but a denied permission, timeouts and
    /// transient SQLSTATEs, as [`crate::error`] classifies them. Everything else
    /// (authentication, missing database, privileges, TLS verification, bad URL, protocol
    /// violations) needs a person to fix something.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { source, .. } | ReplicationError::Io { source, .. } => {
                crate::error::is_transient_io(source)
            }
            ReplicationError::Timeout { .. } | ReplicationError::NoServer { .. } => true,
            ReplicationError::Server { error, .. } => error.is_transient(),
            ReplicationError::InvalidUrl { .. }
            | ReplicationError::TlsUnavailable { .. }
            | ReplicationError::TlsVerification { .. }
            | ReplicationError::Tls(_)
            | ReplicationError::Auth(_)
            | ReplicationError::Protocol(_) => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The server's error, when the server reported one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            ReplicationError::Server { error, .. } => Some(error),
            _ => None,
        }
    }

    /// A server error during startup or authentication, explained for the known SQLSTATEs.
    pub(crate) fn startup(
        error: DbError,
        user: &str,
        dbname: &str,
        replication: bool,
    ) -> ReplicationError {
        let context = match error.code.as_str() {
            "28P01" => format!(
                "authentication failed for user \"{user}\": check the password in the database url"
            ),
            "28000" => format!(
                "the server refused user \"{user}\" for database \"{dbname}\": when no pg_hba.conf \
                 entry matches, add one for this host, user and database and reload the \
                 server; otherwise check that the role exists and may log in"
            ),
            "3D000" => format!(
                "database \"{dbname}\" does not exist: create it or fix the database name in the \
                 database url"
            ),
            "42501" if replication => format!(
                "role \"{user}\" lacks the REPLICATION attribute: ALTER ROLE \"{user}\" REPLICATION"
            ),
            "42501" => format!("role \"{user}\" may not connect to database \"{dbname}\""),
            "53300" => "the server has too many connections: retry later or raise \
                        max_connections (or max_wal_senders for replication)"
                .to_owned(),
            "57P03" => "the server is starting up or shutting down: retry later".to_owned(),
            _ => format!("connecting as user \"{user}\" to database \"{dbname}\" failed"),
        };
        ReplicationError::Server {
            context,
            error: Box::new(error),
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> ReplicationError {
        move |source| ReplicationError::Io { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, value) in fields {
            out.push(*kind);
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out.push(0);
        out
    }

    fn db(code: &str) -> DbError {
        DbError {
            severity: "FATAL".to_owned(),
            code: code.to_owned(),
            message: "m".to_owned(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn parses_error_response_fields() {
        let e = DbError::parse(&body(&[
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"bob\""),
            (b'D', "some detail"),
            (b'H', "some hint"),
            (b'F', "auth.c"),
            (b'L', "323"),
            (b'R', "auth_failed"),
        ]))
        .unwrap();
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed for user \"bob\"");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        assert_eq!(e.hint.as_deref(), Some("some hint"));
        let text = e.to_string();
        assert!(
            text.contains("28P01") && text.contains("some hint"),
            "{text}"
        );
    }

    #[test]
    fn prefers_the_non_localized_severity() {
        let e = DbError::parse(&body(&[
            (b'S', "FATAL-LOCALIZED"),
            (b'V', "FATAL"),
            (b'C', "3D000"),
            (b'M', "x"),
        ]))
        .unwrap();
        assert_eq!(e.severity, "FATAL");
        let e = DbError::parse(&body(&[(b'S', "ERREUR"), (b'M', "x")])).unwrap();
        assert_eq!(e.severity, "ERREUR");
        assert_eq!(e.code, "XX000");
        assert_eq!(e.detail, None);
    }

    #[test]
    fn rejects_truncated_error_responses() {
        assert!(DbError::parse(b"").is_err());
        assert!(DbError::parse(b"Mno terminator").is_err());
        assert!(DbError::parse(b"Mmessage\0").is_err());
        assert!(DbError::parse(b"\0").is_ok());
    }

    #[test]
    fn classifies_by_sqlstate() {
        for code in [
            "08006", "08001", "08P01", "57P01", "57P02", "57P03", "53300", "55006", "40001",
            "40P01",
        ] {
            let e = ReplicationError::Server {
                context: "c".to_owned(),
                error: Box::new(db(code)),
            };
            assert!(e.is_transient(), "{code} should be transient");
            assert_eq!(e.sqlstate(), Some(code));
        }
        for code in [
            "28P01", "28000", "3D000", "42501", "42704", "XX000", "58P01",
        ] {
            let e = ReplicationError::startup(db(code), "bob", "app", true);
            assert!(!e.is_transient(), "{code} should be definite");
            assert_eq!(e.sqlstate(), Some(code));
        }
    }

    #[test]
    fn classifies_the_other_variants() {
        let refused = ReplicationError::Connect {
            target: "127.0.0.1:1".to_owned(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(refused.is_transient());
        assert_eq!(refused.sqlstate(), None);
        let eof = ReplicationError::Io {
            context: "reading",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        };
        assert!(eof.is_transient());
        let denied = ReplicationError::Connect {
            target: "/run/postgresql/.s.PGSQL.5432".to_owned(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        assert!(!denied.is_transient());
        let timeout = ReplicationError::Timeout {
            context: "connecting".to_owned(),
            after: Duration::from_secs(10),
        };
        assert!(timeout.is_transient());
        assert!(timeout.to_string().contains("10s"));
        assert!(!ReplicationError::Protocol("x".to_owned()).is_transient());
        assert!(!ReplicationError::Auth("x".to_owned()).is_transient());
        assert!(!ReplicationError::InvalidUrl { reason: "x".into() }.is_transient());
        assert!(
            !ReplicationError::TlsVerification {
                target: "h:1".into(),
                sslmode: "verify-full".into(),
                reason: "r".into()
            }
            .is_transient()
        );
        let unavailable = ReplicationError::TlsUnavailable {
            target: "h:1".into(),
            sslmode: "require".into(),
        };
        assert!(!unavailable.is_transient());
        assert!(unavailable.to_string().contains("sslmode=require"));
    }

    #[test]
    fn startup_errors_name_the_object_and_the_fix() {
        let e = ReplicationError::startup(db("28P01"), "bob", "app", true);
        assert!(
            e.to_string()
                .starts_with("authentication failed for user \"bob\": check the password"),
            "{e}"
        );
        let e = ReplicationError::startup(db("28000"), "bob", "app", true);
        assert!(e.to_string().contains("pg_hba.conf"), "{e}");
        let e = ReplicationError::startup(db("3D000"), "bob", "app", true);
        assert!(
            e.to_string().contains("database \"app\" does not exist"),
            "{e}"
        );
        let e = ReplicationError::startup(db("42501"), "bob", "app", true);
        assert!(
            e.to_string().contains(
                "role \"bob\" lacks the REPLICATION attribute: ALTER ROLE \"bob\" REPLICATION"
            ),
            "{e}"
        );
    }
}
