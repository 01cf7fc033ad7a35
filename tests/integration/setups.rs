//! Derived data stays right in ordinary PostgreSQL setups: tables of the same name in two
//! schemas, partitioned tables, publications that must follow the configuration, TRUNCATE,
//! `integer` ids, process status that does not claim what has not happened.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use streamex::config::Config;
use streamex::pubsub::PubSub;
use streamex::status::PostgresStatus;
use streamex::testing;

use crate::common;

use common::{BLOG, PATIENCE, Service, derived_mismatches, settle, slot_for};

/// The example configuration pointed at `url`, each `(from, to)` of `replace` applied to its
/// text, `extra` appended, with quick retries.
fn config(url: &str, replace: &[(&str, &str)], extra: &str) -> anyhow::Result<Config> {
    let mut text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/streamex.toml"))?;
    for (from, to) in replace {
        anyhow::ensure!(text.contains(from), "the example has no {from:?}");
        text = text.replace(from, to);
    }
    let text = format!("{text}\n{extra}");
    Ok(Config::parse(
        &text,
        "config/streamex.toml",
        [
            ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
            ("STREAMEX_SLOT".to_owned(), slot_for(url)),
            ("STREAMEX_RETRY__INITIAL".to_owned(), "10ms".to_owned()),
            ("STREAMEX_RETRY__MAX".to_owned(), "20ms".to_owned()),
            ("STREAMEX_RETRY__RETRIES".to_owned(), "1".to_owned()),
        ],
    )?)
}

/// A fresh database holding `schema`.
async fn database(schema: &str) -> anyhow::Result<(String, PgPool)> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    Ok((url, pool))
}

