//! The replication core against a real PostgreSQL: events, their order, TOAST, truncate,
//! reconnecting, acknowledgement, and the definite failures.

use crate::common;
use crate::common::jsonb_text;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{PATIENCE, Streaming, slot_for};
use jsonb_text::jsonb_text;
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};
use streamex::decode::{Decoded, MAX_VALUE_DEPTH};
use streamex::metrics::StreamStats;
use streamex::replication::{Lsn, PublicationTables, SetupError, StreamError, setup};
use streamex::testing::{self, Cluster, StopMode};
use streamex::{Event, EventType};

const POSTS: &str = "CREATE TABLE posts (id bigint PRIMARY KEY, title text NOT NULL, likes int NOT NULL DEFAULT 0);";

fn record(event: &Event, which: &str) -> Value {
    let record = match which {
        "new" => &event.new_record,
        _ => &event.old_record,
    };
    record.clone().map(Value::from).unwrap_or(Value::Null)
}

#[tokio::test]
async fn insert_update_delete_under_replica_identity_default() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = Streaming::start(&url, POSTS).await?;
    let pool = s.pool.clone();
    sqlx::query("INSERT INTO posts VALUES (1, 'first', 0)")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE posts SET likes = 5 WHERE id = 1")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE posts SET id = 2 WHERE id = 1")
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM posts WHERE id = 2")
        .execute(&pool)
        .await?;
    let events = s.events(4).await?;

    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    use EventType::*;
    assert_eq!(kinds, [Insert, Update, Update, Delete]);
    for e in &events {
        assert_eq!(&*e.schema, "public");
        assert_eq!(&*e.entity, "posts");
        assert_eq!(e.ordinal, 0, "one change per transaction");
        assert!(e.unavailable_columns.is_empty());
        assert!(e.changes.is_none(), "no whole old row under DEFAULT");
    }
    assert_eq!(
        record(&events[0], "new"),
        json!({"id": 1, "title": "first", "likes": 0})
    );
    assert_eq!(record(&events[0], "old"), Value::Null);
    // Key unchanged: the server sends no old tuple; the old key is the new one.
    assert_eq!(
        record(&events[1], "new"),
        json!({"id": 1, "title": "first", "likes": 5})
    );
    assert_eq!(record(&events[1], "old"), json!({"id": 1}));
    // Key changed: the old key comes from the server.
    assert_eq!(record(&events[2], "old"), json!({"id": 1}));
    assert_eq!(record(&events[2], "new")["id"], json!(2));
    assert_eq!(record(&events[3], "old"), json!({"id": 2}));
    assert_eq!(record(&events[3], "new"), Value::Null);
    // WAL order, one transaction each.
    for pair in events.windows(2) {
        assert!(pair[0].commit_lsn < pair[1].commit_lsn);
        assert!(pair[0].xid != pair[1].xid);
    }
    for e in &events {
        assert!(e.lsn <= e.commit_lsn, "a change comes before its commit");
    }
    s.stop().await
}

#[tokio::test]
async fn replica_identity_full_gives_the_old_row_and_the_changes() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let schema = format!("{POSTS} ALTER TABLE posts REPLICA IDENTITY FULL;");
    let mut s = Streaming::start(&url, &schema).await?;
    let pool = s.pool.clone();
    sqlx::raw_sql(
        "INSERT INTO posts VALUES (1, 'first', 0);
         UPDATE posts SET likes = 5, title = 'First!' WHERE id = 1;
         UPDATE posts SET likes = 5 WHERE id = 1;
         DELETE FROM posts WHERE id = 1;",
    )
    .execute(&pool)
    .await?;
    let events = s.events(4).await?;
    let update = &events[1];
    assert_eq!(
        record(update, "old"),
        json!({"id": 1, "title": "first", "likes": 0})
    );
    let changes = update.changes.as_ref().expect("changes under FULL");
    let changed: Vec<&str> = changes.0.iter().map(|c| c.column.as_str()).collect();
    assert_eq!(changed, ["title", "likes"]);
    assert_eq!(changes.get("likes").unwrap().old_value, json!(0));
    assert_eq!(changes.get("likes").unwrap().new_value, json!(5));
    // An update that changes nothing has an empty list, not a missing one.
    assert_eq!(events[2].changes.as_ref().map(|c| c.is_empty()), Some(true));
    assert_eq!(
        record(&events[3], "old"),
        json!({"id": 1, "title": "First!", "likes": 5})
    );
    // All in one transaction (raw_sql sends one implicit transaction): ordinals count up.
    let ordinals: Vec<u64> = events.iter().map(|e| e.ordinal).collect();
    assert_eq!(ordinals, [0, 1, 2, 3]);
    s.stop().await
}

