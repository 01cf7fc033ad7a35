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
use crate::event::Event;
use crate::lsn::Position;
use crate::operator::{Context, Delivery, DynOperator, HandlerFuture, SqlOperator, Subscription};

/// The most partitions an operator takes.
pub(crate) const MAX_PARTITIONS: u32 = 256;

/// The name of partition `index` of `partitions` of `operator`.
pub(crate) fn partition_name(operator: &str, index: u32, partitions: u32) -> String {
    format!("{operator}#{index}/{partitions}")
}

/// The operator, index and count of a partition's name (`tallies#2/4` → `("tallies", 2, 4)`);
/// `None` for a name that is no partition's.
pub(crate) fn split_partition(name: &str) -> Option<(&str, u32, u32)> {
    let (operator, _) = name.rsplit_once('#')?;
    let (count, index) = generation_of(operator, name)?;
    (count > 1).then_some((operator, index, count))
}

/// The partition of `event`'s row among `partitions`, from its `Streamex-Key` header (`key`).
pub(crate) fn partition_of(key: Option<&str>, partitions: u32) -> u32 {
    crate::jetstream::partition(key, partitions)
}

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

/// An operator seen as one of its partitions: named [`partition_name`], the rest its own.
pub(crate) struct PartitionOf {
    pub inner: Arc<dyn DynOperator>,
    pub name: String,
}

impl DynOperator for PartitionOf {
    fn name(&self) -> &str {
        &self.name
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        self.inner.subscriptions()
    }
    fn delivery(&self) -> Delivery {
        self.inner.delivery()
    }
    fn at_least_once_batch(&self) -> usize {
        self.inner.at_least_once_batch()
    }
    fn backfill(&self) -> bool {
        self.inner.backfill()
    }
    fn check<'a>(&'a self, db: &'a mut sqlx::PgConnection) -> HandlerFuture<'a> {
        self.inner.check(db)
    }
    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        self.inner.handle(event, ctx)
    }
    fn handle_batch<'a>(
        &'a self,
        events: &'a [Arc<Event>],
        ctx: &'a mut Context<'_>,
    ) -> HandlerFuture<'a> {
        self.inner.handle_batch(events, ctx)
    }
    fn reset<'a>(&'a self, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        self.inner.reset(ctx)
    }
    fn as_sql(&self) -> Option<&SqlOperator> {
        self.inner.as_sql()
    }
}

/// The partitions an operator ran in before the current count (`partitions` changed, or the
/// operator went from whole to partitions or back): their checkpoints say which events are
/// done, row by row, until every current partition is past the newest of them.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// The earlier count (1: the operator whole).
    pub partitions: u32,
    /// Each earlier partition's checkpoint (none: it never applied an event).
    checkpoints: Vec<Option<Position>>,
    /// The newest of them: past it, nothing is inherited.
    pub through: Position,
}

impl Inherited {
    /// Whether the event at `position` of the row whose `Streamex-Key` is `key` was applied
    /// by its earlier partition (the one that would have applied it: by its key, partition 0
    /// without one, the new key's for an update that changes it).
    pub(crate) fn done(&self, key: Option<&str>, position: Position) -> bool {
        let earlier = partition_of(key, self.partitions) as usize;
        self.checkpoints
            .get(earlier)
            .copied()
            .flatten()
            .is_some_and(|c| position <= c)
    }
}

/// An operator's checkpoints of more than one earlier count of partitions.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GenerationError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(
        "operator {operator:?} of slot {slot:?} has checkpoints of partitions = {counts} \
         besides the {partitions} it now runs in: its partitions were changed again before \
         those of the last change had caught up (each count's checkpoints say what it did, \
         and the new count starts from the last one's). Run it with partitions = {newest} \
         until streamex.operator_checkpoints holds only that count's rows \
         (`<operator>#<p>/<N>`), then change it"
    )]
    Generations {
        operator: String,
        slot: String,
        partitions: u32,
        counts: String,
        newest: u32,
    },
    /// A partition of another count runs (on a worker not yet stopped, or configured
    /// otherwise): the two would apply the same events.
    #[error(
        "operator {operator:?} runs in partitions = {partitions} here, and its partition \
         {other:?} runs too (backend pid {pid}): the two counts would apply the same events. \
         Stop the workers of the other count, or give every worker the same partitions; this \
         one waits meanwhile"
    )]
    OtherCount {
        operator: String,
        partitions: u32,
        other: String,
        pid: i32,
    },
}

