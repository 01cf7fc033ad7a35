//! One operator of a worker: sessions of its consumer feeding the engine's own runner.
//!
//! ```text
//!  lock (slot, operator) ─► state: halted? wait for `streamex resume` ─► checkpoint, skip
//!   ─► consumer made anew after what is acknowledged (consumer.rs) ─► session:
//!        pull (≤ max_ack_pending held) ─► arrive: new / again / missed (held.rs)
//!          new ─► event (message.rs) ─► Event if subscribed, then Commit { Lsn(stream seq) } ─► runner inbox (bounded)
//!        runner: batches, checkpoint in the operator's transaction, retries, halt, dead letters
//!          ─► Board::advance(stream seq) ─► acknowledge the newest message done through it
//!   ─► the session ends on shutdown, halt, a missed delivery, a lost lock or a pull error:
//!      the runner finishes what it was given, what it finished is acknowledged, the rest is
//!      delivered again by the next session's consumer
//! ```
//!
//! # Progress
//!
//! The runner reports progress at its `Commit` markers (`Board::advance`), as in the
//! service; here a marker follows every message, and carries the message's stream sequence
//! (in the board's `Lsn`: the board only compares them). So "done through marker S" means
//! every message up to stream sequence S is handled, set aside, or not the operator's, and
//! its effects are committed with the checkpoint: only then is message S acknowledged
//! (acknowledging all before it). A message the operator does not subscribe to, or one its
//! checkpoint covers (the runner skips it), is acknowledged the same way, in order.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull::Batch};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::WorkerError;
use super::consumer;
use super::held::{Arrival, Held};
use super::lock::{self, OperatorLock};
use super::message::{self, Unreadable};
use super::metrics::OperatorMetrics;
use super::progress::Progress;
use super::share::{self, Share};
use backfill::FirstRun;

mod backfill;
use crate::backoff::Backoff;
use crate::config::{NatsConfig, WorkerConfig};
use crate::event::EventType;
use crate::jetstream::JetStreamError;
use crate::lsn::{Lsn, Position};
use crate::operator::{Board, Input, OperatorSpec, Runner, RunnerExit, Subscription};
use crate::status::{self, OperatorRunState};

/// The waits between attempts while JetStream or the database does not answer.
const RETRY: Backoff = Backoff::new(Duration::from_millis(200), 2.0, Duration::from_secs(5));

/// How often a worker says again that NATS is unreachable.
const OUTAGE_REMINDER: Duration = Duration::from_secs(30);

/// How often what the operator is done with goes to `streamex.worker_progress`.
const FLUSH: Duration = Duration::from_millis(100);

/// How long a partition waits before trying again while a partition of another count of the
/// operator runs.
const OTHER_COUNT_WAIT: Duration = Duration::from_secs(2);

/// One operator of a worker, and what it needs.
pub(super) struct OperatorTask {
    pub spec: OperatorSpec,
    pub pool: PgPool,
    /// For a backfill's temporary replication slot.
    pub params: Arc<crate::replication::ConnectParams>,
    /// How many connections read a Rust operator's tables at once during its backfill.
    pub backfill_readers: usize,
    pub slot: Arc<str>,
    pub nats: NatsConfig,
    pub worker: WorkerConfig,
    /// The lease of the operator's worker lock (`[lock] lease`).
    pub lease: Duration,
    pub context: jetstream::Context,
    /// The operator's durable consumer.
    pub consumer: String,
    /// The subject it filters on.
    pub filter: String,
    pub batch_size: usize,
    pub default_schema: String,
    pub progress: Progress,
    /// Its figures on the worker's `/metrics`.
    pub metrics: OperatorMetrics,
    /// When this task runs one partition of an operator (`share.rs`).
    pub partition: Option<Partition>,
    pub shutdown: CancellationToken,
}

/// The partition a task runs.
pub(super) struct Partition {
    pub index: u32,
    pub share: Arc<Share>,
    /// The operator's own name.
    pub whole: String,
    /// The names of every partition of the operator, this one's too.
    pub names: Vec<String>,
    /// The whole operator, which partition 0 backfills.
    pub operator: Arc<dyn crate::operator::DynOperator>,
}

/// An event that concerns the rows of more than one partition, held back by each of them
/// (`share.rs`): a truncate and an outbox message (every partition; partition 0 applies
/// them), an update that moves a row to another partition (the two partitions; the new key's
/// applies it). The applier goes on once the others are done with what comes before it; the
/// others, once the applier is done with it.
struct Barrier {
    /// The event's stream sequence.
    at: u64,
    /// The partitions whose progress this one waits for.
    waits_on: Vec<String>,
    /// Through which stream sequence they must be done: for the applier, the message before
    /// the event in the operator's subjects (which it must be done with too); for the
    /// others, the event's own.
    through: u64,
    /// Whether this partition applies the event.
    applies: bool,
    /// What goes to the runner once the barrier is passed: the event (the applier only) and
    /// its marker, then what came after it meanwhile.
    inputs: VecDeque<Input>,
}

/// How a session ended.
enum Outcome {
    Shutdown,
    /// The operator halted: wait for `streamex resume`, then start again after
    /// `acked_through`.
    Halted {
        acked_through: u64,
    },
    /// Start again with a new consumer after `acked_through`.
    Again {
        acked_through: u64,
        lock_lost: bool,
    },
    /// A folded window failed: start again after `acked_through`, handling events through
    /// `through` without folding.
    Replay {
        through: Position,
        acked_through: u64,
    },
    /// The database lost commits of the operator (see `RunnerExit::Rewound`): start again
    /// after the last message at or before its stored checkpoint, at most `acked_through`.
    Rewound {
        acked_through: u64,
    },
}

