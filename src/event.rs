//! The change event: what every stage after the decoder works on.
//!
//! One [`Event`] is one committed change to one row, or one truncated table. Events come out
//! in WAL order, transaction by transaction, and inside a transaction in the order the changes
//! were made. `(commit_lsn, ordinal)` identifies an event uniquely and orders all events
//! totally, so it is the idempotency key for anything acting outside the database.
//!
//! Serialised (as `streamex tail` prints it), an event is one JSON object:
//!
//! ```json
//! {"type":"update","schema":"public","entity":"posts",
//!  "new_record":{"id":1,"title":"New"},"old_record":{"id":1,"title":"Old"},
//!  "changes":{"title":{"old_value":"Old","new_value":"New"}},"unavailable_columns":[],
//!  "timestamp":"2026-11-22T07:33:00.123456Z","lsn":"0/1A2B3C8","commit_lsn":"0/1A2B4F0",
//!  "xid":750,"ordinal":0}
//! ```

use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::replication::Lsn;

/// A row as a JSON object of column name to value, each value exactly as PostgreSQL's
/// `to_jsonb(row)` gives it (see [`crate::decode`] for the mapping).
pub type Record = serde_json::Map<String, Value>;

/// The kind of change an [`Event`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Insert => "insert",
            EventType::Update => "update",
            EventType::Delete => "delete",
            EventType::Truncate => "truncate",
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One column whose value an update changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub column: String,
    pub old_value: Value,
    pub new_value: Value,
}

/// The columns an update changed, in column order; serialised as
/// `{"column": {"old_value": .., "new_value": ..}}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes(pub Vec<Change>);

impl Changes {
    /// The change to `column`, if it changed.
    pub fn get(&self, column: &str) -> Option<&Change> {
        self.0.iter().find(|c| c.column == column)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Changes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Values<'a> {
            old_value: &'a Value,
            new_value: &'a Value,
        }
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for change in &self.0 {
            map.serialize_entry(
                &change.column,
                &Values {
                    old_value: &change.old_value,
                    new_value: &change.new_value,
                },
            )?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Changes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Values {
            old_value: Value,
            new_value: Value,
        }
        let map = serde_json::Map::<String, Value>::deserialize(deserializer)?;
        map.into_iter()
            .map(|(column, v)| {
                let v: Values = serde_json::from_value(v).map_err(serde::de::Error::custom)?;
                Ok(Change {
                    column,
                    old_value: v.old_value,
                    new_value: v.new_value,
                })
            })
            .collect::<Result<_, _>>()
            .map(Changes)
    }
}

/// One committed change to one row, or one truncated table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// insert, update, delete or truncate.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The table's schema.
    pub schema: Arc<str>,
    /// The table's name.
    pub entity: Arc<str>,
    /// The row after an insert or update. A column whose value PostgreSQL did not send
    /// (unchanged TOAST, with no old row to take it from) is absent, and listed in
    /// `unavailable_columns`.
    pub new_record: Option<Record>,
    /// The row before an update or delete: the whole row under REPLICA IDENTITY FULL, the
    /// key columns otherwise (absent when the table has no replica identity).
    pub old_record: Option<Record>,
    /// For an update whose whole old row is known (REPLICA IDENTITY FULL): the columns whose
    /// value changed.
    pub changes: Option<Changes>,
    /// Columns of `new_record` whose value was not sent (unchanged TOAST values).
    #[serde(default)]
    pub unavailable_columns: Vec<String>,
    /// The commit time, in microseconds since the Unix epoch; serialised as RFC 3339 UTC.
    #[serde(with = "micros_rfc3339")]
    pub timestamp: i64,
    /// Where the change is in the WAL.
    pub lsn: Lsn,
    /// Where its transaction's commit record is in the WAL.
    pub commit_lsn: Lsn,
    /// The transaction id.
    pub xid: u32,
    /// The change's position inside its transaction, from 0.
    pub ordinal: u64,
    /// The table's key columns (its replica identity), which name the `<entity>/<id>`
    /// channel. Not serialised.
    #[serde(skip)]
    pub key_columns: Arc<[String]>,
}

impl Event {
    /// The position that identifies this event and orders it among all others.
    pub fn position(&self) -> (Lsn, u64) {
        (self.commit_lsn, self.ordinal)
    }

    /// The record that identifies the row: the new one, or the old one for a delete.
    pub fn record(&self) -> Option<&Record> {
        match self.kind {
            EventType::Delete => self.old_record.as_ref(),
            _ => self.new_record.as_ref().or(self.old_record.as_ref()),
        }
    }
}

/// Microseconds since the Unix epoch, written as RFC 3339 in UTC with microseconds.
pub mod micros_rfc3339 {
    use chrono::{DateTime, SecondsFormat};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn format(micros: i64) -> String {
        match DateTime::from_timestamp_micros(micros) {
            Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true),
            None => micros.to_string(),
        }
    }

    pub fn serialize<S: Serializer>(micros: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format(*micros))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.timestamp_micros())
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update() -> Event {
        let mut new = Record::new();
        new.insert("id".into(), json!(1));
        new.insert("title".into(), json!("New"));
        let mut old = Record::new();
        old.insert("id".into(), json!(1));
        old.insert("title".into(), json!("Old"));
        Event {
            kind: EventType::Update,
            schema: "public".into(),
            entity: "posts".into(),
            new_record: Some(new),
            old_record: Some(old),
            changes: Some(Changes(vec![Change {
                column: "title".into(),
                old_value: json!("Old"),
                new_value: json!("New"),
            }])),
            unavailable_columns: vec![],
            timestamp: 1_700_000_000_123_456,
            lsn: Lsn(0x1A2B3C8),
            commit_lsn: Lsn(0x1_0000_0010),
            xid: 750,
            ordinal: 3,
            key_columns: Arc::from(["id".to_owned()]),
        }
    }

    #[test]
    fn serialises_with_the_documented_field_names_and_formats() {
        let value = serde_json::to_value(update()).unwrap();
        assert_eq!(
            value,
            json!({
                "type": "update", "schema": "public", "entity": "posts",
                "new_record": {"id": 1, "title": "New"},
                "old_record": {"id": 1, "title": "Old"},
                "changes": {"title": {"old_value": "Old", "new_value": "New"}},
                "unavailable_columns": [],
                "timestamp": "2023-11-14T22:13:20.123456Z",
                "lsn": "0/1A2B3C8", "commit_lsn": "1/10", "xid": 750, "ordinal": 3
            })
        );
    }

    #[test]
    fn round_trips_through_json() {
        let event = update();
        let text = serde_json::to_string(&event).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back,
            Event {
                key_columns: Arc::from([]),
                ..event
            }
        );
    }

    #[test]
    fn a_delete_is_identified_by_its_old_record() {
        let mut event = update();
        event.kind = EventType::Delete;
        event.new_record = None;
        assert_eq!(event.record().unwrap()["title"], json!("Old"));
    }
}
