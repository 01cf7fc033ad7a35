//! An operator split in partitions on a worker (`[[operators]] partitions = N`), with an
//! operator of the test's own that depends on each row's order: a mirror of a table, whose
//! updates move a row from its old key to its new one. An update that changes a row's key
//! to one of another partition is applied after the row's earlier events (in the old key's
//! partition) and before its later ones, however far behind the old key's partition is.
//! Changing the count of partitions (4, then 3, then the operator whole), each time with the
//! partitions at different places, applies every event once; a new count waits while the
//! old one still runs.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use streamex::event::{Event, EventType};
use streamex::operator::{Context, Operator, Subscription};
use streamex::testing;

use crate::common::nats::NatsServer;
use crate::common::{self, eventually, slot_for, spawn_service};

const PARTITIONS: u32 = 4;

/// The partition of a row of `items` with this id (its `Streamex-Key` is the id's text).
fn partition_of(id: i64) -> u32 {
    streamex::jetstream::partition(Some(&id.to_string()), PARTITIONS)
}

/// Keeps `mirror` equal to `items`. An update moves the mirrored row from its old id to its
/// new one, and only if it is there: applied before the row's insert, it would be lost. The
/// inserts of partition 0's rows are slow, so that partition lags the others.
#[derive(Debug)]
struct Mirror;

/// The operator's name: longer than PostgreSQL keeps of an `application_name` (63 bytes)
/// once in a lock key, so that nothing may find its partitions by that name.
const NAME: &str = "mirror_of_items_in_row_order_kept_by_partitions_of_it";

fn id_of(record: Option<&streamex::event::Record>) -> anyhow::Result<i64> {
    record
        .and_then(|r| r.get("id"))
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow::anyhow!("no id"))
}

impl Operator for Mirror {
    fn name(&self) -> &str {
        NAME
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("items")]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        // Every application of an event counted, in the operator's transaction.
        sqlx::query(
            "INSERT INTO applied (position, times) VALUES ($1, 1)
             ON CONFLICT (position) DO UPDATE SET times = applied.times + 1",
        )
        .bind(event.position().to_string())
        .execute(ctx.db()?)
        .await?;
        match event.kind {
            EventType::Insert => {
                let id = id_of(event.new_record.as_ref())?;
                if partition_of(id) == 0 {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                sqlx::query(
                    "INSERT INTO mirror (id, v) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                )
                .bind(id)
                .bind(event.get::<i64>("v")?)
                .execute(ctx.db()?)
                .await?;
            }
            EventType::Update => {
                let new = id_of(event.new_record.as_ref())?;
                // The old record is there only when the key changed.
                let old = id_of(event.old_record.as_ref()).unwrap_or(new);
                sqlx::query(
                    "WITH gone AS (DELETE FROM mirror WHERE id = $1 RETURNING id)
                     INSERT INTO mirror (id, v) SELECT $2, $3 FROM gone
                     ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                )
                .bind(old)
                .bind(new)
                .bind(event.get::<i64>("v")?)
                .execute(ctx.db()?)
                .await?;
            }
            EventType::Delete => {
                sqlx::query("DELETE FROM mirror WHERE id = $1")
                    .bind(id_of(event.old_record.as_ref())?)
                    .execute(ctx.db()?)
                    .await?;
            }
            EventType::Truncate => {
                sqlx::query("DELETE FROM mirror").execute(ctx.db()?).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Rows of `items` and `mirror` that differ (either way).
async fn differences(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM
           ((SELECT * FROM items EXCEPT SELECT * FROM mirror)
            UNION ALL (SELECT * FROM mirror EXCEPT SELECT * FROM items)) d",
    )
    .fetch_one(pool)
    .await?)
}

/// The tables, and `[nats]` with the rest of the configuration both processes share.
async fn prepare(url: &str, nats: &NatsServer) -> anyhow::Result<(PgPool, String)> {
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE mirror (id bigint PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE applied (position text PRIMARY KEY, times int NOT NULL);",
    )
    .execute(&pool)
    .await?;
    let common = format!(
        "database_url = {url:?}\nslot = {:?}\npublication = \"streamex\"\n\
         tables = [\"items\"]\n\n[nats]\nurl = {:?}\nstream = \"items\"\n\
         subject_prefix = \"items\"\n",
        slot_for(url),
        nats.url()
    );
    Ok((pool, common))
}

/// The publisher, `streamex run` with `[nats]` and no operator, set up and started.
fn publish(common: &str, dir: &std::path::Path) -> anyhow::Result<std::process::Child> {
    let run_config = dir.join("run.toml");
    std::fs::write(
        &run_config,
        format!("{common}\n[process_status]\nbackend = \"memory\"\n"),
    )?;
    common::setup_service(&run_config)?;
    spawn_service(&run_config, &dir.join("run.log"), "info")
}

/// What each test starts with: its nats-server, a database with the tables, and the
/// publisher running on it.
struct Setup {
    nats: NatsServer,
    slot: String,
    pool: PgPool,
    /// The configuration both processes share.
    common: String,
    dir: tempfile::TempDir,
    service: std::process::Child,
}

async fn start() -> anyhow::Result<Setup> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let (pool, common) = prepare(&url, &nats).await?;
    let dir = tempfile::tempdir()?;
    let service = publish(&common, dir.path())?;
    Ok(Setup {
        nats,
        slot: slot_for(&url),
        pool,
        common,
        dir,
        service,
    })
}

/// A worker running in this process: its stop, and its task.
type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), streamex::WorkerError>>,
);

