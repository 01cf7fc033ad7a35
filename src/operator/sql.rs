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
//! In a batch (several events in one transaction), a statement runs once per id where
//! handling the events one at a time would run it several times in a row for that id (see
//! [`Operator::handle_batch`]): the statement must depend on its id and the source tables
//! only, and write only that id's derived rows, as in EventStreamex.
//!
//! `$1` is bound with the type PostgreSQL infers for it (asked once per statement): integers
//! for `smallint`/`integer`/`bigint`, a UUID for `uuid`, text otherwise. For another type,
//! cast in the statement: `WHERE id = $1::text::numeric`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;
use sqlx::{Executor, TypeInfo};
use tracing::warn;

use super::{Context, HandlerFuture, Operator, Subscription};
use crate::event::{Event, EventType};

/// How `$1` is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    Integer,
    Uuid,
    Text,
}

/// Which of the operator's statements an event runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Query,
    Delete,
}

#[derive(Debug)]
struct Statement {
    sql: String,
    param: OnceLock<Param>,
    /// Its name as a server-side prepared statement (batches): the same text, the same name.
    prepared: String,
}

impl Statement {
    fn new(sql: String) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        sql.hash(&mut hasher);
        Statement {
            prepared: format!("streamex_{:016x}", hasher.finish()),
            sql,
            param: OnceLock::new(),
        }
    }

    /// How `$1` is bound, asked of the server the first time.
    async fn param(&self, conn: &mut sqlx::PgConnection) -> anyhow::Result<Param> {
        if let Some(p) = self.param.get() {
            return Ok(*p);
        }
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
        Ok(*self.param.get_or_init(|| kind))
    }

    async fn run(&self, conn: &mut sqlx::PgConnection, id: &Value) -> anyhow::Result<()> {
        let query = sqlx::query(&self.sql);
        let query = match Bound::new(self.param(conn).await?, id)? {
            Bound::Integer(n) => query.bind(n),
            Bound::Uuid(u) => query.bind(u),
            Bound::Text(t) => query.bind(t),
        };
        query.execute(conn).await?;
        Ok(())
    }
}

/// An id as `$1` gets it.
#[derive(Debug, PartialEq)]
enum Bound {
    Integer(i64),
    Uuid(uuid::Uuid),
    Text(String),
}

impl Bound {
    fn new(param: Param, id: &Value) -> anyhow::Result<Bound> {
        Ok(match (param, id) {
            (Param::Integer, Value::Number(n)) => Bound::Integer(
                n.as_i64()
                    .ok_or_else(|| anyhow!("id {n} is not a 64-bit integer"))?,
            ),
            (Param::Integer, Value::String(s)) => Bound::Integer(
                s.parse::<i64>()
                    .map_err(|_| anyhow!("the id is not an integer, but $1 is one"))?,
            ),
            (Param::Uuid, Value::String(s)) => Bound::Uuid(
                uuid::Uuid::parse_str(s)
                    .map_err(|_| anyhow!("the id is not a UUID, but $1 is one"))?,
            ),
            (_, Value::String(s)) => Bound::Text(s.clone()),
            (_, Value::Number(n)) => Bound::Text(n.to_string()),
            (_, other) => Bound::Text(other.to_string()),
        })
    }

    /// The same value as an SQL expression of the same type as the bound parameter.
    fn literal(&self) -> String {
        match self {
            Bound::Integer(n) => format!("{n}::int8"),
            Bound::Uuid(u) => format!("'{u}'::uuid"),
            Bound::Text(t) => format!("{}::text", escaped_literal(t)),
        }
    }
}

/// `text` as an escape-string literal (`E'...'`), the same whatever
/// `standard_conforming_strings` says.
fn escaped_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The type `$1` is declared with when the statement is prepared on the server.
fn param_type(param: Param) -> &'static str {
    match param {
        Param::Integer => "int8",
        Param::Uuid => "uuid",
        Param::Text => "text",
    }
}

/// `EXECUTE name(value);` for each statement, in order, as one string: a simple query that
/// runs them all in one round trip, each with its prepared plan.
fn executes(statements: &[(&str, Bound)]) -> String {
    let mut text = String::with_capacity(statements.len() * 48);
    for (name, bound) in statements {
        text.push_str("EXECUTE ");
        text.push_str(name);
        text.push('(');
        text.push_str(&bound.literal());
        text.push_str(");\n");
    }
    text
}

