//! `streamex tail`: print committed changes as JSON Lines.
//!
//! Each line is one [`crate::Event`]. Output is flushed at every commit, and only then is the
//! commit acknowledged, so with `--slot` nothing printed is lost or skipped across restarts
//! (a transaction cut off by a restart is printed again in full).

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::decode::Decoded;
use crate::replication::{
    self, Acknowledger, ConnectParams, PublicationTables, StreamConfig, setup,
};

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The database to read, as a postgres:// URL.
    #[arg(long, env = "STREAMEX_DATABASE_URL")]
    database_url: String,
    /// An existing publication to read. Without it, tail reads every table through a
    /// temporary publication of its own (FOR ALL TABLES, which needs a superuser), dropped when
    /// it ends: tail never creates or changes a publication a configuration may name.
    #[arg(long)]
    publication: Option<String>,
    /// An existing logical slot (pgoutput) to read and acknowledge; without it a temporary
    /// slot is used, which the server drops when tail ends.
    #[arg(long)]
    slot: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// First print every existing row of the publication's tables as a `read` event, then
    /// the changes committed after them: a full copy, with nothing missed or doubled between
    /// the two (the rows are read under the snapshot the slot starts at). With `--slot`, the
    /// slot must not exist yet: it is created at that snapshot.
    #[arg(long)]
    snapshot: bool,
}

pub async fn run(args: TailArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let params = ConnectParams::parse(&args.database_url).context("--database-url")?;
    // Once, as `run` connects (a refused connection is said at once, not after the pool's
    // time-out), but without waiting for the server: tail is run by a person, who is told.
    // (One connection of the pool is kept for tail's whole life when it has a publication of
    // its own: see below.)
    let catalog = crate::service::connect_once(&params, 3)
        .await
        .map_err(|e| crate::service::explain_connect(&params, e, "--database-url"))?;
    setup::check_server(&catalog).await?;
    let temporary = args.slot.is_none();
    let slot = args
        .slot
        .clone()
        .unwrap_or_else(|| format!("streamex_tail_{}", std::process::id()));
    if !temporary && args.snapshot {
        if setup::slot_info(&catalog, &slot).await?.is_some() {
            bail!(
                "replication slot {slot:?} exists already, but --snapshot creates the slot at the \
                 snapshot it reads (an existing slot is past the rows' snapshot); name a new slot, \
                 or leave out --snapshot to go on from this one"
            );
        }
    } else if !temporary {
        let info = setup::slot_info(&catalog, &slot).await?.with_context(|| {
            format!("replication slot {slot:?} does not exist; create it with `streamex setup` or leave out --slot")
        })?;
        setup::check_slot(&catalog, &info).await?;
    }
    let (publication, own) = match &args.publication {
        Some(name) => {
            if !setup::publication_exists(&catalog, name).await? {
                bail!(
                    "publication {name:?} does not exist: name an existing one with --publication, \
                     or leave it out to read every table"
                );
            }
            (name.clone(), None)
        }
        None if !temporary => bail!(
            "--slot needs --publication: a slot decodes its WAL through a publication that \
             existed when that WAL was written, so tail cannot make one of its own for it; name \
             the slot's publication (the one `streamex setup` made: `streamex` unless configured)"
        ),
        None => {
            // Named after a session held open while tail runs, so that a publication left by
            // a tail that could not drop it (killed, or stopped by a second signal) is known
            // for one: its session is gone. Such leftovers are dropped here.
            let mut keeper = catalog.acquire().await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *keeper)
                .await?;
            drop_leftover_publications(&catalog).await;
            let name = format!("{TAIL_PUBLICATION_PREFIX}{pid}");
            setup::ensure_publication(&catalog, &name, &PublicationTables::All)
                .await
                .with_context(|| {
                    format!(
                        "creating tail's temporary publication {name:?} of every table (needs a \
                         superuser; otherwise name an existing publication with --publication)"
                    )
                })?;
            (name, Some(keeper))
        }
    };
    let result = stream(
        args,
        params,
        catalog.clone(),
        slot,
        &publication,
        temporary,
        shutdown,
    )
    .await;
    if let Some(keeper) = own {
        drop(keeper);
        let dropped = sqlx::query(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            setup::quote_ident(&publication)
        ))
        .execute(&catalog)
        .await;
        if let Err(error) = dropped {
            tracing::warn!(publication = %publication, error = %error,
                "could not drop tail's temporary publication; drop it by hand");
        }
    }
    result
}

/// The name of tail's temporary publications, before the backend pid of the session that
/// keeps it.
const TAIL_PUBLICATION_PREFIX: &str = "streamex_tail_";

/// Drops the temporary publications of tails whose session is gone (best effort: a failure is
/// logged, and changes nothing for this tail).
async fn drop_leftover_publications(catalog: &sqlx::PgPool) {
    let leftovers: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT pubname FROM pg_publication
          WHERE pubname ~ ('^' || $1 || '[0-9]{1,10}$')
            AND substr(pubname, length($1) + 1)::bigint
                NOT IN (SELECT pid FROM pg_stat_activity)",
    )
    .bind(TAIL_PUBLICATION_PREFIX)
    .fetch_all(catalog)
    .await;
    let leftovers = match leftovers {
        Ok(names) => names,
        Err(error) => {
            tracing::debug!(error = %error, "could not look for publications earlier tails left");
            return;
        }
    };
    for name in leftovers {
        let dropped = sqlx::query(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            setup::quote_ident(&name)
        ))
        .execute(catalog)
        .await;
        match dropped {
            Ok(_) => tracing::info!(publication = %name,
                "dropped a temporary publication an earlier tail left (its session is gone)"),
            Err(error) => tracing::warn!(publication = %name, error = %error,
                "could not drop a temporary publication an earlier tail left"),
        }
    }
}

