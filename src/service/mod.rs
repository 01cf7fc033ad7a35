//! The service: everything `streamex run` does, as a value your own program builds and runs.
//!
//! ```text
//! Service::builder()                 configuration (TOML Config, or in code), operators,
//!   .config(..).operator(..)         process-status backend, pub/sub
//!   .build().await ──► connect (retrying while unreachable), check the server, migrate,
//!                      publication in line with `tables`, slot, operators published
//! service.handle() ──► ServiceHandle: pub/sub, operator reports, metrics, HTTP routes
//! service.run(shutdown).await
//!   └─ instance lock ─► replication stream ─► decoder ─► engine ─► operators ─► status ─► ack
//! ```
//!
//! `run` returns when `shutdown` completes (after finishing what is in flight, storing
//! progress and acknowledging), or with the error that stopped it. Transient failures (a
//! server restart, a lost connection, a lost instance lock) are retried inside; only definite
//! ones (a dropped slot, a missing privilege) end it.
//!
//! ```no_run
//! use streamex::Service;
//! use streamex::config::Config;
//! use streamex::operators::PostCommentTallies;
//!
//! # async fn example() -> anyhow::Result<()> {
//! let config = Config::load("config/streamex.toml".as_ref())?;
//! let service = Service::builder()
//!     .config(config)
//!     .operator(PostCommentTallies)
//!     .build()
//!     .await?;
//! let mut comments = service.handle().pubsub().subscribe("comments", 64);
//! tokio::spawn(async move {
//!     while let Ok(event) = comments.recv().await {
//!         println!("comment {}", event.position());
//!     }
//! });
//! service.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(())
//! # }
//! ```

mod connect;
mod lock;
mod pipeline;
mod prepare;

use std::future::Future;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub(crate) use connect::{connect, connect_once, explain as explain_connect};
pub(crate) use lock::InstanceLock;
pub(crate) use prepare::{check_operators, prepare};

use crate::config::{Config, StatusBackendKind};
use crate::metrics::Metrics;
use crate::operator::{AnyOperator, Engine, OperatorReport, OperatorSpec, Registry};
use crate::pubsub::PubSub;
use crate::replication::ConnectParams;
use crate::status::{MemoryStatus, PostgresStatus, ProcessStatusStorage, StatusBackend};

/// Why the service could not be built, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The configuration does not hold together (a setting, an operator's entry).
    #[error("{0}")]
    Config(String),
    /// The database could not be reached, or refused the connection for good.
    #[error(transparent)]
    Connect(anyhow::Error),
    /// Setting up the schema, the publication or the slot failed, or the server cannot do
    /// logical replication for this role.
    #[error(transparent)]
    Setup(anyhow::Error),
    /// Shutdown came before the service was ready.
    #[error("shut down before the service was ready")]
    Shutdown,
    /// The running service stopped on a definite failure.
    #[error(transparent)]
    Failed(anyhow::Error),
}

/// Makes the process-status backend once the configuration and the pool are known.
type StatusMaker<S> = Box<dyn FnOnce(&Config, &PgPool) -> S + Send>;

/// Builds a [`Service`]; start with [`Service::builder`].
pub struct ServiceBuilder<S = StatusBackend> {
    config: Option<Config>,
    registry: Registry,
    operators: Vec<AnyOperator>,
    status: StatusMaker<S>,
    pubsub: PubSub,
    /// Whether the configuration's `[[operators]]` are built and run (the testing kit runs
    /// the operators it is given, with their entries' options).
    configured_operators: bool,
    /// Whether operators without a checkpoint backfill, whatever they and the configuration
    /// say (unset: they and `[[operators]] backfill` decide).
    backfill: Option<bool>,
}

impl Default for ServiceBuilder {
    fn default() -> Self {
        ServiceBuilder {
            config: None,
            registry: Registry::new(),
            operators: Vec::new(),
            status: Box::new(StatusBackend::from_config),
            pubsub: PubSub::new(),
            configured_operators: true,
            backfill: None,
        }
    }
}

impl<S: ProcessStatusStorage + Clone> ServiceBuilder<S> {
    /// The configuration: a parsed `streamex.toml` ([`Config::load`]) or one made in code
    /// ([`Config::new`]). The operators its `[[operators]]` name are built with the
    /// [`registry`](Self::registry) (declarative ones need none); each entry's `retry` and
    /// `one_event_per_transaction` also apply to an operator of that name given with
    /// [`operator`](Self::operator).
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