/// Waits until `sql` (a boolean query) is true.
async fn until(pool: &PgPool, what: &str, sql: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let done: bool = sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await
            .unwrap_or(false);
        if done {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ARCHIVE: &str = "CREATE SCHEMA archive;
CREATE TABLE archive.comments (
    id bigserial PRIMARY KEY,
    post_id bigint NOT NULL,
    body text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE archive.comments REPLICA IDENTITY FULL;";

/// `comments` means `public.comments`: the comments of `archive.comments` count for neither
/// blog operator, and have channels and process status of their own.
#[tokio::test]
async fn a_table_of_the_same_name_in_another_schema_is_another_entity() -> anyhow::Result<()> {
    let (url, pool) = database(&format!("{BLOG}\n{ARCHIVE}")).await?;
    let config = config(
        &url,
        &[(
            r#"tables = ["posts", "comments"]"#,
            r#"tables = ["posts", "comments", "archive.comments"]"#,
        )],
        "",
    )?;
    let pubsub = PubSub::new();
    let mut public = pubsub.subscribe("comments", 64);
    let mut archive = pubsub.subscribe("archive.comments", 64);
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        pubsub.clone(),
        operators,
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one');
         INSERT INTO comments (post_id) VALUES (1);
         INSERT INTO archive.comments (post_id) SELECT 1 FROM generate_series(1, 5);",
    )
    .execute(&pool)
    .await?;
    settle(&pool).await?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let (count, tally): (i32, i32) = sqlx::query_as(
        "SELECT comments_count, comments FROM post_with_comments_counts
           JOIN post_comment_tallies ON post_id = id WHERE id = 1",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((count, tally), (1, 1));
    let entities: Vec<String> =
        sqlx::query_scalar("SELECT entity FROM streamex.process_status ORDER BY entity")
            .fetch_all(&pool)
            .await?;
    assert_eq!(entities, ["archive.comments", "comments", "posts"]);
    let event = public.recv().await?;
    assert_eq!((&*event.schema, &*event.entity), ("public", "comments"));
    for _ in 0..5 {
        let event = archive.recv().await?;
        assert_eq!(
            (&*event.schema, &*event.table, &*event.entity),
            ("archive", "comments", "archive.comments")
        );
    }
    assert!(
        public.try_recv()?.is_none(),
        "archive's comments on channel comments"
    );
    service.stop().await
}

/// An operator listening to `posts` that halts on a post titled `poison`.
const TITLES: &str =
    "CREATE TABLE titles (id bigint PRIMARY KEY, title text NOT NULL CHECK (title <> 'poison'));";

const TITLES_OPERATOR: &str = r#"
[[operators]]
name = "titles"
query = "INSERT INTO titles SELECT id, title FROM posts WHERE id = $1 ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title"
id = { posts = "id" }
"#;

/// A halted operator holds back the process status of the entities it listens to, and of no
/// other.
#[tokio::test]
async fn a_halted_operator_holds_back_only_the_entities_it_listens_to() -> anyhow::Result<()> {
    let (url, pool) = database(&format!("{BLOG}\n{TITLES}")).await?;
    // The tallies listen to comments only, titles to posts only.
    let config = config(
        &url,
        &[(
            r#"name = "post_with_comments_counts""#,
            r#"name = "unused""#,
        )],
        TITLES_OPERATOR,
    )?;
    let config = Config {
        operators: config
            .operators
            .into_iter()
            .filter(|o| o.name != "unused")
            .collect(),
        ..config
    };
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await?;
    let poisoned: String = sqlx::query_scalar(
        "INSERT INTO posts (title) VALUES ('poison') RETURNING updated_at::text",
    )
    .fetch_one(&pool)
    .await?;
    until(
        &pool,
        "titles halts",
        "SELECT EXISTS (SELECT 1 FROM streamex.operator_state WHERE operator = 'titles' AND state = 'halted')",
    )
    .await?;
    let comment: String = sqlx::query_scalar(
        "INSERT INTO comments (post_id) SELECT id FROM posts RETURNING updated_at::text",
    )
    .fetch_one(&pool)
    .await?;
    until(
        &pool,
        "the comment is processed while titles is halted",
        &format!("SELECT streamex.processed('comments', '{comment}')"),
    )
    .await?;
    let post_processed: bool =
        sqlx::query_scalar("SELECT streamex.processed('posts', $1::timestamptz)")
            .bind(&poisoned)
            .fetch_one(&pool)
            .await?;
    assert!(
        !post_processed,
        "the poisoned post is not processed while its operator is halted"
    );
    let tally: i32 = sqlx::query_scalar("SELECT comments FROM post_comment_tallies")
        .fetch_one(&pool)
        .await?;
    assert_eq!(tally, 1);
    service.stop().await
}

/// A row whose timestamp lies in the future does not make later writes look processed.
#[tokio::test]
async fn a_future_timestamp_does_not_make_later_writes_look_processed() -> anyhow::Result<()> {
    let (url, pool) = database(&format!("{BLOG}\n{TITLES}")).await?;
    let config = config(&url, &[], TITLES_OPERATOR)?;
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await?;
    sqlx::query("INSERT INTO posts (title, updated_at) VALUES ('future', '2099-01-01')")
        .execute(&pool)
        .await?;
    until(
        &pool,
        "the future post is copied",
        "SELECT EXISTS (SELECT 1 FROM titles WHERE title = 'future')",
    )
    .await?;
    let poisoned: String = sqlx::query_scalar(
        "INSERT INTO posts (title) VALUES ('poison') RETURNING updated_at::text",
    )
    .fetch_one(&pool)
    .await?;
    until(
        &pool,
        "titles halts",
        "SELECT EXISTS (SELECT 1 FROM streamex.operator_state WHERE operator = 'titles' AND state = 'halted')",
    )
    .await?;
    let processed: bool = sqlx::query_scalar("SELECT streamex.processed('posts', $1::timestamptz)")
        .bind(&poisoned)
        .fetch_one(&pool)
        .await
        .context("asking process status")?;
    assert!(
        !processed,
        "a write made after the future-dated one, never processed, is reported processed"
    );
    service.stop().await
}

const MEASUREMENTS: &str = "
CREATE TABLE measurements (id bigint NOT NULL, at date NOT NULL, v int NOT NULL, PRIMARY KEY (id, at))
    PARTITION BY RANGE (at);
CREATE TABLE m2023 PARTITION OF measurements FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE m2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurement_copies (id bigint PRIMARY KEY, v int NOT NULL);
-- A publication made by hand, publishing partitions under their own names.
CREATE PUBLICATION streamex FOR TABLE measurements;
";

const COPIES: &str = r#"
database_url = "postgres://unused"
tables = ["measurements"]
[[operators]]
name = "copies"
query = "INSERT INTO measurement_copies SELECT id, v FROM measurements WHERE id = $1 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"
id = { measurements = "id" }
"#;

fn config_text(url: &str, text: &str) -> anyhow::Result<Config> {
    Ok(Config::parse(
        text,
        "test.toml",
        [
            ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
            ("STREAMEX_SLOT".to_owned(), slot_for(url)),
        ],
    )?)
}

/// A partitioned table's rows arrive as events of the partitioned table, from every
/// partition, including one created and one attached while streaming.
#[tokio::test]
async fn the_rows_of_partitions_are_events_of_their_partitioned_table() -> anyhow::Result<()> {
    let (url, pool) = database(MEASUREMENTS).await?;
    let config = config_text(&url, COPIES)?;
    let pubsub = PubSub::new();
    let mut channel = pubsub.subscribe("measurements", 64);
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        pubsub.clone(),
        operators,
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO measurements VALUES (1, '2023-05-01', 10), (2, '2024-05-01', 20);
         CREATE TABLE m2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO measurements VALUES (3, '2025-05-01', 30);
         CREATE TABLE m2026 (id bigint NOT NULL, at date NOT NULL, v int NOT NULL, PRIMARY KEY (id, at));
         ALTER TABLE measurements ATTACH PARTITION m2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         INSERT INTO measurements VALUES (4, '2026-05-01', 40);
         UPDATE measurements SET v = v + 1 WHERE id = 2;",
    )
    .execute(&pool)
    .await?;
    until(
        &pool,
        "every measurement is copied",
        "SELECT array_agg(v ORDER BY id) = '{10,21,30,40}' FROM measurement_copies",
    )
    .await?;
    for _ in 0..5 {
        let event = channel.recv().await?;
        assert_eq!(&*event.entity, "measurements");
    }
    let via_root: bool =
        sqlx::query_scalar("SELECT pubviaroot FROM pg_publication WHERE pubname = 'streamex'")
            .fetch_one(&pool)
            .await?;
    assert!(
        via_root,
        "set up changes the publication to publish via the root"
    );
    service.stop().await
}

/// The publication publishes exactly the configured tables, after every set-up.
#[tokio::test]
async fn the_publication_follows_the_configured_tables() -> anyhow::Result<()> {
    let (url, pool) = database(BLOG).await?;
    let published = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'streamex' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
    };
    let with_tables =
        |tables: &str| config_text(&url, &format!("database_url = \"x\"\ntables = [{tables}]"));
    common::prepare(&with_tables(r#""posts""#)?).await?;
    assert_eq!(published().await?, ["posts"]);
    common::prepare(&with_tables(r#""posts", "comments""#)?).await?;
    assert_eq!(published().await?, ["comments", "posts"]);
    common::prepare(&with_tables(r#""comments""#)?).await?;
    assert_eq!(published().await?, ["comments"]);

    // A publication of some tables does not silently become one of all tables.
    let error = common::prepare(&with_tables("")?).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("every table") && message.contains("publication"),
        "{message}"
    );
    assert_eq!(published().await?, ["comments"]);

    // An operator listening to a table that is not published is refused, by name.
    let config = config_text(
        &url,
        "database_url = \"x\"\ntables = [\"comments\"]\n[[operators]]\nname = \"post_comment_tallies\"\n\
         [[operators]]\nname = \"titles\"\nquery = \"SELECT $1\"\nid = { posts = \"id\" }",
    )?;
    let operators = streamex::operators::build(&config.operators)?;
    let error = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await
    .err()
    .context("the service started")?;
    let message = format!("{error:#}");
    assert!(
        message.contains("titles")
            && message.contains("public.posts")
            && message.contains("tables"),
        "{message}"
    );
    Ok(())
}

/// Instances started together all get through set-up.
#[tokio::test]
async fn concurrent_setups_all_succeed() -> anyhow::Result<()> {
    let (url, _pool) = database(BLOG).await?;
    let config = config(&url, &[], "")?;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, config) = (url.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let _ = url;
            common::prepare(&config).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

const TRUNCATES: &str = "TRUNCATE comments; INSERT INTO posts (title) VALUES ('after');";

/// TRUNCATE reaches both blog operators: the declarative one runs its truncate_query, the
/// tallies go to 0; TRUNCATE of posts cascades to comments in the same message.
#[tokio::test]
async fn truncate_reaches_the_blog_operators() -> anyhow::Result<()> {
    let (url, pool) = database(BLOG).await?;
    let config = config(&url, &[], "")?;
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two');
         INSERT INTO comments (post_id, body) SELECT 1 + i % 2, 'c' FROM generate_series(1, 10) i;",
    )
    .execute(&pool)
    .await?;
    settle(&pool).await?;
    sqlx::raw_sql(TRUNCATES).execute(&pool).await?;
    settle(&pool).await?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let counts: Vec<i32> =
        sqlx::query_scalar("SELECT comments_count FROM post_with_comments_counts WHERE id <= 2")
            .fetch_all(&pool)
            .await?;
    assert_eq!(counts, [0, 0]);
    // Comments again, in the same transaction as a truncate of both tables and new rows.
    sqlx::raw_sql(
        "INSERT INTO comments (post_id, body) SELECT 1, 'c' FROM generate_series(1, 3);
         BEGIN;
         INSERT INTO comments (post_id) VALUES (2);
         TRUNCATE posts CASCADE;
         INSERT INTO posts (id, title) VALUES (7, 'seven');
         INSERT INTO comments (post_id) VALUES (7), (7);
         COMMIT;",
    )
    .execute(&pool)
    .await?;
    settle(&pool).await?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT id, comments_count FROM post_with_comments_counts WHERE id <= 7 ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(rows, [(7, 2)]);
    service.stop().await
}

const TAGS: &str = "
CREATE TABLE tags (name text PRIMARY KEY);
CREATE TABLE tag_uses (id serial PRIMARY KEY, tag text NOT NULL);
ALTER TABLE tag_uses REPLICA IDENTITY FULL;
CREATE TABLE tag_counts (name text PRIMARY KEY, uses bigint NOT NULL);
";

/// Without truncate_query, a truncate recomputes every id found in the source tables.
#[tokio::test]
async fn truncate_recomputes_every_id_without_a_truncate_query() -> anyhow::Result<()> {
    let kit = testing::OperatorTest::start(TAGS).await?;
    let operator = streamex::operator::SqlOperator::builder("tag_counts")
        .query(
            "INSERT INTO tag_counts (name, uses)
             SELECT t.name, (SELECT count(*) FROM tag_uses u WHERE u.tag = t.name)
               FROM tags t WHERE t.name = $1
             ON CONFLICT (name) DO UPDATE SET uses = EXCLUDED.uses",
        )
        .id("tags", "name")
        .id("tag_uses", "tag")
        .build()?;
    let operator = std::sync::Arc::new(operator);
    kit.run(
        operator.clone(),
        &[
            "INSERT INTO tags VALUES ('a'), ('b')",
            "INSERT INTO tag_uses (tag) VALUES ('a'), ('a'), ('b')",
        ],
    )
    .await?;
    kit.run(
        operator,
        &[
            "TRUNCATE tag_uses",
            "INSERT INTO tag_uses (tag) VALUES ('b')",
        ],
    )
    .await?;
    let counts: Vec<(String, i64)> = kit
        .query_as("SELECT name, uses FROM tag_counts ORDER BY name")
        .await?;
    assert_eq!(counts, [("a".to_owned(), 0), ("b".to_owned(), 1)]);
    Ok(())
}

const IDS: &str = "
CREATE TABLE small (id smallserial PRIMARY KEY, v text NOT NULL);
CREATE TABLE medium (id serial PRIMARY KEY, v text NOT NULL);
CREATE TABLE exact (id numeric PRIMARY KEY, v text NOT NULL);
CREATE TABLE copies (kind text NOT NULL, id text NOT NULL, v text NOT NULL, PRIMARY KEY (kind, id));
";

fn copier(table: &str) -> anyhow::Result<std::sync::Arc<streamex::operator::SqlOperator>> {
    Ok(std::sync::Arc::new(
        streamex::operator::SqlOperator::builder(&format!("copy_{table}"))
            .query(&format!(
                "INSERT INTO copies SELECT '{table}', id::text, v FROM {table} WHERE id = $1
                 ON CONFLICT (kind, id) DO UPDATE SET v = EXCLUDED.v"
            ))
            .id(table, "id")
            .delete_with(
                table,
                &format!("DELETE FROM copies WHERE kind = '{table}' AND id = $1::text"),
            )
            .build()?,
    ))
}

/// `smallint`, `integer` and `numeric` ids are bound as the type the statement expects, for
/// one event, two, and many in a batch.
#[tokio::test]
async fn ids_of_every_integer_width_and_numeric_are_bound_as_their_type() -> anyhow::Result<()> {
    // No retries: a first attempt that fails (as binding the wrong width did, on the
    // connection where the statement was described) must show.
    let kit = testing::OperatorTest::start(IDS)
        .await?
        .retry(streamex::config::RetryConfig {
            retries: 0,
            ..Default::default()
        });
    for table in ["small", "medium", "exact"] {
        let operator = copier(table)?;
        let (id1, ids2, ids_many) = if table == "exact" {
            ("1.5", "(2.25, 'b'), (3, 'c')", "4.125")
        } else {
            ("DEFAULT", "(DEFAULT, 'b'), (DEFAULT, 'c')", "DEFAULT")
        };
        kit.run(
            operator.clone(),
            &[&format!("INSERT INTO {table} VALUES ({id1}, 'a')")],
        )
        .await?;
        kit.run(
            operator.clone(),
            &[&format!("INSERT INTO {table} VALUES {ids2}")],
        )
        .await?;
        let many: Vec<String> = (0..20)
            .map(|i| {
                if table == "exact" {
                    format!("({}.5, 'm{i}')", 10 + i)
                } else {
                    format!("(DEFAULT, 'm{i}')")
                }
            })
            .collect();
        kit.run(
            operator.clone(),
            &[
                &format!("INSERT INTO {table} VALUES {}", many.join(", ")),
                &format!("UPDATE {table} SET v = v || '!'"),
                &format!("DELETE FROM {table} WHERE v LIKE 'b%'"),
                &format!("INSERT INTO {table} VALUES ({ids_many}, 'z')"),
            ],
        )
        .await?;
        let wrong: i64 = kit
            .query_scalar::<i64>(&format!(
                "SELECT count(*) FROM (
                   (SELECT id::text, v FROM {table} EXCEPT SELECT id, v FROM copies WHERE kind = '{table}')
                   UNION ALL
                   (SELECT id, v FROM copies WHERE kind = '{table}' EXCEPT SELECT id::text, v FROM {table})) d"
            ))
            .await?[0];
        assert_eq!(wrong, 0, "{table}");
        let copied: Vec<i64> = kit
            .query_scalar(&format!(
                "SELECT count(*) FROM copies WHERE kind = '{table}'"
            ))
            .await?;
        assert_eq!(copied, [23], "{table}");
    }
    Ok(())
}

/// A server restart, or the end of the instance lock's connection alone, does not stop a
/// single instance: it stops processing, takes the lock again and goes on.
/// The instance lock's session ended again and again, each time as soon as the lock is
/// granted (before the instance has taken its operators' locks and started streaming): the
/// instance takes it again every time instead of exiting, and loses nothing.
#[tokio::test]
async fn an_instance_lock_ended_as_soon_as_it_is_taken_is_taken_again() -> anyhow::Result<()> {
    let cluster = testing::Cluster::start()?;
    let url = cluster.create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    let text = common::blog_config(&url, &slot);
    anyhow::ensure!(
        text.contains("lease = \"30s\""),
        "the example's [lock] lease line moved"
    );
    // A short lease: the instance notices a lost session within a second.
    std::fs::write(&config, text.replace("lease = \"30s\"", "lease = \"3s\""))?;
    let log = dir.path().join("streamex.log");
    common::setup_service(&config)?;
    let mut child = common::spawn_service(&config, &log, "info")?;
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    sqlx::raw_sql("INSERT INTO posts (id, title) VALUES (1, 'one');")
        .execute(&pool)
        .await?;
    settle(&pool).await.with_context(logged)?;

    let deadline = tokio::time::Instant::now() + PATIENCE;
    for round in 0..8 {
        sqlx::query(&format!(
            "INSERT INTO comments (post_id) SELECT 1 FROM generate_series(1, {})",
            round + 1
        ))
        .execute(&pool)
        .await?;
        // Poll tightly, so that the session is ended moments after the lock is granted.
        loop {
            let ended: Option<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                  WHERE locktype = 'advisory' AND granted AND objsubid = 1
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
            )
            .bind(format!("streamex slot {slot}"))
            .fetch_optional(&pool)
            .await?;
            if ended == Some(true) {
                break;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "streamex run exited in round {round} ({status}):\n{}",
                    logged()
                );
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the instance never took its lock again (round {round}):\n{}",
                logged()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    settle(&pool).await.with_context(logged)?;
    if let Some(status) = child.try_wait()? {
        anyhow::bail!("streamex run exited ({status}):\n{}", logged());
    }
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let tally: i32 =
        sqlx::query_scalar("SELECT comments FROM post_comment_tallies WHERE post_id = 1")
            .fetch_one(&pool)
            .await?;
    assert_eq!(tally, (1..=8).sum::<i32>(), "one tally per comment");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(child.id())?, libc::SIGTERM) };
    let status = child.wait()?;
    assert!(status.success(), "{status}\n{}", logged());
    Ok(())
}

#[tokio::test]
async fn a_lost_instance_lock_is_taken_again_instead_of_exiting() -> anyhow::Result<()> {
    let cluster = testing::Cluster::start()?;
    let url = cluster.create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(&config, common::blog_config(&url, &slot_for(&url)))?;
    let log = dir.path().join("streamex.log");
    common::setup_service(&config)?;
    let mut child = common::spawn_service(&config, &log, "info")?;
    let alive = |child: &mut std::process::Child| -> anyhow::Result<()> {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "streamex run exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    };
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one'); INSERT INTO comments (post_id) VALUES (1);",
    )
    .execute(&pool)
    .await?;
    settle(&pool)
        .await
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;

    cluster.restart(testing::StopMode::Fast)?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("INSERT INTO comments (post_id) VALUES (1), (1);")
        .execute(&pool)
        .await?;
    settle(&pool)
        .await
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    alive(&mut child)?;

    // The instance notices the restart within seconds and takes the lock again.
    until(
        &pool,
        "the instance holds its lock again",
        &format!(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE l.locktype = 'advisory' AND l.granted
                AND a.application_name = 'streamex instance {}')",
            slot_for(&url)
        ),
    )
    .await?;
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = $1) t",
    )
    .bind(format!("streamex instance {}", slot_for(&url)))
    .fetch_one(&pool)
    .await?;
    assert_eq!(ended, 1, "the lock's connection");
    sqlx::raw_sql("INSERT INTO comments (post_id) VALUES (1);")
        .execute(&pool)
        .await?;
    settle(&pool)
        .await
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    alive(&mut child)?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let tally: i32 =
        sqlx::query_scalar("SELECT comments FROM post_comment_tallies WHERE post_id = 1")
            .fetch_one(&pool)
            .await?;
    assert_eq!(tally, 4);

    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(child.id())?, libc::SIGTERM) };
    let status = child.wait()?;
    assert!(
        status.success(),
        "{status}\n{}",
        std::fs::read_to_string(&log)?
    );
    Ok(())
}

