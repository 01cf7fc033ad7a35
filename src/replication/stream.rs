//! The replication stream: one task that keeps a walsender session going and hands decoded
//! items downstream, and one that tells the server how far downstream has got.
//!
//! ```text
//!            ┌──────────── reader task ────────────┐   bounded    ┌────────────┐
//! walsender ─┤ CopyData ─► XLogData ─► Decoder ─────┼──► channel ─►│ downstream │
//!            │           └► keepalive ─► idle ack ─┐│              └─────┬──────┘
//!            └─────────────────────────────────────┼┘                    │ Acknowledger::ack(end_lsn)
//!            ┌──────────── status task ────────────┼─────────────────────┘
//! walsender ◄┤ standby status update: flush = acknowledged position, on a timer
//!            └─────────────────────────────────────┘
//! ```
//!
//! # Progress
//!
//! - Downstream acknowledges a commit's `end_lsn` once everything in it is durably done. The
//!   status task sends that position as the flush position, so the slot's
//!   `confirmed_flush_lsn` never passes what is not durably done, and never moves backwards.
//! - When everything handed downstream is acknowledged and no transaction is open, the
//!   position a keepalive reports (how far the walsender has read) is acknowledged too: a slot
//!   whose tables are idle then does not hold WAL that other tables or databases write.
//! - The status task runs on its own, so a slow downstream (a full channel) never stops status
//!   updates: the server does not kill the connection for `wal_sender_timeout`.
//!
//! # Reconnecting
//!
//! A transient failure (connection lost, server restart, the slot still held by a dying
//! walsender) ends the session; after a backoff a new one starts from the end of the last
//! transaction handed downstream, so nothing is skipped and, within one process, nothing
//! is handed down twice. A transaction cut off half way is announced with
//! [`Decoded::Interrupted`] and comes again in full.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::conn::{ConnectOptions, Connection, CopyMessage, CopyReader, CopyWriter};
use super::params::ConnectParams;
use super::protocol::{ServerMessage, StatusUpdate, now_unix_micros};
use super::setup::{self, SetupError, quote_ident, quote_literal};
use super::stats::StreamStats;
use super::version::ServerVersion;
use super::{Acknowledger, Lsn, ProtocolError, ReplicationError};
use crate::backoff::Backoff;
use crate::decode::{Decoded, Decoder, DecoderError};

/// Session settings pinned through the startup packet, so that values are decoded under
/// the settings the decoder expects whatever the server's defaults are.
pub const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// What to stream and how.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub params: ConnectParams,
    pub slot: String,
    pub publication: String,
    /// Create a temporary slot for each session (dropped by the server when the session
    /// ends) instead of using a permanent one. Changes made between two sessions are not seen.
    pub temporary_slot: bool,
    /// The longest time between two status updates; it is kept under a third of the server's
    /// `wal_sender_timeout`.
    pub status_interval: Duration,
    /// The wait before each new session after a transient failure (500 ms, doubling, at
    /// most 30 s, unless set); it starts again from `initial` once a session has lasted a
    /// minute.
    pub reconnect: Backoff,
    /// How many decoded items may wait in the channel before the reader waits.
    pub capacity: usize,
    /// On shutdown, how long to wait for downstream to finish before the last status update.
    pub drain_timeout: Duration,
    /// Whether a session is streaming, and how often it reconnected (for `/metrics`).
    pub stats: Arc<StreamStats>,
    /// The schema whose tables' events carry an unqualified entity name (see
    /// [`crate::event::EntityName`]).
    pub default_schema: String,
    /// With `temporary_slot`: a replication connection on which the slot was made already
    /// (by [`ExportedSnapshot::with_slot`](super::ExportedSnapshot::with_slot), whose
    /// snapshot was read first), taken by the first session.
    pub prepared: Arc<std::sync::Mutex<Option<Connection>>>,
}

