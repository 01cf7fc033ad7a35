//! The PostgreSQL wire protocol for the replication connection: startup, authentication,
//! simple queries and CopyBoth.
//!
//! Frontend messages are encoded by `postgres-protocol`; backend messages are read into a
//! `BytesMut` in large chunks and taken out of it by frame.rs's synchronous [`try_frame`],
//! so that a CopyData payload is handed out as a `Bytes` slice of the read buffer, without a
//! copy and without one system call per message.
//!
//! ```text
//! client                                                  server
//!   │── (TCP) SSLRequest ─────────────────────────────────►│  see tls.rs
//!   │◄──────────────────────────────────── 'S' / 'N' ──────│
//!   │── StartupMessage (user, database, replication, ...) ►│
//!   │◄──── 'R' Authentication: 0 Ok | 3 cleartext | 5 md5 | 10 SASL
//!   │── PasswordMessage / SASLInitialResponse ────────────►│  (3, 5, 10)
//!   │◄──── 'R' 11 SASLContinue ────────────────────────────│  (SCRAM)
//!   │── SASLResponse ─────────────────────────────────────►│
//!   │◄──── 'R' 12 SASLFinal, 'R' 0 AuthenticationOk ───────│
//!   │◄──── 'S' ParameterStatus*, 'K' BackendKeyData ───────│
//!   │◄──── 'Z' ReadyForQuery ──────────────────────────────│  → Connection
//!   │── 'Q' Query ────────────────────────────────────────►│  simple_query
//!   │◄──── 'T' RowDescription, 'D' DataRow*, 'C' ... 'Z' ──│
//!   │── 'Q' START_REPLICATION ... ────────────────────────►│  start_copy_both
//!   │◄──── 'W' CopyBothResponse ───────────────────────────│  → (CopyReader, CopyWriter)
//!   │◄═══ 'd' CopyData ═══════════════════════════════════►│  both ways
//!   │── 'c' CopyDone ─────────────────────────────────────►│  CopyWriter::done
//!   │◄──── 'c' CopyDone, 'C' CommandComplete, 'Z' ─────────│  CopyMessage::Done
//! ```
//!
//! Any ErrorResponse during startup ends the connection with a [`ReplicationError::Server`]
//! whose message explains the SQLSTATE (wrong password, missing database, missing
//! REPLICATION attribute...). NoticeResponses are logged and skipped everywhere.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::error::{DbError, ReplicationError};
use super::frame::{Frame, frame_size, try_frame};
use super::params::{ConnectParams, ServerState, TargetSessionAttrs};
use super::tls::Transport;
use super::version::ServerVersion;

/// How much room to make in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

/// What to ask for in the startup packet.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Adds `replication=database` (a logical walsender connected to the database).
    pub replication: bool,
    /// Extra startup parameters, e.g. `("DateStyle", "ISO")`.
    pub settings: Vec<(String, String)>,
}

impl ConnectOptions {
    /// Options for a logical replication connection.
    pub fn replication() -> ConnectOptions {
        ConnectOptions {
            replication: true,
            settings: Vec::new(),
        }
    }
}

/// Reads framed backend messages from a byte stream.
struct MessageReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R> fmt::Debug for MessageReader<R> {
    /// Only the amount buffered: the bytes themselves may be anything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageReader")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    fn new(io: R, buf: BytesMut) -> Self {
        MessageReader { io, buf }
    }

    /// The next message, reading more from the stream only when the buffer holds no complete
    /// message ([`try_frame`] says).
    async fn next(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = try_frame(&mut self.buf)? {
                return Ok(frame);
            }
            let want = match frame_size(&self.buf)? {
                Some(total) => READ_CHUNK.max(total.saturating_sub(self.buf.len())),
                None => READ_CHUNK,
            };
            // Read in big chunks; a large message gets its whole (already bounded) size.
            let spare = self.buf.capacity() - self.buf.len();
            if spare < READ_CHUNK / 4 || spare < want - READ_CHUNK {
                self.buf.reserve(want);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(ReplicationError::io("reading from the server"))?;
            if n == 0 {
                return Err(ReplicationError::Io {
                    context: "reading from the server",
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                });
            }
        }
    }
}

