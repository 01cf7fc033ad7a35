//! The publisher: the engine's participant that puts every event on the JetStream stream, in
//! WAL order, and reports a commit done once JetStream has acknowledged every event up to it
//! (see the module documentation of `jetstream` for how nothing is doubled or lost).
//!
//! ```text
//!  inbox ─► Event: skip if the stream has it; else JSON ─► publish (expects sequence n) ─┐
//!        └► Commit ──────────────────────────────────────────────────────────────────────┤
//!   window (WAL order; ≤ max_in_flight publications awaiting PubAck) ◄───────────────────┘
//!   front PubAck ok ─► pop; commits now at the front ─► Board::advance
//!   a failure ─► read the stream's tip (retrying) ─► drop what it has ─► publish the rest again
//! ```
//!
//! Publications are plain NATS publishes whose reply subject is `<inbox>.<id>`, one wildcard
//! subscription taking every PubAck: no request, oneshot or timer per publication (the
//! client's request path cost more than the rest of the publisher together). A publication
//! whose PubAck does not come within `nats.timeout` is a failure like a refused one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    COMMIT_HEADER, ENTITY_HEADER, KEY_HEADER, OLD_KEY_HEADER, RETRY, SOURCE_HEADER, TYPE_HEADER,
};
use crate::config::NatsConfig;
use crate::event::Event;
use crate::lsn::{Lsn, Position};
use crate::operator::InputSource as _;
use crate::operator::{Board, Inbox, Input};

/// What the publisher has done, for `/metrics` and the logs; shared with the service.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Events JetStream has acknowledged (duplicates included).
    pub published: AtomicU64,
    /// Events skipped because the stream already had them (after a restart).
    pub skipped: AtomicU64,
    /// 1 while JetStream is unavailable and the publisher waits (nothing is acknowledged).
    pub paused: AtomicU64,
    /// Publications awaiting JetStream's acknowledgement.
    pub in_flight: AtomicU64,
}

impl PublisherStats {
    /// `(published, skipped, paused, in flight)` as of now.
    pub fn read(&self) -> (u64, u64, u64, u64) {
        (
            self.published.load(Ordering::Relaxed),
            self.skipped.load(Ordering::Relaxed),
            self.paused.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
        )
    }
}

/// The connected publisher, ready to run in each pipeline run.
pub(crate) struct Publisher {
    client: async_nats::Client,
    context: jetstream::Context,
    config: NatsConfig,
    /// `<database>/<slot>`, in every message's `Streamex-Source`.
    source: String,
    pub stats: Arc<PublisherStats>,
}

/// One event to publish, ready to be sent (again). Its headers are made at each send
/// (sending consumes them), from what is kept here.
struct Publication {
    position: Position,
    subject: String,
    kind: &'static str,
    /// The entity, with any line break escaped (a header value cannot hold one).
    entity: Arc<str>,
    /// The row's key ([`super::KEY_HEADER`]).
    key: Option<String>,
    /// Its key before an update that changed it ([`super::OLD_KEY_HEADER`]).
    old_key: Option<String>,
    payload: Bytes,
}

enum Entry {
    /// Sent as reply id `Some(id)`, its acknowledgement to come (`None`: to be sent again).
    Publication(Publication, Option<u64>),
    /// Every publication before it belongs to commits up to here.
    Commit(Lsn),
}

impl Publisher {
    pub(crate) fn new(client: async_nats::Client, config: NatsConfig, source: String) -> Self {
        Publisher {
            context: super::context(client.clone(), &config),
            client,
            config,
            source,
            stats: Arc::default(),
        }
    }

    /// The stream's name, as reports show the publisher (`jetstream:<stream>`).
    pub(crate) fn report_name(&self) -> String {
        format!("jetstream:{}", self.config.stream)
    }

