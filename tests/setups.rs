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

mod common;

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