/// Writes whole frontend messages and flushes them.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    buf: &mut BytesMut,
) -> Result<(), ReplicationError> {
    io.write_all(buf)
        .await
        .map_err(ReplicationError::io("writing to the server"))?;
    io.flush()
        .await
        .map_err(ReplicationError::io("writing to the server"))?;
    buf.clear();
    Ok(())
}

fn encode_error(e: std::io::Error) -> ReplicationError {
    ReplicationError::Protocol(format!("encoding a message: {e}"))
}

/// A connection after startup, ready for queries.
pub struct Connection {
    reader: MessageReader<Transport>,
    write_buf: BytesMut,
    parameters: HashMap<String, String>,
    backend_pid: i32,
    secret_key: i32,
    user: String,
}

impl fmt::Debug for Connection {
    /// Never the buffers: the write buffer may hold a password message after a failed write.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("user", &self.user)
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.is_tls())
            .field("server_version", &self.server_parameter("server_version"))
            .finish_non_exhaustive()
    }
}

/// One row of a simple query's result: text values by column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleRow {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl SimpleRow {
    /// The value of the column named `name` (`None` for SQL NULL or no such column).
    pub fn get(&self, name: &str) -> Option<&str> {
        let index = self.columns.iter().position(|c| c == name)?;
        self.values.get(index)?.as_deref()
    }

    /// The value of column `index` (`None` for SQL NULL or no such column).
    pub fn get_index(&self, index: usize) -> Option<&str> {
        self.values.get(index)?.as_deref()
    }

    /// The column names.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The values, in column order.
    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl Connection {
    /// Connects, negotiates TLS, sends the startup packet and authenticates, all within the
    /// URL's `connect_timeout`. When the URL names several servers or a
    /// `target_session_attrs`, to the first server that answers and is what it asks for
    /// ([`Connection::choose`]).
    pub async fn connect(
        params: &ConnectParams,
        options: &ConnectOptions,
    ) -> Result<Connection, ReplicationError> {
        match params.chooses_server() {
            true => Ok(Self::choose(params, options).await?.0),
            false => Self::connect_one(params, options).await,
        }
    }

    /// Tries the servers of `params` in order, as libpq does: the first that answers and
    /// whose state `target_session_attrs` accepts wins (for `prefer-standby`, the first
    /// standby, else the first that answered). Returns the connection and the parameters
    /// naming that server alone. A definite failure (a wrong password) on any server is
    /// returned as such when no server would do; otherwise the error says what each was.
    pub async fn choose(
        params: &ConnectParams,
        options: &ConnectOptions,
    ) -> Result<(Connection, ConnectParams), ReplicationError> {
        let attrs = params.target_session_attrs;
        let mut tried = Vec::new();
        let mut definite = None;
        let mut fallback = None;
        for server in params.servers() {
            let outcome = match Self::connect_one(&server, options).await {
                Ok(mut conn) if attrs.needs_state() => {
                    conn.server_state().await.map(|state| (conn, state))
                }
                Ok(conn) => return Ok((conn, server)),
                Err(e) => Err(e),
            };
            match outcome {
                Ok((conn, state)) if attrs.accepts(state) => {
                    if let Some((other, _)) = fallback.take() {
                        Connection::close(other).await;
                    }
                    return Ok((conn, server));
                }
                Ok((conn, state)) => {
                    let what = match (state.in_recovery, state.read_only) {
                        (true, _) => "a standby (in recovery)",
                        (false, true) => "a primary whose sessions are read-only",
                        (false, false) => "a primary",
                    };
                    tried.push(format!("{} is {what}", server.target()));
                    if attrs == TargetSessionAttrs::PreferStandby && fallback.is_none() {
                        fallback = Some((conn, server));
                    } else {
                        conn.close().await;
                    }
                }
                Err(e) => {
                    tried.push(format!("{}: {e}", server.target()));
                    if !e.is_transient() && definite.is_none() {
                        definite = Some(e);
                    }
                }
            }
        }
        if let Some(found) = fallback {
            return Ok(found);
        }
        if let Some(e) = definite {
            return Err(e);
        }
        Err(ReplicationError::NoServer {
            targets: params.targets(),
            attrs: attrs.to_string(),
            tried: tried.join("; "),
        })
    }

    /// Whether the server is in recovery and its sessions read-only: from what it reported
    /// at startup (`in_hot_standby`, `default_transaction_read_only`, from PostgreSQL 14),
    /// else by asking.
    async fn server_state(&mut self) -> Result<ServerState, ReplicationError> {
        let reported = (
            self.server_parameter("in_hot_standby"),
            self.server_parameter("default_transaction_read_only"),
        );
        if let (Some(hot_standby), Some(read_only)) = reported {
            let in_recovery = hot_standby == "on";
            return Ok(ServerState {
                in_recovery,
                read_only: in_recovery || read_only == "on",
            });
        }
        let rows = self
            .simple_query(
                "SELECT pg_catalog.pg_is_in_recovery()::text AS in_recovery, \
                 pg_catalog.current_setting('transaction_read_only') AS read_only",
            )
            .await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("no row for pg_is_in_recovery()".to_owned())
        })?;
        Ok(ServerState {
            in_recovery: row.get("in_recovery") == Some("true"),
            read_only: row.get("read_only") == Some("on"),
        })
    }

    /// [`Connection::connect`] to the one server `params.host:port` names.
    async fn connect_one(
        params: &ConnectParams,
        options: &ConnectOptions,
    ) -> Result<Connection, ReplicationError> {
        let attempt = Self::connect_inner(params, options);
        match params.connect_timeout {
            None => attempt.await,
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(ReplicationError::Timeout {
                        context: format!(
                            "connecting to {} (connect_timeout in the database url)",
                            params.target()
                        ),
                        after: limit,
                    })
                }),
        }
    }

    async fn connect_inner(
        params: &ConnectParams,
        options: &ConnectOptions,
    ) -> Result<Connection, ReplicationError> {
        let transport = Transport::connect(params).await?;
        let tls = transport.is_tls();
        let mut conn = Connection {
            reader: MessageReader::new(transport, BytesMut::with_capacity(READ_CHUNK)),
            write_buf: BytesMut::new(),
            parameters: HashMap::new(),
            backend_pid: 0,
            secret_key: 0,
            user: params.user.clone(),
        };

        let mut startup: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("database", &params.dbname),
            ("client_encoding", "UTF8"),
        ];
        if let Some(name) = &params.application_name {
            startup.push(("application_name", name));
        }
        if options.replication {
            startup.push(("replication", "database"));
        }
        for (name, value) in &options.settings {
            startup.push((name, value));
        }
        frontend::startup_message(startup.iter().copied(), &mut conn.write_buf)
            .map_err(encode_error)?;
        conn.flush().await?;

        conn.authenticate(params, options).await?;
        loop {
            let message = conn.reader.next().await?;
            match message.tag {
                b'S' => conn.parameter_status(&message.body)?,
                b'K' => {
                    let mut body = message.body;
                    if body.len() < 8 {
                        return Err(ReplicationError::Protocol(
                            "truncated BackendKeyData".to_owned(),
                        ));
                    }
                    conn.backend_pid = body.get_i32();
                    conn.secret_key = body.get_i32();
                }
                b'Z' => break,
                b'N' => log_notice(&message.body),
                b'E' => {
                    return Err(ReplicationError::startup(
                        DbError::parse(&message.body)?,
                        &params.user,
                        &params.dbname,
                        options.replication,
                    ));
                }
                b'v' => log_negotiate_protocol_version(&message.body),
                other => return Err(unexpected(other, "during startup")),
            }
        }
        tracing::info!(
            server = %params.target(),
            user = %params.user,
            dbname = %params.dbname,
            tls,
            replication = options.replication,
            backend_pid = conn.backend_pid,
            server_version = conn.server_parameter("server_version").unwrap_or("?"),
            "connected to postgresql"
        );
        Ok(conn)
    }

    /// Runs the authentication exchange until AuthenticationOk.
    async fn authenticate(
        &mut self,
        params: &ConnectParams,
        options: &ConnectOptions,
    ) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = self.reader.next().await?;
            let mut body = message.body;
            match message.tag {
                b'R' => {}
                b'E' => {
                    return Err(ReplicationError::startup(
                        DbError::parse(&body)?,
                        &params.user,
                        &params.dbname,
                        options.replication,
                    ));
                }
                b'N' => {
                    log_notice(&body);
                    continue;
                }
                b'v' => {
                    log_negotiate_protocol_version(&body);
                    continue;
                }
                other => return Err(unexpected(other, "during authentication")),
            }
            if body.len() < 4 {
                return Err(ReplicationError::Protocol(
                    "truncated authentication request".to_owned(),
                ));
            }
            let kind = body.get_i32();
            match kind {
                0 => {
                    if scram.is_some() {
                        return Err(ReplicationError::Auth(
                            "the server ended scram authentication without its final message"
                                .to_owned(),
                        ));
                    }
                    tracing::debug!(user = %params.user, "authenticated");
                    return Ok(());
                }
                3 => {
                    tracing::debug!(user = %params.user, "server asks for a cleartext password");
                    let password = need_password(params, "password")?;
                    frontend::password_message(password.as_bytes(), &mut self.write_buf)
                        .map_err(encode_error)?;
                    self.flush().await?;
                }
                5 => {
                    tracing::debug!(user = %params.user, "server asks for an md5 password");
                    if body.len() < 4 {
                        return Err(ReplicationError::Protocol(
                            "md5 authentication request without its salt".to_owned(),
                        ));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let password = need_password(params, "md5")?;
                    let hash = md5_hash(params.user.as_bytes(), password.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                        .map_err(encode_error)?;
                    self.flush().await?;
                }
                10 => {
                    let mechanisms = sasl_mechanisms(&body)?;
                    tracing::debug!(user = %params.user, ?mechanisms, "server asks for sasl");
                    let offers = |name: &str| mechanisms.iter().any(|m| m == name);
                    let binding = self.reader.io.tls_server_end_point();
                    // With TLS and a certificate we can hash, bind the channel (PLUS); when the
                    // server did not offer PLUS, say we could have ("y") so that a stripped
                    // offer is detected; without binding data say we cannot ("n").
                    let (mechanism, channel_binding) = match binding {
                        Some(data) if offers(SCRAM_SHA_256_PLUS) => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(data),
                        ),
                        Some(_) if offers(SCRAM_SHA_256) => {
                            (SCRAM_SHA_256, ChannelBinding::unrequested())
                        }
                        None if offers(SCRAM_SHA_256) => {
                            (SCRAM_SHA_256, ChannelBinding::unsupported())
                        }
                        _ if offers(SCRAM_SHA_256_PLUS) => {
                            return Err(ReplicationError::Auth(format!(
                                "the server offers only {SCRAM_SHA_256_PLUS} (scram with channel \
                                 binding) for user \"{}\", which needs tls and a server \
                                 certificate signed with sha-256 or sha-384: use sslmode=require \
                                 or stronger, or allow plain {SCRAM_SHA_256}",
                                params.user
                            )));
                        }
                        _ => {
                            return Err(ReplicationError::Auth(format!(
                                "the server offers no supported sasl mechanism (offered: {}); \
                                 streamex supports {SCRAM_SHA_256} and {SCRAM_SHA_256_PLUS}",
                                mechanisms.join(", ")
                            )));
                        }
                    };
                    let password = need_password(params, "scram-sha-256")?;
                    tracing::debug!(user = %params.user, mechanism, "starting scram");
                    let exchange = ScramSha256::new(password.as_bytes(), channel_binding);
                    frontend::sasl_initial_response(
                        mechanism,
                        exchange.message(),
                        &mut self.write_buf,
                    )
                    .map_err(encode_error)?;
                    scram = Some(exchange);
                    self.flush().await?;
                }
                11 => {
                    let exchange = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol(
                            "sasl continue without a sasl exchange".to_owned(),
                        )
                    })?;
                    exchange.update(&body).map_err(|e| {
                        ReplicationError::Auth(format!(
                            "scram authentication for user \"{}\" failed: {e}",
                            params.user
                        ))
                    })?;
                    frontend::sasl_response(exchange.message(), &mut self.write_buf)
                        .map_err(encode_error)?;
                    self.flush().await?;
                }
                12 => {
                    let mut exchange = scram.take().ok_or_else(|| {
                        ReplicationError::Protocol("sasl final without a sasl exchange".to_owned())
                    })?;
                    exchange.finish(&body).map_err(|e| {
                        ReplicationError::Auth(format!(
                            "the server's scram signature did not verify for user \"{}\": {e} \
                             (is this the right server?)",
                            params.user
                        ))
                    })?;
                }
                2 | 6 | 7 | 8 | 9 => {
                    let method = match kind {
                        2 => "kerberos v5",
                        6 => "scm credentials",
                        9 => "sspi",
                        _ => "gssapi",
                    };
                    return Err(ReplicationError::Auth(format!(
                        "the server asks for {method} authentication for user \"{}\", which \
                         streamex does not support: use scram-sha-256, md5, password or trust in \
                         pg_hba.conf for this connection",
                        params.user
                    )));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unknown authentication request {other}"
                    )));
                }
            }
        }
    }

    /// A parameter the server reported with ParameterStatus (`server_version`,
    /// `server_encoding`, `TimeZone`, `integer_datetimes`...).
    pub fn server_parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The server's version, from the `server_version` it reported at startup (`None` when
    /// it reported none, or one that does not start with a version number).
    pub fn server_version(&self) -> Option<ServerVersion> {
        self.server_parameter("server_version")
            .and_then(ServerVersion::parse)
    }

    /// The process id of the server backend (walsender) serving this connection.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// The secret key for cancel requests.
    pub fn secret_key(&self) -> i32 {
        self.secret_key
    }

    /// Whether the connection is encrypted with TLS.
    pub fn is_tls(&self) -> bool {
        self.reader.io.is_tls()
    }

    /// Runs `sql` with the simple query protocol and returns the rows of the last result set
    /// as text. Several statements separated by `;` are allowed; the first error is returned
    /// once the server is ready again (the connection stays usable). COPY is not supported
    /// here (see [`Connection::start_copy_both`]).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleRow>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf).map_err(encode_error)?;
        self.flush().await?;
        let mut columns: Arc<[String]> = Arc::from(Vec::new());
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let message = self.reader.next().await?;
            match message.tag {
                b'T' => {
                    columns = parse_row_description(&message.body)?.into();
                    rows.clear();
                }
                b'D' => {
                    let values = parse_data_row(&message.body)?;
                    rows.push(SimpleRow {
                        columns: columns.clone(),
                        values,
                    });
                }
                b'C' | b'I' => {}
                b'E' => {
                    let db = DbError::parse(&message.body)?;
                    error.get_or_insert(ReplicationError::Server {
                        context: format!("the {} command failed", command_word(sql)),
                        error: Box::new(db),
                    });
                }
                b'N' => log_notice(&message.body),
                b'S' => self.parameter_status(&message.body)?,
                b'Z' => break,
                b'G' | b'H' | b'W' => {
                    return Err(ReplicationError::Protocol(format!(
                        "the {} command started a copy, which simple_query does not support \
                         (the connection is no longer usable)",
                        command_word(sql)
                    )));
                }
                other => return Err(unexpected(other, "in a simple query")),
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(rows),
        }
    }

    /// Sends `sql` (e.g. `START_REPLICATION ...`), waits for CopyBothResponse and splits the
    /// connection into its two directions, so that a writer task can send standby status
    /// updates while the reader waits for data.
    pub async fn start_copy_both(
        mut self,
        sql: &str,
    ) -> Result<(CopyReader, CopyWriter), ReplicationError> {
        frontend::query(sql, &mut self.write_buf).map_err(encode_error)?;
        self.flush().await?;
        let mut error = None;
        loop {
            let message = self.reader.next().await?;
            match message.tag {
                b'W' => break,
                b'E' => {
                    let db = DbError::parse(&message.body)?;
                    error.get_or_insert(ReplicationError::Server {
                        context: format!("the {} command failed", command_word(sql)),
                        error: Box::new(db),
                    });
                }
                b'Z' => {
                    return Err(error.unwrap_or_else(|| {
                        ReplicationError::Protocol(format!(
                            "the {} command finished without starting copy-both mode",
                            command_word(sql)
                        ))
                    }));
                }
                b'N' => log_notice(&message.body),
                b'S' => self.parameter_status(&message.body)?,
                b'T' | b'D' | b'C' | b'I' => {}
                other => return Err(unexpected(other, "while starting copy-both mode")),
            }
        }
        tracing::debug!(command = command_word(sql), "copy-both mode started");
        let MessageReader { io, buf } = self.reader;
        let (read, write) = tokio::io::split(io);
        Ok((
            CopyReader {
                reader: MessageReader::new(read, buf),
                done: false,
                finished: false,
            },
            CopyWriter {
                io: write,
                buf: self.write_buf,
            },
        ))
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.reader.io.shutdown().await;
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        write_all(&mut self.reader.io, &mut self.write_buf).await
    }

    fn parameter_status(&mut self, body: &[u8]) -> Result<(), ReplicationError> {
        let mut fields = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            return Err(ReplicationError::Protocol(
                "malformed ParameterStatus".to_owned(),
            ));
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        tracing::trace!(user = %self.user, name = %name, value = %value, "server parameter");
        self.parameters.insert(name, value);
        Ok(())
    }
}

