//! The transactional outbox: `pg_logical_emit_message(true, prefix, content)` inside an
//! application's transaction reaches the operators subscribed to the prefix, and the pub/sub,
//! in WAL order with the transaction's rows, and never when the transaction rolls back.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use streamex::config::Config;
use streamex::event::{Event, EventType};
use streamex::operator::{Context, Operator, Subscription};
use streamex::pubsub::{self, PubSub};
use streamex::status::MemoryStatus;
use streamex::testing;

use crate::common::{PATIENCE, Service, eventually, slot_for};

/// Writes every event it gets, in the order it gets them, to `ledger`, in its transaction.
struct Ledger;

impl Operator for Ledger {
    fn name(&self) -> &str {
        "ledger"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::all("orders"),
            Subscription::messages("order_events"),
        ]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let what = match event.kind {
            EventType::Message => {
                let message = event.message.as_ref().expect("a message event has one");
                anyhow::ensure!(message.prefix == "order_events", "{message:?}");
                #[derive(serde::Deserialize)]
                struct Placed {
                    order: i64,
                }
                let placed: Placed = event.message_as()?;
                format!("message {}", placed.order)
            }
            kind => format!("{kind} {}", event.get::<i64>("id")?),
        };
        sqlx::query("INSERT INTO ledger (what) VALUES ($1)")
            .bind(what)
            .execute(ctx.db()?)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn messages_come_in_order_with_their_transaction_and_never_after_a_rollback()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, state text);
         CREATE TABLE ledger (n bigserial PRIMARY KEY, what text NOT NULL);",
    )
    .execute(&pool)
    .await?;
    let mut config = Config::new(&url);
    config.slot = slot_for(&url);
    config.tables = vec!["orders".into()];
    crate::common::prepare(&config).await?;
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await?;
    if version < 140000 {
        // pgoutput sends no messages before 14: an operator subscribing to them is refused.
        let refused = Service::start(
            &config,
            MemoryStatus::new(),
            PubSub::new(),
            vec![Ledger.into()],
        )
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(
            refused.contains("operator ledger subscribes to messages") && refused.contains("14"),
            "{refused}"
        );
        return Ok(());
    }
    let bus = PubSub::new();
    let mut heard = bus.subscribe(&pubsub::message_channel("order_events"), 1024);
    let service = Service::start(
        &config,
        MemoryStatus::new(),
        bus.clone(),
        vec![Ledger.into()],
    )
    .await?;

    let mut expected = Vec::new();
    for order in 1..=20_i64 {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders VALUES ($1, 'new')")
            .bind(order)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_logical_emit_message(true, 'order_events', $1)")
            .bind(json!({ "order": order }).to_string())
            .execute(&mut *tx)
            .await?;
        // Another prefix: no operator here subscribes to it.
        sqlx::query("SELECT pg_logical_emit_message(true, 'audit', 'x')")
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE orders SET state = 'placed' WHERE id = $1")
            .bind(order)
            .execute(&mut *tx)
            .await?;
        if order % 5 == 0 {
            // Rolled back: neither its rows nor its message exist.
            tx.rollback().await?;
            continue;
        }
        tx.commit().await?;
        expected.extend([
            format!("insert {order}"),
            format!("message {order}"),
            format!("update {order}"),
        ]);
    }
    // Outside any transaction: not delivered (nothing orders it among the changes).
    sqlx::query("SELECT pg_logical_emit_message(false, 'order_events', '{\"order\": -1}')")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO orders VALUES (100, 'last')")
        .execute(&pool)
        .await?;
    expected.push("insert 100".to_owned());

    eventually("the ledger has every event", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
            .fetch_one(&pool)
            .await?;
        Ok(n >= expected.len() as i64)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<String> = sqlx::query_scalar("SELECT what FROM ledger ORDER BY n")
        .fetch_all(&pool)
        .await?;
    assert_eq!(seen, expected);

    // The pub/sub channel has the committed messages, in order, as events.
    let mut orders = Vec::new();
    while orders.len() < 16 {
        let event = tokio::time::timeout(PATIENCE, heard.recv()).await??;
        assert_eq!(event.kind, EventType::Message);
        orders.push(event.message_as::<serde_json::Value>()?["order"].as_i64());
    }
    let committed: Vec<Option<i64>> = (1..=20).filter(|o| o % 5 != 0).map(Some).collect();
    assert_eq!(orders, committed);
    service.stop().await?;
    Ok(())
}
