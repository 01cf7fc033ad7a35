//! The real `streamex run` on the blog example, killed with SIGKILL at random instants under a
//! stream of inserts, updates and deletes: afterwards every derived row must equal what
//! `posts` and `comments` say, tallies included (nothing lost, nothing applied twice).

use crate::common;

use std::time::Duration;

use common::{BLOG, Rng, derived_mismatches, settle_exact, spawn_service};
use sqlx::PgPool;
use streamex::testing;

#[tokio::test]
async fn sigkill_at_random_instants_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()>
{
    sigkills(|config| config).await
}

/// The same with both blog operators in three partitions each (the declarative one by its
/// id, the tallies by the comment's key): each partition's checkpoint is its own, and the
/// slot is acknowledged only where every one of them is done.
#[tokio::test]
async fn sigkill_with_partitioned_operators_loses_nothing_and_applies_nothing_twice()
-> anyhow::Result<()> {
    sigkills(|config| common::with_partitions(&config, 3)).await
}

async fn sigkills(configure: impl Fn(String) -> String) -> anyhow::Result<()> {
    let kills: u32 = std::env::var("STREAMEX_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = common::seed_from_env("STREAMEX_CRASH_SEED");
    eprintln!("crash test seed {seed} (repeat with STREAMEX_CRASH_SEED={seed})");

    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        configure(common::blog_config(&url, &common::slot_for(&url))),
    )?;
    let log = dir.path().join("streamex.log");

    // The slot must exist before the first change the derived tables are checked against.
    common::setup_service(&config)?;

    // The workload runs all along, across the kills.
    let workload = common::Workload::start(&pool, seed);

    let mut rng = Rng(seed.rotate_left(17));
    for _ in 0..kills {
        let mut child = spawn_service(&config, &log, "warn")?;
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
    }
    let made = workload.stop().await?;

    // A last run catches up, then stops cleanly on SIGTERM.
    let mut child = spawn_service(&config, &log, "warn")?;
    let settled = settle_exact(&pool).await;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(child.id())?, libc::SIGTERM) };
    let status = child.wait()?;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    settled.map_err(|e| anyhow::anyhow!("{e}\nservice log:\n{log_text}"))?;
    assert!(
        status.success(),
        "SIGTERM should end the service cleanly: {status}\n{log_text}"
    );

    let (counts, tallies) = derived_mismatches(&pool).await?;
    let posts: i64 = sqlx::query_scalar("SELECT count(*) FROM posts")
        .fetch_one(&pool)
        .await?;
    let comments: i64 = sqlx::query_scalar("SELECT count(*) FROM comments")
        .fetch_one(&pool)
        .await?;
    eprintln!(
        "crash test: {} changes made, {kills} kills, {posts} posts and {comments} comments at the end; \
         mismatched rows: {counts} in post_with_comments_counts, {tallies} in post_comment_tallies",
        made
    );
    assert_eq!((counts, tallies), (0, 0), "service log:\n{log_text}");
    Ok(())
}
