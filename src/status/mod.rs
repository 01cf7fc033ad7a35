//! Process status: how far streamex has processed each entity, and the `streamex` schema.
//!
//! # The contract
//!
//! An *item* says "every change to `entity` (a table name) committed up to `timestamp`
//! (µs since the Unix epoch) and WAL position `lsn` has been processed by the operators".
//! Items come from the commit timestamps and LSNs of the events as they are processed, and
//! are stored with [`ProcessStatusStorage::item_processed`] /
//! [`ProcessStatusStorage::items_processed`].
//!
//! An item **never moves backwards**: storing an older timestamp or an older LSN leaves the
//! newer one in place. Each field keeps its own maximum, so a late, out-of-order write cannot
//! make an application believe its change has not been processed yet (nor, worse, forget that
//! it has).
//!
//! [`ProcessStatusStorage::processed`] answers "has `entity` been processed up to
//! `timestamp`?": true when the stored timestamp is greater than **or equal to** the one asked
//! about, false for an entity never seen. That lets an application that wrote a row wait until
//! the operators have seen it, which is what EventStreamex's process status is for. With the
//! PostgreSQL backend the same rule is available in SQL:
//!
//! ```sql
//! -- After UPDATE posts SET ..., updated_at = now() RETURNING updated_at:
//! SELECT streamex.processed('posts', $updated_at);
//! ```
//!
//! The timestamp the application asks about must be the one of its write as PostgreSQL saw
//! it (such as `updated_at` filled with `now()`, the transaction start): commit timestamps are
//! never earlier than that, so once the commit has been processed the answer is true.
//!
//! # Backends
//!
//! - [`MemoryStatus`]: in process, lost on restart; for tests and single-process setups.
//! - [`PostgresStatus`]: the `streamex.process_status` table, readable by applications.
//! - [`StatusBackend`]: either of them, chosen at start-up from the configuration.
//!
//! The PostgreSQL writes also exist as free functions generic over [`sqlx::PgExecutor`]
//! (see [`postgres`]), so the engine can store process status, operator checkpoints, operator
//! state and dead letters in one transaction with its own work.
//!
//! # The `streamex` schema
//!
//! [`migrate`] creates it (sqlx's bookkeeping table `_sqlx_migrations` lives there too, not in
//! `public`):
//!
//! ```text
//! streamex.process_status       entity text PK, timestamp bigint (µs since the Unix epoch),
//!                               lsn pg_lsn, updated_at timestamptz
//! streamex.processed(entity text, ts timestamptz) → boolean
//! streamex.epoch_micros(ts timestamptz) → bigint      exact µs since the Unix epoch
//! streamex.operator_checkpoints slot text, operator text, PK (slot, operator),
//!                               commit_lsn pg_lsn, ordinal bigint, updated_at timestamptz
//! streamex.operator_state       slot text, operator text, PK (slot, operator),
//!                               state 'running' | 'halted', last_error text,
//!                               error_at timestamptz, failed_commit_lsn pg_lsn,
//!                               failed_ordinal bigint, attempts int,
//!                               skip_commit_lsn pg_lsn, skip_ordinal bigint
//! streamex.dead_letters         id bigserial PK, slot text, operator text, commit_lsn pg_lsn,
//!                               ordinal bigint, event jsonb, error text, attempts int,
//!                               created_at timestamptz,
//!                               UNIQUE (slot, operator, commit_lsn, ordinal)
//! streamex.worker_progress      slot text, operator text, entity text,
//!                               PK (slot, operator, entity), timestamp bigint, lsn pg_lsn,
//!                               updated_at timestamptz: how far an operator run by
//!                               `streamex worker` is done with an entity (processed reads it)
//! streamex.worker_consumers     slot text, operator text, PK (slot, operator), stream text,
//!                               stream_created text, acked_through bigint, updated_at
//! ```
//!
//! An operator run by `streamex worker` is not among the operators of the `run` that stores
//! `process_status`: `streamex.processed` is true only when, besides, no
//! `worker_progress` row of the entity is behind the timestamp asked about.
//!
//! Checkpoints, operator state and dead letters are kept per replication slot (the
//! configuration's `slot`): two configurations with different slots on one database may run
//! operators of the same name, and each has its own progress and halts. Every query on them
//! takes the slot. Rows from before this was so are adopted as `sql/0003_*.sql` explains
//! ([`adopt_unkeyed_rows`]).

pub mod contract;

/// The schema holding streamex's own tables. Its changes are never events: with a
/// publication `FOR ALL TABLES`, each process-status write would otherwise come back as an event
/// whose processing writes process status again, forever.
pub const SCHEMA: &str = "streamex";

mod error;
mod memory;
#[doc(hidden)]
pub mod postgres;

use std::future::Future;

use crate::lsn::Lsn;

