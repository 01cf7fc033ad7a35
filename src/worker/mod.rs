//! Workers: operators run on other machines, fed from the JetStream stream that `streamex
//! run` publishes to (`[nats]`) instead of from the replication slot.
//!
//! ```text
//!  streamex run ([nats]) ──► JetStream stream (every event, once, in WAL order)
//!                                 │ a durable pull consumer per operator (consumer.rs)
//!  Worker::builder()              ▼
//!    .config(..).build().await ─► per operator (task.rs): lock ─► consumer ─► runner (the
//!                                 engine's own: batches, checkpoint, retries, halt, dead
//!                                 letters) ─► acknowledgement of what is durably done
//!                                 └─► streamex.worker_progress (progress.rs) ─► streamex.processed
//! ```
//!
//! # Guarantees
//!
//! - Each operator gets its events in WAL order (stream order), one batch in flight.
//! - [`Delivery::ExactlyOnce`](crate::operator::Delivery::ExactlyOnce): the operator's
//!   writes commit with its checkpoint, the event's position, keyed by (`slot`, operator) as
//!   under `streamex run`; a message delivered again (after a crash, an outage, a lost
//!   acknowledgement) whose position the checkpoint covers is skipped. So an operator moved
//!   from `run` to a worker keeps its checkpoint and goes on after it.
//! - [`Delivery::AtLeastOnce`](crate::operator::Delivery::AtLeastOnce): the events after
//!   the last acknowledged message come again after a crash.
//! - A message is acknowledged to JetStream only once the operator is durably done with it
//!   and every message before it (handled, set aside as a dead letter, or not its own).
//! - A JetStream or PostgreSQL outage pauses the operator; it goes on by itself.
//! - One worker per operator is active (`lock.rs`); another one with the same operator
//!   stands by.
//!
//! With `[http] listen` it serves `/healthz`, `/readyz` and `/metrics` (`http.rs`,
//! `metrics.rs`).
//!
//! A worker needs `[nats]` and `database_url`: it migrates the `streamex` schema (where
//! checkpoints, operator state and dead letters are) but creates no slot or publication.
//!
//! An operator's first run (no checkpoint) starts with a backfill when it and its
//! `[[operators]]` entry say so, as under `streamex run` (`crate::operator::backfill`): the
//! rows that exist, read under a snapshot exported by a temporary replication slot (so the
//! worker's database role needs `REPLICATION`), then the stream's events after the
//! snapshot's point. A partitioned operator backfills whole, in the task of its partition 0,
//! while its other partitions wait; they take over from the backfill's checkpoint.

mod consumer;
mod held;
mod http;
mod lock;
mod message;
mod metrics;
mod progress;
mod share;
pub(crate) use share::split_partition;
mod task;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::jetstream::JetStreamError;
use crate::operator::{AnyOperator, OperatorSpec, Registry};
use crate::replication::ConnectParams;

/// Why a worker could not be built, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration does not hold together for a worker (no `[nats]`, no operator, an
    /// operator's entry).
    #[error("{0}")]
    Config(String),
    /// The database could not be reached, or refused the connection for good.
    #[error(transparent)]
    Connect(anyhow::Error),
    /// Migrating the `streamex` schema or an operator's check failed.
    #[error(transparent)]
    Setup(anyhow::Error),
    /// JetStream refused the worker for good (the stream is missing, its last message is not
    /// streamex's).
    #[error(transparent)]
    JetStream(#[from] JetStreamError),
    /// Shutdown came before the worker was ready.
    #[error("shut down before the worker was ready")]
    Shutdown,
    /// The running worker stopped on a definite failure.
    #[error(transparent)]
    Failed(anyhow::Error),
}

impl From<crate::ServiceError> for WorkerError {
    fn from(error: crate::ServiceError) -> Self {
        match error {
            crate::ServiceError::Config(message) => WorkerError::Config(message),
            crate::ServiceError::Connect(e) => WorkerError::Connect(e),
            crate::ServiceError::Setup(e) => WorkerError::Setup(e),
            crate::ServiceError::Shutdown => WorkerError::Shutdown,
            other => WorkerError::Failed(other.into()),
        }
    }
}

/// Builds a [`Worker`]; start with [`Worker::builder`]. As [`crate::ServiceBuilder`], with
/// the configuration's `[[operators]]` built from the registry.
pub struct WorkerBuilder {
    config: Option<Config>,
    registry: Registry,
    operators: Vec<AnyOperator>,
    configured_operators: bool,
    backfill: Option<bool>,
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        WorkerBuilder {
            config: None,
            registry: Registry::new(),
            operators: Vec::new(),
            configured_operators: true,
            backfill: None,
        }
    }
}

