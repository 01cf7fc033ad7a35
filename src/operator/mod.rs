//! Operators: user code that reacts to change events.
//!
//! ```text
//! decoder ──► dispatcher ──┬─► operator A inbox (bytes bounded) ──► A's task: batch ─► handler per event ─► checkpoint ─► commit
//!                          ├─► operator B inbox (bounded) ──► B's task: ...
//!                          └─► pubsub (transient listeners)
//!   each task reports "done through commit end E" ──► coordinator: min over operators ─► process status ─► ack(E)
//! ```
//!
//! # Guarantees
//!
//! - Each operator sees the events it listens to in WAL order, one at a time (or as a batch,
//!   in order, through [`Operator::handle_batch`]). Different
//!   operators run concurrently, each at its own pace: a slow one falls behind the others
//!   by up to `replication.operator_backlog_bytes` of events waiting in its inbox, then slows
//!   the WAL reader, and never loses or reorders an event.
//! - An operator that delivers exactly once (the default) gets a database transaction in its
//!   [`Context`];
//!   streamex writes the operator's checkpoint `(commit_lsn, ordinal)` in that same
//!   transaction and commits both together. After a crash the operator resumes after its
//!   checkpoint, so its writes to the database are applied exactly once.
//! - An operator that acts outside the database gets each event at least once; use
//!   [`Event::position`] as the idempotency key.
//! - The slot is acknowledged up to a commit only when every operator has durably finished
//!   every event up to it (or dead-lettered it) and the process status covering it is stored.

pub(crate) mod backfill;
mod board;
mod coordinator;
mod dispatch;
mod engine;
mod inbox;
pub(crate) mod partition;
mod progress;
mod registry;
mod runner;
mod sql;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use crate::metrics::{OperatorReport, OperatorStateKind};
pub(crate) use board::Board;
pub(crate) use dispatch::status_timestamp;
pub(crate) use engine::{DEFAULT_BACKLOG_BYTES, Engine, EngineExit, OperatorSpec};
pub(crate) use inbox::{Inbox, InputSource};
pub use registry::{Registry, RegistryError};
pub(crate) use runner::{Input, Runner, RunnerExit, is_database_outage};
pub use sql::{SqlOperator, SqlOperatorBuilder};

use crate::event::{Event, EventType};

/// The entity and event types an operator listens to.
///
/// A TRUNCATE of the entity is always delivered (as an event of type
/// [`EventType::Truncate`]), whatever `types` says: it removes every row, so an operator that
/// keeps anything derived from the table must hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The table, as the configuration names it: `comments` for a table of the default schema
    /// (`public`), `archive.comments` for one of another schema (see
    /// [`crate::event::EntityName`]).
    pub entity: String,
    /// The row event types (insert, update, delete); empty means all of them.
    pub types: Vec<EventType>,
}

impl Subscription {
    /// Every event of `entity`.
    pub fn all(entity: &str) -> Self {
        Subscription {
            entity: entity.to_owned(),
            types: Vec::new(),
        }
    }

    /// The events of `entity` of the given types, and its truncates.
    pub fn only(entity: &str, types: &[EventType]) -> Self {
        Subscription {
            entity: entity.to_owned(),
            types: types.to_vec(),
        }
    }

    /// The messages of `prefix` that applications write into the WAL inside their
    /// transactions with `pg_logical_emit_message(true, prefix, content)` (the
    /// transactional outbox): events of type [`EventType::Message`], in WAL order with the
    /// transaction's changes, and never for a transaction that rolls back. `entity` is the
    /// prefix; `types` is `[Message]`, which a subscription to a table never has.
    pub fn messages(prefix: &str) -> Self {
        Subscription {
            entity: prefix.to_owned(),
            types: vec![EventType::Message],
        }
    }

    /// Whether this is a subscription to messages ([`Subscription::messages`]), not to a
    /// table.
    pub fn is_messages(&self) -> bool {
        self.types.contains(&EventType::Message)
    }

    /// Whether `event` is one of these.
    pub fn matches(&self, event: &Event) -> bool {
        if event.kind == EventType::Message || self.is_messages() {
            return event.kind == EventType::Message
                && self.is_messages()
                && *event.entity == *self.entity;
        }
        event.is_entity(&self.entity) && self.takes(event.kind)
    }

