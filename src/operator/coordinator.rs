//! The coordinator: in WAL order, stores the process status of what the operators listening
//! to each entity are done with, tells listeners ([`EntityProcessed`]), and acknowledges the
//! commits every operator is done with (see [`super::progress`] for the rules).
//!
//! ```text
//!  Pending (per commit) ──► Waiting ──┐
//!  Board (done per operator) ─────────┴─► take_ready ─► process status stored ─► EntityProcessed ─► ack
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::board::Board;
use super::engine::{Engine, EngineError};
use super::progress::{Pending, Ready, Waiting};
use crate::backoff::Backoff;
use crate::pubsub::EntityProcessed;
use crate::replication::Acknowledger;
use crate::status::{self, OperatorRunState, ProcessStatusStorage, StatusItem};

impl<S: ProcessStatusStorage + Clone> Engine<S> {
    /// The waits between attempts to store process status while the database cannot.
    const STATUS_RETRY: Backoff =
        Backoff::new(Duration::from_millis(200), 2.0, Duration::from_secs(10));

    /// Stores process status and acknowledges, in WAL order, for the commits every operator
    /// is done with. Ends when the dispatcher is gone and every runner has stopped, after a
    /// last pass over what they finished.
    pub(super) async fn coordinate(
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
        ready: Ready,
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
            let mut backoff = Self::STATUS_RETRY;
            loop {
                match self.status.items_processed(&items).await {
                    Ok(()) => break,
                    Err(e) if e.is_transient() => {
                        let wait = backoff.next().unwrap_or(backoff.max);
                        warn!(
                            error = %e,
                            retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                            "storing process status failed; retrying"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => return Ok(false),
                        }
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
    pub(super) async fn watch_resume(
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
            let Ok(states) = status::load_operator_states(&self.pool, &self.slot).await else {
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
