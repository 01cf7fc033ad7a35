//! [`Record`]: one row of a change, its values by column position, its column names shared by
//! every row of the table.
//!
//! The decoder builds one record per row of every change, so a record costs two allocations
//! (its slots and its text) and no name: the names are the table's, from its last Relation
//! message, held once behind an `Arc` ([`Columns`]) by every record of the table. A column with
//! no value in the record (unchanged TOAST that was not sent, a value that could not be
//! converted, a column outside the key of an old key) is absent, as a key missing from a JSON
//! object is.
//!
//! The values of the common types (text, numbers, dates and timestamps of the usual shape)
//! stay the text the server sent, checked when decoded ([`Raw`]): one is converted to its
//! JSON value the first time something reads it, and an event's JSON is written from the text
//! straight. Most operators read a column or two of a row, and tail, SSE and JetStream read
//! none, so most values are never built. The text is the record's own copy, not a slice of
//! the message it came in: a record kept for long holds its own bytes, not the stream's.

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The column names of a table's records, in the order of its values; shared by every record
/// of the table.
pub(crate) type Columns = Arc<Names>;

/// Column names, each also as the JSON of an object key (`"name":`), escaped once for every
/// event's JSON. Reads as the slice of names.
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: Box<[Box<str>]>,
    json_keys: Box<[Box<[u8]>]>,
}

impl Names {
    /// `names`, shared.
    pub(crate) fn shared(names: Vec<Box<str>>) -> Columns {
        let json_keys = names
            .iter()
            .map(|name| {
                let mut key = Vec::with_capacity(name.len() + 3);
                super::json::string(&mut key, name);
                key.push(b':');
                key.into_boxed_slice()
            })
            .collect();
        Arc::new(Names {
            names: names.into_boxed_slice(),
            json_keys,
        })
    }
}

impl std::ops::Deref for Names {
    type Target = [Box<str>];

    fn deref(&self) -> &[Box<str>] {
        &self.names
    }
}

/// A row: each column's value exactly as PostgreSQL's `to_jsonb(row)` gives it (the README's
/// "What an event looks like" gives the mapping), in column order.
///
/// It reads like a JSON object: [`get`](Self::get) a column, [`iter`](Self::iter) over the
/// columns that have a value, index it (`record["title"]`, `Value::Null` for a column it does
/// not have); serialised, it is the JSON object of its columns. [`Record::from`] a
/// `serde_json::Map` (or [`FromIterator`] of pairs) builds one, for tests;
/// [`Value::from`] turns one into a JSON object.
#[derive(Clone, Default)]
pub struct Record {
    columns: Columns,
    /// One slot per column of `columns`.
    values: Vec<Slot>,
    /// The text of the [`Slot::Raw`] values, one after the other.
    text: Vec<u8>,
}

/// A value kept as the text the server sent: the decoder checked that its conversion cannot
/// fail and that the text is what the JSON is written from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Raw {
    /// Valid UTF-8, the value of a JSON string (text, varchar, date, uuid, ...).
    Text,
    /// A number as `numeric` writes it (JSON syntax, no exponent, no negative zero): its text
    /// is its JSON.
    Number,
    /// A timestamp of the shape `2024-01-02 03:04:05[.123456]` (ASCII digits and
    /// punctuation), `to_jsonb` writing a `T` for the space.
    Timestamp,
    /// The same with a whole-hour offset (`+05`), which `to_jsonb` writes `+05:00`.
    TimestampTz,
}

impl Raw {
    /// The JSON value of `text`, exactly what the decoder's conversion gives for it.
    pub(crate) fn to_value(self, text: &[u8]) -> Value {
        match self {
            // Checked UTF-8: never lossy.
            Raw::Text => Value::String(String::from_utf8_lossy(text).into_owned()),
            Raw::Number => {
                let s = String::from_utf8_lossy(text);
                s.parse::<serde_json::Number>()
                    .map_or_else(|_| Value::String(s.into_owned()), Value::Number)
            }
            Raw::Timestamp | Raw::TimestampTz => {
                let mut out = Vec::with_capacity(text.len() + 3);
                self.write_timestamp(&mut out, text);
                // ASCII (checked): never lossy.
                Value::String(
                    String::from_utf8(out)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                )
            }
        }
    }