    /// Publishes what comes through `inbox`, reporting progress as participant `index` of
    /// `board`, until the inbox closes (after every publication in flight is acknowledged)
    /// or `shutdown`.
    pub(crate) async fn run(
        self: Arc<Self>,
        index: usize,
        board: Arc<Board>,
        mut inbox: Inbox,
        shutdown: CancellationToken,
    ) {
        let replies = self.client.new_inbox();
        // The client subscribes again by itself after a reconnection.
        let mut acks = loop {
            match self.client.subscribe(format!("{replies}.*")).await {
                Ok(acks) => break acks,
                Err(error) => {
                    warn!(stream = %self.config.stream, error = %error, "subscribing to JetStream's acknowledgements failed; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY.max) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        let mut run = Run {
            publisher: &self,
            window: VecDeque::new(),
            in_flight: 0,
            next_sequence: 0,
            skip_through: None,
            replies: replies.clone(),
            next_id: 0,
            deadline: None,
        };
        if !run.resync(&shutdown).await {
            return;
        }
        let max = self.config.max_in_flight;
        let mut open = true;
        let mut broken = false;
        loop {
            while let Some(Entry::Commit(end)) = run.window.front() {
                board.advance(index, *end);
                run.window.pop_front();
            }
            self.stats
                .in_flight
                .store(run.in_flight as u64, Ordering::Relaxed);
            if broken {
                if !run.resync(&shutdown).await {
                    return;
                }
                broken = false;
                continue;
            }
            if !open && run.window.is_empty() {
                return;
            }
            let deadline = run.deadline;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                ack = acks.next() => {
                    let Some(ack) = ack else {
                        warn!(stream = %self.config.stream, "the subscription to JetStream's acknowledgements ended; subscribing again");
                        if let Ok(again) = self.client.subscribe(format!("{replies}.*")).await {
                            acks = again;
                        }
                        broken = true;
                        continue;
                    };
                    match run.acknowledged(&ack) {
                        Ok(true) => {
                            self.stats.published.fetch_add(1, Ordering::Relaxed);
                            board.count(index, 1);
                        }
                        Ok(false) => {}
                        Err(why) => {
                            warn!(
                                stream = %self.config.stream, error = %why,
                                "JetStream did not take a publication; reading where the stream \
                                 ends, then publishing again from there (nothing is acknowledged \
                                 to PostgreSQL meanwhile)"
                            );
                            broken = true;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    warn!(
                        stream = %self.config.stream, timeout = ?self.config.timeout,
                        "no acknowledgement from JetStream within nats.timeout; reading where \
                         the stream ends, then publishing again from there"
                    );
                    broken = true;
                }
                input = inbox.recv(), if open && run.in_flight < max => match input {
                    None => open = false,
                    Some(Input::Commit { end_lsn }) => match run.window.back_mut() {
                        // A newer commit covers an older one behind the same publications.
                        Some(Entry::Commit(end)) => *end = end_lsn,
                        _ => run.window.push_back(Entry::Commit(end_lsn)),
                    },
                    // Only an operator's partitions get gates.
                    Some(Input::Gate(..)) => {}
                    Some(Input::Event(event)) => {
                        if run.skip_through.is_some_and(|last| event.position() <= last) {
                            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let publication = self.publication(&event);
                        if !run.send(publication).await {
                            broken = true;
                        }
                    }
                },
            }
        }
    }

    /// `event` as a publication: its JSON (as `streamex tail` prints it) on its subject.
    fn publication(&self, event: &Event) -> Publication {
        // A quoted table name may hold a line break, which would end the header.
        let entity = if event.entity.contains(['\r', '\n']) {
            event
                .entity
                .replace('\r', "%0D")
                .replace('\n', "%0A")
                .into()
        } else {
            event.entity.clone()
        };
        let payload = event.to_json();
        let key = super::row_key(event);
        let old_key = super::old_row_key(event, key.as_deref());
        Publication {
            position: event.position(),
            subject: super::partitioned_subject(
                &self.config.subject_prefix,
                event,
                key.as_deref(),
                self.config.partitions,
            ),
            kind: event.kind.as_str(),
            entity,
            key,
            old_key,
            payload: payload.into(),
        }
    }
}

/// The state of one publisher run.
struct Run<'a> {
    publisher: &'a Publisher,
    window: VecDeque<Entry>,
    /// Publications in the window.
    in_flight: usize,
    /// The stream sequence the next publication expects to follow.
    next_sequence: u64,
    /// The position of the last event the stream had when its tip was last read: events up
    /// to it that come (again, after a restart) are skipped.
    skip_through: Option<Position>,
    /// The prefix of the reply subjects: `<replies>.<id>`.
    replies: String,
    /// The id of the next publication sent (ids only grow, so a late PubAck of a
    /// publication sent before a resync is told apart).
    next_id: u64,
    /// When the front publication's PubAck is due.
    deadline: Option<Instant>,
}

/// A PubAck, or JetStream's refusal.
#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    error: Option<PubAckError>,
}

#[derive(serde::Deserialize)]
struct PubAckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl Run<'_> {
    /// Sends `publication`, expecting the stream to end at `next_sequence`, and queues it.
    /// False when it could not be sent (it is queued to be sent again).
    async fn send(&mut self, publication: Publication) -> bool {
        self.in_flight += 1;
        let id = self.next_id;
        self.next_id += 1;
        let reply = format!("{}.{id}", self.replies);
        let publisher = self.publisher;
        match send(
            &publisher.client,
            &publisher.source,
            &publication,
            reply,
            self.next_sequence,
        )
        .await
        {
            Ok(()) => {
                self.next_sequence += 1;
                self.window
                    .push_back(Entry::Publication(publication, Some(id)));
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + publisher.config.timeout);
                }
                true
            }
            Err(error) => {
                refused(&publisher.config.stream, &publication, &error);
                self.window.push_back(Entry::Publication(publication, None));
                false
            }
        }
    }

