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

use super::{Context, Operator, Subscription};
use crate::event::{Event, EventType};

/// How `$1` is bound: as the type the server expects for it, asked once per statement.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Param {
    Int2,
    Int4,
    Int8,
    Uuid,
    Text,
    /// Any other type, by its SQL name (`numeric`, `date`, an enum): bound as its text form
    /// through a prepared statement, `'value'::type`.
    Other(String),
}

impl Param {
    /// The type `$1` is declared with when the statement is prepared on the server.
    fn sql_type(&self) -> &str {
        match self {
            Param::Int2 => "int2",
            Param::Int4 => "int4",
            Param::Int8 => "int8",
            Param::Uuid => "uuid",
            Param::Text => "text",
            Param::Other(name) => name,
        }
    }
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
            return Ok(p.clone());
        }
        let described = (&mut *conn)
            .describe(&self.sql)
            .await
            .with_context(|| format!("preparing {:?}", self.sql))?;
        let first = match described.parameters() {
            Some(sqlx::Either::Left(types)) => types.first().cloned(),
            _ => None,
        };
        let kind = match first {
            None => Param::Text,
            Some(ty) => match ty.name() {
                "INT2" => Param::Int2,
                "INT4" => Param::Int4,
                "INT8" => Param::Int8,
                "UUID" => Param::Uuid,
                "TEXT" => Param::Text,
                _ => match ty.oid() {
                    Some(oid) => {
                        let name: String = sqlx::query_scalar("SELECT format_type($1, NULL)")
                            .bind(oid)
                            .fetch_one(&mut *conn)
                            .await
                            .context("naming the type of $1")?;
                        Param::Other(name)
                    }
                    None => Param::Text,
                },
            },
        };
        Ok(self.param.get_or_init(|| kind).clone())
    }

    /// Runs the statement for `id` with `$1` bound directly (not for [`Param::Other`], which
    /// only a prepared statement takes, as text).
    async fn run(&self, conn: &mut sqlx::PgConnection, id: &Value) -> anyhow::Result<()> {
        let query = sqlx::query(&self.sql);
        let query = match Bound::new(&self.param(conn).await?, id)? {
            Bound::Int2(n) => query.bind(n),
            Bound::Int4(n) => query.bind(n),
            Bound::Int8(n) => query.bind(n),
            Bound::Uuid(u) => query.bind(u),
            Bound::Text(t) => query.bind(t),
            Bound::Other(_, ty) => bail!("$1 of type {ty} is bound through a prepared statement"),
        };
        query.execute(conn).await?;
        Ok(())
    }
}

/// An id as `$1` gets it.
#[derive(Debug, PartialEq)]
enum Bound {
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Uuid(uuid::Uuid),
    Text(String),
    /// The id's text form and the type to cast it to.
    Other(String, String),
}

impl Bound {
    fn new(param: &Param, id: &Value) -> anyhow::Result<Bound> {
        let integer = |what: &str| -> anyhow::Result<i64> {
            match id {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse::<i64>().ok(),
                _ => None,
            }
            .ok_or_else(|| anyhow!("the id is not an integer, but $1 is {what}"))
        };
        let text = || match id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Ok(match param {
            Param::Int2 => Bound::Int2(
                i16::try_from(integer("a smallint")?)
                    .map_err(|_| anyhow!("the id does not fit $1, a smallint"))?,
            ),
            Param::Int4 => Bound::Int4(
                i32::try_from(integer("an integer")?)
                    .map_err(|_| anyhow!("the id does not fit $1, an integer"))?,
            ),
            Param::Int8 => Bound::Int8(integer("a bigint")?),
            Param::Uuid => match id {
                Value::String(s) => Bound::Uuid(
                    uuid::Uuid::parse_str(s)
                        .map_err(|_| anyhow!("the id is not a UUID, but $1 is one"))?,
                ),
                _ => bail!("the id is not a UUID, but $1 is one"),
            },
            Param::Text => Bound::Text(text()),
            Param::Other(ty) => Bound::Other(text(), ty.clone()),
        })
    }

    /// The same value as an SQL expression of the same type as the bound parameter.
    fn literal(&self) -> String {
        match self {
            Bound::Int2(n) => format!("{n}::int2"),
            Bound::Int4(n) => format!("{n}::int4"),
            Bound::Int8(n) => format!("{n}::int8"),
            Bound::Uuid(u) => format!("'{u}'::uuid"),
            Bound::Text(t) => format!("{}::text", escaped_literal(t)),
            Bound::Other(t, ty) => format!("{}::{ty}", escaped_literal(t)),
        }
    }
}