    /// Appends the JSON of `text`, as [`Raw::to_value`]'s value is written.
    pub(crate) fn write_json(self, out: &mut Vec<u8>, text: &[u8]) {
        match self {
            Raw::Text => super::json::string_bytes(out, text),
            Raw::Number => out.extend_from_slice(text),
            Raw::Timestamp | Raw::TimestampTz => {
                out.push(b'"');
                self.write_timestamp(out, text);
                out.push(b'"');
            }
        }
    }

    /// A usual timestamp's text as `to_jsonb` writes it (no quotes): `T` for the space, and
    /// minutes after a whole-hour offset.
    fn write_timestamp(self, out: &mut Vec<u8>, text: &[u8]) {
        let (date, time) = text.split_at(text.len().min(10));
        out.extend_from_slice(date);
        out.push(b'T');
        out.extend_from_slice(time.get(1..).unwrap_or_default());
        if self == Raw::TimestampTz {
            out.extend_from_slice(b":00");
        }
    }
}

/// One column's place in a record.
#[derive(Clone, Default)]
enum Slot {
    /// No value.
    #[default]
    Absent,
    Value(Value),
    /// `text[start..start + len]` of the record, converted to `value` on first read.
    Raw {
        kind: Raw,
        start: u32,
        len: u32,
        value: OnceLock<Value>,
    },
}

/// A value as the record holds it, without converting it.
pub(crate) enum Peek<'a> {
    Value(&'a Value),
    Raw(Raw, &'a [u8]),
}

impl Peek<'_> {
    /// Appends the value's JSON.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Peek::Value(v) => super::json::value(out, v),
            Peek::Raw(kind, text) => kind.write_json(out, text),
        }
    }
}

impl Record {
    /// An empty record; [`insert`](Self::insert) adds columns.
    pub fn new() -> Self {
        Record::default()
    }

    /// A record of `columns` with no value yet; [`set`](Self::set) fills them by position.
    pub(crate) fn of(columns: &Columns) -> Self {
        Record {
            columns: Arc::clone(columns),
            values: std::iter::repeat_with(Slot::default)
                .take(columns.len())
                .collect(),
            text: Vec::new(),
        }
    }

    /// [`Record::of`], with room for `text` bytes of [`set_raw`](Self::set_raw) values.
    pub(crate) fn with_text_capacity(columns: &Columns, text: usize) -> Self {
        let mut record = Record::of(columns);
        record.text.reserve_exact(text);
        record
    }

    /// Sets the value of the column at `index` (a position in the record's columns).
    pub(crate) fn set(&mut self, index: usize, value: Value) {
        self.values[index] = Slot::Value(value);
    }

    /// Sets the column at `index` to `text`, which the decoder checked is a value of `kind`
    /// (see [`Raw`]), converted when first read.
    pub(crate) fn set_raw(&mut self, index: usize, kind: Raw, text: &[u8]) {
        let start = self.text.len();
        match (u32::try_from(start), u32::try_from(text.len())) {
            (Ok(start32), Ok(len)) if start32.checked_add(len).is_some() => {
                self.text.extend_from_slice(text);
                self.values[index] = Slot::Raw {
                    kind,
                    start: start32,
                    len,
                    value: OnceLock::new(),
                };
            }
            // Past 4 GiB of text in one row: converted now.
            _ => self.values[index] = Slot::Value(kind.to_value(text)),
        }
    }

    /// Sets the column at `index` to what `other` (a record of the same columns) holds there,
    /// without converting it; absent when `other` has nothing there. Whether it had a value.
    pub(crate) fn copy_from(&mut self, other: &Record, index: usize) -> bool {
        match other.values.get(index) {
            Some(Slot::Value(v)) => self.set(index, v.clone()),
            Some(Slot::Raw {
                kind, start, len, ..
            }) => self.set_raw(index, *kind, other.raw_text(*start, *len)),
            Some(Slot::Absent) | None => return false,
        }
        true
    }

    /// The value at column position `index`, if the record has one.
    pub(crate) fn at(&self, index: usize) -> Option<&Value> {
        self.resolve(self.values.get(index)?)
    }

    /// The value at column position `index`, built anew if raw (not kept in the record: for
    /// a value read once, such as a change's old and new value).
    pub(crate) fn value_at(&self, index: usize) -> Option<Value> {
        Some(match self.peek_at(index)? {
            Peek::Value(v) => v.clone(),
            Peek::Raw(kind, text) => kind.to_value(text),
        })
    }

