//! The engine: runs the operators over the decoded stream. It starts a task per operator
//! (runner.rs), the dispatcher (dispatch.rs) and the coordinator (coordinator.rs), which share
//! the progress board (board.rs).
//!
//! ```text
//!  Decoded ──► dispatcher ──► inbox per operator (bounded: a full one makes the dispatcher wait)
//!                 │  └──────► pubsub (transient listeners; never waits)
//!                 └─ per commit: Pending { end_lsn, status items } ──► coordinator
//!  runners ──► Board (done through end_lsn, per operator) ──► coordinator:
//!     the commits every operator is done with ─► process status stored ─► EntityProcessed ─► ack
//! ```
//!
//! # Progress
//!
//! An operator is done through a commit once it has handled every input before that commit's
//! marker. The coordinator takes, in WAL order, the commits that every operator is done with,
//! stores the process status they cover, and only then acknowledges the last one's end. A
//! halted operator's position does not move, so neither does the slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::backfill::{self, Backfills, Outcome};
use super::board::{Board, Restart};
use super::inbox::{self, InboxSender};
use super::partition::{self, GenerationError, Inherited, PartitionOf};
use super::progress::Pending;
use super::runner::Runner;
use crate::config::RetryConfig;
use crate::decode::Decoded;
use crate::lsn::{Lsn, Position};
use crate::metrics::Metrics;
use crate::metrics::OperatorReport;
use crate::pubsub::PubSub;
use crate::replication::{Acknowledger, ConnectParams};
use crate::status::{self, OperatorRunState, ProcessStatusStorage};

/// An operator as the engine runs it.
pub struct OperatorSpec {
    pub operator: super::AnyOperator,
    pub retry: RetryConfig,
    pub one_per_transaction: bool,
    /// Whether its first run on the slot starts with a backfill (see `backfill.rs`).
    pub backfill: bool,
    /// How many partitions run its events side by side (1: it runs whole; see `partition.rs`).
    pub partitions: u32,
}

/// An operator's place among the engine's participants: one, or one per partition.
pub(super) struct Lane {
    /// The board index of its first participant; its partitions follow it.
    pub first: usize,
    pub partitions: u32,
    /// What the operator's earlier count of partitions did, while it matters (for a Rust
    /// operator: a declarative one's recomputation may run twice, so it takes no notice).
    pub inherited: Option<Inherited>,
}

impl Lane {
    /// Its participants' board indices.
    pub fn participants(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.partitions as usize
    }
}

/// Why the engine stopped without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum EngineExit {
    /// Shutdown was asked for; everything done is stored and acknowledged.
    Shutdown,
    /// The stream ended.
    StreamEnded,
    /// A halted operator was resumed (`streamex resume`): run again from the slot's position
    /// so that it gets the events it missed.
    Resumed(String),
    /// A folded window of this operator failed: run again from the slot's position, this
    /// operator handling its events through the position without folding.
    Replay(String, Position),
    /// The database holds an earlier checkpoint of this operator than it committed (it lost
    /// commits): run again from the slot's position and the stored checkpoints, so that the
    /// lost changes are applied again.
    Rewound(String),
    /// Operators backfilled (or their backfill failed and is to be tried again): run again
    /// from the slot's position, so that they get the changes after their snapshot.
    Backfilled(Vec<String>),
}

/// A failure of the engine itself (not of an operator, which the retry policy handles).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Status(#[from] status::StatusError),
    /// An operator's partitions cannot start (checkpoints of two earlier counts, or a worker
    /// running another count).
    #[error(transparent)]
    Partitions(#[from] GenerationError),
}

impl EngineError {
    /// Whether it comes from the database being unreachable or restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Status(e) => e.is_transient(),
            EngineError::Partitions(GenerationError::Sql(e)) => crate::error::is_transient_sqlx(e),
            EngineError::Partitions(_) => false,
        }
    }
}