/// A declarative operator; build one with [`SqlOperator::builder`] or from the configuration.
#[derive(Debug)]
pub struct SqlOperator {
    name: String,
    query: Statement,
    ids: BTreeMap<String, String>,
    delete_with: Vec<String>,
    delete_query: Option<Statement>,
    /// A statement the server would not `PREPARE` (a `CALL`, say): batches then run the
    /// statements one by one.
    unpreparable: AtomicBool,
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
            unpreparable: AtomicBool::new(false),
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

    fn statement(&self, which: Which) -> &Statement {
        match (which, &self.delete_query) {
            (Which::Delete, Some(delete)) => delete,
            _ => &self.query,
        }
    }

    /// The statements a batch runs, in order: each event's, less the repetitions (see
    /// [`Operator::handle_batch`] on this type).
    fn plan(&self, events: &[Arc<Event>]) -> anyhow::Result<Vec<(Which, Value)>> {
        let mut last: HashMap<String, Which> = HashMap::new();
        let mut todo: Vec<(Which, Value)> = Vec::new();
        for event in events {
            for (which, id) in self.actions(event)? {
                if last.insert(id.to_string(), which) != Some(which) {
                    todo.push((which, id));
                }
            }
        }
        Ok(todo)
    }

    /// The statements one event runs, in order, with their ids.
    fn actions(&self, event: &Event) -> anyhow::Result<Vec<(Which, Value)>> {
        let field = self.ids.get(&*event.entity).or_else(|| {
            self.ids
                .iter()
                .find_map(|(entity, field)| event.is_entity(entity).then_some(field))
        });
        let Some(field) = field else {
            return Ok(Vec::new());
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
            return Ok(Vec::new());
        }
        let deletes = event.kind == EventType::Delete
            && self.delete_query.is_some()
            && self.delete_with.iter().any(|e| event.is_entity(e));
        let mut actions = Vec::with_capacity(2);
        // An update that moved the row to another id (a comment moved to another post)
        // changes what the old id's derived row should be too.
        let moved_from = match event.kind {
            EventType::Update => event
                .old_record
                .as_ref()
                .and_then(|r| r.get(field))
                .filter(|old| !old.is_null() && **old != id)
                .cloned(),
            _ => None,
        };
        actions.push((if deletes { Which::Delete } else { Which::Query }, id));
        if let Some(old) = moved_from {
            actions.push((Which::Query, old));
        }
        Ok(actions)
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
            for (which, id) in self.actions(event)? {
                self.statement(which).run(ctx.db(), &id).await?;
            }
            Ok(())
        })
    }

    /// The batch's statements, each run once per id where running them one event at a time
    /// would repeat it: a statement recomputes the derived row of its id from the source
    /// tables, which every statement of the batch sees in the same state (all of the batch's
    /// transactions are visible), so the second of two runs of the same statement for the
    /// same id, with no other statement for that id in between, changes nothing. A delete
    /// between two recomputations of an id keeps all three.
    fn handle_batch<'a>(
        &'a self,
        events: &'a [Arc<Event>],
        ctx: &'a mut Context<'_>,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let plan = self.plan(events)?;
            if plan.len() < 3 || self.unpreparable.load(Ordering::Relaxed) {
                for (which, id) in &plan {
                    self.statement(*which).run(ctx.db(), id).await?;
                }
                return Ok(());
            }
            // Many statements: prepared once per connection, then all of them in one round trip.
            let conn = ctx.db();
            let mut used: Vec<&Statement> = vec![&self.query];
            used.extend(self.delete_query.as_ref());
            let names: Vec<&str> = used.iter().map(|s| s.prepared.as_str()).collect();
            let present: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pg_prepared_statements WHERE name = ANY($1)")
                    .bind(&names)
                    .fetch_all(&mut *conn)
                    .await?;
            for statement in &used {
                if !present.contains(&statement.prepared) {
                    let param = param_type(statement.param(conn).await?);
                    let prepare = format!(
                        "PREPARE {}({param}) AS {}",
                        statement.prepared, statement.sql
                    );
                    if let Err(error) = conn.execute(sqlx::raw_sql(&prepare)).await {
                        if matches!(error, sqlx::Error::Database(_)) {
                            // This batch is run again one event at a time; later batches run
                            // their statements one by one.
                            self.unpreparable.store(true, Ordering::Relaxed);
                            warn!(operator = %self.name, error = %error,
                                  "the statement cannot be prepared; batches run it once per id");
                        }
                        return Err(anyhow::Error::new(error)
                            .context(format!("preparing {:?}", statement.sql)));
                    }
                }
            }
            let mut statements = Vec::with_capacity(plan.len());
            for (which, id) in &plan {
                let statement = self.statement(*which);
                let param = statement.param(conn).await?;
                statements.push((statement.prepared.as_str(), Bound::new(param, id)?));
            }
            conn.execute(sqlx::raw_sql(&executes(&statements)))
                .await
                .with_context(|| format!("running a batch of {} statements", statements.len()))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(kind: EventType, entity: &str, new: Value, old: Value) -> Arc<Event> {
        Arc::new(crate::testing::event(kind, entity, new, old, 0))
    }

    fn operator() -> SqlOperator {
        SqlOperator::builder("counts")
            .query("SELECT $1")
            .id("posts", "id")
            .id("comments", "post_id")
            .delete_with("posts", "DELETE $1")
            .build()
            .unwrap()
    }

    #[test]
    fn a_batch_recomputes_each_id_once_per_run_of_the_same_statement() {
        use EventType::{Delete, Insert, Update};
        let n = Value::Null;
        let events = [
            event(Insert, "posts", json!({"id": 1}), n.clone()),
            event(Insert, "comments", json!({"post_id": 1}), n.clone()),
            event(Insert, "comments", json!({"post_id": 2}), n.clone()),
            event(Insert, "comments", json!({"post_id": 1}), n.clone()),
            // A comment moving from post 2 to post 3: both recomputed (2 already was).
            event(
                Update,
                "comments",
                json!({"post_id": 3}),
                json!({"post_id": 2}),
            ),
            // Post 1 deleted, then recomputed again: the delete splits the runs.
            event(Delete, "posts", n.clone(), json!({"id": 1})),
            event(Delete, "comments", n.clone(), json!({"post_id": 1})),
            event(Insert, "comments", json!({"post_id": 1}), n.clone()),
            // A NULL id does nothing.
            event(Insert, "comments", json!({"post_id": null}), n.clone()),
        ];
        let plan = operator().plan(&events).unwrap();
        assert_eq!(
            plan,
            vec![
                (Which::Query, json!(1)),
                (Which::Query, json!(2)),
                (Which::Query, json!(3)),
                (Which::Delete, json!(1)),
                (Which::Query, json!(1)),
            ]
        );
        // One event at a time gives each event's statements, unchanged.
        let moved = operator().actions(&events[4]).unwrap();
        assert_eq!(
            moved,
            vec![(Which::Query, json!(3)), (Which::Query, json!(2))]
        );
    }

    #[test]
    fn a_batch_executes_each_id_as_its_parameter_type() {
        let uuid = "6f1c2c3e-0d0a-4b8e-9a51-3c2f0e4b9d10";
        assert_eq!(
            Bound::new(Param::Integer, &json!("42")).unwrap(),
            Bound::Integer(42)
        );
        assert!(Bound::new(Param::Integer, &json!("x")).is_err());
        assert!(Bound::new(Param::Uuid, &json!("not a uuid")).is_err());
        let uuid = Bound::new(Param::Uuid, &json!(uuid)).unwrap();
        let text = executes(&[
            ("a", Bound::Integer(-7)),
            ("b", uuid),
            ("a", Bound::Text(r"it's a \ back".to_owned())),
        ]);
        assert_eq!(
            text,
            "EXECUTE a(-7::int8);\nEXECUTE b('6f1c2c3e-0d0a-4b8e-9a51-3c2f0e4b9d10'::uuid);\n\
             EXECUTE a(E'it''s a \\\\ back'::text);\n"
        );
        assert_eq!(param_type(Param::Integer), "int8");
        // Statements are named after their text.
        assert_eq!(
            Statement::new("SELECT $1".into()).prepared,
            Statement::new("SELECT $1".into()).prepared
        );
        assert_ne!(
            Statement::new("SELECT $1".into()).prepared,
            Statement::new("SELECT $1 ".into()).prepared
        );
    }

    #[test]
    fn a_delete_without_the_id_column_is_an_error_naming_the_fix() {
        let e = event(EventType::Delete, "comments", Value::Null, json!({"id": 9}));
        let error = operator().plan(&[e]).unwrap_err().to_string();
        assert!(error.contains("REPLICA IDENTITY FULL"), "{error}");
    }
}
