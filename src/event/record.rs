//! [`Record`]: one row of a change, its values by column position, its column names shared by
//! every row of the table.
//!
//! The decoder builds one record per row of every change, so a record costs one allocation
//! (its values) and no name: the names are the table's, from its last Relation message, held
//! once behind an `Arc` ([`Columns`]) by every record of the table. A column with no value in
//! the record (unchanged TOAST that was not sent, a value that could not be converted, a
//! column outside the key of an old key) is absent, as a key missing from a JSON object is.

use std::fmt;
use std::sync::Arc;

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
    /// One slot per column of `columns`: `None` where the record has no value.
    values: Vec<Option<Value>>,
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
            values: vec![None; columns.len()],
        }
    }

    /// Sets the value of the column at `index` (a position in the record's columns).
    pub(crate) fn set(&mut self, index: usize, value: Value) {
        self.values[index] = Some(value);
    }

    /// The value at column position `index`, if the record has one.
    pub(crate) fn at(&self, index: usize) -> Option<&Value> {
        self.values.get(index)?.as_ref()
    }

    /// How many columns the record has room for (with a value or not).
    pub(crate) fn slots(&self) -> usize {
        self.values.len()
    }

    /// The value of `column`, if the record has one.
    pub fn get(&self, column: &str) -> Option<&Value> {
        let index = self.position(column)?;
        self.values[index].as_ref()
    }

    /// Whether the record has a value for `column`.
    pub fn contains_key(&self, column: &str) -> bool {
        self.get(column).is_some()
    }

    /// Sets `column` to `value`, adding the column when the record's columns lack it; returns
    /// the value it had.
    pub fn insert(&mut self, column: String, value: Value) -> Option<Value> {
        match self.position(&column) {
            Some(index) => self.values[index].replace(value),
            None => {
                let mut columns = self.columns.to_vec();
                columns.push(column.into_boxed_str());
                self.columns = Names::shared(columns);
                self.values.push(Some(value));
                None
            }
        }
    }

    /// Takes the value of `column` out of the record.
    pub fn remove(&mut self, column: &str) -> Option<Value> {
        let index = self.position(column)?;
        self.values[index].take()
    }

    /// The columns that have a value, with it, in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.columns
            .iter()
            .zip(&self.values)
            .filter_map(|(name, value)| Some((&**name, value.as_ref()?)))
    }

    /// The columns that have a value, each as the JSON of its key (`"name":`), with it.
    pub(crate) fn json_entries(&self) -> impl Iterator<Item = (&[u8], &Value)> {
        self.columns
            .json_keys
            .iter()
            .zip(&self.values)
            .filter_map(|(key, value)| Some((&**key, value.as_ref()?)))
    }

    /// The names of the columns that have a value, in column order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(name, _)| name)
    }

    /// The values, in column order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.values.iter().flatten()
    }

    /// How many columns have a value.
    pub fn len(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    /// Whether no column has a value.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
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
    values: Vec<Option<Value>>,
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
            Some(i) => self.values[i] = Some(value),
            None => {
                self.columns.push(name.into_boxed_str());
                self.values.push(Some(value));
            }
        }
    }

    fn finish(self) -> Record {
        Record {
            columns: Names::shared(self.columns),
            values: self.values,
        }
    }
}

impl From<Record> for Value {
    fn from(record: Record) -> Self {
        let columns = record.columns;
        Value::Object(
            columns
                .iter()
                .zip(record.values)
                .filter_map(|(name, value)| Some((name.to_string(), value?)))
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
