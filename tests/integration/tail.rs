//! `streamex tail`, run as the real binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use sqlx::PgPool;
use streamex::replication::{PublicationTables, setup};
use streamex::testing;

fn tail(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamex"));
    command
        .arg("tail")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    command
}

#[tokio::test]
async fn prints_one_json_object_per_change_with_the_documented_fields() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .execute(&pool)
        .await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, "tail_slot").await?;
    sqlx::raw_sql(
        "INSERT INTO notes VALUES (1, 'one'); UPDATE notes SET body = 'uno'; DELETE FROM notes;",
    )
    .execute(&pool)
    .await?;
    let output = tail(&[
        "--database-url",
        &url,
        "--slot",
        "tail_slot",
        "--publication",
        "streamex",
        "--limit",
        "3",
    ])
    .output()?;
    assert!(output.status.success(), "tail failed: {output:?}");
    let lines: Vec<Value> = output
        .stdout
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let mut keys: Vec<&str> = lines[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "changes",
            "commit_lsn",
            "entity",
            "lsn",
            "new_record",
            "old_record",
            "ordinal",
            "schema",
            "table",
            "timestamp",
            "type",
            "unavailable_columns",
            "xid"
        ]
    );
    assert_eq!(lines[0]["type"], json!("insert"));
    assert_eq!(lines[0]["new_record"], json!({"id": 1, "body": "one"}));
    assert_eq!(lines[1]["type"], json!("update"));
    assert_eq!(lines[2]["type"], json!("delete"));
    assert_eq!(lines[2]["old_record"], json!({"id": 1}));
    // The slot has been acknowledged up to what was printed: reading again starts after it.
    sqlx::query("INSERT INTO notes VALUES (2, 'two')")
        .execute(&pool)
        .await?;
    let output = tail(&[
        "--database-url",
        &url,
        "--slot",
        "tail_slot",
        "--publication",
        "streamex",
        "--limit",
        "1",
    ])
    .output()?;
    let line: Value = serde_json::from_slice(output.stdout.lines().next().unwrap()?.as_bytes())?;
    assert_eq!(line["new_record"]["id"], json!(2));
    Ok(())
}

#[tokio::test]
async fn a_bad_url_is_refused_with_the_setting_named() -> anyhow::Result<()> {
    let output = tail(&["--database-url", "mysql://localhost/db"]).output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");
    Ok(())
}

/// Nothing listens on the port: tail says so at once, naming the address, as `run` does,
/// instead of waiting out a pool's time-out and saying only that it timed out.
#[test]
fn a_refused_connection_is_said_at_once_with_the_address() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let output = tail(&[
        "--database-url",
        &format!("postgres://postgres@127.0.0.1:{port}/x"),
    ])
    .stderr(Stdio::piped())
    .output()?;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("connection refused"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("--database-url"), "{stderr}");
    assert!(!stderr.contains("timed out"), "{stderr}");
    Ok(())
}