/// Runs operators over a stream of decoded items.
pub struct Engine<S: ProcessStatusStorage> {
    pub pool: PgPool,
    /// The replication slot: the key, with the operator's name, of checkpoints, operator state
    /// and dead letters.
    pub slot: Arc<str>,
    pub status: S,
    pub pubsub: PubSub,
    pub operators: Vec<OperatorSpec>,
    /// Channels per entity (key columns come from the decoder; scopes from the config).
    pub scopes: HashMap<String, Vec<Vec<(String, String)>>>,
    /// The record field giving the process-status timestamp.
    pub timestamp_field: String,
    pub batch_size: usize,
    /// How many bytes of events may wait in each operator's inbox (see `inbox.rs`).
    pub backlog_bytes: usize,
    /// What `/metrics` reports; counted (cheaply) whether or not `[http]` is on.
    pub metrics: Arc<Metrics>,
    reports: Arc<Mutex<Option<Arc<Board>>>>,
    /// Per operator, the position through which its events are handled without folding on
    /// the next run (after its folded window failed).
    unfolded: Mutex<HashMap<String, Position>>,
    /// Where a backfill exports its snapshot (a replication connection); without it, no
    /// operator backfills.
    pub params: Option<ConnectParams>,
    /// The schema whose tables' entities are unqualified (for a backfill's events).
    pub default_schema: String,
    /// How many connections read a Rust operator's tables at once during its backfill.
    pub backfill_readers: usize,
    /// Per operator, how many backfills in a row have failed (the retry policy counts them).
    backfill_failures: Mutex<HashMap<String, u32>>,
    /// With `[nats]`: every event also goes to JetStream, and a commit is done only once
    /// JetStream has it (the publisher is the participant after the operators).
    pub publisher: Option<Arc<crate::jetstream::Publisher>>,
}

/// `replication.operator_backlog_bytes` unless configured: 16 MiB.
pub(crate) const DEFAULT_BACKLOG_BYTES: usize = 16 << 20;

impl<S: ProcessStatusStorage + Clone> Engine<S> {
    /// An operator's inbox: `backlog_bytes` of events, and room for at least a whole batch
    /// of inputs, so that `batch_size` is what a batch can reach.
    fn inbox(&self) -> (InboxSender, super::Inbox) {
        // The count only guards against events far smaller than estimated (none is under
        // the size of the struct).
        let count = (self.backlog_bytes / std::mem::size_of::<crate::event::Event>())
            .max(self.batch_size.saturating_mul(2).saturating_add(2))
            .max(1024);
        inbox::channel(self.backlog_bytes, count)
    }

    pub fn new(
        pool: PgPool,
        slot: &str,
        status: S,
        pubsub: PubSub,
        operators: Vec<OperatorSpec>,
    ) -> Self {
        Engine {
            pool,
            slot: slot.into(),
            status,
            pubsub,
            operators,
            scopes: HashMap::new(),
            timestamp_field: "updated_at".to_owned(),
            batch_size: 500,
            backlog_bytes: DEFAULT_BACKLOG_BYTES,
            metrics: Arc::default(),
            reports: Arc::default(),
            unfolded: Mutex::default(),
            params: None,
            default_schema: crate::event::DEFAULT_SCHEMA.to_owned(),
            backfill_readers: 2,
            backfill_failures: Mutex::default(),
            publisher: None,
        }
    }