/// What [`CopyReader::next`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyMessage {
    /// The payload of one CopyData message (for replication: 'w' XLogData, 'k' keepalive).
    Data(Bytes),
    /// The server ended the copy (CopyDone, or CommandComplete/ReadyForQuery after it).
    Done,
}

/// The receiving half of a connection in copy-both mode.
#[derive(Debug)]
pub struct CopyReader {
    reader: MessageReader<ReadHalf<Transport>>,
    /// The server has sent CopyDone.
    done: bool,
    /// The server has sent ReadyForQuery: nothing more will come.
    finished: bool,
}

impl CopyReader {
    /// The next CopyData payload, or [`CopyMessage::Done`] once the server has ended the copy.
    /// Notices are logged and skipped, ParameterStatus is skipped, an ErrorResponse is
    /// returned as [`ReplicationError::Server`]. So is a WARNING of SQLSTATE 55000 (object
    /// not in prerequisite state): PostgreSQL 18's pgoutput sends it ("skipped loading
    /// publication") when a publication it reads does not exist at a point of the WAL, and
    /// goes on streaming without that publication's changes, where older versions end the
    /// stream with an error. Streaming on would skip those changes silently.
    ///
    /// After the first `Done` the caller normally stops; further calls skip what follows
    /// (CommandComplete, ReadyForQuery) returning `Done` again, and once ReadyForQuery has
    /// come they return `Done` at once without reading.
    ///
    /// Cancel safe: a message is only taken out of the buffer once it is complete.
    pub async fn next(&mut self) -> Result<CopyMessage, ReplicationError> {
        if self.finished {
            return Ok(CopyMessage::Done);
        }
        loop {
            let message = self.reader.next().await?;
            match message.tag {
                b'd' if !self.done => return Ok(CopyMessage::Data(message.body)),
                // A walsender may still send a keepalive after its CopyDone: skip it.
                b'd' => tracing::trace!("copy data after copy done, skipped"),
                b'c' => {
                    self.done = true;
                    return Ok(CopyMessage::Done);
                }
                b'C' | b'Z' => {
                    self.done = true;
                    self.finished = message.tag == b'Z';
                    return Ok(CopyMessage::Done);
                }
                b'E' => {
                    return Err(ReplicationError::Server {
                        context: "the replication stream failed".to_owned(),
                        error: Box::new(DbError::parse(&message.body)?),
                    });
                }
                b'N' => match DbError::parse(&message.body) {
                    Ok(notice) if notice.severity == "WARNING" && notice.code == "55000" => {
                        return Err(ReplicationError::Server {
                            context: "the replication stream failed".to_owned(),
                            error: Box::new(notice),
                        });
                    }
                    _ => log_notice(&message.body),
                },
                b'S' => {}
                // After CopyDone a result set may follow (a timeline switch).
                b'T' | b'D' if self.done => {}
                other => return Err(unexpected(other, "in copy-both mode")),
            }
        }
    }
}

