//! Each operator's durable JetStream consumer: its name, what it filters, its settings, and
//! where it starts delivering.
//!
//! # Where a consumer starts
//!
//! JetStream sends a message again only once its `ack_wait` has passed, and meanwhile goes on
//! delivering the messages after it: a worker that restarts with messages delivered and not
//! acknowledged would get later messages before those, out of WAL order. So each session of
//! an operator (at start, after a resume, after a lost delivery) makes a consumer of its own
//! (deleting the operator's others), delivering from the message after the last one
//! acknowledged: the greatest ack floor of the operator's consumers, which only moves over
//! what the operator has durably handled. The first consumer of an operator delivers the
//! whole stream; what its checkpoint already covers is skipped.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::WorkerConfig;
use crate::event::EntityName;
use crate::jetstream::{JetStreamError, messages_subject, table_subject, unavailable};
use crate::operator::Subscription;

/// The longest consumer name a worker makes (the server stores a consumer under a directory
/// of its name; 255 bytes is the usual limit of a file name).
const MAX_NAME: usize = 200;

/// What the durable consumers of `operator` on `slot` are named from: `<slot>-<operator>`
/// (each session's is that and a suffix, [`session_name`]), every character of
/// the operator's name other than an ASCII letter, a digit or `_` written `-XX` (its UTF-8
/// bytes in hexadecimal). A slot name has no `-` (only lower-case letters, digits and `_`),
/// so two different (slot, operator) pairs never share a consumer; a name past 200
/// characters is cut and ends with a hash of the whole.
pub(crate) fn consumer_name(slot: &str, operator: &str) -> String {
    use std::fmt::Write as _;
    let mut name = String::with_capacity(slot.len() + operator.len() + 1);
    name.push_str(slot);
    name.push('-');
    for &b in operator.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            name.push(b as char);
        } else {
            let _ = write!(name, "-{b:02X}");
        }
    }
    if name.len() > MAX_NAME {
        let hash = crate::jetstream::fnv1a(name.as_bytes());
        name.truncate(MAX_NAME - 17);
        let _ = write!(name, "-{hash:016x}");
    }
    name
}

/// The subject the consumer of an operator with `subscriptions` filters on: the one subject
/// of its events when they all go to one (a table, or one prefix of messages), else every
/// subject of the stream (`<prefix>.>`); the worker then skips what the operator does not
/// subscribe to. JetStream 2.9 takes one filter per consumer, so a table's events spread
/// over `partitions` (above 1) take the whole stream too: `<table subject>.*` would miss
/// the events published before the stream had partitions.
pub(crate) fn filter_subject(
    prefix: &str,
    default_schema: &str,
    subscriptions: &[Subscription],
    partitions: u32,
) -> Result<String, crate::event::EntityNameError> {
    let mut subjects = std::collections::BTreeSet::new();
    let mut tables = false;
    for subscription in subscriptions {
        if subscription.is_messages() {
            subjects.insert(messages_subject(prefix, &subscription.entity));
        } else {
            let name = EntityName::parse(&subscription.entity)?;
            subjects.insert(table_subject(
                prefix,
                name.schema_or(default_schema),
                &name.table,
            ));
            tables = true;
        }
    }
    Ok(match (subjects.len(), subjects.into_iter().next()) {
        (1, Some(subject)) if !(tables && partitions > 1) => subject,
        _ => every_subject(prefix),
    })
}

