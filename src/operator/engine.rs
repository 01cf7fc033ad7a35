//! The engine: dispatches decoded items to the operators and the pub/sub, gathers their
//! progress, stores process status and acknowledges.
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Operator;
use super::runner::{Input, Runner};
use crate::config::RetryConfig;
use crate::decode::Decoded;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::pubsub::{self, ChannelSpec, EntityProcessed, PubSub};
use crate::replication::{Acknowledger, Lsn};
use crate::status::{self, OperatorRunState, ProcessStatusStorage, StatusItem};

/// How many commits may wait for the operators before the oldest waiting ones are merged
/// (keeping memory flat while an operator is halted or far behind).
const MAX_PENDING: usize = 4096;

/// An operator as the engine runs it.
pub struct OperatorSpec {
    pub operator: Arc<dyn Operator>,
    pub retry: RetryConfig,
    pub one_per_transaction: bool,
}

/// An operator's state as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorStateKind {
    Running,
    Halted,
}

/// What the engine knows of one operator, for status and metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OperatorReport {
    pub name: String,
    pub state: OperatorStateKind,
    /// Every commit up to this end position is done.
    pub done_through: Lsn,
    pub events: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
}

/// Shared progress of the operators.
#[derive(Debug)]
pub(crate) struct Board {
    done: Vec<AtomicU64>,
    events: Vec<AtomicU64>,
    retries: Vec<AtomicU64>,
    dead: Vec<AtomicU64>,
    halted: Vec<Mutex<Option<String>>>,
    names: Vec<String>,
    changed: Notify,
}

impl Board {
    pub(super) fn new(names: Vec<String>, start: Lsn) -> Self {
        let n = names.len();
        let atomics = |v: u64| (0..n).map(|_| AtomicU64::new(v)).collect::<Vec<_>>();
        Board {
            done: atomics(start.0),
            events: atomics(0),
            retries: atomics(0),
            dead: atomics(0),
            halted: (0..n).map(|_| Mutex::new(None)).collect(),
            names,
            changed: Notify::new(),
        }
    }

    pub(crate) fn advance(&self, index: usize, end: Lsn) {
        self.done[index].fetch_max(end.0, Ordering::AcqRel);
        self.changed.notify_one();
    }

