//! The replication connection broken inside big transactions, again and again, while an
//! operator is behind: the reconnected stream sends each interrupted transaction again from
//! its start, and still every change reaches the operator once and a channel once.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use streamex::config::Config;
use streamex::event::Event;
use streamex::operator::{AnyOperator, Context, Operator, Subscription};
use streamex::pubsub::PubSub;
use streamex::status::MemoryStatus;
use streamex::testing;

use crate::common::{PATIENCE, Service, slot_for};

const SCHEMA: &str = "
CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);
CREATE TABLE seen (id bigint NOT NULL);
";

/// Records every note it is given, in its transaction (exactly once by its checkpoint).
struct Record;

impl Operator for Record {
    fn name(&self) -> &str {
        "record"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("notes")]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let id: i64 = event.get("id")?;
        sqlx::query("INSERT INTO seen VALUES ($1)")
            .bind(id)
            .execute(ctx.db()?)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn transactions_sent_again_after_reconnections_reach_operators_and_channels_once()
-> anyhow::Result<()> {
    const TRANSACTIONS: i64 = 6;
    const ROWS: i64 = 20_000;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let mut config = Config::new(&url);
    config.slot = slot_for(&url);
    config.tables = vec!["notes".into(), "seen".into()];
    let pubsub = PubSub::new();
    let mut channel = pubsub.subscribe("notes", 1 << 20);
    let service = Service::start(
        &config,
        MemoryStatus::default(),
        pubsub,
        vec![AnyOperator::new(Record)],
    )
    .await?;

    // Big transactions, and the walsender ended four times while they stream (each reconnection
    // waits longer: the stream backs off).
    for t in 0..TRANSACTIONS {
        sqlx::query(
            "INSERT INTO notes SELECT g, repeat('x', 200) FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(t * ROWS + 1)
        .bind((t + 1) * ROWS)
        .execute(&pool)
        .await?;
    }
    let total = TRANSACTIONS * ROWS;
    // 120,000 rows in a debug build through four reconnections and their back-off take about
    // 30 s alone; twice the usual patience, for a machine busy with other tests.
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    let mut cuts = 0;
    loop {
        let seen: i64 = sqlx::query_scalar("SELECT count(DISTINCT id) FROM seen")
            .fetch_one(&pool)
            .await?;
        if seen == total {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {seen} of {total} notes were seen"
        );
        if cuts < 4 {
            let ended: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE backend_type = 'walsender' AND datname = current_database()) t",
            )
            .fetch_one(&pool)
            .await?;
            cuts += ended;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Let anything doubled land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM seen")
            .fetch_one(&pool)
            .await?;
    assert_eq!(distinct, total);
    assert_eq!(
        rows, total,
        "notes applied twice after {cuts} reconnections"
    );

    let mut on_channel: HashMap<i64, u32> = HashMap::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), channel.recv()).await
    {
        *on_channel.entry(event.get::<i64>("id")?).or_default() += 1;
    }
    let doubled = on_channel.values().filter(|n| **n > 1).count();
    assert_eq!(doubled, 0, "{doubled} notes came twice on the channel");
    assert_eq!(on_channel.len() as i64, total);
    eprintln!("{total} notes in {TRANSACTIONS} transactions, {cuts} walsenders ended on the way");
    service.stop().await
}
