//! NATS JetStream: every event published to a stream, each exactly once, in WAL order.
//!
//! ```text
//!  dispatcher ──► publisher inbox (bounded) ──► publisher: JSON ─► publish (≤ max_in_flight awaiting PubAck)
//!                                                  PubAcks, in order ─► done through commit E ─► Board ─► ack
//! ```
//!
//! # Exactly once
//!
//! Each publication carries `Nats-Msg-Id` = the event's position and
//! `Nats-Expected-Last-Sequence` = the stream sequence of the publication before it, so the
//! stream only ever holds a prefix of streamex's sequence of events: JetStream refuses a
//! publication that does not follow the one before it, and with it every later one in flight.
//! After a crash, a lost connection or a refused publication, the publisher reads the stream's
//! last message, whose `Nats-Msg-Id` says which event it was, and goes on after it: what the
//! stream has is never sent again, whatever the duplicate window, and what it does not have
//! is sent again, in order. The duplicate window still drops what `Nats-Msg-Id` catches, should
//! the last message be gone (`max_age`, a deleted message). The slot is acknowledged through a
//! commit only once JetStream has acknowledged every event up to it.
//!
//! # Subjects
//!
//! A table's events go to `<subject_prefix>.<schema>.<table>`, outbox messages
//! ([`crate::event::EventType::Message`]) to `<subject_prefix>.messages.<message prefix>`.
//! A name's characters other than ASCII letters, digits, `_` and `-` are written `%XX` (UTF-8
//! bytes in hex), so that a dot or a space in a name never splits or breaks a subject.
//!
//! With `nats.partitions` N above 1, a table's subject ends with one more token, the row's
//! partition `<p>` in `0..N` ([`partition`] of its `Streamex-Key` header), so that consumers
//! may share a table by partition and still get each row's events in order: a consumer
//! filtering on `<subject_prefix>.*.*.<p>` gets partition `p` of every table. An update that
//! changes a row's key goes to the new key's partition.

mod publisher;

use std::time::Duration;

use async_nats::jetstream::{self, stream};

pub(crate) use publisher::Publisher;
pub use publisher::PublisherStats;

use crate::config::{NatsConfig, NatsStorage};
use crate::event::{Event, EventType};
use crate::lsn::Position;

/// The header that holds the event's type (`insert`, ..., `message`).
pub const TYPE_HEADER: &str = "Streamex-Type";
/// The header that holds the event's entity (or the message's prefix).
pub const ENTITY_HEADER: &str = "Streamex-Entity";
/// The header that holds the commit LSN of the event's transaction (the first half of its
/// position).
pub const COMMIT_HEADER: &str = "Streamex-Commit-Lsn";

/// The header that holds the row's key: its key columns' values (the replica identity's) as
/// in the `<entity>/<id>` pub/sub channel, joined by `,` (`%`, `/`, `,`, and line breaks
/// written `%XX`). Absent for a truncate, an outbox message, and a table without a key.
pub const KEY_HEADER: &str = "Streamex-Key";

/// On an update that changes the row's key (its key columns' values), the key before it,
/// written as [`KEY_HEADER`] is; absent otherwise. A row's events before such an update are
/// under the old key (and partition), the update and those after it under the new one.
pub const OLD_KEY_HEADER: &str = "Streamex-Old-Key";

/// The header that names where the event comes from: `<database>/<slot>`. The stream's
/// last message must come from the same place, or its position means nothing here.
pub const SOURCE_HEADER: &str = "Streamex-Source";

/// What went wrong between streamex and JetStream. Each message names the server or the
/// stream, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    /// The server could not be reached or refused the connection.
    #[error("connecting to NATS at {url} (nats.url): {message}")]
    Connect { url: String, message: String },
    /// A file named in `[nats]` could not be used.
    #[error("{key}: {message}")]
    File { key: &'static str, message: String },
    /// JetStream did not answer, or answered with an error that may pass.
    #[error("JetStream stream {stream:?}: {message}")]
    Unavailable { stream: String, message: String },
    /// The stream does not exist.
    #[error(
        "JetStream stream {stream:?} does not exist: run `streamex setup` (or start `streamex \
         run`, which sets up first) to create it, with nats.* as configured"
    )]
    StreamMissing { stream: String },
    /// The stream exists with settings that differ from `[nats]`.
    #[error(
        "JetStream stream {stream:?} exists with other settings than [nats] asks for: {}; \
         change [nats] to match, or change the stream (`nats stream edit {stream}`), or give \
         nats.stream another name",
        differences.join("; ")
    )]
    Conflict {
        stream: String,
        differences: Vec<String>,
    },
    /// The stream's last message was published from another database or slot.
    #[error(
        "JetStream stream {stream:?}: its last message (sequence {sequence}) holds events of \
         {theirs}, not of {ours} (database/slot): its positions mean nothing for this slot, so \
         streamex does not go on after them; give nats.stream a stream of its own for each \
         database and slot"
    )]
    OtherSource {
        stream: String,
        sequence: u64,
        theirs: String,
        ours: String,
    },
    /// The stream's last message is not one streamex published.
    #[error(
        "JetStream stream {stream:?}: its last message (sequence {sequence}, subject \
         {subject}) was not published by streamex (no Nats-Msg-Id holding an event position): \
         the stream must be streamex's alone; give nats.stream a stream of its own"
    )]
    Foreign {
        stream: String,
        sequence: u64,
        subject: String,
    },
}