/// Waits for `child` and returns its exit status with its peak resident memory in bytes: the
/// kernel's high-water mark (`VmHWM` in /proc), which only grows, read until it exits.
/// (wait4's `ru_maxrss` would not do: a child spawned with vfork inherits the high-water mark
/// of this test process, which runs every other test beside it.)
async fn wait_with_peak_rss(
    child: &mut std::process::Child,
) -> anyhow::Result<(std::process::ExitStatus, u64)> {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = text
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        {
            peak = peak.max(kib * 1024);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(peak > 0, "read no VmHWM from {status_file}");
            return Ok((status, peak));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_million_row_transaction_streams_in_bounded_memory() -> anyhow::Result<()> {
    const ROWS: u64 = 1_000_000;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE big (id int PRIMARY KEY)")
        .execute(&pool)
        .await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    setup::ensure_slot(&pool, "big_slot").await?;
    sqlx::query("INSERT INTO big SELECT generate_series(1, $1::int)")
        .bind(i32::try_from(ROWS)?)
        .execute(&pool)
        .await?;
    let limit = ROWS.to_string();
    let mut child = tail(&[
        "--database-url",
        &url,
        "--slot",
        "big_slot",
        "--publication",
        "streamex",
        "--limit",
        &limit,
    ])
    .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let counter = std::thread::spawn(move || {
        let mut count = 0u64;
        let mut last = 0i64;
        let mut in_order = true;
        for line in BufReader::with_capacity(1 << 20, stdout).lines() {
            let line = line.unwrap();
            // The id is the last field of new_record: cheap to find without parsing it all.
            let start = line.find("\"new_record\":{\"id\":").unwrap() + 19;
            let end = start + line[start..].find('}').unwrap();
            let id: i64 = line[start..end].parse().unwrap();
            in_order &= id == last + 1;
            last = id;
            count += 1;
        }
        (count, in_order)
    });
    let (status, peak) = wait_with_peak_rss(&mut child).await?;
    let (count, in_order) = counter.join().unwrap();
    assert!(status.success(), "tail exited with {status}");
    assert_eq!(count, ROWS);
    assert!(in_order, "rows come in insertion order");
    eprintln!(
        "tail: {ROWS} rows in one transaction, peak RSS {} MiB",
        peak >> 20
    );
    assert!(
        peak < 100 << 20,
        "peak RSS {} MiB, limit 100 MiB",
        peak >> 20
    );
    Ok(())
}

#[tokio::test]
async fn without_publication_tail_uses_its_own_and_drops_those_earlier_tails_left()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        .execute(&pool)
        .await?;
    // One left by a tail whose session is gone (no backend has this pid), one of a tail
    // still running (this test's session stands for its keeper).
    let mut live = pool.acquire().await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *live)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE PUBLICATION streamex_tail_2147483000 FOR ALL TABLES;
         CREATE PUBLICATION streamex_tail_{pid} FOR ALL TABLES;"
    ))
    .execute(&pool)
    .await?;

    let mut child = tail(&["--database-url", &url, "--limit", "1"]).spawn()?;
    // Its slot starts when it starts: write until it has printed one change and ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "tail never ended");
        sqlx::query("INSERT INTO notes (body) VALUES ('x')")
            .execute(&pool)
            .await?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(status.success(), "tail exited with {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out)?;
    let line: Value = serde_json::from_str(out.lines().next().unwrap_or("null"))?;
    assert_eq!(line["entity"], "notes", "{out}");

    let publications: Vec<String> =
        sqlx::query_scalar("SELECT pubname::text FROM pg_publication ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        publications,
        [format!("streamex_tail_{pid}")],
        "tail's own is dropped, the leftover too, a live tail's is kept, and none other is made"
    );
    drop(live);
    Ok(())
}

/// Runs `tail --snapshot --limit` on a table with existing rows while one writer keeps
/// inserting, and returns the printed events' (type, id).
async fn snapshot_then_changes(extra: &[&str]) -> anyhow::Result<Vec<(String, i64)>> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigserial PRIMARY KEY, body text);
         INSERT INTO items (body) SELECT repeat('x', 100) FROM generate_series(1, 20000);",
    )
    .execute(&pool)
    .await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One writer, one row per transaction: ids increase in commit order.
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query("INSERT INTO items (body) VALUES ('new')")
                    .execute(&pool)
                    .await?;
            }
            anyhow::Ok(())
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut args = vec![
        "--database-url",
        &url,
        "--publication",
        "streamex",
        "--snapshot",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    // Read as tail prints, until 1,000 changes have come after the reads (however many rows
    // the writer added before the snapshot), then stop it as SIGINT does.
    let events = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, i64)>> {
        let mut child = tail(&args.iter().map(String::as_str).collect::<Vec<_>>()).spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut events = Vec::new();
        let mut changes = 0;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let v: Value = serde_json::from_str(&line?)?;
            let kind = v["type"].as_str().unwrap_or_default().to_owned();
            changes += usize::from(kind != "read");
            events.push((kind, v["new_record"]["id"].as_i64().unwrap_or(-1)));
            if changes == 1000 {
                break;
            }
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
        unsafe { libc::kill(libc::pid_t::try_from(child.id())?, libc::SIGINT) };
        // Read on to the end: a pipe closed under it would fail tail's last writes.
        lines.for_each(drop);
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "tail failed: {status}");
        Ok(events)
    });
    let events = events.await??;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await??;
    // Slots are the cluster's: leave none holding WAL for the other tests. The walsender of
    // the tail that ended lets its slot go a moment after the process is gone.
    crate::common::eventually("tail's slots released by their walsenders", async || {
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots \
              WHERE database = current_database() AND active)",
        )
        .fetch_one(&pool)
        .await?;
        Ok(!active)
    })
    .await?;
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = current_database()",
    )
    .execute(&pool)
    .await?;
    Ok(events)
}