/// The name of partition `index` of `partitions` of `operator`, the operator's own when
/// `partitions` is 1.
fn generation_name(operator: &str, index: u32, partitions: u32) -> String {
    if partitions == 1 {
        operator.to_owned()
    } else {
        partition_name(operator, index, partitions)
    }
}

/// The count and index of `name` among the partitions of `operator` (`(1, 0)`: the operator
/// itself); `None` for another operator's name.
fn generation_of(operator: &str, name: &str) -> Option<(u32, u32)> {
    if name == operator {
        return Some((1, 0));
    }
    let (index, count) = name
        .strip_prefix(operator)?
        .strip_prefix('#')?
        .split_once('/')?;
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index < count && count > 1).then_some((count, index))
}

/// Prepares `operator`, about to run in `partitions` (1: whole), for its first run at this
/// count: when it ran at another count before, every current partition without a checkpoint
/// gets the oldest of the earlier checkpoints (what every earlier partition had done), and
/// the earlier partitions' process-status rows go (nothing advances them any more). Returns
/// what is inherited from the earlier count, until every current partition is past its
/// newest checkpoint ([`retire`]). Under a transaction-scoped advisory lock of the operator,
/// so that its partitions starting at once agree.
pub(crate) async fn prepare_generation(
    pool: &PgPool,
    slot: &str,
    operator: &str,
    partitions: u32,
) -> Result<Option<Inherited>, GenerationError> {
    let mut tx = pool.begin().await?;
    lock_generations(&mut tx, slot, operator).await?;
    if partitions > 1 {
        // The whole operator takes its key exclusively, partitions share it: only partitions
        // of two counts could run at once. Each holds its lock before it gets here, so of two
        // starting together, the second to get here sees the first.
        let key = crate::status::operator_lock_key(slot, operator);
        let running: Vec<(i32, String)> = sqlx::query_as(
            "SELECT pid, application_name FROM pg_stat_activity
              WHERE datname = current_database() AND starts_with(application_name, $1)",
        )
        .bind(format!("{key}#"))
        .fetch_all(&mut *tx)
        .await?;
        for (pid, name) in running {
            // `<key of the operator>#p/N` less `<key of the operator>` is `#p/N`.
            let Some(name) = name
                .strip_prefix(key.as_str())
                .map(|n| format!("{operator}{n}"))
            else {
                continue;
            };
            if let Some((count, _)) = generation_of(operator, &name)
                && count != partitions
            {
                return Err(GenerationError::OtherCount {
                    operator: operator.to_owned(),
                    partitions,
                    other: name,
                    pid,
                });
            }
        }
    }
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT operator, commit_lsn::text, ordinal FROM streamex.operator_checkpoints
          WHERE slot = $1 AND (operator = $2 OR starts_with(operator, $2 || '#'))",
    )
    .bind(slot)
    .bind(operator)
    .fetch_all(&mut *tx)
    .await?;
    let mut earlier: std::collections::BTreeMap<u32, Vec<Option<Position>>> = Default::default();
    let mut current: Vec<Option<Position>> = vec![None; partitions as usize];
    for (name, lsn, ordinal) in rows {
        let (Some((count, index)), Ok(lsn), Ok(ordinal)) = (
            generation_of(operator, &name),
            lsn.parse::<crate::lsn::Lsn>(),
            u64::try_from(ordinal),
        ) else {
            continue;
        };
        let position = Some(Position::new(lsn, ordinal));
        if count == partitions {
            current[index as usize] = position;
        } else {
            earlier
                .entry(count)
                .or_insert_with(|| vec![None; count as usize])[index as usize] = position;
        }
    }
    let Some((&count, checkpoints)) = earlier.iter().next() else {
        return Ok(None);
    };
    if earlier.len() > 1 {
        let newest = earlier
            .iter()
            .max_by_key(|(_, c)| c.iter().flatten().max().copied())
            .map_or(count, |(n, _)| *n);
        return Err(GenerationError::Generations {
            operator: operator.to_owned(),
            slot: slot.to_owned(),
            partitions,
            counts: earlier
                .keys()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
            newest,
        });
    }
    let checkpoints = checkpoints.clone();
    let Some(through) = checkpoints.iter().flatten().max().copied() else {
        return Ok(None);
    };
    // What every earlier partition had done; none when one of them had done nothing.
    let oldest = checkpoints
        .iter()
        .copied()
        .collect::<Option<Vec<_>>>()
        .and_then(|all| all.into_iter().min());
    if let Some(oldest) = oldest {
        for (index, _) in current.iter().enumerate().filter(|(_, c)| c.is_none()) {
            let index = u32::try_from(index).unwrap_or(0);
            sqlx::query(
                "INSERT INTO streamex.operator_checkpoints (slot, operator, commit_lsn, ordinal)
                 VALUES ($1, $2, $3::pg_lsn, $4) ON CONFLICT (slot, operator) DO NOTHING",
            )
            .bind(slot)
            .bind(generation_name(operator, index, partitions))
            .bind(oldest.commit_lsn.to_string())
            .bind(i64::try_from(oldest.ordinal).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
    }
    let names: Vec<String> = (0..count)
        .map(|i| generation_name(operator, i, count))
        .collect();
    sqlx::query("DELETE FROM streamex.worker_progress WHERE slot = $1 AND operator = ANY($2)")
        .bind(slot)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(Inherited {
        partitions: count,
        checkpoints,
        through,
    }))
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
        let earlier: Vec<String> = (0..inherited.partitions)
            .map(|i| generation_name(operator, i, inherited.partitions))
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
            earlier = inherited.partitions,
            "every partition of the operator is past what the earlier partitions had done: \
             their checkpoints are removed"
        );
        retired = Some(earlier);
    }
    tx.commit().await?;
    Ok(retired)
}