/// The sending half of a connection in copy-both mode.
pub struct CopyWriter {
    io: WriteHalf<Transport>,
    buf: BytesMut,
}

impl fmt::Debug for CopyWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyWriter").finish_non_exhaustive()
    }
}

impl CopyWriter {
    /// Sends one CopyData message with `copy_data_payload` and flushes it.
    pub async fn send(&mut self, copy_data_payload: &[u8]) -> Result<(), ReplicationError> {
        frontend::CopyData::new(copy_data_payload)
            .map_err(encode_error)?
            .write(&mut self.buf);
        write_all(&mut self.io, &mut self.buf).await
    }

    /// Sends CopyDone: the client ends its side of the copy.
    pub async fn done(&mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.buf);
        write_all(&mut self.io, &mut self.buf).await
    }
}

fn unexpected(tag: u8, when: &str) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "unexpected backend message '{}' {when}",
        tag.escape_ascii()
    ))
}

fn need_password<'a>(params: &'a ConnectParams, method: &str) -> Result<&'a str, ReplicationError> {
    params.password().ok_or_else(|| {
        ReplicationError::Auth(format!(
            "the server asks for a password ({method}) for user \"{}\", but none was given: put \
             it in the database url (postgres://{}:PASSWORD@...) or in $PGPASSWORD",
            params.user, params.user
        ))
    })
}