    /// The pub/sub the service publishes on (by default a new one; see
    /// [`ServiceHandle::pubsub`]).
    pub fn pubsub(mut self, pubsub: PubSub) -> Self {
        self.pubsub = pubsub;
        self
    }

    /// Where process status is kept, instead of the configured `[process_status] backend`:
    /// [`MemoryStatus`], [`PostgresStatus`], or your own [`ProcessStatusStorage`].
    pub fn status<T: ProcessStatusStorage + Clone>(self, status: T) -> ServiceBuilder<T> {
        ServiceBuilder {
            config: self.config,
            registry: self.registry,
            operators: self.operators,
            status: Box::new(move |_, _| status),
            pubsub: self.pubsub,
            configured_operators: self.configured_operators,
            backfill: self.backfill,
        }
    }

    /// Whether the operators' first run on the slot starts with a backfill of the rows that
    /// exist (see [`Operator::backfill`](crate::operator::Operator::backfill)), for every
    /// operator, whatever the operators and `[[operators]] backfill` say. Unset (the
    /// default), each operator's own choice applies, then its configuration entry's.
    pub fn backfill(mut self, backfill: bool) -> Self {
        self.backfill = Some(backfill);
        self
    }

    /// Whether the configuration's `[[operators]]` are built and run (the default). With
    /// `false`, only the operators given with [`operator`](Self::operator) run, and an entry
    /// of the same name gives one its options (`retry`, `one_event_per_transaction`).
    pub fn configured_operators(mut self, build: bool) -> Self {
        self.configured_operators = build;
        self
    }

    /// Connects (retrying while the server is unreachable), checks the server and the role,
    /// applies the `streamex` schema's migrations, brings the publication in line with the
    /// configuration, creates the slot when it is missing, and checks that every operator
    /// listens to a published table.
    pub async fn build(self) -> Result<Service<S>, ServiceError> {
        self.build_until(CancellationToken::new()).await
    }

    /// [`build`](Self::build), giving up when `shutdown` is cancelled.
    pub(crate) async fn build_until(
        self,
        shutdown: CancellationToken,
    ) -> Result<Service<S>, ServiceError> {
        let config = self.config.ok_or_else(|| {
            ServiceError::Config("no configuration: give one with .config(..)".into())
        })?;
        let mut operators = if self.configured_operators {
            self.registry
                .build(&config.operators)
                .map_err(|e| ServiceError::Config(e.to_string()))?
        } else {
            Vec::new()
        };
        operators.extend(self.operators);
        let mut names = std::collections::BTreeSet::new();
        for operator in &operators {
            if !names.insert(operator.name().to_owned()) {
                return Err(ServiceError::Config(format!(
                    "two operators are named {:?}: the name is the key of an operator's checkpoint, \
                     so it must be unique",
                    operator.name()
                )));
            }
        }
        if let Some(entry) = config.operators.iter().find(|c| {
            c.partitions
                .is_some_and(|p| !(1..=crate::operator::partition::MAX_PARTITIONS).contains(&p))
        }) {
            return Err(ServiceError::Config(format!(
                "operator {:?}: partitions = {} is out of range: give 1 (the operator runs whole) \
                 to {}",
                entry.name,
                entry.partitions.unwrap_or(1),
                crate::operator::partition::MAX_PARTITIONS
            )));
        }
        // Each partition runs its transactions on a connection of its own, beside the
        // process status, the instance lock's checks and a backfill's readers.
        let partitions: u32 = operators
            .iter()
            .map(|o| {
                config
                    .operators
                    .iter()
                    .find(|c| c.name == o.name())
                    .and_then(|c| c.partitions)
                    .unwrap_or(1)
            })
            .sum();
        let pool_size = partitions
            .saturating_add(4)
            .saturating_add(u32::try_from(config.replication.backfill_readers).unwrap_or(0))
            .max(8);
        let params = ConnectParams::parse(&config.database_url)
            .map_err(|e| ServiceError::Config(format!("database_url: {e}")))?;
        if !params.other_hosts.is_empty()
            && params.target_session_attrs == crate::replication::TargetSessionAttrs::Any
        {
            tracing::warn!(
                servers = %params.targets(),
                "database_url names several servers without target_session_attrs: streamex \
                 takes the first that answers, a standby as well; add \
                 ?target_session_attrs=read-write so that it always finds the primary"
            );
        }
        let pool = connect(&params, pool_size, Some(config.lock.lease), &shutdown).await?;
        prepare(&config, &pool).await.map_err(ServiceError::Setup)?;
        prepare::check_published(&config, &pool, &operators)
            .await
            .map_err(ServiceError::Setup)?;
        prepare::check_operators(&pool, &operators)
            .await
            .map_err(ServiceError::Setup)?;
        prepare::check_not_on_workers(&config, &pool, &operators)
            .await
            .map_err(ServiceError::Setup)?;
        let publisher = match &config.nats {
            Some(nats) => {
                let source = format!("{}/{}", params.dbname, config.slot);
                Some(Arc::new(prepare::jetstream(nats, source, &shutdown).await?))
            }
            None => None,
        };
        let status = (self.status)(&config, &pool);
        Ok(Service::assemble(
            config,
            params,
            pool,
            status,
            (self.pubsub, publisher),
            operators,
            self.backfill,
        ))
    }
}