    /// Whether events of type `kind` of the entity are delivered: every type when `types` is
    /// empty, a truncate always, a backfill's [`EventType::Read`] when `types` has it or
    /// [`EventType::Insert`] (a row that was there before is, to an operator of inserts, a row
    /// inserted before it started), and otherwise the types listed.
    pub fn takes(&self, kind: EventType) -> bool {
        self.types.is_empty()
            || kind == EventType::Truncate
            || self.types.contains(&kind)
            || (kind == EventType::Read && self.types.contains(&EventType::Insert))
    }
}

/// How an operator's effects reach the world, and so what streamex promises about them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// The operator writes to the database through [`Context::db`], a transaction that
    /// streamex commits together with the operator's checkpoint: each event's effects are
    /// applied **exactly once**, even across crashes.
    #[default]
    ExactlyOnce,
    /// The operator acts outside the database and gets no transaction: each event is handled
    /// **at least once** (again after a crash, until the slot has moved past it). Use
    /// [`Event::position`] as the idempotency key.
    AtLeastOnce,
}

/// What a handler gets besides the event.
pub struct Context<'a> {
    tx: Option<&'a mut sqlx::PgConnection>,
    attempt: u32,
    operator: &'a str,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        tx: Option<&'a mut sqlx::PgConnection>,
        attempt: u32,
        operator: &'a str,
    ) -> Self {
        Context {
            tx,
            attempt,
            operator,
        }
    }

    /// The transaction this event's effects go into, committed with the operator's
    /// checkpoint. An error for an operator that delivers [`Delivery::AtLeastOnce`].
    pub fn db(&mut self) -> Result<&mut sqlx::PgConnection, NoTransaction> {
        match self.tx.as_deref_mut() {
            Some(tx) => Ok(tx),
            None => Err(NoTransaction {
                operator: self.operator.to_owned(),
            }),
        }
    }

    /// 1 on the first try of this event, then 2, 3, ... on retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// [`Context::db`] was called by an operator that has no transaction.
#[derive(Debug, thiserror::Error)]
#[error(
    "operator {operator} has no transaction: it delivers at least once (Operator::delivery); \
     Context::db is for operators that deliver exactly once"
)]
pub struct NoTransaction {
    operator: String,
}

/// Context for an operator's error that asks for the next try to wait at least this long:
/// a receiver that answered `429 Too Many Requests` or `503 Service Unavailable` with a
/// `Retry-After` header, say. The runner waits the longer of this and its own backoff
/// (capped at [`RetryAfter::MAX`]); the try still counts against the retry policy.
///
/// ```
/// use std::time::Duration;
/// use anyhow::Context as _;
/// use streamex::operator::RetryAfter;
///
/// let error: anyhow::Result<()> = Err(anyhow::anyhow!("the receiver answered 429"));
/// let error = error.context(RetryAfter(Duration::from_secs(30))).unwrap_err();
/// assert_eq!(RetryAfter::of(&error), Some(Duration::from_secs(30)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// The longest wait an error can ask for: a receiver's `Retry-After: 86400` does not
    /// stall an operator for a day.
    pub const MAX: Duration = Duration::from_secs(600);

    /// The wait `error` asks for, if it (or any context on it) is a `RetryAfter`.
    pub fn of(error: &anyhow::Error) -> Option<Duration> {
        error
            .downcast_ref::<RetryAfter>()
            .map(|asked| asked.0.min(RetryAfter::MAX))
    }
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "asked to retry after {} ms", self.0.as_millis())
    }
}