/// The filter on every subject of the stream.
pub(crate) fn every_subject(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// Whether the stream holds, at `start` or after, a message on a partition of the table
/// subject `filter` (`<filter>.<p>`): published while the stream had partitions, which a
/// consumer filtering on `filter` alone would never get.
pub(crate) async fn partitions_after(
    stream: &stream::Stream,
    stream_name: &str,
    filter: &str,
    start: u64,
) -> Result<bool, JetStreamError> {
    use jetstream::stream::LastRawMessageErrorKind;
    match stream
        .get_last_raw_message_by_subject(&format!("{filter}.*"))
        .await
    {
        Ok(message) => Ok(message.sequence >= start),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
        Err(e) => Err(unavailable(
            stream_name,
            format!("looking for partitioned messages of {filter}: {e}"),
        )),
    }
}

/// The settings of an operator's consumer, delivering from stream sequence `start` (the
/// whole stream for 1 or less).
pub(crate) fn consumer_config(
    name: &str,
    description: String,
    filter: &str,
    start: u64,
    worker: &WorkerConfig,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        description: Some(description),
        deliver_policy: if start <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        },
        // Acknowledging a message acknowledges every one before it: the worker acknowledges
        // the last message its operator is durably done through.
        ack_policy: consumer::AckPolicy::All,
        ack_wait: worker.ack_wait,
        max_deliver: -1,
        filter_subject: filter.to_owned(),
        replay_policy: consumer::ReplayPolicy::Instant,
        max_ack_pending: i64::try_from(worker.max_ack_pending).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// The name of a new session's consumer of the operator whose consumers are named from
/// `base` ([`consumer_name`]): `<base>-s<16 random hexadecimal digits>`. Each session makes a
/// consumer of its own name, so that a worker still pulling after it lost the operator (a
/// frozen worker woken up, a lock session cut off) pulls from its own consumer, deleted by
/// the one that took over, and never gets, nor acknowledges, the deliveries of the new one.
pub(crate) fn session_name(base: &str) -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    // The system's random source failing is as good as impossible; a name from the clock is
    // then unique enough among the sessions of one operator.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // The low 64 bits of the nanoseconds: the ones that change.
        let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
        bytes = (low ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
    }
    format!("{base}-s{:016x}", u64::from_be_bytes(bytes))
}

/// Whether the consumer `name` is one of the operator's whose consumers are named from
/// `base`: a session's ([`session_name`]), or `base` itself (the one durable consumer of a
/// worker from before sessions had their own). No other operator's name is of that form: in
/// a [`consumer_name`], a `-` after the slot's is always followed by two upper-case
/// hexadecimal digits (or, past the length cut, lower-case ones), never by `s`.
pub(crate) fn is_session_of(base: &str, name: &str) -> bool {
    match name.strip_prefix(base) {
        Some("") => true,
        Some(rest) => rest.strip_prefix("-s").is_some_and(|hex| {
            hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        }),
        None => false,
    }
}

/// The names of the operator's consumers on `stream` (see [`is_session_of`]), with the
/// stream sequence through which each has every message acknowledged (its ack floor).
async fn sessions(
    stream: &stream::Stream,
    stream_name: &str,
    base: &str,
) -> Result<Vec<(String, u64)>, JetStreamError> {
    use futures_util::TryStreamExt as _;
    let mut listing = stream.consumers();
    let mut found = Vec::new();
    loop {
        let info = match listing.try_next().await {
            Ok(Some(info)) => info,
            Ok(None) => break,
            Err(e) => {
                return Err(unavailable(
                    stream_name,
                    format!("listing the consumers: {e}"),
                ));
            }
        };
        if !is_session_of(base, &info.name) {
            continue;
        }
        // A consumer made to start at sequence S reports an ack floor of 0 until its first
        // acknowledgement: everything before S was acknowledged when it was made.
        let floor = match info.config.deliver_policy {
            consumer::DeliverPolicy::ByStartSequence { start_sequence } => info
                .ack_floor
                .stream_sequence
                .max(start_sequence.saturating_sub(1)),
            _ => info.ack_floor.stream_sequence,
        };
        found.push((info.name, floor));
    }
    Ok(found)
}

/// The stream sequence through which the operator's consumers (named from `base`) have every
/// message acknowledged: the greatest ack floor among them (each only moved over what a
/// worker of the operator had durably done), `None` when there is none.
pub(crate) async fn ack_floor(
    stream: &stream::Stream,
    stream_name: &str,
    base: &str,
) -> Result<Option<u64>, JetStreamError> {
    Ok(sessions(stream, stream_name, base)
        .await?
        .into_iter()
        .map(|(_, floor)| floor)
        .max())
}