impl StreamConfig {
    pub fn new(params: ConnectParams, slot: &str, publication: &str) -> Self {
        StreamConfig {
            params,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            temporary_slot: false,
            status_interval: Duration::from_secs(10),
            reconnect: Backoff::new(Duration::from_millis(500), 2.0, Duration::from_secs(30)),
            capacity: 4096,
            drain_timeout: Duration::from_secs(30),
            stats: Arc::default(),
            default_schema: crate::event::DEFAULT_SCHEMA.to_owned(),
            prepared: Arc::default(),
        }
    }
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Connection(#[from] ReplicationError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Decode(#[from] DecoderError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the server ended the replication stream")]
    ServerEnded,
    /// The session of a temporary slot ended: the slot went with it, and a new one would
    /// start from the server's current position, past changes never delivered.
    #[error(
        "the replication connection was lost ({reason}) and its temporary slot with it: changes \
         committed after {delivered} could be missed, so streaming stops here. Use a permanent \
         slot (tail --slot NAME, made by `streamex setup` or pg_create_logical_replication_slot) \
         to resume across lost connections"
    )]
    TemporarySlotLost {
        /// Why the session ended.
        reason: String,
        /// The end of the last commit delivered.
        delivered: Lsn,
    },
    /// A new session reached a server with another history than the first session of this
    /// stream (another timeline or system: a standby was promoted, a backup restored). What
    /// downstream did on the old one may be missing there, so the stream ends before telling
    /// the new server anything: start again from its slot and its stored checkpoints.
    #[error(
        "the server changed under the stream (system {from}, now {to}): a failover, most \
         likely; the stream ends here (`streamex run` starts again from the new primary's slot \
         and checkpoints; start `tail` again)"
    )]
    ServerChanged {
        /// The first session's system identifier and timeline.
        from: ServerIdentity,
        /// The new session's.
        to: ServerIdentity,
    },
}

/// Which server history a replication session is on (`IDENTIFY_SYSTEM`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    /// The cluster's system identifier (kept by physical standbys).
    pub system: String,
    /// The timeline: a promoted standby starts a new one.
    pub timeline: u32,
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} timeline {}", self.system, self.timeline)
    }
}

impl StreamError {
    /// Whether a new session may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Connection(e) => e.is_transient(),
            StreamError::Setup(e) => e.is_transient(),
            StreamError::Decode(e) => e.is_transient(),
            StreamError::Protocol(_)
            | StreamError::ServerChanged { .. }
            | StreamError::TemporarySlotLost { .. } => false,
            StreamError::ServerEnded => true,
        }
    }
}

/// A running replication stream.
#[derive(Debug)]
pub struct ReplicationStream {
    /// Decoded items, in WAL order. Drop it when everything you will acknowledge is
    /// acknowledged: on shutdown the stream waits for that before its last status update.
    pub items: mpsc::Receiver<Decoded>,
    /// Where to acknowledge what is durably done.
    pub ack: Acknowledger,
    /// The stream task: `Ok` after shutdown, `Err` on a definite failure.
    pub task: JoinHandle<Result<(), StreamError>>,
}

/// Starts streaming. `catalog` is a pool on the same database (column types are looked up
/// through it). Stops reading when `shutdown` is cancelled.
pub fn spawn(
    config: StreamConfig,
    catalog: sqlx::PgPool,
    ack: Acknowledger,
    shutdown: CancellationToken,
) -> ReplicationStream {
    let (tx, items) = mpsc::channel(config.capacity.max(1));
    let task = tokio::spawn(run(config, catalog, ack.clone(), shutdown, tx));
    ReplicationStream { items, ack, task }
}