    /// A handle that reports the operators' progress while the engine runs.
    pub fn reporter(&self) -> impl Fn() -> Vec<OperatorReport> + Send + Sync + 'static {
        let reports = self.reports.clone();
        move || {
            reports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|b| b.reports())
                .unwrap_or_default()
        }
    }

    /// Runs until `shutdown`, the end of `items`, or a resumed operator. `start` is where the
    /// slot was when streaming began (every operator is done through it).
    pub async fn run(
        &self,
        mut items: mpsc::Receiver<Decoded>,
        ack: Acknowledger,
        start: Lsn,
        shutdown: CancellationToken,
    ) -> Result<EngineExit, EngineError> {
        // Each operator's participants: itself, or its partitions, which take over from what
        // an earlier count of them did (checkpoints the slot has passed are gone for good).
        let mut lanes = Vec::with_capacity(self.operators.len());
        let mut names: Vec<String> = Vec::new();
        for spec in &self.operators {
            let whole = spec.operator.name();
            let partitions = spec.partitions.max(1);
            let inherited = partition::prepare_generation(
                &self.pool,
                &self.slot,
                whole,
                partitions,
                Some(start),
            )
            .await?;
            lanes.push(Lane {
                first: names.len(),
                partitions,
                inherited,
            });
            names.extend((0..partitions).map(|p| partition::generation_name(whole, p, partitions)));
        }
        let checkpoints = status::load_checkpoints(&self.pool, &self.slot).await?;
        let states = status::load_operator_states(&self.pool, &self.slot).await?;
        if let Some(publisher) = &self.publisher {
            names.push(publisher.report_name());
        }
        let board = Arc::new(Board::new(names.clone(), start));
        *self.reports.lock().unwrap_or_else(|p| p.into_inner()) = Some(board.clone());

        let tracker = TaskTracker::new();
        let mut inboxes: Vec<Option<InboxSender>> = Vec::new();
        let mut jobs: Vec<backfill::Job> = Vec::new();
        for (spec, lane) in self.operators.iter().zip(&lanes) {
            let whole = spec.operator.name();
            let request = states.get(whole).and_then(|s| s.backfill_request.clone());
            // Whole or in partitions, of this count or an earlier one.
            let started = lane.inherited.is_some()
                || checkpoints.contains_key(whole)
                || lane
                    .participants()
                    .any(|i| checkpoints.contains_key(&names[i]));
            let halted = lane.participants().any(|i| {
                states
                    .get(&names[i])
                    .is_some_and(|s| s.state == OperatorRunState::Halted)
            });
            if self.params.is_some()
                && !halted
                && ((request.is_some() && lane.partitions == 1) || (spec.backfill && !started))
            {
                // Its first run on the slot: it reads the existing rows first, whole, and gets
                // no inbox meanwhile (its done positions stay at `start`, holding the slot);
                // its partitions take over from the backfill's checkpoint.
                for index in lane.participants() {
                    board.backfill_started(index, 0);
                    inboxes.push(None);
                }
                jobs.push(backfill::Job {
                    index: lane.first,
                    operator: spec.operator.0.clone(),
                    retry: spec.retry,
                    checkpoint: checkpoints.get(whole).copied(),
                    request,
                });
                continue;
            }
            if request.is_some() && lane.partitions > 1 {
                warn!(
                    operator = whole,
                    partitions = lane.partitions,
                    "a backfill was asked for an operator that runs in partitions, which do not \
                     backfill: run it whole (leave partitions out) for its backfill, then give \
                     them again"
                );
            }
            for (p, index) in lane.participants().enumerate() {
                let name = names[index].as_str();
                if let Some(state) = states
                    .get(name)
                    .filter(|s| s.state == OperatorRunState::Halted)
                {
                    warn!(operator = name, error = %state.last_error.clone().unwrap_or_default(),
                          "operator is halted; run `streamex resume {}` to restart it", name);
                    board.halt(
                        index,
                        state.last_error.clone().unwrap_or_else(|| "halted".into()),
                    );
                    inboxes.push(None);
                    continue;
                }
                let operator: Arc<dyn super::DynOperator> = if lane.partitions == 1 {
                    spec.operator.0.clone()
                } else {
                    let p = u32::try_from(p).unwrap_or(0);
                    let inner: Arc<dyn super::DynOperator> = match spec.operator.0.as_sql() {
                        Some(sql) => Arc::new(sql.partition(p, lane.partitions)),
                        None => spec.operator.0.clone(),
                    };
                    Arc::new(PartitionOf {
                        inner,
                        name: name.to_owned(),
                    })
                };
                let (tx, rx) = self.inbox();
                board.set_backlog(index, tx.backlog());
                let runner = Runner {
                    index,
                    operator,
                    pool: self.pool.clone(),
                    slot: self.slot.clone(),
                    retry: spec.retry,
                    batch_size: if spec.one_per_transaction {
                        1
                    } else {
                        self.batch_size
                    },
                    one_per_transaction: spec.one_per_transaction,
                    checkpoint: checkpoints.get(name).copied(),
                    skip: states.get(name).and_then(|s| s.skip),
                    board: board.clone(),
                    shutdown: shutdown.clone(),
                    clock: self.metrics.stream.clone(),
                    unfolded_through: self
                        .unfolded
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(name)
                        .copied(),
                    received: None,
                    reported: None,
                };
                // A halted runner returns and drops its inbox; the dispatcher then skips it.
                tracker.spawn(runner.run(rx));
                inboxes.push(Some(tx));
            }
        }
        if let Some(publisher) = &self.publisher {
            let (tx, rx) = self.inbox();
            board.set_backlog(inboxes.len(), tx.backlog());
            tracker.spawn(publisher.clone().run(
                inboxes.len(),
                board.clone(),
                rx,
                shutdown.clone(),
            ));
            inboxes.push(Some(tx));
        }
        let retiring: Vec<(String, u32, crate::lsn::Position)> = self
            .operators
            .iter()
            .zip(&lanes)
            .flat_map(|(spec, lane)| {
                let name = spec.operator.name();
                lane.inherited
                    .iter()
                    .flat_map(|i| i.counts())
                    .map(move |(count, newest)| (name.to_owned(), count, newest))
            })
            .collect();
        // Ends with this run (or on shutdown).
        let retire = shutdown.child_token();
        let _retire_ends = retire.clone().drop_guard();
        if !retiring.is_empty() {
            tokio::spawn(partition::retire_when_settled(
                self.pool.clone(),
                self.slot.clone(),
                retiring,
                retire,
            ));
        }
        tracker.close();

        let (pending_tx, pending_rx) = mpsc::channel::<Pending>(1024);
        let runners_done = CancellationToken::new();
        let coordinator = self.coordinate(
            pending_rx,
            board.clone(),
            ack,
            runners_done.clone(),
            shutdown.clone(),
        );
        let (exit, coordinated) = tokio::join!(
            async {
                let exit = tokio::select! {
                    exit = self.dispatch(&mut items, &mut inboxes, &lanes, &board, pending_tx, &shutdown) => exit,
                    name = self.watch_resume(&board, &names, &shutdown) => EngineExit::Resumed(name),
                    names = self.backfill(&board, &jobs, &shutdown), if !jobs.is_empty() => {
                        EngineExit::Backfilled(names)
                    }
                    name = self.watch_backfill_requests(&board, &names, &shutdown) => {
                        info!(operator = %name, "a backfill was asked for (`streamex backfill` or `rebuild`); restarting the pipeline to run it");
                        EngineExit::Backfilled(vec![name])
                    }
                    (name, why) = board.replay_wanted() => match why {
                        Restart::Unfolded(through) => {
                            self.unfolded
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name.clone(), through);
                            EngineExit::Replay(name, through)
                        }
                        Restart::Rewound => EngineExit::Rewound(name),
                    },
                };
                // Closing the inboxes lets every runner finish what it holds and stop.
                inboxes.clear();
                tracker.wait().await;
                runners_done.cancel();
                exit
            },
            coordinator
        );
        coordinated?;
        Ok(exit)
    }
}

