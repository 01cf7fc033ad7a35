//! `streamex setup`, `streamex run` and `streamex resume`: the service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, StatusBackendKind};
use crate::metrics::Phase;
use crate::operator::{AnyOperator, Engine, EngineExit, OperatorReport, OperatorSpec};
use crate::pubsub::PubSub;
use crate::replication::{
    self, Acknowledger, ConnectParams, PublicationTables, StreamConfig, setup,
};
use crate::status::{self, MemoryStatus, PostgresStatus, ProcessStatusStorage, StatusBackend};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "STREAMEX_CONFIG",
        default_value = "config/streamex.toml"
    )]
    pub config: PathBuf,
}

/// Reads the configuration and connects, retrying while the server is unreachable.
pub async fn connect(
    args: &ConfigArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Config, ConnectParams, PgPool)> {
    let config = Config::load(&args.config)?;
    // Every operator the configuration names must exist before anything else is done.
    crate::operators::build(&config.operators)?;
    let params = ConnectParams::parse(&config.database_url).context("database_url")?;
    let mut wait = Duration::from_millis(500);
    loop {
        // One plain connection first: it fails at once when nothing listens, where a pool
        // would keep trying for its whole acquire timeout before saying anything.
        let attempt = async {
            use sqlx::Connection as _;
            replication::catalog_connection(&params)
                .await?
                .close()
                .await?;
            replication::catalog_pool(&params, 8).await
        };
        match attempt.await {
            Ok(pool) => return Ok((config, params, pool)),
            Err(e) if setup::is_transient_sql(&e) && !shutdown.is_cancelled() => {
                warn!(
                    database = %params.redacted_url(),
                    error = %e,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "database unreachable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => bail!("stopped while waiting for the database"),
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                let fix = match &e {
                    sqlx::Error::Database(db) => match db.code().as_deref() {
                        Some("28P01") => "; check the user and password in database_url",
                        Some("28000") => {
                            "; the server's pg_hba.conf has no entry for this user, database and \
                             address: add one, or connect as another role"
                        }
                        Some("3D000") => "; the database in database_url does not exist: create it",
                        _ => "",
                    },
                    _ => "",
                };
                return Err(e)
                    .with_context(|| format!("connecting to {}{fix}", params.redacted_url()));
            }
        }
    }
}

/// Key of the session-level advisory lock that serialises set-ups of one database (ASCII
/// "strmxset"): instances started together would otherwise race to create the same objects.
const SETUP_LOCK: i64 = 0x7374_726d_7873_6574;

/// Creates the streamex schema, the publication and the slot when missing; brings the
/// publication in line with the configuration; checks the rest. Safe to run from several
/// processes at once: they take turns.
pub async fn prepare(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    setup::check_server(pool).await?;
    // A connection of its own: the lock is released when it closes, whatever happens.
    let mut lock = pool
        .acquire()
        .await
        .context("connecting to take the set-up lock")?
        .detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SETUP_LOCK)
        .execute(&mut lock)
        .await
        .context("taking the set-up lock")?;
    let result = prepare_locked(config, pool).await;
    let _ = lock.close().await;
    result
}

async fn prepare_locked(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    status::migrate(pool).await?;
    let tables = config.table_list();
    let tables = if tables.is_empty() {
        PublicationTables::All
    } else {
        PublicationTables::Tables(tables)
    };
    setup::ensure_publication(pool, &config.publication, &tables).await?;
    for (schema, table, missing) in setup::tables_without_identity(pool, &tables).await? {
        warn!(schema, table, "published table: {missing}");
    }
    let (slot, created) = match setup::ensure_slot(pool, &config.slot).await {
        Err(setup::SetupError::SlotInvalidated { slot, confirmed })
            if config.replication.recreate_invalidated_slot =>
        {
            warn!(
                slot = %slot,
                lost_from = %confirmed,
                "replication slot was invalidated (its WAL was removed); recreating it as \
                 configured: the changes made from lost_from until now are not seen, rebuild \
                 what is derived from them"
            );
            setup::drop_slot(pool, &slot).await?;
            setup::ensure_slot(pool, &slot).await?
        }
        other => other?,
    };
    if !created {
        info!(slot = %slot.name, confirmed = ?slot.confirmed_flush_lsn, "using existing replication slot");
    }
    Ok(())
}

