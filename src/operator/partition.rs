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

use super::{Context, Delivery, DynOperator, HandlerFuture, SqlOperator, Subscription};
use crate::event::Event;
use crate::lsn::Position;

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
    fn partitions_are_named_apart_from_the_operator() {
        assert_eq!(partition_name("tallies", 2, 4), "tallies#2/4");
        assert_eq!(partition_of(None, 4), 0);
        assert_eq!(partition_of(Some("42"), 4), 3);
    }
}
