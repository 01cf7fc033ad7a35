//! One operator's task: takes events from its inbox in WAL order, runs them through the
//! handler in batches, and reports how far it has durably got.
//!
//! # Batches and failures
//!
//! An operator that delivers exactly once runs up to `batch_size` waiting events in one transaction and
//! writes its checkpoint (the last event's position) at the end of it. When any event of the
//! batch fails, the transaction is rolled back and the batch's events are run again one by one,
//! each in its own transaction with its own checkpoint, so the failing event is isolated, the
//! events before it are applied exactly once, and WAL order holds.
//!
//! An operator that delivers at least once gets its events one at a time, unless it asks for
//! batches ([`super::Operator::at_least_once_batch`]): then a batch runs without a
//! transaction, and a failed one is run again one by one in the same way, so the events
//! before the failing one are handled twice (which at least once allows).
//!
//! A failing event is retried with exponential backoff; after the last retry the policy
//! applies: `halt` stores the failure, stops this task and leaves its position (and so the
//! slot) where it is; `dead_letter` stores the event in `streamex.dead_letters` together with
//! the checkpoint, in one transaction, and goes on.
//!
//! The error is logged at warn when an event first fails and at error when the policy
//! applies; a retry failing the same way is logged at debug, so that a failing statement
//! shows twice in the log, not once per retry. A database that cannot be reached is not the
//! event's failure: the event waits ([`Runner::outage_backoff`]) without spending retries.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, trace, warn};

use super::board::{Board, Restart};
use super::inbox::InputSource;
use super::partition::Gate;
use super::{Context, Delivery, DynOperator, HandlerFuture};
use crate::backoff::Backoff;
use crate::config::{FailurePolicy, RetryConfig};
use crate::event::Event;
use crate::lsn::{Lsn, Position};
use crate::replication::StreamStats;
use crate::status;

/// What the dispatcher sends an operator.
#[derive(Debug)]
pub(crate) enum Input {
    /// An event it listens to.
    Event(Arc<Event>),
    /// A transaction ended; everything before this marker belongs to commits up to `end_lsn`.
    Commit { end_lsn: Lsn },
    /// An event that concerns the rows of several of the operator's partitions (see
    /// [`Gate`]): the event itself for the partition that applies it, none for the others.
    Gate(Arc<Gate>, Option<Arc<Event>>),
}

/// A transaction was rolled back because the operator's stored checkpoint was not where
/// this task left it (see [`status::advance_checkpoint`]); the task now knows the stored one.
#[derive(Debug, thiserror::Error)]
#[error("the operator's stored checkpoint moved; rolled back")]
pub(crate) struct CheckpointMoved;

/// A transaction was rolled back because the database holds an earlier checkpoint than this
/// task committed: the database lost committed transactions (a failover to a standby that
/// had not received them, a restore from a backup). The events after the stored checkpoint
/// are handled but their effects are gone; only the slot can send them again, so the task
/// stops and the pipeline starts again from the slot's position ([`RunnerExit::Rewound`]).
#[derive(Debug, thiserror::Error)]
#[error("the database went back to an earlier checkpoint of the operator; rolled back")]
pub(crate) struct CheckpointRewound;

/// How an operator's task ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RunnerExit {
    /// The inbox closed (shutdown) after everything in it was handled.
    Drained,
    /// Shutdown arrived while waiting to retry.
    Interrupted,
    /// The retries ran out under the `halt` policy.
    Halted,
    /// A folded window failed: the events up to this position must come again (from the
    /// slot) and be handled without folding, so that the failing one is found.
    Replay(Position),
    /// The database lost commits of this operator ([`CheckpointRewound`]): the events after
    /// its stored checkpoint must come again.
    Rewound,
    /// A partition that this one waits for at a [`Gate`] is halted (or stopped likewise):
    /// this one stops too, and goes on when the engine starts again after the resume.
    Blocked,
}

pub(crate) struct Runner {
    pub index: usize,
    pub operator: Arc<dyn DynOperator>,
    pub pool: PgPool,
    /// The replication slot, which with the operator's name keys its rows.
    pub slot: Arc<str>,
    pub retry: RetryConfig,
    pub batch_size: usize,
    pub one_per_transaction: bool,
    /// The last position durably handled: events at or before it are skipped (replays).
    pub checkpoint: Option<Position>,
    /// An event to set aside as a dead letter instead of handling it (`streamex resume
    /// --skip-current`).
    pub skip: Option<Position>,
    pub board: Arc<Board>,
    pub shutdown: CancellationToken,
    /// The server's clock (through the replication stream), against which commit times
    /// tell how far behind the operator is.
    pub clock: Arc<StreamStats>,
    /// Events up to here are not folded: they come again after a folded window failed.
    pub unfolded_through: Option<Position>,
    /// The greatest position taken from the inbox: an event at or before it is a second copy
    /// (the stream reconnected inside a transaction and sent it again from its start) and is
    /// dropped, since the first copy is handled, or being handled, in order before it.
    pub received: Option<Position>,
    /// The failure last logged at warn, until an event succeeds: a retry failing the same
    /// way is logged at debug, so a failing statement shows once, not on every retry.
    pub reported: Option<String>,
}

/// How long behind the server's clock an event's commit must be for the operator to count as
/// behind, and fold what is waiting.
const FOLD_BEHIND_MICROS: i64 = 250_000;
/// How long a folded window stays open, at most.
const FOLD_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a folded window waits for the next event: nothing coming for this long means
/// what was waiting has been taken (the end of a backlog), so the window closes.
const FOLD_IDLE: std::time::Duration = std::time::Duration::from_millis(500);
/// How many statements a folded window holds, at most (each is an id and its statement).
const FOLD_MAX_STEPS: usize = 50_000;

/// What [`Runner::fold_window`] did with an input.
enum Window {
    /// Folded a window and committed it; `next` ended it and is to be handled next.
    Folded {
        next: Option<Input>,
    },
    /// Not folded (the operator is not behind, or does not fold): handle it as usual.
    NotFolded(Input),
    Stop(RunnerExit),
}

/// The outcome of handling one event with its retries.
enum Handled {
    Done,
    Stop(RunnerExit),
}