/// `text` as an escape-string literal (`E'...'`), the same whatever
/// `standard_conforming_strings` says.
fn escaped_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
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
    truncate_query: Option<String>,
    /// What `streamex rebuild` runs before the backfill (no parameter).
    reset_query: Option<String>,
    /// A statement the server would not `PREPARE` (a `CALL`, say): batches then run the
    /// statements one by one.
    unpreparable: AtomicBool,
    /// As one of `(index, count)` partitions: only the ids of that partition are recomputed
    /// (a truncate's steps are the applier's, see [`SqlOperator::route`]).
    partition: Option<(u32, u32)>,
}

/// Builds a [`SqlOperator`].
#[derive(Debug, Default)]
pub struct SqlOperatorBuilder {
    name: String,
    query: Option<String>,
    ids: BTreeMap<String, String>,
    delete_with: Vec<String>,
    delete_query: Option<String>,
    truncate_query: Option<String>,
    reset_query: Option<String>,
}

impl SqlOperatorBuilder {
    /// What `streamex rebuild` runs, in the backfill's transaction, before it recomputes every
    /// id (no parameter; it may hold several statements): typically a `DELETE` of every
    /// derived row, so that rows whose source is gone go too.
    pub fn on_reset(mut self, sql: &str) -> Self {
        self.reset_query = Some(sql.to_owned());
        self
    }

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

    /// A TRUNCATE of any of its entities runs `sql` (no parameter; it may hold several
    /// statements) instead of recomputing every id.
    pub fn on_truncate(mut self, sql: &str) -> Self {
        self.truncate_query = Some(sql.to_owned());
        self
    }

    /// The operator; an error names what is missing or inconsistent.
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
            truncate_query: self.truncate_query,
            reset_query: self.reset_query,
            unpreparable: AtomicBool::new(false),
            partition: None,
        })
    }
}

/// One thing a batch does, in order.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// A statement for one id.
    Run(Which, Value),
    /// `truncate_query`.
    Truncate,
    /// The query for every id now found in the source tables (after a TRUNCATE, when there
    /// is no `truncate_query`).
    RecomputeAll,
}

/// The steps of events, less the repetitions, without the events: a batch's plan, or a
/// window the runner folds while the operator is behind (it keeps the ids, not the events).
/// Each id's statements keep their order (a query after a delete_query of the same id is
/// kept, a repeated one is not); a truncate's step keeps its place.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    /// The statement last planned for each id since the last truncate step.
    last: HashMap<String, Which>,
    steps: Vec<Step>,
}

impl Folded {
    fn push(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Run(which, id) => {
                    if self.last.insert(id.to_string(), which) != Some(which) {
                        self.steps.push(Step::Run(which, id));
                    }
                }
                other => {
                    self.last.clear();
                    self.steps.push(other);
                }
            }
        }
    }

    /// How many statements (or truncate steps) it holds.
    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }
}

/// How many ids a recomputation of every id sends in one round trip.
const RECOMPUTE_CHUNK: usize = 10_000;

impl SqlOperator {
    /// A builder for the declarative operator `name`.
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

