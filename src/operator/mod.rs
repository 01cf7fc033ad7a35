//! Operators: user code that reacts to change events.
//!
//! ```text
//! decoder ──► dispatcher ──┬─► operator A inbox (bounded) ──► A's task: batch ─► handler per event ─► checkpoint ─► commit
//!                          ├─► operator B inbox (bounded) ──► B's task: ...
//!                          └─► pubsub (transient listeners)
//!   each task reports "done through commit end E" ──► coordinator: min over operators ─► process status ─► ack(E)
//! ```
//!
//! # Guarantees
//!
//! - Each operator sees the events it listens to in WAL order, one at a time (or as a batch,
//!   in order, through [`Operator::handle_batch`]). Different
//!   operators run concurrently; a slow one slows the WAL reader once its bounded inbox is
//!   full, and never loses or reorders an event.
//! - A transactional operator (the default) gets a database transaction in its [`Context`];
//!   streamex writes the operator's checkpoint `(commit_lsn, ordinal)` in that same
//!   transaction and commits both together. After a crash the operator resumes after its
//!   checkpoint, so its writes to the database are applied exactly once.
//! - An operator that acts outside the database gets each event at least once; use
//!   [`Event::position`] as the idempotency key.
//! - The slot is acknowledged up to a commit only when every operator has durably finished
//!   every event up to it (or dead-lettered it) and the process status covering it is stored.

mod engine;
mod progress;
mod runner;
mod sql;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use engine::{
    Engine, EngineError, EngineExit, OperatorReport, OperatorSpec, OperatorStateKind,
};
pub use sql::{SqlOperator, SqlOperatorBuilder};

use crate::event::{Event, EventType};

/// What a handler returns: any error, which triggers the retry policy.
pub type HandlerResult = Result<(), anyhow::Error>;

/// A boxed handler future (operators are looked up by name, so the trait is object safe).
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'a>>;

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

    /// Whether `event` is one of these.
    pub fn matches(&self, event: &Event) -> bool {
        event.is_entity(&self.entity)
            && (self.types.is_empty()
                || event.kind == EventType::Truncate
                || self.types.contains(&event.kind))
    }
}

/// What a handler gets besides the event.
pub struct Context<'a> {
    /// The database transaction this event's effects go into, with the operator's checkpoint;
    /// `None` for an operator that is not [`Operator::transactional`].
    pub tx: Option<&'a mut sqlx::PgConnection>,
    /// 1 on the first try, then 2, 3, ... on retries.
    pub attempt: u32,
}

impl Context<'_> {
    /// The transaction's connection.
    ///
    /// # Panics
    /// When the operator declared itself not transactional.
    pub fn db(&mut self) -> &mut sqlx::PgConnection {
        self.tx
            .as_deref_mut()
            .expect("Context::db called by an operator that is not transactional")
    }
}

/// A user-written reaction to change events.
///
/// Implement it, register a constructor in `src/operators/mod.rs`, and name it in the
/// configuration's `[[operators]]`.
pub trait Operator: Send + Sync + 'static {
    /// The name it is registered and configured under; also the key of its checkpoint.
    fn name(&self) -> &str;

    /// The entities and event types it listens to.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// Whether it writes to the database through [`Context::db`] (and so gets exactly-once
    /// application with its checkpoint in the same transaction). Default: true.
    fn transactional(&self) -> bool {
        true
    }

    /// Handles one event. An error (or a panic) rolls back the transaction and triggers the
    /// retry policy. Called again for the same event after a failure or a crash.
    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a>;

    /// Handles several events, in WAL order, in one transaction: the runner calls it when more
    /// than one event is waiting (a transactional operator only). The default calls
    /// [`handle`](Operator::handle) for each; override it to write a whole batch with fewer
    /// statements (sum per key, one statement with arrays, skip repeated recomputations).
    ///
    /// It must leave the database as handling the events one by one would. If it fails, the
    /// transaction is rolled back and the events are handled again one by one with
    /// [`handle`](Operator::handle), each in its own transaction, so that a failing event is
    /// isolated and the retry policy applies to it alone.
    fn handle_batch<'a>(
        &'a self,
        events: &'a [Arc<Event>],
        ctx: &'a mut Context<'_>,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            for event in events {
                self.handle(event, ctx).await?;
            }
            Ok(())
        })
    }
}