impl Runner {
    pub async fn run(mut self, mut inbox: impl InputSource) -> RunnerExit {
        let mut batch: Vec<Input> = Vec::with_capacity(self.batch_size + 1);
        // An input taken from the inbox that ended a folded window, handled next.
        let mut held: Option<Input> = None;
        loop {
            let first = match held.take() {
                Some(input) => input,
                None => match inbox.recv().await {
                    Some(input) => match self.fresh(input) {
                        Some(input) => input,
                        None => continue,
                    },
                    None => return RunnerExit::Drained,
                },
            };
            // A marker first: every event before it is handled. Passed on at once, so that the
            // next input, an event, may start a folded window: in a run of one-event
            // transactions, a batch that ends after an event would otherwise be followed by a
            // marker, then a batch again, and never fold, however far behind.
            let first = match first {
                Input::Commit { end_lsn } => {
                    self.board.advance(self.index, end_lsn);
                    continue;
                }
                Input::Gate(gate, event) => match self.pass(&gate, event).await {
                    Handled::Done => continue,
                    Handled::Stop(exit) => return self.stopped(exit),
                },
                event @ Input::Event(_) => event,
            };
            let first = match self.fold_window(first, &mut inbox).await {
                Window::Folded { next } => {
                    held = next;
                    continue;
                }
                Window::Stop(exit) => return self.stopped(exit),
                Window::NotFolded(first) => first,
            };
            batch.push(first);
            let mut events = usize::from(matches!(batch[0], Input::Event(_)));
            let limit = self.batch_limit();
            while events < limit {
                match inbox.try_recv() {
                    Ok(input) => {
                        let Some(input) = self.fresh(input) else {
                            continue;
                        };
                        if matches!(input, Input::Gate(..)) {
                            // Everything before it is handled first, in this batch.
                            held = Some(input);
                            break;
                        }
                        events += usize::from(matches!(input, Input::Event(_)));
                        batch.push(input);
                    }
                    Err(_) => break,
                }
            }
            let done_through = batch.iter().rev().find_map(|input| match input {
                Input::Commit { end_lsn } => Some(*end_lsn),
                Input::Event(_) | Input::Gate(..) => None,
            });
            let todo: Vec<Arc<Event>> = batch
                .drain(..)
                .filter_map(|input| match input {
                    Input::Event(e) if self.is_new(&e) => Some(e),
                    _ => None,
                })
                .collect();
            if let Handled::Stop(exit) = self.handle_events(&todo).await {
                return self.stopped(exit);
            }
            if let Some(end) = done_through {
                self.board.advance(self.index, end);
            }
        }
    }

    /// `events` in order, the one `streamex resume --skip-current` named set aside.
    async fn handle_events(&mut self, events: &[Arc<Event>]) -> Handled {
        let skipped = self
            .skip
            .and_then(|skip| events.iter().position(|e| e.position() == skip));
        match skipped {
            None => self.handle_batch(events).await,
            Some(at) => match self.handle_batch(&events[..at]).await {
                Handled::Done => match self.set_aside(&events[at]).await {
                    Handled::Done => self.handle_batch(&events[at + 1..]).await,
                    stop => stop,
                },
                stop => stop,
            },
        }
    }

    /// Takes this partition past `gate` (everything before it is handled): another partition
    /// arrives and waits for the applier to open it; the applier (`event`) waits for the
    /// others to arrive, applies the event and opens it. A partition it waits for that is
    /// halted, or stopped at a gate of its own, stops this one too ([`RunnerExit::Blocked`]).
    async fn pass(&mut self, gate: &Gate, event: Option<Arc<Event>>) -> Handled {
        let applies = event.is_some();
        if !applies {
            gate.arrive();
        }
        let waits_on = if applies {
            gate.others.clone()
        } else {
            vec![gate.applier]
        };
        while !gate.passable(applies) {
            if let Some(&stuck) = waits_on
                .iter()
                .find(|&&i| self.board.is_halted(i) || self.board.is_blocked(i))
            {
                warn!(
                    operator = self.operator.name(), waits_for = %self.board.name(stuck),
                    "an event of several partitions' rows waits for a partition that is halted: \
                     this partition stops too, and goes on once that one is resumed"
                );
                self.board.block(self.index);
                return Handled::Stop(RunnerExit::Blocked);
            }
            tokio::select! {
                _ = gate.changed() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                _ = self.shutdown.cancelled() => return Handled::Stop(RunnerExit::Interrupted),
            }
        }
        if let Some(event) = event {
            if self.is_new(&event) {
                if let Handled::Stop(exit) = self.handle_events(&[event]).await {
                    return Handled::Stop(exit);
                }
            }
            gate.open();
        }
        Handled::Done
    }

    /// `exit`, after asking the engine to start the pipeline again from the slot when the
    /// exit needs events to come again.
    fn stopped(&self, exit: RunnerExit) -> RunnerExit {
        match exit {
            RunnerExit::Replay(through) => {
                self.board.replay(self.index, Restart::Unfolded(through))
            }
            RunnerExit::Rewound => self.board.replay(self.index, Restart::Rewound),
            RunnerExit::Drained
            | RunnerExit::Interrupted
            | RunnerExit::Halted
            | RunnerExit::Blocked => {}
        }
        exit
    }

    /// `input`, unless it is the second copy of an event already taken (see `received`).
    fn fresh(&mut self, input: Input) -> Option<Input> {
        if let Input::Event(event) | Input::Gate(_, Some(event)) = &input {
            let position = event.position();
            if self.received.is_some_and(|received| position <= received) {
                return None;
            }
            self.received = Some(position);
        }
        Some(input)
    }

    /// Whether `event` may start or join a folded window.
    fn foldable(&self, event: &Event) -> bool {
        event.decode_error.is_none()
            && self.skip != Some(event.position())
            && self
                .unfolded_through
                .is_none_or(|through| event.position() > through)
    }

    /// Whether the operator is behind at `event`: its commit is a while ago by the server's
    /// clock (so what is waiting, in the inbox or still in the slot, is worth folding).
    fn behind(&self, event: &Event) -> bool {
        self.clock.server_now().saturating_sub(event.timestamp) > FOLD_BEHIND_MICROS
    }