const NOTES: &str = "
CREATE TABLE notes (id serial PRIMARY KEY, owner int NOT NULL);
CREATE TABLE owner_notes (owner int PRIMARY KEY, notes bigint NOT NULL);
";

/// A delete under REPLICA IDENTITY DEFAULT lacks the id column: the operator halts saying that
/// the change cannot be re-read, and `resume --skip-current` sets exactly that change aside.
#[tokio::test]
async fn resume_skip_current_sets_the_failed_event_aside() -> anyhow::Result<()> {
    let kit = testing::OperatorTest::start(NOTES).await?;
    let operator = std::sync::Arc::new(
        streamex::operator::SqlOperator::builder("owner_notes")
            .query(
                "INSERT INTO owner_notes SELECT $1, (SELECT count(*) FROM notes WHERE owner = $1)
                 ON CONFLICT (owner) DO UPDATE SET notes = EXCLUDED.notes",
            )
            .id("notes", "owner")
            .build()?,
    );
    let error = kit
        .run(
            operator.clone(),
            &[
                "INSERT INTO notes (owner) VALUES (1), (1), (2)",
                "DELETE FROM notes WHERE id = 1",
            ],
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("REPLICA IDENTITY FULL") && error.contains("--skip-current"),
        "{error}"
    );
    let halted_at: (String, i64) = sqlx::query_as(
        "SELECT failed_commit_lsn::text, failed_ordinal FROM streamex.operator_state WHERE operator = 'owner_notes'",
    )
    .fetch_one(kit.pool())
    .await?;
    let skipped =
        streamex::status::set_operator_running_skipping(kit.pool(), kit.slot(), "owner_notes")
            .await?;
    assert_eq!(
        skipped.map(|p| (p.commit_lsn.to_string(), p.ordinal as i64)),
        Some(halted_at.clone())
    );
    kit.run(
        operator,
        &[
            "ALTER TABLE notes REPLICA IDENTITY FULL",
            "DELETE FROM notes WHERE id = 2",
            "INSERT INTO notes (owner) VALUES (2)",
        ],
    )
    .await?;
    let dead: Vec<(String, i64, String)> = kit
        .query_as("SELECT commit_lsn::text, ordinal, error FROM streamex.dead_letters")
        .await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].0.clone(), dead[0].1), halted_at);
    assert!(dead[0].2.contains("--skip-current"), "{}", dead[0].2);
    // The later changes were applied: the recomputations match the table again.
    let rows: Vec<(i32, i64)> = kit
        .query_as("SELECT owner, notes FROM owner_notes ORDER BY owner")
        .await?;
    assert_eq!(rows, [(1, 0), (2, 2)]);
    Ok(())
}

