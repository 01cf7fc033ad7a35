//! Workers sharing an operator's partitions (`[[operators]] partitions = N`).
//!
//! ```text
//!  each worker: presence (a shared lock, counted) ──► members W
//!  per partition p: lock "<operator>#p/N" (+ the operator's own key, shared)
//!     taken only while this worker holds fewer than ceil(N / W); one over it is handed over
//!  each partition's consumer reads every message of the operator's subjects and hands the
//!  operator only its rows: FNV-1a of `Streamex-Key` modulo N (partition 0 without a key)
//! ```
//!
//! A partition is an operator of its own to the rest of the worker: its name
//! `<operator>#<p>/<N>` keys its lock, consumer, checkpoint, halt and dead letters, and
//! process-status rows. Every partition passes every message (as it passes what the operator
//! does not subscribe to), so each one's `worker_progress` rows advance for every entity and
//! `streamex.processed` waits for all of them. A row's events stay in one partition, in
//! order; rows of different partitions are handled at once, on as many workers as share them.
//!
//! Some events concern the rows of more than one partition: a truncate and an outbox
//! message (every partition's), and an update that changes a row's key to one of another
//! partition (`Streamex-Old-Key`; the row's earlier events are in the old key's partition,
//! its later ones in the new key's). Each partition concerned holds such an event back (a
//! barrier in `task.rs`) until the applier (partition 0; the new key's) and the partitions
//! it waits on are done through the message before it; the applier then applies it, and the
//! others go past it once the applier is done through it. A declarative operator
//! is refused partitions: two of them recomputing one id at once could leave the older result.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::lock::{self, Also, OperatorLock};
pub(crate) use crate::operator::partition::{
    GenerationError, Inherited, MAX_PARTITIONS, PartitionOf, count_key, partition_name,
    partition_of, prepare_generation, split_partition,
};
use crate::operator::partition::{generation_name, lock_generations};

/// One operator's partitions as this worker holds them, and how many workers share them.
#[derive(Debug)]
pub(crate) struct Share {
    pub partitions: u32,
    held: Mutex<BTreeSet<u32>>,
    /// Live workers sharing the operator (this one included), as last counted; 0 before.
    members: AtomicUsize,
}

