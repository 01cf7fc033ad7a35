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

use crate::lsn::{Lsn, Position};

mod json;
mod record;

pub use record::Record;
pub(crate) use record::{Columns, Names, Peek, Raw};

/// The kind of change an [`Event`] reports. Kinds may be added (as `message` was): a
/// `match` outside streamex needs an arm for the others, which an operator does not get
/// unless it subscribes to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EventType {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A deleted row.
    Delete,
    /// The table was truncated (the event has no records).
    Truncate,
    /// A row that existed when the operator's backfill read its table (see
    /// [`crate::operator::Operator::backfill`]): the record is the row as `to_jsonb` gives it.
    Read,
    /// A message the application wrote into the WAL inside its transaction with
    /// `pg_logical_emit_message(true, prefix, content)` (the transactional outbox, without an
    /// outbox table): the event has no records, its [`Event::message`] holds the prefix and
    /// the content, and it comes in WAL order with the transaction's changes, only if the
    /// transaction commits. See [`crate::operator::Subscription::messages`].
    Message,
}

impl EventType {
    /// `insert`, `update`, `delete`, `truncate`, `read` or `message`, as the JSON form writes
    /// it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Insert => "insert",
            EventType::Update => "update",
            EventType::Delete => "delete",
            EventType::Truncate => "truncate",
            EventType::Read => "read",
            EventType::Message => "message",
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
    /// The column.
    pub column: String,
    /// Its value before the update.
    pub old_value: Value,
    /// Its value after.
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

    /// Whether no column changed.
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
///
/// Its fields are public to read; new fields may be added, so an event is built by the
/// decoder (or, in tests, by `streamex::testing::event`), not by hand.
///
/// ```
/// # fn example(event: &streamex::Event) -> anyhow::Result<()> {
/// use streamex::EventType;
///
/// #[derive(serde::Deserialize)]
/// struct Comment { id: i64, post_id: i64, body: String }
///
/// if event.is_entity("comments") && event.kind == EventType::Insert {
///     let comment: Comment = event.new_record_as()?;
///     let post_id: i64 = event.get("post_id")?;
///     assert_eq!(comment.post_id, post_id);
///     println!("comment {} at {}: {}", comment.id, event.position(), comment.body);
/// }
/// # Ok(())
/// # }
/// ```
// A field added here is written by `json.rs` too: its proptest compares that writer with this
// derive and fails until both write the field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// insert, update, delete or truncate.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The table's schema.
    pub schema: Arc<str>,
    /// The table as operators, channels and process status name it (see [`entity_name`]):
    /// `comments` for a table of the default schema (`public` unless configured otherwise),
    /// `archive.comments` for a table of another schema.
    pub entity: Arc<str>,
    /// The table's own name, without its schema.
    pub table: Arc<str>,
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
    /// Why a value of this change could not be decoded, when one could not (the column is then
    /// absent from its record). Operators never see such an event: each listening operator
    /// applies its failure policy to it at once (halt, or dead letter), so that one bad value
    /// never stops the others. Absent from the JSON when the change decoded fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_error: Option<String>,
    /// For an event of type [`EventType::Message`]: the message. Absent from the JSON
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<LogicalMessage>,
    /// The table's key columns (its replica identity), which name the `<entity>/<id>`
    /// channel. Not serialised.
    #[serde(skip)]
    pub key_columns: Arc<[String]>,
}

impl Event {
    /// Whether this event's table is the one `name` designates, where `name` is written as in
    /// the configuration: `schema.table`, or `table` alone for a table of the default schema.
    /// So `"comments"` and `"public.comments"` both designate `public.comments` (when `public`
    /// is the default schema), and never `archive.comments`.
    pub fn is_entity(&self, name: &str) -> bool {
        if *self.entity == *name {
            return true;
        }
        match EntityName::parse(name) {
            Ok(EntityName {
                schema: Some(schema),
                table,
            }) => *self.schema == *schema && *self.table == *table,
            // Unqualified: the default schema's table, whose entity is unqualified too.
            Ok(EntityName {
                schema: None,
                table,
            }) => *self.table == *table && *self.entity == *self.table,
            Err(_) => false,
        }
    }