    /// Takes in a reply: true when it acknowledges the front publication (popped), false
    /// when it is a late one (of a publication sent before a resync), an error when
    /// JetStream refused the front publication (or answered out of order).
    fn acknowledged(&mut self, reply: &async_nats::Message) -> Result<bool, String> {
        let Some(id) = reply
            .subject
            .rsplit_once('.')
            .and_then(|(_, id)| id.parse::<u64>().ok())
        else {
            return Ok(false);
        };
        let front = self.window.iter().find_map(|e| match e {
            Entry::Publication(_, Some(id)) => Some(*id),
            _ => None,
        });
        let Some(front) = front else {
            return Ok(false);
        };
        if id < front {
            return Ok(false);
        }
        if id > front {
            return Err(format!(
                "JetStream answered publication {id} before {front}"
            ));
        }
        if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err("no stream takes the subject (no responders)".to_owned());
        }
        let ack: PubAck = serde_json::from_slice(&reply.payload)
            .map_err(|e| format!("an acknowledgement that does not parse: {e}"))?;
        if let Some(error) = ack.error {
            return Err(format!(
                "{} (JetStream error {})",
                error.description, error.err_code
            ));
        }
        // Only publications are waiting before the front one's commit markers.
        let position = match self.window.front() {
            Some(Entry::Publication(p, Some(_))) => p.position,
            _ => return Err("the acknowledged publication is not at the front".to_owned()),
        };
        self.window.pop_front();
        self.in_flight -= 1;
        self.deadline = self
            .window
            .iter()
            .any(|e| matches!(e, Entry::Publication(_, Some(_))))
            .then(|| Instant::now() + self.publisher.config.timeout);
        if ack.duplicate {
            // The stream had it (its Nats-Msg-Id, within the duplicate window): it did not
            // grow, so what was sent after it expected the wrong sequence.
            return Err(format!(
                "JetStream had {position} already (a duplicate of sequence {})",
                ack.seq
            ));
        }
        Ok(true)
    }

    /// At start and after a failure: reads where the stream ends (retrying, paused, until
    /// it can), drops the publications it has, and sends the rest again, in order. False on
    /// shutdown.
    async fn resync(&mut self, shutdown: &CancellationToken) -> bool {
        let stats = &self.publisher.stats;
        let stream = &self.publisher.config.stream;
        let mut backoff = RETRY;
        let mut failures = 0u32;
        loop {
            // Acknowledgements still to come no longer matter: the tip says what is stored.
            for entry in &mut self.window {
                if let Entry::Publication(_, id) = entry {
                    *id = None;
                }
            }
            self.deadline = None;
            let publisher = self.publisher;
            let tip = super::tip(
                &publisher.context,
                &publisher.config.stream,
                Some(&publisher.source),
            );
            let tip = match tip.await {
                Ok(tip) => tip,
                Err(error) => {
                    failures += 1;
                    stats.paused.store(1, Ordering::Relaxed);
                    let wait = backoff.next().unwrap_or(backoff.max);
                    let next = if error.is_transient() {
                        "it resumes by itself once JetStream answers"
                    } else {
                        "it resumes once the error is fixed"
                    };
                    warn!(
                        %stream, error = %error, attempt = failures,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "JetStream is unavailable: the pipeline waits and nothing is \
                         acknowledged to PostgreSQL; {next}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return false,
                    }
                    continue;
                }
            };
            if failures > 0 {
                info!(%stream, sequence = tip.sequence, "JetStream answers again; publishing");
            }
            stats.paused.store(0, Ordering::Relaxed);
            self.next_sequence = tip.sequence;
            self.skip_through = tip.position;
            // The stream holds a prefix of the publications: drop that prefix.
            let before = self.window.len();
            self.window.retain(|entry| match entry {
                Entry::Publication(p, _) => tip.position.is_none_or(|last| p.position > last),
                Entry::Commit(_) => true,
            });
            stats
                .published
                .fetch_add((before - self.window.len()) as u64, Ordering::Relaxed);
            // Send the rest again, in order.
            self.in_flight = 0;
            let mut sent_all = true;
            for entry in &mut self.window {
                let Entry::Publication(p, sent) = entry else {
                    continue;
                };
                self.in_flight += 1;
                if !sent_all {
                    continue;
                }
                let id = self.next_id;
                self.next_id += 1;
                let reply = format!("{}.{id}", self.replies);
                match send(
                    &publisher.client,
                    &publisher.source,
                    p,
                    reply,
                    self.next_sequence,
                )
                .await
                {
                    Ok(()) => {
                        self.next_sequence += 1;
                        *sent = Some(id);
                        if self.deadline.is_none() {
                            self.deadline = Some(Instant::now() + publisher.config.timeout);
                        }
                    }
                    Err(error) => {
                        refused(stream, p, &error);
                        sent_all = false;
                    }
                }
            }
            if sent_all {
                return true;
            }
            let wait = backoff.next().unwrap_or(backoff.max);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }
}

