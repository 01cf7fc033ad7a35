//! An operator's partitions (`[[operators]] partitions = N`): their names, which partition a
//! row's events go to, and what an operator's earlier count of partitions (or the operator
//! run whole) had done when the count changes. `streamex run` runs an operator's partitions
//! side by side (the engine, `dispatch.rs`); workers share them (`worker/share.rs`).
//!
//! ```text
//!  row key (as `Streamex-Key`) ──► FNV-1a mod N ──► partition p, named "<operator>#p/N"
//!  count changed: checkpoints of the earlier count ──► Inherited (done, row by row)
//! ```

use std::sync::Arc;

use sqlx::PgPool;
use tracing::info;

use super::{Context, Delivery, DynOperator, HandlerFuture, SqlOperator, Subscription};
use crate::event::Event;
use crate::lsn::Position;

/// The most partitions an operator takes.
pub(crate) const MAX_PARTITIONS: u32 = 256;

/// The key of the advisory lock every partition of `operator` running at `partitions` holds
/// shared (on a worker, on its partition lock's session), so that a partition of another
/// count sees it ([`prepare_generation`]).
pub(crate) fn count_key(slot: &str, operator: &str, partitions: u32) -> String {
    format!("streamex count {slot} {operator} {partitions}")
}

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

/// Where an event goes among an operator's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// To one partition: the row's (or the id's).
    One(u32),
    /// To each of these, which handles its own part of it (a declarative operator's update
    /// that moves a row from one id to another: each partition recomputes its own id).
    Each(Vec<u32>),
    /// It concerns the rows of several partitions and must be applied once, in order with
    /// all of them: `applier` applies it once `others` are done with what came before it, and
    /// they go on once it has ([`Gate`]).
    Crossing { applier: u32, others: Vec<u32> },
}

/// The route of a Rust operator's event among `partitions`, by its row key (as
/// `Streamex-Key`, so that a row has the same partition on workers): a truncate and an
/// outbox message cross every partition (partition 0 applies them), an update that changes
/// the row's key to one of another partition crosses the two (the new key's applies it: the
/// row's later events are there).
pub(crate) fn route_of_row(event: &Event, partitions: u32) -> Route {
    use crate::event::EventType;
    if partitions <= 1 {
        return Route::One(0);
    }
    if matches!(event.kind, EventType::Truncate | EventType::Message) {
        return Route::Crossing {
            applier: 0,
            others: (1..partitions).collect(),
        };
    }
    let key = crate::jetstream::row_key(event);
    let new = partition_of(key.as_deref(), partitions);
    if let Some(old) = crate::jetstream::old_row_key(event, key.as_deref()) {
        let old = partition_of(Some(&old), partitions);
        if old != new {
            return Route::Crossing {
                applier: new,
                others: vec![old],
            };
        }
    }
    Route::One(new)
}

/// An event that crosses partitions ([`Route::Crossing`]), as the partitions concerned
/// share it: each of the others arrives once it has durably handled everything before it,
/// the applier applies it once all have, and opens the gate; they go on after that. Nothing
/// passes a gate whose applier or another partition is halted, so that no row's events are
/// applied out of order; the engine starts again when it is resumed.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The board index of the partition that applies it.
    pub applier: usize,
    /// The board indices of the other partitions concerned.
    pub others: Vec<usize>,
    /// How many of the others have arrived, and whether the applier has applied it.
    state: tokio::sync::watch::Sender<(usize, bool)>,
}

impl Gate {
    pub(crate) fn new(applier: usize, others: Vec<usize>) -> Self {
        Gate {
            applier,
            others,
            state: tokio::sync::watch::Sender::new((0, false)),
        }
    }

    /// One of the others is done with everything before the event.
    pub(crate) fn arrive(&self) {
        self.state.send_modify(|(arrived, _)| *arrived += 1);
    }

    /// The applier is done with the event.
    pub(crate) fn open(&self) {
        self.state.send_modify(|(_, open)| *open = true);
    }

    /// Whether `applies` (the applier: every other has arrived; another: the gate is open)
    /// may go on.
    pub(crate) fn passable(&self, applies: bool) -> bool {
        let (arrived, open) = *self.state.borrow();
        if applies {
            arrived >= self.others.len()
        } else {
            open
        }
    }

