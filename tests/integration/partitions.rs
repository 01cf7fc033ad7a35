//! An operator split in partitions on a worker (`[[operators]] partitions = N`), with an
//! operator of the test's own that depends on each row's order: a mirror of a table, whose
//! updates move a row from its old key to its new one. An update that changes a row's key
//! to one of another partition is applied after the row's earlier events (in the old key's
//! partition) and before its later ones, however far behind the old key's partition is.

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

fn id_of(record: Option<&streamex::event::Record>) -> anyhow::Result<i64> {
    record
        .and_then(|r| r.get("id"))
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow::anyhow!("no id"))
}

impl Operator for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("items")]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_moves_a_row_to_another_partition_keeps_the_row_s_order()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE mirror (id bigint PRIMARY KEY, v bigint NOT NULL);",
    )
    .execute(&pool)
    .await?;
    // Ids 1..=40 and 1001..=1040 must cross partitions, some of them out of partition 0.
    let crossing_from_0 = (1..=40)
        .filter(|id| partition_of(*id) == 0 && partition_of(id + 1000) != 0)
        .count();
    anyhow::ensure!(
        crossing_from_0 >= 3,
        "only {crossing_from_0} rows move out of partition 0"
    );

    let common = format!(
        "database_url = {url:?}\nslot = {slot:?}\npublication = \"streamex\"\n\
         tables = [\"items\"]\n\n[nats]\nurl = {:?}\nstream = \"items\"\n\
         subject_prefix = \"items\"\n",
        nats.url()
    );
    let dir = tempfile::tempdir()?;
    let run_config = dir.path().join("run.toml");
    std::fs::write(
        &run_config,
        format!("{common}\n[process_status]\nbackend = \"memory\"\n"),
    )?;
    common::setup_service(&run_config)?;
    let mut service = spawn_service(&run_config, &dir.path().join("run.log"), "info")?;

    let config = streamex::config::Config::parse(
        &format!(
            "{common}\n[[operators]]\nname = \"mirror\"\npartitions = {PARTITIONS}\n\n\
             [retry]\ninitial = \"10ms\"\nmax = \"50ms\"\n"
        ),
        "worker.toml",
        std::iter::empty(),
    )?;
    let worker = streamex::Worker::builder()
        .config(config)
        .configured_operators(false)
        .operator(Mirror)
        .build()
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

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