impl StatusBackend {
    /// The backend `[process_status] backend` names, on `pool` for PostgreSQL.
    fn from_config(config: &Config, pool: &PgPool) -> StatusBackend {
        match config.process_status.backend {
            StatusBackendKind::Memory => StatusBackend::Memory(MemoryStatus::new()),
            StatusBackendKind::Postgres => {
                StatusBackend::Postgres(PostgresStatus::new(pool.clone()))
            }
        }
    }
}

/// A built service, ready to [`run`](Service::run).
pub struct Service<S: ProcessStatusStorage = StatusBackend> {
    config: Config,
    params: ConnectParams,
    pool: PgPool,
    engine: Arc<Engine<S>>,
    /// Cancelled when `run` ends: ends the routes' event streams.
    stopped: CancellationToken,
}

impl Service {
    /// A builder, with the process-status backend the configuration names.
    pub fn builder() -> ServiceBuilder {
        ServiceBuilder::default()
    }
}

impl<S: ProcessStatusStorage + Clone> Service<S> {
    fn assemble(
        config: Config,
        params: ConnectParams,
        pool: PgPool,
        status: S,
        (pubsub, publisher): (PubSub, Option<Arc<crate::jetstream::Publisher>>),
        operators: Vec<AnyOperator>,
        backfill: Option<bool>,
    ) -> Self {
        let specs = operators
            .into_iter()
            .map(|operator| {
                let entry = config.operators.iter().find(|c| c.name == operator.name());
                OperatorSpec {
                    retry: entry.and_then(|c| c.retry).unwrap_or(config.retry),
                    one_per_transaction: entry.is_some_and(|c| c.one_event_per_transaction),
                    backfill: backfill
                        .or_else(|| entry.and_then(|c| c.backfill))
                        .unwrap_or_else(|| operator.0.backfill()),
                    partitions: entry.and_then(|c| c.partitions).unwrap_or(1),
                    operator,
                }
            })
            .collect();
        let mut engine = Engine::new(pool.clone(), &config.slot, status, pubsub, specs);
        engine.batch_size = config.replication.batch_size;
        engine.backlog_bytes = config.replication.operator_backlog_bytes;
        engine.backfill_readers = config.replication.backfill_readers;
        engine.params = Some(params.clone());
        engine.default_schema = config.default_schema.clone();
        engine.timestamp_field = config.process_status.timestamp_field.clone();
        if let Some(publisher) = &publisher {
            let _ = engine.metrics.jetstream.set(publisher.stats.clone());
        }
        engine.publisher = publisher;
        for (entity, e) in &config.entities {
            // Checked when the configuration was read.
            engine
                .scopes
                .insert(entity.clone(), e.parsed_scopes().unwrap_or_default());
        }
        Service {
            config,
            params,
            pool,
            engine: Arc::new(engine),
            stopped: CancellationToken::new(),
        }
    }