/// The reads are every row committed before the snapshot, the changes every one after it,
/// in commit order: with one writer the printed ids are 1, 2, 3, ... with no gap and no
/// repeat, whichever instant the snapshot fell at.
fn check_snapshot_then_changes(events: &[(String, i64)]) {
    let reads = events.iter().take_while(|(kind, _)| kind == "read").count();
    assert_eq!(events.len(), reads + 1000, "1,000 changes after the reads");
    assert!(reads >= 20000, "only {reads} reads");
    assert!(
        events[reads..].iter().all(|(kind, _)| kind == "insert"),
        "after the reads only the writer's inserts"
    );
    let mut read_ids: Vec<i64> = events[..reads].iter().map(|(_, id)| *id).collect();
    read_ids.sort_unstable();
    let expected: Vec<i64> = (1..=i64::try_from(reads).unwrap()).collect();
    first_difference(
        &read_ids,
        &expected,
        "the reads (sorted) are ids 1, 2, 3, ... each once",
    );
    let inserts: Vec<i64> = events[reads..].iter().map(|(_, id)| *id).collect();
    let first = i64::try_from(reads).unwrap() + 1;
    let next: Vec<i64> = (first..first + 1000).collect();
    first_difference(
        &inserts,
        &next,
        "the changes go on right after the reads, in order",
    );
}

/// Fails with the first place where `got` and `want` differ (not both lists: 20,000 ids).
fn first_difference(got: &[i64], want: &[i64], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: at {i} got {:?}, want {:?} ({} got, {} wanted)",
            got.get(i),
            want.get(i),
            got.len(),
            want.len()
        );
    }
}

#[tokio::test]
async fn snapshot_prints_the_rows_then_the_changes_after_them() -> anyhow::Result<()> {
    check_snapshot_then_changes(&snapshot_then_changes(&[]).await?);
    Ok(())
}

#[tokio::test]
async fn snapshot_with_a_new_slot_creates_it_at_the_snapshot() -> anyhow::Result<()> {
    check_snapshot_then_changes(&snapshot_then_changes(&["--slot", "copy"]).await?);
    Ok(())
}

/// A temporary slot goes with its session: when tail's connection is lost, a new slot would
/// start past changes never printed. tail stops instead, saying what may be missing and
/// naming the fix (a permanent slot).
#[tokio::test]
async fn a_lost_temporary_slot_stops_tail_instead_of_skipping_changes() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        .execute(&pool)
        .await?;
    setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
    let mut child = tail(&["--database-url", &url, "--publication", "streamex"])
        .stderr(Stdio::piped())
        .spawn()?;
    // This database's temporary slot, once tail streams from it (other tests' tails are on
    // the same server: only this one's walsender is ended).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let walsender = loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT active_pid FROM pg_replication_slots
              WHERE temporary AND database = current_database() AND active_pid IS NOT NULL",
        )
        .fetch_optional(&pool)
        .await?;
        if let Some(pid) = pid {
            break pid;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "tail never streamed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // Streaming for sure once a change is printed (the slot exists before START_REPLICATION).
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        // The reader is kept: tail must not see its output closed.
        stdout.read_line(&mut line).map(|_| (line, stdout))
    });
    while !first.is_finished() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "tail printed nothing");
        sqlx::query("INSERT INTO notes (body) VALUES ('x')")
            .execute(&pool)
            .await?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (line, _stdout) = first.await??;
    let line: Value = serde_json::from_str(&line)?;
    assert_eq!(line["entity"], "notes", "{line}");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(walsender)
        .execute(&pool)
        .await?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            anyhow::bail!("tail went on after its temporary slot was lost");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)?;
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("temporary slot") && err.contains("--slot"),
        "the error must say the slot is gone and name the fix: {err}"
    );
    Ok(())
}