impl JetStreamError {
    /// Whether trying again may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            JetStreamError::Connect { .. } | JetStreamError::Unavailable { .. }
        )
    }
}

/// Connects to `config.url`. The client reconnects by itself from then on; requests made
/// while it is disconnected time out (after `nats.timeout`).
pub(crate) async fn connect(config: &NatsConfig) -> Result<async_nats::Client, JetStreamError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("streamex")
        .connection_timeout(config.timeout)
        .request_timeout(Some(config.timeout))
        .max_reconnects(None)
        .retry_on_initial_connect();
    if let Some(path) = &config.credentials {
        let text = std::fs::read_to_string(path).map_err(|e| JetStreamError::File {
            key: "nats.credentials",
            message: format!("reading {}: {e}", path.display()),
        })?;
        options = options
            .credentials(&text)
            .map_err(|e| JetStreamError::File {
                key: "nats.credentials",
                message: format!("{} is not a NATS credentials file: {e}", path.display()),
            })?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let servers: Vec<async_nats::ServerAddr> = config
        .url
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| JetStreamError::Connect {
            url: config.url.clone(),
            message: format!("not a NATS server address: {e}"),
        })?;
    options
        .connect(servers.as_slice())
        .await
        .map_err(|e| JetStreamError::Connect {
            url: config.url.clone(),
            message: e.to_string(),
        })
}

/// The JetStream context streamex publishes with: `nats.timeout` for every answer, room for
/// `nats.max_in_flight` publications awaiting theirs.
pub(crate) fn context(client: async_nats::Client, config: &NatsConfig) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .timeout(config.timeout)
        .ack_timeout(config.timeout)
        .max_ack_inflight(config.max_in_flight.saturating_mul(2).max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// The stream `[nats]` describes.
pub(crate) fn stream_config(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: match config.storage {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        max_age: config.max_age,
        max_bytes: config.max_bytes.unwrap_or(-1),
        max_messages: -1,
        max_messages_per_subject: -1,
        max_consumers: -1,
        discard: stream::DiscardPolicy::Old,
        description: Some("change events published by streamex".to_owned()),
        ..Default::default()
    }
}

/// Creates the stream when it is missing; refuses one whose settings differ from `[nats]`.
/// Returns whether it created it.
pub(crate) async fn ensure_stream(
    context: &jetstream::Context,
    config: &NatsConfig,
) -> Result<bool, JetStreamError> {
    let wanted = stream_config(config);
    match context.get_stream(&config.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| unavailable(&config.stream, e))?;
            let differences = differences(&wanted, &info.config);
            if differences.is_empty() {
                Ok(false)
            } else {
                Err(JetStreamError::Conflict {
                    stream: config.stream.clone(),
                    differences,
                })
            }
        }
        Err(e) if is_stream_missing(&e) => {
            context
                .create_stream(wanted)
                .await
                .map_err(|e| JetStreamError::Unavailable {
                    stream: config.stream.clone(),
                    message: format!("creating it: {e}"),
                })?;
            Ok(true)
        }
        Err(e) => Err(unavailable(&config.stream, e)),
    }
}