/// Makes the consumer `config` names (a new session's), after deleting every other consumer
/// of the operator (named from `base`), whatever they delivered, so that it alone delivers,
/// from the sequence `config` starts at, in stream order.
pub(crate) async fn recreate(
    stream: &stream::Stream,
    stream_name: &str,
    base: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, JetStreamError> {
    let name = config.durable_name.clone().unwrap_or_default();
    remove(stream, stream_name, base).await?;
    stream
        .create_consumer(config)
        .await
        .map_err(|e| unavailable(stream_name, format!("creating consumer {name}: {e}")))
}

/// Deletes every consumer of the operator named from `base` (see [`is_session_of`]).
pub(crate) async fn remove(
    stream: &stream::Stream,
    stream_name: &str,
    base: &str,
) -> Result<(), JetStreamError> {
    for (old, _) in sessions(stream, stream_name, base).await? {
        match stream.delete_consumer(&old).await {
            Ok(_) => {}
            Err(e) if is_consumer_missing(&e) => {}
            Err(e) => {
                return Err(unavailable(
                    stream_name,
                    format!("deleting consumer {old}: {e}"),
                ));
            }
        }
    }
    Ok(())
}

fn is_consumer_missing(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// A stream as a session starts: the stream, its first sequence (after messages removed by
/// `max_age` or `max_bytes`, past 1), and when it was made (which tells a stream made again
/// under the same name, whose sequences are another story).
pub(crate) struct Opened {
    pub stream: stream::Stream,
    pub first: u64,
    pub created: String,
}

/// Opens the stream `stream_name`; a missing one is [`JetStreamError::StreamMissing`].
pub(crate) async fn open_stream(
    context: &jetstream::Context,
    stream_name: &str,
) -> Result<Opened, JetStreamError> {
    let mut stream = crate::jetstream::open(context, stream_name).await?;
    let info = stream
        .info()
        .await
        .map_err(|e| unavailable(stream_name, e))?;
    let (first, created) = (info.state.first_sequence, info.created.to_string());
    Ok(Opened {
        stream,
        first,
        created,
    })
}

/// The position (`Nats-Msg-Id`) of the message at `sequence`, `None` when the stream does not
/// hold it or it has none.
pub(crate) async fn position_at(
    stream: &stream::Stream,
    stream_name: &str,
    sequence: u64,
) -> Result<Option<crate::lsn::Position>, JetStreamError> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .and_then(|id| id.as_str().parse().ok())),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable(stream_name, e)),
    }
}

/// The greatest sequence in `first..=last` whose message is at or before `checkpoint`
/// (`first - 1` when there is none): where a consumer that must deliver everything after
/// `checkpoint` again starts after. The stream holds the events in WAL order, so the search
/// halves the range; a sequence whose message is gone (deleted by hand) counts as after.
pub(crate) async fn last_at_or_before(
    stream: &stream::Stream,
    stream_name: &str,
    (first, last): (u64, u64),
    checkpoint: Option<crate::lsn::Position>,
) -> Result<u64, JetStreamError> {
    let Some(checkpoint) = checkpoint else {
        return Ok(first.saturating_sub(1));
    };
    // Invariant: every sequence below `low` is at or before the checkpoint, every one from
    // `high` on is after it.
    let (mut low, mut high) = (first, last.saturating_add(1));
    while low < high {
        let middle = low + (high - low) / 2;
        match position_at(stream, stream_name, middle).await? {
            Some(position) if position <= checkpoint => low = middle + 1,
            _ => high = middle,
        }
    }
    Ok(low.saturating_sub(1))
}