#[tokio::test]
async fn unchanged_toast_is_filled_under_full_and_listed_otherwise() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let schema = "
        CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
        ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
        CREATE TABLE full_docs (id int PRIMARY KEY, n int, body text);
        ALTER TABLE full_docs ALTER COLUMN body SET STORAGE EXTERNAL;
        ALTER TABLE full_docs REPLICA IDENTITY FULL;";
    let mut s = Streaming::start(&url, schema).await?;
    let pool = s.pool.clone();
    let body: String = "0123456789abcdef".repeat(1024);
    for table in ["docs", "full_docs"] {
        sqlx::query(&format!("INSERT INTO {table} VALUES (1, 0, $1)"))
            .bind(&body)
            .execute(&pool)
            .await?;
        sqlx::query(&format!("UPDATE {table} SET n = 1 WHERE id = 1"))
            .execute(&pool)
            .await?;
    }
    let events = s.events(4).await?;
    assert_eq!(events[0].new_record.as_ref().unwrap()["body"], json!(body));
    let update = &events[1];
    assert_eq!(&*update.entity, "docs");
    let new = update.new_record.as_ref().unwrap();
    assert!(
        !new.contains_key("body"),
        "an unsent value is absent, not null"
    );
    assert_eq!(update.unavailable_columns, ["body"]);
    assert_eq!(new["n"], json!(1));

    let update = &events[3];
    assert_eq!(&*update.entity, "full_docs");
    assert_eq!(update.new_record.as_ref().unwrap()["body"], json!(body));
    assert!(update.unavailable_columns.is_empty());
    assert!(update.changes.as_ref().unwrap().get("body").is_none());
    s.stop().await
}

#[tokio::test]
async fn truncate_and_multi_table_transactions_keep_their_order() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let schema = format!("{POSTS} CREATE TABLE tags (name text PRIMARY KEY);");
    let mut s = Streaming::start(&url, &schema).await?;
    let pool = s.pool.clone();
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO posts VALUES (1, 'a', 0)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO tags VALUES ('x')")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE posts SET likes = 1")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO tags VALUES ('y')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("TRUNCATE posts, tags").execute(&pool).await?;

    let mut items = Vec::new();
    while items.len() < 11 {
        let item = s.next().await?;
        let done = matches!(item, Decoded::Commit { .. });
        items.push(item);
        if done && items.len() > 6 {
            break;
        }
    }
    let Decoded::Begin {
        xid, commit_lsn, ..
    } = items[0].clone()
    else {
        panic!("a transaction starts with Begin: {:?}", items[0]);
    };
    let events: Vec<&Event> = items
        .iter()
        .filter_map(|i| match i {
            Decoded::Event(e) => Some(&**e),
            _ => None,
        })
        .collect();
    let seen: Vec<(&str, EventType, u64)> = events
        .iter()
        .map(|e| (&*e.entity, e.kind, e.ordinal))
        .collect();
    use EventType::*;
    assert_eq!(
        seen,
        [
            ("posts", Insert, 0),
            ("tags", Insert, 1),
            ("posts", Update, 2),
            ("tags", Insert, 3),
            ("posts", Truncate, 0),
            ("tags", Truncate, 1),
        ]
    );
    for e in &events[..4] {
        assert_eq!((e.xid, e.commit_lsn), (xid, commit_lsn));
    }
    let Decoded::Commit {
        commit_lsn: c,
        end_lsn,
        events: n,
        ..
    } = items[5].clone()
    else {
        panic!("the fourth change is followed by Commit: {:?}", items[5]);
    };
    assert_eq!((c, n), (commit_lsn, 4));
    assert!(end_lsn > commit_lsn);
    assert!(events[4].commit_lsn > end_lsn);
    assert!(events[4].new_record.is_none() && events[4].old_record.is_none());
    s.stop().await
}

