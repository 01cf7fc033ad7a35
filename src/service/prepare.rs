//! Set-up: what `streamex setup` does and `streamex run` does first. The streamex schema
//! (migrations), the publication brought in line with the configuration, the slot; then the
//! check that every operator listens to a published table.

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::config::Config;
use crate::operator::AnyOperator;
use crate::replication::{PublicationTables, setup};
use crate::status;

/// Key of the session-level advisory lock that serialises set-ups of one database (ASCII
/// "strmxset"): instances started together would otherwise race to create the same objects.
const SETUP_LOCK: i64 = 0x7374_726d_7873_6574;

/// Creates the streamex schema, the publication and the slot when missing; brings the
/// publication in line with the configuration; checks the rest. Safe to run from several
/// processes at once: they take turns.
pub(crate) async fn prepare(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
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
    // A slot that is gone while operators have checkpoints on it (a failover to a standby
    // that had no copy of it, or a slot dropped by hand): a new one would start from now, and
    // what was written in between would be missed without a word.
    if setup::slot_info(pool, &config.slot).await?.is_none() {
        let checkpoints = status::load_checkpoints(pool, &config.slot).await?;
        if let Some(furthest) = checkpoints.values().max() {
            if !config.replication.recreate_invalidated_slot {
                bail!(
                    "replication slot {:?} does not exist, but operators {} have checkpoints on \
                     it (the furthest at {furthest}): it was lost (a failover to a standby \
                     without a copy of it, before PostgreSQL 17 or without a failover slot) or \
                     dropped. A new slot would start from now: what was written since is not \
                     seen. To go on anyway, set replication.recreate_invalidated_slot = true \
                     (and rebuild what is derived); to start over, delete this slot's rows from \
                     streamex.operator_checkpoints",
                    config.slot,
                    checkpoints.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            warn!(
                slot = %config.slot,
                lost_after = %furthest,
                "replication slot is gone though operators have checkpoints on it; creating a \
                 new one as configured (replication.recreate_invalidated_slot): the changes \
                 written since are not seen, rebuild what is derived from them"
            );
        }
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
        info!(
            slot = %slot.name,
            confirmed = %slot.confirmed_flush_lsn.map(|l| l.to_string()).unwrap_or_default(),
            "using existing replication slot"
        );
    }
    // Rows from before operator state was kept per slot that the migration could not
    // attribute (the database had no slot then) are this configuration's: it is the first to
    // set up since.
    let adopted = status::adopt_unkeyed_rows(pool, &slot.name).await?;
    if !adopted.is_empty() {
        warn!(
            slot = %slot.name,
            checkpoints = adopted.checkpoints,
            operator_states = adopted.states,
            dead_letters = adopted.dead_letters,
            "adopted operator checkpoints, states and dead letters written before they were kept \
             per slot (the database had no slot when the schema was migrated): they are this \
             slot's now; check `streamex status`"
        );
    }
    Ok(())
}

/// Refuses operators that listen to a table the publication does not publish: they would
/// never see an event, and the slot would move past that table's changes.
pub(super) async fn check_published(
    config: &Config,
    pool: &PgPool,
    operators: &[AnyOperator],
) -> anyhow::Result<()> {
    let on_messages = operators
        .iter()
        .find(|o| o.subscriptions().iter().any(|s| s.is_messages()));
    if let Some(operator) = on_messages {
        let version: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(pool)
            .await
            .context("reading the server's version")?;
        if version.parse::<u32>().is_ok_and(|v| v < 140000) {
            bail!(
                "operator {} subscribes to messages (Subscription::messages), which pgoutput \
                 sends from PostgreSQL 14 on; this server is older ({version}): upgrade it, or \
                 write the events to a table the operator subscribes to",
                operator.name()
            );
        }
    }
    let mut wanted: Vec<(String, String, &str)> = Vec::new();
    for operator in operators {
        // A subscription to messages names a prefix, not a table.
        for subscription in operator
            .subscriptions()
            .into_iter()
            .filter(|s| !s.is_messages())
        {
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

/// Refuses an operator that a `streamex worker` runs, or ran and nothing has rebuilt since:
/// its checkpoint is where the worker left it in the JetStream stream, not a position of
/// this slot, whose acknowledgement never waited for it, so `run` would miss the changes in
/// between. A backfill or rebuild asked for it (`streamex backfill`/`rebuild`) mends that,
/// and removes its worker rows once done.
pub(super) async fn check_not_on_workers(
    config: &Config,
    pool: &PgPool,
    operators: &[AnyOperator],
) -> anyhow::Result<()> {
    let names: Vec<String> = operators.iter().map(|o| o.name().to_owned()).collect();
    // Each operator run by workers, with the names its workers ran it under (itself, or
    // `<operator>#<p>/<N>`), and whether its backfill is asked for.
    let moved: Vec<(String, Vec<String>, bool)> = sqlx::query_as(
        "SELECT w.operator, w.names, s.backfill_request IS NOT NULL
           FROM (SELECT regexp_replace(operator, '#[0-9]+/[0-9]+$', '') AS operator,
                        array_agg(DISTINCT operator) AS names
                   FROM streamex.worker_progress
                  WHERE slot = $1
                    AND regexp_replace(operator, '#[0-9]+/[0-9]+$', '') = ANY($2)
                  GROUP BY 1) w
           LEFT JOIN streamex.operator_state s ON s.slot = $1 AND s.operator = w.operator
          ORDER BY w.operator",
    )
    .bind(&config.slot)
    .bind(&names)
    .fetch_all(pool)
    .await
    .context("looking for operators run by workers (streamex.worker_progress)")?;
    // Collected first: a borrowing iterator held across the await makes this future not
    // `Send` for every lifetime, as a spawned set-up needs.
    let ran: Vec<&str> = moved
        .iter()
        .flat_map(|(operator, ran, _)| std::iter::once(operator).chain(ran))
        .map(String::as_str)
        .collect();
    let holders = super::lock::InstanceLock::worker_holders(pool, &config.slot, ran)
        .await
        .context("looking for workers' lock sessions (pg_locks)")?;
    let moved = moved.into_iter().map(|(operator, ran, requested)| {
        let live = std::iter::once(&operator)
            .chain(&ran)
            .find_map(|name| holders.get(name))
            .copied();
        (operator, requested, live)
    });
    for (operator, requested, live) in moved {
        if let Some(pid) = live {
            bail!(
                "operator {operator:?} of slot {:?} is run by a `streamex worker` (backend pid \
                 {pid}, application_name \"streamex worker {} {operator}\" in pg_stat_activity): \
                 an operator runs in one place, here or on workers; take it out of the \
                 [[operators]] of one of the two configurations",
                config.slot,
                config.slot
            );
        }
        if !requested {
            bail!(
                "operator {operator:?} was run by a `streamex worker` (its rows in \
                 streamex.worker_progress): its checkpoint is where the worker left it in the \
                 JetStream stream, not a position of slot {:?}, so `streamex run` would miss \
                 the changes in between. To run it here, ask for its backfill first \
                 (`streamex rebuild {operator} --no-wait`, or `streamex backfill {operator} \
                 --no-wait` for a declarative operator): `run` then reads its tables under a \
                 snapshot, goes on from the slot after it, and removes its worker rows; or \
                 run it on a worker again",
                config.slot
            );
        }
    }
    Ok(())
}

/// Runs each operator's own check ([`crate::operator::Operator::check`]) against the
/// database; the error names the operator.
pub(crate) async fn check_operators(
    pool: &PgPool,
    operators: &[AnyOperator],
) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to check the operators")?;
    for operator in operators {
        operator
            .check(&mut conn)
            .await
            .with_context(|| format!("operator {}", operator.name()))?;
    }
    Ok(())
}

/// Connects to `[nats]` and creates its stream when missing (refusing one whose settings
/// differ), retrying while the server does not answer, until `shutdown`.
pub(super) async fn jetstream(
    nats: &crate::config::NatsConfig,
    source: String,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<crate::jetstream::Publisher, super::ServiceError> {
    use crate::jetstream;
    let client = jetstream::connect(nats)
        .await
        .map_err(|e| super::ServiceError::Setup(e.into()))?;
    let context = jetstream::context(client.clone(), nats);
    let mut backoff = jetstream::RETRY;
    loop {
        match jetstream::ensure_stream(&context, nats).await {
            Ok(created) => {
                if created {
                    info!(stream = %nats.stream, subjects = %format!("{}.>", nats.subject_prefix), "created the JetStream stream");
                }
                return Ok(jetstream::Publisher::new(client, nats.clone(), source));
            }
            Err(e) if e.is_transient() => {
                let wait = backoff.next().unwrap_or(backoff.max);
                warn!(
                    error = %e,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "JetStream does not answer (nats.url); retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Err(super::ServiceError::Shutdown),
                }
            }
            Err(e) => return Err(super::ServiceError::Setup(e.into())),
        }
    }
}
