//! Process status across machines: how far each operator of a worker is done with each
//! entity it listens to, in `streamex.worker_progress`, which `streamex.processed` reads
//! beside `streamex.process_status`.
//!
//! ```text
//!  message passed to the runner (handled, skipped or not subscribed) ─► passed(seq, entity, timestamp)
//!  acknowledged through seq ─► acked(seq): those entities' timestamps are done
//!  every 100 ms, and when a session ends ─► flush: one upsert, each field kept at its maximum
//! ```
//!
//! `streamex run` stores process status when its own operators are done; an operator on a
//! worker is not one of them. So a worker registers a row per (slot, operator, entity) of
//! its operators, starting at the lowest timestamp, and moves it forward as its operator's
//! messages are acknowledged. `streamex.processed(entity, ts)` is true when
//! `process_status` says so **and** no worker row of that entity is behind `ts`: an entity
//! is processed when every operator listening to it, wherever it runs, is done.
//!
//! The row is written after the acknowledgement, not in the operator's transaction: after a
//! crash it may be behind what the operator has done (never ahead), until the next flush.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tracing::debug;

use crate::event::{EntityName, Event, EventType};
use crate::lsn::Lsn;
use crate::operator::Subscription;

/// One operator's progress per entity, waiting to be stored.
#[derive(Clone)]
pub(crate) struct Progress {
    inner: Arc<Mutex<Inner>>,
    pool: PgPool,
    slot: Arc<str>,
    operator: Arc<str>,
    stream: Arc<str>,
    timestamp_field: Arc<str>,
}

#[derive(Default)]
struct Inner {
    /// The entities the operator listens to (canonical names).
    entities: Vec<String>,
    /// When the stream was made (see `consumer::Opened`), once a session has opened it.
    stream_created: Option<String>,
    /// The stream sequence the consumer is acknowledged through, not yet stored.
    acked: Option<u64>,
    /// Per message passed and not yet acknowledged: (stream sequence, entity index,
    /// timestamp, commit LSN).
    passed: VecDeque<(u64, usize, i64, Lsn)>,
    /// Per entity index, the newest acknowledged (timestamp, commit LSN) not yet stored.
    done: BTreeMap<usize, (i64, Lsn)>,
}

impl Progress {
    /// The progress of `operator` on `slot`, listening to `subscriptions` (their tables;
    /// outbox messages have no process status).
    pub(crate) fn new(
        pool: PgPool,
        slot: Arc<str>,
        operator: &str,
        stream: &str,
        subscriptions: &[Subscription],
        default_schema: &str,
        timestamp_field: &str,
    ) -> Self {
        let mut entities: Vec<String> = subscriptions
            .iter()
            .filter(|s| !s.is_messages())
            .filter_map(|s| EntityName::parse(&s.entity).ok())
            .map(|n| n.canonical(default_schema))
            .collect();
        entities.sort();
        entities.dedup();
        Progress {
            inner: Arc::new(Mutex::new(Inner {
                entities,
                ..Inner::default()
            })),
            pool,
            slot,
            operator: operator.into(),
            stream: stream.into(),
            timestamp_field: timestamp_field.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the operator's rows: one per entity it listens to (at the lowest timestamp for
    /// a new one), none for an entity it no longer listens to.
    pub(crate) async fn register(&self) -> Result<(), sqlx::Error> {
        let entities = self.lock().entities.clone();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM streamex.worker_progress \
              WHERE slot = $1 AND operator = $2 AND entity <> ALL($3)",
        )
        .bind(&*self.slot)
        .bind(&*self.operator)
        .bind(&entities)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO streamex.worker_progress (slot, operator, entity, timestamp, lsn) \
             SELECT $1, $2, e, -9223372036854775808, '0/0' FROM unnest($3::text[]) AS e \
             ON CONFLICT (slot, operator, entity) DO NOTHING",
        )
        .bind(&*self.slot)
        .bind(&*self.operator)
        .bind(&entities)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The message at stream sequence `sequence` holding `event` goes to the runner.
    pub(crate) fn passed(&self, sequence: u64, event: &Event) {
        if event.kind == EventType::Message || event.decode_error.is_some() {
            return;
        }
        let timestamp = crate::operator::status_timestamp(event, &self.timestamp_field);
        let mut inner = self.lock();
        if let Some(index) = inner.entities.iter().position(|e| **e == *event.entity) {
            inner
                .passed
                .push_back((sequence, index, timestamp, event.commit_lsn));
        }
    }

    /// A session opened the stream, made at `created`.
    pub(crate) fn stream_created(&self, created: &str) {
        self.lock().stream_created = Some(created.to_owned());
    }

    /// When the stream the sessions opened was made, once one has.
    pub(crate) fn created(&self) -> Option<String> {
        self.lock().stream_created.clone()
    }

    /// The stream sequence the consumer was last stored as acknowledged through, for the
    /// stream made at `created` (none for another stream of the same name).
    pub(crate) async fn stored_acked(&self, created: &str) -> Result<Option<u64>, sqlx::Error> {
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT acked_through FROM streamex.worker_consumers \
              WHERE slot = $1 AND operator = $2 AND stream = $3 AND stream_created = $4",
        )
        .bind(&*self.slot)
        .bind(&*self.operator)
        .bind(&*self.stream)
        .bind(created)
        .fetch_optional(&self.pool)
        .await?;
        Ok(stored.and_then(|s| u64::try_from(s).ok()))
    }