pub(crate) fn is_stream_missing(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

pub(crate) fn unavailable(stream: &str, error: impl std::fmt::Display) -> JetStreamError {
    JetStreamError::Unavailable {
        stream: stream.to_owned(),
        message: error.to_string(),
    }
}

/// The settings of `have` that are not what `want` asks for, each as "nats.key = want, the
/// stream has have".
fn differences(want: &stream::Config, have: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |key: &str, want: String, have: String| {
        if want != have {
            out.push(format!("nats.{key} asks for {want}, the stream has {have}"));
        }
    };
    let subject = want.subjects.first().cloned().unwrap_or_default();
    if !have.subjects.contains(&subject) {
        differ(
            "subject_prefix",
            format!("subjects [{subject}]"),
            format!("[{}]", have.subjects.join(", ")),
        );
    }
    differ(
        "retention",
        "limits".into(),
        format!("{:?}", have.retention).to_lowercase(),
    );
    differ(
        "storage",
        format!("{:?}", want.storage).to_lowercase(),
        format!("{:?}", have.storage).to_lowercase(),
    );
    differ(
        "replicas",
        want.num_replicas.to_string(),
        have.num_replicas.to_string(),
    );
    differ(
        "duplicate_window",
        format!("{:?}", want.duplicate_window),
        format!("{:?}", have.duplicate_window),
    );
    differ(
        "max_age",
        format!("{:?}", want.max_age),
        format!("{:?}", have.max_age),
    );
    differ(
        "max_bytes",
        want.max_bytes.to_string(),
        have.max_bytes.to_string(),
    );
    out
}

/// Where the stream ends: its last sequence, and the position of the event its last message
/// holds (none when the stream is empty, or its last message is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tip {
    pub sequence: u64,
    pub position: Option<Position>,
}

/// The stream `name`; [`JetStreamError::StreamMissing`] when it does not exist.
pub(crate) async fn open(
    context: &jetstream::Context,
    name: &str,
) -> Result<stream::Stream, JetStreamError> {
    match context.get_stream(name).await {
        Ok(stream) => Ok(stream),
        Err(e) if is_stream_missing(&e) => Err(JetStreamError::StreamMissing {
            stream: name.to_owned(),
        }),
        Err(e) => Err(unavailable(name, e)),
    }
}

/// Reads the stream's [`Tip`]; `source` is this publisher's `<database>/<slot>`, which the
/// last message must hold (when it says).
pub(crate) async fn tip(
    context: &jetstream::Context,
    name: &str,
    source: Option<&str>,
) -> Result<Tip, JetStreamError> {
    Ok(state_and_tip(context, name, source).await?.1)
}

/// The stream's state (messages, bytes, sequences, consumers) and its [`Tip`], from one read
/// of the stream's info; `source` as for [`tip`].
pub(crate) async fn state_and_tip(
    context: &jetstream::Context,
    name: &str,
    source: Option<&str>,
) -> Result<(stream::State, Tip), JetStreamError> {
    let mut stream = open(context, name).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| unavailable(name, e))?
        .state
        .clone();
    let tip = last_message(&stream, name, state.last_sequence, source).await?;
    Ok((state, tip))
}

/// A consumer of the stream, as `streamex status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ConsumerState {
    pub name: String,
    /// What made it (a worker's says which operator of which slot).
    pub description: Option<String>,
    /// Every message up to this stream sequence is acknowledged.
    pub ack_floor: u64,
    /// Messages delivered and not yet acknowledged.
    pub ack_pending: usize,
    /// Messages of its filter not yet delivered.
    pub pending: u64,
}