    /// Column `column` of the event's [`record`](Self::record) (the new row, or the old one
    /// for a delete), as `T`: `event.get::<i64>("post_id")?`. The error names the column and
    /// the table, never the value.
    pub fn get<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<T, RecordError> {
        let record = self.record().ok_or_else(|| self.no_record("a record"))?;
        let value = record
            .get(column)
            .ok_or_else(|| RecordError::MissingColumn {
                entity: self.entity.to_string(),
                column: column.to_owned(),
                unavailable: self.unavailable_columns.iter().any(|c| c == column),
            })?;
        T::deserialize(value).map_err(|_| RecordError::Type {
            entity: self.entity.to_string(),
            column: column.to_owned(),
            expected: std::any::type_name::<T>(),
            found: json_kind(value),
        })
    }

    /// The new row as `T` (a struct deriving `serde::Deserialize`, its fields named after the
    /// columns): `let post: Post = event.new_record_as()?`.
    pub fn new_record_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, RecordError> {
        let record = self
            .new_record
            .as_ref()
            .ok_or_else(|| self.no_record("a new record"))?;
        self.record_as(record)
    }

    /// The old row (its key columns under REPLICA IDENTITY DEFAULT) as `T`.
    pub fn old_record_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, RecordError> {
        let record = self
            .old_record
            .as_ref()
            .ok_or_else(|| self.no_record("an old record"))?;
        self.record_as(record)
    }

    fn record_as<T: serde::de::DeserializeOwned>(&self, record: &Record) -> Result<T, RecordError> {
        record.deserialize_as().map_err(|error| {
            let path = error.path().to_string();
            let column = path.split(['.', '[']).next().unwrap_or_default().to_owned();
            match record.get(&column) {
                Some(found) => RecordError::Type {
                    entity: self.entity.to_string(),
                    expected: std::any::type_name::<T>(),
                    found: json_kind(found),
                    column: path,
                },
                // serde names a missing field in its message ("missing field `title`"),
                // which holds no value.
                None => RecordError::Shape {
                    entity: self.entity.to_string(),
                    expected: std::any::type_name::<T>(),
                    message: error.into_inner().to_string(),
                },
            }
        })
    }

    fn no_record(&self, what: &'static str) -> RecordError {
        RecordError::NoRecord {
            entity: self.entity.to_string(),
            kind: self.kind,
            what,
        }
    }

    /// The position that identifies this event and orders it among all others.
    pub fn position(&self) -> Position {
        Position::new(self.commit_lsn, self.ordinal)
    }

    /// The content of a [`EventType::Message`] event as `T`:
    /// `let order: OrderPlaced = event.message_as()?`.
    pub fn message_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, RecordError> {
        let message = self
            .message
            .as_ref()
            .ok_or_else(|| self.no_record("message"))?;
        serde_path_to_error::deserialize(&message.content).map_err(|error| RecordError::Shape {
            entity: self.entity.to_string(),
            expected: std::any::type_name::<T>(),
            message: error.into_inner().to_string(),
        })
    }

    /// The record that identifies the row: the new one, or the old one for a delete.
    pub fn record(&self) -> Option<&Record> {
        match self.kind {
            EventType::Delete => self.old_record.as_ref(),
            _ => self.new_record.as_ref().or(self.old_record.as_ref()),
        }
    }
}

/// A message written with `pg_logical_emit_message(true, prefix, content)`: what an event of
/// type [`EventType::Message`] carries. Serialised as `{"prefix": .., "content": ..}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogicalMessage {
    /// The prefix the application gave (what operators subscribe to).
    pub prefix: String,
    /// The content: its JSON when it parses as JSON, else its text when it is UTF-8, else
    /// the bytes as PostgreSQL writes a `bytea` (`"\\x0102ff"`).
    pub content: Value,
}

impl LogicalMessage {
    /// The message of `prefix` with the raw `content` as `pg_logical_emit_message` got it.
    pub fn new(prefix: &str, content: &[u8]) -> Self {
        let content = match std::str::from_utf8(content) {
            Ok(text) => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
            }
            Err(_) => {
                let mut hex = String::with_capacity(2 + 2 * content.len());
                hex.push_str("\\x");
                for byte in content {
                    use std::fmt::Write as _;
                    let _ = write!(hex, "{byte:02x}");
                }
                Value::String(hex)
            }
        };
        LogicalMessage {
            prefix: prefix.to_owned(),
            content,
        }
    }
}