/// A worker running [`Mirror`] in `partitions`, in this process, until the sender is used.
async fn worker(common: &str, partitions: u32) -> anyhow::Result<Running> {
    let config = streamex::config::Config::parse(
        &format!(
            "{common}\n[[operators]]\nname = \"{NAME}\"\npartitions = {partitions}\n\n\
             [retry]\ninitial = \"10ms\"\nmax = \"50ms\"\n"
        ),
        "worker.toml",
        std::iter::empty(),
    )?;
    let worker = streamex::Worker::builder()
        .config(config)
        .configured_operators(false)
        .operator(Mirror)
        // Every change comes from the stream, to be counted in `applied`: the rows written
        // before a worker first runs too (the stream holds them from the slot's start).
        .backfill(false)
        .build()
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    Ok((stop, running))
}

/// Events applied (each counted once), and the most times one was.
async fn applied(pool: &PgPool) -> anyhow::Result<(i64, i32)> {
    Ok(
        sqlx::query_as("SELECT count(*), coalesce(max(times), 0) FROM applied")
            .fetch_one(pool)
            .await?,
    )
}

/// One round of changes to `items` with ids from `base`: inserts, key changes (most to
/// another partition), the old keys taken again, updates and deletes, each statement in a
/// transaction of its own. Returns the number of row changes.
async fn round(pool: &PgPool, base: i64) -> anyhow::Result<i64> {
    let mut changes = 0;
    for statement in [
        "INSERT INTO items SELECT $1 + g, 0 FROM generate_series(1, 40) g",
        "UPDATE items SET id = id + 1000 WHERE id BETWEEN $1 + 1 AND $1 + 40",
        "INSERT INTO items SELECT $1 + g, 1 FROM generate_series(1, 40) g",
        "UPDATE items SET v = v + 10 WHERE id BETWEEN $1 + 1001 AND $1 + 1040",
        "DELETE FROM items WHERE id BETWEEN $1 + 1 AND $1 + 40 AND id % 3 = 0",
    ] {
        let done = sqlx::query(statement).bind(base).execute(pool).await?;
        changes += i64::try_from(done.rows_affected())?;
    }
    Ok(changes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_count_of_partitions_applies_every_event_once() -> anyhow::Result<()> {
    let Setup {
        nats,
        slot,
        pool,
        common,
        dir,
        mut service,
    } = start().await?;
    let checkpoints = async || -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT operator FROM streamex.operator_checkpoints WHERE slot = $1 ORDER BY 1",
        )
        .bind(&slot)
        .fetch_all(&pool)
        .await?)
    };
    let mut changes = 0;
    let mut base = 0;
    let mut running: Option<Running> = None;
    // Each count stops when about half of its round is applied, partition 0 (slow) behind
    // the others; the next count starts from there with another round waiting.
    for partitions in [4, 3, 1, 3] {
        changes += round(&pool, base).await?;
        base += 10_000;
        if let Some((stop, task)) = running.take() {
            let _ = stop.send(());
            task.await??;
        }
        running = Some(worker(&common, partitions).await?);
        let half = changes - 100;
        eventually("half of the round applied", async || {
            Ok(applied(&pool).await?.0 >= half)
        })
        .await?;
    }
    eventually("every change applied", async || {
        Ok(applied(&pool).await?.0 >= changes)
    })
    .await?;
    eventually("the earlier counts' checkpoints removed", async || {
        let names = checkpoints().await?;
        Ok(names.iter().all(|n| n.ends_with("/3")))
    })
    .await?;
    // And their JetStream consumers: `<slot>-<name>-23<p>-2F3-s<hex>` ('#', '/' escaped).
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let stream = js.get_stream("items").await?;
    eventually("only the last count's consumers left", async || {
        use futures_util::TryStreamExt as _;
        let names: Vec<String> = stream.consumer_names().try_collect().await?;
        Ok(names.len() == 3
            && names
                .iter()
                .all(|n| n.contains(&format!("-{NAME}-23")) && n.contains("-2F3-s")))
    })
    .await?;
    // `streamex status` shows the partitions under their operator, each on its worker, and
    // none of them as an operator the configuration does not run.
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!("{common}\n[[operators]]\nname = \"{NAME}\"\npartitions = 3\n"),
    )?;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["status", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .output()?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for index in 0..3 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("partition {index}/3 ")))
            .unwrap_or_else(|| panic!("no line for partition {index}/3:\n{text}"));
        assert!(line.contains("on a worker (backend pid"), "{line}\n{text}");
        assert!(line.contains("behind the WAL"), "{line}\n{text}");
    }
    assert!(!text.contains("not in config"), "{text}");
    assert!(
        text.contains("in 3 partitions on workers (3 held now)"),
        "{text}"
    );
    let (count, most) = applied(&pool).await?;
    let wrong = differences(&pool).await?;
    if let Some((stop, task)) = running.take() {
        let _ = stop.send(());
        task.await??;
    }
    service.kill()?;
    service.wait()?;
    assert_eq!(most, 1, "an event was applied more than once");
    assert_eq!(count, changes, "events applied, for the changes written");
    assert_eq!(wrong, 0, "rows of the mirror differ from the table");
    assert_eq!(
        checkpoints().await?.len(),
        3,
        "one checkpoint per partition"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_moves_a_row_to_another_partition_keeps_the_row_s_order()
-> anyhow::Result<()> {
    // Ids 1..=40 and 1001..=1040 must cross partitions, some of them out of partition 0.
    let crossing_from_0 = (1..=40)
        .filter(|id| partition_of(*id) == 0 && partition_of(id + 1000) != 0)
        .count();
    anyhow::ensure!(
        crossing_from_0 >= 3,
        "only {crossing_from_0} rows move out of partition 0"
    );
    // Bound, not left out with `..`: the servers and the directory live to the end.
    let Setup {
        nats: _nats,
        slot: _,
        pool,
        common,
        dir,
        mut service,
    } = start().await?;
    let (stop, running) = worker(&common, PARTITIONS).await?;

    // Rows inserted, moved to new keys (most to another partition), their old keys taken
    // again, the moved rows updated and some deleted: each in a transaction of its own.
    for statement in [
        "INSERT INTO items SELECT g, 0 FROM generate_series(1, 40) g",
        "UPDATE items SET id = id + 1000",
        "INSERT INTO items SELECT g, 1 FROM generate_series(1, 40) g",
        "UPDATE items SET v = v + 10 WHERE id > 1000",
        "DELETE FROM items WHERE id % 3 = 0",
        "UPDATE items SET id = id + 1000 WHERE id > 1000 AND id % 2 = 0",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&pool)
        .await?;
    assert!(rows > 40, "{rows} rows");
    let waited = eventually("the mirror equal to the table", async || {
        Ok(differences(&pool).await? == 0)
    })
    .await;
    let wrong = differences(&pool).await?;
    let _ = stop.send(());
    running.await??;
    service.kill()?;
    service.wait()?;
    assert_eq!(
        wrong,
        0,
        "rows of the mirror differ from the table ({waited:?}); run log:\n{}",
        std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_count_of_partitions_waits_while_the_old_one_runs() -> anyhow::Result<()> {
    let Setup {
        nats: _nats,
        slot,
        pool,
        common,
        dir: _dir,
        mut service,
    } = start().await?;
    let counts = async || -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT split_part(operator, '/', 2) FROM streamex.operator_checkpoints
              WHERE slot = $1 ORDER BY 1",
        )
        .bind(&slot)
        .fetch_all(&pool)
        .await?)
    };
    let mut changes = round(&pool, 0).await?;
    let (old_stop, old_task) = worker(&common, 4).await?;
    eventually("the four partitions at work", async || {
        Ok(applied(&pool).await?.0 > 0)
    })
    .await?;
    // A worker given another count while the first still runs: it must not start.
    let (new_stop, new_task) = worker(&common, 2).await?;
    changes += round(&pool, 10_000).await?;
    eventually("every change applied by the four partitions", async || {
        Ok(applied(&pool).await?.0 >= changes)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_both = counts().await?;
    let _ = old_stop.send(());
    old_task.await??;
    changes += round(&pool, 20_000).await?;
    eventually("the two partitions taking over", async || {
        Ok(applied(&pool).await?.0 >= changes && counts().await? == ["2"])
    })
    .await?;
    let (count, most) = applied(&pool).await?;
    let wrong = differences(&pool).await?;
    let _ = new_stop.send(());
    new_task.await??;
    service.kill()?;
    service.wait()?;
    assert_eq!(
        while_both,
        ["4"],
        "the two partitions made checkpoints while the four ran"
    );
    assert_eq!(most, 1, "an event was applied more than once");
    assert_eq!(count, changes);
    assert_eq!(wrong, 0, "rows of the mirror differ from the table");
    Ok(())
}