    pub(crate) fn count(&self, index: usize, n: usize) {
        self.events[index].fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn retried(&self, index: usize) {
        self.retries[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dead_lettered(&self, index: usize) {
        self.dead[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn halt(&self, index: usize, error: String) {
        *self.halted[index].lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        self.changed.notify_one();
    }

    fn is_halted(&self, index: usize) -> bool {
        self.halted[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The end of the last commit every operator is done with.
    fn done_through(&self) -> Lsn {
        Lsn(self
            .done
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX))
    }

    fn reports(&self) -> Vec<OperatorReport> {
        (0..self.names.len())
            .map(|i| {
                let error = self.halted[i]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                OperatorReport {
                    name: self.names[i].clone(),
                    state: if error.is_some() {
                        OperatorStateKind::Halted
                    } else {
                        OperatorStateKind::Running
                    },
                    done_through: Lsn(self.done[i].load(Ordering::Acquire)),
                    events: self.events[i].load(Ordering::Relaxed),
                    retries: self.retries[i].load(Ordering::Relaxed),
                    dead_letters: self.dead[i].load(Ordering::Relaxed),
                    last_error: error,
                }
            })
            .collect()
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
}

/// A failure of the engine itself (not of an operator, which the retry policy handles).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Status(#[from] status::StatusError),
}

/// One commit waiting for the operators.
#[derive(Debug)]
struct Pending {
    end_lsn: Lsn,
    /// Per entity: the newest process-status timestamp and the position of its last event.
    items: HashMap<Arc<str>, (i64, Lsn, u64)>,
}

impl Pending {
    fn merge(&mut self, newer: Pending) {
        self.end_lsn = self.end_lsn.max(newer.end_lsn);
        for (entity, (ts, lsn, ordinal)) in newer.items {
            let slot = self.items.entry(entity).or_insert((ts, lsn, ordinal));
            slot.0 = slot.0.max(ts);
            if (lsn, ordinal) > (slot.1, slot.2) {
                (slot.1, slot.2) = (lsn, ordinal);
            }
        }
    }
}

/// Runs operators over a stream of decoded items.
pub struct Engine<S: ProcessStatusStorage> {
    pub pool: PgPool,
    pub status: S,
    pub pubsub: PubSub,
    pub operators: Vec<OperatorSpec>,
    /// Channels per entity (key columns come from the decoder; scopes from the config).
    pub scopes: HashMap<String, Vec<Vec<(String, String)>>>,
    /// The record field giving the process-status timestamp.
    pub timestamp_field: String,
    pub batch_size: usize,
    /// Capacity of each operator's inbox.
    pub inbox_capacity: usize,
    /// What `/metrics` reports; counted (cheaply) whether or not `[http]` is on.
    pub metrics: Arc<Metrics>,
    reports: Arc<Mutex<Option<Arc<Board>>>>,
}

impl<S: ProcessStatusStorage + Clone> Engine<S> {
    pub fn new(pool: PgPool, status: S, pubsub: PubSub, operators: Vec<OperatorSpec>) -> Self {
        Engine {
            pool,
            status,
            pubsub,
            operators,
            scopes: HashMap::new(),
            timestamp_field: "updated_at".to_owned(),
            batch_size: 500,
            inbox_capacity: 1024,
            metrics: Arc::default(),
            reports: Arc::default(),
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
        let checkpoints = status::load_checkpoints(&self.pool).await?;
        let states = status::load_operator_states(&self.pool).await?;
        let names: Vec<String> = self
            .operators
            .iter()
            .map(|o| o.operator.name().to_owned())
            .collect();
        let board = Arc::new(Board::new(names.clone(), start));
        *self.reports.lock().unwrap_or_else(|p| p.into_inner()) = Some(board.clone());

        let tracker = TaskTracker::new();
        let mut inboxes: Vec<Option<mpsc::Sender<Input>>> = Vec::new();
        for (index, spec) in self.operators.iter().enumerate() {
            let name = spec.operator.name();
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
            let (tx, rx) = mpsc::channel(self.inbox_capacity.max(1));
            let runner = Runner {
                index,
                operator: spec.operator.clone(),
                pool: self.pool.clone(),
                retry: spec.retry,
                batch_size: if spec.one_per_transaction {
                    1
                } else {
                    self.batch_size
                },
                one_per_transaction: spec.one_per_transaction,
                checkpoint: checkpoints.get(name).copied(),
                board: board.clone(),
                shutdown: shutdown.clone(),
            };
            // A halted runner returns and drops its inbox; the dispatcher then skips it.
            tracker.spawn(runner.run(rx));
            inboxes.push(Some(tx));
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
                    exit = self.dispatch(&mut items, &mut inboxes, &board, pending_tx, &shutdown) => exit,
                    name = self.watch_resume(&board, &names, &shutdown) => EngineExit::Resumed(name),
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

    /// Reads decoded items and hands them out, until shutdown or the end of the stream.
    async fn dispatch(
        &self,
        items: &mut mpsc::Receiver<Decoded>,
        inboxes: &mut [Option<mpsc::Sender<Input>>],
        board: &Board,
        pending: mpsc::Sender<Pending>,
        shutdown: &CancellationToken,
    ) -> EngineExit {
        let subscriptions: Vec<Vec<super::Subscription>> = self
            .operators
            .iter()
            .map(|o| o.operator.subscriptions())
            .collect();
        let mut specs: HashMap<Arc<str>, ChannelSpec> = HashMap::new();
        let mut current = Pending {
            end_lsn: Lsn::ZERO,
            items: HashMap::new(),
        };
        let mut channels: Vec<String> = Vec::new();
        let mut tally = self.metrics.tally();
        loop {
            let item = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return EngineExit::Shutdown,
                item = items.recv() => match item {
                    Some(item) => item,
                    None => return EngineExit::StreamEnded,
                },
            };
            match item {
                Decoded::Begin { .. } | Decoded::Interrupted => {
                    current.items.clear();
                    tally.discard();
                }
                Decoded::Message { .. } => {}
                Decoded::Event(event) if *event.schema == *status::SCHEMA => {}
                Decoded::Event(event) => {
                    let event = Arc::new(event);
                    tally.event(&event.entity);
                    let ts = self.status_timestamp(&event);
                    let entry = current.items.entry(event.entity.clone()).or_insert((
                        ts,
                        event.commit_lsn,
                        event.ordinal,
                    ));
                    entry.0 = entry.0.max(ts);
                    (entry.1, entry.2) = (event.commit_lsn, event.ordinal);

                    if self.pubsub.channel_count() > 0 {
                        let spec =
                            specs
                                .entry(event.entity.clone())
                                .or_insert_with(|| ChannelSpec {
                                    key_columns: event.key_columns.to_vec(),
                                    scopes: self
                                        .scopes
                                        .get(&*event.entity)
                                        .cloned()
                                        .unwrap_or_default(),
                                });
                        channels.clear();
                        channels.extend(pubsub::channels(&event, spec));
                        self.pubsub.publish(&channels, &event);
                    }
                    for (index, subs) in subscriptions.iter().enumerate() {
                        if !subs.iter().any(|s| s.matches(&event)) {
                            continue;
                        }
                        if !send(&mut inboxes[index], Input::Event(event.clone()), shutdown).await {
                            if shutdown.is_cancelled() {
                                return EngineExit::Shutdown;
                            }
                            debug_assert!(board.is_halted(index));
                        }
                    }
                }
                Decoded::Commit {
                    end_lsn, timestamp, ..
                } => {
                    tally.commit(end_lsn, timestamp);
                    for inbox in inboxes.iter_mut() {
                        if !send(inbox, Input::Commit { end_lsn }, shutdown).await
                            && shutdown.is_cancelled()
                        {
                            return EngineExit::Shutdown;
                        }
                    }
                    current.end_lsn = end_lsn;
                    let done = std::mem::replace(
                        &mut current,
                        Pending {
                            end_lsn: Lsn::ZERO,
                            items: HashMap::new(),
                        },
                    );
                    tokio::select! {
                        biased;
                        sent = pending.send(done) => if sent.is_err() {
                            return EngineExit::StreamEnded;
                        },
                        _ = shutdown.cancelled() => return EngineExit::Shutdown,
                    }
                }
            }
        }
    }

    /// The process-status timestamp of an event: the configured record field (µs since the
    /// Unix epoch), else the commit time.
    fn status_timestamp(&self, event: &Event) -> i64 {
        event
            .record()
            .and_then(|r| r.get(&self.timestamp_field))
            .and_then(parse_timestamp)
            .unwrap_or(event.timestamp)
    }

    /// Stores process status and acknowledges, in WAL order, for the commits every operator
    /// is done with. Ends when the dispatcher is gone and every runner has stopped, after a
    /// last pass over what they finished.
    async fn coordinate(
        &self,
        mut incoming: mpsc::Receiver<Pending>,
        board: Arc<Board>,
        ack: Acknowledger,
        runners_done: CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), EngineError> {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut open = true;
        loop {
            // Take every commit the dispatcher has sent so far, so that the ones already done
            // are stored and acknowledged as one group: one process-status write per round,
            // not one per commit (which cannot keep up with thousands of commits a second).
            while open {
                match incoming.try_recv() {
                    Ok(p) => push_pending(&mut waiting, p),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let finished = !open && runners_done.is_cancelled();
            let done = board.done_through();
            let mut ready: Option<Pending> = None;
            while waiting.front().is_some_and(|p| p.end_lsn <= done) {
                let next = waiting.pop_front().expect("checked non-empty");
                match ready.as_mut() {
                    Some(r) => r.merge(next),
                    None => ready = Some(next),
                }
            }
            if let Some(ready) = ready {
                if !self.complete(ready, &ack, &shutdown).await? {
                    return Ok(()); // shutting down with the database unreachable
                }
                continue;
            }
            if finished {
                return Ok(());
            }
            tokio::select! {
                next = incoming.recv(), if open => match next {
                    Some(p) => push_pending(&mut waiting, p),
                    None => open = false,
                },
                _ = board.changed.notified() => {}
                _ = runners_done.cancelled(), if !open => {}
            }
        }
    }

    /// Stores the process status of a group of finished commits, tells listeners, and
    /// acknowledges the group's end. Returns false, without acknowledging, when shutdown
    /// comes while the database cannot store the status (the commits are replayed and skipped
    /// after a restart).
    async fn complete(
        &self,
        ready: Pending,
        ack: &Acknowledger,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let items: Vec<StatusItem> = ready
            .items
            .iter()
            .map(|(entity, (ts, lsn, _))| StatusItem {
                entity: entity.to_string(),
                timestamp: *ts,
                lsn: *lsn,
            })
            .collect();
        if !items.is_empty() {
            let mut delay = Duration::from_millis(200);
            loop {
                match self.status.items_processed(&items).await {
                    Ok(()) => break,
                    Err(e) if e.is_transient() => {
                        warn!(error = %e, "storing process status failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => return Ok(false),
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            for (entity, (ts, lsn, ordinal)) in ready.items {
                self.pubsub.entity_processed(EntityProcessed {
                    entity: entity.to_string(),
                    commit_lsn: lsn,
                    ordinal,
                    timestamp: ts,
                });
            }
        }
        ack.ack(ready.end_lsn);
        self.metrics.processed_through(ready.end_lsn);
        Ok(true)
    }

    /// Waits until an operator halted in this run is set running again in the database.
    async fn watch_resume(
        &self,
        board: &Board,
        names: &[String],
        shutdown: &CancellationToken,
    ) -> String {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return std::future::pending().await,
            }
            let halted: Vec<usize> = (0..names.len()).filter(|i| board.is_halted(*i)).collect();
            if halted.is_empty() {
                continue;
            }
            let Ok(states) = status::load_operator_states(&self.pool).await else {
                continue;
            };
            for index in halted {
                let name = &names[index];
                if states
                    .get(name.as_str())
                    .is_none_or(|s| s.state != OperatorRunState::Halted)
                {
                    info!(operator = %name, "operator resumed; restarting from the slot's position");
                    return name.clone();
                }
            }
        }
    }
}

/// Sends to an inbox, waiting while it is full. Returns false when the operator's task has
/// stopped (it halted; its inbox is then dropped) or on shutdown.
async fn send(
    inbox: &mut Option<mpsc::Sender<Input>>,
    input: Input,
    shutdown: &CancellationToken,
) -> bool {
    let Some(sender) = inbox else {
        return false;
    };
    let sent = tokio::select! {
        biased;
        sent = sender.send(input) => sent.is_ok(),
        _ = shutdown.cancelled() => return false,
    };
    if !sent {
        *inbox = None;
    }
    sent
}

/// A record field as a process-status timestamp in µs since the Unix epoch: a timestamp or
/// timestamptz as `to_jsonb` writes them, or a number (taken as µs).
fn parse_timestamp(value: &serde_json::Value) -> Option<i64> {
    use chrono::{DateTime, NaiveDateTime};
    match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_micros())
            .ok()
            .or_else(|| {
                NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .ok()
                    .map(|t| t.and_utc().timestamp_micros())
            }),
        _ => None,
    }
}

/// Queues a commit for the coordinator; past [`MAX_PENDING`] the two oldest are merged:
/// coarser, but memory stays flat.
fn push_pending(waiting: &mut VecDeque<Pending>, pending: Pending) {
    waiting.push_back(pending);
    while waiting.len() > MAX_PENDING {
        let oldest = waiting.pop_front().expect("len > 1");
        if let Some(second) = waiting.front_mut() {
            let newer = std::mem::replace(second, oldest);
            second.merge(newer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_record_timestamps_as_to_jsonb_writes_them() {
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05.123456+00:00")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T05:04:05.123456+02:00")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05.123456")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05")),
            Some(1_704_164_645_000_000)
        );
        assert_eq!(parse_timestamp(&json!(42)), Some(42));
        assert_eq!(parse_timestamp(&json!("infinity")), None);
        assert_eq!(parse_timestamp(&json!(null)), None);
    }

    #[test]
    fn merged_pending_commits_keep_the_newest_of_each() {
        let mut a = Pending {
            end_lsn: Lsn(10),
            items: HashMap::from([(Arc::from("posts"), (5, Lsn(8), 0))]),
        };
        a.merge(Pending {
            end_lsn: Lsn(20),
            items: HashMap::from([
                (Arc::from("posts"), (3, Lsn(18), 2)),
                (Arc::from("comments"), (7, Lsn(18), 1)),
            ]),
        });
        assert_eq!(a.end_lsn, Lsn(20));
        assert_eq!(a.items[&Arc::from("posts")], (5, Lsn(18), 2));
        assert_eq!(a.items[&Arc::from("comments")], (7, Lsn(18), 1));
    }
}
