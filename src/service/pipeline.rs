//! The running service: the instance lock, then the stream feeding the engine, again after a
//! resumed operator or a lost lock, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::lock::InstanceLock;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Phase;
use crate::operator::{Engine, EngineExit, OperatorReport};
use crate::replication::{self, Acknowledger, ConnectParams, StreamConfig, setup};
use crate::status::ProcessStatusStorage;

/// Waits for the instance lock, then streams, until `shutdown`; takes the lock again when it
/// is lost.
pub(super) async fn run_pipeline<S: ProcessStatusStorage + Clone>(
    config: &Config,
    params: ConnectParams,
    pool: PgPool,
    engine: Arc<Engine<S>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let lease = config.lock.lease;
    loop {
        // One active instance per slot: the others wait here as standbys.
        engine.metrics.set_phase(Phase::Standby);
        let Some(mut lock) = InstanceLock::acquire(&pool, &config.slot, lease, &shutdown).await?
        else {
            return Ok(()); // shut down while standing by
        };
        let names: Vec<&str> = engine.operators.iter().map(|o| o.operator.name()).collect();
        if !lock.claim_operators(&config.slot, &names).await? {
            continue; // the lock's connection failed: take the lock again
        }
        engine.metrics.set_phase(Phase::Active);
        // Losing the lock's connection, or its lease running out, means another instance may
        // take over: stop processing at once, then stand by for the lock again.
        let lost = CancellationToken::new();
        let watch = tokio::spawn(lock.watch(lost.clone(), shutdown.clone()));
        let active = {
            let both = shutdown.child_token();
            let (lost, both2) = (lost.clone(), both.clone());
            tokio::spawn(async move {
                lost.cancelled().await;
                both2.cancel();
            });
            both
        };
        let summary = tokio::spawn(log_summaries(engine.reporter()));
        let result = stream_until_shutdown(config, params.clone(), &pool, &engine, &active).await;
        summary.abort();
        watch.abort();
        if shutdown.is_cancelled() || !lost.is_cancelled() {
            return result;
        }
        warn!(
            slot = %config.slot,
            error = %result.err().map(|e| crate::error::chain(&e)).unwrap_or_default(),
            "lost the instance lock (a server restart, the connection was ended, or its lease ran \
             out): stopped processing; taking the lock again, or standing by if another \
             instance has it"
        );
    }
}

/// Logs one line per operator every minute: the person on call sees progress without asking.
async fn log_summaries(report: impl Fn() -> Vec<OperatorReport>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        for r in report() {
            info!(
                operator = %r.name,
                state = r.state.as_str(),
                done_through = %r.done_through,
                events = r.events,
                retries = r.retries,
                dead_letters = r.dead_letters,
                "summary"
            );
        }
    }
}

/// The waits between attempts to read the slot while the database cannot answer: one
/// second each.
const SLOT_RETRY: Backoff = Backoff::new(Duration::from_secs(1), 1.0, Duration::from_secs(1));

async fn stream_until_shutdown<S: ProcessStatusStorage + Clone>(
    config: &Config,
    params: ConnectParams,
    pool: &PgPool,
    engine: &Engine<S>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let mut backoff = SLOT_RETRY;
        let slot = loop {
            match setup::slot_info(pool, &config.slot).await {
                Ok(slot) => break slot,
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    let wait = backoff.next().unwrap_or(backoff.max);
                    warn!(
                        error = %e,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "reading the slot failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let Some(slot) = slot else {
            let missing = setup::explain_missing(pool, &config.slot, &config.publication)
                .await
                .unwrap_or_else(|| setup::SetupError::SlotMissing {
                    slot: config.slot.clone(),
                    database: String::new(),
                });
            return Err(missing.into());
        };
        let start = slot.confirmed_flush_lsn.unwrap_or_default();
        let ack = Acknowledger::starting_at(start);
        let mut stream_config =
            StreamConfig::new(params.clone(), &config.slot, &config.publication);
        stream_config.status_interval = config.replication.status_interval;
        stream_config.reconnect = config.replication.reconnect();
        stream_config.capacity = config.replication.channel_capacity;
        stream_config.stats = engine.metrics.stream.clone();
        stream_config.default_schema = config.default_schema.clone();
        let stop = shutdown.child_token();
        let stream = replication::spawn(stream_config, pool.clone(), ack.clone(), stop.clone());
        let exit = engine
            .run(stream.items, ack.clone(), start, shutdown.clone())
            .await;
        stop.cancel();
        let streamed = stream.task.await.context("the replication task panicked")?;
        if let Err(changed @ replication::StreamError::ServerChanged { .. }) = &streamed {
            // The operators' last commits may be missing on the new server: start again from
            // its slot and the checkpoints it has (the engine loads them), whatever the
            // engine was doing.
            warn!(error = %changed, "restarting the pipeline on the new server");
            continue;
        }
        let exit = match exit {
            // The database went away while the engine started or stored process status: the
            // stream has ended too; start again from the slot once the database answers.
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                warn!(error = %e, "the database failed under the operators; starting again from the slot");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
            exit => exit?,
        };
        match exit {
            EngineExit::Shutdown => {
                streamed?;
                info!(acknowledged = %ack.acknowledged(), "stopped cleanly");
                return Ok(());
            }
            EngineExit::StreamEnded => {
                streamed?;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                bail!("the replication stream ended unexpectedly");
            }
            EngineExit::Resumed(name) => {
                info!(operator = %name, "restarting the pipeline from the slot's position");
            }
            EngineExit::Backfilled(names) => {
                info!(
                    operators = %names.join(", "),
                    "restarting the pipeline from the slot's position: the backfilled operators \
                     get the changes after their snapshot"
                );
            }
            EngineExit::Rewound(name) => {
                warn!(
                    operator = %name,
                    "restarting the pipeline from the slot's position: the database lost \
                     commits of the operator, whose changes come again from the slot"
                );
            }
            EngineExit::Replay(name, through) => {
                info!(
                    operator = %name, %through,
                    "restarting the pipeline from the slot's position: the operator handles \
                     its events through there one by one, unfolded"
                );
            }
        }
    }
}
