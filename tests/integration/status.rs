//! The status module against a real PostgreSQL: migrations, the PostgreSQL backend under the
//! same contract as the memory one, `streamex.processed()` from SQL, checkpoints, operator
//! state, dead letters and transactions.

use chrono::NaiveDate;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use streamex::status::{
    self, MemoryStatus, OperatorRunState, PostgresStatus, ProcessStatusStorage, StatusBackend,
    StatusError, StatusItem, contract,
};
use streamex::{Lsn, Position};

/// The slot the tests of the free functions key their rows on (no slot of that name need
/// exist).
const SLOT: &str = "s";

async fn fresh_pool() -> anyhow::Result<PgPool> {
    let url = streamex::testing::server().create_database().await?;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?)
}

async fn migrated_pool_at(url: &str) -> anyhow::Result<PgPool> {
    let pool = PgPool::connect(url).await?;
    status::migrate(&pool).await?;
    Ok(pool)
}

async fn migrated_pool() -> anyhow::Result<PgPool> {
    let pool = fresh_pool().await?;
    status::migrate(&pool).await?;
    Ok(pool)
}

/// µs since the Unix epoch of a UTC date and time, computed in Rust.
fn micros(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, us: u32) -> i64 {
    NaiveDate::from_ymd_opt(y, mo, d)
        .and_then(|date| date.and_hms_micro_opt(h, mi, s, us))
        .expect("valid date")
        .and_utc()
        .timestamp_micros()
}

// ---------------------------------------------------------------------------------------------
// Migrations.

#[tokio::test]
async fn migrate_twice_keeps_bookkeeping_in_streamex_and_search_path_untouched()
-> anyhow::Result<()> {
    let url = streamex::testing::server().create_database().await?;
    // One connection only: whatever migrate() did to a pooled connection would show.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    let before: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&pool)
        .await?;
    status::migrate(&pool).await?;
    status::migrate(&pool).await?;

    let public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        public, None,
        "sqlx's bookkeeping table must not be in public"
    );
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM streamex._sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await?;
    assert_eq!(applied, migrations());

    let after: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        after, before,
        "migrate must not leave a pooled connection changed"
    );

    for table in [
        "process_status",
        "operator_checkpoints",
        "operator_state",
        "dead_letters",
    ] {
        let comment: Option<String> = sqlx::query_scalar(
            "SELECT obj_description(to_regclass('streamex.' || $1), 'pg_class')",
        )
        .bind(table)
        .fetch_one(&pool)
        .await?;
        assert!(comment.is_some(), "{table} has no comment");
    }
    let comment: Option<String> = sqlx::query_scalar(
        "SELECT obj_description('streamex.processed(text, timestamptz)'::regprocedure, 'pg_proc')",
    )
    .fetch_one(&pool)
    .await?;
    assert!(comment.is_some(), "streamex.processed has no comment");
    Ok(())
}

#[tokio::test]
async fn concurrent_migrates_from_two_processes_both_succeed() -> anyhow::Result<()> {
    for _ in 0..3 {
        let url = streamex::testing::server().create_database().await?;
        // Two pools stand for two processes starting at once.
        let a = PgPool::connect(&url).await?;
        let b = PgPool::connect(&url).await?;
        let (ra, rb) = tokio::join!(status::migrate(&a), status::migrate(&b));
        ra?;
        rb?;
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM streamex._sqlx_migrations")
            .fetch_one(&a)
            .await?;
        assert_eq!(applied, migrations());
    }
    Ok(())
}

#[tokio::test]
async fn migrate_works_when_the_schema_already_exists() -> anyhow::Result<()> {
    let pool = fresh_pool().await?;
    sqlx::query("CREATE SCHEMA streamex").execute(&pool).await?;
    status::migrate(&pool).await?;
    status::migrate(&pool).await?;
    Ok(())
}