/// A user-written reaction to change events.
///
/// Implement it with plain `async fn`s, and hand it to the service
/// ([`crate::Service::builder`]), or register it under its name
/// ([`Registry`]) so that a configuration can name it.
///
/// # Guarantees
///
/// - `handle` (or `handle_batch`) is called with the events the operator subscribes to, in
///   WAL order; different operators run concurrently, each at its own pace.
/// - [`Delivery::ExactlyOnce`] (the default): what the handler writes through
///   [`Context::db`] commits together with the operator's checkpoint, so it is applied
///   exactly once, across crashes and restarts. A failed or panicking handler rolls back and
///   is called again for the same event (up to the retry policy).
/// - [`Delivery::AtLeastOnce`]: no transaction; an event may be handled again after a crash.
///
/// ```
/// use streamex::event::{Event, EventType};
/// use streamex::operator::{Context, Operator, Subscription};
///
/// /// Keeps `post_titles (id, title)` in step with `posts`.
/// struct PostTitles;
///
/// impl Operator for PostTitles {
///     fn name(&self) -> &str {
///         "post_titles"
///     }
///
///     fn subscriptions(&self) -> Vec<Subscription> {
///         vec![Subscription::all("posts")]
///     }
///
///     async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
///         let id: i64 = event.get("id")?;
///         match event.kind {
///             EventType::Delete => {
///                 sqlx::query("DELETE FROM post_titles WHERE id = $1")
///                     .bind(id)
///                     .execute(ctx.db()?)
///                     .await?;
///             }
///             EventType::Truncate => {
///                 sqlx::query("TRUNCATE post_titles").execute(ctx.db()?).await?;
///             }
///             _ => {
///                 let title: String = event.get("title")?;
///                 sqlx::query(
///                     "INSERT INTO post_titles VALUES ($1, $2)
///                      ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
///                 )
///                 .bind(id)
///                 .bind(title)
///                 .execute(ctx.db()?)
///                 .await?;
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Operator: Send + Sync + 'static {
    /// The name it is registered and configured under; with the slot, also the key of its
    /// checkpoint, its state and its dead letters.
    fn name(&self) -> &str;

    /// The entities and event types it listens to.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// How its effects are applied: [`Delivery::ExactlyOnce`] (the default) or
    /// [`Delivery::AtLeastOnce`].
    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    /// For an operator that delivers [`Delivery::AtLeastOnce`]: at most how many of the events
    /// waiting for it go to [`handle_batch`](Operator::handle_batch) together (and never more
    /// than `[replication] batch_size`). Default 1: each event goes to
    /// [`handle`](Operator::handle) alone.
    ///
    /// When a batch fails, its events are handled again one by one with `handle`, each with
    /// the retry policy, as for an operator that delivers exactly once; so the events of the
    /// batch before the failing one are handled twice. Give more than 1 only when a batch is
    /// worth it (one request for many events) and the receiving end recognises an event it
    /// has seen by its [`Event::position`]. Ignored for an operator that delivers exactly
    /// once, which always gets batches.
    fn at_least_once_batch(&self) -> usize {
        1
    }

    /// Whether, on its first run on a slot (no checkpoint yet), it first gets every row that
    /// exists in the tables it subscribes to, as [`EventType::Read`] events, before the
    /// changes after them (see the `backfill` module of the engine for how the two meet
    /// exactly). Default: true. `[[operators]] backfill = false` in the configuration
    /// overrides it.
    fn backfill(&self) -> bool {
        true
    }

    /// Checks, before the service runs, what can be checked against the database: that the
    /// operator's statements prepare, that the columns it reads exist. An error stops
    /// start-up (and `streamex setup`) naming the operator, instead of surfacing at the first
    /// event. `db` is an ordinary connection, not a transaction kept. Default: nothing.
    fn check(
        &self,
        db: &mut sqlx::PgConnection,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = db;
        async { Ok(()) }
    }

    /// Handles one event. An error (or a panic) rolls back the transaction and triggers the
    /// retry policy. Called again for the same event after a failure or a crash.
    fn handle(
        &self,
        event: &Event,
        ctx: &mut Context<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Handles several events, in WAL order, in one transaction: called when more than one
    /// event is waiting (for an operator that delivers exactly once; for one that delivers at
    /// least once, when its [`at_least_once_batch`](Operator::at_least_once_batch) is more
    /// than 1, without a transaction). The default calls
    /// [`handle`](Operator::handle) for each; override it to write a whole batch with fewer
    /// statements (sum per key, one statement with arrays, skip repeated recomputations).
    ///
    /// It must leave the database as handling the events one by one would. If it fails, the
    /// transaction is rolled back and the events are handled again one by one with
    /// [`handle`](Operator::handle), each in its own transaction, so that a failing event is
    /// isolated and the retry policy applies to it alone.
    fn handle_batch(
        &self,
        events: &[Arc<Event>],
        ctx: &mut Context<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        async move {
            for event in events {
                self.handle(event, ctx).await?;
            }
            Ok(())
        }
    }

    /// Clears what the operator has derived, for `streamex rebuild`: called in the
    /// transaction that then backfills it (see [`backfill`](Operator::backfill)), so the
    /// rebuilt state replaces the old one in one commit. For derived state that re-sent rows
    /// cannot simply overwrite (a tally adds, it does not set). Default: an error saying the
    /// operator has none; `streamex backfill`, which re-sends the rows without a reset, suits
    /// state that a row's event recomputes.
    fn reset(&self, ctx: &mut Context<'_>) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = ctx;
        let name = self.name().to_owned();
        async move {
            anyhow::bail!(
                "operator {name} has no reset (Operator::reset), which `streamex rebuild` runs \
                 before its backfill: give it one, or use `streamex backfill` when re-sent rows \
                 overwrite what it derived"
            )
        }
    }

    /// streamex's declarative operator, whose waiting events the runner folds into one
    /// recomputation per id while it is behind. Not for other operators.
    #[doc(hidden)]
    fn as_sql(&self) -> Option<&SqlOperator> {
        None
    }
}

