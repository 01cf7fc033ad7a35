//! `streamex run` with an operator in partitions (`[[operators]] partitions = N`): the blog
//! operators split four ways (the declarative one by its id, the tallies by the comment's
//! key) keep their derived tables exact through the events that concern more than one
//! partition (a comment moved to another post, a comment whose key changes, TRUNCATE), and
//! through changes of the count of partitions across SIGKILLs; a halted partition holds the
//! others at an event that concerns them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use streamex::config::Config;
use streamex::event::{Event, EventType};
use streamex::operator::{AnyOperator, Context, Operator, Subscription};
use streamex::pubsub::PubSub;
use streamex::status::{MemoryStatus, PostgresStatus};
use streamex::testing;

use crate::common;

use anyhow::Context as _;
use common::{BLOG, Rng, Service, derived_mismatches, eventually, settle, settle_exact, slot_for};

/// The example configuration on `url`, both blog operators in `partitions`.
fn config(url: &str, partitions: u32) -> anyhow::Result<Config> {
    let text = common::with_partitions(&common::blog_config(url, &slot_for(url)), partitions);
    Ok(Config::parse(
        &text,
        "config/streamex.toml",
        [
            ("STREAMEX_RETRY__INITIAL".to_owned(), "10ms".to_owned()),
            ("STREAMEX_RETRY__MAX".to_owned(), "20ms".to_owned()),
        ],
    )?)
}

/// The checkpoints stored for `operator`, by name.
async fn checkpoint_names(pool: &PgPool, operator: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT operator FROM streamex.operator_checkpoints
          WHERE operator = $1 OR starts_with(operator, $1 || '#') ORDER BY operator",
    )
    .bind(operator)
    .fetch_all(pool)
    .await?)
}

#[tokio::test]
async fn partitions_keep_the_blog_tables_exact_through_moves_key_changes_and_truncates()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = config(&url, 4)?;
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await?;

    // Rows of many partitions, in transactions of many rows.
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) SELECT i, 'p' || i FROM generate_series(1, 40) i;
         INSERT INTO comments (id, post_id, body)
              SELECT i, 1 + i % 40, 'c' FROM generate_series(1, 400) i;
         SELECT setval(pg_get_serial_sequence('comments', 'id'), 1000000);",
    )
    .execute(&pool)
    .await?;
    settle_exact(&pool)
        .await
        .with_context(|| "after inserts".to_string())?;

    // Comments moved to other posts (the declarative operator's two ids, often of two
    // partitions), comments whose key changes (the tallies' row moves to another
    // partition), deletes, and a post's title, interleaved in one transaction and in many.
    for (n, step) in [
        "UPDATE comments SET post_id = 1 + (post_id + 7) % 40, updated_at = now() WHERE id % 3 = 0",
        "UPDATE comments SET id = id + 10000, updated_at = now() WHERE id % 5 = 0",
        "DELETE FROM comments WHERE id % 7 = 0",
        "BEGIN; UPDATE comments SET id = id + 20000, post_id = 2 WHERE id % 11 = 0; \
         INSERT INTO comments (id, post_id) SELECT 30000 + i, 3 FROM generate_series(1, 20) i; \
         UPDATE posts SET title = 'moved' WHERE id = 3; DELETE FROM comments WHERE id > 30015; COMMIT;",
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::raw_sql(step).execute(&pool).await?;
        settle_exact(&pool)
            .await
            .with_context(|| format!("after step {n}").to_string())?;
    }
    for i in 0..30 {
        sqlx::query("UPDATE comments SET post_id = $1, id = id + 100000 WHERE id = (SELECT min(id) FROM comments WHERE id < 100000)")
            .bind(1 + i % 40)
            .execute(&pool)
            .await?;
    }
    settle_exact(&pool)
        .await
        .with_context(|| "after moves".to_string())?;

    // TRUNCATE crosses every partition: done once, after each partition's earlier events,
    // before any of the later ones.
    sqlx::raw_sql(
        "INSERT INTO comments (post_id, body) SELECT 1 + i % 40, 'x' FROM generate_series(1, 50) i;
         BEGIN;
         INSERT INTO comments (post_id) VALUES (4), (5);
         TRUNCATE comments;
         INSERT INTO comments (post_id) SELECT 1 + i % 40 FROM generate_series(1, 30) i;
         COMMIT;
         UPDATE comments SET post_id = 6 WHERE id % 2 = 0;",
    )
    .execute(&pool)
    .await?;
    settle_exact(&pool)
        .await
        .with_context(|| "after a truncate".to_string())?;
    sqlx::raw_sql(
        "BEGIN;
         INSERT INTO comments (post_id) VALUES (7);
         TRUNCATE posts CASCADE;
         INSERT INTO posts (id, title) VALUES (100, 'hundred'), (101, 'hundred and one');
         INSERT INTO comments (post_id) SELECT 100 + i % 2 FROM generate_series(1, 9) i;
         COMMIT;",
    )
    .execute(&pool)
    .await?;
    settle_exact(&pool)
        .await
        .with_context(|| "after a cascade".to_string())?;

    // Each partition keeps its own checkpoint; none is stored for the operator whole.
    for operator in ["post_comment_tallies", "post_with_comments_counts"] {
        let expected: Vec<String> = (0..4).map(|p| format!("{operator}#{p}/4")).collect();
        assert_eq!(checkpoint_names(&pool, operator).await?, expected);
    }
    service.stop().await?;
    Ok(())
}