pub async fn setup_command(args: ConfigArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, _, pool) = connect(&args, &shutdown).await?;
    prepare(&config, &pool).await?;
    println!(
        "ready: schema streamex, publication {:?} and slot {:?} in place",
        config.publication, config.slot
    );
    Ok(())
}

pub async fn run_command(args: ConfigArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, params, pool) = connect(&args, &shutdown).await?;
    prepare(&config, &pool).await?;
    let status = match config.process_status.backend {
        StatusBackendKind::Memory => StatusBackend::Memory(MemoryStatus::new()),
        StatusBackendKind::Postgres => StatusBackend::Postgres(PostgresStatus::new(pool.clone())),
    };
    let operators = crate::operators::build(&config.operators)?;
    run_service(
        &config,
        params,
        pool,
        status,
        PubSub::new(),
        operators,
        shutdown,
    )
    .await
}

/// Runs the service until `shutdown`: stream, operators, process status, acknowledgement.
/// Each operator takes its retry policy from its `[[operators]]` entry of the same name, or
/// `[retry]`. The schema, publication and slot must exist ([`prepare`]).
pub async fn run_service<S: ProcessStatusStorage + Clone>(
    config: &Config,
    params: ConnectParams,
    pool: PgPool,
    status: S,
    pubsub: PubSub,
    operators: Vec<AnyOperator>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    check_published(config, &pool, &operators).await?;
    let specs = operators
        .into_iter()
        .map(|operator| {
            let entry = config.operators.iter().find(|c| c.name == operator.name());
            OperatorSpec {
                retry: entry.and_then(|c| c.retry).unwrap_or(config.retry),
                one_per_transaction: entry.is_some_and(|c| c.one_event_per_transaction),
                operator,
            }
        })
        .collect();
    let mut engine = Engine::new(pool.clone(), status, pubsub, specs);
    engine.batch_size = config.replication.batch_size;
    engine.timestamp_field = config.process_status.timestamp_field.clone();
    for (entity, e) in &config.entities {
        engine.scopes.insert(
            entity.clone(),
            e.parsed_scopes().map_err(anyhow::Error::msg)?,
        );
    }
    let metrics = engine.metrics.clone();
    let http = match config.http.listen {
        Some(addr) => {
            let listener = crate::http::bind(addr).await?;
            let stop = shutdown.child_token();
            let endpoint = crate::http::Endpoint {
                metrics: metrics.clone(),
                reporter: Arc::new(engine.reporter()),
                pool: pool.clone(),
                slot: config.slot.clone(),
                status: engine.status.clone(),
                pubsub: engine.pubsub.clone(),
                settings: crate::http::Settings::new(&config.http)?,
                shutdown: stop.clone(),
            };
            Some((crate::http::spawn(listener, endpoint), stop))
        }
        None => None,
    };
    let result = run_pipeline(config, params, pool, Arc::new(engine), shutdown).await;
    if let Some((server, stop)) = http {
        stop.cancel();
        let _ = server.await;
    }
    result
}

