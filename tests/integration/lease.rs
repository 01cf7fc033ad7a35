//! The instance lock is a lease: an active instance frozen with SIGSTOP (its sockets stay
//! open) is replaced by the standby once its lease runs out, and once woken it writes nothing:
//! it finds it lost the lock and stands by.
//!
//! Two real `streamex run` processes on the blog example, a workload writing all along. Every
//! write to the derived tables and to the operators' checkpoints is recorded with the
//! `application_name` of the instance that made it and, through `track_commit_timestamp`,
//! when it committed: the frozen instance must have committed none after the standby took
//! over. The takeover time is printed, not asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;
use streamex::testing::Cluster;

use crate::common::{self, eventually};

use common::{BLOG, Rng, blog_activity, derived_mismatches, settle, slot_for};

/// Records who writes the derived tables and the checkpoints: the writing session's
/// `application_name`, in its transaction (the row's `xmin`), whose commit time
/// `track_commit_timestamp` keeps.
const AUDIT: &str = "
CREATE TABLE writes (app text NOT NULL, tbl text NOT NULL);
CREATE FUNCTION record_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.writes (app, tbl) VALUES (current_setting('application_name'), TG_TABLE_NAME);
  RETURN NULL;
END $$;
CREATE TRIGGER record_write AFTER INSERT OR UPDATE OR DELETE ON post_with_comments_counts
  FOR EACH ROW EXECUTE FUNCTION record_write();
CREATE TRIGGER record_write AFTER INSERT OR UPDATE OR DELETE ON post_comment_tallies
  FOR EACH ROW EXECUTE FUNCTION record_write();
CREATE TRIGGER record_write AFTER INSERT OR UPDATE OR DELETE ON streamex.operator_checkpoints
  FOR EACH ROW EXECUTE FUNCTION record_write();
";