    /// The configuration key of the statement `which` runs, for messages.
    fn statement_key(&self, which: Which) -> &'static str {
        match (which, &self.delete_query) {
            (Which::Delete, Some(_)) => "delete_query",
            _ => "query",
        }
    }

    /// What a batch does, in order: each event's steps, less the repetitions (see
    /// [`Operator::handle_batch`] on this type). A truncate starts over: what came before it
    /// is no longer a repetition of what comes after.
    fn plan(&self, events: &[Arc<Event>]) -> anyhow::Result<Vec<Step>> {
        let mut folded = Folded::default();
        for event in events {
            folded.push(self.actions(event)?);
        }
        Ok(folded.steps)
    }

    /// Adds `event`'s steps to `folded`, as [`plan`](Self::plan) would; `false` (and nothing
    /// added) when the event must go through the failure policy on its own.
    pub(crate) fn fold(&self, folded: &mut Folded, event: &Event) -> bool {
        match self.actions(event) {
            Ok(steps) => {
                folded.push(steps);
                true
            }
            Err(_) => false,
        }
    }

    /// Runs what `folded` holds.
    pub(crate) async fn run_folded(
        &self,
        conn: &mut sqlx::PgConnection,
        folded: &Folded,
    ) -> anyhow::Result<()> {
        self.run(conn, &folded.steps).await
    }

    /// The id field of `event`'s entity, if the operator listens to it.
    fn field(&self, event: &Event) -> Option<&String> {
        self.ids.get(&*event.entity).or_else(|| {
            self.ids
                .iter()
                .find_map(|(entity, field)| event.is_entity(entity).then_some(field))
        })
    }

    /// The operator as partition `index` of `count`: it recomputes only the ids whose
    /// partition that is (by the id's text, as a row key); the rest is the same.
    pub(crate) fn partition(&self, index: u32, count: u32) -> SqlOperator {
        SqlOperator {
            name: self.name.clone(),
            query: Statement::new(self.query.sql.clone()),
            ids: self.ids.clone(),
            delete_with: self.delete_with.clone(),
            delete_query: self
                .delete_query
                .as_ref()
                .map(|q| Statement::new(q.sql.clone())),
            truncate_query: self.truncate_query.clone(),
            reset_query: self.reset_query.clone(),
            unpreparable: AtomicBool::new(self.unpreparable.load(Ordering::Relaxed)),
            partition: Some((index, count)),
        }
    }

    /// Where `event` goes among `count` partitions of the operator: to the partition of each
    /// id it recomputes (an update that moves a row between ids: both, each recomputing its
    /// own), across all of them for a truncate (partition 0 runs its statement once the
    /// others are done with what came before), to partition 0 when it recomputes nothing or
    /// fails (the failure policy sees it there).
    pub(crate) fn route(&self, event: &Event, count: u32) -> super::partition::Route {
        use super::partition::Route;
        let Ok(steps) = self.all_actions(event) else {
            return Route::One(0);
        };
        let mut partitions: Vec<u32> = Vec::with_capacity(2);
        for step in &steps {
            match step {
                Step::Run(_, id) => {
                    let p = id_partition(id, count);
                    if !partitions.contains(&p) {
                        partitions.push(p);
                    }
                }
                Step::Truncate | Step::RecomputeAll => {
                    return Route::Crossing {
                        applier: 0,
                        others: (1..count).collect(),
                    };
                }
            }
        }
        match partitions[..] {
            [] => Route::One(0),
            [one] => Route::One(one),
            _ => Route::Each(partitions),
        }
    }

    /// The steps one event takes, in order (only its partition's ids, as a partition).
    fn actions(&self, event: &Event) -> anyhow::Result<Vec<Step>> {
        let mut steps = self.all_actions(event)?;
        if let Some((index, count)) = self.partition {
            steps.retain(|step| match step {
                Step::Run(_, id) => id_partition(id, count) == index,
                Step::Truncate | Step::RecomputeAll => true,
            });
        }
        Ok(steps)
    }

    /// The steps one event takes, in order, whatever the partition.
    fn all_actions(&self, event: &Event) -> anyhow::Result<Vec<Step>> {
        let Some(field) = self.field(event) else {
            return Ok(Vec::new());
        };
        if event.kind == EventType::Truncate {
            if self.truncate_query.is_some() {
                return Ok(vec![Step::Truncate]);
            }
            if self.delete_with.iter().any(|e| event.is_entity(e)) {
                bail!(
                    "{} was truncated: its derived rows must go, and only a `truncate_query` can say \
                     which (every id of the table is gone from it): set truncate_query on operator {}",
                    event.entity,
                    self.name
                );
            }
            return Ok(vec![Step::RecomputeAll]);
        }
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
                    "the delete of {entity} carries no {field:?} in its old record (the table's \
                     REPLICA IDENTITY sends only its key): run ALTER TABLE {entity} REPLICA \
                     IDENTITY FULL for the deletes to come. This one is already in the WAL as it \
                     is and cannot be re-read: `streamex resume {name} --skip-current` sets it \
                     aside as a dead letter (or use on_failure = \"dead_letter\")",
                    entity = event.entity,
                    name = self.name,
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
        actions.push(Step::Run(
            if deletes { Which::Delete } else { Which::Query },
            id,
        ));
        if let Some(old) = moved_from {
            actions.push(Step::Run(Which::Query, old));
        }
        Ok(actions)
    }

    /// Runs `steps` in order: the statements of consecutive ids together (see
    /// [`run_ids`](Self::run_ids)), a truncate's statement, a recomputation of every id.
    async fn run(&self, conn: &mut sqlx::PgConnection, steps: &[Step]) -> anyhow::Result<()> {
        let mut ids: Vec<(Which, Value)> = Vec::new();
        for step in steps {
            match step {
                Step::Run(which, id) => ids.push((*which, id.clone())),
                Step::Truncate => {
                    self.run_ids(conn, &std::mem::take(&mut ids)).await?;
                    let sql = self.truncate_query.as_deref().unwrap_or_default();
                    conn.execute(sqlx::raw_sql(sql))
                        .await
                        .with_context(|| format!("running truncate_query {sql:?}"))?;
                }
                Step::RecomputeAll => {
                    self.run_ids(conn, &std::mem::take(&mut ids)).await?;
                    self.recompute_all(conn).await?;
                }
            }
        }
        self.run_ids(conn, &ids).await
    }

    /// The query for every id found in the source tables now: after a TRUNCATE of one of
    /// them, every derived row may have changed; in a backfill, every id is new. Returns how
    /// many ids.
    pub(crate) async fn recompute_all(
        &self,
        conn: &mut sqlx::PgConnection,
    ) -> anyhow::Result<usize> {
        self.recompute_tables(conn, None).await
    }

    /// [`recompute_all`](Self::recompute_all), for the ids found in `only` of its tables
    /// (every one when `None`).
    pub(crate) async fn recompute_tables(
        &self,
        conn: &mut sqlx::PgConnection,
        only: Option<&[String]>,
    ) -> anyhow::Result<usize> {
        let all = self.table_ids(conn, only).await?;
        let ids: Vec<&str> = all.iter().map(|(_, id)| id.as_str()).collect();
        for chunk in ids.chunks(RECOMPUTE_CHUNK) {
            self.recompute_ids(conn, chunk).await?;
        }
        Ok(all.len())
    }

    /// Every id found in `only` of its tables (every one when `None`), as text, once each,
    /// with the entity it was first found in.
    pub(crate) async fn table_ids(
        &self,
        conn: &mut sqlx::PgConnection,
        only: Option<&[String]>,
    ) -> anyhow::Result<Vec<(Arc<str>, String)>> {
        let mut all: BTreeMap<String, Arc<str>> = BTreeMap::new();
        for (entity, field) in &self.ids {
            let shared: Arc<str> = entity.as_str().into();
            if only.is_some_and(|only| !only.contains(entity)) {
                continue;
            }
            let name = crate::event::EntityName::parse(entity)?;
            let table = match &name.schema {
                Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&name.table)),
                // The default schema's table, found through the search path.
                None => quote_ident(&name.table),
            };
            let column = quote_ident(field);
            let ids: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT DISTINCT {column}::text FROM {table} WHERE {column} IS NOT NULL"
            ))
            .fetch_all(&mut *conn)
            .await
            .with_context(|| format!("reading every {field} of {entity}"))?;
            for id in ids {
                all.entry(id).or_insert_with(|| shared.clone());
            }
        }
        Ok(all.into_iter().map(|(id, entity)| (entity, id)).collect())
    }

    /// The id column `entity`'s events carry the id in.
    pub(crate) fn id_column(&self, entity: &str) -> Option<&str> {
        self.ids.get(entity).map(String::as_str)
    }

    /// The query for each of `ids` (as text), in one round trip.
    pub(crate) async fn recompute_ids(
        &self,
        conn: &mut sqlx::PgConnection,
        ids: &[&str],
    ) -> anyhow::Result<()> {
        let ids: Vec<(Which, Value)> = ids
            .iter()
            .map(|id| (Which::Query, Value::String((*id).to_owned())))
            .collect();
        self.run_ids(conn, &ids).await
    }

    /// Each `(statement, id)` in order: bound directly when there are few of them, else (or
    /// when `$1` is of a type only its text form can give) sent in one round trip as
    /// executions of statements prepared once per connection.
    async fn run_ids(
        &self,
        conn: &mut sqlx::PgConnection,
        ids: &[(Which, Value)],
    ) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut used: Vec<&Statement> = vec![&self.query];
        used.extend(self.delete_query.as_ref());
        let mut direct = ids.len() < 3 || self.unpreparable.load(Ordering::Relaxed);
        for statement in &used {
            if matches!(statement.param(conn).await?, Param::Other(_)) {
                direct = false;
            }
        }
        if direct {
            for (which, id) in ids {
                self.statement(*which)
                    .run(conn, id)
                    .await
                    .with_context(|| format!("running {}", self.statement_key(*which)))?;
            }
            return Ok(());
        }
        let names: Vec<&str> = used.iter().map(|s| s.prepared.as_str()).collect();
        let present: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pg_prepared_statements WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&mut *conn)
                .await?;
        for statement in &used {
            if !present.contains(&statement.prepared) {
                let param = statement.param(conn).await?;
                let prepare = format!(
                    "PREPARE {}({}) AS {}",
                    statement.prepared,
                    param.sql_type(),
                    statement.sql
                );
                if let Err(error) = conn.execute(sqlx::raw_sql(&prepare)).await {
                    if matches!(error, sqlx::Error::Database(_)) {
                        // This batch is run again one event at a time; later batches run
                        // their statements one by one.
                        self.unpreparable.store(true, Ordering::Relaxed);
                        warn!(operator = %self.name, error = %error,
                              "the statement cannot be prepared; batches run it once per id");
                    }
                    return Err(
                        anyhow::Error::new(error).context(format!("preparing {:?}", statement.sql))
                    );
                }
            }
        }
        let mut statements = Vec::with_capacity(ids.len());
        for (which, id) in ids {
            let statement = self.statement(*which);
            let param = statement.param(conn).await?;
            statements.push((statement.prepared.as_str(), Bound::new(&param, id)?));
        }
        conn.execute(sqlx::raw_sql(&executes(&statements)))
            .await
            .with_context(|| format!("running a batch of {} statements", statements.len()))?;
        Ok(())
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
        builder.truncate_query = config.truncate_query.clone();
        builder.reset_query = config.reset_query.clone();
        builder.build()
    }
}