/// How long a worker waits for JetStream to answer a request of its own (a pull, an
/// acknowledgement) before taking it as unavailable: `nats.timeout`, at least a second.
pub(crate) fn answer_timeout(nats: &crate::config::NatsConfig) -> Duration {
    nats.timeout.max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    #[test]
    fn consumer_names_keep_safe_characters_and_escape_the_others_without_collisions() {
        assert_eq!(
            consumer_name("streamex", "post_comment_tallies"),
            "streamex-post_comment_tallies"
        );
        // A dot, a space, a '*' or '>' would break a JetStream name; '-' is the escape.
        assert_eq!(consumer_name("s", "a.b c*>"), "s-a-2Eb-20c-2A-3E");
        assert_eq!(consumer_name("s", "a-b"), "s-a-2Db");
        assert_eq!(consumer_name("s", "café"), "s-caf-C3-A9");
        // The slot has no '-': the first one ends it, so these differ.
        assert_ne!(consumer_name("a_b", "c"), consumer_name("a", "b_c"));
        assert_ne!(consumer_name("s", "a-2Eb"), consumer_name("s", "a.b"));
        for name in [
            consumer_name("s", "a.b c*>"),
            consumer_name("s", &"x".repeat(500)),
        ] {
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{name}"
            );
        }
    }

    #[test]
    fn long_names_are_cut_and_keep_apart_by_their_hash() {
        let a = consumer_name("streamex", &"x".repeat(300));
        let b = consumer_name("streamex", &format!("{}y", "x".repeat(299)));
        assert_eq!(a.len(), MAX_NAME);
        assert_eq!(b.len(), MAX_NAME);
        assert_ne!(a, b);
        assert_eq!(a, consumer_name("streamex", &"x".repeat(300)), "stable");
    }

    #[test]
    fn each_session_has_a_consumer_of_its_own_told_from_other_operators() {
        let base = consumer_name("streamex", "tallies");
        let (a, b) = (session_name(&base), session_name(&base));
        assert_ne!(a, b, "two sessions, two consumers");
        for name in [&a, &b, &base] {
            assert!(is_session_of(&base, name), "{name}");
        }
        assert!(a.len() <= 255 && session_name(&consumer_name("s", &"x".repeat(500))).len() <= 255);
        // Other operators whose names start alike.
        for other in [
            "tallies_s",
            "tallies-s0123456789abcdef",
            "tallies2",
            "tallie",
        ] {
            let theirs = consumer_name("streamex", other);
            assert!(!is_session_of(&base, &theirs), "{theirs}");
            assert!(!is_session_of(&base, &session_name(&theirs)), "{theirs}");
        }
        assert!(!is_session_of(&base, &format!("{base}-s0123")), "too short");
        assert!(
            !is_session_of(&base, &format!("{base}-s0123456789ABCDEF")),
            "upper case"
        );
        assert!(
            !is_session_of(&base, &format!("{base}-s0123456789abcdef0")),
            "too long"
        );
    }

    #[test]
    fn one_subject_is_filtered_on_several_take_the_whole_stream() {
        let one = [
            Subscription::only("comments", &[EventType::Insert]),
            Subscription::all("public.comments"),
        ];
        assert_eq!(
            filter_subject("blog", "public", &one, 1).unwrap(),
            "blog.public.comments"
        );
        let archive = [Subscription::all("archive.odd table")];
        assert_eq!(
            filter_subject("cdc", "public", &archive, 1).unwrap(),
            "cdc.archive.odd%20table"
        );
        let messages = [Subscription::messages("orders.v1")];
        assert_eq!(
            filter_subject("cdc", "public", &messages, 1).unwrap(),
            "cdc.messages.orders%2Ev1"
        );
        let two = [Subscription::all("posts"), Subscription::all("comments")];
        assert_eq!(filter_subject("blog", "public", &two, 1).unwrap(), "blog.>");
        assert_eq!(filter_subject("blog", "public", &[], 1).unwrap(), "blog.>");
        assert!(filter_subject("blog", "public", &[Subscription::all("a..b")], 1).is_err());
        // A table's events spread over partitions: the whole stream (the events from before
        // the partitions have no partition token). Messages have none either way.
        assert_eq!(filter_subject("blog", "public", &one, 4).unwrap(), "blog.>");
        assert_eq!(
            filter_subject("cdc", "public", &messages, 4).unwrap(),
            "cdc.messages.orders%2Ev1"
        );
    }

    #[test]
    fn a_consumer_starts_at_the_whole_stream_or_after_what_is_acknowledged() {
        let worker = WorkerConfig::default();
        let first = consumer_config("s-op", "d".into(), "blog.>", 1, &worker);
        assert_eq!(first.deliver_policy, consumer::DeliverPolicy::All);
        assert_eq!(first.ack_policy, consumer::AckPolicy::All);
        assert_eq!(first.max_ack_pending, 1024);
        assert_eq!(first.ack_wait, Duration::from_secs(30));
        let later = consumer_config("s-op", "d".into(), "blog.>", 42, &worker);
        assert_eq!(
            later.deliver_policy,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 42 }
        );
        assert_eq!(later.durable_name.as_deref(), Some("s-op"));
    }
}