async fn run(
    config: StreamConfig,
    catalog: sqlx::PgPool,
    ack: Acknowledger,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Decoded>,
) -> Result<(), StreamError> {
    let mut decoder = Decoder::new(catalog.clone()).default_schema(&config.default_schema);
    let mut delivered = Lsn::ZERO;
    let mut identity = None;
    let mut slot_made = false;
    // What the standby gate released: kept across sessions, since an acknowledgement not yet
    // released by one session's gate must not go out unchecked in the next one.
    let released = Arc::new(AtomicU64::new(ack.acknowledged().0));
    let mut backoff = config.reconnect.clone();
    let mut reconnects: u64 = 0;
    loop {
        let started = Instant::now();
        let mut session = Session {
            config: &config,
            catalog: &catalog,
            ack: &ack,
            shutdown: &shutdown,
            tx: &tx,
            decoder: &mut decoder,
            delivered: &mut delivered,
            identity: &mut identity,
            released: &released,
            slot_made: &mut slot_made,
        };
        let result = session.run().await;
        config.stats.ended();
        if decoder.reset() && !tx.is_closed() {
            let _ = tx.send(Decoded::Interrupted).await;
        }
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if !error.is_transient() {
            return Err(explain(&catalog, &config, error).await);
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if slot_made {
            return Err(StreamError::TemporarySlotLost {
                reason: error.to_string(),
                delivered,
            });
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let wait = backoff.next().unwrap_or(backoff.max);
        reconnects += 1;
        config.stats.reconnecting();
        warn!(
            slot = %config.slot,
            error = %error,
            retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            reconnects,
            "replication session ended; reconnecting"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Turns a definite server error about a missing or unusable object into the setup error
/// that names it, by asking the catalog (SQLSTATE 42704 does not say which object).
async fn explain(catalog: &sqlx::PgPool, config: &StreamConfig, error: StreamError) -> StreamError {
    let code = match &error {
        StreamError::Connection(e) => e.sqlstate(),
        _ => None,
    };
    if matches!(code, Some("42704" | "55000")) {
        if let Some(explained) =
            setup::explain_missing(catalog, &config.slot, &config.publication).await
        {
            return explained.into();
        }
    }
    error
}

struct Session<'a> {
    config: &'a StreamConfig,
    catalog: &'a sqlx::PgPool,
    ack: &'a Acknowledger,
    shutdown: &'a CancellationToken,
    tx: &'a mpsc::Sender<Decoded>,
    decoder: &'a mut Decoder,
    /// The end of the last commit handed downstream.
    delivered: &'a mut Lsn,
    /// The server history of the stream's first session.
    identity: &'a mut Option<ServerIdentity>,
    /// What the standby gate released ([`StandbyGate`]).
    released: &'a Arc<AtomicU64>,
    /// Whether a temporary slot was made (it goes when its session ends).
    slot_made: &'a mut bool,
}

/// How a session's read loop ended without an error.
enum Ended {
    Shutdown,
    DownstreamGone,
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), StreamError> {
        let config = self.config;
        let mut gate = None;
        if !config.temporary_slot {
            match setup::slot_info(self.catalog, &config.slot).await? {
                Some(slot) => {
                    setup::check_slot(self.catalog, &slot).await?;
                    if slot.failover == Some(true) && standby_slots(self.catalog).await {
                        gate = Some(self.catalog.clone());
                    }
                    if let Some(confirmed) = slot.confirmed_flush_lsn {
                        // Never report less than the slot already has.
                        self.ack.ack(confirmed);
                    }
                }
                None => {
                    return Err(setup::explain_missing(
                        self.catalog,
                        &config.slot,
                        &config.publication,
                    )
                    .await
                    .map_or(StreamError::ServerEnded, StreamError::from));
                }
            }
        }
        let settings = SESSION_SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let prepared = match config.temporary_slot {
            true => config.prepared.lock().map_or(None, |mut p| p.take()),
            false => None,
        };
        let made = prepared.is_some();
        let mut conn = match prepared {
            Some(conn) => conn,
            None => {
                Connection::connect(
                    &config.params,
                    &ConnectOptions {
                        replication: true,
                        settings,
                    },
                )
                .await?
            }
        };
        let version = server_version(&mut conn).await?;
        let now = identify(&mut conn).await?;
        match self.identity {
            Some(first) if *first != now => {
                conn.close().await;
                return Err(StreamError::ServerChanged {
                    from: first.clone(),
                    to: now,
                });
            }
            Some(_) => {}
            None => *self.identity = Some(now),
        }
        if config.temporary_slot && !made {
            conn.simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(&config.slot)
            ))
            .await?;
        }
        *self.slot_made |= config.temporary_slot;
        let interval = status_interval(&mut conn, config.status_interval).await?;
        let start = (*self.delivered).max(self.ack.acknowledged());
        let command = start_replication_command(&config.slot, &config.publication, start, version);
        let (mut reader, writer) = conn.start_copy_both(&command).await?;
        info!(
            slot = %config.slot,
            publication = %config.publication,
            start = %start,
            "streaming started"
        );
        config.stats.streaming();

        let received = Arc::new(AtomicU64::new(start.0));
        let (reply_tx, reply_rx) = mpsc::channel(1);
        let finish = CancellationToken::new();
        let status = tokio::spawn(status_task(
            writer,
            self.ack.clone(),
            received.clone(),
            interval,
            reply_rx,
            finish.clone(),
            gate.map(|catalog| StandbyGate {
                catalog,
                released: self.released.clone(),
                pending: None,
            }),
        ));

        let result = self.read(&mut reader, &received, &reply_tx).await;
        match result {
            Ok(ended) => {
                if let Ended::Shutdown = ended {
                    // Let downstream finish and acknowledge what it holds.
                    let _ = tokio::time::timeout(config.drain_timeout, self.tx.closed()).await;
                }
                finish.cancel();
                let _ = status.await;
                // Read until the server confirms the end of the stream.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(CopyMessage::Data(_)) = reader.next().await {}
                })
                .await;
                info!(slot = %config.slot, acknowledged = %self.ack.acknowledged(), "streaming stopped");
                Ok(())
            }
            Err(e) => {
                status.abort();
                Err(e)
            }
        }
    }

    async fn read(
        &mut self,
        reader: &mut CopyReader,
        received: &AtomicU64,
        reply_tx: &mpsc::Sender<()>,
    ) -> Result<Ended, StreamError> {
        let mut out = Vec::new();
        loop {
            let message = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(Ended::Shutdown),
                message = reader.next() => message?,
            };
            let data = match message {
                CopyMessage::Data(data) => data,
                CopyMessage::Done => return Err(StreamError::ServerEnded),
            };
            match ServerMessage::parse(data)? {
                ServerMessage::XLogData {
                    wal_start,
                    clock,
                    data,
                    ..
                } => {
                    self.config.stats.server_clock(clock);
                    self.decoder.decode(wal_start, data, &mut out).await?;
                    for item in out.drain(..) {
                        let end = match &item {
                            Decoded::Commit { end_lsn, .. } => Some(*end_lsn),
                            _ => None,
                        };
                        if self.shutdown.is_cancelled() {
                            return Ok(Ended::Shutdown);
                        }
                        // Without a wait when there is room (the usual case, and far cheaper);
                        // the wait, watching shutdown, when the consumer is behind.
                        match self.tx.try_send(item) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                return Ok(Ended::DownstreamGone);
                            }
                            Err(mpsc::error::TrySendError::Full(item)) => tokio::select! {
                                biased;
                                sent = self.tx.send(item) => if sent.is_err() {
                                    return Ok(Ended::DownstreamGone);
                                },
                                _ = self.shutdown.cancelled() => return Ok(Ended::Shutdown),
                            },
                        }
                        if let Some(end) = end {
                            *self.delivered = end;
                        }
                    }
                    received.fetch_max(wal_start.0, Ordering::Relaxed);
                }
                ServerMessage::Keepalive {
                    wal_end,
                    clock,
                    reply_requested,
                } => {
                    self.config.stats.server_clock(clock);
                    received.fetch_max(wal_end.0, Ordering::Relaxed);
                    if !self.decoder.in_transaction() && self.ack.acknowledged() >= *self.delivered
                    {
                        self.ack.ack(wal_end);
                    }
                    if reply_requested {
                        let _ = reply_tx.try_send(());
                    }
                }
            }
        }
    }
}