#[tokio::test]
async fn values_equal_to_jsonb_of_the_same_row() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let schema = "
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN positive AS int CHECK (VALUE > 0);
        CREATE TYPE point2 AS (x float8, y float8, label text);
        CREATE TABLE everything (
            id int PRIMARY KEY, b bool, i2 smallint, i8 bigint, f4 real, f8 double precision,
            n numeric, t text, vc varchar(10), ch char(4), j json, jb jsonb, u uuid,
            d date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
            by bytea, m mood, p positive, pt point2, ints int[], texts text[], grid int[][],
            moods mood[], pts point2[], tstzs timestamptz[]);";
    let mut s = Streaming::start(&url, schema).await?;
    let pool = s.pool.clone();
    sqlx::raw_sql(
        r#"INSERT INTO everything VALUES
        (1, true, -32768, 9223372036854775807, 1.5, 0.1, 123456789012345678901234567890.123456789,
         'héllo "world" ✓', 'short', 'ab', '{"b": [1, 2.50, null], "a": {"x": "y"}}', '{"k": [true, false]}',
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-02-29 12:34:56.789',
         '2024-02-29 12:34:56.789+02', '23:59:59.999999', '12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.7',
         '\x00ff10', 'happy', 7, '(1.5,-2,"a, b")', '{1,NULL,3}', '{"a,b","c\"d",NULL,"NULL",""}',
         '{{1,2},{3,4}}', '{sad,happy}', '{"(1,2,x)","(3,4,)"}', '{"2024-01-01 00:00:00+00",infinity}'),
        (2, false, 0, -1, 'NaN', 'Infinity', 'NaN', '', NULL, NULL, '[]', '{}', NULL,
         'infinity', '-infinity', 'infinity', '00:00', '00:00+00', '-1 days', '\x', 'sad', 1,
         '(,,)', '{}', '{}', '{}', '{}', '{}', '{}'),
        (3, NULL, NULL, NULL, '-Infinity', '1e-7', '-0.000001', 'tab	and
newline', NULL, NULL, '"just a string"', '12.5000', NULL, '0044-03-15 BC', '2000-01-01', '1999-12-31 23:59:59.5-08',
         NULL, NULL, '0', NULL, NULL, NULL, NULL, '{{{1}}}', '{"\\"}', NULL, NULL, NULL, NULL);"#,
    )
    .execute(&pool)
    .await?;
    let events = s.events(3).await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("SET TimeZone = 'UTC'")
        .execute(&mut conn)
        .await?;
    for event in &events {
        let got = Value::from(event.new_record.clone().unwrap());
        let id = got["id"].clone();
        let text: String =
            sqlx::query_scalar("SELECT to_jsonb(e)::text FROM everything e WHERE id = $1")
                .bind(i32::try_from(id.as_i64().unwrap())?)
                .fetch_one(&mut conn)
                .await?;
        let want: Value = serde_json::from_str(&text)?;
        for (column, value) in want.as_object().unwrap() {
            assert_eq!(
                got.get(column),
                Some(value),
                "row {id}, column {column}: streamex vs to_jsonb"
            );
        }
        assert_eq!(got, want);
    }
    s.stop().await
}

