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

fn keyed(kind: EventType, record: serde_json::Value, key: &[&str]) -> Event {
    let mut event = crate::testing::event(kind, "t", record, serde_json::Value::Null, 0);
    event.key_columns = key.iter().map(|c| (*c).to_owned()).collect();
    event
}

#[test]
fn a_row_s_key_is_its_key_columns_as_in_its_channel() {
    let one = keyed(
        EventType::Insert,
        serde_json::json!({"id": 42, "v": 1}),
        &["id"],
    );
    assert_eq!(row_key(&one).as_deref(), Some("42"));
    let two = keyed(
        EventType::Update,
        serde_json::json!({"a": "x/y", "b": 7, "v": 1}),
        &["a", "b"],
    );
    assert_eq!(row_key(&two).as_deref(), Some("x%2Fy,7"));
    let line = keyed(
        EventType::Insert,
        serde_json::json!({"id": "a\r\nb"}),
        &["id"],
    );
    assert_eq!(
        row_key(&line).as_deref(),
        Some("a%0D%0Ab"),
        "a header holds no line break"
    );
    // A delete's key is in its old record.
    let mut delete = keyed(EventType::Delete, serde_json::Value::Null, &["id"]);
    delete.old_record = serde_json::json!({"id": 5})
        .as_object()
        .cloned()
        .map(Into::into);
    assert_eq!(row_key(&delete).as_deref(), Some("5"));
    // No key: none, a null key value, a truncate.
    for event in [
        keyed(EventType::Insert, serde_json::json!({"id": 1}), &[]),
        keyed(EventType::Insert, serde_json::json!({"id": null}), &["id"]),
        keyed(EventType::Truncate, serde_json::Value::Null, &["id"]),
    ] {
        assert_eq!(row_key(&event), None, "{event:?}");
    }
}

#[test]
fn an_update_that_changes_the_key_carries_the_old_one() {
    let mut moved = keyed(
        EventType::Update,
        serde_json::json!({"id": 8, "v": 1}),
        &["id"],
    );
    moved.old_record = serde_json::json!({"id": 7})
        .as_object()
        .cloned()
        .map(Into::into);
    let key = row_key(&moved);
    assert_eq!(key.as_deref(), Some("8"));
    assert_eq!(old_row_key(&moved, key.as_deref()).as_deref(), Some("7"));
    // REPLICA IDENTITY FULL: the whole old row, the same key.
    let mut full = keyed(
        EventType::Update,
        serde_json::json!({"id": 7, "v": 2}),
        &["id"],
    );
    full.old_record = serde_json::json!({"id": 7, "v": 1})
        .as_object()
        .cloned()
        .map(Into::into);
    let key = row_key(&full);
    assert_eq!(old_row_key(&full, key.as_deref()), None);
    // No old row (the key did not change), or not an update.
    let plain = keyed(EventType::Update, serde_json::json!({"id": 7}), &["id"]);
    assert_eq!(old_row_key(&plain, Some("7")), None);
    let mut delete = keyed(EventType::Delete, serde_json::Value::Null, &["id"]);
    delete.old_record = serde_json::json!({"id": 5})
        .as_object()
        .cloned()
        .map(Into::into);
    assert_eq!(old_row_key(&delete, Some("6")), None);
}

#[test]
fn partitions_are_fnv_1a_of_the_key_and_stay_put() {
    // Expected values from an FNV-1a 64 written apart from this code.
    for (key, of_4, of_7) in [("1", 0, 1), ("42", 3, 5), ("a,b", 2, 2), ("x%2Fy", 1, 4)] {
        assert_eq!(partition(Some(key), 4), of_4, "{key}");
        assert_eq!(partition(Some(key), 7), of_7, "{key}");
        assert_eq!(partition(Some(key), 1), 0);
    }
    assert_eq!(partition(None, 4), 0, "no key: partition 0");

    let row = keyed(EventType::Insert, serde_json::json!({"id": 42}), &["id"]);
    let key = row_key(&row);
    assert_eq!(
        partitioned_subject("cdc", &row, key.as_deref(), 1),
        "cdc.public.t"
    );
    assert_eq!(
        partitioned_subject("cdc", &row, key.as_deref(), 4),
        "cdc.public.t.3"
    );
    let truncate = keyed(EventType::Truncate, serde_json::Value::Null, &["id"]);
    assert_eq!(
        partitioned_subject("cdc", &truncate, None, 4),
        "cdc.public.t.0"
    );
    let message = event(EventType::Message, "", "orders");
    assert_eq!(
        partitioned_subject("cdc", &message, None, 4),
        "cdc.messages.orders",
        "outbox messages have no partition token"
    );
}
