//! An operator's first run on a worker: its backfill, as under `streamex run`
//! (`crate::operator::backfill`, which does the reading and says why the result is exact).
//!
//! ```text
//!  lock taken, no checkpoint of the operator (whole, or any partition of any count), backfill on
//!    ├─ whole, or partition 0 of a partitioned operator:
//!    │     the publishing slot exists? ─► snapshot at P ─► the rows, the operator's writes and
//!    │     its checkpoint (P - 1, MAX) under the whole operator's name, in one transaction
//!    └─ another partition: waits until a checkpoint of the operator exists
//!  then: the partitions take over from that checkpoint (`prepare_generation`), and the
//!  stream's messages at or before it are passed over by the runner
//! ```
//!
//! # Why the stream gets every event after the snapshot
//!
//! The backfill reads what was committed before `P`; the changes committed at or after `P`
//! must then reach the operator from the stream. The stream is filled from the slot of the
//! `streamex run` that publishes to it, and that slot's confirmed position moves only past
//! what JetStream has acknowledged: a transaction committed at or after `P` is already in
//! the stream (the slot was confirmed past it) or is still in the slot, to be published. So
//! the worker only checks that the slot exists before it takes the snapshot: without it,
//! nothing would publish the later changes. A stream that no longer holds messages after the
//! checkpoint (removed by `max_age` or `max_bytes`) halts the operator when its consumer is
//! made, as it does for any checkpoint.

use std::time::Duration;

use tracing::{error, info, warn};

use super::{OperatorTask, WorkerError};
use crate::lsn::Lsn;
use crate::operator::Board;
use crate::operator::backfill::{Backfills, Job, Outcome};
use crate::status;

/// How long the task waits before it looks again for the publishing slot, or for the
/// checkpoint that partition 0's backfill stores.
const WAIT: Duration = Duration::from_secs(1);

/// What the task does after [`OperatorTask::first_run`].
pub(super) enum FirstRun {
    /// The operator has run, or has just been backfilled: prepare its partitions again (a
    /// checkpoint may have appeared since they were prepared), then go on.
    Started,
    /// Nothing was committed (the backfill failed, or waits for the slot): look at the
    /// lock and the operator's state again, then come back.
    Again,
    Shutdown,
}

impl OperatorTask {
    /// Backfills the operator if it has never run on this slot (no checkpoint under its name
    /// or any of its partitions'), or waits for partition 0's backfill; see the module
    /// documentation. `failures` counts the failed backfills, for the retry policy.
    pub(super) async fn first_run(&self, failures: &mut u32) -> Result<FirstRun, WorkerError> {
        let (whole, _) = self.generation();
        let whole = whole.to_owned();
        let mut announced = false;
        loop {
            let Some(started) = self
                .database("reading the operator's checkpoints", || {
                    status::has_any_checkpoint(&self.pool, &self.slot, &whole)
                })
                .await?
            else {
                return Ok(FirstRun::Shutdown);
            };
            if started {
                return Ok(FirstRun::Started);
            }
            let Some(partition) = self.partition.as_ref().filter(|p| p.index != 0) else {
                break;
            };
            if !announced {
                announced = true;
                info!(
                    operator = self.name(),
                    partition = partition.index,
                    "the operator backfills whole, in the worker that runs its partition 0; this \
                     partition waits for its checkpoint, then takes over from it"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(WAIT) => {}
                () = self.shutdown.cancelled() => return Ok(FirstRun::Shutdown),
            }
        }
        let Some(slot_exists) = self
            .database("looking for the publishing slot", || {
                status::logical_slot_exists(&self.pool, &self.slot)
            })
            .await?
        else {
            return Ok(FirstRun::Shutdown);
        };
        if !slot_exists {
            warn!(
                operator = self.name(), slot = %self.slot,
                "the operator's backfill waits: replication slot {:?} does not exist in this \
                 database, and the changes after the backfill's snapshot come from it, through \
                 the `streamex run` that publishes to the stream. Run `streamex setup` (or \
                 `streamex run`) with this slot",
                self.slot
            );
            return self.pause(WAIT * 5).await;
        }
        let operator = match &self.partition {
            Some(p) => p.operator.clone(),
            None => self.spec.operator.0.clone(),
        };
        let board = Board::new(vec![whole.clone()], Lsn::ZERO);
        let backfills = Backfills {
            pool: &self.pool,
            params: &self.params,
            slot: &self.slot,
            default_schema: &self.default_schema,
            board: &board,
            shutdown: &self.shutdown,
            readers: self.backfill_readers,
        };
        let job = Job {
            index: 0,
            operator,
            retry: self.spec.retry,
            checkpoint: None,
            request: None,
        };
        let outcome = match backfills.run(std::slice::from_ref(&job)).await {
            Ok(mut outcomes) => outcomes.pop().unwrap_or(Outcome::Superseded),
            Err(e) => Outcome::Failed(e),
        };
        if self.shutdown.is_cancelled() {
            return Ok(FirstRun::Shutdown);
        }
        let failure = match outcome {
            Outcome::Done | Outcome::Superseded => {
                *failures = 0;
                return Ok(FirstRun::Started);
            }
            Outcome::Failed(failure) => failure,
        };
        let message = crate::error::chain(&failure);
        let outage = crate::operator::is_database_outage(&failure);
        if !outage {
            *failures += 1;
        }
        let halt = failure.is::<crate::operator::backfill::Halt>();
        if halt || *failures > self.spec.retry.retries {
            let message = format!(
                "the backfill failed every time (rolled back each time; `streamex resume {}` \
                 tries it again): {message}",
                self.name()
            );
            error!(operator = self.name(), attempts = *failures, error = %message, "operator halted");
            *failures = 0;
            self.store_halt(&message).await?;
            return Ok(FirstRun::Again);
        }
        let wait = self.spec.retry.delay((*failures).max(1));
        warn!(
            operator = self.name(), attempt = *failures, retries = self.spec.retry.retries,
            error = %message, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "backfill failed and was rolled back; it starts again from a new snapshot"
        );
        self.pause(wait).await
    }

    async fn pause(&self, wait: Duration) -> Result<FirstRun, WorkerError> {
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(FirstRun::Again),
            () = self.shutdown.cancelled() => Ok(FirstRun::Shutdown),
        }
    }
}