#[tokio::test]
async fn every_committed_change_arrives_across_server_restarts() -> anyhow::Result<()> {
    let cluster = Cluster::start()?;
    let url = cluster.create_database().await?;
    let mut s = Streaming::start(&url, POSTS).await?;
    let mut expected = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut positions = BTreeSet::new();
    let mut next_id = 0i64;
    for round in 0..4 {
        // A fresh pool each round: the old one's connections died with the server.
        let pool = PgPool::connect(&url).await?;
        for _ in 0..5 {
            let mut tx = pool.begin().await?;
            for _ in 0..20 {
                next_id += 1;
                sqlx::query("INSERT INTO posts VALUES ($1, 'x', 0)")
                    .bind(next_id)
                    .execute(&mut *tx)
                    .await?;
                expected.insert(next_id);
            }
            tx.commit().await?;
        }
        pool.close().await;
        // Read part of it, then take the server away under the stream.
        for _ in 0..30 {
            if let Decoded::Event(e) = s.next().await? {
                positions.insert(e.position());
                seen.insert(e.new_record.as_ref().unwrap()["id"].as_i64().unwrap());
            }
        }
        let mode = if round % 2 == 0 {
            StopMode::Fast
        } else {
            StopMode::Immediate
        };
        cluster.restart(mode)?;
    }
    while seen.len() < expected.len() {
        if let Decoded::Event(e) = s.next().await? {
            positions.insert(e.position());
            seen.insert(e.new_record.as_ref().unwrap()["id"].as_i64().unwrap());
        }
    }
    assert_eq!(seen, expected, "every committed row arrives");
    assert!(positions.len() >= expected.len());
    s.stop().await
}

/// Reads the slot's confirmed position.
async fn confirmed(pool: &PgPool, slot: &str) -> anyhow::Result<Lsn> {
    let info = setup::slot_info(pool, slot).await?.expect("slot exists");
    Ok(info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO))
}

#[tokio::test]
async fn an_idle_slot_advances_while_another_database_is_written() -> anyhow::Result<()> {
    let quiet = testing::server().create_database().await?;
    let busy = testing::server().create_database().await?;
    let s = Streaming::start(&quiet, POSTS).await?;
    let pool = s.pool.clone();
    let before = confirmed(&pool, &slot_for(&quiet)).await?;
    let busy_pool = PgPool::connect(&busy).await?;
    sqlx::query("CREATE TABLE noise (id serial, pad text)")
        .execute(&busy_pool)
        .await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut target = None;
    loop {
        sqlx::query(
            "INSERT INTO noise (pad) SELECT repeat('x', 100) FROM generate_series(1, 1000)",
        )
        .execute(&busy_pool)
        .await?;
        let now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&busy_pool)
            .await?;
        let now: Lsn = now.parse()?;
        let target = *target.get_or_insert(now);
        if confirmed(&pool, &slot_for(&quiet)).await? >= target {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle slot stayed at {} (was {before}) while WAL went past {target}",
            confirmed(&pool, &slot_for(&quiet)).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.stop().await
}

#[tokio::test]
async fn nothing_unacknowledged_is_confirmed() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(POSTS).execute(&pool).await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, &slot_for(&url)).await?;
    let start = confirmed(&pool, &slot_for(&url)).await?;
    let mut s = Streaming::attach(&url, pool.clone(), |c| {
        c.status_interval = Duration::from_millis(200)
    })
    .await?;
    sqlx::query("INSERT INTO posts VALUES (1, 'a', 0)")
        .execute(&pool)
        .await?;
    // Receive the transaction without acknowledging it.
    let mut commit_end = None;
    while commit_end.is_none() {
        let item = tokio::time::timeout(PATIENCE, s.stream.items.recv())
            .await?
            .expect("stream open");
        if let Decoded::Commit { end_lsn, .. } = item {
            commit_end = Some(end_lsn);
        }
    }
    let end = commit_end.unwrap();
    // Keepalives and status updates go on; the slot must stay before the commit.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = confirmed(&pool, &slot_for(&url)).await?;
        assert!(
            now < end,
            "confirmed {now} passed unacknowledged commit end {end}"
        );
    }
    assert!(confirmed(&pool, &slot_for(&url)).await? >= start);
    s.stream.ack.ack(end);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while confirmed(&pool, &slot_for(&url)).await? < end {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ack never reached the slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await
}

