//! An event's JSON, written straight into bytes: exactly what `serde_json::to_vec(&event)`
//! writes (a property test holds the two together), at a fraction of the cost.
//!
//! Every event that leaves the process (tail, Server-Sent Events, JetStream) is written
//! once. Through serde, escaping strings was the largest single cost of `streamex tail` (a
//! byte at a time through a table, for the field names too): here the names are constants,
//! and a string is copied eight bytes at a time until one of them needs escaping.

use serde_json::Value;

use super::{Changes, Event, Record, micros_rfc3339};

impl Event {
    /// The event's JSON, as `serde_json::to_vec(event)` writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_json(&mut out);
        out
    }

    /// Appends the event's JSON to `out`, as `serde_json::to_writer` writes it.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(self.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"schema\":");
        string(out, &self.schema);
        out.extend_from_slice(b",\"entity\":");
        string(out, &self.entity);
        out.extend_from_slice(b",\"table\":");
        string(out, &self.table);
        out.extend_from_slice(b",\"new_record\":");
        optional_record(out, self.new_record.as_ref());
        out.extend_from_slice(b",\"old_record\":");
        optional_record(out, self.old_record.as_ref());
        out.extend_from_slice(b",\"changes\":");
        match &self.changes {
            Some(changes) => self::changes(out, changes),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"unavailable_columns\":[");
        for (i, column) in self.unavailable_columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, column);
        }
        out.extend_from_slice(b"],\"timestamp\":\"");
        micros_rfc3339::write(out, self.timestamp);
        out.extend_from_slice(b"\",\"lsn\":\"");
        self.lsn.write_to(out);
        out.extend_from_slice(b"\",\"commit_lsn\":\"");
        self.commit_lsn.write_to(out);
        out.extend_from_slice(b"\",\"xid\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.xid).as_bytes());
        out.extend_from_slice(b",\"ordinal\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.ordinal).as_bytes());
        if let Some(error) = &self.decode_error {
            out.extend_from_slice(b",\"decode_error\":");
            string(out, error);
        }
        if let Some(message) = &self.message {
            out.extend_from_slice(b",\"message\":{\"prefix\":");
            string(out, &message.prefix);
            out.extend_from_slice(b",\"content\":");
            value(out, &message.content);
            out.push(b'}');
        }
        out.push(b'}');
    }
}

fn optional_record(out: &mut Vec<u8>, record: Option<&Record>) {
    let Some(record) = record else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, (key, v)) in record.json_entries().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(key);
        v.write_json(out);
    }
    out.push(b'}');
}

fn changes(out: &mut Vec<u8>, changes: &Changes) {
    out.push(b'{');
    for (i, change) in changes.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, &change.column);
        out.extend_from_slice(b":{\"old_value\":");
        value(out, &change.old_value);
        out.extend_from_slice(b",\"new_value\":");
        value(out, &change.new_value);
        out.push(b'}');
    }
    out.push(b'}');
}

/// A JSON value as serde_json writes it (compact).
pub(super) fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Under `arbitrary_precision` a number is its text.
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, k);
                out.push(b':');
                value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Whether any of the eight bytes of `word` needs escaping in a JSON string: a control
/// character (below 0x20), `"` or `\`. (Bit tricks of "Bit Twiddling Hacks": exact as a yes or
/// no for the word, which is all this asks.)
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let has = |byte: u64| {
        let x = word ^ (ONES * byte);
        x.wrapping_sub(ONES) & !x & HIGH
    };
    (below_space | has(u64::from(b'"')) | has(u64::from(b'\\'))) != 0
}

/// A JSON string, escaped as serde_json escapes it.
pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    string_bytes(out, s.as_bytes());
}

/// [`string`] of text already checked to be UTF-8 (what is not escaped is copied as it is).
pub(super) fn string_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, EventType, LogicalMessage};
    use proptest::prelude::*;
    use serde_json::json;

    fn tricky_string() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\u{0}'),
                Just('\u{1f}'),
                Just('\u{7f}'),
                Just('é'),
                Just('😀'),
                any::<char>(),
                "[a-z]".prop_map(|s| s.chars().next().unwrap_or('a')),
            ],
            0..40,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "-?[0-9]{1,30}\\.[0-9]{1,20}"
                .prop_map(|n| Value::Number(n.parse().unwrap_or_else(|_| 0.into()))),
            tricky_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((tricky_string(), inner), 0..4)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    fn record() -> impl Strategy<Value = Option<Record>> {
        prop::option::of(
            prop::collection::vec((tricky_string(), json_value()), 0..5)
                .prop_map(|pairs| pairs.into_iter().collect()),
        )
    }

    prop_compose! {
        fn event()(
            kind in prop::sample::select(vec![
                EventType::Insert, EventType::Update, EventType::Delete,
                EventType::Truncate, EventType::Read, EventType::Message,
            ]),
            names in (tricky_string(), tricky_string(), tricky_string()),
            new in record(),
            old in record(),
            changes in prop::option::of(prop::collection::vec(
                (tricky_string(), json_value(), json_value()), 0..3)),
            unavailable in prop::collection::vec(tricky_string(), 0..3),
            timestamp in prop_oneof![any::<i64>(), 0i64..4_000_000_000_000_000],
            lsns in (any::<u64>(), any::<u64>()),
            xid in any::<u32>(),
            ordinal in any::<u64>(),
            decode_error in prop::option::of(tricky_string()),
            message in prop::option::of((tricky_string(), json_value())),
        ) -> Event {
            let mut event = crate::testing::event(kind, "posts", Value::Null, Value::Null, ordinal);
            (event.schema, event.entity, event.table) =
                (names.0.into(), names.1.into(), names.2.into());
            event.new_record = new;
            event.old_record = old;
            event.changes = changes.map(|changes| Changes(changes
                .into_iter()
                .map(|(column, old_value, new_value)| Change { column, old_value, new_value })
                .collect()));
            event.unavailable_columns = unavailable;
            event.timestamp = timestamp;
            event.lsn = crate::lsn::Lsn(lsns.0);
            event.commit_lsn = crate::lsn::Lsn(lsns.1);
            event.xid = xid;
            event.decode_error = decode_error;
            event.message = message.map(|(prefix, content)| LogicalMessage { prefix, content });
            event
        }
    }

    proptest! {
        #[test]
        fn writes_what_serde_writes(event in event()) {
            let serde = serde_json::to_vec(&event).unwrap();
            prop_assert_eq!(
                String::from_utf8(event.to_json()).unwrap(),
                String::from_utf8(serde).unwrap()
            );
        }

        #[test]
        fn escapes_strings_as_serde_does(s in tricky_string(), pad in 0usize..9) {
            // Each escape at each offset of the eight-byte words.
            let s = format!("{}{s}", "x".repeat(pad));
            let mut out = Vec::new();
            string(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }
    }

    #[test]
    fn every_byte_escapes_as_serde_escapes_it_wherever_it_falls() {
        for b in 0u8..0x80 {
            for at in 0..9 {
                let mut text = "a".repeat(at);
                text.push(char::from(b));
                text.push_str("tail-of-it");
                let mut out = Vec::new();
                string(&mut out, &text);
                assert_eq!(
                    out,
                    serde_json::to_vec(&text).unwrap(),
                    "byte {b:#x} at {at}"
                );
            }
        }
    }
}