/// The first word of a statement, for messages (never the whole SQL: it may hold secrets).
fn command_word(sql: &str) -> String {
    let word: String = sql
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    if word.is_empty() {
        "query".to_owned()
    } else {
        word.to_ascii_uppercase()
    }
}

fn read_cstr(body: &mut Bytes) -> Result<Bytes, ReplicationError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ReplicationError::Protocol("unterminated string".to_owned()))?;
    let s = body.split_to(end);
    body.advance(1);
    Ok(s)
}

fn sasl_mechanisms(body: &Bytes) -> Result<Vec<String>, ReplicationError> {
    let mut body = body.clone();
    let mut mechanisms = Vec::new();
    loop {
        let name = read_cstr(&mut body)?;
        if name.is_empty() {
            return Ok(mechanisms);
        }
        mechanisms.push(String::from_utf8_lossy(&name).into_owned());
    }
}

fn parse_row_description(body: &Bytes) -> Result<Vec<String>, ReplicationError> {
    let mut body = body.clone();
    let truncated = || ReplicationError::Protocol("truncated RowDescription".to_owned());
    if body.len() < 2 {
        return Err(truncated());
    }
    let count = body.get_i16();
    let mut names = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let name = read_cstr(&mut body)?;
        // table oid, column number, type oid, type size, type modifier, format code
        if body.len() < 18 {
            return Err(truncated());
        }
        body.advance(18);
        names.push(String::from_utf8_lossy(&name).into_owned());
    }
    Ok(names)
}