#[tokio::test]
async fn a_slot_held_by_another_connection_is_waited_for() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(POSTS).execute(&pool).await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, &slot_for(&url)).await?;
    // Hold the slot with a first stream.
    let mut first = Streaming::attach(&url, pool.clone(), |_| {}).await?;
    sqlx::query("INSERT INTO posts VALUES (1, 'a', 0)")
        .execute(&pool)
        .await?;
    first.events(1).await?;
    // The second one is refused (55006, transient) and keeps trying.
    let mut second = Streaming::attach(&url, pool.clone(), |_| {}).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.stream.task.is_finished(),
        "a held slot is a reason to wait, not to stop"
    );
    first.stop().await?;
    sqlx::query("INSERT INTO posts VALUES (2, 'b', 0)")
        .execute(&pool)
        .await?;
    // Row 2 arrives (row 1 may come again if the first stream's last acknowledgement had
    // not reached the slot: at least once).
    loop {
        let event = second.events(1).await?.remove(0);
        let id = event.new_record.as_ref().unwrap()["id"].clone();
        assert!(id == json!(1) || id == json!(2), "unexpected row {id}");
        if id == json!(2) {
            break;
        }
    }
    second.stop().await
}

#[tokio::test]
async fn a_dropped_publication_stops_the_stream_and_says_so() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = Streaming::start(&url, POSTS).await?;
    let pool = s.pool.clone();
    sqlx::query("INSERT INTO posts VALUES (1, 'a', 0)")
        .execute(&pool)
        .await?;
    s.events(1).await?;
    sqlx::query("DROP PUBLICATION streamex")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO posts VALUES (2, 'b', 0)")
        .execute(&pool)
        .await?;
    let result = tokio::time::timeout(PATIENCE, &mut s.stream.task).await??;
    let error = result.expect_err("a dropped publication is definite");
    assert!(
        matches!(
            error,
            StreamError::Setup(SetupError::PublicationMissing { .. })
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("\"streamex\"") && message.contains("streamex setup"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_the_fix() -> anyhow::Result<()> {
    let cluster = Cluster::builder().setting("wal_level", "replica").start()?;
    let pool = PgPool::connect(&cluster.url("postgres")).await?;
    let error = setup::check_server(&pool)
        .await
        .expect_err("replica is not enough");
    assert!(matches!(error, SetupError::WalLevel { ref current } if current == "replica"));
    assert!(error.to_string().contains("wal_level = logical"));
    Ok(())
}

#[tokio::test]
async fn a_role_without_replication_is_refused_with_the_fix() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::query("DO $$ BEGIN CREATE ROLE plain_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        .execute(&pool)
        .await?;
    let mut as_reader = url::Url::parse(&url)?;
    as_reader.set_username("plain_reader").unwrap();
    let reader = PgPool::connect(as_reader.as_str()).await?;
    let error = setup::check_server(&reader)
        .await
        .expect_err("no REPLICATION");
    assert!(matches!(error, SetupError::NotReplicationRole { ref role } if role == "plain_reader"));
    assert!(
        error
            .to_string()
            .contains("ALTER ROLE \"plain_reader\" REPLICATION")
    );
    Ok(())
}

#[tokio::test]
async fn an_invalidated_slot_is_refused_with_what_was_lost() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .setting("max_slot_wal_keep_size", "1MB")
        .setting("max_wal_size", "32MB")
        .setting("min_wal_size", "32MB")
        .start()?;
    let url = cluster.create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(POSTS).execute(&pool).await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, &slot_for(&url)).await?;
    sqlx::query("CREATE TABLE filler (pad text)")
        .execute(&pool)
        .await?;
    for _ in 0..10 {
        sqlx::raw_sql(
            "INSERT INTO filler SELECT repeat(md5(random()::text), 20) FROM generate_series(1, 5000);
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .execute(&pool)
        .await?;
        let slot = setup::slot_info(&pool, &slot_for(&url)).await?.unwrap();
        if slot.wal_status.as_deref() == Some("lost") {
            break;
        }
    }
    let slot = setup::slot_info(&pool, &slot_for(&url)).await?.unwrap();
    assert_eq!(slot.wal_status.as_deref(), Some("lost"));
    let error = setup::check_slot(&pool, &slot).await.expect_err("lost WAL");
    assert!(matches!(error, SetupError::SlotInvalidated { .. }));
    let message = error.to_string();
    assert!(
        message.contains(&format!("pg_drop_replication_slot('{}')", slot_for(&url))),
        "{message}"
    );
    assert!(message.contains("max_slot_wal_keep_size"), "{message}");

    // Unless the configuration says to recreate it.
    let config = streamex::config::Config::parse(
        &format!(
            "database_url = {url:?}\nslot = {:?}\n[replication]\nrecreate_invalidated_slot = true",
            slot_for(&url)
        ),
        "test.toml",
        std::iter::empty(),
    )?;
    common::prepare(&config).await?;
    let slot = setup::slot_info(&pool, &slot_for(&url)).await?.unwrap();
    assert_ne!(slot.wal_status.as_deref(), Some("lost"));
    Ok(())
}

/// Schema changes while streaming: each event is decoded with the table's columns and types
/// as they were when it was written (pgoutput sends a new Relation message after a change),
/// and tables and enum labels created after the start come through.
#[tokio::test]
async fn schema_changes_while_streaming_decode_with_the_new_shape() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = Streaming::start(
        &url,
        "CREATE TYPE mood AS ENUM ('calm');
         CREATE TABLE posts (id bigint PRIMARY KEY, title text NOT NULL, likes int NOT NULL DEFAULT 0);",
    )
    .await?;
    let pool = s.pool.clone();
    // Each statement in its own transaction (a new enum label is usable only after commit).
    for statement in [
        "INSERT INTO posts VALUES (1, 'one', 1)",
        "ALTER TABLE posts ADD COLUMN tags text[] DEFAULT '{a}', ADD COLUMN mood mood",
        "INSERT INTO posts VALUES (2, 'two', 2, '{x,y}', 'calm')",
        "ALTER TABLE posts ALTER COLUMN likes TYPE numeric(10,2)",
        "INSERT INTO posts VALUES (3, 'three', 3.5)",
        "ALTER TABLE posts DROP COLUMN title",
        "ALTER TABLE posts RENAME COLUMN likes TO score",
        "ALTER TYPE mood ADD VALUE 'stormy'",
        "INSERT INTO posts (id, score, mood) VALUES (4, 4, 'stormy')",
        "CREATE TABLE late (id int PRIMARY KEY, note text)",
        "INSERT INTO late VALUES (1, 'new table')",
        "UPDATE posts SET score = 5 WHERE id = 1",
    ] {
        sqlx::raw_sql(statement).execute(&pool).await?;
    }
    let events = s.events(6).await?;
    // numeric(10,2) keeps its scale, as to_jsonb does: 3.50, not 3.5.
    let num = |digits: &str| Value::Number(digits.parse().expect("a number"));
    let rows: Vec<(String, Value)> = events
        .iter()
        .map(|e| (e.entity.to_string(), record(e, "new")))
        .collect();
    assert_eq!(
        rows,
        [
            ("posts".into(), json!({"id": 1, "title": "one", "likes": 1})),
            (
                "posts".into(),
                json!({"id": 2, "title": "two", "likes": 2, "tags": ["x", "y"], "mood": "calm"})
            ),
            (
                "posts".into(),
                json!({"id": 3, "title": "three", "likes": num("3.50"), "tags": ["a"], "mood": null})
            ),
            (
                "posts".into(),
                json!({"id": 4, "score": num("4.00"), "tags": ["a"], "mood": "stormy"})
            ),
            ("late".into(), json!({"id": 1, "note": "new table"})),
            (
                "posts".into(),
                json!({"id": 1, "score": num("5.00"), "tags": ["a"], "mood": null})
            ),
        ]
    );
    // The same values as the server's own to_jsonb of the rows now.
    let now: Value = sqlx::query_scalar("SELECT to_jsonb(p) FROM posts p WHERE id = 4")
        .fetch_one(&pool)
        .await?;
    assert_eq!(record(&events[3], "new"), now);
    s.stop().await
}

/// A stream on `url` after `schema`, whose reconnects are counted in the returned stats.
async fn counted_stream(url: &str, schema: &str) -> anyhow::Result<(Streaming, Arc<StreamStats>)> {
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, &slot_for(url)).await?;
    let stats = Arc::new(StreamStats::default());
    let counted = stats.clone();
    let s = Streaming::attach(url, pool, |c| c.stats = counted).await?;
    Ok((s, stats))
}

