//! The progress board: what each operator's task has durably done, read by the coordinator
//! (to store process status and acknowledge), `/metrics` and `streamex status`.
//!
//! ```text
//!  runner i ──► advance(i, end) / count / retried / dead_lettered / halt ──► Board (atomics)
//!                                                     │
//!  coordinator ◄── done(i), done_through() = min ─────┘──► reports() ──► /metrics, ServiceHandle
//! ```
//!
//! Every figure only moves forward (done positions with `fetch_max`), so a reader never sees
//! an operator go back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::lsn::{Lsn, Position};
use crate::metrics::{OperatorReport, OperatorStateKind};

/// Shared progress of the operators.
#[derive(Debug)]
pub(crate) struct Board {
    done: Vec<AtomicU64>,
    events: Vec<AtomicU64>,
    retries: Vec<AtomicU64>,
    dead: Vec<AtomicU64>,
    halted: Vec<Mutex<Option<String>>>,
    /// Per partition stopped at a gate behind a halted one (see `RunnerExit::Blocked`).
    blocked: Vec<std::sync::atomic::AtomicBool>,
    /// Per operator backfilling in this run: `(rows done, rows estimated)`.
    backfill: Vec<Mutex<Option<(u64, u64)>>>,
    names: Vec<String>,
    pub(super) changed: Notify,
    /// Per participant with an inbox in this run, its backlog (for reports).
    backlogs: Vec<Mutex<Option<Arc<super::inbox::Backlog>>>>,
    /// The first operator that needs the pipeline started again from the slot, and why.
    replay: Mutex<Option<(usize, Restart)>>,
    replay_wanted: Notify,
}

/// Why an operator needs the pipeline started again from the slot's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restart {
    /// A folded window failed: its events through this position must come again, unfolded
    /// (see `RunnerExit::Replay`).
    Unfolded(Position),
    /// The database holds an earlier checkpoint than the operator committed: it lost
    /// commits (see `RunnerExit::Rewound`), and the events after the stored checkpoint must
    /// come again.
    Rewound,
}

impl Board {
    pub(crate) fn new(names: Vec<String>, start: Lsn) -> Self {
        let n = names.len();
        let atomics = |v: u64| (0..n).map(|_| AtomicU64::new(v)).collect::<Vec<_>>();
        Board {
            done: atomics(start.0),
            events: atomics(0),
            retries: atomics(0),
            dead: atomics(0),
            halted: (0..n).map(|_| Mutex::new(None)).collect(),
            blocked: (0..n).map(|_| Default::default()).collect(),
            backfill: (0..n).map(|_| Mutex::new(None)).collect(),
            names,
            changed: Notify::new(),
            backlogs: (0..n).map(|_| Mutex::new(None)).collect(),
            replay: Mutex::new(None),
            replay_wanted: Notify::new(),
        }
    }

    /// How far operator `index` is done: the end of the last commit it has finished.
    pub(crate) fn done(&self, index: usize) -> Lsn {
        Lsn(self.done[index].load(Ordering::Acquire))
    }

    /// Waits until a participant has moved (or halted) since the last wait ended: for a
    /// single reader of the board (the coordinator, or a worker's operator task).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
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

    /// Operator `index` backfills in this run (it gets no inbox; its done position stays).
    pub(crate) fn backfill_started(&self, index: usize, estimate: u64) {
        *self.backfill[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((0, estimate));
    }

    /// Operator `index`'s backfill has handled `rows` rows.
    pub(crate) fn backfill_rows(&self, index: usize, rows: u64) {
        if let Some((done, _)) = self.backfill[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            *done = rows;
        }
    }

    pub(super) fn is_backfilling(&self, index: usize) -> bool {
        self.backfill[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Participant `index` has an inbox with this backlog in this run.
    pub(super) fn set_backlog(&self, index: usize, backlog: Arc<super::inbox::Backlog>) {
        *self.backlogs[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(backlog);
    }

    /// Operator `index` needs the pipeline started again from the slot (see [`Restart`]).
    pub(crate) fn replay(&self, index: usize, why: Restart) {
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        if replay.is_none() {
            *replay = Some((index, why));
        }
        drop(replay);
        self.replay_wanted.notify_one();
    }

    /// Waits until an operator needs the pipeline started again: its name and why.
    pub(super) async fn replay_wanted(&self) -> (String, Restart) {
        loop {
            if let Some((index, why)) = *self.replay.lock().unwrap_or_else(|p| p.into_inner()) {
                return (self.names[index].clone(), why);
            }
            self.replay_wanted.notified().await;
        }
    }

    /// Partition `index` stopped at a gate behind a halted partition (it gets no more
    /// inputs in this run; its done position stays).
    pub(crate) fn block(&self, index: usize) {
        self.blocked[index].store(true, Ordering::Release);
        self.changed.notify_one();
    }

    pub(super) fn is_blocked(&self, index: usize) -> bool {
        self.blocked[index].load(Ordering::Acquire)
    }

    /// The name of participant `index` (an operator, or one of its partitions).
    pub(super) fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    pub(super) fn is_halted(&self, index: usize) -> bool {
        self.halted[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The end of the last commit every operator is done with.
    pub(super) fn done_through(&self) -> Lsn {
        Lsn(self
            .done
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX))
    }

    pub(super) fn reports(&self) -> Vec<OperatorReport> {
        (0..self.names.len())
            .map(|i| {
                let error = self.halted[i]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let backfill = *self.backfill[i].lock().unwrap_or_else(|p| p.into_inner());
                OperatorReport {
                    name: self.names[i].clone(),
                    state: if error.is_some() {
                        OperatorStateKind::Halted
                    } else if backfill.is_some() {
                        OperatorStateKind::Backfilling
                    } else if self.blocked[i].load(Ordering::Acquire) {
                        OperatorStateKind::Held
                    } else {
                        OperatorStateKind::Running
                    },
                    backfill_rows: backfill.map(|(rows, _)| rows),
                    backfill_estimate: backfill.map(|(_, estimate)| estimate),
                    done_through: Lsn(self.done[i].load(Ordering::Acquire)),
                    events: self.events[i].load(Ordering::Relaxed),
                    retries: self.retries[i].load(Ordering::Relaxed),
                    dead_letters: self.dead[i].load(Ordering::Relaxed),
                    backlog_bytes: self.backlogs[i]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|b| u64::try_from(b.waiting_bytes()).unwrap_or(u64::MAX)),
                    last_error: error,
                }
            })
            .collect()
    }
}