    /// Waits until the gate's state changes.
    pub(crate) async fn changed(&self) {
        let mut rx = self.state.subscribe();
        rx.borrow_and_update();
        // The sender lives as long as the gate.
        let _ = rx.changed().await;
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
    /// Each earlier count (1: the operator whole) with each of its partitions' checkpoint
    /// (none: it never applied an event). Workers take one; `streamex run` any number (a
    /// count that took over from another before the slot was past the other's checkpoints).
    generations: Vec<(u32, Vec<Option<Position>>)>,
    /// The newest of them: past it, nothing is inherited.
    pub through: Position,
}

impl Inherited {
    /// The earlier count (the first, for workers, which take only one).
    pub(crate) fn partitions(&self) -> u32 {
        self.generations.first().map_or(1, |(count, _)| *count)
    }

    /// Each earlier count with its newest checkpoint.
    pub(crate) fn counts(&self) -> impl Iterator<Item = (u32, Position)> + '_ {
        self.generations.iter().map(|(count, checkpoints)| {
            let newest = checkpoints.iter().flatten().max().copied();
            (*count, newest.unwrap_or(self.through))
        })
    }

    /// Whether the event at `position` of the row whose `Streamex-Key` is `key` was applied
    /// by an earlier partition (the one of its count that would have applied it: by its key,
    /// partition 0 without one, the new key's for an update that changes it). A count that
    /// took over from another skipped what the other had done, so an event is done when any
    /// earlier count did it.
    pub(crate) fn done(&self, key: Option<&str>, position: Position) -> bool {
        self.generations.iter().any(|(count, checkpoints)| {
            let earlier = partition_of(key, *count) as usize;
            checkpoints
                .get(earlier)
                .copied()
                .flatten()
                .is_some_and(|c| position <= c)
        })
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
        "operator {operator:?} runs in partitions = {partitions} here, and partitions of it \
         at partitions = {other} run too (backend pid {pid}): the two counts would apply the \
         same events. \
         Stop the workers of the other count, or give every worker the same partitions; this \
         one waits meanwhile"
    )]
    OtherCount {
        operator: String,
        partitions: u32,
        /// The other count.
        other: u32,
        pid: i32,
    },
}