/// The session's system identifier and timeline.
async fn identify(conn: &mut Connection) -> Result<ServerIdentity, StreamError> {
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows.first();
    let system = row.and_then(|r| r.get("systemid")).unwrap_or_default();
    let timeline = row
        .and_then(|r| r.get("timeline"))
        .and_then(|t| t.parse().ok());
    match timeline {
        Some(timeline) if !system.is_empty() => Ok(ServerIdentity {
            system: system.to_owned(),
            timeline,
        }),
        _ => Err(ReplicationError::Protocol(
            "IDENTIFY_SYSTEM returned no system identifier and timeline".to_owned(),
        )
        .into()),
    }
}

/// The server's version, from what it reported at startup (else `SHOW server_version_num`);
/// an unsupported one is a definite [`SetupError::UnsupportedVersion`].
async fn server_version(conn: &mut Connection) -> Result<ServerVersion, StreamError> {
    let version = match conn.server_version() {
        Some(version) => version,
        None => {
            let rows = conn.simple_query("SHOW server_version_num").await?;
            let text = rows.first().and_then(|row| row.get_index(0)).unwrap_or("");
            ServerVersion::parse_num(text).ok_or_else(|| {
                ReplicationError::Protocol(format!(
                    "the server reported no usable version: server_version_num is {text:?}"
                ))
            })?
        }
    };
    Ok(setup::supported(version)?)
}