/// A value streamex cannot decode (nested deeper than it decodes) is set aside for the
/// operators that listen to its table, per their policy, and never stops the stream; a deep
/// value it does decode comes back whole from the dead letters.
#[tokio::test]
async fn an_undecodable_change_is_dead_lettered_and_the_stream_goes_on() -> anyhow::Result<()> {
    let kit = testing::OperatorTest::start(
        "CREATE TABLE docs (id int PRIMARY KEY, doc jsonb NOT NULL);
         CREATE TABLE doc_ids (id int PRIMARY KEY);",
    )
    .await?
    .retry(streamex::config::RetryConfig {
        retries: 0,
        on_failure: streamex::config::FailurePolicy::DeadLetter,
        ..Default::default()
    });
    let operator = std::sync::Arc::new(
        streamex::operator::SqlOperator::builder("doc_ids")
            .query("INSERT INTO doc_ids SELECT id FROM docs WHERE id = $1 ON CONFLICT DO NOTHING")
            .id("docs", "id")
            .build()?,
    );
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    kit.run(
        operator,
        &[
            "INSERT INTO docs VALUES (1, '{}')",
            &format!(
                "INSERT INTO docs VALUES (2, '{}')",
                nested(streamex::decode::MAX_VALUE_DEPTH * 10)
            ),
            "INSERT INTO docs VALUES (3, '[]')",
        ],
    )
    .await?;
    let ids: Vec<i32> = kit
        .query_scalar("SELECT id FROM doc_ids ORDER BY id")
        .await?;
    assert_eq!(ids, [1, 3]);
    let dead = streamex::status::list_dead_letters(kit.pool(), kit.slot(), 10).await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].error.contains("could not be decoded"),
        "{}",
        dead[0].error
    );
    assert!(dead[0].event["decode_error"].is_string());
    assert!(dead[0].event["new_record"].get("doc").is_none());
    Ok(())
}