impl<S: ProcessStatusStorage + Clone> Engine<S> {
    /// Waits until a backfill is asked for an operator that is neither backfilling nor halted
    /// in this run; returns its name.
    async fn watch_backfill_requests(
        &self,
        board: &Board,
        names: &[String],
        shutdown: &CancellationToken,
    ) -> String {
        if self.params.is_none() {
            return std::future::pending().await;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return std::future::pending().await,
            }
            let Ok(states) = status::load_operator_states(&self.pool, &self.slot).await else {
                continue;
            };
            for (index, name) in names.iter().enumerate() {
                if board.is_backfilling(index) || board.is_halted(index) {
                    continue;
                }
                if states
                    .get(name)
                    .is_some_and(|s| s.backfill_request.is_some())
                {
                    return name.clone();
                }
            }
        }
    }

    /// Runs this run's backfills, then returns the operators whose backfill ended (done, or
    /// failed and to be tried again after a wait, or halted after the retry policy's last
    /// try): the engine then runs again from the slot's position.
    async fn backfill(
        &self,
        board: &Board,
        jobs: &[backfill::Job],
        shutdown: &CancellationToken,
    ) -> Vec<String> {
        let Some(params) = &self.params else {
            return std::future::pending().await;
        };
        let backfills = Backfills {
            pool: &self.pool,
            params,
            slot: &self.slot,
            default_schema: &self.default_schema,
            board,
            shutdown,
            readers: self.backfill_readers,
        };
        let names = jobs.iter().map(|j| j.operator.name().to_owned()).collect();
        let outcomes = match backfills.run(jobs).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                warn!(error = %crate::error::chain(&error), "backfill could not start; trying again");
                jobs.iter()
                    .map(|_| Outcome::Failed(anyhow::anyhow!("{error:#}")))
                    .collect()
            }
        };
        if shutdown.is_cancelled() {
            return std::future::pending().await;
        }
        let mut wait = std::time::Duration::ZERO;
        for (job, outcome) in jobs.iter().zip(outcomes) {
            let name = job.operator.name();
            let Outcome::Failed(failure) = outcome else {
                self.backfill_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                continue;
            };
            let message = crate::error::chain(&failure);
            let outage = super::runner::is_database_outage(&failure);
            let halt = failure.is::<backfill::Halt>();
            let failures = {
                let mut all = self
                    .backfill_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let n = all.entry(name.to_owned()).or_default();
                if !outage {
                    *n += 1;
                }
                *n
            };
            if halt || failures > job.retry.retries {
                error!(
                    operator = name, attempts = failures, error = %message,
                    "operator halted: its backfill failed every time (rolled back each time; \
                     `streamex resume {name}` tries it again)"
                );
                let stored = status::set_operator_halted(
                    &self.pool,
                    &self.slot,
                    name,
                    &message,
                    Lsn::ZERO,
                    0,
                    failures,
                )
                .await;
                if let Err(e) = stored {
                    error!(operator = name, error = %e, "could not store the halt; it is in this log only");
                }
                board.halt(job.index, message);
                self.backfill_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
            } else {
                let next = job.retry.delay(failures.max(1));
                wait = wait.max(next);
                warn!(
                    operator = name, attempt = failures, retries = job.retry.retries, error = %message,
                    retry_in_ms = u64::try_from(next.as_millis()).unwrap_or(u64::MAX),
                    "backfill failed and was rolled back; it starts again from a new snapshot"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => names,
            _ = shutdown.cancelled() => std::future::pending().await,
        }
    }
}