#[tokio::test]
async fn errors_before_migrate_name_what_failed_and_are_not_transient() -> anyhow::Result<()> {
    let pool = fresh_pool().await?;
    let err = PostgresStatus::new(pool)
        .load()
        .await
        .expect_err("no table yet");
    assert!(matches!(err, StatusError::Sql { .. }), "{err:?}");
    assert_eq!(err.sqlstate().as_deref(), Some("42P01"));
    assert!(!err.is_transient());
    assert!(err.to_string().contains("loading process status"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The storage contract, once for each backend.

#[tokio::test]
async fn memory_status_passes_the_contract() {
    contract::check(&MemoryStatus::new()).await;
    contract::check(&StatusBackend::Memory(MemoryStatus::new())).await;
}

#[tokio::test]
async fn postgres_status_passes_the_contract() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    contract::check(&PostgresStatus::new(pool.clone())).await;
    contract::check(&StatusBackend::from(PostgresStatus::new(pool))).await;
    Ok(())
}

#[tokio::test]
async fn items_processed_collapses_duplicates_in_one_batch() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let status = PostgresStatus::new(pool.clone());
    status.item_processed("posts", 100, Lsn(0x100)).await?;
    let batch: Vec<StatusItem> = (0..50)
        .flat_map(|i| {
            [
                StatusItem::new("posts", 50 + i, Lsn(0x50 + i as u64)),
                StatusItem::new("comments", 1_000 - i, Lsn(0x10 + i as u64)),
            ]
        })
        .collect();
    status.items_processed(&batch).await?;
    assert_eq!(
        status.load().await?,
        vec![
            StatusItem::new("comments", 1_000, Lsn(0x10 + 49)),
            StatusItem::new("posts", 100, Lsn(0x100)),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_batches_do_not_deadlock_or_go_backwards() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let entities: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let mut tasks = Vec::new();
    for worker in 0..4i64 {
        let pool = pool.clone();
        let mut entities = entities.clone();
        if worker % 2 == 1 {
            entities.reverse();
        }
        tasks.push(tokio::spawn(async move {
            for round in 0..10i64 {
                let items: Vec<StatusItem> = entities
                    .iter()
                    .map(|e| {
                        let t = round * 10 + worker;
                        StatusItem::new(e.clone(), t, Lsn(u64::try_from(t).unwrap()))
                    })
                    .collect();
                status::store_items(&pool, &items).await?;
            }
            Ok::<_, StatusError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let items = status::load_items(&pool).await?;
    assert_eq!(items.len(), 20);
    for item in items {
        assert_eq!((item.timestamp, item.lsn), (93, Lsn(93)), "{}", item.entity);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// streamex.processed() from plain SQL.

async fn processed_sql(pool: &PgPool, entity: &str, ts: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT streamex.processed($1, $2::text::timestamptz)")
            .bind(entity)
            .bind(ts)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn sql_processed_follows_the_same_rule() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let at = micros(2024, 5, 6, 7, 8, 9, 123_456);
    status::store_item(&pool, "posts", at, Lsn(0x1_0000_0001)).await?;

    assert!(!processed_sql(&pool, "comments", "2000-01-01 00:00:00+00").await?);
    assert!(processed_sql(&pool, "posts", "2024-05-06 07:08:09.123456+00").await?);
    assert!(processed_sql(&pool, "posts", "2024-05-06 07:08:09.123455+00").await?);
    assert!(!processed_sql(&pool, "posts", "2024-05-06 07:08:09.123457+00").await?);
    // The same instant written in another zone.
    assert!(processed_sql(&pool, "posts", "2024-05-06 12:38:09.123456+05:30").await?);
    assert!(!processed_sql(&pool, "posts", "2024-05-06 12:38:09.123457+05:30").await?);
    assert!(processed_sql(&pool, "posts", "-infinity").await?);
    assert!(!processed_sql(&pool, "posts", "infinity").await?);
    let null: bool = sqlx::query_scalar("SELECT streamex.processed('posts', NULL)")
        .fetch_one(&pool)
        .await?;
    assert!(!null, "a NULL timestamp is not processed");

    // The typical application query: the updated_at of its own write.
    sqlx::query("CREATE TABLE posts (id int PRIMARY KEY, updated_at timestamptz NOT NULL)")
        .execute(&pool)
        .await?;
    let written: i64 = sqlx::query_scalar(
        "INSERT INTO posts VALUES (1, now()) RETURNING streamex.epoch_micros(updated_at)",
    )
    .fetch_one(&pool)
    .await?;
    let asks = "SELECT streamex.processed('posts', updated_at) FROM posts WHERE id = 1";
    assert!(!sqlx::query_scalar::<_, bool>(asks).fetch_one(&pool).await?);
    status::store_item(&pool, "posts", written - 1, Lsn(0x2_0000_0000)).await?;
    assert!(!sqlx::query_scalar::<_, bool>(asks).fetch_one(&pool).await?);
    status::store_item(&pool, "posts", written, Lsn(0x2_0000_0000)).await?;
    assert!(sqlx::query_scalar::<_, bool>(asks).fetch_one(&pool).await?);
    Ok(())
}

#[tokio::test]
async fn epoch_micros_is_exact_in_any_session_time_zone() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let cases = [
        (
            "2024-05-06 07:08:09.123456+00",
            micros(2024, 5, 6, 7, 8, 9, 123_456),
        ),
        (
            "2038-01-19 03:14:07.999999+00",
            micros(2038, 1, 19, 3, 14, 7, 999_999),
        ),
        ("1970-01-01 00:00:00+00", 0),
        ("1969-12-31 23:59:59.999999+00", -1),
        (
            "1900-03-04 05:06:07.000001+00",
            micros(1900, 3, 4, 5, 6, 7, 1),
        ),
        (
            "2262-04-11 23:47:16.854775+00",
            micros(2262, 4, 11, 23, 47, 16, 854_775),
        ),
    ];
    let mut conn = pool.acquire().await?;
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
    ] {
        sqlx::query(&format!("SET TIME ZONE '{zone}'"))
            .execute(&mut *conn)
            .await?;
        for (text, expected) in cases {
            let got: i64 =
                sqlx::query_scalar("SELECT streamex.epoch_micros($1::text::timestamptz)")
                    .bind(text)
                    .fetch_one(&mut *conn)
                    .await?;
            assert_eq!(got, expected, "{text} in {zone}");
        }
    }
    sqlx::query("RESET TIME ZONE").execute(&mut *conn).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checkpoints, operator state, dead letters.

#[tokio::test]
async fn advance_checkpoint_moves_only_from_where_it_is_and_forwards() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let at = |lsn, ordinal| Some(Position::new(Lsn(lsn), ordinal));
    assert!(
        status::advance_checkpoint(&pool, SLOT, "op", None, Position::new(Lsn(0x10), 2)).await?
    );
    assert!(
        !status::advance_checkpoint(&pool, SLOT, "op", None, Position::new(Lsn(0x20), 0)).await?,
        "there is one now"
    );
    assert!(
        !status::advance_checkpoint(&pool, SLOT, "op", at(0x10, 1), Position::new(Lsn(0x20), 0))
            .await?,
        "not where it is"
    );
    assert!(
        !status::advance_checkpoint(&pool, SLOT, "op", at(0x10, 2), Position::new(Lsn(0x10), 1))
            .await?,
        "backwards"
    );
    assert_eq!(
        status::load_checkpoint(&pool, SLOT, "op").await?,
        Some(Position::new(Lsn(0x10), 2))
    );
    assert!(
        status::advance_checkpoint(&pool, SLOT, "op", at(0x10, 2), Position::new(Lsn(0x20), 0))
            .await?
    );
    assert_eq!(
        status::load_checkpoint(&pool, SLOT, "op").await?,
        Some(Position::new(Lsn(0x20), 0))
    );
    assert_eq!(status::load_checkpoint(&pool, SLOT, "other").await?, None);
    // A checkpoint deleted by hand is written again.
    assert!(
        status::advance_checkpoint(
            &pool,
            SLOT,
            "other",
            at(0x10, 1),
            Position::new(Lsn(0x10), 2)
        )
        .await?
    );
    Ok(())
}

#[tokio::test]
async fn store_checkpoint_never_moves_backwards() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    assert!(status::load_checkpoints(&pool, SLOT).await?.is_empty());
    assert!(status::store_checkpoint(&pool, SLOT, "op", Lsn(0x10), 5).await?);
    assert!(
        !status::store_checkpoint(&pool, SLOT, "op", Lsn(0x10), 5).await?,
        "same position"
    );
    assert!(
        !status::store_checkpoint(&pool, SLOT, "op", Lsn(0x10), 4).await?,
        "older ordinal"
    );
    assert!(
        !status::store_checkpoint(&pool, SLOT, "op", Lsn(0x0F), 100).await?,
        "older lsn"
    );
    assert_eq!(
        status::load_checkpoints(&pool, SLOT).await?["op"],
        Position::new(Lsn(0x10), 5)
    );
    assert!(status::store_checkpoint(&pool, SLOT, "op", Lsn(0x10), 6).await?);
    assert!(status::store_checkpoint(&pool, SLOT, "op", Lsn(0x1_0000_0000), 0).await?);
    assert!(status::store_checkpoint(&pool, SLOT, "other", Lsn(0x1), 0).await?);
    let checkpoints = status::load_checkpoints(&pool, SLOT).await?;
    assert_eq!(checkpoints.len(), 2);
    assert_eq!(checkpoints["op"], Position::new(Lsn(0x1_0000_0000), 0));
    assert_eq!(checkpoints["other"], Position::new(Lsn(0x1), 0));

    let err = status::store_checkpoint(&pool, SLOT, "op", Lsn(0x2_0000_0000), u64::MAX)
        .await
        .expect_err("an ordinal beyond bigint");
    assert!(matches!(err, StatusError::Invalid { .. }), "{err:?}");
    assert_eq!(
        status::load_checkpoints(&pool, SLOT).await?["op"],
        Position::new(Lsn(0x1_0000_0000), 0)
    );
    Ok(())
}

#[tokio::test]
async fn operator_state_halts_survives_a_new_pool_and_runs_again() -> anyhow::Result<()> {
    let url = streamex::testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    status::migrate(&pool).await?;
    assert!(status::load_operator_states(&pool, SLOT).await?.is_empty());
    status::set_operator_halted(&pool, SLOT, "mailer", "first", Lsn(0x1), 1, 1).await?;
    status::set_operator_halted(
        &pool,
        SLOT,
        "mailer",
        "boom: smtp refused",
        Lsn(0x2_0000_00AB),
        7,
        3,
    )
    .await?;
    status::set_operator_running(&pool, SLOT, "indexer").await?;
    pool.close().await;

    // As after a restart.
    let pool = PgPool::connect(&url).await?;
    let states = status::load_operator_states(&pool, SLOT).await?;
    assert_eq!(states.len(), 2);
    let mailer = &states["mailer"];
    assert_eq!(mailer.operator, "mailer");
    assert_eq!(mailer.state, OperatorRunState::Halted);
    assert_eq!(mailer.last_error.as_deref(), Some("boom: smtp refused"));
    assert_eq!(mailer.failed_commit_lsn, Some(Lsn(0x2_0000_00AB)));
    assert_eq!(mailer.failed_ordinal, Some(7));
    assert_eq!(mailer.attempts, Some(3));
    let now = streamex::replication::now_unix_micros();
    let at = mailer.error_at_micros.expect("error_at");
    assert!(
        (now - at).abs() < 60_000_000,
        "error_at {at} far from now {now}"
    );
    assert_eq!(states["indexer"].state, OperatorRunState::Running);
    assert_eq!(states["indexer"].last_error, None);

    status::set_operator_running(&pool, SLOT, "mailer").await?;
    let mailer = &status::load_operator_states(&pool, SLOT).await?["mailer"];
    assert_eq!(mailer.state, OperatorRunState::Running);
    assert_eq!(mailer.last_error, None);
    assert_eq!(mailer.error_at_micros, None);
    assert_eq!(mailer.failed_commit_lsn, None);
    assert_eq!(mailer.failed_ordinal, None);
    assert_eq!(mailer.attempts, None);
    Ok(())
}

#[tokio::test]
async fn dead_letter_insert_is_idempotent() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let event: serde_json::Value = serde_json::from_str(
        r#"{"type":"insert","table":"posts","new_record":{"id":1,"price":12345678901234567890.123456789,"title":"héllo"}}"#,
    )?;
    assert!(
        status::insert_dead_letter(
            &pool,
            SLOT,
            "mailer",
            Position::new(Lsn(0x1_0000_0010), 2),
            &event,
            "boom",
            5
        )
        .await?
    );
    assert!(
        !status::insert_dead_letter(
            &pool,
            SLOT,
            "mailer",
            Position::new(Lsn(0x1_0000_0010), 2),
            &event,
            "again",
            6
        )
        .await?,
        "a replay must not duplicate the dead letter"
    );
    assert!(
        status::insert_dead_letter(
            &pool,
            SLOT,
            "mailer",
            Position::new(Lsn(0x1_0000_0010), 3),
            &json!({"n": 3}),
            "x",
            1
        )
        .await?
    );
    assert!(
        status::insert_dead_letter(
            &pool,
            SLOT,
            "indexer",
            Position::new(Lsn(0x1_0000_0010), 2),
            &event,
            "y",
            1
        )
        .await?
    );

    let letters = status::list_dead_letters(&pool, SLOT, 10).await?;
    assert_eq!(letters.len(), 3);
    let first = &letters[0];
    assert_eq!(first.operator, "mailer");
    assert_eq!(first.commit_lsn, Lsn(0x1_0000_0010));
    assert_eq!(first.ordinal, 2);
    assert_eq!(first.event, event, "the event comes back exactly");
    assert_eq!(first.error, "boom", "the first dead letter is kept");
    assert_eq!(first.attempts, 5);
    assert!(first.created_at_micros > 0);
    assert!(letters[0].id < letters[1].id && letters[1].id < letters[2].id);
    assert_eq!(status::list_dead_letters(&pool, SLOT, 1).await?.len(), 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Per slot.

/// Two slots on one database with an operator of the same name: its checkpoint, its halt and
/// its dead letters on one slot are not the other's.
#[tokio::test]
async fn operator_rows_of_one_slot_are_not_another_slot_s() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    assert!(status::store_checkpoint(&pool, "a", "mailer", Lsn(0x30), 1).await?);
    // The same position on the other slot is a move there: not "already at or past it".
    assert!(status::store_checkpoint(&pool, "b", "mailer", Lsn(0x10), 0).await?);
    assert!(
        status::advance_checkpoint(
            &pool,
            "b",
            "mailer",
            Some(Position::new(Lsn(0x10), 0)),
            Position::new(Lsn(0x20), 0)
        )
        .await?,
        "b's checkpoint moves from where b left it, whatever a's is"
    );
    assert_eq!(
        status::load_checkpoint(&pool, "a", "mailer").await?,
        Some(Position::new(Lsn(0x30), 1))
    );
    assert_eq!(
        status::load_checkpoints(&pool, "b").await?["mailer"],
        Position::new(Lsn(0x20), 0)
    );

    status::set_operator_halted(&pool, "a", "mailer", "smtp refused", Lsn(0x31), 0, 6).await?;
    assert_eq!(
        status::load_operator_states(&pool, "a").await?["mailer"].state,
        OperatorRunState::Halted
    );
    assert!(status::load_operator_states(&pool, "b").await?.is_empty());
    assert_eq!(
        status::set_operator_running_skipping(&pool, "b", "mailer").await?,
        None,
        "not halted on b"
    );
    status::set_operator_running(&pool, "b", "mailer").await?;
    assert_eq!(
        status::load_operator_states(&pool, "a").await?["mailer"].state,
        OperatorRunState::Halted,
        "resuming on b leaves a halted"
    );

    let event = json!({"id": 1});
    for slot in ["a", "b"] {
        assert!(
            status::insert_dead_letter(
                &pool,
                slot,
                "mailer",
                Position::new(Lsn(0x31), 0),
                &event,
                "x",
                6
            )
            .await?,
            "the same event is a dead letter of each slot"
        );
    }
    assert_eq!(status::list_dead_letters(&pool, "a", 10).await?.len(), 1);
    assert!(status::list_dead_letters(&pool, "c", 10).await?.is_empty());
    Ok(())
}

/// A database migrated by a streamex from before operator state was kept per slot: 0001 and
/// 0002 only, applied as sqlx applies them, with `search_path = streamex`.
async fn migrated_before_slots(url: &str) -> anyhow::Result<PgPool> {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir()?;
    for file in ["0001_streamex.sql", "0002_skip_current.sql"] {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("sql")
                .join(file),
            dir.path().join(file),
        )?;
    }
    let old = sqlx::migrate::Migrator::new(dir.path()).await?;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql("CREATE SCHEMA streamex; SET search_path TO streamex")
        .execute(&mut conn)
        .await?;
    old.run(&mut conn).await?;
    conn.close().await?;
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(
        "INSERT INTO streamex.operator_checkpoints (operator, commit_lsn, ordinal)
              VALUES ('tallies', '0/100', 3);
         INSERT INTO streamex.operator_state
              (operator, state, last_error, error_at, failed_commit_lsn, failed_ordinal, attempts)
              VALUES ('tallies', 'halted', 'boom', now(), '0/200', 1, 4);
         INSERT INTO streamex.dead_letters (operator, commit_lsn, ordinal, event, error, attempts)
              VALUES ('counts', '0/150', 0, '{}', 'bad', 2);",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

/// `(table, slot, operator)` of every checkpoint, state and dead letter.
async fn keyed_rows(pool: &PgPool) -> anyhow::Result<Vec<(String, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT 'checkpoint', slot, operator FROM streamex.operator_checkpoints
         UNION ALL SELECT 'state', slot, operator FROM streamex.operator_state
         UNION ALL SELECT 'dead letter', slot, operator FROM streamex.dead_letters
         ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await?)
}

fn rows(slots: &[&str]) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for (table, operator) in [
        ("checkpoint", "tallies"),
        ("dead letter", "counts"),
        ("state", "tallies"),
    ] {
        for slot in slots {
            rows.push((table.to_owned(), (*slot).to_owned(), operator.to_owned()));
        }
    }
    rows
}

async fn create_slot(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

async fn drop_slot(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// Rows written before operator state was kept per slot are adopted by the slot that was in
/// use: the database's one slot when there is one (whatever slot the configuration that
/// migrates names), each of several, or, with none, the slot of the first configuration to
/// set up.
#[tokio::test]
async fn rows_from_before_slots_are_adopted_by_the_slot_in_use() -> anyhow::Result<()> {
    let service = |url: &str, slot: &str| {
        let mut config = streamex::config::Config::new(url);
        config.slot = slot.to_owned();
        async move {
            streamex::Service::builder().config(config).build().await?;
            anyhow::Ok(())
        }
    };

    // One slot: the rows are its, though the configuration that migrates names another.
    let url = streamex::testing::server().create_database().await?;
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    let pool = migrated_before_slots(&url).await?;
    let (in_use, configured) = (format!("{name}_old"), format!("{name}_new"));
    create_slot(&pool, &in_use).await?;
    service(&url, &configured).await?;
    assert_eq!(keyed_rows(&pool).await?, rows(&[&in_use]));
    let states = status::load_operator_states(&pool, &in_use).await?;
    assert_eq!(states["tallies"].last_error.as_deref(), Some("boom"));
    assert!(
        status::load_operator_states(&pool, &configured)
            .await?
            .is_empty()
    );
    drop_slot(&pool, &in_use).await?;
    drop_slot(&pool, &configured).await?;

    // Several slots shared the rows: each gets them.
    let url = streamex::testing::server().create_database().await?;
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    let pool = migrated_before_slots(&url).await?;
    let (one, two) = (format!("{name}_1"), format!("{name}_2"));
    create_slot(&pool, &one).await?;
    create_slot(&pool, &two).await?;
    status::migrate(&pool).await?;
    assert_eq!(keyed_rows(&pool).await?, rows(&[&one, &two]));
    assert_eq!(status::count_unkeyed_rows(&pool).await?, 0);
    drop_slot(&pool, &one).await?;
    drop_slot(&pool, &two).await?;

    // No slot: the migration cannot tell; the first configuration to set up adopts them.
    let url = streamex::testing::server().create_database().await?;
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    let pool = migrated_before_slots(&url).await?;
    status::migrate(&pool).await?;
    assert_eq!(keyed_rows(&pool).await?, rows(&[""]));
    assert_eq!(status::count_unkeyed_rows(&pool).await?, 3);
    service(&url, &name).await?;
    assert_eq!(keyed_rows(&pool).await?, rows(&[&name]));
    let later = format!("{name}_later");
    service(&url, &later).await?;
    assert_eq!(
        keyed_rows(&pool).await?,
        rows(&[&name]),
        "a second configuration adopts nothing"
    );
    drop_slot(&pool, &name).await?;
    drop_slot(&pool, &later).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transactions.

#[tokio::test]
async fn writes_in_a_callers_transaction_roll_back_and_commit_with_it() -> anyhow::Result<()> {
    let pool = migrated_pool().await?;
    let items = [
        StatusItem::new("posts", 10, Lsn(0x10)),
        StatusItem::new("comments", 20, Lsn(0x20)),
    ];

    let mut tx = pool.begin().await?;
    status::store_items(&mut *tx, &items).await?;
    status::store_item(&mut *tx, "users", 1, Lsn(1)).await?;
    status::store_checkpoint(&mut *tx, SLOT, "op", Lsn(0x20), 1).await?;
    status::set_operator_halted(&mut *tx, SLOT, "op", "boom", Lsn(0x20), 2, 3).await?;
    status::insert_dead_letter(
        &mut *tx,
        SLOT,
        "op",
        Position::new(Lsn(0x20), 2),
        &json!({}),
        "boom",
        3,
    )
    .await?;
    // Visible inside the transaction...
    assert_eq!(status::load_items(&mut *tx).await?.len(), 3);
    assert!(status::is_processed(&mut *tx, "posts", 10).await?);
    tx.rollback().await?;

    // ...and gone with it.
    assert!(status::load_items(&pool).await?.is_empty());
    assert!(status::load_checkpoints(&pool, SLOT).await?.is_empty());
    assert!(status::load_operator_states(&pool, SLOT).await?.is_empty());
    assert!(status::list_dead_letters(&pool, SLOT, 10).await?.is_empty());

    let mut tx = pool.begin().await?;
    status::store_items(&mut *tx, &items).await?;
    status::store_checkpoint(&mut *tx, SLOT, "op", Lsn(0x20), 1).await?;
    tx.commit().await?;
    assert_eq!(
        status::load_items(&pool).await?,
        vec![
            StatusItem::new("comments", 20, Lsn(0x20)),
            StatusItem::new("posts", 10, Lsn(0x10)),
        ]
    );
    assert_eq!(
        status::load_checkpoints(&pool, SLOT).await?["op"],
        Position::new(Lsn(0x20), 1)
    );
    Ok(())
}

#[tokio::test]
async fn a_terminated_connection_is_a_transient_error() -> anyhow::Result<()> {
    use sqlx::Connection;
    let url = streamex::testing::server().create_database().await?;
    let pool = migrated_pool_at(&url).await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await?;
    assert!(terminated);
    // Until it is gone (pg_terminate_backend's own wait, its second argument, needs
    // PostgreSQL 14).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
    )
    .bind(pid)
    .fetch_one(&pool)
    .await?
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "backend {pid} still runs 10 s after pg_terminate_backend"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let err = status::load_items(&mut conn)
        .await
        .expect_err("the connection was terminated");
    assert!(err.is_transient(), "{err:?} should be transient");
    assert!(
        status::load_items(&pool).await?.is_empty(),
        "the pool still works"
    );
    Ok(())
}

/// How many migrations `sql/` holds: each is applied exactly once.
fn migrations() -> i64 {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    let count = std::fs::read_dir(dir)
        .expect("the sql directory")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    i64::try_from(count).expect("a few migrations")
}