/// A jsonb document `depth` arrays and objects deep, in turn, around a leaf with a number the
/// server normalises and a string with escapes.
fn nested_jsonb(depth: usize) -> String {
    let mut text = String::new();
    for i in 0..depth {
        text.push_str(if i % 2 == 0 { "[" } else { r#"{"k": "# });
    }
    text.push_str(r#"{"n": 1.50e1, "s": "tab\t \"q\" \u00e9"}"#);
    for i in (0..depth).rev() {
        text.push(if i % 2 == 0 { ']' } else { '}' });
    }
    text
}

#[tokio::test]
async fn a_value_too_deep_to_decode_is_reported_and_the_stream_goes_on() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let (mut s, stats) = counted_stream(
        &url,
        "CREATE TABLE docs (id int PRIMARY KEY, doc jsonb, note text);",
    )
    .await?;
    let pool = s.pool.clone();
    // The server keeps jsonb some 10,000 levels deep; streamex decodes 256 (the leaf object
    // counts as one level).
    let too_deep = nested_jsonb(3000);
    let at_limit = nested_jsonb(MAX_VALUE_DEPTH - 1);
    for (id, doc) in [
        (1, "{\"a\": 1}".to_owned()),
        (2, too_deep),
        (3, "[]".to_owned()),
        (4, at_limit),
    ] {
        sqlx::query("INSERT INTO docs VALUES ($1, $2::jsonb, 'note')")
            .bind(id)
            .bind(doc)
            .execute(&pool)
            .await?;
    }
    sqlx::query("UPDATE docs SET note = 'later' WHERE id = 2")
        .execute(&pool)
        .await?;
    let events = s.events(5).await?;
    let ids: Vec<Value> = events
        .iter()
        .map(|e| record(e, "new")["id"].clone())
        .collect();
    assert_eq!(ids, [json!(1), json!(2), json!(3), json!(4), json!(2)]);
    for (i, e) in events[..4].iter().enumerate() {
        assert_eq!(
            e.decode_error.is_some(),
            i == 1,
            "event {i}: {:?}",
            e.decode_error
        );
    }
    let bad = &events[1];
    assert_eq!(bad.kind, EventType::Insert);
    assert_eq!(record(bad, "new"), json!({"id": 2, "note": "note"}));
    assert!(bad.unavailable_columns.is_empty());
    assert!(bad.lsn <= bad.commit_lsn && bad.commit_lsn > events[0].commit_lsn);
    let message = bad.decode_error.as_deref().unwrap();
    assert!(
        message.starts_with(&format!(
            "column public.docs.doc of the change at {}",
            bad.lsn
        )),
        "{message}"
    );
    assert!(
        message.contains("nested more than 256 levels deep"),
        "{message}"
    );
    assert!(
        !message.contains("tab") && !message.contains('['),
        "{message}"
    );
    // The update leaves the document as it was: unsent (a TOASTed value), or sent and
    // reported again.
    let later = &events[4];
    assert_eq!(record(later, "new"), json!({"id": 2, "note": "later"}));
    assert!(
        later.unavailable_columns == ["doc"] || later.decode_error.is_some(),
        "{later:?}"
    );

    // Just within the limit, the value is exactly what to_jsonb gives.
    let want: String = sqlx::query_scalar("SELECT to_jsonb(d)::text FROM docs d WHERE id = 4")
        .fetch_one(&pool)
        .await?;
    let got = Value::from(events[3].new_record.clone().unwrap());
    assert_eq!(jsonb_text(&got), want);
    assert!(want.contains(r#""n": 15.0"#));
    assert_eq!(stats.reconnects(), 0, "the stream never had to start over");
    s.stop().await
}

/// A type created and dropped in the transaction that used it: the catalog no longer has it
/// when the change is decoded, so its values come as their text.
#[tokio::test]
async fn a_type_dropped_before_its_rows_are_decoded_comes_as_text() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let (mut s, stats) = counted_stream(&url, POSTS).await?;
    let pool = s.pool.clone();
    sqlx::raw_sql(
        "BEGIN;
         CREATE TYPE mood AS ENUM ('a');
         ALTER TABLE posts ADD COLUMN m mood;
         INSERT INTO posts (id, title, m) VALUES (1, 'with mood', 'a');
         ALTER TABLE posts DROP COLUMN m;
         DROP TYPE mood;
         COMMIT;",
    )
    .execute(&pool)
    .await?;
    sqlx::query("INSERT INTO posts VALUES (2, 'after', 0)")
        .execute(&pool)
        .await?;
    let events = s.events(2).await?;
    assert_eq!(
        record(&events[0], "new"),
        json!({"id": 1, "title": "with mood", "likes": 0, "m": "a"})
    );
    assert_eq!(events[0].decode_error, None);
    assert_eq!(
        record(&events[1], "new"),
        json!({"id": 2, "title": "after", "likes": 0})
    );
    assert_eq!(stats.reconnects(), 0, "no reconnect loop");
    s.stop().await
}

#[tokio::test]
async fn generated_columns_are_listed_as_unavailable_unless_published() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = Streaming::start(
        &url,
        "CREATE TABLE items (id int PRIMARY KEY, price numeric, tax numeric GENERATED ALWAYS AS (price * 0.2) STORED,
                             dropped int, label text, shout text GENERATED ALWAYS AS (upper(label)) STORED);
         ALTER TABLE items DROP COLUMN dropped;
         CREATE TABLE plain (id int PRIMARY KEY);
         ALTER TABLE items REPLICA IDENTITY FULL;",
    )
    .await?;
    let pool = s.pool.clone();
    sqlx::raw_sql(
        "INSERT INTO items (id, price, label) VALUES (1, 10, 'x');
         UPDATE items SET price = 20 WHERE id = 1;
         DELETE FROM items WHERE id = 1;
         INSERT INTO plain VALUES (1);",
    )
    .execute(&pool)
    .await?;
    let events = s.events(4).await?;
    let (insert, update, delete, plain) = (&events[0], &events[1], &events[2], &events[3]);
    let changed: Vec<&str> = update
        .changes
        .as_ref()
        .unwrap()
        .0
        .iter()
        .map(|c| c.column.as_str())
        .collect();
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await?;
    if version >= 180_000 {
        // PostgreSQL 18 publishes stored generated columns (streamex asks it to): they are
        // ordinary columns of the record.
        let new = record(insert, "new");
        assert_eq!(
            new.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["id", "price", "tax", "label", "shout"]
        );
        assert_eq!(new["tax"].to_string(), "2.0");
        assert_eq!(new["shout"], json!("X"));
        assert!(insert.unavailable_columns.is_empty());
        assert!(update.unavailable_columns.is_empty());
        assert_eq!(record(update, "new")["tax"].to_string(), "4.0");
        assert_eq!(changed, ["price", "tax"]);
    } else {
        assert_eq!(
            record(insert, "new"),
            json!({"id": 1, "price": 10, "label": "x"})
        );
        assert_eq!(insert.unavailable_columns, ["tax", "shout"]);
        assert_eq!(update.unavailable_columns, ["tax", "shout"]);
        assert_eq!(changed, ["price"]);
    }
    assert_eq!(record(update, "new")["price"], json!(20));
    assert!(delete.unavailable_columns.is_empty());
    assert!(plain.unavailable_columns.is_empty());
    s.stop().await
}