    /// For a declarative operator that is behind: folds `first` and the events that follow it
    /// (waiting for more while it is behind, up to [`FOLD_WINDOW`] and [`FOLD_MAX_STEPS`])
    /// into one recomputation per id, keeping the ids, not the events, and runs them with the
    /// checkpoint of the last event in one transaction. The database ends as handling the
    /// events one by one would: a recomputation reads the tables as they are now, so only
    /// the last one of an id in a row counts (see `Folded`). On failure, the events come
    /// again from the slot and are handled without folding ([`RunnerExit::Replay`]), so that
    /// the failing one meets the retry and failure policy alone.
    async fn fold_window(&mut self, first: Input, inbox: &mut impl InputSource) -> Window {
        let operator = self.operator.clone();
        let Some(sql) = operator.as_sql() else {
            return Window::NotFolded(first);
        };
        let Input::Event(event) = &first else {
            return Window::NotFolded(first);
        };
        if !self.exactly_once()
            || self.one_per_transaction
            || !self.is_new(event)
            || !self.foldable(event)
            || !self.behind(event)
        {
            return Window::NotFolded(first);
        }
        let mut folded = super::sql::Folded::default();
        if !sql.fold(&mut folded, event) {
            return Window::NotFolded(first);
        }
        let mut last = event.position();
        let mut behind = true;
        let mut xids = vec![event.xid];
        let mut events = 1;
        let mut done_through = None;
        let closes = tokio::time::Instant::now() + FOLD_WINDOW;
        let next = loop {
            if folded.len() >= FOLD_MAX_STEPS {
                break None;
            }
            let input = match inbox.try_recv() {
                Ok(input) => input,
                Err(mpsc::error::TryRecvError::Disconnected) => break None,
                Err(mpsc::error::TryRecvError::Empty) if !behind => break None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let until = closes.min(tokio::time::Instant::now() + FOLD_IDLE);
                    match tokio::time::timeout_at(until, inbox.recv()).await {
                        Ok(Some(input)) => input,
                        Ok(None) | Err(_) => break None,
                    }
                }
            };
            let Some(input) = self.fresh(input) else {
                continue;
            };
            match input {
                Input::Commit { end_lsn } => done_through = Some(end_lsn),
                gate @ Input::Gate(..) => break Some(gate),
                Input::Event(event) => {
                    if !self.is_new(&event) {
                        continue;
                    }
                    if !self.foldable(&event) || !sql.fold(&mut folded, &event) {
                        break Some(Input::Event(event));
                    }
                    last = event.position();
                    if xids.last() != Some(&event.xid) {
                        xids.push(event.xid);
                    }
                    events += 1;
                    behind = self.behind(&event);
                }
            }
            if tokio::time::Instant::now() >= closes {
                break None;
            }
        };