impl<T: Operator> Operator for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        (**self).subscriptions()
    }

    fn delivery(&self) -> Delivery {
        (**self).delivery()
    }

    fn at_least_once_batch(&self) -> usize {
        (**self).at_least_once_batch()
    }

    fn backfill(&self) -> bool {
        (**self).backfill()
    }

    fn check(
        &self,
        db: &mut sqlx::PgConnection,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).check(db)
    }

    fn handle(
        &self,
        event: &Event,
        ctx: &mut Context<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).handle(event, ctx)
    }

    fn handle_batch(
        &self,
        events: &[Arc<Event>],
        ctx: &mut Context<'_>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).handle_batch(events, ctx)
    }

    fn reset(&self, ctx: &mut Context<'_>) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).reset(ctx)
    }

    fn as_sql(&self) -> Option<&SqlOperator> {
        (**self).as_sql()
    }
}

/// A handler's future, boxed so that operators of different types can sit in one list.
pub(crate) type HandlerFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// [`Operator`] with its futures boxed: what the engine holds. Implemented for every operator.
pub(crate) trait DynOperator: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn subscriptions(&self) -> Vec<Subscription>;
    fn delivery(&self) -> Delivery;
    fn at_least_once_batch(&self) -> usize;
    fn backfill(&self) -> bool;
    fn check<'a>(&'a self, db: &'a mut sqlx::PgConnection) -> HandlerFuture<'a>;
    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a>;
    fn handle_batch<'a>(
        &'a self,
        events: &'a [Arc<Event>],
        ctx: &'a mut Context<'_>,
    ) -> HandlerFuture<'a>;
    fn reset<'a>(&'a self, ctx: &'a mut Context<'_>) -> HandlerFuture<'a>;
    fn as_sql(&self) -> Option<&SqlOperator>;
}

impl<T: Operator> DynOperator for T {
    fn name(&self) -> &str {
        Operator::name(self)
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        Operator::subscriptions(self)
    }

    fn delivery(&self) -> Delivery {
        Operator::delivery(self)
    }

    fn at_least_once_batch(&self) -> usize {
        Operator::at_least_once_batch(self)
    }

    fn backfill(&self) -> bool {
        Operator::backfill(self)
    }

    fn check<'a>(&'a self, db: &'a mut sqlx::PgConnection) -> HandlerFuture<'a> {
        Box::pin(Operator::check(self, db))
    }

    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        Box::pin(Operator::handle(self, event, ctx))
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [Arc<Event>],
        ctx: &'a mut Context<'_>,
    ) -> HandlerFuture<'a> {
        Box::pin(Operator::handle_batch(self, events, ctx))
    }

    fn reset<'a>(&'a self, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        Box::pin(Operator::reset(self, ctx))
    }

    fn as_sql(&self) -> Option<&SqlOperator> {
        Operator::as_sql(self)
    }
}

/// Any operator, ready to be run beside operators of other types: what the service, the
/// registry and the testing kit take. Cheap to clone (it is shared).
#[derive(Clone)]
pub struct AnyOperator(pub(crate) Arc<dyn DynOperator>);

impl AnyOperator {
    /// Wraps `operator`.
    pub fn new(operator: impl Operator) -> Self {
        AnyOperator(Arc::new(operator))
    }

    /// Its [`Operator::name`].
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// Its [`Operator::subscriptions`].
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.0.subscriptions()
    }

    /// Its [`Operator::check`].
    pub async fn check(&self, db: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        self.0.check(db).await
    }
}

impl std::fmt::Debug for AnyOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AnyOperator").field(&self.name()).finish()
    }
}

impl<T: Operator> From<T> for AnyOperator {
    fn from(operator: T) -> Self {
        AnyOperator::new(operator)
    }
}
