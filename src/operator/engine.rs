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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Subscription;
use super::progress::{Item, Listeners, Pending, Waiting};
use super::runner::{Input, Runner};
use crate::config::RetryConfig;
use crate::decode::Decoded;
use crate::event::{Event, EventType};
use crate::metrics::Metrics;
use crate::pubsub::{self, ChannelSpec, EntityProcessed, PubSub};
use crate::replication::{Acknowledger, Lsn};
use crate::status::{self, OperatorRunState, ProcessStatusStorage, StatusItem};

/// An operator as the engine runs it.
pub struct OperatorSpec {
    pub operator: super::AnyOperator,
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

    /// How far operator `index` is done: the end of the last commit it has finished.
    pub(super) fn done(&self, index: usize) -> Lsn {
        Lsn(self.done[index].load(Ordering::Acquire))
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
                operator: spec.operator.0.clone(),
                pool: self.pool.clone(),
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
        let subscriptions: Vec<Vec<Subscription>> = self
            .operators
            .iter()
            .map(|o| o.operator.subscriptions())
            .collect();
        let mut specs: HashMap<Arc<str>, ChannelSpec> = HashMap::new();
        let mut routes = Routes::default();
        let mut current = Pending::default();
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
                    let item = Item {
                        timestamp: self.status_timestamp(&event),
                        position: event.position(),
                    };
                    match current.items.get_mut(&event.entity) {
                        Some((entry, _)) => entry.merge(item),
                        None => {
                            let listeners = routes.listeners(&subscriptions, &event);
                            current
                                .items
                                .insert(event.entity.clone(), (item, listeners));
                        }
                    }

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
                    for &index in routes.operators(&subscriptions, &event).iter() {
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
                    let done = std::mem::take(&mut current);
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
    /// Unix epoch), else the commit time; never later than the commit time. A row whose
    /// field lies in the future (`updated_at = '2099-01-01'`) would otherwise make every later
    /// write look processed: what has been processed is bounded by the commits processed.
    fn status_timestamp(&self, event: &Event) -> i64 {
        event
            .record()
            .and_then(|r| r.get(&self.timestamp_field))
            .and_then(parse_timestamp)
            .map_or(event.timestamp, |ts| ts.min(event.timestamp))
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
        let mut waiting = Waiting::default();
        let mut open = true;
        loop {
            // Take every commit the dispatcher has sent so far, so that the ones already done
            // are stored and acknowledged as one group: one process-status write per round,
            // not one per commit (which cannot keep up with thousands of commits a second).
            while open {
                match incoming.try_recv() {
                    Ok(p) => waiting.push(p),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let finished = !open && runners_done.is_cancelled();
            let all_done = board.done_through();
            let ready = waiting.take_ready(all_done, |i| board.done(i));
            if !ready.is_empty() {
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
                    Some(p) => waiting.push(p),
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
        ready: super::progress::Ready,
        ack: &Acknowledger,
        shutdown: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let items: Vec<StatusItem> = ready
            .items
            .iter()
            .map(|(entity, item)| StatusItem {
                entity: entity.to_string(),
                timestamp: item.timestamp,
                lsn: item.position.commit_lsn,
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
            for (entity, item) in ready.items {
                self.pubsub.entity_processed(EntityProcessed {
                    entity: entity.to_string(),
                    position: item.position,
                    timestamp: item.timestamp,
                });
            }
        }
        if let Some(end) = ready.ack {
            ack.ack(end);
            self.metrics.processed_through(end);
            self.pubsub.set_processed_through(end);
        }
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

/// Which operators get an event, cached per entity and event type (the dispatcher asks for
/// every event; the subscriptions are matched once).
#[derive(Default)]
struct Routes {
    by_kind: HashMap<(Arc<str>, EventType), Arc<[usize]>>,
    listeners: HashMap<Arc<str>, Listeners>,
}

impl Routes {
    /// The operators a subscription of which matches `event`.
    fn operators(&mut self, subscriptions: &[Vec<Subscription>], event: &Event) -> Arc<[usize]> {
        self.by_kind
            .entry((event.entity.clone(), event.kind))
            .or_insert_with(|| {
                (0..subscriptions.len())
                    .filter(|&i| subscriptions[i].iter().any(|s| s.matches(event)))
                    .collect()
            })
            .clone()
    }

    /// The operators that listen to `event`'s entity, whatever the event type: those whose
    /// progress decides the entity's process status.
    fn listeners(&mut self, subscriptions: &[Vec<Subscription>], event: &Event) -> Listeners {
        self.listeners
            .entry(event.entity.clone())
            .or_insert_with(|| {
                (0..subscriptions.len())
                    .filter(|&i| subscriptions[i].iter().any(|s| event.is_entity(&s.entity)))
                    .collect()
            })
            .clone()
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
}