/// `streamex setup` checks a declarative operator's statements and id columns, naming the
/// operator, instead of failing at the first event.
#[tokio::test]
async fn setup_refuses_a_declarative_operator_that_cannot_run() -> anyhow::Result<()> {
    let (url, _pool) = database(BLOG).await?;
    let dir = tempfile::tempdir()?;
    let base = common::blog_config(&url, &slot_for(&url));
    for (broken, expected) in [
        (
            "INSERT INTO post_with_comments_counts",
            "INSERT INTO post_with_comment_counts",
        ),
        (
            r#"id = { posts = "id", comments = "post_id" }"#,
            r#"id = { posts = "idd", comments = "post_id" }"#,
        ),
    ] {
        let text = base.replacen(broken, expected, 1);
        assert_ne!(text, base);
        let config = dir.path().join("streamex.toml");
        std::fs::write(&config, text)?;
        let output = common::streamex_command("warn")
            .args(["setup", "--config"])
            .arg(&config)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "setup accepted {expected}");
        assert!(
            stderr.contains("post_with_comments_counts")
                && (stderr.contains("post_with_comment_counts") || stderr.contains("idd")),
            "{stderr}"
        );
    }
    Ok(())
}

/// From PostgreSQL 17 on, setup makes a failover slot (synchronized to standbys that ask for
/// it), and `status` says whether a failover would keep the slot; before 17 it says that one
/// would lose it.
#[tokio::test]
async fn the_slot_is_a_failover_slot_where_the_server_has_them() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("streamex.toml");
    std::fs::write(&path, common::blog_config(&url, &slot_for(&url)))?;
    common::setup_service(&path)?;

    let major: i32 =
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int / 10000")
            .fetch_one(&pool)
            .await?;
    let info = streamex::replication::setup::slot_info(&pool, &slot_for(&url))
        .await?
        .context("setup made no slot")?;
    let status = common::streamex_command("warn")
        .args(["status", "--config"])
        .arg(&path)
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout);
    if major >= 17 {
        assert_eq!(info.failover, Some(true), "PostgreSQL {major}");
        let synced: bool =
            sqlx::query_scalar("SELECT failover FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot_for(&url))
                .fetch_one(&pool)
                .await?;
        assert!(synced);
        assert!(status.contains("failover yes"), "{status}");
    } else {
        assert_eq!(info.failover, None, "PostgreSQL {major}");
        assert!(
            status.contains("failover not available before PostgreSQL 17"),
            "{status}"
        );
    }
    Ok(())
}

