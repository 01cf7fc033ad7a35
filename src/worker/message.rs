//! A JetStream message back into the [`Event`] the publisher made of it.
//!
//! The payload is the event's JSON (as `streamex tail` prints it). A payload that does not
//! parse as an event is never given to a handler: like a change that could not be decoded,
//! it becomes an event carrying `decode_error` (its position from `Nats-Msg-Id`, its type and
//! entity from the `Streamex-Type` and `Streamex-Entity` headers), and the operator's failure
//! policy applies to it at once: halt, or a dead letter holding that event. A message
//! without a position cannot be put in WAL order at all: the operator halts on it
//! ([`Unreadable`]).

use std::sync::Arc;

use async_nats::HeaderMap;

use crate::event::{EntityName, Event, EventType};
use crate::jetstream::{ENTITY_HEADER, TYPE_HEADER};
use crate::lsn::Position;

/// A message that holds no event and no position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "JetStream stream {stream:?} holds a message at sequence {sequence} (subject {subject}) \
     without an event position (Nats-Msg-Id) and whose payload is not an event: it was not \
     published by streamex, and cannot be put in WAL order; the stream must be streamex's \
     alone. Remove the message (`nats stream rmm {stream} {sequence}`), then `streamex resume \
     {operator}`"
)]
pub(crate) struct Unreadable {
    pub stream: String,
    pub sequence: u64,
    pub subject: String,
    pub operator: String,
}

/// The event of a message at stream sequence `sequence` on `subject`: parsed from `payload`,
/// or, when it does not parse, an event that says why (see the module documentation);
/// `None` when it does not parse and has no position either. Never panics, whatever the
/// bytes.
pub(crate) fn event_of(
    headers: Option<&HeaderMap>,
    payload: &[u8],
    subject: &str,
    sequence: u64,
    default_schema: &str,
) -> Option<Event> {
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let position: Option<Position> =
        header(async_nats::header::NATS_MESSAGE_ID.as_ref()).and_then(|id| id.parse().ok());
    let error = match serde_json::from_slice::<Event>(payload) {
        Ok(event) => return Some(event),
        Err(error) => error,
    };
    let position = position?;
    // serde_json's messages may quote the payload: say only where and what kind of error.
    let what = match error.classify() {
        serde_json::error::Category::Io | serde_json::error::Category::Syntax => "is not JSON",
        serde_json::error::Category::Eof => "ends before its JSON does",
        serde_json::error::Category::Data => "is JSON, but not an event",
    };
    let kind: Option<EventType> =
        header(TYPE_HEADER).and_then(|t| serde_json::from_value(serde_json::Value::String(t)).ok());
    let kind = kind.unwrap_or(EventType::Insert);
    let entity = header(ENTITY_HEADER).unwrap_or_default();
    let (schema, table): (Arc<str>, Arc<str>) = if kind == EventType::Message {
        ("".into(), entity.as_str().into())
    } else {
        match EntityName::parse(&entity) {
            Ok(name) => (name.schema_or(default_schema).into(), name.table.into()),
            Err(_) => ("".into(), entity.as_str().into()),
        }
    };
    Some(Event {
        kind,
        schema,
        entity: entity.into(),
        table,
        new_record: None,
        old_record: None,
        changes: None,
        unavailable_columns: Vec::new(),
        timestamp: 0,
        lsn: position.commit_lsn,
        commit_lsn: position.commit_lsn,
        xid: 0,
        ordinal: position.ordinal,
        decode_error: Some(format!(
            "the JetStream message at stream sequence {sequence} (subject {subject}) {what} \
             (at line {} column {} of its payload of {} bytes)",
            error.line(),
            error.column(),
            payload.len()
        )),
        message: None,
        key_columns: Arc::from([]),
    })
}

/// Whether a message whose payload did not parse may concern an operator: when its headers
/// do not say its entity, it is given to the operator (its failure policy then applies)
/// rather than passed over unseen.
pub(crate) fn concerns(event: &Event, subscriptions: &[crate::operator::Subscription]) -> bool {
    if event.decode_error.is_some() && event.entity.is_empty() {
        return true;
    }
    subscriptions.iter().any(|s| s.matches(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::operator::Subscription;

    fn headers(id: &str, kind: &str, entity: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        headers.insert(TYPE_HEADER, kind);
        headers.insert(ENTITY_HEADER, entity);
        headers
    }

    #[test]
    fn an_event_comes_back_as_it_was_published() {
        let mut event = crate::testing::event(
            EventType::Update,
            "archive.comments",
            serde_json::json!({"id": 7, "body": "x"}),
            serde_json::json!({"id": 7}),
            2,
        );
        event.commit_lsn = Lsn(0x16B_3748);
        let payload = serde_json::to_vec(&event).unwrap();
        let back = event_of(None, &payload, "s", 1, "public").unwrap();
        assert_eq!(back, event);
        assert_eq!(back.position(), Position::new(Lsn(0x16B_3748), 2));
    }

    #[test]
    fn a_payload_that_is_no_event_goes_to_the_failure_policy_with_its_headers_position() {
        let h = headers("0/16B3748#3", "delete", "comments");
        let event = event_of(
            Some(&h),
            b"{\"type\": \"insert\"",
            "blog.public.comments",
            9,
            "public",
        )
        .unwrap();
        assert_eq!(event.position(), Position::new(Lsn(0x16B_3748), 3));
        assert_eq!(event.kind, EventType::Delete);
        assert_eq!((&*event.schema, &*event.table), ("public", "comments"));
        let why = event.decode_error.clone().unwrap();
        assert!(
            why.contains("stream sequence 9") && why.contains("ends before"),
            "{why}"
        );
        assert!(concerns(&event, &[Subscription::all("comments")]));
        assert!(!concerns(&event, &[Subscription::all("posts")]));
        // Quoted values never reach the reason.
        let h = headers("0/1#0", "insert", "comments");
        let event = event_of(Some(&h), b"{\"secret-value\": 1}", "s", 1, "public").unwrap();
        let why = event.decode_error.unwrap();
        assert!(
            !why.contains("secret-value") && why.contains("not an event"),
            "{why}"
        );
    }

    #[test]
    fn without_a_position_a_message_is_unreadable_and_without_an_entity_it_concerns_everyone() {
        assert_eq!(event_of(None, b"garbage", "s", 1, "public"), None);
        let mut h = HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, "0/10#1");
        let event = event_of(Some(&h), b"garbage", "s", 1, "public").unwrap();
        assert!(concerns(&event, &[Subscription::all("posts")]));
    }

    proptest::proptest! {
        /// Whatever the bytes, with or without headers: an event, a reason, or none; never a
        /// panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            json in "[{}\\[\\]\":,0-9.eE+ tfalsenru-]{0,80}",
            with_headers: bool,
        ) {
            let h = headers("0/10#1", "insert", "comments");
            let headers = with_headers.then_some(&h);
            for payload in [bytes.as_slice(), json.as_bytes()] {
                let event = event_of(headers, payload, "s", 1, "public");
                if with_headers {
                    proptest::prop_assert!(event.is_some());
                }
            }
        }
    }
}