/// Logs why `publication` could not be sent, with the fix when someone must act.
fn refused(stream: &str, publication: &Publication, error: &async_nats::PublishError) {
    use async_nats::client::PublishErrorKind;
    if error.kind() == PublishErrorKind::MaxPayloadExceeded {
        warn!(
            %stream, position = %publication.position, bytes = publication.payload.len(),
            "an event is larger than the NATS server's max_payload: the pipeline waits on it; \
             raise max_payload in nats-server's configuration (up to 64 MB) and it goes on"
        );
    } else {
        warn!(%stream, error = %error, "publishing to JetStream failed; trying again");
    }
}

/// Sends `publication` with `reply` as its reply subject, to follow stream sequence `after`.
async fn send(
    client: &async_nats::Client,
    source: &str,
    publication: &Publication,
    reply: String,
    after: u64,
) -> Result<(), async_nats::PublishError> {
    let p = publication;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        p.position.to_string().as_str(),
    );
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
        after.to_string().as_str(),
    );
    headers.insert("Content-Type", "application/json");
    headers.insert(TYPE_HEADER, p.kind);
    headers.insert(ENTITY_HEADER, &*p.entity);
    if let Some(key) = &p.key {
        headers.insert(KEY_HEADER, key.as_str());
    }
    if let Some(old) = &p.old_key {
        headers.insert(OLD_KEY_HEADER, old.as_str());
    }
    headers.insert(COMMIT_HEADER, p.position.commit_lsn.to_string().as_str());
    headers.insert(SOURCE_HEADER, source);
    client
        .publish_with_reply_and_headers(p.subject.clone(), reply, headers, p.payload.clone())
        .await
}