pub use error::StatusError;
pub use memory::MemoryStatus;
pub use postgres::{
    Adopted, BackfillProgress, BackfillRequest, DeadLetter, OperatorRunState, OperatorState,
    PostgresStatus,
};
// The queries on the streamex schema, for the engine and streamex's own tests.
#[doc(hidden)]
pub use postgres::{
    adopt_unkeyed_rows, advance_checkpoint, clear_backfill_progress, clear_operator_skip,
    count_unkeyed_rows, finish_backfill, insert_dead_letter, is_processed, list_dead_letters,
    load_checkpoint, load_checkpoints, load_items, load_operator_states, migrate,
    operator_lock_key, request_backfill, reset_items, set_operator_halted, set_operator_running,
    set_operator_running_skipping, store_backfill_progress, store_checkpoint, store_item,
    store_items,
};
pub(crate) use postgres::{advisory_lock_holders, has_any_checkpoint, logical_slot_exists};

/// One entity's process status.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusItem {
    /// The entity: the name of the table the changes came from.
    pub entity: String,
    /// Commit timestamp of the latest processed change, µs since the Unix epoch.
    pub timestamp: i64,
    /// WAL position of the latest processed change.
    pub lsn: Lsn,
}

impl StatusItem {
    /// `entity` processed up to `timestamp` (µs since the Unix epoch) and `lsn`.
    pub fn new(entity: impl Into<String>, timestamp: i64, lsn: Lsn) -> Self {
        StatusItem {
            entity: entity.into(),
            timestamp,
            lsn,
        }
    }
}

/// Where process status is kept: EventStreamex's process-status adapter contract.
pub trait ProcessStatusStorage: Send + Sync + 'static {
    /// Records that `entity` has been processed up to `timestamp` (µs) / `lsn`. Never moves
    /// backwards: an older timestamp or lsn leaves the newer one in place (each field keeps its
    /// maximum).
    fn item_processed(
        &self,
        entity: &str,
        timestamp: i64,
        lsn: Lsn,
    ) -> impl Future<Output = Result<(), StatusError>> + Send;

    /// Several at once, with the same rule; an entity listed twice keeps the maximum of each
    /// field. One round trip for the PostgreSQL backend.
    fn items_processed(
        &self,
        items: &[StatusItem],
    ) -> impl Future<Output = Result<(), StatusError>> + Send;

    /// Every stored item, in no particular order.
    fn load(&self) -> impl Future<Output = Result<Vec<StatusItem>, StatusError>> + Send;

    /// Forgets everything.
    fn reset(&self) -> impl Future<Output = Result<(), StatusError>> + Send;

    /// Whether `entity` has been processed up to `timestamp` (µs): true when the stored
    /// timestamp is `>= timestamp`, false for an unknown entity. The same rule as the SQL
    /// function `streamex.processed`.
    fn processed(
        &self,
        entity: &str,
        timestamp: i64,
    ) -> impl Future<Output = Result<bool, StatusError>> + Send;
}

/// The backend chosen from the configuration: the engine stays generic over
/// [`ProcessStatusStorage`] and `main` picks the variant.
#[derive(Clone, Debug)]
pub enum StatusBackend {
    /// `[process_status] backend = "memory"`.
    Memory(MemoryStatus),
    /// `[process_status] backend = "postgres"`.
    Postgres(PostgresStatus),
}

impl From<MemoryStatus> for StatusBackend {
    fn from(status: MemoryStatus) -> Self {
        StatusBackend::Memory(status)
    }
}

impl From<PostgresStatus> for StatusBackend {
    fn from(status: PostgresStatus) -> Self {
        StatusBackend::Postgres(status)
    }
}

impl ProcessStatusStorage for StatusBackend {
    async fn item_processed(
        &self,
        entity: &str,
        timestamp: i64,
        lsn: Lsn,
    ) -> Result<(), StatusError> {
        match self {
            StatusBackend::Memory(s) => s.item_processed(entity, timestamp, lsn).await,
            StatusBackend::Postgres(s) => s.item_processed(entity, timestamp, lsn).await,
        }
    }

    async fn items_processed(&self, items: &[StatusItem]) -> Result<(), StatusError> {
        match self {
            StatusBackend::Memory(s) => s.items_processed(items).await,
            StatusBackend::Postgres(s) => s.items_processed(items).await,
        }
    }

    async fn load(&self) -> Result<Vec<StatusItem>, StatusError> {
        match self {
            StatusBackend::Memory(s) => s.load().await,
            StatusBackend::Postgres(s) => s.load().await,
        }
    }

    async fn reset(&self) -> Result<(), StatusError> {
        match self {
            StatusBackend::Memory(s) => s.reset().await,
            StatusBackend::Postgres(s) => s.reset().await,
        }
    }

    async fn processed(&self, entity: &str, timestamp: i64) -> Result<bool, StatusError> {
        match self {
            StatusBackend::Memory(s) => s.processed(entity, timestamp).await,
            StatusBackend::Postgres(s) => s.processed(entity, timestamp).await,
        }
    }
}