/// A record that does not give what a handler asked of it. Names the table and the column,
/// never a value (values would end up in logs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The event has no such record (a truncate has none; a delete has no new one).
    #[error("the {kind} event of {entity} has no {what}")]
    NoRecord {
        /// The event's entity.
        entity: String,
        /// The event's type.
        kind: EventType,
        /// The record asked for.
        what: &'static str,
    },
    /// The record lacks the column.
    #[error("the record of {entity} has no column {column:?}{}", if *unavailable {
        " (its value was not sent: an unchanged TOASTed value, or a generated column; see unavailable_columns)"
    } else {
        " (an old record holds only the key columns unless the table has REPLICA IDENTITY FULL)"
    })]
    MissingColumn {
        /// The event's entity.
        entity: String,
        /// The column asked for.
        column: String,
        /// Whether it is listed in `unavailable_columns` (not sent).
        unavailable: bool,
    },
    /// The column's value does not convert to the type asked for.
    #[error("column {column} of {entity} is a JSON {found}, which does not convert to {expected}")]
    Type {
        /// The event's entity.
        entity: String,
        /// The column (a path into it for nested values).
        column: String,
        /// The Rust type asked for.
        expected: &'static str,
        /// The JSON kind of the value (never the value).
        found: &'static str,
    },
    /// The record does not have the shape of the type asked for.
    #[error("the record of {entity} does not fit {expected}: {message}")]
    Shape {
        /// The event's entity.
        entity: String,
        /// The Rust type asked for.
        expected: &'static str,
        /// What serde said (a missing field's name).
        message: String,
    },
}

/// The kind of a JSON value, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The schema every table belongs to unless its name says otherwise.
pub const DEFAULT_SCHEMA: &str = "public";

/// A table's name as the configuration, operators, channels and process status write it:
/// `table` for a table of the default schema, `schema.table` otherwise. A part that holds a
/// `.` or a `"`, or is empty, is written in double quotes with `""` for a quote, as in SQL
/// (`"my.schema".posts`); otherwise names are taken exactly as written (case included).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntityName {
    /// The schema, when the name gave one.
    pub schema: Option<String>,
    /// The table.
    pub table: String,
}

/// A name that is not `table` or `schema.table`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name:?} is not a table name: write `table` or `schema.table` (double-quote a part holding a dot: \"my.schema\".table)"
)]
pub struct EntityNameError {
    /// The name as written.
    pub name: String,
}

impl EntityName {
    /// Parses `table` or `schema.table` (see the type's documentation).
    pub fn parse(name: &str) -> Result<EntityName, EntityNameError> {
        let error = || EntityNameError {
            name: name.to_owned(),
        };
        let (first, rest) = take_part(name).ok_or_else(error)?;
        match rest {
            "" => Ok(EntityName {
                schema: None,
                table: first,
            }),
            rest => {
                let rest = rest.strip_prefix('.').ok_or_else(error)?;
                let (second, tail) = take_part(rest).ok_or_else(error)?;
                if !tail.is_empty() {
                    return Err(error());
                }
                Ok(EntityName {
                    schema: Some(first),
                    table: second,
                })
            }
        }
    }

    /// The schema, `default_schema` when the name gave none.
    pub fn schema_or<'a>(&'a self, default_schema: &'a str) -> &'a str {
        self.schema.as_deref().unwrap_or(default_schema)
    }

    /// The canonical form: without the schema when it is `default_schema`.
    pub fn canonical(&self, default_schema: &str) -> String {
        entity_name(self.schema_or(default_schema), &self.table, default_schema)
    }
}