/// The transaction-scoped lock under which an operator's counts of partitions change hands.
async fn lock_generations(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    slot: &str,
    operator: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("streamex partitions {slot} {operator}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
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
    use crate::lsn::Lsn;

    #[test]
    fn partition_names_tell_their_count_and_index() {
        assert_eq!(generation_of("tallies", "tallies"), Some((1, 0)));
        assert_eq!(generation_of("tallies", "tallies#2/4"), Some((4, 2)));
        for other in [
            "tallies#4/4",
            "tallies#0/1",
            "tallies#x/4",
            "tallies2#0/4",
            "talli",
        ] {
            assert_eq!(generation_of("tallies", other), None, "{other}");
        }
        assert_eq!(split_partition("tallies#2/4"), Some(("tallies", 2, 4)));
        assert_eq!(split_partition("odd#name#1/3"), Some(("odd#name", 1, 3)));
        for other in ["tallies", "tallies#4/4", "tallies#0/1", "tallies#2/x"] {
            assert_eq!(split_partition(other), None, "{other}");
        }
        assert_eq!(generation_name("tallies", 0, 1), "tallies");
        assert_eq!(generation_name("tallies", 3, 4), "tallies#3/4");
    }

    #[test]
    fn an_event_is_inherited_as_done_by_the_earlier_partition_that_had_its_row() {
        let at = |lsn: u64| Position::new(Lsn(lsn), 0);
        // Two earlier partitions: 0 done through 100, 1 through 300.
        let inherited = Inherited {
            partitions: 2,
            checkpoints: vec![Some(at(100)), Some(at(300))],
            through: at(300),
        };
        let (zero, one) = (
            (0..)
                .map(|k: u32| k.to_string())
                .find(|k| partition_of(Some(k), 2) == 0),
            (0..)
                .map(|k: u32| k.to_string())
                .find(|k| partition_of(Some(k), 2) == 1),
        );
        let (zero, one) = (zero.as_deref(), one.as_deref());
        assert!(inherited.done(zero, at(100)));
        assert!(
            !inherited.done(zero, at(200)),
            "partition 0 had not got there"
        );
        assert!(inherited.done(one, at(200)));
        assert!(!inherited.done(one, at(301)));
        assert!(inherited.done(None, at(50)), "no key: partition 0's");
        assert!(!inherited.done(None, at(150)));
        let never = Inherited {
            partitions: 2,
            checkpoints: vec![None, Some(at(300))],
            through: at(300),
        };
        assert!(!never.done(zero, at(1)), "a partition that applied nothing");
    }

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

    #[test]
    fn partitions_are_named_apart_from_the_operator() {
        assert_eq!(partition_name("tallies", 2, 4), "tallies#2/4");
        assert_eq!(partition_of(None, 4), 0);
        assert_eq!(partition_of(Some("42"), 4), 3);
    }
}