    /// The value at column position `index` as the record holds it, without converting it.
    pub(crate) fn peek_at(&self, index: usize) -> Option<Peek<'_>> {
        match self.values.get(index)? {
            Slot::Absent => None,
            Slot::Value(v) => Some(Peek::Value(v)),
            Slot::Raw {
                kind, start, len, ..
            } => Some(Peek::Raw(*kind, self.raw_text(*start, *len))),
        }
    }

    /// [`peek_at`](Self::peek_at) by column name.
    pub(crate) fn peek(&self, column: &str) -> Option<Peek<'_>> {
        self.peek_at(self.position(column)?)
    }

    /// Whether the values at position `index` of the two records (of the same columns) are
    /// equal; `None` when either has none. Compares text with text where both have it.
    pub(crate) fn same_at(&self, other: &Record, index: usize) -> Option<bool> {
        match (self.peek_at(index)?, other.peek_at(index)?) {
            (Peek::Raw(a, x), Peek::Raw(b, y)) if a == b => Some(x == y),
            _ => Some(self.at(index)? == other.at(index)?),
        }
    }

    /// A slot's value, converting a raw one the first time.
    fn resolve<'a>(&'a self, slot: &'a Slot) -> Option<&'a Value> {
        match slot {
            Slot::Absent => None,
            Slot::Value(v) => Some(v),
            Slot::Raw {
                kind,
                start,
                len,
                value,
            } => Some(value.get_or_init(|| kind.to_value(self.raw_text(*start, *len)))),
        }
    }

    fn raw_text(&self, start: u32, len: u32) -> &[u8] {
        let (start, len) = (start as usize, len as usize);
        self.text.get(start..start + len).unwrap_or_default()
    }

    /// A slot's value taken out (converted if raw).
    fn take(&mut self, index: usize) -> Option<Value> {
        match std::mem::take(&mut self.values[index]) {
            Slot::Absent => None,
            Slot::Value(v) => Some(v),
            Slot::Raw {
                kind,
                start,
                len,
                value,
            } => Some(
                value
                    .into_inner()
                    .unwrap_or_else(|| kind.to_value(self.raw_text(start, len))),
            ),
        }
    }

    /// What the record's values take on the heap beyond their slots: the raw text, and
    /// `value_bytes` of each value that has been built.
    pub(crate) fn heap_bytes(&self, value_bytes: impl Fn(&Value) -> usize) -> (usize, usize) {
        let built = self
            .values
            .iter()
            .map(|slot| match slot {
                Slot::Absent => 0,
                Slot::Value(v) => value_bytes(v),
                Slot::Raw { value, .. } => value.get().map_or(0, &value_bytes),
            })
            .sum();
        (self.text.capacity(), built)
    }

    /// The size of one slot (the values vector holds [`slots`](Self::slots) of them).
    pub(crate) const SLOT_SIZE: usize = std::mem::size_of::<Slot>();

    /// How many columns the record has room for (with a value or not).
    pub(crate) fn slots(&self) -> usize {
        self.values.len()
    }

    /// The value of `column`, if the record has one.
    pub fn get(&self, column: &str) -> Option<&Value> {
        let index = self.position(column)?;
        self.resolve(&self.values[index])
    }

    /// Whether the record has a value for `column`.
    pub fn contains_key(&self, column: &str) -> bool {
        self.get(column).is_some()
    }

    /// Sets `column` to `value`, adding the column when the record's columns lack it; returns
    /// the value it had.
    pub fn insert(&mut self, column: String, value: Value) -> Option<Value> {
        match self.position(&column) {
            Some(index) => {
                let old = self.take(index);
                self.values[index] = Slot::Value(value);
                old
            }
            None => {
                let mut columns = self.columns.to_vec();
                columns.push(column.into_boxed_str());
                self.columns = Names::shared(columns);
                self.values.push(Slot::Value(value));
                None
            }
        }
    }

    /// Takes the value of `column` out of the record.
    pub fn remove(&mut self, column: &str) -> Option<Value> {
        let index = self.position(column)?;
        self.take(index)
    }

    /// The columns that have a value, with it, in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.columns
            .iter()
            .zip(&self.values)
            .filter_map(|(name, slot)| Some((&**name, self.resolve(slot)?)))
    }

    /// The columns that have a value, each as the JSON of its key (`"name":`), with the value
    /// as the record holds it.
    pub(crate) fn json_entries(&self) -> impl Iterator<Item = (&[u8], Peek<'_>)> {
        self.columns
            .json_keys
            .iter()
            .enumerate()
            .filter_map(|(i, key)| Some((&**key, self.peek_at(i)?)))
    }

    /// The names of the columns that have a value, in column order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(name, _)| name)
    }

    /// The values, in column order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.values.iter().filter_map(|slot| self.resolve(slot))
    }

    /// How many columns have a value.
    pub fn len(&self) -> usize {
        self.values
            .iter()
            .filter(|v| !matches!(v, Slot::Absent))
            .count()
    }

    /// Whether no column has a value.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|v| matches!(v, Slot::Absent))
    }

    /// The record as a JSON object map.
    pub fn to_map(&self) -> serde_json::Map<String, Value> {
        self.iter()
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .collect()
    }

    /// The record as `T` (a struct deriving `Deserialize`, fields named after the columns),
    /// read in place; `serde_path_to_error` gives the path of a mismatch.
    pub(crate) fn deserialize_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
        let map = serde::de::value::MapDeserializer::<_, serde_json::Error>::new(self.iter());
        serde_path_to_error::deserialize(map)
    }

    /// The position of `column` among the record's columns. Tables have few columns, so a
    /// scan (which compares lengths first) beats hashing the name.
    fn position(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|name| **name == *column)
    }
}

