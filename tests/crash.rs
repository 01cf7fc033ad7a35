//! The real `streamex run` on the blog example, killed with SIGKILL at random instants under a
//! stream of inserts, updates and deletes: afterwards every derived row must equal what
//! `posts` and `comments` say, tallies included (nothing lost, nothing applied twice).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{BLOG, derived_mismatches, settle};
use sqlx::PgPool;
use streamex::testing;

/// A small deterministic generator (xorshift64*), seeded per run and printed, so a failing run
/// can be repeated with STREAMEX_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn spawn_service(config: &std::path::Path, log: &std::path::Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        // The service refuses STREAMEX_* variables that are not configuration keys.
        .env_remove("STREAMEX_CRASH_SEED")
        .env_remove("STREAMEX_CRASH_KILLS")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// One random piece of blog activity, in its own transaction.
async fn activity(pool: &PgPool, rng: &mut Rng) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    let changes = match rng.below(10) {
        0..=2 => {
            let post: i64 =
                sqlx::query_scalar("INSERT INTO posts (title) VALUES ('p') RETURNING id")
                    .fetch_one(&mut *tx)
                    .await?;
            let n = rng.below(4);
            sqlx::query(
                "INSERT INTO comments (post_id, body) SELECT $1, 'c' FROM generate_series(1, $2::int)",
            )
            .bind(post)
            .bind(i32::try_from(n)?)
            .execute(&mut *tx)
            .await?;
            1 + n
        }
        3..=5 => sqlx::query(
            "INSERT INTO comments (post_id, body)
             SELECT id, 'c' FROM posts ORDER BY random() LIMIT 3",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        6 => sqlx::query(
            "UPDATE posts SET title = title || '+', updated_at = now()
              WHERE id IN (SELECT id FROM posts ORDER BY random() LIMIT 2)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        7 => sqlx::query(
            "DELETE FROM comments WHERE id IN (SELECT id FROM comments ORDER BY random() LIMIT 2)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        8 => sqlx::query(
            "UPDATE comments SET post_id = (SELECT id FROM posts ORDER BY random() LIMIT 1), updated_at = now()
              WHERE id IN (SELECT id FROM comments ORDER BY random() LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        _ => sqlx::query(
            "DELETE FROM posts WHERE id IN (SELECT id FROM posts ORDER BY random() LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
    };
    tx.commit().await?;
    Ok(changes)
}

#[tokio::test]
async fn sigkill_at_random_instants_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()>
{
    let kills: u32 = std::env::var("STREAMEX_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("STREAMEX_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos(),
            ) | 1
        });
    eprintln!("crash test seed {seed} (repeat with STREAMEX_CRASH_SEED={seed})");

    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/streamex.toml"))?;
    let example = example.replace(
        "database_url = \"postgres://postgres@127.0.0.1:5432/blog\"",
        &format!("database_url = {url:?}"),
    );
    let example = example.replace(
        "slot = \"streamex\"",
        &format!("slot = {:?}", common::slot_for(&url)),
    );
    assert!(
        example.contains(&url),
        "the example's database_url line moved"
    );
    std::fs::write(&config, example)?;
    let log = dir.path().join("streamex.log");

    // The slot must exist before the first change the derived tables are checked against.
    let setup = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["setup", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env_remove("STREAMEX_CRASH_SEED")
        .env_remove("STREAMEX_CRASH_KILLS")
        .output()?;
    assert!(setup.status.success(), "streamex setup failed: {setup:?}");

    // The workload runs all along, across the kills.
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let workload = tokio::spawn({
        let (pool, stop, made) = (pool.clone(), stop.clone(), made.clone());
        async move {
            let mut rng = Rng(seed);
            while !stop.load(Ordering::Relaxed) {
                let n = activity(&pool, &mut rng).await?;
                made.fetch_add(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
            }
            anyhow::Ok(())
        }
    });

    let mut rng = Rng(seed.rotate_left(17));
    for _ in 0..kills {
        let mut child = spawn_service(&config, &log)?;
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
    }
    stop.store(true, Ordering::Relaxed);
    workload.await??;

    // A last run catches up, then stops cleanly on SIGTERM.
    let mut child = spawn_service(&config, &log)?;
    let settled = settle(&pool).await;
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
        made.load(Ordering::Relaxed)
    );
    assert_eq!((counts, tallies), (0, 0), "service log:\n{log_text}");
    Ok(())
}