/// `START_REPLICATION` of `slot` from `start`, reading `publication`, with the pgoutput
/// options the server's version takes.
fn start_replication_command(
    slot: &str,
    publication: &str,
    start: Lsn,
    version: ServerVersion,
) -> String {
    let mut options: Vec<String> = version
        .pgoutput_options()
        .into_iter()
        .map(|(name, value)| format!("{name} {}", quote_literal(value)))
        .collect();
    options.push(format!(
        "publication_names {}",
        quote_literal(&quote_ident(publication))
    ));
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} ({})",
        quote_ident(slot),
        options.join(", ")
    )
}

/// The interval between status updates: the configured one, but at most a third of the
/// server's `wal_sender_timeout` (0 means no timeout).
async fn status_interval(
    conn: &mut Connection,
    configured: Duration,
) -> Result<Duration, ReplicationError> {
    let rows = conn.simple_query("SHOW wal_sender_timeout").await?;
    let timeout = rows
        .first()
        .and_then(|row| row.get_index(0))
        .and_then(crate::config::parse_duration);
    Ok(match timeout {
        Some(t) if !t.is_zero() => configured.min(t / 3).max(Duration::from_millis(100)),
        _ => configured,
    })
}

/// Whether `synchronized_standby_slots` names standbys on this server (PostgreSQL 17+): then
/// the server sends streamex no WAL that those standbys have not flushed, which is what the
/// acknowledgement's [`StandbyGate`] relies on.
async fn standby_slots(catalog: &sqlx::PgPool) -> bool {
    let setting: Result<Option<String>, _> =
        sqlx::query_scalar("SELECT current_setting('synchronized_standby_slots', true)")
            .fetch_one(catalog)
            .await;
    setting.is_ok_and(|s| s.is_some_and(|s| !s.trim().is_empty()))
}

/// Holds the confirmed position back until what made it durable is on the standbys.
///
/// Acknowledging position X says that every change before X is durably processed: the
/// operators' writes and checkpoints are committed on the primary. After a failover the
/// promoted standby's copy of the slot may be at X while those commits, later in the WAL
/// than X, never reached it: the new primary would then have neither the derived rows nor
/// the checkpoints, and the slot would never send those changes again. So with a failover
/// slot and `synchronized_standby_slots` set, X is sent only once the stream itself has
/// passed a WAL position taken after X was acknowledged (`pg_current_wal_insert_lsn()`,
/// which is past every commit that made X durable): the server sends nothing the listed
/// standbys have not flushed, so by then they hold those commits. Until then the last
/// released position is sent, with a request for the server's reply (a keepalive carrying
/// how far it has sent, even when nothing is published).
struct StandbyGate {
    catalog: sqlx::PgPool,
    /// What may be sent (shared by the stream's sessions).
    released: Arc<AtomicU64>,
    /// An acknowledged position and the WAL position the stream must pass to release it.
    pending: Option<(Lsn, Lsn)>,
}

