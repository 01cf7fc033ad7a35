//! The status module's error.

/// What went wrong while reading or writing process status, checkpoints, operator state or
/// dead letters, or while migrating the `streamex` schema.
///
/// The message includes the underlying error, so logging the `Display` form is enough.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A query failed; `context` says which.
    #[error("{context}: {error}")]
    Sql {
        /// What was being done.
        context: &'static str,
        /// The query's error.
        error: sqlx::Error,
    },
    /// Applying the embedded migrations failed.
    #[error("migrating the streamex schema: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A value could not be stored or read back (an ordinal beyond `i64::MAX`, a malformed
    /// LSN or JSON document read from the database).
    #[error("{context}: {detail}")]
    Invalid {
        /// What was being done.
        context: &'static str,
        /// What is wrong with the value.
        detail: String,
    },
}

impl StatusError {
    pub(crate) fn sql(context: &'static str) -> impl FnOnce(sqlx::Error) -> StatusError {
        move |error| StatusError::Sql { context, error }
    }

    /// The sqlx error underneath, if any.
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        match self {
            StatusError::Sql { error, .. } => Some(error),
            StatusError::Migrate(sqlx::migrate::MigrateError::Execute(error))
            | StatusError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(error, _)) => {
                Some(error)
            }
            _ => None,
        }
    }

    /// The SQLSTATE of the database error underneath, if any.
    pub fn sqlstate(&self) -> Option<String> {
        match self.sqlx_error()? {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Whether trying again later may succeed, as [`crate::error::is_transient_sqlx`] says
    /// of the sqlx error underneath (a lost connection, a server restarting, a pool time-out,
    /// a serialization failure...). A value that could not be stored and a migration that
    /// does not apply are definite.
    pub fn is_transient(&self) -> bool {
        self.sqlx_error()
            .is_some_and(crate::error::is_transient_sqlx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_pool_timeout_are_transient() {
        let io = StatusError::Sql {
            context: "x",
            error: sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        assert!(io.is_transient());
        let timeout = StatusError::Sql {
            context: "x",
            error: sqlx::Error::PoolTimedOut,
        };
        assert!(timeout.is_transient());
        let closed = StatusError::Sql {
            context: "x",
            error: sqlx::Error::PoolClosed,
        };
        assert!(!closed.is_transient());
        let invalid = StatusError::Invalid {
            context: "x",
            detail: "y".into(),
        };
        assert!(!invalid.is_transient());
    }
}