/// `record["column"]`: the column's value, `Value::Null` when the record has none (as
/// indexing a JSON value does).
impl std::ops::Index<&str> for Record {
    type Output = Value;

    fn index(&self, column: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.get(column).unwrap_or(&NULL)
    }
}

/// Two records are equal when they have the same columns with the same values, in the same
/// order (whatever columns without a value each has).
impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl From<serde_json::Map<String, Value>> for Record {
    fn from(map: serde_json::Map<String, Value>) -> Self {
        map.into_iter().collect()
    }
}

impl<K: Into<String>> FromIterator<(K, Value)> for Record {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(pairs: I) -> Self {
        let mut builder = Builder::with_capacity(0);
        for (name, value) in pairs {
            builder.push(name.into(), value);
        }
        builder.finish()
    }
}

/// A record's columns and values gathered pair by pair, its names shared once at the end.
struct Builder {
    columns: Vec<Box<str>>,
    values: Vec<Slot>,
}

impl Builder {
    fn with_capacity(n: usize) -> Self {
        Builder {
            columns: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
        }
    }

    /// Adds `name`; a repeated name keeps its first place and its last value, as a JSON
    /// object map does.
    fn push(&mut self, name: String, value: Value) {
        match self.columns.iter().position(|c| **c == *name) {
            Some(i) => self.values[i] = Slot::Value(value),
            None => {
                self.columns.push(name.into_boxed_str());
                self.values.push(Slot::Value(value));
            }
        }
    }

    fn finish(self) -> Record {
        Record {
            columns: Names::shared(self.columns),
            values: self.values,
            text: Vec::new(),
        }
    }
}