    /// Every message through `sequence` is acknowledged.
    pub(crate) fn acked(&self, sequence: u64) {
        let mut inner = self.lock();
        if inner.acked.is_none_or(|acked| acked < sequence) {
            inner.acked = Some(sequence);
        }
        while inner.passed.front().is_some_and(|(s, ..)| *s <= sequence) {
            if let Some((_, index, timestamp, lsn)) = inner.passed.pop_front() {
                let entry = inner.done.entry(index).or_insert((timestamp, lsn));
                entry.0 = entry.0.max(timestamp);
                entry.1 = entry.1.max(lsn);
            }
        }
    }

    /// Forgets what was passed and not acknowledged (the session ended; it comes again).
    pub(crate) fn forget_unacked(&self) {
        self.lock().passed.clear();
    }

    /// Stores what is done and not yet stored, each field at its maximum. On failure it is
    /// kept, for the next flush.
    pub(crate) async fn flush(&self) {
        let (taken, names, acked) = {
            let mut inner = self.lock();
            let acked = inner.stream_created.clone().zip(inner.acked.take());
            (
                std::mem::take(&mut inner.done),
                inner.entities.clone(),
                acked,
            )
        };
        if let Some((created, acked)) = &acked
            && let Err(e) = self.store_acked(created, *acked).await
        {
            debug!(
                operator = %self.operator, error = %e,
                "storing where the worker's consumer is acknowledged through failed; trying again \
                 with the next flush"
            );
            let mut inner = self.lock();
            inner.acked = inner.acked.max(Some(*acked));
        }
        if taken.is_empty() {
            return;
        }
        let entities: Vec<&str> = taken.keys().map(|i| names[*i].as_str()).collect();
        let timestamps: Vec<i64> = taken.values().map(|(t, _)| *t).collect();
        let lsns: Vec<String> = taken.values().map(|(_, l)| l.to_string()).collect();
        let stored = sqlx::query(
            "INSERT INTO streamex.worker_progress AS w (slot, operator, entity, timestamp, lsn) \
             SELECT $1, $2, e, t, l::pg_lsn \
               FROM unnest($3::text[], $4::bigint[], $5::text[]) AS u(e, t, l) \
             ON CONFLICT (slot, operator, entity) DO UPDATE SET \
                 timestamp = greatest(w.timestamp, EXCLUDED.timestamp), \
                 lsn = greatest(w.lsn, EXCLUDED.lsn), updated_at = now()",
        )
        .bind(&*self.slot)
        .bind(&*self.operator)
        .bind(&entities)
        .bind(&timestamps)
        .bind(&lsns)
        .execute(&self.pool)
        .await;
        if let Err(e) = stored {
            debug!(
                operator = %self.operator, error = %e,
                "storing the worker's process status failed; trying again with the next flush"
            );
            let mut inner = self.lock();
            for (index, (timestamp, lsn)) in taken {
                let entry = inner.done.entry(index).or_insert((timestamp, lsn));
                entry.0 = entry.0.max(timestamp);
                entry.1 = entry.1.max(lsn);
            }
        }
    }

    /// Stores that the consumer of the stream made at `created` is acknowledged through
    /// `acked` (never backwards for the same stream).
    async fn store_acked(&self, created: &str, acked: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO streamex.worker_consumers AS c \
                    (slot, operator, stream, stream_created, acked_through) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (slot, operator) DO UPDATE SET \
                 acked_through = CASE \
                     WHEN (c.stream, c.stream_created) = (EXCLUDED.stream, EXCLUDED.stream_created) \
                     THEN greatest(c.acked_through, EXCLUDED.acked_through) \
                     ELSE EXCLUDED.acked_through END, \
                 stream = EXCLUDED.stream, stream_created = EXCLUDED.stream_created, \
                 updated_at = now()",
        )
        .bind(&*self.slot)
        .bind(&*self.operator)
        .bind(&*self.stream)
        .bind(created)
        .bind(i64::try_from(acked).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Progress {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://127.0.0.1:1/unused")
            .unwrap();
        Progress::new(
            pool,
            "s".into(),
            "op",
            "blog",
            &[
                Subscription::all("comments"),
                Subscription::only("public.posts", &[EventType::Insert]),
                Subscription::messages("outbox"),
            ],
            "public",
            "updated_at",
        )
    }

    fn event(entity: &str, timestamp: i64, lsn: u64) -> Event {
        let mut event = crate::testing::event(
            EventType::Insert,
            entity,
            serde_json::json!({"id": 1}),
            serde_json::Value::Null,
            0,
        );
        event.timestamp = timestamp;
        event.commit_lsn = Lsn(lsn);
        event
    }

    #[tokio::test]
    async fn only_acknowledged_messages_of_listened_entities_count_and_each_keeps_its_newest() {
        let p = progress();
        assert_eq!(p.lock().entities, ["comments", "posts"]);
        p.passed(1, &event("comments", 100, 0x10));
        p.passed(2, &event("posts", 90, 0x20));
        p.passed(3, &event("other", 500, 0x30));
        p.passed(4, &event("comments", 300, 0x40));
        assert!(p.lock().done.is_empty(), "nothing acknowledged yet");
        p.acked(2);
        assert_eq!(
            p.lock().done.clone().into_iter().collect::<Vec<_>>(),
            [(0, (100, Lsn(0x10))), (1, (90, Lsn(0x20)))]
        );
        p.acked(4);
        assert_eq!(p.lock().done.get(&0), Some(&(300, Lsn(0x40))));
        assert!(p.lock().passed.is_empty());
        p.passed(5, &event("comments", 400, 0x50));
        p.forget_unacked();
        p.acked(5);
        assert_eq!(p.lock().done.get(&0), Some(&(300, Lsn(0x40))));
    }
}