        let mut outage = self.outage_backoff();
        loop {
            let result = async {
                let mut tx = self.pool.begin().await?;
                wait_visible(&mut tx, xids.iter().copied()).await?;
                sql.run_folded(&mut tx, &folded).await?;
                self.commit_with_checkpoint(tx, last).await
            }
            .await;
            let error = match result {
                Ok(()) => break,
                Err(error) => error,
            };
            if is_database_outage(&error) {
                let wait = outage.next().unwrap_or(outage.max);
                warn!(
                    operator = self.operator.name(), error = %crate::error::chain(&error),
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "database unavailable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = self.shutdown.cancelled() => return Window::Stop(RunnerExit::Interrupted),
                }
            }
            if error.is::<CheckpointRewound>() {
                return Window::Stop(RunnerExit::Rewound);
            }
            if !error.is::<CheckpointMoved>() {
                warn!(
                    operator = self.operator.name(), events, through = %last,
                    error = %crate::error::chain(&error),
                    "a folded window failed; its events come again from the slot, one by one"
                );
            }
            return Window::Stop(RunnerExit::Replay(last));
        }
        self.reported = None;
        self.board.count(self.index, events);
        debug!(
            operator = self.operator.name(), events, statements = folded.len(), through = %last,
            "folded a window"
        );
        if let Some(end) = done_through {
            self.board.advance(self.index, end);
        }
        Window::Folded { next }
    }

    fn is_new(&self, event: &Event) -> bool {
        self.checkpoint.is_none_or(|done| event.position() > done)
    }

    async fn handle_batch(&mut self, events: &[Arc<Event>]) -> Handled {
        if events.is_empty() {
            return Handled::Done;
        }
        if self.batch_limit() > 1
            && !self.one_per_transaction
            && events.len() > 1
            && events.iter().all(|e| e.decode_error.is_none())
        {
            match self.try_batch(events).await {
                Ok(()) => {
                    self.board.count(self.index, events.len());
                    return Handled::Done;
                }
                Err(error) if error.is::<CheckpointRewound>() => {
                    return Handled::Stop(RunnerExit::Rewound);
                }
                Err(error) => {
                    let message = crate::error::chain(&error);
                    warn!(
                        operator = self.operator.name(),
                        events = events.len(),
                        error = %message,
                        "batch failed; running its events one by one"
                    );
                    self.reported = Some(message);
                }
            }
        }
        for event in events {
            if !self.is_new(event) {
                continue;
            }
            if let Handled::Stop(exit) = self.handle_one(event).await {
                return Handled::Stop(exit);
            }
            self.board.count(self.index, 1);
        }
        Handled::Done
    }

    /// All of `events` and the checkpoint in one transaction (for an operator that delivers
    /// at least once, `events` without a transaction).
    async fn try_batch(&mut self, events: &[Arc<Event>]) -> anyhow::Result<()> {
        if !self.exactly_once() {
            let mut ctx = Context::new(None, 1, self.operator.name());
            guarded(self.operator.handle_batch(events, &mut ctx)).await?;
            // Kept in memory only, as for one event (see `attempt`).
            self.checkpoint = events.last().map(|e| e.position()).max(self.checkpoint);
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        wait_visible(&mut tx, events.iter().map(|e| e.xid)).await?;
        let mut ctx = Context::new(Some(&mut *tx), 1, self.operator.name());
        guarded(self.operator.handle_batch(events, &mut ctx)).await?;
        let last = events.last().map(|e| e.position()).unwrap_or_default();
        let from = self.checkpoint;
        self.commit_with_checkpoint(tx, last).await?;
        self.trace_applied(from, events.iter().map(|e| &**e));
        Ok(())
    }

    /// At trace level, which events a committed transaction applied (`xid:ordinal` each) and
    /// the checkpoint it moved: with the WAL, this tells a doubled or lost event's story.
    fn trace_applied<'e>(&self, from: Option<Position>, events: impl Iterator<Item = &'e Event>) {
        if tracing::enabled!(tracing::Level::TRACE) {
            let applied: Vec<String> = events.map(|e| format!("{}:{}", e.xid, e.ordinal)).collect();
            trace!(
                operator = self.operator.name(),
                from = %display_position(from),
                to = %display_position(self.checkpoint),
                events = %applied.join(","),
                "applied"
            );
        }
    }

    /// At most how many events go to the handler together: `batch_size` for an operator
    /// that delivers exactly once; for one that delivers at least once, what it asks for
    /// ([`super::Operator::at_least_once_batch`], 1 unless it says more) within `batch_size`.
    fn batch_limit(&self) -> usize {
        if self.exactly_once() {
            self.batch_size
        } else {
            self.operator
                .at_least_once_batch()
                .clamp(1, self.batch_size.max(1))
        }
    }

    /// Whether its effects go into a transaction with its checkpoint.
    fn exactly_once(&self) -> bool {
        self.operator.delivery() == Delivery::ExactlyOnce
    }

    /// Stores the checkpoint `position` in `tx` (for an operator that delivers exactly once),
    /// commits, and
    /// from then on skips events at or before it.
    async fn commit_with_checkpoint(
        &mut self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        position: Position,
    ) -> anyhow::Result<()> {
        if self.exactly_once()
            && !status::advance_checkpoint(
                &mut *tx,
                &self.slot,
                self.operator.name(),
                self.checkpoint,
                position,
            )
            .await?
        {
            // Some of these events were applied by a transaction this task did not see
            // commit: roll back, and go on after what is stored.
            drop(tx);
            let stored =
                status::load_checkpoint(&self.pool, &self.slot, self.operator.name()).await?;
            if stored < self.checkpoint {
                warn!(
                    operator = self.operator.name(),
                    committed = %display_position(self.checkpoint), stored = %display_position(stored),
                    "the database holds an earlier checkpoint of this operator than it committed: \
                     it lost committed transactions (a failover to a standby that had not \
                     received them, or a restore from a backup); starting again from the slot's \
                     position, so that the changes after the stored checkpoint are applied again"
                );
                return Err(CheckpointRewound.into());
            }
            warn!(
                operator = self.operator.name(),
                expected = %display_position(self.checkpoint), stored = %display_position(stored),
                "the stored checkpoint moved under this operator (a lost commit reply, or \
                 another instance's last transaction); rolled back and going on after it"
            );
            self.checkpoint = stored.max(self.checkpoint);
            return Err(CheckpointMoved.into());
        }
        tx.commit().await?;
        self.checkpoint = Some(position);
        Ok(())
    }

    /// The waits while the database is unreachable or restarting: from the retry policy's
    /// `initial`, doubling (whatever its `multiplier`, which is for a failing event), at most
    /// its `max`. Waiting for the database spends none of an event's retries.
    fn outage_backoff(&self) -> Backoff {
        Backoff::new(self.retry.initial, 2.0, self.retry.max)
    }

    /// One event in its own transaction (or none), with retries and the failure policy.
    async fn handle_one(&mut self, event: &Event) -> Handled {
        let name = self.operator.name().to_owned();
        let mut attempt = 1;
        let mut retries = self.retry.backoff();
        let mut outage = self.outage_backoff();
        let mut conflicts = 0;
        let mut conflict_wait = Backoff::new(
            std::time::Duration::from_millis(5),
            2.0,
            std::time::Duration::from_millis(500),
        );
        loop {
            if !self.is_new(event) {
                // Applied in the meantime (see CheckpointMoved): nothing left to do.
                return Handled::Done;
            }
            if let Some(undecodable) = &event.decode_error {
                // Handling it again cannot help: the policy applies at once.
                let message = format!(
                    "the change could not be decoded, so it was not given to the operator: {undecodable}"
                );
                attempt = attempt.max(self.retry.retries + 1);
                match self.give_up(event, message, attempt, &mut outage).await {
                    Some(handled) => return handled,
                    None => continue,
                }
            }
            let result = self.attempt(event, attempt).await;
            let error = match result {
                Ok(()) => {
                    self.reported = None;
                    return Handled::Done;
                }
                // Run it again now if it is not among the events already applied.
                Err(error) if error.is::<CheckpointMoved>() => continue,
                Err(error) if error.is::<CheckpointRewound>() => {
                    return Handled::Stop(RunnerExit::Rewound);
                }
                Err(error) => error,
            };
            let message = crate::error::chain(&error);
            if is_database_outage(&error) {
                // The database is unreachable or restarting: not the event's fault. Wait and
                // try again without spending the retries that lead to halt or dead letter.
                let wait = outage.next().unwrap_or(outage.max);
                warn!(
                    operator = %name, error = %message,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "database unavailable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return Handled::Stop(RunnerExit::Interrupted),
                }
                continue;
            }
            outage.reset();
            if is_transaction_conflict(&error) && conflicts < FREE_CONFLICTS {
                conflicts += 1;
                let wait = conflict_wait.next().unwrap_or(conflict_wait.max);
                debug!(
                    operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                    conflicts, error = %message,
                    "the transaction met another writing the same rows; running it again"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return Handled::Stop(RunnerExit::Interrupted),
                }
                continue;
            }
            if attempt <= self.retry.retries {
                let backoff = retries.next().unwrap_or(retries.max);
                // A receiver's Retry-After (see RetryAfter) is a floor under the backoff.
                let wait =
                    super::RetryAfter::of(&error).map_or(backoff, |asked| asked.max(backoff));
                let retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                if self.reported.as_ref() == Some(&message) {
                    debug!(
                        operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                        attempt, retries = self.retry.retries, error = %message, retry_in_ms,
                        "operator failed again, the same way; retrying"
                    );
                } else {
                    warn!(
                        operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                        attempt, retries = self.retry.retries, error = %message, retry_in_ms,
                        "operator failed; retrying (retries failing the same way are logged at \
                         debug)"
                    );
                    self.reported = Some(message);
                }
                self.board.retried(self.index);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return Handled::Stop(RunnerExit::Interrupted),
                }
                attempt += 1;
                continue;
            }
            if let Some(handled) = self.give_up(event, message, attempt, &mut outage).await {
                return handled;
            }
        }
    }

    /// Applies the failure policy to `event`, which failed `attempts` times with `message`:
    /// halt, or store it as a dead letter and go on. `None` when the dead letter could not be
    /// stored (after a wait from `outage`): the caller tries again, never skipping the event.
    async fn give_up(
        &mut self,
        event: &Event,
        message: String,
        attempts: u32,
        outage: &mut Backoff,
    ) -> Option<Handled> {
        let name = self.operator.name().to_owned();
        match self.retry.on_failure {
            FailurePolicy::Halt => {
                error!(
                    operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                    attempts, error = %message,
                    "operator halted: its position stays unacknowledged until `streamex resume {name}` \
                     (add --skip-current to set this event aside as a dead letter, when handling it \
                     again cannot succeed)"
                );
                let stored = status::set_operator_halted(
                    &self.pool,
                    &self.slot,
                    &name,
                    &message,
                    event.commit_lsn,
                    event.ordinal,
                    attempts,
                )
                .await;
                if let Err(e) = stored {
                    error!(operator = %name, error = %e, "could not store the halt; it is in this log only");
                }
                self.board.halt(self.index, message);
                Some(Handled::Stop(RunnerExit::Halted))
            }
            FailurePolicy::DeadLetter => match self.dead_letter(event, &message, attempts).await {
                Ok(()) => {
                    error!(
                        operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                        attempts, error = %message,
                        "event stored in streamex.dead_letters; going on"
                    );
                    self.reported = None;
                    self.board.dead_lettered(self.index);
                    Some(Handled::Done)
                }
                Err(e) if e.is::<CheckpointRewound>() => Some(Handled::Stop(RunnerExit::Rewound)),
                Err(e) => {
                    // The dead letter could not be stored: keep trying, never skip.
                    let wait = outage.next().unwrap_or(outage.max);
                    warn!(
                        operator = %name, error = %crate::error::chain(&e),
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "storing a dead letter failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => None,
                        _ = self.shutdown.cancelled() => Some(Handled::Stop(RunnerExit::Interrupted)),
                    }
                }
            },
        }
    }

    async fn attempt(&mut self, event: &Event, attempt: u32) -> anyhow::Result<()> {
        if !self.exactly_once() {
            let mut ctx = Context::new(None, attempt, self.operator.name());
            guarded(self.operator.handle(event, &mut ctx)).await?;
            // Kept in memory only: after a crash such an operator sees replays (at least once).
            self.checkpoint = Some(event.position());
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        wait_visible(&mut tx, [event.xid]).await?;
        let mut ctx = Context::new(Some(&mut *tx), attempt, self.operator.name());
        guarded(self.operator.handle(event, &mut ctx)).await?;
        let from = self.checkpoint;
        self.commit_with_checkpoint(tx, event.position()).await?;
        self.trace_applied(from, std::iter::once(event));
        Ok(())
    }

    /// Stores the event `streamex resume --skip-current` named as a dead letter, without
    /// handling it, and forgets that it was to be skipped: one transaction with the checkpoint.
    async fn set_aside(&mut self, event: &Event) -> Handled {
        let name = self.operator.name().to_owned();
        let mut outage = self.outage_backoff();
        loop {
            let attempt = async {
                let json = serde_json::to_value(event)?;
                let mut tx = self.pool.begin().await?;
                status::insert_dead_letter(
                    &mut *tx,
                    &self.slot,
                    &name,
                    event.position(),
                    &json,
                    "set aside by `streamex resume --skip-current`",
                    0,
                )
                .await?;
                status::clear_operator_skip(&mut *tx, &self.slot, &name).await?;
                self.commit_with_checkpoint(tx, event.position()).await
            };
            match attempt.await {
                Ok(()) => {
                    warn!(operator = %name, commit_lsn = %event.commit_lsn, ordinal = event.ordinal,
                          "event set aside in streamex.dead_letters, as `streamex resume --skip-current` asked");
                    self.skip = None;
                    self.board.dead_lettered(self.index);
                    return Handled::Done;
                }
                Err(error) if error.is::<CheckpointMoved>() => {
                    if !self.is_new(event) {
                        return Handled::Done;
                    }
                }
                Err(error) if error.is::<CheckpointRewound>() => {
                    return Handled::Stop(RunnerExit::Rewound);
                }
                Err(error) => {
                    let wait = outage.next().unwrap_or(outage.max);
                    warn!(operator = %name, error = %crate::error::chain(&error),
                          retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                          "setting an event aside failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Handled::Stop(RunnerExit::Interrupted),
                    }
                }
            }
        }
    }

    async fn dead_letter(
        &mut self,
        event: &Event,
        error: &str,
        attempts: u32,
    ) -> anyhow::Result<()> {
        let json = serde_json::to_value(event)?;
        let mut tx = self.pool.begin().await?;
        status::insert_dead_letter(
            &mut *tx,
            &self.slot,
            self.operator.name(),
            event.position(),
            &json,
            error,
            attempts,
        )
        .await?;
        self.commit_with_checkpoint(tx, event.position()).await
    }
}

