//! `streamex demo`: the blog example end to end, on a private PostgreSQL cluster.
//!
//! Starts a cluster from the machine's PostgreSQL binaries (the one the tests use), loads the
//! blog schema, runs the service with its two operators, writes blog activity, and prints
//! what happens once a second. Ctrl-C stops it and removes the cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Service;
use crate::cluster::{Cluster, create_database_at};
use crate::config::Config;
use crate::operator::Registry;
use crate::replication::{ConnectParams, setup};

const SCHEMA: &str = include_str!("../../examples/blog/schema.sql");
const CONFIG: &str = include_str!("../../config/streamex.toml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run against this server (it needs wal_level = logical) instead of a private cluster;
    /// a new database is created on it.
    #[arg(long)]
    database_url: Option<String>,
    /// Blog transactions written per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Also serve the HTTP endpoint (metrics, health, process status, channels as
    /// Server-Sent Events) on this address, such as 127.0.0.1:9187.
    #[arg(long, value_name = "ADDRESS")]
    http: Option<std::net::SocketAddr>,
}

pub async fn run(
    args: DemoArgs,
    registry: &Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (cluster, admin_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            println!("starting a private PostgreSQL cluster (wal_level = logical)...");
            let cluster = tokio::task::spawn_blocking(Cluster::start)
                .await?
                .context("starting the private cluster")?;
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let url = create_database_at(&admin_url)
        .await
        .context("creating the demo database")?;
    let result = demo(&args, registry, &url, shutdown).await;
    // On your server, the demo's database and slot go whatever happened (a slot left behind
    // would hold WAL forever); a private cluster goes as a whole.
    let removed = match cluster {
        None => remove(&admin_url, &url).await,
        Some(cluster) => {
            tokio::task::spawn_blocking(move || drop(cluster)).await?;
            println!("private cluster removed");
            Ok(())
        }
    };
    result.and(removed)
}

/// Drops the demo's slot and database from the server of `admin_url`.
async fn remove(admin_url: &str, url: &str) -> anyhow::Result<()> {
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    let admin = PgPool::connect(admin_url)
        .await
        .context("connecting to remove the demo's database and slot")?;
    // The service's walsender may take a moment to go after it stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1 AND NOT active",
        )
        .bind(&database)
        .execute(&admin)
        .await;
        let left: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(&database)
        .fetch_one(&admin)
        .await?;
        if !left {
            break;
        }
        if Instant::now() > deadline {
            dropped?;
            anyhow::bail!(
                "the demo's replication slot {database:?} is still in use; drop it with \
                 SELECT pg_drop_replication_slot('{database}') or it keeps WAL"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        setup::quote_ident(&database)
    ))
    .execute(&admin)
    .await
    .with_context(|| format!("dropping the demo's database {database:?}"))?;
    println!("database {database} and its slot removed");
    Ok(())
}

/// The demo on the fresh database `url`, until `shutdown` or its time is up.
async fn demo(
    args: &DemoArgs,
    registry: &Registry,
    url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let slot = url.rsplit('/').next().unwrap_or("streamex").to_owned();
    let mut overrides = vec![
        ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
        ("STREAMEX_SLOT".to_owned(), slot.clone()),
    ];
    if let Some(address) = args.http {
        overrides.push(("STREAMEX_HTTP__LISTEN".to_owned(), address.to_string()));
    }
    let config = Config::parse(CONFIG, "config/streamex.toml", overrides)?;
    let params = ConnectParams::parse(url)?;
    let service = Service::builder()
        .config(config.clone())
        .registry(registry.clone())
        .build_until(shutdown.clone())
        .await?;
    println!(
        "database {} ready: blog schema, publication {:?}, slot {:?}",
        params.redacted_url(),
        config.publication,
        slot
    );
    if let Some(address) = args.http {
        println!(
            "HTTP endpoint: http://{address}/metrics, /readyz, /process-status/comments?timestamp=..., \
             and live events with `curl -N http://{address}/channels/comments`"
        );
    }
    let mut comments = service.handle().pubsub().subscribe("comments", 64);
    let stop = shutdown.child_token();
    let running = tokio::spawn(service.run_until(stop.clone()));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_activity(
        pool.clone(),
        args.rate.max(1),
        written.clone(),
        stop.clone(),
    ));

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_written = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if args
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        if running.is_finished() {
            break;
        }
        let total = written.load(Ordering::Relaxed);
        report(&pool, &slot, total - last_written).await?;
        last_written = total;
        if let Ok(Some(event)) = comments.try_recv() {
            println!(
                "  sample event on channel comments: {}",
                serde_json::to_string(&*event)?
            );
        }
        while let Ok(Some(_)) = comments.try_recv() {}
    }
    stop.cancel();
    let written = writer.await?;
    running.await??;
    written?;
    println!("stopped cleanly");
    pool.close().await;
    Ok(())
}

/// One line of figures: activity, the slot, each entity's process status, the derived rows.
async fn report(pool: &PgPool, slot: &str, written: u64) -> anyhow::Result<()> {
    let info = setup::slot_info(pool, slot).await?;
    let (posts, comments, counts, tallies): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM posts), (SELECT count(*) FROM comments),
                (SELECT count(*) FROM post_with_comments_counts),
                (SELECT coalesce(sum(comments), 0) FROM post_comment_tallies)",
    )
    .fetch_one(pool)
    .await?;
    let lag: Vec<(String, f64)> = sqlx::query_as(
        "SELECT entity, extract(epoch FROM now() - to_timestamp(timestamp / 1e6))::float8
           FROM streamex.process_status ORDER BY entity",
    )
    .fetch_all(pool)
    .await?;
    let lag: Vec<String> = lag
        .iter()
        .map(|(entity, secs)| format!("{entity} {secs:.2}s ago"))
        .collect();
    println!(
        "{written:>4} tx/s written | slot confirmed {} behind {} B | posts {posts}, comments {comments} \
         -> derived rows {counts}, tallied comments {tallies} | processed: {}",
        info.as_ref()
            .and_then(|s| s.confirmed_flush_lsn)
            .map(|l| l.to_string())
            .unwrap_or_default(),
        info.and_then(|s| s.lag_bytes).unwrap_or_default(),
        if lag.is_empty() {
            "-".to_owned()
        } else {
            lag.join(", ")
        },
    );
    Ok(())
}

/// Writes blog activity at `rate` transactions a second until `stop`.
async fn write_activity(
    pool: PgPool,
    rate: u32,
    written: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut n: u64 = 0;
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        n += 1;
        let statement = match n % 10 {
            0..=2 => {
                "WITH p AS (INSERT INTO posts (title, body) VALUES ('hello', 'world') RETURNING id)
                      INSERT INTO comments (post_id, body) SELECT id, 'first!' FROM p"
            }
            3..=6 => {
                "INSERT INTO comments (post_id, body)
                      SELECT id, 'nice post' FROM posts ORDER BY random() LIMIT 1"
            }
            7 => {
                "UPDATE posts SET title = title || '!', updated_at = now()
                  WHERE id = (SELECT id FROM posts ORDER BY random() LIMIT 1)"
            }
            8 => {
                "DELETE FROM comments WHERE id = (SELECT id FROM comments ORDER BY random() LIMIT 1)"
            }
            _ => "DELETE FROM posts WHERE id = (SELECT id FROM posts ORDER BY random() LIMIT 1)",
        };
        sqlx::query(statement).execute(&pool).await?;
        written.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
