use super::*;

#[derive(Debug)]
struct Text(&'static str, Option<Box<Text>>);

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Error for Text {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.1.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[test]
fn each_part_of_a_chain_is_said_once() {
    let root = Text("role \"nouser\" does not exist", None);
    let db = Text(
        "error returned from database: role \"nouser\" does not exist",
        Some(Box::new(root)),
    );
    let error = anyhow::Error::new(db).context("connecting to postgres://x/db");
    assert_eq!(
        chain(&error),
        "connecting to postgres://x/db: error returned from database: role \"nouser\" does not exist"
    );
    let plain = anyhow::anyhow!("io").context("reading");
    assert_eq!(chain(&plain), "reading: io");
}

#[test]
fn transient_sqlstates() {
    for code in [
        "08000", "08001", "08003", "08004", "08006", "08P01", "57P01", "57P02", "57P03", "53300",
        "55006", "40001", "40P01",
    ] {
        assert!(is_transient_sqlstate(code), "{code} should be transient");
    }
}

#[test]
fn definite_sqlstates() {
    for code in [
        "28P01", "28000", "3D000", "42501", "42704", "42P01", "42710", "23505", "22P02", "55000",
        "57014", "53100", "53200", "58P01", "XX000", "", "0", "57P0",
    ] {
        assert!(!is_transient_sqlstate(code), "{code:?} should be definite");
    }
}

#[test]
fn io_failures_are_transient_unless_permission_is_denied() {
    for kind in [
        io::ErrorKind::ConnectionRefused,
        io::ErrorKind::ConnectionReset,
        io::ErrorKind::UnexpectedEof,
        io::ErrorKind::TimedOut,
        io::ErrorKind::NotFound,
    ] {
        assert!(is_transient_io(&kind.into()), "{kind:?}");
    }
    assert!(!is_transient_io(&io::ErrorKind::PermissionDenied.into()));
}

/// A database error with a SQLSTATE (or none), as sqlx reports a server's.
#[derive(Debug)]
struct Coded(Option<&'static str>);

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message in any language")
    }
}

impl Error for Coded {}

impl sqlx::error::DatabaseError for Coded {
    fn message(&self) -> &str {
        "a message in any language"
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.0.map(std::borrow::Cow::Borrowed)
    }

    fn as_error(&self) -> &(dyn Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::Other
    }
}

#[test]
fn sqlx_errors() {
    let db = |code| sqlx::Error::Database(Box::new(Coded(code)));
    assert!(is_transient_sqlx(&db(Some("57P01"))));
    assert!(is_transient_sqlx(&db(Some("55006"))));
    assert!(is_transient_sqlx(&db(Some("08006"))));
    assert!(!is_transient_sqlx(&db(Some("42501"))));
    assert!(!is_transient_sqlx(&db(None)));
    let io = |kind: io::ErrorKind| sqlx::Error::Io(kind.into());
    assert!(is_transient_sqlx(&io(io::ErrorKind::ConnectionReset)));
    assert!(!is_transient_sqlx(&io(io::ErrorKind::PermissionDenied)));
    assert!(is_transient_sqlx(&sqlx::Error::PoolTimedOut));
    assert!(!is_transient_sqlx(&sqlx::Error::PoolClosed));
    assert!(!is_transient_sqlx(&sqlx::Error::RowNotFound));
    assert!(!is_transient_sqlx(&sqlx::Error::Protocol("x".into())));
    assert!(!is_transient_sqlx(&sqlx::Error::WorkerCrashed));
}

#[test]
fn a_connection_closed_in_answer_to_the_tls_request_is_transient() {
    let closing = sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
    assert!(is_transient_sqlx(&closing));
    let other = sqlx::Error::Protocol("unknown message type: 'X'".into());
    assert!(!is_transient_sqlx(&other));
}