fn parse_data_row(body: &Bytes) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut body = body.clone();
    let truncated = || ReplicationError::Protocol("truncated DataRow".to_owned());
    if body.len() < 2 {
        return Err(truncated());
    }
    let count = body.get_i16();
    let mut values = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        if body.len() < 4 {
            return Err(truncated());
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| truncated())?;
        if body.len() < len {
            return Err(truncated());
        }
        let value = body.split_to(len);
        values.push(Some(String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(values)
}

fn log_notice(body: &[u8]) {
    match DbError::parse(body) {
        Ok(notice) if notice.severity == "WARNING" => tracing::warn!(
            severity = %notice.severity,
            code = %notice.code,
            message = %notice.message,
            "server notice"
        ),
        Ok(notice) => tracing::info!(
            severity = %notice.severity,
            code = %notice.code,
            message = %notice.message,
            "server notice"
        ),
        Err(e) => tracing::warn!(error = %e, "malformed server notice"),
    }
}

fn log_negotiate_protocol_version(body: &Bytes) {
    let mut body = body.clone();
    if body.len() < 8 {
        tracing::warn!("malformed NegotiateProtocolVersion");
        return;
    }
    let minor = body.get_i32();
    let count = body.get_i32();
    let mut options = Vec::new();
    for _ in 0..count {
        match read_cstr(&mut body) {
            Ok(o) => options.push(String::from_utf8_lossy(&o).into_owned()),
            Err(_) => break,
        }
    }
    tracing::debug!(
        minor,
        ?options,
        "server supports an older protocol minor version"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&i32::try_from(body.len() + 4).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn frames_messages_split_across_reads() {
        let mut bytes = frame(b'd', b"wxyz");
        bytes.extend(frame(b'c', b""));
        bytes.extend(frame(b'd', &vec![7u8; 200_000]));
        let (mut tx, rx) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(333) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = MessageReader::new(rx, BytesMut::new());
        let m = reader.next().await.unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'd', &b"wxyz"[..]));
        let m = reader.next().await.unwrap();
        assert_eq!((m.tag, m.body.len()), (b'c', 0));
        let m = reader.next().await.unwrap();
        assert_eq!((m.tag, m.body.len()), (b'd', 200_000));
        writer.await.unwrap();
        let e = reader.next().await.unwrap_err();
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn rejects_bad_lengths_before_allocating() {
        // frame.rs checks the lengths; the reader must ask before it makes room.
        for len in [3i32, -1, i32::MAX] {
            let mut bytes = vec![b'd'];
            bytes.extend_from_slice(&len.to_be_bytes());
            let mut reader = MessageReader::new(&bytes[..], BytesMut::new());
            let e = reader.next().await.unwrap_err();
            assert!(matches!(e, ReplicationError::Protocol(_)), "{len}: {e:?}");
            assert!(reader.buf.capacity() < 1 << 20);
        }
    }

    #[test]
    fn halves_can_move_to_tasks() {
        fn send<T: Send + Unpin + 'static>() {}
        send::<Connection>();
        send::<CopyReader>();
        send::<CopyWriter>();
        send::<Transport>();
    }

    /// An AsyncRead over a byte slice that counts its reads.
    struct CountingReader<'a> {
        data: &'a [u8],
        reads: usize,
    }

    impl AsyncRead for CountingReader<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = buf.remaining().min(self.data.len());
            let (head, tail) = self.data.split_at(n);
            buf.put_slice(head);
            self.data = tail;
            self.reads += 1;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn reads_many_small_messages_in_few_reads() {
        const COUNT: usize = 100_000;
        let mut bytes = Vec::new();
        for i in 0..COUNT {
            bytes.extend(frame(b'd', &u64::try_from(i).unwrap().to_be_bytes()));
        }
        let mut reader = MessageReader::new(
            CountingReader {
                data: &bytes,
                reads: 0,
            },
            BytesMut::new(),
        );
        for i in 0..COUNT {
            let m = reader.next().await.unwrap();
            assert_eq!(m.tag, b'd');
            assert_eq!(m.body[..], u64::try_from(i).unwrap().to_be_bytes());
        }
        let reads = reader.io.reads;
        assert!(reads * 500 < COUNT, "{reads} reads for {COUNT} messages");
    }

    #[test]
    fn parses_rows() {
        let mut desc = Vec::new();
        desc.extend_from_slice(&2i16.to_be_bytes());
        for name in ["systemid", "timeline"] {
            desc.extend_from_slice(name.as_bytes());
            desc.push(0);
            desc.extend_from_slice(&[0u8; 18]);
        }
        let names = parse_row_description(&Bytes::from(desc)).unwrap();
        assert_eq!(names, ["systemid", "timeline"]);
        let mut row = Vec::new();
        row.extend_from_slice(&2i16.to_be_bytes());
        row.extend_from_slice(&3i32.to_be_bytes());
        row.extend_from_slice(b"123");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        let values = parse_data_row(&Bytes::from(row)).unwrap();
        let row = SimpleRow {
            columns: names.into(),
            values,
        };
        assert_eq!(row.get("systemid"), Some("123"));
        assert_eq!(row.get("timeline"), None);
        assert_eq!(row.get("nope"), None);
        assert!(parse_data_row(&Bytes::from_static(&[0, 1, 0, 0, 0, 9, b'x'])).is_err());
    }

    #[test]
    fn command_words_never_carry_the_rest_of_the_sql() {
        assert_eq!(command_word("  alter role x password 'secret'"), "ALTER");
        assert_eq!(
            command_word("CREATE_REPLICATION_SLOT s LOGICAL pgoutput"),
            "CREATE_REPLICATION_SLOT"
        );
        assert_eq!(command_word(";"), "query");
    }
}