impl StandbyGate {
    /// The position to report now, and whether to ask the server for a reply.
    async fn flushed(&mut self, acknowledged: Lsn, received: Lsn) -> (Lsn, bool) {
        if let Some((position, passed)) = self.pending {
            if received >= passed {
                self.release(position);
                self.pending = None;
            }
        }
        if self.pending.is_none() && acknowledged > self.released() {
            let insert = tokio::time::timeout(
                Duration::from_secs(5),
                sqlx::query_scalar::<_, String>("SELECT pg_current_wal_insert_lsn()::text")
                    .fetch_one(&self.catalog),
            )
            .await;
            match insert {
                Ok(Ok(text)) => match text.parse::<Lsn>() {
                    Ok(passed) if received >= passed => self.release(acknowledged),
                    Ok(passed) => self.pending = Some((acknowledged, passed)),
                    Err(_) => {}
                },
                // The primary does not answer: release nothing, try again next time.
                Ok(Err(error)) => debug!(error = %error, "reading the WAL insert position failed"),
                Err(_) => debug!("reading the WAL insert position timed out"),
            }
        }
        (self.released(), self.pending.is_some())
    }

    fn released(&self) -> Lsn {
        Lsn(self.released.load(Ordering::Acquire))
    }

    fn release(&self, position: Lsn) {
        self.released.fetch_max(position.0, Ordering::AcqRel);
    }
}

/// Sends standby status updates: at once when the server asks, when the acknowledged
/// position moved (at most once a second), and at least every `interval`. On `finish`, sends
/// a last one and ends the copy. With `gate` (a failover slot whose standbys are listed in
/// `synchronized_standby_slots`), the position sent waits for the standbys ([`StandbyGate`]).
async fn status_task(
    mut writer: CopyWriter,
    ack: Acknowledger,
    received: Arc<AtomicU64>,
    interval: Duration,
    mut replies: mpsc::Receiver<()>,
    finish: CancellationToken,
    gate: Option<StandbyGate>,
) {
    let update = |flushed: Lsn, reply_requested: bool| {
        let written = Lsn(received.load(Ordering::Relaxed)).max(flushed);
        StatusUpdate {
            written,
            flushed,
            applied: flushed,
            now_unix_micros: now_unix_micros(),
            reply_requested,
        }
        .encode()
    };
    let mut gate = gate;
    let flushed = async |gate: &mut Option<StandbyGate>| match gate {
        Some(gate) => {
            let received = Lsn(received.load(Ordering::Relaxed));
            gate.flushed(ack.acknowledged(), received).await
        }
        None => (ack.acknowledged(), false),
    };
    let mut sent_flush = Lsn::ZERO;
    let mut sent_at = Instant::now();
    let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tokio::select! {
            _ = finish.cancelled() => {
                let (position, _) = flushed(&mut gate).await;
                let result = async {
                    writer.send(&update(position, false)).await?;
                    writer.done().await
                }.await;
                if let Err(error) = result {
                    debug!(error = %error, "could not send the last status update");
                }
                return;
            }
            reply = replies.recv() => match reply {
                Some(()) => true,
                None => return,
            },
            _ = tick.tick() => {
                ack.acknowledged() != sent_flush
                    || sent_at.elapsed() >= interval
                    || gate.as_ref().is_some_and(|g| g.pending.is_some())
            }
        };
        if due {
            let (position, ask) = flushed(&mut gate).await;
            if let Err(error) = writer.send(&update(position, ask)).await {
                debug!(error = %error, "status update failed; the reader will see the connection end");
                return;
            }
            sent_flush = ack.acknowledged();
            sent_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_replication_takes_the_options_of_the_servers_version() {
        let start = Lsn(0x16_B374_D848);
        assert_eq!(
            start_replication_command("s", "p", start, ServerVersion::from_num(130_023)),
            "START_REPLICATION SLOT \"s\" LOGICAL 16/B374D848 \
             (proto_version '1', publication_names '\"p\"')"
        );
        assert_eq!(
            start_replication_command("My slot", "it's", start, ServerVersion::from_num(170_010)),
            "START_REPLICATION SLOT \"My slot\" LOGICAL 16/B374D848 \
             (proto_version '1', messages 'true', publication_names '\"it''s\"')"
        );
    }
}