/// A checkpoint for a log line: its position, or `none`.
fn display_position(position: Option<Position>) -> String {
    position.map_or_else(|| "none".to_owned(), |p| p.to_string())
}

/// Whether `error` is a deadlock or a serialization failure (SQLSTATE 40P01, 40001): the
/// transaction met another one writing the same rows (an operator's partitions updating one
/// aggregate row, say), which says nothing about the event; it runs again.
fn is_transaction_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| code == "40P01" || code == "40001")
    })
}

/// How many transaction conflicts in a row an event may meet before they count as its
/// failures (and spend its retries).
const FREE_CONFLICTS: u32 = 20;

/// Whether `error` comes from the database being unreachable or restarting (a lost
/// connection, a pool timeout, SQLSTATE class 08 or 57P0x, ...), as opposed to the handler or
/// the event: judged by SQLSTATE and error kind, never by message text.
pub(crate) fn is_database_outage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(crate::error::is_transient_sqlx)
            || cause
                .downcast_ref::<status::StatusError>()
                .is_some_and(status::StatusError::is_transient)
    })
}

/// Waits until the transactions `xids` are visible to new snapshots.
///
/// PostgreSQL writes a commit record, and the walsender may decode and send it, a moment
/// before the committing transaction becomes visible to other sessions. An operator that reads
/// the source tables (the declarative ones recompute derived rows from them) must see at least
/// the state its event's commit produced, or its last recomputation could miss that change
/// for good. One round trip per batch; nearly always it is already visible.
async fn wait_visible(
    conn: &mut sqlx::PgConnection,
    xids: impl IntoIterator<Item = u32>,
) -> anyhow::Result<()> {
    let mut xids: Vec<u32> = xids.into_iter().collect();
    xids.sort_unstable();
    xids.dedup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut *conn)
            .await?;
        let Some((xmax, in_progress)) = parse_snapshot(&snapshot) else {
            anyhow::bail!("unexpected snapshot text from pg_current_snapshot()");
        };
        if xids.iter().all(|xid| visible(*xid, xmax, &in_progress)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            warn!("a committed transaction is still not visible after 10 s; going on");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// `xmin:xmax:xip,...` as `pg_current_snapshot()` prints it: (xmax, in-progress xids).
fn parse_snapshot(text: &str) -> Option<(u64, Vec<u64>)> {
    let mut parts = text.split(':');
    let _xmin: u64 = parts.next()?.parse().ok()?;
    let xmax: u64 = parts.next()?.parse().ok()?;
    let xip = parts.next()?;
    let in_progress = if xip.is_empty() {
        Vec::new()
    } else {
        xip.split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?
    };
    Some((xmax, in_progress))
}

/// Whether the 32-bit `xid` of a committed transaction is visible in a snapshot with `xmax`
/// (a 64-bit full id) and `in_progress`: it is before `xmax` and not in progress. The full
/// id is taken as the one within 2^31 before `xmax`.
fn visible(xid: u32, xmax: u64, in_progress: &[u64]) -> bool {
    #[allow(clippy::cast_possible_truncation)] // the low 32 bits are the point
    let back = (xmax as u32).wrapping_sub(xid);
    if back == 0 || back > u32::MAX / 2 {
        return false; // at or after xmax: not yet visible
    }
    match xmax.checked_sub(u64::from(back)) {
        Some(full) => !in_progress.contains(&full),
        None => false,
    }
}

/// Runs a handler future, turning a panic into an error so that it goes through the retry
/// policy instead of taking the service down.
pub(super) async fn guarded(mut future: HandlerFuture<'_>) -> anyhow::Result<()> {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".to_owned());
                Poll::Ready(Err(anyhow::anyhow!("handler panicked: {message}")))
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each event it handles in `applied`, in its transaction.
    struct Apply;

    impl super::super::Operator for Apply {
        fn name(&self) -> &str {
            "apply"
        }

        fn subscriptions(&self) -> Vec<super::super::Subscription> {
            Vec::new()
        }

        async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
            sqlx::query("INSERT INTO applied VALUES ($1)")
                .bind(i64::try_from(event.ordinal)?)
                .execute(ctx.db()?)
                .await?;
            Ok(())
        }
    }

    fn event(ordinal: u64) -> Arc<Event> {
        let record = serde_json::json!({});
        let kind = crate::event::EventType::Insert;
        Arc::new(crate::testing::event(
            kind,
            "t",
            record,
            serde_json::Value::Null,
            ordinal,
        ))
    }

    /// A task running [`Apply`] on `pool` for slot `s`, with nothing done yet.
    fn apply_runner(pool: &PgPool, batch_size: usize) -> Runner {
        Runner {
            index: 0,
            operator: Arc::new(Apply),
            pool: pool.clone(),
            slot: "s".into(),
            retry: RetryConfig::default(),
            batch_size,
            one_per_transaction: batch_size == 1,
            checkpoint: None,
            skip: None,
            board: Arc::new(Board::new(vec!["apply".into()], Lsn(0))),
            shutdown: CancellationToken::new(),
            reported: None,
            clock: Arc::default(),
            unfolded_through: None,
            received: None,
        }
    }

    /// Under a steady stream of one-event transactions, batches end after an event (at the
    /// batch size) and the next input is that transaction's marker. A declarative operator
    /// that falls behind must still fold what is waiting: the marker is passed on and the
    /// event after it starts a window.
    #[tokio::test]
    async fn one_event_transactions_are_folded_once_the_operator_is_behind() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        status::migrate(&pool).await?;
        sqlx::query("CREATE TABLE recomputes (id bigint)")
            .execute(&pool)
            .await?;
        let operator = crate::operator::SqlOperator::builder("count")
            .query("INSERT INTO recomputes VALUES ($1)")
            .id("t", "id")
            .build()?;
        let runner = Runner {
            operator: Arc::new(operator),
            board: Arc::new(Board::new(vec!["count".into()], Lsn(0))),
            ..apply_runner(&pool, 2)
        };
        let board = runner.board.clone();
        let (tx, rx) = mpsc::channel(1024);
        let now = crate::replication::StreamStats::default().server_now();
        // 200 transactions of one event each, on 5 ids: the first 2 just committed (the
        // operator is not behind: a batch), the others long ago.
        for n in 0..200u64 {
            let mut event = crate::testing::event(
                crate::event::EventType::Insert,
                "t",
                serde_json::json!({"id": n % 5}),
                serde_json::Value::Null,
                0,
            );
            event.commit_lsn = Lsn(0x100 + n);
            event.lsn = event.commit_lsn;
            event.timestamp = if n < 2 { now } else { 0 };
            tx.send(Input::Event(Arc::new(event))).await?;
            tx.send(Input::Commit {
                end_lsn: Lsn(0x100 + n),
            })
            .await?;
        }
        drop(tx);
        assert_eq!(runner.run(rx).await, RunnerExit::Drained);
        assert_eq!(board.done(0), Lsn(0x100 + 199));
        let recomputes: i64 = sqlx::query_scalar("SELECT count(*) FROM recomputes")
            .fetch_one(&pool)
            .await?;
        // The first batch recomputes ids 0 and 1; one window then recomputes the 5 ids once.
        // Unfolded: 2 per batch of 2 events, 200.
        assert_eq!(recomputes, 7);
        Ok(())
    }

    /// The stream reconnected inside a transaction and sent it again from its start while
    /// the first copy was still waiting in the inbox: each event is applied once, in a batch
    /// and one by one alike.
    #[tokio::test]
    async fn a_transaction_sent_again_after_a_reconnection_is_applied_once() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        status::migrate(&pool).await?;
        sqlx::query("CREATE TABLE applied (ordinal bigint)")
            .execute(&pool)
            .await?;
        for batch_size in [500, 1] {
            sqlx::query("TRUNCATE applied").execute(&pool).await?;
            sqlx::query("DELETE FROM streamex.operator_checkpoints")
                .execute(&pool)
                .await?;
            let runner = apply_runner(&pool, batch_size);
            let (tx, rx) = mpsc::channel(16);
            // Events 0 to 2, the reconnection, then the whole transaction again.
            for ordinal in [0, 1, 2, 0, 1, 2, 3] {
                tx.send(Input::Event(event(ordinal))).await?;
            }
            tx.send(Input::Commit {
                end_lsn: Lsn(0x200),
            })
            .await?;
            drop(tx);
            assert_eq!(runner.run(rx).await, RunnerExit::Drained);
            let applied: Vec<i64> =
                sqlx::query_scalar("SELECT ordinal FROM applied ORDER BY ordinal")
                    .fetch_all(&pool)
                    .await?;
            assert_eq!(applied, [0, 1, 2, 3], "batch size {batch_size}");
            let stored = status::load_checkpoint(&pool, "s", "apply").await?;
            assert_eq!(stored, Some(Position::new(Lsn(0x100), 3)));
        }
        Ok(())
    }

    /// A task whose checkpoint is behind the stored one (another instance's last transaction,
    /// or its own commit whose reply was lost, applied some of its events) applies only the
    /// events after the stored checkpoint, in a batch and one by one alike.
    #[tokio::test]
    async fn events_applied_behind_the_task_s_back_are_not_applied_again() -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        status::migrate(&pool).await?;
        sqlx::query("CREATE TABLE applied (ordinal bigint)")
            .execute(&pool)
            .await?;
        for batch_size in [500, 1] {
            sqlx::query("TRUNCATE applied").execute(&pool).await?;
            sqlx::query("DELETE FROM streamex.operator_checkpoints")
                .execute(&pool)
                .await?;
            // This task has done events 0 and 1; the database says 0 to 3 are done.
            status::store_checkpoint(&pool, "s", "apply", Lsn(0x100), 3).await?;
            let runner = Runner {
                checkpoint: Some(Position::new(Lsn(0x100), 1)),
                ..apply_runner(&pool, batch_size)
            };
            let (tx, rx) = mpsc::channel(16);
            for ordinal in 2..6 {
                tx.send(Input::Event(event(ordinal))).await?;
            }
            tx.send(Input::Commit {
                end_lsn: Lsn(0x200),
            })
            .await?;
            drop(tx);
            assert_eq!(runner.run(rx).await, RunnerExit::Drained);
            let applied: Vec<i64> = sqlx::query_scalar("SELECT ordinal FROM applied ORDER BY 1")
                .fetch_all(&pool)
                .await?;
            assert_eq!(applied, [4, 5], "batch size {batch_size}");
            let stored = status::load_checkpoint(&pool, "s", "apply").await?;
            assert_eq!(stored, Some(Position::new(Lsn(0x100), 5)));
        }
        Ok(())
    }

    /// A task whose checkpoint is ahead of the stored one (the database lost its last
    /// commits: a failover to a standby that had not received them) applies nothing more and
    /// stops, asking for the pipeline to start again from the slot, in a batch and one by one
    /// alike: the events after the stored checkpoint must come again, and applying the later
    /// ones first would leave them out for good.
    #[tokio::test]
    async fn a_database_that_lost_the_task_s_commits_sends_it_back_to_the_slot()
    -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        status::migrate(&pool).await?;
        sqlx::query("CREATE TABLE applied (ordinal bigint)")
            .execute(&pool)
            .await?;
        for batch_size in [500, 1] {
            sqlx::query("TRUNCATE applied").execute(&pool).await?;
            sqlx::query("DELETE FROM streamex.operator_checkpoints")
                .execute(&pool)
                .await?;
            // This task committed events 0 to 3; the database has only 0 and 1.
            status::store_checkpoint(&pool, "s", "apply", Lsn(0x100), 1).await?;
            let runner = Runner {
                checkpoint: Some(Position::new(Lsn(0x100), 3)),
                ..apply_runner(&pool, batch_size)
            };
            let board = runner.board.clone();
            let (tx, rx) = mpsc::channel(16);
            for ordinal in 4..6 {
                tx.send(Input::Event(event(ordinal))).await?;
            }
            tx.send(Input::Commit {
                end_lsn: Lsn(0x200),
            })
            .await?;
            drop(tx);
            let exit = tokio::time::timeout(std::time::Duration::from_secs(30), runner.run(rx))
                .await
                .map_err(|_| anyhow::anyhow!("batch size {batch_size}: the task did not stop"))?;
            assert_eq!(exit, RunnerExit::Rewound, "batch size {batch_size}");
            let (name, why) = board.replay_wanted().await;
            assert_eq!((name.as_str(), why), ("apply", Restart::Rewound));
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
                .fetch_one(&pool)
                .await?;
            assert_eq!(applied, 0, "batch size {batch_size}");
            let stored = status::load_checkpoint(&pool, "s", "apply").await?;
            assert_eq!(stored, Some(Position::new(Lsn(0x100), 1)));
        }
        Ok(())
    }

    /// A change that could not be decoded never reaches the handler: under `dead_letter` it
    /// is stored and the events around it are applied; under `halt` the operator halts on it.
    #[tokio::test]
    async fn an_undecodable_change_goes_to_the_failure_policy_without_the_handler()
    -> anyhow::Result<()> {
        let url = crate::testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        status::migrate(&pool).await?;
        sqlx::query("CREATE TABLE applied (ordinal bigint)")
            .execute(&pool)
            .await?;
        for policy in [FailurePolicy::DeadLetter, FailurePolicy::Halt] {
            sqlx::raw_sql(
                "TRUNCATE applied; DELETE FROM streamex.operator_checkpoints;
                 DELETE FROM streamex.dead_letters; DELETE FROM streamex.operator_state;",
            )
            .execute(&pool)
            .await?;
            let runner = Runner {
                retry: RetryConfig {
                    on_failure: policy,
                    ..RetryConfig::default()
                },
                ..apply_runner(&pool, 500)
            };
            let (tx, rx) = mpsc::channel(16);
            for ordinal in 0..3 {
                let mut e = (*event(ordinal)).clone();
                if ordinal == 1 {
                    e.decode_error = Some("column public.t.j at 0/100: too deep".into());
                }
                tx.send(Input::Event(Arc::new(e))).await?;
            }
            tx.send(Input::Commit {
                end_lsn: Lsn(0x200),
            })
            .await?;
            drop(tx);
            let exit = runner.run(rx).await;
            let applied: Vec<i64> = sqlx::query_scalar("SELECT ordinal FROM applied ORDER BY 1")
                .fetch_all(&pool)
                .await?;
            let dead: Vec<i64> = sqlx::query_scalar("SELECT ordinal FROM streamex.dead_letters")
                .fetch_all(&pool)
                .await?;
            match policy {
                FailurePolicy::DeadLetter => {
                    assert_eq!(exit, RunnerExit::Drained);
                    assert_eq!(applied, [0, 2]);
                    assert_eq!(dead, [1]);
                }
                FailurePolicy::Halt => {
                    assert_eq!(exit, RunnerExit::Halted);
                    assert_eq!(applied, [0]);
                    assert!(dead.is_empty());
                    let error: String = sqlx::query_scalar(
                        "SELECT last_error FROM streamex.operator_state WHERE state = 'halted'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    assert!(error.contains("could not be decoded"), "{error}");
                }
            }
        }
        Ok(())
    }

    /// Records the ordinals of each call, `handle_batch` or `handle`, outside the database;
    /// fails the first try of the event with ordinal `fail_once`.
    struct Batches {
        limit: usize,
        fail_once: u64,
        failed: std::sync::atomic::AtomicBool,
        calls: std::sync::Mutex<Vec<(&'static str, Vec<u64>)>>,
    }

    impl Batches {
        fn call(&self, how: &'static str, events: &[&Event]) -> anyhow::Result<()> {
            let ordinals = events.iter().map(|e| e.ordinal).collect();
            self.calls.lock().unwrap().push((how, ordinals));
            let fails = events.iter().any(|e| e.ordinal == self.fail_once);
            if fails && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                anyhow::bail!("refused once");
            }
            Ok(())
        }
    }

    impl super::super::Operator for Batches {
        fn name(&self) -> &str {
            "batches"
        }

        fn subscriptions(&self) -> Vec<super::super::Subscription> {
            Vec::new()
        }

        fn delivery(&self) -> Delivery {
            Delivery::AtLeastOnce
        }

        fn at_least_once_batch(&self) -> usize {
            self.limit
        }

        async fn handle(&self, event: &Event, _: &mut Context<'_>) -> anyhow::Result<()> {
            self.call("one", &[event])
        }

        async fn handle_batch(
            &self,
            events: &[Arc<Event>],
            _: &mut Context<'_>,
        ) -> anyhow::Result<()> {
            let events: Vec<&Event> = events.iter().map(|e| &**e).collect();
            self.call("batch", &events)
        }
    }

    /// An operator that delivers at least once gets batches of at most what it asks for;
    /// a failed batch is handled again one by one, from its first event; one that asks for
    /// none gets every event alone.
    #[tokio::test]
    async fn at_least_once_batches_are_as_large_as_asked_and_fall_back_one_by_one() {
        for (limit, expected) in [
            (
                3,
                vec![
                    ("batch", vec![0, 1, 2]),
                    ("batch", vec![3, 4, 5]),
                    ("one", vec![3]),
                    ("one", vec![4]),
                    ("one", vec![5]),
                    ("one", vec![6]),
                ],
            ),
            (
                1,
                vec![
                    ("one", vec![0]),
                    ("one", vec![1]),
                    ("one", vec![2]),
                    ("one", vec![3]),
                    ("one", vec![4]),
                    ("one", vec![4]),
                    ("one", vec![5]),
                    ("one", vec![6]),
                ],
            ),
        ] {
            let operator = Arc::new(Batches {
                limit,
                fail_once: 4,
                failed: Default::default(),
                calls: Default::default(),
            });
            // Nothing here touches the database: the events succeed by their second try.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://127.0.0.1:1/unused")
                .unwrap();
            let runner = Runner {
                operator: operator.clone(),
                retry: RetryConfig {
                    initial: std::time::Duration::from_millis(1),
                    max: std::time::Duration::from_millis(1),
                    ..RetryConfig::default()
                },
                ..apply_runner(&pool, 500)
            };
            let (tx, rx) = mpsc::channel(16);
            for ordinal in 0..7 {
                tx.send(Input::Event(event(ordinal))).await.unwrap();
            }
            tx.send(Input::Commit {
                end_lsn: Lsn(0x200),
            })
            .await
            .unwrap();
            drop(tx);
            assert_eq!(runner.run(rx).await, RunnerExit::Drained);
            let calls = operator.calls.lock().unwrap().clone();
            assert_eq!(calls, expected, "at_least_once_batch {limit}");
        }
    }

    #[test]
    fn visibility_follows_the_snapshot() {
        let (xmax, xip) = parse_snapshot("4294967290:4294967300:4294967295,4294967298").unwrap();
        assert_eq!(xmax, 4_294_967_300);
        // 4294967299 is 3 in the next epoch: before xmax and not in progress.
        assert!(visible(3, xmax, &xip));
        // 4294967298 is 2 in the next epoch, still in progress.
        assert!(!visible(2, xmax, &xip));
        // 4294967295 (u32::MAX, previous epoch) in progress; 4294967294 not.
        assert!(!visible(u32::MAX, xmax, &xip));
        assert!(visible(u32::MAX - 1, xmax, &xip));
        // xmax itself and later are not visible yet.
        assert!(!visible(4, xmax, &xip));
        assert!(!visible(10, xmax, &xip));
        assert_eq!(parse_snapshot("10:12:"), Some((12, vec![])));
        assert_eq!(parse_snapshot("garbage"), None);
    }

    #[tokio::test]
    async fn a_panicking_handler_becomes_an_error() {
        let future: HandlerFuture<'static> = Box::pin(async { panic!("boom") });
        let error = guarded(future).await.unwrap_err();
        assert!(error.to_string().contains("boom"), "{error}");
        let future: HandlerFuture<'static> = Box::pin(async { Ok(()) });
        assert!(guarded(future).await.is_ok());
    }
}
