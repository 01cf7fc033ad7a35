//! Channel names for an event.

use serde_json::Value;

use crate::event::{Event, EventType, Record};

/// What the channel names of one entity's events depend on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSpec {
    /// The primary-key columns, in key order; empty when the table has no primary key (then
    /// there is no `<entity>/<id>` channel).
    pub key_columns: Vec<String>,
    /// The scopes declared for the entity; each is a list of `(field, parent_entity)` pairs,
    /// outermost first: `[("org_id", "orgs"), ("post_id", "posts")]` gives
    /// `orgs/<org_id>/posts/<post_id>/<entity>`.
    pub scopes: Vec<Vec<(String, String)>>,
}

impl ChannelSpec {
    /// A spec with these key columns and no scopes.
    pub fn new<I, S>(key_columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ChannelSpec {
            key_columns: key_columns.into_iter().map(Into::into).collect(),
            scopes: Vec::new(),
        }
    }

    /// Adds a scope of `(field, parent_entity)` pairs, outermost first.
    pub fn with_scope<I, F, P>(mut self, scope: I) -> Self
    where
        I: IntoIterator<Item = (F, P)>,
        F: Into<String>,
        P: Into<String>,
    {
        self.scopes.push(
            scope
                .into_iter()
                .map(|(f, p)| (f.into(), p.into()))
                .collect(),
        );
        self
    }
}

/// A JSON value as it appears in a channel name: a string without quotes, a number as its
/// digits, a boolean as `true`/`false`, anything else but null as its JSON text; `%`, `/` and
/// `,` percent-encoded. `None` for null, which gives no channel.
pub fn value_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Number(n) => return Some(n.to_string()),
        Value::Bool(b) => return Some(b.to_string()),
        other => other.to_string(),
    };
    if !text.contains(['%', '/', ',']) {
        return Some(text);
    }
    let mut escaped = String::with_capacity(text.len() + 6);
    for c in text.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            '/' => escaped.push_str("%2F"),
            ',' => escaped.push_str("%2C"),
            c => escaped.push(c),
        }
    }
    Some(escaped)
}

/// The row's id for `<entity>/<id>`: the key values joined with `,`, or `None` when there is
/// no key or a key value is null or absent.
pub(crate) fn row_id(record: &Record, key_columns: &[String]) -> Option<String> {
    if key_columns.is_empty() {
        return None;
    }
    let mut id = String::new();
    for (i, column) in key_columns.iter().enumerate() {
        if i > 0 {
            id.push(',');
        }
        id.push_str(&value_text(record.get(column)?)?);
    }
    Some(id)
}

/// The scope prefix `parent/<value>/parent2/<value2>/`, or `None` when a field is null or
/// absent (or the scope is empty).
fn scope_prefix(record: &Record, scope: &[(String, String)]) -> Option<String> {
    if scope.is_empty() {
        return None;
    }
    let mut prefix = String::new();
    for (field, parent) in scope {
        let value = value_text(record.get(field)?)?;
        prefix.push_str(parent);
        prefix.push('/');
        prefix.push_str(&value);
        prefix.push('/');
    }
    Some(prefix)
}

/// The channels `event` is published on, given its entity's `spec`: `<entity>`, then
/// `<entity>/<id>`, then for each scope in order the scoped entity channel and its `/<id>`.
/// A truncate (or an event without a record) goes to `<entity>` only. No name appears twice.
pub fn channels(event: &Event, spec: &ChannelSpec) -> Vec<String> {
    if event.kind == EventType::Message {
        return vec![message_channel(&event.entity)];
    }
    let entity: &str = &event.entity;
    let mut names = vec![entity.to_owned()];
    let record = match (event.kind, event.record()) {
        (EventType::Truncate, _) | (_, None) => return names,
        (_, Some(record)) => record,
    };
    let id = row_id(record, &spec.key_columns);
    if let Some(id) = &id {
        names.push(format!("{entity}/{id}"));
    }
    for scope in &spec.scopes {
        let Some(prefix) = scope_prefix(record, scope) else {
            continue;
        };
        let scoped = format!("{prefix}{entity}");
        if let Some(id) = &id {
            let scoped_id = format!("{scoped}/{id}");
            push_unique(&mut names, scoped);
            push_unique(&mut names, scoped_id);
        } else {
            push_unique(&mut names, scoped);
        }
    }
    names
}