/// A slot that is gone while operators have checkpoints on it (a failover that lost it, or a
/// drop by hand) is not silently made again from now: setup refuses, naming the slot and the
/// setting that accepts the loss.
#[tokio::test]
async fn a_lost_slot_with_checkpoints_is_not_recreated_without_saying_so() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let slot = slot_for(&url);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("streamex.toml");
    std::fs::write(&path, common::blog_config(&url, &slot))?;
    common::setup_service(&path)?;
    streamex::status::store_checkpoint(
        &pool,
        &slot,
        "post_comment_tallies",
        streamex::Lsn(0x4000),
        3,
    )
    .await?;
    streamex::replication::setup::drop_slot(&pool, &slot).await?;

    let refused = common::streamex_command("warn")
        .args(["setup", "--config"])
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(&slot)
            && stderr.contains("post_comment_tallies")
            && stderr.contains("replication.recreate_invalidated_slot"),
        "{stderr}"
    );
    assert!(
        streamex::replication::setup::slot_info(&pool, &slot)
            .await?
            .is_none(),
        "no slot was made"
    );

    let accepted = common::streamex_command("warn")
        .args(["setup", "--config"])
        .arg(&path)
        .env("STREAMEX_REPLICATION__RECREATE_INVALIDATED_SLOT", "true")
        .output()?;
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(
        String::from_utf8_lossy(&accepted.stderr).contains("not seen"),
        "the loss is logged"
    );
    Ok(())
}