/// One part of a name: a double-quoted identifier, or the text up to the next `.`. Returns
/// the part and what follows it; `None` for an empty or unterminated part.
fn take_part(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut part = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                part.push(c);
                continue;
            }
            if quoted[i + 1..].starts_with('"') {
                part.push('"');
                chars.next();
                continue;
            }
            return Some((part, &quoted[i + 1..]));
        }
        return None;
    }
    let end = text.find('.').unwrap_or(text.len());
    let part = &text[..end];
    if part.is_empty() || part.contains('"') {
        return None;
    }
    Some((part.to_owned(), &text[end..]))
}

/// One part as [`EntityName`] writes it.
fn write_part(out: &mut String, part: &str) {
    if part.is_empty() || part.contains(['.', '"']) {
        out.push('"');
        out.push_str(&part.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(part);
    }
}

/// The entity name of table `schema.table` (see [`EntityName`]): `table` when `schema` is
/// `default_schema`, `schema.table` otherwise.
pub fn entity_name(schema: &str, table: &str, default_schema: &str) -> String {
    let mut name = String::with_capacity(schema.len() + table.len() + 1);
    if schema != default_schema {
        write_part(&mut name, schema);
        name.push('.');
    }
    write_part(&mut name, table);
    name
}

/// Microseconds since the Unix epoch, written as RFC 3339 in UTC with microseconds.
pub mod micros_rfc3339 {
    use chrono::{DateTime, SecondsFormat};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// `micros` as RFC 3339 (`2026-11-22T07:33:00.123456Z`); the number itself when out of
    /// range.
    pub fn format(micros: i64) -> String {
        match DateTime::from_timestamp_micros(micros) {
            Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true),
            None => micros.to_string(),
        }
    }

    thread_local! {
        /// The last time [`write`] wrote on this thread, as it wrote it: the events of a
        /// transaction share their commit time.
        static LAST: std::cell::Cell<Option<(i64, [u8; 27])>> = const { std::cell::Cell::new(None) };
    }

    /// Appends µs as [`format()`] writes them.
    pub(crate) fn write(out: &mut Vec<u8>, micros: i64) {
        let text = LAST.with(|last| match last.get() {
            Some((known, text)) if known == micros => Some(text),
            _ => {
                let text = usual(micros)?;
                last.set(Some((micros, text)));
                Some(text)
            }
        });
        match text {
            Some(text) => out.extend_from_slice(&text),
            None => out.extend_from_slice(format(micros).as_bytes()),
        }
    }

    /// Serialises µs as [`format()`] writes them.
    pub fn serialize<S: Serializer>(micros: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        match usual(*micros) {
            // Only ASCII digits and punctuation were written.
            Some(text) => serializer.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => serializer.serialize_str(&format(*micros)),
        }
    }

    /// [`format()`] without chrono or an allocation for a time of years 1970 to 9999 (every
    /// event has one): `None` for others.
    fn usual(micros: i64) -> Option<[u8; 27]> {
        const LAST: i64 = 253_402_300_800_000_000; // 10000-01-01T00:00:00Z
        if !(0..LAST).contains(&micros) {
            return None;
        }
        let (seconds, fraction) = (micros / 1_000_000, micros % 1_000_000);
        let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
        // H. Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z / 146_097;
        let day_of_era = z - era * 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut n: i64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, second_of_day / 3600);
        put(14, 2, second_of_day / 60 % 60);
        put(17, 2, second_of_day % 60);
        put(20, 6, fraction);
        Some(out)
    }

    /// Reads RFC 3339 back into µs since the Unix epoch.
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

    proptest::proptest! {
        #[test]
        fn timestamps_serialise_as_chrono_formats_them(micros in proptest::prelude::any::<i64>(), near in -1_000_000_000i64..1_000_000_000) {
            for micros in [micros, near, 253_402_300_800_000_000 + near] {
                #[derive(Serialize)]
                struct T(#[serde(with = "micros_rfc3339")] i64);
                proptest::prop_assert_eq!(
                    serde_json::to_string(&T(micros)).unwrap(),
                    format!("\"{}\"", micros_rfc3339::format(micros))
                );
            }
        }

        /// Written again and again, in any order: each time what `format` gives.
        #[test]
        fn timestamps_write_as_chrono_formats_them_however_often(
            times in proptest::collection::vec(0i64..4, 1..12),
            base in 0i64..253_402_300_000_000_000,
        ) {
            for step in times {
                let micros = base + step;
                let mut out = Vec::new();
                micros_rfc3339::write(&mut out, micros);
                proptest::prop_assert_eq!(out, micros_rfc3339::format(micros).into_bytes());
            }
        }
    }

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
            table: "posts".into(),
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
            decode_error: None,
            message: None,
            key_columns: Arc::from(["id".to_owned()]),
        }
    }

    #[test]
    fn serialises_with_the_documented_field_names_and_formats() {
        let value = serde_json::to_value(update()).unwrap();
        assert_eq!(
            value,
            json!({
                "type": "update", "schema": "public", "entity": "posts", "table": "posts",
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
    fn entity_names_are_qualified_outside_the_default_schema() {
        assert_eq!(entity_name("public", "comments", "public"), "comments");
        assert_eq!(
            entity_name("archive", "comments", "public"),
            "archive.comments"
        );
        assert_eq!(entity_name("app", "comments", "app"), "comments");
        assert_eq!(entity_name("public", "comments", "app"), "public.comments");
        assert_eq!(
            entity_name("my.schema", "a\"b", "public"),
            "\"my.schema\".\"a\"\"b\""
        );
        for name in [
            "comments",
            "archive.comments",
            "\"my.schema\".\"a\"\"b\"",
            "Mixed Case.T",
            "\"\".t",
        ] {
            let parsed = EntityName::parse(name).unwrap();
            assert_eq!(parsed.canonical("public"), name, "{name}");
        }
        assert_eq!(
            EntityName::parse("public.comments")
                .unwrap()
                .canonical("public"),
            "comments"
        );
        assert_eq!(
            EntityName::parse("\"my.schema\".t").unwrap(),
            EntityName {
                schema: Some("my.schema".into()),
                table: "t".into()
            }
        );
        for bad in ["", "a.b.c", ".t", "s.", "\"open", "a\"b", "\"x\"y"] {
            assert!(EntityName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_event_is_matched_by_its_entity_name_with_or_without_the_default_schema() {
        let mut event = update();
        assert!(event.is_entity("posts"));
        assert!(event.is_entity("public.posts"));
        assert!(!event.is_entity("archive.posts"));
        event.schema = "archive".into();
        event.entity = "archive.posts".into();
        assert!(event.is_entity("archive.posts"));
        assert!(
            !event.is_entity("posts"),
            "posts means the default schema's"
        );
        assert!(!event.is_entity("public.posts"));
    }

    #[test]
    fn columns_and_records_convert_to_types_naming_the_column() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Post {
            id: i64,
            title: String,
        }
        let event = update();
        assert_eq!(event.get::<i64>("id").unwrap(), 1);
        assert_eq!(event.get::<String>("title").unwrap(), "New");
        assert_eq!(
            event.new_record_as::<Post>().unwrap(),
            Post {
                id: 1,
                title: "New".into()
            }
        );
        assert_eq!(event.old_record_as::<Post>().unwrap().title, "Old");
        let error = event.get::<i64>("title").unwrap_err().to_string();
        assert!(
            error.contains("title") && error.contains("string") && !error.contains("New"),
            "{error}"
        );
        let error = event.get::<i64>("nope").unwrap_err().to_string();
        assert!(error.contains("nope") && error.contains("posts"), "{error}");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Wrong {
            id: i64,
            title: i64,
        }
        let error = event.new_record_as::<Wrong>().unwrap_err().to_string();
        assert!(error.contains("title") && !error.contains("New"), "{error}");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Missing {
            body: String,
        }
        let error = event.new_record_as::<Missing>().unwrap_err().to_string();
        assert!(error.contains("body"), "{error}");
        let mut truncate = update();
        truncate.kind = EventType::Truncate;
        truncate.new_record = None;
        truncate.old_record = None;
        let error = truncate.get::<i64>("id").unwrap_err().to_string();
        assert!(error.contains("truncate"), "{error}");
    }

    #[test]
    fn a_delete_is_identified_by_its_old_record() {
        let mut event = update();
        event.kind = EventType::Delete;
        event.new_record = None;
        assert_eq!(event.record().unwrap()["title"], json!("Old"));
    }
}
