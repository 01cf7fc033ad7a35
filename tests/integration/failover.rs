//! A database failover under the blog workload: a real primary and a physical standby, the
//! URL naming both (`target_session_attrs=read-write`), the primary crashed (stopped
//! `immediate`, as a power cut) in the middle and the standby promoted.
//!
//! - From PostgreSQL 17 on, the slot is a failover slot that the standby keeps in sync: the
//!   running `streamex run` must find the new primary by itself, go on from the synchronized
//!   slot, and leave both derived tables exactly what `posts` and `comments` on the new
//!   primary say (nothing lost, nothing applied twice).
//! - Before 17 the promoted standby has no slot: streamex must stop, saying so and naming the
//!   slot and the fix, rather than go on from a new slot.
//!
//! The writes the crashed primary had not sent to the standby are lost from the database
//! itself (asynchronous replication): the check is against what the new primary holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use streamex::replication::ConnectParams;
use streamex::testing::{Cluster, StopMode};

use crate::common::{self, eventually};

use common::{BLOG, Rng, blog_activity, derived_mismatches, settle, slot_for, spawn_service};

fn signal(pid: i32, signal: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    let done = unsafe { libc::kill(pid, signal) };
    anyhow::ensure!(done == 0, "kill({pid}, {signal}) failed");
    Ok(())
}