impl WorkerBuilder {
    /// The configuration: it needs `[nats]` (the stream `streamex run` publishes to) and
    /// `database_url` (where the operators write, and their checkpoints are). The operators
    /// its `[[operators]]` name are built with the [`registry`](Self::registry); each entry's
    /// `retry` and `one_event_per_transaction` also apply to an operator of that name given
    /// with [`operator`](Self::operator). `slot` keys the operators' checkpoints, state and
    /// dead letters: give the slot of the `run` whose stream this is.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The Rust operators a configuration may name.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Runs `operator` too (besides those the configuration names).
    pub fn operator(mut self, operator: impl Into<AnyOperator>) -> Self {
        self.operators.push(operator.into());
        self
    }

    /// Runs each of `operators` too.
    pub fn operators(mut self, operators: impl IntoIterator<Item = AnyOperator>) -> Self {
        self.operators.extend(operators);
        self
    }

    /// Whether the configuration's `[[operators]]` are built and run (the default). With
    /// `false`, only the operators given with [`operator`](Self::operator) run.
    pub fn configured_operators(mut self, build: bool) -> Self {
        self.configured_operators = build;
        self
    }

    /// Whether the operators' first run (no checkpoint yet) starts with a backfill of the
    /// rows that exist, for every operator, whatever the operators and `[[operators]]
    /// backfill` say; as [`ServiceBuilder::backfill`](crate::ServiceBuilder::backfill).
    pub fn backfill(mut self, backfill: bool) -> Self {
        self.backfill = Some(backfill);
        self
    }

    /// Connects to the database (retrying while it is unreachable), migrates the `streamex`
    /// schema, checks every operator ([`Operator::check`](crate::operator::Operator::check)),
    /// connects to NATS and checks that the stream exists (waiting while JetStream does not
    /// answer). Creates no slot, publication or stream.
    pub async fn build(self) -> Result<Worker, WorkerError> {
        self.build_until(CancellationToken::new()).await
    }