/// The consumers of the stream `name`, by name.
pub(crate) async fn consumer_states(
    context: &jetstream::Context,
    name: &str,
) -> Result<Vec<ConsumerState>, JetStreamError> {
    use futures_util::TryStreamExt as _;
    let stream = open(context, name).await?;
    let mut listing = stream.consumers();
    let mut found = Vec::new();
    while let Some(info) = listing
        .try_next()
        .await
        .map_err(|e| unavailable(name, format!("listing the consumers: {e}")))?
    {
        found.push(ConsumerState {
            name: info.name.clone(),
            description: info.config.description.clone(),
            ack_floor: info.ack_floor.stream_sequence,
            ack_pending: info.num_ack_pending,
            pending: info.num_pending,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The [`Tip`] of `stream`, whose last sequence is `sequence`.
async fn last_message(
    stream: &stream::Stream,
    name: &str,
    sequence: u64,
    source: Option<&str>,
) -> Result<Tip, JetStreamError> {
    if sequence == 0 {
        return Ok(Tip {
            sequence,
            position: None,
        });
    }
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
            return Ok(Tip {
                sequence,
                position: None,
            });
        }
        Err(e) => return Err(unavailable(name, e)),
    };
    let theirs = message.headers.get(SOURCE_HEADER).map(|v| v.as_str());
    if let (Some(ours), Some(theirs)) = (source, theirs)
        && ours != theirs
    {
        return Err(JetStreamError::OtherSource {
            stream: name.to_owned(),
            sequence,
            theirs: theirs.to_owned(),
            ours: ours.to_owned(),
        });
    }
    let position = message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .and_then(|id| id.as_str().parse::<Position>().ok())
        .ok_or_else(|| JetStreamError::Foreign {
            stream: name.to_owned(),
            sequence,
            subject: message.subject.to_string(),
        })?;
    Ok(Tip {
        sequence,
        position: Some(position),
    })
}

/// The row key of `event`, as [`KEY_HEADER`] holds it; `None` for a truncate, an outbox
/// message, or a table without a key (or a key value that is null).
pub(crate) fn row_key(event: &Event) -> Option<String> {
    if matches!(event.kind, EventType::Truncate | EventType::Message) {
        return None;
    }
    crate::pubsub::row_id(event.record()?, &event.key_columns).map(header_safe)
}

/// For an update that changes the row's key, its key before the update, as
/// [`OLD_KEY_HEADER`] holds it; `None` for any other event (and when `new_key`, the
/// [`row_key`], is the same).
pub(crate) fn old_row_key(event: &Event, new_key: Option<&str>) -> Option<String> {
    if event.kind != EventType::Update {
        return None;
    }
    let old =
        crate::pubsub::row_id(event.old_record.as_ref()?, &event.key_columns).map(header_safe)?;
    (Some(old.as_str()) != new_key).then_some(old)
}

/// A header value cannot hold a line break: written `%0D`, `%0A`.
fn header_safe(key: String) -> String {
    if key.contains(['\r', '\n']) {
        key.replace('\r', "%0D").replace('\n', "%0A")
    } else {
        key
    }
}

/// The partition of a row whose key is `key` ([`KEY_HEADER`]) among `partitions`: FNV-1a
/// (64 bits) of the key's bytes, modulo `partitions`; 0 without a key, or with one partition.
/// The same in every build and release (and easy to compute in any language), so that a row
/// keeps its partition.
pub fn partition(key: Option<&str>, partitions: u32) -> u32 {
    match key {
        Some(key) if partitions > 1 => {
            u32::try_from(fnv1a(key.as_bytes()) % u64::from(partitions)).unwrap_or(0)
        }
        _ => 0,
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across builds and releases (a partition or a
/// consumer's name must not change when streamex is rebuilt).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The subject of `event` under `prefix` with the stream's `partitions`, its row key being
/// `key` ([`row_key`]): [`subject`], and for a table's event `.<p>` when `partitions` is above 1.
pub(crate) fn partitioned_subject(
    prefix: &str,
    event: &Event,
    key: Option<&str>,
    partitions: u32,
) -> String {
    let mut subject = subject(prefix, event);
    if partitions > 1 && event.kind != EventType::Message {
        use std::fmt::Write as _;
        let _ = write!(subject, ".{}", partition(key, partitions));
    }
    subject
}

/// The subject of `event` under `prefix`, without a partition (see the module documentation).
pub fn subject(prefix: &str, event: &Event) -> String {
    if event.kind == EventType::Message {
        messages_subject(prefix, &event.table)
    } else {
        table_subject(prefix, &event.schema, &event.table)
    }
}

/// The subject of the events of table `schema.table`: `<prefix>.<schema>.<table>`.
pub(crate) fn table_subject(prefix: &str, schema: &str, table: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + schema.len() + table.len() + 2);
    subject.push_str(prefix);
    subject.push('.');
    push_token(&mut subject, schema);
    subject.push('.');
    push_token(&mut subject, table);
    subject
}

/// The subject of the outbox messages of `message_prefix`: `<prefix>.messages.<message_prefix>`.
pub(crate) fn messages_subject(prefix: &str, message_prefix: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + message_prefix.len() + 10);
    subject.push_str(prefix);
    subject.push_str(".messages.");
    push_token(&mut subject, message_prefix);
    subject
}

/// Appends `name` as one subject token: `%XX` for each byte that is not an ASCII letter, a
/// digit, `_` or `-`; `%` alone for an empty name.
fn push_token(out: &mut String, name: &str) {
    use std::fmt::Write as _;
    if name.is_empty() {
        out.push('%');
        return;
    }
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// How long the publisher waits before trying again while JetStream is unavailable: from
/// 100 ms, doubling, to 5 s.
pub(crate) const RETRY: crate::backoff::Backoff =
    crate::backoff::Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(5));

#[cfg(test)]
mod tests;