impl Share {
    pub(crate) fn new(partitions: u32) -> Self {
        Share {
            partitions,
            held: Mutex::new(BTreeSet::new()),
            members: AtomicUsize::new(0),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most partitions this worker should hold: ceil(N / W), all of them before the
    /// workers are counted.
    fn target(&self) -> usize {
        let partitions = usize::try_from(self.partitions).unwrap_or(usize::MAX);
        match self.members.load(Ordering::Relaxed) {
            0 | 1 => partitions,
            members => partitions.div_ceil(members),
        }
    }

    /// Whether this worker may take one more partition.
    pub(crate) fn may_take(&self) -> bool {
        self.members.load(Ordering::Relaxed) > 0 && self.held().len() < self.target()
    }

    pub(crate) fn taken(&self, index: u32) {
        self.held().insert(index);
    }

    pub(crate) fn released(&self, index: u32) {
        self.held().remove(&index);
    }

    /// Whether partition `index`, held, is one to hand over: this worker holds more than its
    /// share and `index` is among the highest it holds past it.
    pub(crate) fn must_give(&self, index: u32) -> bool {
        let target = self.target();
        let held = self.held();
        held.len() > target && held.iter().skip(target).any(|&p| p == index)
    }

    /// Keeps this worker counted among those sharing `operator` (a shared lock held on a
    /// lease), and counts them every second, until `shutdown`.
    pub(crate) async fn presence(
        self: Arc<Self>,
        pool: PgPool,
        slot: Arc<str>,
        operator: String,
        lease: Duration,
        shutdown: CancellationToken,
    ) {
        // Per count: a worker given another count of partitions (whose partitions wait while
        // these run) must not make these hand theirs over to it.
        let key = lock::members_key(&slot, &operator, self.partitions);
        let name = format!("{operator}#members");
        let mut present: Option<OperatorLock> = None;
        loop {
            if present.as_ref().is_none_or(|p| !p.held()) {
                let also = Also {
                    shared: vec![key.clone()],
                    shared_only: true,
                    ..Also::default()
                };
                match OperatorLock::acquire(&pool, &slot, &name, &also, lease, &shutdown).await {
                    Ok(Some(taken)) => present = Some(taken),
                    Ok(None) => return,
                    Err(error) => {
                        warn!(operator, error = %error, "could not count this worker among those sharing the operator's partitions; trying again");
                    }
                }
            }
            match lock::count_shared(&pool, &key).await {
                Ok(count) => {
                    let before = self.members.swap(count.max(1), Ordering::Relaxed);
                    if before != count.max(1) {
                        info!(
                            operator,
                            workers = count.max(1),
                            partitions = self.partitions,
                            share = self.target(),
                            "workers sharing the operator's partitions counted"
                        );
                    }
                }
                Err(error) => {
                    warn!(operator, error = %error, "counting the workers sharing the operator's partitions failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(lock::POLL) => {}
                _ = shutdown.cancelled() => {
                    if let Some(present) = present {
                        present.release().await;
                    }
                    return;
                }
            }
        }
    }
}

/// `name` (a partition of `operator` in `partitions`, or the operator whole) has everything
/// through `inherited.through` done: its checkpoint moves up to that position (true of its
/// rows: it has passed them all), and once every partition of the count is there, the
/// earlier count's checkpoints and consumer positions go: then the names of the earlier
/// partitions, whose JetStream consumers are left to remove.
pub(crate) async fn retire(
    pool: &PgPool,
    slot: &str,
    operator: &str,
    name: &str,
    partitions: u32,
    inherited: &Inherited,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_generations(&mut tx, slot, operator).await?;
    let (lsn, ordinal) = (
        inherited.through.commit_lsn.to_string(),
        i64::try_from(inherited.through.ordinal).unwrap_or(i64::MAX),
    );
    sqlx::query(
        "INSERT INTO streamex.operator_checkpoints AS c (slot, operator, commit_lsn, ordinal)
         VALUES ($1, $2, $3::pg_lsn, $4)
         ON CONFLICT (slot, operator) DO UPDATE
            SET commit_lsn = EXCLUDED.commit_lsn, ordinal = EXCLUDED.ordinal
          WHERE (c.commit_lsn, c.ordinal) < (EXCLUDED.commit_lsn, EXCLUDED.ordinal)",
    )
    .bind(slot)
    .bind(name)
    .bind(&lsn)
    .bind(ordinal)
    .execute(&mut *tx)
    .await?;
    let current: Vec<String> = (0..partitions)
        .map(|i| generation_name(operator, i, partitions))
        .collect();
    let there: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM streamex.operator_checkpoints
          WHERE slot = $1 AND operator = ANY($2)
            AND (commit_lsn, ordinal) >= ($3::pg_lsn, $4)",
    )
    .bind(slot)
    .bind(&current)
    .bind(&lsn)
    .bind(ordinal)
    .fetch_one(&mut *tx)
    .await?;
    let mut retired = None;
    if usize::try_from(there).unwrap_or(0) == current.len() {
        let earlier: Vec<String> = (0..inherited.partitions())
            .map(|i| generation_name(operator, i, inherited.partitions()))
            .collect();
        for table in [
            "operator_checkpoints",
            "worker_consumers",
            "worker_progress",
        ] {
            sqlx::query(&format!(
                "DELETE FROM streamex.{table} WHERE slot = $1 AND operator = ANY($2)"
            ))
            .bind(slot)
            .bind(&earlier)
            .execute(&mut *tx)
            .await?;
        }
        info!(
            operator,
            partitions,
            earlier = inherited.partitions(),
            "every partition of the operator is past what the earlier partitions had done: \
             their checkpoints are removed"
        );
        retired = Some(earlier);
    }
    tx.commit().await?;
    Ok(retired)
}

/// Where partitions `names` are stored as acknowledged through, on the stream made at
/// `created`: one entry per partition that has stored it.
pub(crate) async fn acked_of(
    pool: &PgPool,
    slot: &str,
    names: &[String],
    stream: &str,
    created: &str,
) -> Result<Vec<u64>, sqlx::Error> {
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT acked_through FROM streamex.worker_consumers
          WHERE slot = $1 AND operator = ANY($2) AND stream = $3 AND stream_created = $4",
    )
    .bind(slot)
    .bind(names)
    .bind(stream)
    .bind(created)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|a| u64::try_from(a).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_takes_its_share_and_hands_the_highest_partitions_over() {
        let share = Share::new(4);
        assert!(!share.may_take(), "not before the workers are counted");
        share.members.store(1, Ordering::Relaxed);
        for p in 0..4 {
            assert!(share.may_take());
            share.taken(p);
        }
        assert!(!share.may_take(), "all four held");
        assert!((0..4).all(|p| !share.must_give(p)));
        // A second worker: two each; this one gives 2 and 3.
        share.members.store(2, Ordering::Relaxed);
        assert_eq!(
            (0..4).map(|p| share.must_give(p)).collect::<Vec<_>>(),
            [false, false, true, true]
        );
        share.released(3);
        assert!(share.must_give(2) && !share.must_give(1));
        share.released(2);
        assert!(!share.may_take() && (0..2).all(|p| !share.must_give(p)));
        // Three workers over four partitions: two at most here.
        share.members.store(3, Ordering::Relaxed);
        assert!(!share.may_take() && !share.must_give(1));
        // The other ones gone: all again.
        share.members.store(1, Ordering::Relaxed);
        assert!(share.may_take());
    }
}