    /// [`build`](Self::build), giving up when `shutdown` is cancelled.
    pub(crate) async fn build_until(
        self,
        shutdown: CancellationToken,
    ) -> Result<Worker, WorkerError> {
        let config = self.config.ok_or_else(|| {
            WorkerError::Config("no configuration: give one with .config(..)".into())
        })?;
        let nats = config.nats.clone().ok_or_else(|| {
            WorkerError::Config(
                "a worker reads its events from JetStream, and this configuration has no [nats] \
                 section: give it the [nats] section of the `streamex run` that publishes them \
                 (at least nats.url, and nats.stream and nats.subject_prefix when they are not \
                 the defaults)"
                    .into(),
            )
        })?;
        let mut operators = if self.configured_operators {
            self.registry
                .build(&config.operators)
                .map_err(|e| WorkerError::Config(e.to_string()))?
        } else {
            Vec::new()
        };
        operators.extend(self.operators);
        if operators.is_empty() {
            return Err(WorkerError::Config(
                "a worker with no operator has nothing to do: name them with [[operators]] \
                 entries (or give them with .operator(..))"
                    .into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut filters = Vec::new();
        for operator in &operators {
            if !names.insert(operator.name().to_owned()) {
                return Err(WorkerError::Config(format!(
                    "two operators are named {:?}: the name is the key of an operator's \
                     checkpoint, so it must be unique",
                    operator.name()
                )));
            }
            let partitions = config
                .operators
                .iter()
                .find(|c| c.name == operator.name())
                .and_then(|c| c.partitions)
                .unwrap_or(1);
            if !(1..=share::MAX_PARTITIONS).contains(&partitions) {
                return Err(WorkerError::Config(format!(
                    "operator {:?}: partitions = {partitions} is out of range: give 1 (the \
                     operator runs whole) to {}",
                    operator.name(),
                    share::MAX_PARTITIONS
                )));
            }
            if partitions > 1 && operator.0.as_sql().is_some() {
                return Err(WorkerError::Config(format!(
                    "operator {:?}: partitions = {partitions}, but it is declarative: it \
                     recomputes an id from the tables, and two partitions recomputing the same \
                     id at once could leave the older result; it runs whole (leave partitions \
                     out), or write it as an incremental Rust operator",
                    operator.name()
                )));
            }
            let filter = consumer::filter_subject(
                &nats.subject_prefix,
                &config.default_schema,
                &operator.subscriptions(),
                nats.partitions,
            )
            .map_err(|e| WorkerError::Config(format!("operator {}: {e}", operator.name())))?;
            filters.push(filter);
        }
        let params = ConnectParams::parse(&config.database_url)
            .map_err(|e| WorkerError::Config(format!("database_url: {e}")))?;
        let pool = crate::service::connect(&params, 8, Some(config.lock.lease), &shutdown).await?;
        crate::status::migrate(&pool)
            .await
            .map_err(|e| WorkerError::Setup(e.into()))?;
        crate::service::check_operators(&pool, &operators)
            .await
            .map_err(WorkerError::Setup)?;
        let source = format!("{}/{}", params.dbname, config.slot);
        let context = connect_stream(&nats, &source, &shutdown).await?;
        let slot: Arc<str> = config.slot.as_str().into();
        let mut specs = Vec::new();
        for (operator, filter) in operators.into_iter().zip(filters) {
            let entry = config.operators.iter().find(|c| c.name == operator.name());
            let backfill = self
                .backfill
                .or_else(|| entry.and_then(|c| c.backfill))
                .unwrap_or_else(|| operator.0.backfill());
            let spec = |operator| OperatorSpec {
                retry: entry.and_then(|c| c.retry).unwrap_or(config.retry),
                one_per_transaction: entry.is_some_and(|c| c.one_event_per_transaction),
                backfill,
                // A worker shares the operator's partitions itself (`share.rs`).
                partitions: 1,
                operator,
            };
            let partitions = entry.and_then(|c| c.partitions).unwrap_or(1);
            if partitions == 1 {
                specs.push((spec(operator), filter, None));
                continue;
            }
            let whole = operator.name().to_owned();
            let names: Vec<String> = (0..partitions)
                .map(|p| share::partition_name(&whole, p, partitions))
                .collect();
            let shared = Arc::new(share::Share::new(partitions));
            for (index, name) in (0..partitions).zip(&names) {
                let part = AnyOperator(Arc::new(share::PartitionOf {
                    inner: operator.0.clone(),
                    name: name.clone(),
                }));
                specs.push((
                    spec(part),
                    filter.clone(),
                    Some(PartitionSpec {
                        index,
                        share: shared.clone(),
                        whole: whole.clone(),
                        names: names.clone(),
                        operator: operator.0.clone(),
                    }),
                ));
            }
        }
        Ok(Worker {
            config,
            nats,
            params: Arc::new(params),
            pool,
            context,
            slot,
            specs,
        })
    }
}

/// Connects to NATS and checks that the stream exists and holds the events of `source`
/// (`<database>/<slot>` of the configuration: the key of the operators' checkpoints),
/// waiting while JetStream does not answer; a missing stream, or one of another database or
/// slot, is an error naming it and the fix.
async fn connect_stream(
    nats: &crate::config::NatsConfig,
    source: &str,
    shutdown: &CancellationToken,
) -> Result<async_nats::jetstream::Context, WorkerError> {
    use crate::jetstream;
    let client = jetstream::connect(nats).await?;
    let context = jetstream::context(client, nats);
    let mut backoff = jetstream::RETRY;
    loop {
        let checked = match jetstream::tip(&context, &nats.stream, Some(source)).await {
            // Its last message's position is the publisher's business, not the worker's.
            Ok(_) | Err(JetStreamError::Foreign { .. }) => Ok(()),
            Err(JetStreamError::OtherSource { theirs, ours, .. }) => {
                return Err(WorkerError::Config(format!(
                    "JetStream stream {:?} holds the events of {theirs} (database/slot), and \
                     this worker's configuration is for {ours}: its operators' checkpoints are \
                     keyed by the slot, and would not be the ones of the events they get. Give \
                     the worker the database_url and slot of the `streamex run` that publishes \
                     to nats.stream",
                    nats.stream
                )));
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => return Ok(context),
            Err(e) if e.is_transient() => {
                let wait = backoff.next().unwrap_or(backoff.max);
                tracing::warn!(
                    url = %nats.url, stream = %nats.stream, error = %e,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "JetStream does not answer (nats.url); retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Err(WorkerError::Shutdown),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A built worker, ready to [`run`](Worker::run).
///
/// ```no_run
/// use streamex::Worker;
/// use streamex::config::Config;
///
/// # async fn example() -> anyhow::Result<()> {
/// let worker = Worker::builder()
///     .config(Config::load("worker.toml".as_ref())?) // [nats], database_url, [[operators]]
///     .registry(streamex::operators::registry())
///     .build()
///     .await?;
/// worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(())
/// # }
/// ```
pub struct Worker {
    config: Config,
    nats: crate::config::NatsConfig,
    /// For a backfill's temporary replication slot.
    params: Arc<ConnectParams>,
    pool: sqlx::PgPool,
    context: async_nats::jetstream::Context,
    slot: Arc<str>,
    /// Each operator (each partition of a partitioned one), with the subject its consumer
    /// filters on and, for a partition, which.
    specs: Vec<(OperatorSpec, String, Option<PartitionSpec>)>,
}

/// A partition of an operator whose `[[operators]]` entry sets `partitions` above 1.
#[derive(Clone)]
struct PartitionSpec {
    index: u32,
    share: Arc<share::Share>,
    whole: String,
    names: Vec<String>,
    /// The whole operator, which partition 0 backfills.
    operator: Arc<dyn crate::operator::DynOperator>,
}

impl Worker {
    /// A builder.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Its operators' names, each with what its JetStream consumers are named from: each
    /// session of the operator makes a consumer of that name followed by `-s` and 16
    /// hexadecimal digits, and deletes the operator's others.
    pub fn consumers(&self) -> Vec<(String, String)> {
        self.specs
            .iter()
            .map(|(spec, _, _)| {
                let name = spec.operator.name();
                (name.to_owned(), consumer::consumer_name(&self.slot, name))
            })
            .collect()
    }

    /// Runs every operator until `shutdown` completes: then each finishes what it was given,
    /// acknowledges what it has durably done, and `run` returns `Ok`. An outage of JetStream
    /// or of the database pauses the operators; an error only for what waiting cannot mend
    /// (the stream is gone).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), WorkerError> {
        let token = CancellationToken::new();
        let cancel = token.clone();
        let watcher = async move {
            shutdown.await;
            cancel.cancel();
        };
        let run = self.run_until(token.clone());
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => result,
            () = watcher => run.await,
        }
    }

    /// [`run`](Self::run) until `shutdown` is cancelled.
    pub(crate) async fn run_until(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        // One operator failing for good stops the others.
        let stop = shutdown.child_token();
        let metrics = Arc::new(metrics::WorkerMetrics::new());
        let server = http::serve(
            &self.config.http,
            http::WorkerEndpoint {
                metrics: metrics.clone(),
                pool: self.pool.clone(),
                client: self.context.client(),
                nats_url: self.nats.url.clone(),
            },
            stop.clone(),
        )
        .await
        .map_err(WorkerError::Failed)?;
        let mut tasks = tokio::task::JoinSet::new();
        // Each partitioned operator's presence among the workers sharing it.
        let mut presences = Vec::new();
        let mut counted = std::collections::BTreeSet::new();
        for (_, _, partition) in &self.specs {
            if let Some(p) = partition
                && counted.insert(p.whole.clone())
            {
                presences.push(tokio::spawn(p.share.clone().presence(
                    self.pool.clone(),
                    self.slot.clone(),
                    p.whole.clone(),
                    self.config.lock.lease,
                    stop.clone(),
                )));
            }
        }
        for (spec, filter, partition) in self.specs {
            let name = spec.operator.name().to_owned();
            let consumer = consumer::consumer_name(&self.slot, &name);
            let progress = progress::Progress::new(
                self.pool.clone(),
                self.slot.clone(),
                &name,
                &self.nats.stream,
                &spec.operator.subscriptions(),
                &self.config.default_schema,
                &self.config.process_status.timestamp_field,
            );
            info!(
                operator = %name, stream = %self.nats.stream, consumer = %consumer,
                filter = %filter, "running the operator from JetStream"
            );
            let task = task::OperatorTask {
                spec,
                pool: self.pool.clone(),
                params: self.params.clone(),
                backfill_readers: self.config.replication.backfill_readers,
                slot: self.slot.clone(),
                nats: self.nats.clone(),
                worker: self.config.worker.clone(),
                lease: self.config.lock.lease,
                context: self.context.clone(),
                consumer,
                filter,
                batch_size: self.config.replication.batch_size,
                default_schema: self.config.default_schema.clone(),
                progress,
                metrics: metrics.operator(&name),
                partition: partition.map(|p| task::Partition {
                    index: p.index,
                    share: p.share,
                    whole: p.whole,
                    names: p.names,
                    operator: p.operator,
                }),
                shutdown: stop.clone(),
            };
            tasks.spawn(task.run());
        }
        let mut failure = None;
        while let Some(ended) = tasks.join_next().await {
            let result = ended
                .map_err(|e| WorkerError::Failed(anyhow::anyhow!("an operator's task failed: {e}")))
                .and_then(|r| r);
            if let Err(e) = result {
                stop.cancel();
                failure.get_or_insert(e);
            }
        }
        stop.cancel();
        for presence in presences {
            let _ = presence.await;
        }
        if let Some(server) = server {
            // A client that keeps its connection open is not waited for long.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        }
        match failure {
            Some(e) => Err(e),
            None => {
                info!("worker stopped cleanly");
                Ok(())
            }
        }
    }
}