/// Why a session stops taking messages.
enum Ending {
    Shutdown,
    /// A delivery went missing, or a pull failed in a way that a new consumer mends.
    Again,
    LockLost,
    /// This worker holds more than its share of the operator's partitions: this one goes to
    /// another worker.
    HandOver,
    Unreadable(Unreadable),
}

type Pull<'a> = Pin<Box<dyn Future<Output = Result<Batch, String>> + Send + 'a>>;

impl OperatorTask {
    fn name(&self) -> &str {
        self.spec.operator.name()
    }

    /// Runs the operator until shutdown; an error only for what waiting cannot mend (the
    /// stream is gone, the database refuses the worker for good).
    pub(super) async fn run(self) -> Result<(), WorkerError> {
        let mut lock: Option<OperatorLock> = None;
        // Where the consumer is acknowledged through; unknown until its ack floor is read.
        let mut acked: Option<u64> = None;
        let mut unfolded: Option<Position> = None;
        // The operator halted because the stream no longer holds messages it had not
        // handled; a resume of that halt accepts their loss.
        let mut halted_on_removed = false;
        let mut accept_removed = false;
        // What the operator's earlier count of partitions did (`share::Inherited`).
        let mut inherited: Option<Arc<share::Inherited>> = None;
        // Whether this lock's first run was looked at (`backfill.rs`), and how many times its
        // backfill failed.
        let mut first_run_seen = false;
        let mut backfill_failures = 0;
        let result = loop {
            if self.shutdown.is_cancelled() {
                break Ok(());
            }
            if lock.is_none() {
                let may_take = || self.partition.as_ref().is_none_or(|p| p.share.may_take());
                let also = lock::Also {
                    shared: self
                        .partition
                        .iter()
                        .flat_map(|p| {
                            [
                                lock::whole_key(&self.slot, &p.whole),
                                share::count_key(&self.slot, &p.whole, p.share.partitions),
                            ]
                        })
                        .collect(),
                    may_take: self.partition.as_ref().map(|_| &may_take as _),
                    shared_only: false,
                };
                match OperatorLock::acquire(
                    &self.pool,
                    &self.slot,
                    self.name(),
                    &also,
                    self.lease,
                    &self.shutdown,
                )
                .await
                {
                    Ok(Some(taken)) => {
                        self.metrics.lock_held.set(1);
                        if let Some(partition) = &self.partition {
                            partition.share.taken(partition.index);
                        }
                        match self.prepare_generation().await? {
                            Some(Ok(prepared)) => inherited = prepared.map(Arc::new),
                            Some(Err(other_count)) => {
                                warn!(operator = self.name(), "{other_count}");
                                self.let_go(taken).await;
                                tokio::select! {
                                    () = tokio::time::sleep(OTHER_COUNT_WAIT) => continue,
                                    () = self.shutdown.cancelled() => break Ok(()),
                                }
                            }
                            None => {
                                taken.release().await;
                                break Ok(());
                            }
                        }
                        lock = Some(taken);
                        first_run_seen = false;
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => {
                        break Err(WorkerError::Failed(
                            anyhow::Error::new(e).context("taking the operator's worker lock"),
                        ));
                    }
                }
                // Another worker may have moved the consumer meanwhile.
                acked = None;
                let registered = self
                    .database("registering the operator's process status", || async {
                        self.progress
                            .register()
                            .await
                            .map_err(status::StatusError::sql("registering process status"))
                    })
                    .await?;
                if registered.is_none() {
                    break Ok(());
                }
            }
            // A lock lost between sessions (a lease that ran out while the worker was frozen):
            // making a consumer now would take the operator's deliveries from the worker that
            // holds it.
            if lock.as_ref().is_some_and(|held| !held.held()) {
                if let Some(lost) = lock.take() {
                    self.let_go(lost).await;
                }
                continue;
            }
            let Some(state) = self.state().await? else {
                break Ok(());
            };
            if state.halted {
                match self.until_resumed().await? {
                    true => {
                        accept_removed = std::mem::take(&mut halted_on_removed);
                        continue;
                    }
                    false => break Ok(()),
                }
            }
            if self.spec.backfill
                && !first_run_seen
                && state.checkpoint.is_none()
                && inherited.is_none()
            {
                match self.first_run(&mut backfill_failures).await? {
                    FirstRun::Started => {
                        first_run_seen = true;
                        match self.prepare_generation().await? {
                            Some(Ok(prepared)) => inherited = prepared.map(Arc::new),
                            // Another count of partitions started meanwhile: take the lock
                            // again, which waits for it.
                            Some(Err(other_count)) => {
                                warn!(operator = self.name(), "{other_count}");
                                if let Some(held) = lock.take() {
                                    self.let_go(held).await;
                                }
                            }
                            None => break Ok(()),
                        }
                    }
                    FirstRun::Again => {}
                    FirstRun::Shutdown => break Ok(()),
                }
                continue;
            }
            let Some(start) = self
                .position(acked, state.checkpoint, &mut accept_removed)
                .await?
            else {
                break Ok(());
            };
            let (consumer, acked_through) = match start {
                Start::Consumer(consumer, acked_through) => (consumer, acked_through),
                // Halted on messages the stream no longer holds.
                Start::Halted => {
                    halted_on_removed = true;
                    continue;
                }
            };
            let Some(held_lock) = lock.as_mut() else {
                continue;
            };
            let outcome = self
                .session(
                    *consumer,
                    acked_through,
                    &state,
                    unfolded,
                    held_lock,
                    inherited.clone(),
                )
                .await;
            match outcome {
                Outcome::Shutdown => break Ok(()),
                Outcome::Halted { acked_through } => acked = Some(acked_through),
                Outcome::Again {
                    acked_through,
                    lock_lost,
                } => {
                    acked = Some(acked_through);
                    if lock_lost {
                        if let Some(lost) = lock.take() {
                            self.let_go(lost).await;
                        }
                    }
                }
                Outcome::Replay {
                    through,
                    acked_through,
                } => {
                    acked = Some(acked_through);
                    unfolded = Some(through);
                }
                Outcome::Rewound { acked_through } => {
                    acked = self.rewind(acked_through).await?;
                    if acked.is_none() {
                        break Ok(());
                    }
                }
            }
        };
        if let Some(lock) = lock {
            self.let_go(lock).await;
        }
        result
    }

    /// Readies the operator's count of partitions ([`share::prepare_generation`]), retrying
    /// while the database does not answer: `Some(Ok(..))` with what the earlier count did,
    /// if it is still needed; `Some(Err(..))` while a partition of another count runs (wait,
    /// then try again); `None` on shutdown. An error when the operator has checkpoints of
    /// several earlier counts.
    async fn prepare_generation(
        &self,
    ) -> Result<Option<Result<Option<share::Inherited>, share::GenerationError>>, WorkerError> {
        let (whole, partitions) = self.generation();
        let prepared = self
            .database("readying the operator's partitions", || async {
                match share::prepare_generation(&self.pool, &self.slot, whole, partitions, None)
                    .await
                {
                    Ok(inherited) => Ok(Ok(inherited)),
                    Err(share::GenerationError::Sql(e)) => Err(status::StatusError::sql(
                        "reading the operator's checkpoints",
                    )(e)),
                    Err(other) => Ok(Err(other)),
                }
            })
            .await?;
        match prepared {
            None => Ok(None),
            Some(Ok(inherited)) => {
                if let Some(i) = &inherited {
                    info!(
                        operator = self.name(), earlier = i.partitions(), through = %i.through,
                        "the operator ran in another count of partitions before: events that \
                         count had applied are passed over, until this one is past its last"
                    );
                }
                Ok(Some(Ok(inherited)))
            }
            Some(Err(other @ share::GenerationError::OtherCount { .. })) => Ok(Some(Err(other))),
            Some(Err(definite)) => Err(WorkerError::Failed(anyhow::Error::new(definite))),
        }
    }

    /// The operator's own name and the count of partitions it runs in (1: whole).
    fn generation(&self) -> (&str, u32) {
        match &self.partition {
            Some(p) => (p.whole.as_str(), p.share.partitions),
            None => (self.name(), 1),
        }
    }

    /// Once the consumer is acknowledged past the earlier count's last checkpoint, moves this
    /// one's checkpoint there and removes the earlier count's when every partition is
    /// ([`share::retire`]). A failure is tried again at the next flush.
    async fn retire(&self, inheritance: &mut Option<Inheritance>, acked_through: u64) {
        let Some(i) = inheritance.as_mut() else {
            return;
        };
        if i.retired || i.caught_up_at.is_none_or(|at| acked_through < at) {
            return;
        }
        let (whole, partitions) = self.generation();
        match share::retire(
            &self.pool,
            &self.slot,
            whole,
            self.name(),
            partitions,
            &i.inherited,
        )
        .await
        {
            Ok(earlier) => {
                i.retired = true;
                // Their consumers would keep the messages' state in JetStream for nothing.
                for name in earlier.unwrap_or_default() {
                    let base = consumer::consumer_name(&self.slot, &name);
                    let stream_name = self.nats.stream.as_str();
                    let removed = async {
                        let opened = consumer::open_stream(&self.context, stream_name).await?;
                        consumer::remove(&opened.stream, stream_name, &base).await
                    };
                    if let Err(e) = removed.await {
                        debug!(operator = self.name(), consumer = %base, error = %e, "removing an earlier partition's consumer failed; `nats consumer rm` does it");
                    }
                }
            }
            Err(e) => {
                debug!(operator = self.name(), error = %e, "moving the checkpoint past the earlier partitions' failed; trying again")
            }
        }
    }

    /// Releases the operator's lock (this worker no longer runs it, or this partition).
    async fn let_go(&self, lock: OperatorLock) {
        lock.release().await;
        self.metrics.lock_held.set(0);
        if let Some(partition) = &self.partition {
            partition.share.released(partition.index);
        }
    }

    /// Where to start again after the database lost commits of the operator: after the last
    /// message at or before its stored checkpoint (JetStream acknowledged the ones after it,
    /// but their effects are gone), at most `acked_through`. `None` on shutdown.
    async fn rewind(&self, acked_through: u64) -> Result<Option<u64>, WorkerError> {
        let Some(state) = self.state().await? else {
            return Ok(None);
        };
        let Some(after) = self
            .find_checkpoint(state.checkpoint, acked_through)
            .await?
        else {
            return Ok(None);
        };
        warn!(
            operator = self.name(), stream = %self.nats.stream, from = after + 1, acked_through,
            "the database lost commits of the operator: its messages after the stored checkpoint \
             come again"
        );
        Ok(Some(after))
    }

    /// `acked_through`, or the last message at or before `checkpoint` when that is earlier:
    /// for an operator that delivers exactly once, the stored checkpoint says what is done,
    /// and the consumer's acknowledgements may be ahead of it when the database lost commits
    /// while the worker was away (a failover, a restore from a backup). Starting after the
    /// acknowledgements would leave the changes in between out for good; starting after the
    /// checkpoint hands them to the operator again (and messages it does not handle pass
    /// again, doing nothing). `None` on shutdown.
    async fn not_ahead_of(
        &self,
        checkpoint: Option<Position>,
        acked_through: u64,
    ) -> Result<Option<u64>, WorkerError> {
        // Without a checkpoint nothing says what was done (an operator that has passed
        // messages but handled none yet): the acknowledgements stand.
        if self.spec.operator.0.delivery() != crate::operator::Delivery::ExactlyOnce
            || acked_through == 0
            || checkpoint.is_none()
        {
            return Ok(Some(acked_through));
        }
        let Some(after) = self.find_checkpoint(checkpoint, acked_through).await? else {
            return Ok(None);
        };
        if after < acked_through {
            warn!(
                operator = self.name(), stream = %self.nats.stream, from = after + 1, acked_through,
                checkpoint = %checkpoint.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                "the operator's stored checkpoint is behind its consumer's acknowledgements (the \
                 database lost commits while the worker was away: a failover, or a restore from \
                 a backup): the messages after the checkpoint come again"
            );
        }
        Ok(Some(after.min(acked_through)))
    }

    /// The stream sequence of the last message at or before `checkpoint`, searched among
    /// the stream's messages up to `acked_through`, retrying while JetStream does not answer.
    /// `None` on shutdown.
    async fn find_checkpoint(
        &self,
        checkpoint: Option<Position>,
        acked_through: u64,
    ) -> Result<Option<u64>, WorkerError> {
        let stream_name = self.nats.stream.as_str();
        let search = || async move {
            let opened = consumer::open_stream(&self.context, stream_name).await?;
            consumer::last_at_or_before(
                &opened.stream,
                stream_name,
                (opened.first, acked_through),
                checkpoint,
            )
            .await
        };
        self.jetstream(
            "finding the operator's stored checkpoint in the stream",
            search,
        )
        .await
    }

    /// The operator's stored state, retrying while the database does not answer. `None` on
    /// shutdown.
    async fn state(&self) -> Result<Option<State>, WorkerError> {
        let name = self.name().to_owned();
        self.database("reading the operator's checkpoint and state", || async {
            let states = status::load_operator_states(&self.pool, &self.slot).await?;
            let checkpoint = status::load_checkpoint(&self.pool, &self.slot, &name).await?;
            let state = states.get(&name);
            Ok(State {
                halted: state.is_some_and(|s| s.state == OperatorRunState::Halted),
                skip: state.and_then(|s| s.skip),
                checkpoint,
            })
        })
        .await
    }

    /// Waits while the operator is halted: true once `streamex resume` set it running,
    /// false on shutdown.
    async fn until_resumed(&self) -> Result<bool, WorkerError> {
        warn!(
            operator = self.name(),
            slot = %self.slot,
            "operator is halted; run `streamex resume {}` to restart it (`streamex status` \
             shows its last error)",
            self.name()
        );
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lock::POLL) => {}
                _ = self.shutdown.cancelled() => return Ok(false),
            }
            let Some(state) = self.state().await? else {
                return Ok(false);
            };
            if !state.halted {
                info!(
                    operator = self.name(),
                    "operator resumed; starting it again"
                );
                return Ok(true);
            }
        }
    }

    /// Makes the consumer anew after what it has acknowledged (`acked`, or its ack floor when
    /// unknown). Halts the operator, instead, when the stream no longer holds messages
    /// after that which the operator has not handled (removed by `max_age`, `max_bytes` or
    /// by hand), unless a resume accepted that. `None` on shutdown.
    async fn position(
        &self,
        acked: Option<u64>,
        checkpoint: Option<Position>,
        accept_removed: &mut bool,
    ) -> Result<Option<Start>, WorkerError> {
        let stream_name = self.nats.stream.as_str();
        let accept = *accept_removed;
        let acked_through = match acked {
            Some(acked) => acked,
            None => {
                let read = || async move {
                    let opened = consumer::open_stream(&self.context, stream_name).await?;
                    let floor =
                        consumer::ack_floor(&opened.stream, stream_name, &self.consumer).await?;
                    Ok((floor, opened.created))
                };
                let Some((floor, created)) = self
                    .jetstream("reading the operator's consumer", read)
                    .await?
                else {
                    return Ok(None);
                };
                // The consumer may be gone (the worker was killed while it made it anew, the
                // server lost it): the copy in the database says where it was.
                let stored = self
                    .database("reading where the operator's consumer was", || async {
                        self.progress.stored_acked(&created).await.map_err(
                            status::StatusError::sql("reading streamex.worker_consumers"),
                        )
                    })
                    .await?;
                let Some(stored) = stored else {
                    return Ok(None);
                };
                let acked_through = floor.unwrap_or(0).max(stored.unwrap_or(0));
                match self.not_ahead_of(checkpoint, acked_through).await? {
                    Some(acked_through) => acked_through,
                    None => return Ok(None),
                }
            }
        };
        let attempt = || async move {
            let consumer::Opened {
                stream,
                first,
                created,
            } = consumer::open_stream(&self.context, stream_name).await?;
            self.progress.stream_created(&created);
            let start = acked_through + 1;
            if first > start && !accept {
                let new = acked.is_none() && acked_through == 0 && checkpoint.is_none();
                let first_position = consumer::position_at(&stream, stream_name, first).await?;
                let covered = checkpoint
                    .zip(first_position)
                    .is_some_and(|(done, first)| first <= done);
                if new {
                    info!(
                        operator = self.name(), stream = %stream_name, first,
                        "the operator has no checkpoint: it starts from the first message the \
                         stream holds"
                    );
                } else if !covered {
                    return Ok(Err((start, first)));
                }
            }
            // A table's subject alone misses what was published to its partitions (the
            // stream had partitions before `nats.partitions` went back to 1).
            let every = consumer::every_subject(&self.nats.subject_prefix);
            let messages = format!("{}.messages.", self.nats.subject_prefix);
            let filter = if self.filter != every
                && !self.filter.starts_with(&messages)
                && consumer::partitions_after(&stream, stream_name, &self.filter, start).await?
            {
                info!(
                    operator = self.name(), stream = %stream_name, subject = %self.filter,
                    "the stream holds partitioned messages of the operator's table after where it \
                     starts: this session's consumer takes every subject"
                );
                &every
            } else {
                &self.filter
            };
            let config = consumer::consumer_config(
                &consumer::session_name(&self.consumer),
                format!(
                    "streamex worker: operator {} of slot {}",
                    self.name(),
                    self.slot
                ),
                filter,
                start,
                &self.worker,
            );
            let created = consumer::recreate(&stream, stream_name, &self.consumer, config).await?;
            Ok(Ok((created, acked_through)))
        };
        let Some(outcome) = self
            .jetstream("making the operator's consumer", attempt)
            .await?
        else {
            return Ok(None);
        };
        match outcome {
            Ok((created, acked_through)) => {
                *accept_removed = false;
                self.metrics.sessions.inc();
                self.metrics.acked.set(acked_through);
                debug!(
                    operator = self.name(), consumer = %created.cached_info().name, from = acked_through + 1,
                    "consumer made; delivering"
                );
                Ok(Some(Start::Consumer(Box::new(created), acked_through)))
            }
            Err((start, first)) => {
                let message = format!(
                    "JetStream stream {:?} no longer holds its messages {start} to {} \
                     (removed by nats.max_age or nats.max_bytes, or by hand), which this \
                     operator had not handled: their events are lost to it. Rebuild what it \
                     derives, then `streamex resume {}` to go on from sequence {first}",
                    self.nats.stream,
                    first - 1,
                    self.name()
                );
                error!(operator = self.name(), error = %message, "operator halted");
                self.store_halt(&message).await?;
                Ok(Some(Start::Halted))
            }
        }
    }

    /// Stores the operator's halt (so that `streamex status` shows it and `streamex resume`
    /// ends it), retrying while the database does not answer.
    async fn store_halt(&self, message: &str) -> Result<(), WorkerError> {
        let name = self.name().to_owned();
        self.database("storing the operator's halt", || async {
            status::set_operator_halted(&self.pool, &self.slot, &name, message, Lsn::ZERO, 0, 1)
                .await
        })
        .await
        .map(|_| ())
    }

    /// One session: a runner fed from `consumer`, until it ends (see the module
    /// documentation).
    async fn session(
        &self,
        consumer: PullConsumer,
        acked_through: u64,
        state: &State,
        unfolded: Option<Position>,
        lock: &mut OperatorLock,
        inherited: Option<Arc<share::Inherited>>,
    ) -> Outcome {
        let name = self.name();
        let session = consumer.cached_info().name.clone();
        let board = Arc::new(Board::new(vec![name.to_owned()], Lsn(acked_through)));
        // Room for a whole batch of events with their markers.
        let capacity = self.batch_size.saturating_mul(2).saturating_add(2);
        let (tx, rx) = mpsc::channel::<Input>(capacity);
        let runner = Runner {
            index: 0,
            operator: self.spec.operator.0.clone(),
            pool: self.pool.clone(),
            slot: self.slot.clone(),
            retry: self.spec.retry,
            batch_size: if self.spec.one_per_transaction {
                1
            } else {
                self.batch_size
            },
            one_per_transaction: self.spec.one_per_transaction,
            checkpoint: state.checkpoint,
            skip: state.skip,
            board: board.clone(),
            shutdown: self.shutdown.clone(),
            // No replication stream here: commit times are compared with this machine's clock.
            clock: Arc::default(),
            unfolded_through: unfolded,
            received: None,
            reported: None,
        };
        let mut runner = tokio::spawn(runner.run(rx));
        let mut inbox = Some(tx);
        let mut held: Held<jetstream::Message> = Held::new(acked_through);
        let mut outbox: VecDeque<Input> = VecDeque::new();
        // Truncates of a partitioned operator held back, each with what came after it.
        let mut barriers: VecDeque<Barrier> = VecDeque::new();
        let mut inheritance = inherited.map(|inherited| Inheritance {
            inherited,
            caught_up_at: None,
            retired: false,
        });
        let mut barrier_check = tokio::time::interval(Duration::from_millis(200));
        barrier_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Option<Batch> = None;
        let mut pull: Option<Pull<'_>> = None;
        let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut pull_failures = 0u32;
        let mut backoff = RETRY;
        let mut ending: Option<Ending> = None;
        let mut lock_check = tokio::time::interval(lock::POLL);
        lock_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when the NATS connection is down, and when that was last said.
        let mut disconnected: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        let mut flush = tokio::time::interval(FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let subscriptions = self.spec.operator.subscriptions();
        loop {
            if let Some(message) = held.done_through(board.done(0).0) {
                self.acknowledge(&message).await;
                self.progress.acked(held.acked_through());
                self.metrics.acked.set(held.acked_through());
            }
            if ending.is_some() && outbox.is_empty() {
                // The runner finishes what it holds, then ends (Drained).
                inbox = None;
            }
            // A pull asks for no more than the outbox has room for (an event and a marker
            // each), so that its messages are always read as they come: a pull request's
            // messages left unread past its expiry would be dropped by the client (and come
            // again only after `ack_wait`, out of order).
            let want = self
                .worker
                .max_ack_pending
                .saturating_sub(held.len())
                .min(self.batch_size.max(1))
                .min(capacity.saturating_sub(outbox.len()) / 2);
            if ending.is_none()
                && batch.is_none()
                && pull.is_none()
                && pause.is_none()
                && barriers.is_empty()
                && want > 0
            {
                pull = Some(Box::pin(self.pull(&consumer, want)));
            }
            tokio::select! {
                biased;
                exit = &mut runner => {
                    if let Some(message) = held.done_through(board.done(0).0) {
                        self.acknowledge(&message).await;
                    }
                    let acked_through = held.acked_through();
                    self.progress.acked(acked_through);
                    self.metrics.acked.set(acked_through);
                    self.progress.forget_unacked();
                    self.progress.flush().await;
                    debug!(
                        operator = name, acked_through, left_unacknowledged = held.len(),
                        "session ended"
                    );
                    let exit = match exit {
                        Ok(exit) => exit,
                        Err(e) => {
                            error!(operator = name, error = %e, "the operator's task failed; starting it again");
                            return Outcome::Again { acked_through, lock_lost: false };
                        }
                    };
                    return match exit {
                        RunnerExit::Drained => match ending {
                            None | Some(Ending::Shutdown) => Outcome::Shutdown,
                            Some(Ending::Again) => Outcome::Again { acked_through, lock_lost: false },
                            Some(Ending::LockLost | Ending::HandOver) => Outcome::Again { acked_through, lock_lost: true },
                            Some(Ending::Unreadable(unreadable)) => {
                                let message = unreadable.to_string();
                                error!(operator = name, error = %message, "operator halted");
                                match self.store_halt(&message).await {
                                    Ok(()) => Outcome::Halted { acked_through },
                                    Err(_) => Outcome::Shutdown,
                                }
                            }
                        },
                        // A worker's partitions wait at barriers of their own, never at gates.
                        RunnerExit::Interrupted | RunnerExit::Blocked => Outcome::Shutdown,
                        RunnerExit::Halted => Outcome::Halted { acked_through },
                        RunnerExit::Replay(through) => Outcome::Replay { through, acked_through },
                        RunnerExit::Rewound => Outcome::Rewound { acked_through },
                    };
                }
                _ = self.shutdown.cancelled(), if ending.is_none() => {
                    ending = Some(Ending::Shutdown);
                    // Not yet given to the runner: delivered again after a restart.
                    outbox.clear();
                    batch = None;
                    pull = None;
                }
                _ = board.changed() => {}
                permit = reserve(inbox.as_ref()), if inbox.is_some() && !outbox.is_empty() => {
                    if let (Ok(permit), Some(input)) = (permit, outbox.pop_front()) {
                        permit.send(input);
                    }
                }
                next = next_message(batch.as_mut()), if batch.is_some() && ending.is_none() => {
                    match next {
                        None => batch = None,
                        Some(Err(e)) => {
                            warn!(
                                operator = name, stream = %self.nats.stream, consumer = %session,
                                error = %e,
                                "pulling from JetStream failed; starting the consumer again after \
                                 what the operator is done with"
                            );
                            batch = None;
                            ending = Some(Ending::Again);
                        }
                        Some(Ok(message)) => {
                            if let Some(end) = self
                                .arrive(message, &mut held, &mut outbox, &mut barriers, &subscriptions, &mut inheritance)
                                .await
                            {
                                batch = None;
                                ending = Some(end);
                            }
                        }
                    }
                }
                opened = async { pull.as_mut().expect("guarded").await }, if pull.is_some() => {
                    pull = None;
                    match opened {
                        Ok(opened) => {
                            if pull_failures > 0 {
                                info!(operator = name, stream = %self.nats.stream, "JetStream answers again; going on");
                            }
                            pull_failures = 0;
                            backoff.reset();
                            batch = Some(opened);
                        }
                        Err(e) => {
                            pull_failures += 1;
                            let wait = backoff.next().unwrap_or(backoff.max);
                            warn!(
                                operator = name, url = %self.nats.url, stream = %self.nats.stream,
                                consumer = %session, error = %e, attempt = pull_failures,
                                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                                "JetStream does not answer (nats.url): the operator waits, and \
                                 goes on by itself once it does"
                            );
                            pause = Some(Box::pin(tokio::time::sleep(wait)));
                        }
                    }
                }
                _ = async { pause.as_mut().expect("guarded").await }, if pause.is_some() => {
                    pause = None;
                }
                _ = lock_check.tick(), if ending.is_none() => {
                    if self.watch_connection(&mut disconnected) {
                        // The server may have lost the pull request while the connection was
                        // down: ask again rather than wait for the client to give it up.
                        batch = None;
                    }
                    if self.partition.as_ref().is_some_and(|p| p.share.must_give(p.index)) {
                        info!(
                            operator = name,
                            "this worker holds more than its share of the operator's \
                             partitions: handing this one over after what is in flight"
                        );
                        batch = None;
                        pull = None;
                        ending = Some(Ending::HandOver);
                    } else if !lock.held() {
                        warn!(
                            operator = name, slot = %self.slot,
                            "lost the operator's worker lock (its session ended, or its lease ran out): \
                             stopping after what is in flight, then taking it again"
                        );
                        batch = None;
                        pull = None;
                        ending = Some(Ending::LockLost);
                    }
                }
                _ = flush.tick() => {
                    self.progress.flush().await;
                    self.retire(&mut inheritance, held.acked_through()).await;
                }
                _ = barrier_check.tick(), if !barriers.is_empty() && ending.is_none() => {
                    while let Some(front) = barriers.front() {
                        if !self.passed(front, board.done(0).0).await {
                            break;
                        }
                        if let Some(passed) = barriers.pop_front() {
                            debug!(operator = name, at = passed.at, "the partitions are through the event that concerns several of them; going on");
                            outbox.extend(passed.inputs);
                        }
                    }
                }
            }
        }
    }

    /// Whether this partition may go past `barrier`: the applier once it and the partitions
    /// it waits on are done through the message before the event, the others once the
    /// applier is done through the event. A failed read is a no.
    async fn passed(&self, barrier: &Barrier, done: u64) -> bool {
        let Some(created) = self.progress.created() else {
            return true;
        };
        if barrier.applies && done < barrier.through {
            return false;
        }
        let names = &barrier.waits_on;
        let through = barrier.through;
        match share::acked_of(&self.pool, &self.slot, names, &self.nats.stream, &created).await {
            Ok(acked) => acked.len() == names.len() && acked.iter().all(|a| *a >= through),
            Err(error) => {
                debug!(operator = self.name(), error = %error, "reading the other partitions' progress failed");
                false
            }
        }
    }

    /// Says when the NATS connection is lost (a pull then waits without a word until the
    /// client gives it up), every 30 s while it stays lost, and when it is back: then true.
    fn watch_connection(
        &self,
        disconnected: &mut Option<(tokio::time::Instant, tokio::time::Instant)>,
    ) -> bool {
        use async_nats::connection::State;
        let now = tokio::time::Instant::now();
        let connected = self.context.client().connection_state() == State::Connected;
        match (connected, disconnected.as_mut()) {
            (false, None) => {
                warn!(
                    operator = self.name(), url = %self.nats.url, stream = %self.nats.stream,
                    consumer = %self.consumer,
                    "lost the connection to NATS (nats.url): the operator finishes what it has \
                     and waits; the client reconnects by itself"
                );
                *disconnected = Some((now, now));
            }
            (false, Some((since, said))) if now.duration_since(*said) >= OUTAGE_REMINDER => {
                warn!(
                    operator = self.name(), url = %self.nats.url, stream = %self.nats.stream,
                    consumer = %self.consumer, down_for_s = now.duration_since(*since).as_secs(),
                    "NATS is still unreachable (nats.url); the operator waits"
                );
                *said = now;
            }
            (true, Some((since, _))) => {
                info!(
                    operator = self.name(), url = %self.nats.url,
                    down_for_ms = u64::try_from(now.duration_since(*since).as_millis()).unwrap_or(u64::MAX),
                    "connected to NATS again; going on"
                );
                *disconnected = None;
                return true;
            }
            _ => {}
        }
        false
    }

    /// Takes in one delivery; `Some` when the session must end on it.
    async fn arrive(
        &self,
        message: jetstream::Message,
        held: &mut Held<jetstream::Message>,
        outbox: &mut VecDeque<Input>,
        barriers: &mut VecDeque<Barrier>,
        subscriptions: &[Subscription],
        inheritance: &mut Option<Inheritance>,
    ) -> Option<Ending> {
        let before = held.highest().unwrap_or(held.acked_through());
        let (sequence, delivery) = match message.info() {
            Ok(info) => (info.stream_sequence, info.consumer_sequence),
            Err(e) => {
                // Not a JetStream delivery (no acknowledgement subject): nothing to do with it.
                warn!(operator = self.name(), error = %e, "a pulled message is no JetStream delivery; ignored");
                return None;
            }
        };
        match held.arrive(sequence, delivery) {
            Arrival::Again { done: true } => {
                self.acknowledge(&message).await;
                None
            }
            Arrival::Again { done: false } => None,
            Arrival::Missed { expected, got } => {
                warn!(
                    operator = self.name(), consumer = %self.consumer, expected, got,
                    "a JetStream delivery went missing (JetStream would send it again only \
                     after the ones that follow it): starting the consumer again after what \
                     the operator is done with, to keep WAL order"
                );
                Some(Ending::Again)
            }
            Arrival::New => {
                let event = message::event_of(
                    message.headers.as_ref(),
                    &message.payload,
                    message.subject.as_str(),
                    sequence,
                    &self.default_schema,
                );
                let Some(event) = event else {
                    return Some(Ending::Unreadable(Unreadable {
                        stream: self.nats.stream.clone(),
                        sequence,
                        subject: message.subject.to_string(),
                        operator: self.name().to_owned(),
                    }));
                };
                self.progress.passed(sequence, &event);
                let key = header(message.headers.as_ref(), crate::jetstream::KEY_HEADER);
                // Applied already by the partition of the operator's earlier count that had it.
                let inherited_done = inheritance.as_mut().is_some_and(|i| {
                    let position = event.position();
                    if i.caught_up_at.is_none() && position >= i.inherited.through {
                        i.caught_up_at = Some(sequence);
                    }
                    i.inherited.done(key, position)
                });
                let concerned = message::concerns(&event, subscriptions) && !inherited_done;
                let marker = Input::Commit {
                    end_lsn: Lsn(sequence),
                };
                let crossing = match &self.partition {
                    Some(partition) if concerned => {
                        crossing(partition, &event, message.headers.as_ref())
                    }
                    _ => None,
                };
                match crossing {
                    Some(Crossing { applies, waits_on }) => {
                        let mut inputs = VecDeque::new();
                        if applies {
                            self.metrics.delivered.inc();
                            inputs.push_back(Input::Event(Arc::new(event)));
                        }
                        inputs.push_back(marker);
                        barriers.push_back(Barrier {
                            at: sequence,
                            through: if applies { before } else { sequence },
                            waits_on,
                            applies,
                            inputs,
                        });
                    }
                    None => {
                        let target = match barriers.back_mut() {
                            Some(barrier) => &mut barrier.inputs,
                            None => outbox,
                        };
                        let mine = self.partition.as_ref().is_none_or(|p| {
                            share::partition_of(key, p.share.partitions) == p.index
                        });
                        if concerned && mine {
                            self.metrics.delivered.inc();
                            target.push_back(Input::Event(Arc::new(event)));
                        }
                        target.push_back(marker);
                    }
                }
                held.hold(sequence, message);
                None
            }
        }
    }

    /// A pull request for up to `want` messages, waiting at most `worker.pull_wait` for them.
    async fn pull(&self, consumer: &PullConsumer, want: usize) -> Result<Batch, String> {
        let request = consumer
            .batch()
            .max_messages(want)
            .expires(self.worker.pull_wait)
            .messages();
        match tokio::time::timeout(consumer::answer_timeout(&self.nats), request).await {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time (nats.timeout)".to_owned()),
        }
    }

    /// Acknowledges `message` and every one before it. A lost acknowledgement costs a
    /// message sent again, which its position tells apart.
    async fn acknowledge(&self, message: &jetstream::Message) {
        match tokio::time::timeout(consumer::answer_timeout(&self.nats), message.ack()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(operator = self.name(), error = %e, "acknowledgement not sent"),
            Err(_) => debug!(operator = self.name(), "acknowledgement not sent in time"),
        }
    }

    /// Runs `attempt` until it succeeds, waiting while the database does not answer. `None`
    /// on shutdown; an error when it fails for good.
    async fn database<T, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
    ) -> Result<Option<T>, WorkerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, status::StatusError>>,
    {
        let mut backoff = RETRY;
        loop {
            match attempt().await {
                Ok(value) => return Ok(Some(value)),
                Err(e) if e.is_transient() => {
                    let wait = backoff.next().unwrap_or(backoff.max);
                    warn!(
                        operator = self.name(), error = %e,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "{what} failed: the database does not answer (database_url); the \
                         operator waits, and goes on by itself once it does"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(e) => {
                    return Err(WorkerError::Failed(
                        anyhow::Error::new(e).context(format!("operator {}: {what}", self.name())),
                    ));
                }
            }
        }
    }

    /// Runs `attempt` until it succeeds, waiting while JetStream does not answer. `None` on
    /// shutdown; an error when it fails for good (the stream is gone).
    async fn jetstream<T, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
    ) -> Result<Option<T>, WorkerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, JetStreamError>>,
    {
        let mut backoff = RETRY;
        let mut failures = 0u32;
        loop {
            match attempt().await {
                Ok(value) => {
                    if failures > 0 {
                        info!(operator = self.name(), stream = %self.nats.stream, "JetStream answers again; going on");
                    }
                    return Ok(Some(value));
                }
                Err(e) if e.is_transient() => {
                    failures += 1;
                    let wait = backoff.next().unwrap_or(backoff.max);
                    warn!(
                        operator = self.name(), url = %self.nats.url, stream = %self.nats.stream,
                        consumer = %self.consumer, error = %e, attempt = failures,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "{what} failed: JetStream does not answer (nats.url); the operator \
                         waits, and goes on by itself once it does"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(e) => return Err(WorkerError::JetStream(e)),
            }
        }
    }
}

/// What a session starts from.
enum Start {
    Consumer(Box<PullConsumer>, u64),
    Halted,
}

/// The operator's stored state at the start of a session.
struct State {
    halted: bool,
    skip: Option<Position>,
    checkpoint: Option<Position>,
}

/// A place in the runner's inbox (`sender` is there: the caller checks).
/// A session's view of what the operator's earlier count of partitions did.
struct Inheritance {
    inherited: Arc<share::Inherited>,
    /// The stream sequence of the first message at or past the earlier count's last
    /// checkpoint: once it is acknowledged, nothing is inherited any more.
    caught_up_at: Option<u64>,
    /// This partition's checkpoint has been moved past the earlier count's.
    retired: bool,
}

/// How a partition takes an event that concerns the rows of more than one partition.
struct Crossing {
    /// This partition applies it.
    applies: bool,
    /// The partitions it waits on (see [`Barrier`]).
    waits_on: Vec<String>,
}

/// `Some` when `event`, which concerns the operator, crosses partitions and `partition` is
/// one of those it concerns: a truncate or an outbox message (every partition; partition 0
/// applies it), an update whose old key ([`crate::jetstream::OLD_KEY_HEADER`]) is in
/// another partition than its new one (the two; the new one's applies it).
fn crossing(
    partition: &Partition,
    event: &crate::event::Event,
    headers: Option<&async_nats::HeaderMap>,
) -> Option<Crossing> {
    let partitions = partition.share.partitions;
    let (applier, others): (u32, Vec<u32>) = match event.kind {
        EventType::Truncate | EventType::Message => (0, (1..partitions).collect()),
        EventType::Update => {
            let old = header(headers, crate::jetstream::OLD_KEY_HEADER)?;
            let new =
                share::partition_of(header(headers, crate::jetstream::KEY_HEADER), partitions);
            let old = share::partition_of(Some(old), partitions);
            if old == new {
                return None;
            }
            (new, vec![old])
        }
        _ => return None,
    };
    let index = partition.index;
    let named = |i: u32| partition.names.get(i as usize).cloned();
    if index == applier {
        let waits_on = others.into_iter().filter_map(named).collect();
        Some(Crossing {
            applies: true,
            waits_on,
        })
    } else if others.contains(&index) {
        Some(Crossing {
            applies: false,
            waits_on: named(applier).into_iter().collect(),
        })
    } else {
        // Not one of the partitions it concerns: a message like any other row's.
        None
    }
}

/// The value of header `name`, if there is one.
fn header<'a>(headers: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

async fn reserve(
    sender: Option<&mpsc::Sender<Input>>,
) -> Result<mpsc::Permit<'_, Input>, mpsc::error::SendError<()>> {
    match sender {
        Some(sender) => sender.reserve().await,
        None => std::future::pending().await,
    }
}

/// The next message of the open pull request (`batch` is there: the caller checks).
async fn next_message(
    batch: Option<&mut Batch>,
) -> Option<Result<jetstream::Message, async_nats::Error>> {
    match batch {
        Some(batch) => batch.next().await,
        None => std::future::pending().await,
    }
}