async fn stream(
    args: TailArgs,
    params: ConnectParams,
    catalog: sqlx::PgPool,
    slot: String,
    publication: &str,
    temporary: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut config = StreamConfig::new(params.clone(), &slot, publication);
    config.temporary_slot = temporary;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 16, tokio::io::stdout());
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut printed: u64 = 0;
    if args.snapshot {
        let snapshot = replication::ExportedSnapshot::with_slot(&params, &slot, temporary)
            .await
            .with_context(|| format!("creating slot {slot:?} with an exported snapshot"))?;
        let read = tokio::select! {
            read = print_snapshot(&catalog, publication, &snapshot, limit, &mut out) => read?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        printed = read;
        out.flush().await?;
        if printed >= limit {
            return Ok(());
        }
        if temporary {
            // The temporary slot lives on the connection that made it: stream on that one.
            *config.prepared.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(snapshot.into_connection());
        }
    }
    let stop = shutdown.child_token();
    let stream = replication::spawn(config, catalog, Acknowledger::default(), stop.clone());
    let (mut items, ack, task) = (stream.items, stream.ack, stream.task);

    // Lines gather here and go out 64 KiB at a time and at each commit, each write a
    // single call: a write per line cost more than writing its JSON.
    const CHUNK: usize = 1 << 16;
    let mut lines = Vec::with_capacity(CHUNK + 4096);
    let result: anyhow::Result<()> = async {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // What is waiting is taken without a wait (far cheaper during a drain); the wait,
            // with its watch on shutdown, only when nothing is.
            let item = match items.try_recv() {
                Ok(item) => item,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    item = items.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                },
            };
            match item {
                // At the limit, only the commit of the last printed event's transaction is
                // still taken, to acknowledge it; anything else ends tail unacknowledged.
                Decoded::Event(_) if printed >= limit => break,
                Decoded::Event(event) => {
                    event.write_json(&mut lines);
                    lines.push(b'\n');
                    if lines.len() >= CHUNK {
                        out.write_all(&lines).await?;
                        lines.clear();
                    }
                    printed += 1;
                }
                Decoded::Commit { end_lsn, .. } => {
                    out.write_all(&lines).await?;
                    lines.clear();
                    out.flush().await?;
                    ack.ack(end_lsn);
                    if printed >= limit {
                        break;
                    }
                }
                Decoded::Begin { .. } | Decoded::Message { .. } | Decoded::Interrupted => {}
            }
        }
        out.write_all(&lines).await?;
        out.flush().await?;
        Ok(())
    }
    .await;
    // Everything printed and complete is acknowledged; let the stream send that and end.
    stop.cancel();
    drop(items);
    let streamed = task.await.context("the replication task panicked")?;
    result?;
    streamed?;
    Ok(())
}

/// Prints every row of `publication`'s tables, read under `snapshot`, as `read` events (at
/// most `limit`); returns how many it printed.
async fn print_snapshot(
    catalog: &sqlx::PgPool,
    publication: &str,
    snapshot: &replication::ExportedSnapshot,
    limit: u64,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> anyhow::Result<u64> {
    // Each published table once: a partitioned table published through its root is listed
    // as the root (read with its partitions), otherwise as its partitions.
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT schemaname::text, tablename::text FROM pg_publication_tables
          WHERE pubname = $1 ORDER BY 1, 2",
    )
    .bind(publication)
    .fetch_all(catalog)
    .await
    .with_context(|| format!("listing the tables of publication {publication:?}"))?;
    // As many as a backfill's by default.
    let readers = crate::config::ReplicationConfig::default().backfill_readers;
    let conns = replication::open_readers(&catalog.connect_options(), &snapshot.name, readers)
        .await
        .context("opening the snapshot's readers")?;
    let mut types = crate::decode::TypeCache::new();
    let mut tables = Vec::with_capacity(names.len());
    {
        let mut conn = catalog.acquire().await?;
        for (schema, table) in &names {
            let found = replication::describe_table(
                &mut conn,
                catalog,
                &mut types,
                (schema, table),
                crate::event::DEFAULT_SCHEMA,
            )
            .await
            .with_context(|| format!("looking up table {schema}.{table}"))?;
            // A table dropped since the snapshot: it has no rows to show.
            tables.extend(found);
        }
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut chunks = replication::read_tables(conns, tables.into(), (snapshot.point, timestamp));
    let mut printed = 0;
    let mut line = Vec::with_capacity(4096);
    while let Some(chunk) = chunks.recv().await {
        for event in chunk?.events {
            if printed >= limit {
                return Ok(printed);
            }
            line.clear();
            event.write_json(&mut line);
            line.push(b'\n');
            out.write_all(&line).await?;
            printed += 1;
        }
    }
    Ok(printed)
}