/// Refuses operators that listen to a table the publication does not publish: they would
/// never see an event, and the slot would move past that table's changes.
async fn check_published(
    config: &Config,
    pool: &PgPool,
    operators: &[AnyOperator],
) -> anyhow::Result<()> {
    let mut wanted: Vec<(String, String, &str)> = Vec::new();
    for operator in operators {
        for subscription in operator.subscriptions() {
            let name = crate::event::EntityName::parse(&subscription.entity)
                .with_context(|| format!("operator {}", operator.name()))?;
            let schema = name.schema_or(&config.default_schema).to_owned();
            wanted.push((schema, name.table, operator.name()));
        }
    }
    let pairs: Vec<(String, String)> = wanted
        .iter()
        .map(|(schema, table, _)| (schema.clone(), table.clone()))
        .collect();
    let missing = setup::unpublished(pool, &config.publication, &pairs).await?;
    if let Some((schema, table)) = missing.first() {
        let operator = wanted
            .iter()
            .find(|(s, t, _)| s == schema && t == table)
            .map_or("?", |w| w.2);
        bail!(
            "operator {operator} listens to {schema}.{table}, which publication {:?} does not \
             publish: add \"{}\" to `tables` (or correct the operator's table name; a name without \
             a schema means default_schema {:?})",
            config.publication,
            crate::event::entity_name(schema, table, &config.default_schema),
            config.default_schema
        );
    }
    Ok(())
}

/// The part of [`run_service`] that waits for the instance lock, then streams.
async fn run_pipeline<S: ProcessStatusStorage + Clone>(
    config: &Config,
    params: ConnectParams,
    pool: PgPool,
    engine: Arc<Engine<S>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        // One active instance per slot: the others wait here as standbys.
        engine.metrics.set_phase(Phase::Standby);
        let Some(lock) = InstanceLock::acquire(&pool, &config.slot, &shutdown).await? else {
            return Ok(()); // shut down while standing by
        };
        engine.metrics.set_phase(Phase::Active);
        // Losing the lock's connection means another instance may take over: stop processing
        // at once, then stand by for the lock again.
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
            "lost the connection holding the instance lock (a server restart, or the connection \
             was ended): stopped processing; taking the lock again, or standing by if another \
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
                state = ?r.state,
                done_through = %r.done_through,
                events = r.events,
                retries = r.retries,
                dead_letters = r.dead_letters,
                "summary"
            );
        }
    }
}