/// What the channel of the messages of `prefix` starts with: `message:`.
pub const MESSAGE_CHANNEL: &str = "message:";

/// The channel of the messages of `prefix` (`pg_logical_emit_message(true, prefix, ..)`):
/// `message:<prefix>`, a name no table's channel has (a table's starts with its name).
pub fn message_channel(prefix: &str) -> String {
    format!("{MESSAGE_CHANNEL}{prefix}")
}

fn push_unique(names: &mut Vec<String>, name: String) {
    if !names.contains(&name) {
        names.push(name);
    }
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;

    fn event(kind: EventType, entity: &str, record: Value) -> Event {
        match kind {
            EventType::Delete => crate::testing::event(kind, entity, Value::Null, record, 0),
            EventType::Truncate => crate::testing::event(kind, entity, Value::Null, Value::Null, 0),
            _ => crate::testing::event(kind, entity, record, Value::Null, 0),
        }
    }

    #[test]
    fn separators_inside_values_are_percent_encoded() {
        let e = event(
            EventType::Insert,
            "tags",
            json!({"name": "a/b,c%d", "lang": "en", "owner": "x/y"}),
        );
        let spec = ChannelSpec::new(["name", "lang"]).with_scope([("owner", "users")]);
        assert_eq!(
            channels(&e, &spec),
            [
                "tags",
                "tags/a%2Fb%2Cc%25d,en",
                "users/x%2Fy/tags",
                "users/x%2Fy/tags/a%2Fb%2Cc%25d,en"
            ]
        );
        // Arrays and objects as keys: their JSON text, separators encoded too.
        assert_eq!(value_text(&json!([1, 2])).as_deref(), Some("[1%2C2]"));
        assert_eq!(value_text(&json!("plain")).as_deref(), Some("plain"));
    }

    #[test]
    fn single_bigint_key() {
        let e = event(EventType::Insert, "posts", json!({"id": 42, "title": "x"}));
        assert_eq!(
            channels(&e, &ChannelSpec::new(["id"])),
            ["posts", "posts/42"]
        );
    }

    #[test]
    fn big_and_decimal_numbers_keep_their_digits() {
        let e = event(
            EventType::Insert,
            "t",
            serde_json::from_str(r#"{"id": 9007199254740993123, "n": 1.50}"#).unwrap(),
        );
        assert_eq!(
            channels(&e, &ChannelSpec::new(["id", "n"])),
            ["t", "t/9007199254740993123,1.50"]
        );
    }

    #[test]
    fn uuid_key_is_the_string_without_quotes() {
        let e = event(
            EventType::Update,
            "users",
            json!({"id": "0b5c8f4e-6d3a-4b61-9a0e-2f1c3d4e5f60"}),
        );
        assert_eq!(
            channels(&e, &ChannelSpec::new(["id"])),
            ["users", "users/0b5c8f4e-6d3a-4b61-9a0e-2f1c3d4e5f60"]
        );
    }

    #[test]
    fn text_key() {
        let e = event(EventType::Insert, "tags", json!({"name": "rust", "n": 1}));
        assert_eq!(
            channels(&e, &ChannelSpec::new(["name"])),
            ["tags", "tags/rust"]
        );
    }

    #[test]
    fn composite_key_joins_in_key_column_order() {
        let e = event(
            EventType::Insert,
            "order_items",
            json!({"item_id": 3, "order_id": 7, "qty": 1}),
        );
        assert_eq!(
            channels(&e, &ChannelSpec::new(["order_id", "item_id"])),
            ["order_items", "order_items/7,3"]
        );
    }

    #[test]
    fn no_key_gives_no_id_channel() {
        let e = event(EventType::Insert, "logs", json!({"line": "hello"}));
        assert_eq!(channels(&e, &ChannelSpec::default()), ["logs"]);
        let spec = ChannelSpec::default().with_scope([("line", "files")]);
        assert_eq!(channels(&e, &spec), ["logs", "files/hello/logs"]);
    }

    #[test]
    fn null_key_value_gives_no_id_channel() {
        let e = event(EventType::Insert, "t", json!({"a": 1, "b": null}));
        assert_eq!(channels(&e, &ChannelSpec::new(["a", "b"])), ["t"]);
    }

    #[test]
    fn one_level_scope() {
        let e = event(
            EventType::Insert,
            "comments",
            json!({"id": 5, "post_id": 42, "body": "hi"}),
        );
        let spec = ChannelSpec::new(["id"]).with_scope([("post_id", "posts")]);
        assert_eq!(
            channels(&e, &spec),
            [
                "comments",
                "comments/5",
                "posts/42/comments",
                "posts/42/comments/5",
            ]
        );
    }

    #[test]
    fn two_level_scope_and_several_scopes() {
        let e = event(
            EventType::Insert,
            "comments",
            json!({"id": 5, "org_id": "acme", "post_id": 42}),
        );
        let spec = ChannelSpec::new(["id"])
            .with_scope([("post_id", "posts")])
            .with_scope([("org_id", "orgs"), ("post_id", "posts")]);
        let names = channels(&e, &spec);
        assert_eq!(
            names,
            [
                "comments",
                "comments/5",
                "posts/42/comments",
                "posts/42/comments/5",
                "orgs/acme/posts/42/comments",
                "orgs/acme/posts/42/comments/5",
            ]
        );
    }

    #[test]
    fn null_or_missing_scope_field_gives_no_scoped_channel() {
        let spec = ChannelSpec::new(["id"])
            .with_scope([("post_id", "posts")])
            .with_scope([("org_id", "orgs"), ("post_id", "posts")]);
        let e = event(
            EventType::Insert,
            "comments",
            json!({"id": 5, "post_id": null, "org_id": "acme"}),
        );
        assert_eq!(channels(&e, &spec), ["comments", "comments/5"]);
        let e = event(
            EventType::Insert,
            "comments",
            json!({"id": 5, "post_id": 1}),
        );
        assert_eq!(
            channels(&e, &spec),
            [
                "comments",
                "comments/5",
                "posts/1/comments",
                "posts/1/comments/5"
            ]
        );
    }

    #[test]
    fn delete_uses_the_old_record() {
        let e = event(
            EventType::Delete,
            "comments",
            json!({"id": 9, "post_id": 3}),
        );
        assert!(e.new_record.is_none());
        let spec = ChannelSpec::new(["id"]).with_scope([("post_id", "posts")]);
        assert_eq!(
            channels(&e, &spec),
            [
                "comments",
                "comments/9",
                "posts/3/comments",
                "posts/3/comments/9"
            ]
        );
    }

    #[test]
    fn delete_without_old_record_goes_to_the_entity_only() {
        let e = event(EventType::Delete, "comments", Value::Null);
        assert_eq!(channels(&e, &ChannelSpec::new(["id"])), ["comments"]);
    }

    #[test]
    fn truncate_goes_to_the_entity_only() {
        let mut e = event(EventType::Truncate, "comments", Value::Null);
        // Even if a record were somehow present, a truncate names no row.
        e.new_record = Some(
            json!({"id": 1, "post_id": 2})
                .as_object()
                .unwrap()
                .clone()
                .into(),
        );
        let spec = ChannelSpec::new(["id"]).with_scope([("post_id", "posts")]);
        assert_eq!(channels(&e, &spec), ["comments"]);
    }
}