    /// What the running service offers your own code.
    pub fn handle(&self) -> ServiceHandle<S> {
        ServiceHandle {
            engine: self.engine.clone(),
            pool: self.pool.clone(),
            slot: self.config.slot.clone(),
            publication: self.config.publication.clone(),
            default_schema: self.config.default_schema.clone(),
            http: self.config.http.clone(),
            stopped: self.stopped.clone(),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `shutdown` completes: then it finishes what is in flight, stores progress,
    /// acknowledges, and returns `Ok`. Serves the HTTP endpoint when `[http] listen` is set.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServiceError> {
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
    pub(crate) async fn run_until(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let handle = self.handle();
        let http = match self.config.http.listen {
            Some(addr) => {
                let listener = crate::http::bind(addr)
                    .await
                    .map_err(|e| ServiceError::Config(crate::error::chain(&e)))?;
                let endpoint = handle.endpoint().map_err(ServiceError::Config)?;
                Some(crate::http::spawn(listener, endpoint))
            }
            None => None,
        };
        let result = pipeline::run_pipeline(
            &self.config,
            self.params.clone(),
            self.pool.clone(),
            self.engine.clone(),
            shutdown,
        )
        .await;
        self.stopped.cancel();
        if let Some(server) = http {
            let _ = server.await;
        }
        result.map_err(ServiceError::Failed)
    }
}

/// What the service offers your own code while it runs: its pub/sub, its operators'
/// progress, its metrics, and its HTTP routes to merge into your own axum app.
pub struct ServiceHandle<S: ProcessStatusStorage = StatusBackend> {
    engine: Arc<Engine<S>>,
    pool: PgPool,
    slot: String,
    publication: String,
    default_schema: String,
    http: crate::config::HttpConfig,
    stopped: CancellationToken,
}

impl<S: ProcessStatusStorage> Clone for ServiceHandle<S> {
    fn clone(&self) -> Self {
        ServiceHandle {
            engine: self.engine.clone(),
            pool: self.pool.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            default_schema: self.default_schema.clone(),
            http: self.http.clone(),
            stopped: self.stopped.clone(),
        }
    }
}

impl<S: ProcessStatusStorage + Clone> ServiceHandle<S> {
    /// The pub/sub every event is published on: subscribe to channels (`comments`,
    /// `posts/42`, ...), to [`crate::pubsub::EntityProcessed`] notices, or follow
    /// [`PubSub::processed_through`].
    pub fn pubsub(&self) -> &PubSub {
        &self.engine.pubsub
    }

    /// Each operator's progress and state, as `streamex status` and `/metrics` show them
    /// (empty until the pipeline has started).
    pub fn reports(&self) -> Vec<OperatorReport> {
        (self.engine.reporter())()
    }

    /// The metrics as Prometheus scrapes them (the text `/metrics` serves), without the
    /// slot's figures, which `/metrics` reads from the server at scrape time.
    pub fn metrics_text(&self) -> String {
        self.metrics().render(self.reports(), None)
    }

    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.engine.metrics.clone()
    }

    /// The HTTP endpoint's routes (`/metrics`, `/healthz`, `/readyz`,
    /// `/process-status/{entity}`, `/channels/{channel}`) with the `[http]` settings of the
    /// configuration (token, allowed hosts, limits), to serve or merge into your own axum
    /// `Router`. Their event streams end when the service stops. The routes have no fallback,
    /// so they merge into a router that has its own (the `streamex` binary's endpoint answers
    /// other paths with a JSON 404).
    pub fn router(&self) -> Result<axum::Router, ServiceError> {
        Ok(crate::http::routes(
            self.endpoint().map_err(ServiceError::Config)?,
        ))
    }

    fn endpoint(&self) -> Result<crate::http::Endpoint<S>, String> {
        Ok(crate::http::Endpoint {
            metrics: self.engine.metrics.clone(),
            reporter: Arc::new(self.engine.reporter()),
            pool: self.pool.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            default_schema: self.default_schema.clone(),
            status: self.engine.status.clone(),
            pubsub: self.engine.pubsub.clone(),
            settings: crate::http::Settings::new(&self.http)
                .map_err(|e| crate::error::chain(&e))?,
            shutdown: self.stopped.clone(),
        })
    }
}

impl From<anyhow::Error> for ServiceError {
    fn from(error: anyhow::Error) -> Self {
        ServiceError::Failed(error)
    }
}