/// The count of partitions changes at every restart, and every restart but the last follows
/// a SIGKILL under a running workload: each new count takes over from what the earlier one
/// (or the operator whole) had done, row by row, so no event is lost or applied twice.
#[tokio::test]
async fn changing_the_count_of_partitions_across_sigkills_applies_every_event_once()
-> anyhow::Result<()> {
    let seed = common::seed_from_env("STREAMEX_CRASH_SEED");
    eprintln!("partition count test seed {seed} (repeat with STREAMEX_CRASH_SEED={seed})");
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("streamex.toml");
    let log = dir.path().join("streamex.log");
    let base = common::blog_config(&url, &slot_for(&url));
    std::fs::write(&path, &base)?;
    common::setup_service(&path)?;

    let workload = common::Workload::start(&pool, seed);
    let mut rng = Rng(seed.rotate_left(23));
    // Each count runs until killed; a count may start before the slot is past what the
    // earlier ones did, so it may inherit from more than one.
    for partitions in [3, 1, 2, 4, 1, 3] {
        let text = if partitions == 1 {
            base.clone()
        } else {
            common::with_partitions(&base, partitions)
        };
        std::fs::write(&path, text)?;
        let mut child = common::spawn_service(&path, &log, "warn")?;
        tokio::time::sleep(Duration::from_millis(800 + rng.below(1200))).await;
        // Settled before the kill now and then, so that both paths are taken: a count that
        // takes over right after the kill (what the earlier one did comes from its
        // checkpoints), and one that starts once the slot is past them.
        if rng.below(2) == 0 {
            settle(&pool).await?;
        }
        child.kill()?;
        child.wait()?;
    }
    let made = workload.stop().await?;

    std::fs::write(&path, common::with_partitions(&base, 2))?;
    let mut child = common::spawn_service(&path, &log, "warn")?;
    let settled = settle_exact(&pool).await;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(child.id())?, libc::SIGTERM) };
    child.wait()?;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    settled.map_err(|e| anyhow::anyhow!("{e}\nservice log:\n{log_text}"))?;
    let mismatches = derived_mismatches(&pool).await?;
    eprintln!(
        "partition count test: {} changes made; mismatched rows: {mismatches:?}",
        made
    );
    assert_eq!(mismatches, (0, 0), "service log:\n{log_text}");
    Ok(())
}

/// A test operator that mirrors `posts (id, title)` into `mirror`, TRUNCATE included, and
/// fails on a post titled `poison` until `cured`.
struct Mirror {
    cured: Arc<AtomicBool>,
}