impl From<Record> for Value {
    fn from(mut record: Record) -> Self {
        let columns = Arc::clone(&record.columns);
        Value::Object(
            columns
                .iter()
                .enumerate()
                .filter_map(|(i, name)| Some((name.to_string(), record.take(i)?)))
                .collect(),
        )
    }
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordVisitor;

        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = Record;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of column name to value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Record, A::Error> {
                let mut builder = Builder::with_capacity(access.size_hint().unwrap_or(0));
                while let Some((name, value)) = access.next_entry::<String, Value>()? {
                    builder.push(name, value);
                }
                Ok(builder.finish())
            }
        }

        deserializer.deserialize_map(RecordVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn columns(names: &[&str]) -> Columns {
        Names::shared(names.iter().map(|n| Box::from(*n)).collect())
    }

    #[test]
    fn absent_columns_are_absent_everywhere() {
        let mut record = Record::of(&columns(&["id", "title", "body"]));
        record.set(0, json!(1));
        record.set(2, json!("text"));
        assert_eq!(record.get("id"), Some(&json!(1)));
        assert_eq!(record.get("title"), None);
        assert!(!record.contains_key("title"));
        assert_eq!(record["title"], Value::Null);
        assert_eq!(record["nope"], Value::Null);
        assert_eq!(record.len(), 2);
        assert_eq!(record.keys().collect::<Vec<_>>(), ["id", "body"]);
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"id":1,"body":"text"}"#
        );
        assert_eq!(Value::from(record), json!({"id": 1, "body": "text"}));
    }

    #[test]
    fn raw_values_are_written_from_their_text_and_built_once_when_read() {
        let cols = columns(&["id", "body", "at", "day"]);
        let mut record = Record::with_text_capacity(&cols, 64);
        record.set_raw(0, Raw::Number, b"12");
        record.set_raw(1, Raw::Text, "say \"hé\"\n".as_bytes());
        record.set_raw(2, Raw::TimestampTz, b"2024-01-02 03:04:05.5+00");
        record.set_raw(3, Raw::Timestamp, b"2024-01-02 03:04:05");
        let mut out = Vec::new();
        for (key, value) in record.json_entries() {
            out.extend_from_slice(key);
            value.write_json(&mut out);
            out.push(b',');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""id":12,"body":"say \"hé\"\n","at":"2024-01-02T03:04:05.5+00:00","day":"2024-01-02T03:04:05","#
        );
        assert_eq!(record.heap_bytes(|_| 1).1, 0, "writing builds nothing");
        assert_eq!(record.get("id"), Some(&json!(12)));
        assert_eq!(
            record.heap_bytes(|_| 1).1,
            1,
            "reading builds the value read"
        );
        let expected = json!({
            "id": 12, "body": "say \"hé\"\n", "at": "2024-01-02T03:04:05.5+00:00",
            "day": "2024-01-02T03:04:05",
        });
        let copy = record.clone();
        assert_eq!(copy, record);
        assert_eq!(serde_json::to_value(&copy).unwrap(), expected);
        assert_eq!(Value::from(copy), expected);

        // Copied as text; compared as text with text, as values otherwise.
        let mut key = Record::of(&cols);
        assert!(key.copy_from(&record, 2));
        assert!(matches!(
            key.peek_at(2),
            Some(Peek::Raw(Raw::TimestampTz, _))
        ));
        assert!(!key.copy_from(&Record::of(&cols), 0));
        let mut other = Record::of(&cols);
        other.set(0, json!(12));
        other.set_raw(1, Raw::Text, b"say");
        assert_eq!(record.same_at(&other, 0), Some(true));
        assert_eq!(record.same_at(&other, 1), Some(false));
        assert_eq!(record.same_at(&key, 2), Some(true));
        assert_eq!(record.same_at(&other, 2), None);

        assert_eq!(
            record.insert("body".into(), json!(null)),
            Some(expected["body"].clone())
        );
        assert_eq!(record.remove("at"), Some(expected["at"].clone()));
        assert_eq!(record.keys().collect::<Vec<_>>(), ["id", "body", "day"]);
    }

    #[test]
    fn records_of_other_columns_compare_by_what_they_hold() {
        let mut wide = Record::of(&columns(&["id", "title", "body"]));
        wide.set(0, json!(1));
        wide.set(1, json!("t"));
        let narrow: Record = [("id", json!(1)), ("title", json!("t"))]
            .into_iter()
            .collect();
        assert_eq!(wide, narrow);
        let reordered: Record = [("title", json!("t")), ("id", json!(1))]
            .into_iter()
            .collect();
        assert_ne!(wide, reordered);
        wide.remove("title");
        assert_ne!(wide, narrow);
    }

    #[test]
    fn insert_replaces_or_adds_without_touching_other_records() {
        let shared = columns(&["id"]);
        let mut a = Record::of(&shared);
        a.set(0, json!(1));
        let mut b = a.clone();
        assert_eq!(b.insert("id".into(), json!(2)), Some(json!(1)));
        assert_eq!(b.insert("extra".into(), json!(true)), None);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["id"]);
        assert_eq!(Value::from(b), json!({"id": 2, "extra": true}));
    }

    #[test]
    fn round_trips_through_json_keeping_order_and_the_last_repeated_key() {
        let record: Record = serde_json::from_str(r#"{"b":1,"a":[2],"b":3}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"b":3,"a":[2]}"#
        );
        let error = serde_json::from_str::<Record>("[1]")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("a JSON object of column name to value"),
            "{error}"
        );
    }

    #[test]
    fn deserializes_into_a_struct_in_place_naming_the_bad_field() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Post {
            id: i64,
            title: Option<String>,
        }
        let record: Record = [("id", json!(7)), ("title", json!("x"))]
            .into_iter()
            .collect();
        assert_eq!(
            record.deserialize_as::<Post>().unwrap(),
            Post {
                id: 7,
                title: Some("x".into())
            }
        );
        let bad: Record = [("id", json!("seven"))].into_iter().collect();
        let error = bad.deserialize_as::<Post>().unwrap_err();
        assert_eq!(error.path().to_string(), "id");
    }
}
