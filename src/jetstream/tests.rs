use std::time::Duration;

use super::*;
use crate::config::NatsConfig;

fn event(kind: EventType, schema: &str, table: &str) -> Event {
    let mut event = crate::testing::event(
        kind,
        "t",
        serde_json::json!({"id": 1}),
        serde_json::Value::Null,
        0,
    );
    event.schema = schema.into();
    event.table = table.into();
    event
}

#[test]
fn subjects_name_schema_and_table_and_escape_what_would_split_them() {
    assert_eq!(
        subject("cdc", &event(EventType::Insert, "public", "comments")),
        "cdc.public.comments"
    );
    assert_eq!(
        subject("a.b", &event(EventType::Delete, "my.schema", "odd table*>")),
        "a.b.my%2Eschema.odd%20table%2A%3E"
    );
    assert_eq!(
        subject("cdc", &event(EventType::Update, "public", "café")),
        "cdc.public.caf%C3%A9"
    );
    // Messages: the prefix is the table slot; the schema slot says `messages`.
    assert_eq!(
        subject("cdc", &event(EventType::Message, "", "order.events")),
        "cdc.messages.order%2Eevents"
    );
    assert_eq!(subject("cdc", &event(EventType::Insert, "", "")), "cdc.%.%");
}

#[test]
fn a_stream_as_configured_has_no_differences_and_each_setting_is_named() {
    let mut nats = NatsConfig::new("nats://127.0.0.1:4222");
    let want = stream_config(&nats);
    assert_eq!(want.subjects, ["streamex.>"]);
    assert!(differences(&want, &want).is_empty());
    nats.subject_prefix = "other".into();
    nats.duplicate_window = Duration::from_secs(30);
    nats.storage = crate::config::NatsStorage::Memory;
    let found = differences(&stream_config(&nats), &want);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].starts_with("nats.subject_prefix asks for subjects [other.>]"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with("nats.storage asks for memory, the stream has file"),
        "{found:?}"
    );
    assert!(
        found[2].starts_with("nats.duplicate_window asks for 30s"),
        "{found:?}"
    );
}

#[test]
fn the_section_refuses_what_does_not_hold_together() {
    let check = |f: fn(&mut NatsConfig)| {
        let mut nats = NatsConfig::new("nats://127.0.0.1:4222");
        f(&mut nats);
        nats.validate().err().unwrap_or_default()
    };
    assert_eq!(check(|_| {}), "");
    assert!(check(|n| n.stream = "a.b".into()).starts_with("nats.stream"));
    assert!(check(|n| n.subject_prefix = "a..b".into()).starts_with("nats.subject_prefix"));
    assert!(check(|n| n.subject_prefix = "a.*".into()).starts_with("nats.subject_prefix"));
    assert!(check(|n| n.user = Some("u".into())).starts_with("nats.user and nats.password"));
    assert!(check(|n| n.max_in_flight = 0).contains("max_in_flight"));
    assert!(
        check(|n| {
            n.max_age = Duration::from_secs(60);
        })
        .contains("longer than nats.max_age")
    );
    assert!(
        check(|n| {
            n.token = Some(crate::config::Secret::new("t"));
            n.credentials = Some("x.creds".into());
        })
        .contains("keep one of them")
    );
}