/// The name of partition `index` of `partitions` of `operator`, the operator's own when
/// `partitions` is 1.
pub(crate) fn generation_name(operator: &str, index: u32, partitions: u32) -> String {
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
/// newest checkpoint (workers: `worker::share::retire`). Under a transaction-scoped
/// advisory lock of the operator, so that its partitions starting at once agree.
///
/// With `settled` (the slot's position, for `streamex run`, whose events all come from the
/// slot): an earlier count whose every checkpoint is of a transaction before it is done
/// with for good (those events never come again), and its rows go.
pub(crate) async fn prepare_generation(
    pool: &PgPool,
    slot: &str,
    operator: &str,
    partitions: u32,
    settled: Option<crate::lsn::Lsn>,
) -> Result<Option<Inherited>, GenerationError> {
    let mut tx = pool.begin().await?;
    lock_generations(&mut tx, slot, operator).await?;
    if partitions > 1 {
        // The whole operator takes its key exclusively, partitions share it, and each
        // partition shares its count's key: only partitions of two counts could run at
        // once. Each holds its locks before it gets here, so of two starting together, the
        // second to get here sees the first.
        let others: Vec<(String, u32)> = (2..=MAX_PARTITIONS)
            .filter(|&count| count != partitions)
            .map(|count| (count_key(slot, operator, count), count))
            .collect();
        let keys: Vec<String> = others.iter().map(|(key, _)| key.clone()).collect();
        let running = crate::status::advisory_lock_holders(&mut *tx, &keys).await?;
        if let Some((key, pid)) = running.into_iter().next() {
            let other = others
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(0, |(_, count)| *count);
            return Err(GenerationError::OtherCount {
                operator: operator.to_owned(),
                partitions,
                other,
                pid,
            });
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
    if let Some(settled) = settled {
        let done: Vec<u32> = earlier
            .iter()
            .filter(|(_, c)| c.iter().flatten().all(|p| p.commit_lsn < settled))
            .map(|(count, _)| *count)
            .collect();
        for count in done {
            earlier.remove(&count);
            remove_checkpoints_of_count(&mut tx, slot, operator, count).await?;
            info!(
                operator,
                partitions,
                earlier = count,
                "the slot is past every checkpoint of the operator's earlier partitions: \
                 they are removed"
            );
        }
    }
    if earlier.len() > 1 && settled.is_none() {
        let newest = earlier
            .iter()
            .max_by_key(|(_, c)| c.iter().flatten().max().copied())
            .map_or(1, |(n, _)| *n);
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
    let generations: Vec<(u32, Vec<Option<Position>>)> = earlier.into_iter().collect();
    let Some(through) = generations
        .iter()
        .flat_map(|(_, c)| c.iter().flatten())
        .max()
        .copied()
    else {
        tx.commit().await?;
        return Ok(None);
    };
    // What every earlier partition of a count had done (none when one of them had done
    // nothing): every row's events up to there are done. The least of the counts'.
    let oldest = generations
        .iter()
        .map(|(_, checkpoints)| {
            checkpoints
                .iter()
                .copied()
                .collect::<Option<Vec<_>>>()
                .and_then(|all| all.into_iter().min())
        })
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
    let names: Vec<String> = generations
        .iter()
        .flat_map(|(count, _)| (0..*count).map(|i| generation_name(operator, i, *count)))
        .collect();
    sqlx::query("DELETE FROM streamex.worker_progress WHERE slot = $1 AND operator = ANY($2)")
        .bind(slot)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(Inherited {
        generations,
        through,
    }))
}

/// Under `streamex run`: waits until the slot's confirmed position on the server is past
/// the newest checkpoint of each operator's earlier count of partitions (`pending`: the
/// operator and what it inherits), then removes that count's checkpoints (after a crash the
/// stream starts from the slot, so those events never come again). Ends when none is left,
/// or on `shutdown` (the next start removes them then).
pub(crate) async fn retire_when_settled(
    pool: PgPool,
    slot: Arc<str>,
    mut pending: Vec<(String, u32, Position)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    while !pending.is_empty() {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => return,
        }
        let confirmed: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&*slot)
        .fetch_optional(&pool)
        .await
        .map(Option::flatten);
        let Some(confirmed) = confirmed
            .ok()
            .flatten()
            .and_then(|c| c.parse::<crate::lsn::Lsn>().ok())
        else {
            continue;
        };
        let mut left = Vec::new();
        for (operator, count, through) in pending {
            if through.commit_lsn >= confirmed {
                left.push((operator, count, through));
                continue;
            }
            let removed = async {
                let mut tx = pool.begin().await?;
                lock_generations(&mut tx, &slot, &operator).await?;
                remove_checkpoints_of_count(&mut tx, &slot, &operator, count).await?;
                tx.commit().await
            }
            .await;
            match removed {
                Ok(()) => info!(
                    operator,
                    earlier = count,
                    "the slot is past every checkpoint of the operator's earlier partitions: \
                     they are removed"
                ),
                Err(error) => {
                    tracing::debug!(operator, error = %error, "removing the earlier partitions' checkpoints failed; trying again");
                    left.push((operator, count, through));
                }
            }
        }
        pending = left;
    }
}

/// Deletes the checkpoints of `operator`'s partitions at `count` (1: the operator whole), in
/// `tx`, which holds [`lock_generations`].
async fn remove_checkpoints_of_count(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    slot: &str,
    operator: &str,
    count: u32,
) -> Result<(), sqlx::Error> {
    let names: Vec<String> = (0..count)
        .map(|i| generation_name(operator, i, count))
        .collect();
    sqlx::query("DELETE FROM streamex.operator_checkpoints WHERE slot = $1 AND operator = ANY($2)")
        .bind(slot)
        .bind(&names)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The transaction-scoped lock under which an operator's counts of partitions change hands.
pub(crate) async fn lock_generations(
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
            generations: vec![(2, vec![Some(at(100)), Some(at(300))])],
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
            generations: vec![(2, vec![None, Some(at(300))])],
            through: at(300),
        };
        assert!(!never.done(zero, at(1)), "a partition that applied nothing");
    }

    #[test]
    fn partitions_are_named_apart_from_the_operator() {
        assert_eq!(partition_name("tallies", 2, 4), "tallies#2/4");
        assert_eq!(partition_of(None, 4), 0);
        assert_eq!(partition_of(Some("42"), 4), 3);
    }
}