/// `name` quoted as an SQL identifier.
/// The partition of the id `id` among `count`: as a row whose key is the id's text.
fn id_partition(id: &Value, count: u32) -> u32 {
    let text = crate::pubsub::value_text(id);
    super::partition::partition_of(text.as_deref(), count)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Operator for SqlOperator {
    fn name(&self) -> &str {
        &self.name
    }

    fn as_sql(&self) -> Option<&SqlOperator> {
        Some(self)
    }

    async fn reset(&self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let Some(sql) = &self.reset_query else {
            bail!(
                "operator {} has no reset_query, which `streamex rebuild` runs before its \
                 backfill: set one (for example a DELETE of every derived row), or use \
                 `streamex backfill`, which recomputes every id without it",
                self.name
            );
        };
        ctx.db()?
            .execute(sqlx::raw_sql(sql))
            .await
            .with_context(|| format!("running reset_query {sql:?}"))?;
        Ok(())
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.ids
            .keys()
            .map(|entity| {
                Subscription::only(
                    entity,
                    &[
                        EventType::Insert,
                        EventType::Update,
                        EventType::Delete,
                        EventType::Truncate,
                    ],
                )
            })
            .collect()
    }

    /// Prepares `query` and `delete_query` (a misspelled table or column fails here, not at
    /// the first event) and checks that each `id` column exists in its table.
    async fn check(&self, db: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        for (what, statement) in std::iter::once(("query", &self.query))
            .chain(self.delete_query.as_ref().map(|d| ("delete_query", d)))
        {
            statement
                .param(db)
                .await
                .map_err(|e| anyhow!("{what} does not prepare: {}", crate::error::chain(&e)))?;
        }
        for (entity, field) in &self.ids {
            let name = crate::event::EntityName::parse(entity)?;
            let table = match &name.schema {
                Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&name.table)),
                None => quote_ident(&name.table),
            };
            let found: (bool, bool) = sqlx::query_as(
                "SELECT to_regclass($1) IS NOT NULL,
                        EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1)
                                   AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
            )
            .bind(&table)
            .bind(field)
            .fetch_one(&mut *db)
            .await?;
            match found {
                (false, _) => bail!("id names table {entity:?}, which does not exist"),
                (true, false) => {
                    bail!("id takes $1 from column {field:?} of {entity}, which has no such column")
                }
                (true, true) => {}
            }
        }
        Ok(())
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let steps = self.actions(event)?;
        self.run(ctx.db()?, &steps).await
    }

    /// The batch's statements, each run once per id where running them one event at a time
    /// would repeat it: a statement recomputes the derived row of its id from the source
    /// tables, which every statement of the batch sees in the same state (all of the batch's
    /// transactions are visible), so the second of two runs of the same statement for the
    /// same id, with no other statement for that id in between, changes nothing. A delete
    /// between two recomputations of an id keeps all three.
    async fn handle_batch(
        &self,
        events: &[Arc<Event>],
        ctx: &mut Context<'_>,
    ) -> anyhow::Result<()> {
        let steps = self.plan(events)?;
        self.run(ctx.db()?, &steps).await
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
                Step::Run(Which::Query, json!(1)),
                Step::Run(Which::Query, json!(2)),
                Step::Run(Which::Query, json!(3)),
                Step::Run(Which::Delete, json!(1)),
                Step::Run(Which::Query, json!(1)),
            ]
        );
        // One event at a time gives each event's statements, unchanged.
        let moved = operator().actions(&events[4]).unwrap();
        assert_eq!(
            moved,
            vec![
                Step::Run(Which::Query, json!(3)),
                Step::Run(Which::Query, json!(2))
            ]
        );
    }

    #[test]
    fn a_batch_executes_each_id_as_its_parameter_type() {
        let uuid = "6f1c2c3e-0d0a-4b8e-9a51-3c2f0e4b9d10";
        assert_eq!(
            Bound::new(&Param::Int8, &json!("42")).unwrap(),
            Bound::Int8(42)
        );
        // Each integer width as its own type, refused when the id does not fit.
        assert_eq!(Bound::new(&Param::Int4, &json!(7)).unwrap(), Bound::Int4(7));
        assert_eq!(
            Bound::new(&Param::Int2, &json!(-7)).unwrap(),
            Bound::Int2(-7)
        );
        assert!(Bound::new(&Param::Int4, &json!(1_i64 << 40)).is_err());
        assert!(Bound::new(&Param::Int2, &json!(40_000)).is_err());
        assert!(Bound::new(&Param::Int8, &json!("x")).is_err());
        assert!(Bound::new(&Param::Uuid, &json!("not a uuid")).is_err());
        let numeric = Param::Other("numeric".to_owned());
        assert_eq!(
            Bound::new(&numeric, &json!(12.50)).unwrap().literal(),
            "E'12.5'::numeric"
        );
        let uuid = Bound::new(&Param::Uuid, &json!(uuid)).unwrap();
        let text = executes(&[
            ("a", Bound::Int8(-7)),
            ("b", uuid),
            ("a", Bound::Text(r"it's a \ back".to_owned())),
            ("c", Bound::Int4(3)),
        ]);
        assert_eq!(
            text,
            "EXECUTE a(-7::int8);\nEXECUTE b('6f1c2c3e-0d0a-4b8e-9a51-3c2f0e4b9d10'::uuid);\n\
             EXECUTE a(E'it''s a \\\\ back'::text);\nEXECUTE c(3::int4);\n"
        );
        assert_eq!(Param::Int4.sql_type(), "int4");
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
    fn a_truncate_recomputes_every_id_or_runs_truncate_query() {
        use EventType::{Insert, Truncate};
        let n = Value::Null;
        let events = [
            event(Insert, "comments", json!({"post_id": 1}), n.clone()),
            event(Truncate, "comments", n.clone(), n.clone()),
            event(Insert, "comments", json!({"post_id": 1}), n.clone()),
        ];
        // The truncate splits the runs: post 1 is recomputed on both sides of it.
        assert_eq!(
            operator().plan(&events).unwrap(),
            vec![
                Step::Run(Which::Query, json!(1)),
                Step::RecomputeAll,
                Step::Run(Which::Query, json!(1)),
            ]
        );
        let with_query = SqlOperator::builder("counts")
            .query("SELECT $1")
            .id("comments", "post_id")
            .on_truncate("DELETE FROM counts")
            .build()
            .unwrap();
        assert_eq!(
            with_query.actions(&events[1]).unwrap(),
            vec![Step::Truncate]
        );
        // A truncate of a delete_with table needs truncate_query.
        let posts = event(Truncate, "posts", n.clone(), n.clone());
        let error = operator().actions(&posts).unwrap_err().to_string();
        assert!(error.contains("truncate_query"), "{error}");
        // Subscriptions take truncates.
        assert!(
            operator()
                .subscriptions()
                .iter()
                .all(|s| s.matches(&events[1]) || !s.entity.contains("comments"))
        );
    }

    #[test]
    fn a_delete_without_the_id_column_is_an_error_naming_the_fix() {
        let e = event(EventType::Delete, "comments", Value::Null, json!({"id": 9}));
        let error = operator().plan(&[e]).unwrap_err().to_string();
        assert!(error.contains("REPLICA IDENTITY FULL"), "{error}");
    }
}