async fn stream_until_shutdown<S: ProcessStatusStorage + Clone>(
    config: &Config,
    params: ConnectParams,
    pool: &PgPool,
    engine: &Engine<S>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let slot = loop {
            match setup::slot_info(pool, &config.slot).await {
                Ok(slot) => break slot,
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    warn!(error = %e, "reading the slot failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let slot =
            slot.with_context(|| format!("replication slot {:?} disappeared", config.slot))?;
        let start = slot.confirmed_flush_lsn.unwrap_or_default();
        let ack = Acknowledger::starting_at(start);
        let mut stream_config =
            StreamConfig::new(params.clone(), &config.slot, &config.publication);
        stream_config.status_interval = config.replication.status_interval;
        stream_config.reconnect.initial = config.replication.reconnect_initial;
        stream_config.reconnect.max = config.replication.reconnect_max;
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
        let exit = exit?;
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
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The halted operator.
    pub operator: String,
    /// Set the event it halted on aside as a dead letter (in `streamex.dead_letters`) instead
    /// of handling it again: for a change that can never succeed, such as a delete whose old
    /// record lacks a column (it was written under REPLICA IDENTITY DEFAULT and cannot be
    /// re-read otherwise).
    #[arg(long)]
    pub skip_current: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn resume_command(args: ResumeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, _, pool) = connect(&args.config, &shutdown).await?;
    if !config.operators.iter().any(|o| o.name == args.operator) {
        let names: Vec<&str> = config.operators.iter().map(|o| o.name.as_str()).collect();
        bail!(
            "no operator {:?} in {}: configured operators are {}",
            args.operator,
            args.config.config.display(),
            names.join(", ")
        );
    }
    status::migrate(&pool).await?;
    let states = status::load_operator_states(&pool).await?;
    if !states
        .get(&args.operator)
        .is_some_and(|s| s.state == status::OperatorRunState::Halted)
    {
        println!("operator {:?} is not halted; nothing to do", args.operator);
        return Ok(());
    }
    if args.skip_current {
        match status::set_operator_running_skipping(&pool, &args.operator).await? {
            Some(position) => println!(
                "operator {:?} set to running; it sets the event at {position} aside in \
                 streamex.dead_letters instead of handling it",
                args.operator
            ),
            None => bail!(
                "operator {:?} is halted, but not on an event: nothing to skip; resume it without \
                 --skip-current",
                args.operator
            ),
        }
        return Ok(());
    }
    status::set_operator_running(&pool, &args.operator).await?;
    println!(
        "operator {:?} set to running; a running service picks it up within seconds and replays from the slot's position",
        args.operator
    );
    Ok(())
}

/// The session-level advisory lock, keyed on the slot's name, that makes one instance per
/// slot the active one. PostgreSQL releases it when the holder's connection ends, even when
/// the holder is killed, so a standby takes over within a poll interval.
pub(super) struct InstanceLock {
    conn: sqlx::PgConnection,
}

impl InstanceLock {
    const POLL: Duration = Duration::from_secs(1);

    /// Takes the lock, waiting as a standby while another instance holds it. `None` when
    /// `shutdown` came first.
    async fn acquire(
        pool: &PgPool,
        slot: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<InstanceLock>> {
        use sqlx::Connection as _;
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&Self::application_name(slot));
        let mut announced = false;
        let mut outage = Duration::ZERO;
        let mut conn: Option<sqlx::PgConnection> = None;
        loop {
            let attempt = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(sqlx::PgConnection::connect_with(&options).await?),
                };
                sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                )
                .bind(format!("streamex slot {slot}"))
                .fetch_one(c)
                .await
            };
            match attempt.await {
                Ok(true) => {
                    if announced {
                        info!(slot, "the active instance is gone; taking over");
                    }
                    let conn = conn.take().expect("connected when the lock was taken");
                    return Ok(Some(InstanceLock { conn }));
                }
                Ok(false) => {
                    outage = Duration::ZERO;
                    if !announced {
                        info!(
                            slot,
                            "standby: another instance is active on this slot; waiting to take over"
                        );
                        announced = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Self::POLL) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) if crate::replication::setup::is_transient_sql(&error) => {
                    // The server is restarting or unreachable: connect again, with backoff.
                    conn = None;
                    outage =
                        (outage * 2).clamp(Duration::from_millis(250), Duration::from_secs(10));
                    warn!(
                        slot, error = %error,
                        retry_in_ms = u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
                        "cannot reach the database to take the instance lock; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(outage) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(error) => {
                    return Err(error).context("taking the instance lock");
                }
            }
        }
    }

    /// The `application_name` of the lock's connection, the same for the active instance and
    /// its standbys, so that `streamex status` can list them (cut to PostgreSQL's 63 bytes;
    /// slot names are ASCII).
    fn application_name(slot: &str) -> String {
        let mut name = format!("streamex instance {slot}");
        name.truncate(63);
        name
    }

    /// The backend pids of the instances waiting as standbys on `slot`'s lock.
    pub(super) async fn standbys(
        pool: &PgPool,
        slot: &str,
        active: Option<i32>,
    ) -> anyhow::Result<Vec<i32>> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
              WHERE application_name = $1 AND datname = current_database()
                AND pid IS DISTINCT FROM $2
              ORDER BY backend_start",
        )
        .bind(Self::application_name(slot))
        .bind(active)
        .fetch_all(pool)
        .await
        .context("looking for standby instances")
    }

    /// The backend pid of the connection holding the lock of `slot`: the active instance.
    pub(super) async fn holder(pool: &PgPool, slot: &str) -> anyhow::Result<Option<i32>> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        )
        .bind(format!("streamex slot {slot}"))
        .fetch_optional(pool)
        .await
        .context("looking for the active instance's lock")
    }

    /// Checks the lock's connection until `shutdown`; cancels `lost` if it fails.
    async fn watch(mut self, lost: CancellationToken, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Self::POLL * 2) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(error) = sqlx::query("SELECT 1").execute(&mut self.conn).await {
                warn!(error = %error, "the instance lock's connection failed");
                lost.cancel();
                return;
            }
        }
    }
}