impl Operator for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("posts")]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        if event.kind == EventType::Truncate {
            sqlx::query("DELETE FROM mirror").execute(ctx.db()?).await?;
            return Ok(());
        }
        let record = event.record().context("a record")?;
        let title = record.get("title").and_then(|t| t.as_str()).unwrap_or("");
        if title == "poison" && !self.cured.load(Ordering::SeqCst) {
            anyhow::bail!("poisoned post");
        }
        let id = record.get("id").and_then(|v| v.as_i64()).context("an id")?;
        sqlx::query("INSERT INTO mirror (id, title) VALUES ($1, $2)")
            .bind(id)
            .bind(title)
            .execute(ctx.db()?)
            .await?;
        Ok(())
    }
}

/// The ids in `mirror`, in order.
async fn mirrored(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    Ok(sqlx::query_scalar("SELECT id FROM mirror ORDER BY id")
        .fetch_all(pool)
        .await?)
}

/// A partition halted on an event holds the TRUNCATE after it, which crosses every
/// partition: the other partition, which applies it, stops at it too (applying it, or its
/// rows after it, would put them out of order with the halted partition's). Resumed, both go
/// on and the mirror ends as the table.
#[tokio::test]
async fn a_halted_partition_holds_the_others_at_an_event_of_all_partitions() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE posts (id bigint PRIMARY KEY, title text NOT NULL);
         CREATE TABLE mirror (id bigint PRIMARY KEY, title text NOT NULL);",
    )
    .execute(&pool)
    .await?;
    let text = format!(
        "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\"]\n\
         [retry]\ninitial = \"10ms\"\nmax = \"20ms\"\nretries = 1\n\
         [[operators]]\nname = \"mirror\"\npartitions = 2\n",
        slot_for(&url)
    );
    let config = Config::parse(&text, "test.toml", std::iter::empty())?;
    let cured = Arc::new(AtomicBool::new(false));
    let service = Service::start(
        &config,
        MemoryStatus::new(),
        PubSub::new(),
        vec![AnyOperator::new(Mirror {
            cured: cured.clone(),
        })],
    )
    .await?;
    sqlx::raw_sql("INSERT INTO posts SELECT i, 'p' FROM generate_series(1, 20) i")
        .execute(&pool)
        .await?;
    eventually("the first rows mirrored", async || {
        Ok(mirrored(&pool).await?.len() == 20)
    })
    .await?;
    // A poisoned post of partition 1 (partition 0 applies the truncate), then the truncate
    // and rows of both partitions.
    let poison = (21..)
        .find(|id: &i64| streamex::jetstream::partition(Some(&id.to_string()), 2) == 1)
        .context("an id of partition 1")?;
    sqlx::query("INSERT INTO posts VALUES ($1, 'poison')")
        .bind(poison)
        .execute(&pool)
        .await?;
    sqlx::raw_sql(
        "TRUNCATE posts; INSERT INTO posts SELECT i, 'after' FROM generate_series(100, 110) i;",
    )
    .execute(&pool)
    .await?;
    eventually("partition 1 halted", async || {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT state FROM streamex.operator_state WHERE operator = 'mirror#1/2'",
        )
        .fetch_optional(&pool)
        .await?
        .as_deref()
            == Some("halted"))
    })
    .await?;
    // Partition 0 has had time to go past the truncate, had it not been held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        mirrored(&pool).await?,
        (1..=20).collect::<Vec<i64>>(),
        "partition 0 went past the truncate while partition 1 was halted before it"
    );
    let held: Option<String> = sqlx::query_scalar(
        "SELECT state FROM streamex.operator_state WHERE operator = 'mirror#0/2'",
    )
    .fetch_optional(&pool)
    .await?;
    assert_ne!(
        held.as_deref(),
        Some("halted"),
        "partition 0 is held, not halted"
    );

    // `streamex resume mirror` resumes its halted partitions.
    cured.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("streamex.toml");
    std::fs::write(&path, &text)?;
    let resumed = common::streamex_command("warn")
        .args(["resume", "mirror", "--config"])
        .arg(&path)
        .output()?;
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success() && stdout.contains("\"mirror#1/2\" set to running"),
        "{stdout}{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    eventually("the mirror as the table after the resume", async || {
        Ok(mirrored(&pool).await? == (100..=110).collect::<Vec<i64>>())
    })
    .await?;
    service.stop().await
}