/// The backend pid holding the slot's instance lock, if any.
async fn lock_holder(pool: &PgPool, slot: &str) -> anyhow::Result<Option<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE l.locktype = 'advisory' AND l.granted
            AND a.datname = current_database() AND a.application_name = $1",
    )
    .bind(format!("streamex instance {slot}"))
    .fetch_optional(pool)
    .await?)
}

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn signal(child: &std::process::Child, signal: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    let done = unsafe { libc::kill(libc::pid_t::try_from(child.id())?, signal) };
    anyhow::ensure!(done == 0, "kill({signal}) failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_instance_is_replaced_and_writes_nothing_once_woken() -> anyhow::Result<()>
{
    // Its own cluster: commit timestamps on, and the default wal_sender_timeout (the shared
    // cluster's is 10 s), so that the frozen instance's walsender would hold the slot for a
    // minute unless the new active instance ends it.
    let cluster = Cluster::builder()
        .setting("track_commit_timestamp", "on")
        .setting("wal_sender_timeout", "60s")
        .start()?;
    let url = cluster.create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    // Short, so that the test is quick; STREAMEX_LEASE_LENGTH=30s measures the default.
    let lease = std::env::var("STREAMEX_LEASE_LENGTH").unwrap_or_else(|_| "3s".to_owned());
    let config_for = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.path().join(format!("{name}.toml"));
        let text = common::blog_config(&format!("{url}?application_name={name}"), &slot);
        anyhow::ensure!(
            text.contains("lease = \"30s\""),
            "the example's [lock] lease line moved"
        );
        std::fs::write(
            &path,
            text.replace("lease = \"30s\"", &format!("lease = {lease:?}")),
        )?;
        Ok(path)
    };
    let (config_a, config_b) = (config_for("instance_a")?, config_for("instance_b")?);
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    common::setup_service(&config_a)?;
    sqlx::raw_sql(AUDIT).execute(&pool).await?;
    let logs = || {
        format!(
            "--- instance A:\n{}\n--- instance B:\n{}",
            log_of(&log_a),
            log_of(&log_b)
        )
    };

    // A, active, under a workload that writes all along.
    let mut a = common::spawn_service(&config_a, &log_a, "info")?;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (pool, stop, committed) = (pool.clone(), stop.clone(), committed.clone());
        let seed = common::seed_from_env("STREAMEX_LEASE_SEED");
        eprintln!("lease test workload seed {seed} (repeat with STREAMEX_LEASE_SEED={seed})");
        let mut rng = Rng(seed);
        async move {
            while !stop.load(Ordering::Relaxed) {
                blog_activity(&pool, &mut rng).await?;
                committed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.below(10))).await;
            }
            anyhow::Ok(())
        }
    });
    settle(&pool).await.with_context(logs)?;
    let a_lock = lock_holder(&pool, &slot)
        .await?
        .context("A holds no lock after processing")?;

    // B, standing by.
    let mut b = common::spawn_service(&config_b, &log_b, "info")?;
    eventually("B never stood by", async || {
        Ok(log_of(&log_b).contains("standby:"))
    })
    .await
    .with_context(logs)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Freeze A: its lock's session stays open, so only the lease can end it.
    signal(&a, libc::SIGSTOP)?;
    let frozen = Instant::now();
    let outcome = async {
        eventually(
            "the standby did not take over within 60 s of the active instance's SIGSTOP: \
             the frozen instance still holds the lock",
            async || Ok(lock_holder(&pool, &slot).await?.is_some_and(|pid| pid != a_lock)),
        )
        .await?;
        let takeover = frozen.elapsed();
        let took_over_at: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
            .fetch_one(&pool)
            .await?;
        eventually("B never wrote a derived row", async || {
            Ok(sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM writes WHERE app = 'instance_b' AND tbl <> 'operator_checkpoints')",
            )
            .fetch_one(&pool)
            .await?)
        })
        .await?;
        let first_write = frozen.elapsed();
        // The derived tables keep following the writes while A is frozen.
        settle(&pool).await?;
        let settled = frozen.elapsed();
        anyhow::Ok((takeover, first_write, settled, took_over_at))
    }
    .await;
    let (takeover, first_write, settled, took_over_at) = match outcome {
        Ok(times) => times,
        Err(e) => {
            signal(&a, libc::SIGCONT)?;
            let _ = a.kill();
            let _ = b.kill();
            stop.store(true, Ordering::Relaxed);
            return Err(e.context(logs()));
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Wake A: it finds its lease gone and stands by, writing nothing.
    let frozen_for = frozen.elapsed();
    signal(&a, libc::SIGCONT)?;
    eventually("A never stood by after waking", async || {
        Ok(log_of(&log_a).contains("standby:"))
    })
    .await
    .with_context(logs)?;
    let woke_to_standby = frozen.elapsed() - frozen_for;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    settle(&pool).await.with_context(logs)?;

    let (a_late, b_writes): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE app = 'instance_a' AND pg_xact_commit_timestamp(xmin) > $1::timestamptz),
                count(*) FILTER (WHERE app = 'instance_b')
           FROM writes",
    )
    .bind(&took_over_at)
    .fetch_one(&pool)
    .await?;
    let mismatches = derived_mismatches(&pool).await?;
    let refused = log_of(&log_a)
        .matches("the stored checkpoint moved")
        .count();
    let fenced = log_of(&log_b).contains("ended the replication session left streaming");
    eprintln!(
        "lease {lease}: the standby took the lock {:.2} s after the active instance's SIGSTOP, \
         wrote its first derived row after {:.2} s, had processed everything written before a \
         marker after {:.2} s (the frozen instance's walsender ended by the new one: {fenced}); \
         woken after {:.1} s, the old instance stood by {:.2} s later; {} transactions \
         written, {refused} writes of the old instance refused by the checkpoint \
         compare-and-set",
        takeover.as_secs_f64(),
        first_write.as_secs_f64(),
        settled.as_secs_f64(),
        frozen_for.as_secs_f64(),
        woke_to_standby.as_secs_f64(),
        committed.load(Ordering::Relaxed),
    );
    assert_eq!(
        a_late,
        0,
        "the old instance committed writes after the standby took over\n{}",
        logs()
    );
    assert!(b_writes > 0, "the new active instance wrote nothing");
    assert_eq!(mismatches, (0, 0), "derived rows differ\n{}", logs());

    for child in [&a, &b] {
        signal(child, libc::SIGTERM)?;
    }
    for (name, child) in [("A", &mut a), ("B", &mut b)] {
        let status = child.wait()?;
        assert!(status.success(), "{name}: {status}\n{}", logs());
    }
    Ok(())
}