/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "standby1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_goes_on_from_the_synced_slot_with_exact_derived_tables()
-> anyhow::Result<()> {
    let seed = common::seed_from_env("STREAMEX_FAILOVER_SEED");
    eprintln!("failover test seed {seed} (repeat with STREAMEX_FAILOVER_SEED={seed})");
    let primary = Cluster::start()?;
    let admin = PgPool::connect(&primary.url("postgres")).await?;
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&admin)
        .await?;
    let failover_slots = version >= 170_000;
    sqlx::query("SELECT pg_create_physical_replication_slot($1, true)")
        .bind(STANDBY_SLOT)
        .execute(&admin)
        .await?;
    let url = primary.create_database().await?;
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    {
        let pool = PgPool::connect(&url).await?;
        sqlx::raw_sql(BLOG).execute(&pool).await?;
        pool.close().await;
    }
    let sync: &[(&str, &str)] = if failover_slots {
        &[("sync_replication_slots", "on")]
    } else {
        &[]
    };
    let standby = primary.standby(STANDBY_SLOT, sync)?;
    if failover_slots {
        // streamex is sent no change the standby has not flushed.
        sqlx::query(&format!(
            "ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"
        ))
        .execute(&admin)
        .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&admin)
            .await?;
    }
    admin.close().await;

    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let slot = slot_for(&url);
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(&config, common::blog_config(&both, &slot))?;
    let log = dir.path().join("streamex.log");
    common::setup_service(&config)?;

    // The workload writes through the same kind of URL, so it follows the promotion too.
    let writer = streamex::replication::catalog_pool(&ConnectParams::parse(&both)?, 4).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (made, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workload = tokio::spawn({
        let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
        async move {
            let mut rng = Rng(seed);
            while !stop.load(Ordering::Relaxed) {
                match blog_activity(&writer, &mut rng).await {
                    Ok(n) => made.fetch_add(n, Ordering::Relaxed),
                    // The primary is gone and the standby not yet promoted: try again.
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            }
        }
    });
    let mut child = spawn_service(&config, &log, "info")?;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let standby_pool = PgPool::connect(&standby.url(&database)).await?;
    if failover_slots {
        // The standby's copy of the slot, once the slot-sync worker has made it a real one
        // (its first look may come after up to 30 s of sleep).
        eventually("the slot synced to the standby", async || {
            let synced: Option<bool> = sqlx::query_scalar(
                "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&slot)
            .fetch_optional(&standby_pool)
            .await?;
            Ok(synced == Some(true))
        })
        .await?;
        // `status` names the standby the acknowledgement waits for, and its state.
        let status = common::streamex_command("warn")
            .args(["status", "--config"])
            .arg(&config)
            .output()?;
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("failover yes")
                && text.contains(&format!("standby slot \"{STANDBY_SLOT}\": streaming"))
                && text.contains(&format!("primary, 127.0.0.1:{}", primary.port())),
            "{text}"
        );
    }
    let mut rng = Rng(seed.rotate_left(29));
    tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;

    // The worst moment for a failover: the standby lags (its WAL receiver frozen), so the
    // operators' last commits on the primary, made after the changes they processed, are not
    // on it, while the slot's position may still be synchronized to it. The failover must not
    // lose those changes: streamex holds its acknowledgement back until the standby has the
    // commits behind it (without that, the promoted standby's slot is past the checkpoints it
    // has, and the changes in between are never seen again: tallies come out short).
    let receiver: Option<i32> = if failover_slots {
        sqlx::query_scalar("SELECT pid FROM pg_stat_wal_receiver")
            .fetch_optional(&standby_pool)
            .await?
    } else {
        None
    };
    if let Some(pid) = receiver {
        signal(pid, libc::SIGSTOP)?;
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(1000))).await;
    }

    // The failover: the primary dies as in a power cut, the standby is promoted.
    let before = made.load(Ordering::Relaxed);
    primary.stop(StopMode::Immediate)?;
    let crashed = Instant::now();
    if let Some(pid) = receiver {
        // What the primary sent the frozen receiver is lost with it, as with a network cut:
        // its death makes the standby's postmaster restart it (crash recovery of the
        // standby, which stays a standby).
        signal(pid, libc::SIGKILL)?;
        eventually("the standby back after its receiver died", async || {
            Ok(PgPool::connect(&standby.url(&database)).await.is_ok())
        })
        .await?;
    }
    standby.promote()?;
    eprintln!(
        "primary crashed after {before} changes; standby promoted in {} ms",
        crashed.elapsed().as_millis()
    );

    if !failover_slots {
        // No slot on the new primary: streamex must stop and say why, naming the slot.
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                child.kill()?;
                anyhow::bail!(
                    "streamex went on after a failover lost its slot:\n{}",
                    log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        stop.store(true, Ordering::Relaxed);
        workload.await?;
        let text = log_text();
        assert!(!status.success(), "{text}");
        eprintln!(
            "streamex stopped: {}",
            text.lines()
                .rev()
                .find(|l| l.contains("slot"))
                .unwrap_or_default()
        );
        assert!(
            text.contains(&format!("replication slot \"{slot}\""))
                && text.contains("failover")
                && text.contains("recreate_invalidated_slot"),
            "the error must name the slot, the failover and the fix:\n{text}"
        );
        return Ok(());
    }

    tokio::time::sleep(Duration::from_millis(1500 + rng.below(1500))).await;
    stop.store(true, Ordering::Relaxed);
    workload.await?;
    let after = made.load(Ordering::Relaxed);
    let outcome = async {
        settle(&standby_pool).await?;
        derived_mismatches(&standby_pool).await
    }
    .await;
    child.kill()?;
    child.wait()?;
    // The same URL now reaches the promoted standby.
    let status = common::streamex_command("warn")
        .args(["status", "--config"])
        .arg(&config)
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains(&format!("primary, 127.0.0.1:{}", standby.port())),
        "{status}"
    );
    let text = log_text();
    let mismatches = match outcome {
        Ok(mismatches) => mismatches,
        Err(e) => anyhow::bail!("{e:#}\nstreamex log:\n{text}"),
    };
    eprintln!(
        "{after} changes ({} after the crash), {} failed writes; mismatches {mismatches:?}",
        after - before,
        failed.load(Ordering::Relaxed)
    );
    assert!(after > before, "nothing was written after the promotion");
    assert_eq!(
        mismatches,
        (0, 0),
        "derived rows differ after the failover:\n{text}"
    );
    assert!(
        !text.contains("ERROR"),
        "streamex logged an error through the failover:\n{text}"
    );
    Ok(())
}
