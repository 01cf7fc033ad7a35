//! The declarative operator: EventStreamex's `query(sql, id(...), delete_with: [...])`.
//!
//! For an event of entity `E`, the id is `record[id[E]]` (the new record, or the old one for
//! a delete), and the statement runs with `$1` bound to it. When an update changes the id
//! (a comment moved to another post) and the old record shows it (REPLICA IDENTITY FULL),
//! the statement runs for the old id as well, so both derived rows are recomputed. For a delete of an entity listed
//! in `delete_with`, `delete_query` runs instead, to delete the derived row. The statement
//! usually recomputes the derived row from the source tables (`INSERT ... SELECT ... ON
//! CONFLICT DO UPDATE`, or `MERGE`), so running it again for the same event is harmless.
//!
//! `$1` is bound with the type PostgreSQL infers for it (asked once per statement): integers
//! for `smallint`/`integer`/`bigint`, a UUID for `uuid`, text otherwise. For another type,
//! cast in the statement: `WHERE id = $1::text::numeric`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;
use sqlx::{Executor, TypeInfo};

use super::{Context, HandlerFuture, Operator, Subscription};
use crate::event::{Event, EventType};

/// How `$1` is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    Integer,
    Uuid,
    Text,
}

#[derive(Debug)]
struct Statement {
    sql: String,
    param: OnceLock<Param>,
}

impl Statement {
    fn new(sql: String) -> Self {
        Statement {
            sql,
            param: OnceLock::new(),
        }
    }

    async fn run(&self, conn: &mut sqlx::PgConnection, id: &Value) -> anyhow::Result<()> {
        let param = match self.param.get() {
            Some(p) => *p,
            None => {
                let described = (&mut *conn)
                    .describe(&self.sql)
                    .await
                    .with_context(|| format!("preparing {:?}", self.sql))?;
                let kind = match described.parameters() {
                    Some(sqlx::Either::Left(types)) => match types.first().map(|t| t.name()) {
                        Some("INT2" | "INT4" | "INT8") => Param::Integer,
                        Some("UUID") => Param::Uuid,
                        _ => Param::Text,
                    },
                    _ => Param::Text,
                };
                *self.param.get_or_init(|| kind)
            }
        };
        let query = sqlx::query(&self.sql);
        let query = match (param, id) {
            (Param::Integer, Value::Number(n)) => query.bind(
                n.as_i64()
                    .ok_or_else(|| anyhow!("id {n} is not a 64-bit integer"))?,
            ),
            (Param::Integer, Value::String(s)) => query.bind(
                s.parse::<i64>()
                    .map_err(|_| anyhow!("the id is not an integer, but $1 is one"))?,
            ),
            (Param::Uuid, Value::String(s)) => query.bind(
                uuid::Uuid::parse_str(s)
                    .map_err(|_| anyhow!("the id is not a UUID, but $1 is one"))?,
            ),
            (_, Value::String(s)) => query.bind(s.clone()),
            (_, Value::Number(n)) => query.bind(n.to_string()),
            (_, other) => query.bind(other.to_string()),
        };
        query.execute(conn).await?;
        Ok(())
    }
}

/// A declarative operator; build one with [`SqlOperator::builder`] or from the configuration.
#[derive(Debug)]
pub struct SqlOperator {
    name: String,
    query: Statement,
    ids: BTreeMap<String, String>,
    delete_with: Vec<String>,
    delete_query: Option<Statement>,
}

/// Builds a [`SqlOperator`].
#[derive(Debug, Default)]
pub struct SqlOperatorBuilder {
    name: String,
    query: Option<String>,
    ids: BTreeMap<String, String>,
    delete_with: Vec<String>,
    delete_query: Option<String>,
}

impl SqlOperatorBuilder {
    /// The statement run with `$1` bound to the event's id.
    pub fn query(mut self, sql: &str) -> Self {
        self.query = Some(sql.to_owned());
        self
    }

    /// Listen to `entity`, taking the id from its record's `field`.
    pub fn id(mut self, entity: &str, field: &str) -> Self {
        self.ids.insert(entity.to_owned(), field.to_owned());
        self
    }

    /// Deletes of `entity` run `sql` (with `$1` the id) instead of the query.
    pub fn delete_with(mut self, entity: &str, sql: &str) -> Self {
        self.delete_with.push(entity.to_owned());
        self.delete_query = Some(sql.to_owned());
        self
    }

    pub fn build(self) -> anyhow::Result<SqlOperator> {
        let query = self
            .query
            .with_context(|| format!("operator {}: `query` is missing", self.name))?;
        if self.ids.is_empty() {
            bail!("operator {}: no entity: give at least one `id`", self.name);
        }
        if let Some(entity) = self.delete_with.iter().find(|e| !self.ids.contains_key(*e)) {
            bail!(
                "operator {}: delete_with names {entity:?}, which has no `id`",
                self.name
            );
        }
        Ok(SqlOperator {
            name: self.name,
            query: Statement::new(query),
            ids: self.ids,
            delete_with: self.delete_with,
            delete_query: self.delete_query.map(Statement::new),
        })
    }
}

impl SqlOperator {
    pub fn builder(name: &str) -> SqlOperatorBuilder {
        SqlOperatorBuilder {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// Builds one from its `[[operators]]` entry.
    pub fn from_config(config: &crate::config::OperatorConfig) -> anyhow::Result<SqlOperator> {
        let mut builder = SqlOperator::builder(&config.name);
        if let Some(query) = &config.query {
            builder = builder.query(query);
        }
        for (entity, field) in &config.id {
            builder = builder.id(entity, field);
        }
        builder.delete_with = config.delete_with.clone();
        builder.delete_query = config.delete_query.clone();
        builder.build()
    }
}

impl Operator for SqlOperator {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.ids
            .keys()
            .map(|entity| {
                Subscription::only(
                    entity,
                    &[EventType::Insert, EventType::Update, EventType::Delete],
                )
            })
            .collect()
    }

    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        Box::pin(async move {
            let Some(field) = self.ids.get(&*event.entity) else {
                return Ok(());
            };
            let id = event
                .record()
                .and_then(|r| r.get(field))
                .cloned()
                .unwrap_or(Value::Null);
            if id.is_null() {
                // No id (a NULL foreign key, or a column the old record lacks): nothing to do.
                if event.kind == EventType::Delete
                    && event
                        .old_record
                        .as_ref()
                        .is_some_and(|r| !r.contains_key(field))
                {
                    bail!(
                        "the delete of {} carries no {field:?} in its old record: set REPLICA IDENTITY FULL on {}",
                        event.entity,
                        event.entity
                    );
                }
                return Ok(());
            }
            let statement = match (&self.delete_query, event.kind) {
                (Some(delete), EventType::Delete)
                    if self.delete_with.iter().any(|e| *e == *event.entity) =>
                {
                    delete
                }
                _ => &self.query,
            };
            statement.run(ctx.db(), &id).await?;
            // An update that moved the row to another id (a comment moved to another post)
            // changes what the old id's derived row should be too.
            if event.kind == EventType::Update {
                let old = event.old_record.as_ref().and_then(|r| r.get(field));
                if let Some(old) = old.filter(|old| !old.is_null() && **old != id) {
                    self.query.run(ctx.db(), old).await?;
                }
            }
            Ok(())
        })
    }
}
