//! `streamex worker`: operators run from the JetStream stream that a `streamex run` with
//! `[nats]` and no operators publishes to, against a real `nats-server -js` of the test's
//! own. The blog operators stay exact across SIGKILLs of the worker and an outage of
//! JetStream, and `streamex.processed` waits for them; failures go to the operators' policy
//! (dead letters, halt and `resume --skip-current`), an unreadable message too; a worker
//! without its stream or without `[nats]` says what to fix.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use streamex::testing;

use crate::common::nats::NatsServer;
use crate::common::{
    self, BLOG, Rng, blog_activity, blog_config, derived_mismatches, eventually, settle,
    settle_exact, slot_for, spawn_service,
};

/// `[nats]` for the test's server, stream and subjects `blog`.
fn nats_section(nats: &NatsServer) -> String {
    format!(
        "\n[nats]\nurl = {:?}\nstream = \"blog\"\nsubject_prefix = \"blog\"\n",
        nats.url()
    )
}

/// The blog configuration for database `url`: without its `[[operators]]` and with `[nats]`
/// for `streamex run` (it only publishes), and with both plus `extra` for the worker.
fn configs(url: &str, nats: &NatsServer, extra: &str) -> (String, String) {
    let blog = blog_config(url, &slot_for(url));
    let cut = blog
        .find("\n[[operators]]")
        .expect("the example configuration has operators");
    let publisher = format!("{}{}", &blog[..cut], nats_section(nats));
    let worker = format!("{blog}{}{extra}", nats_section(nats));
    (publisher, worker)
}

/// `streamex worker --config config`, its stderr appended to `log`.
fn spawn_worker(config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(common::streamex_command("info,streamex::worker=debug")
        .args(["worker", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Sends SIGTERM to `child` and waits for it, at most [`common::PATIENCE`].
fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGTERM) } == 0,
        "kill failed"
    );
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What happens to the pipeline between two moments of the blog workload.
#[derive(Clone, Copy, Debug)]
enum Disruption {
    /// The worker is SIGKILLed and started again.
    KillWorker,
    /// nats-server is SIGKILLed and started again, under streamex and the worker.
    JetStreamOutage,
    /// PostgreSQL crashes (immediate stop) and starts again.
    DatabaseCrash,
}

/// The blog workload through a publisher-only `streamex run` and a `streamex worker` with the
/// blog operators, the `disruptions` one after the other at random moments; then the
/// derived tables must be exact as soon as `streamex.processed` says the last write is.
async fn blog_through_a_worker(
    url: &str,
    cluster: Option<&testing::Cluster>,
    disruptions: &[Disruption],
) -> anyhow::Result<()> {
    let mut nats = NatsServer::start()?;
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (publisher, worker) = configs(
        url,
        &nats,
        &format!("\n[worker]\nack_wait = \"5s\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let endpoint = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let client = common::http_client()
        .timeout(Duration::from_secs(5))
        .build()?;
    let get = async |path: &str| -> anyhow::Result<(u16, String)> {
        let response = client.get(endpoint(path)).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    };
    let run_config = dir.path().join("run.toml");
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;

    let seed = common::seed_from_env("STREAMEX_WORKER_SEED");
    println!("STREAMEX_WORKER_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(seed.rotate_left(23) | 1);
        async move {
            let mut changes = 0;
            while !stop.load(Ordering::Relaxed) {
                match blog_activity(&pool, &mut rng).await {
                    Ok(n) => changes += n,
                    // The database is down: wait for it.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            }
            changes
        }
    });

    let run_log = dir.path().join("run.log");
    let worker_log = dir.path().join("worker.log");
    let mut service = spawn_service(&run_config, &run_log, "info")?;
    let mut worker = spawn_worker(&worker_config, &worker_log)?;
    for disruption in disruptions {
        tokio::time::sleep(Duration::from_millis(700 + rng.below(1300))).await;
        match disruption {
            Disruption::KillWorker => {
                worker.kill()?;
                worker.wait()?;
                tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
                worker = spawn_worker(&worker_config, &worker_log)?;
            }
            Disruption::JetStreamOutage => {
                nats.kill()?;
                // The worker's /readyz says so, naming the setting.
                eventually("the worker's /readyz saying NATS is gone", async || {
                    let (status, body) = get("/readyz").await?;
                    Ok(status == 503 && body.contains("nats.url"))
                })
                .await?;
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
                nats.restart()?;
            }
            Disruption::DatabaseCrash => {
                let cluster = cluster.expect("a cluster of the test's own to crash");
                tokio::task::block_in_place(|| cluster.stop(testing::StopMode::Immediate))?;
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
                tokio::task::block_in_place(|| cluster.start_again())?;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await?;

    // streamex.processed counts the worker's operators: once the marker is processed, the
    // derived tables are exact at once.
    settle(&pool).await?;
    let settled = derived_mismatches(&pool).await?;
    eventually("the derived tables match", async || {
        Ok(derived_mismatches(&pool).await? == (0, 0))
    })
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(&worker_log).unwrap_or_default();
        let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        anyhow::anyhow!("{e}; last lines of the worker's log, newest first:\n{tail}")
    })?;
    // The marker is a post: `processed('posts')` covers the operators that listen to posts,
    // the declarative one, not the tallies (comments only), which the wait above covers.
    assert_eq!(
        settled.0, 0,
        "streamex.processed said the marker was processed before the worker was done with it"
    );
    assert!(changes > 100, "only {changes} changes were written");

    // The checkpoints are the ones `run` would use: keyed by the slot.
    let checkpoints: Vec<String> = sqlx::query_scalar(
        "SELECT operator FROM streamex.operator_checkpoints WHERE slot = $1 ORDER BY 1",
    )
    .bind(slot_for(url))
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        checkpoints,
        ["post_comment_tallies", "post_with_comments_counts"]
    );
    let log = std::fs::read_to_string(&worker_log)?;
    assert!(!log.contains("panicked"), "{log}");

    // The worker's endpoint: ready, both operators' locks held, their consumers acknowledged.
    eventually("the worker's /readyz and /metrics", async || {
        let (ready, _) = get("/readyz").await?;
        let (status, metrics) = get("/metrics").await?;
        let held = ["post_comment_tallies", "post_with_comments_counts"]
            .iter()
            .all(|op| {
                metrics.contains(&format!("streamex_worker_lock_held{{operator=\"{op}\"}} 1"))
                    && metrics.lines().any(|l| {
                        l.starts_with(&format!(
                            "streamex_worker_acked_sequence{{operator=\"{op}\"}} "
                        )) && !l.ends_with(" 0")
                    })
            });
        Ok(ready == 200
            && status == 200
            && held
            && metrics.contains("streamex_worker_nats_connected 1"))
    })
    .await?;
    assert_eq!(get("/nothing").await?.0, 404);

    // `streamex status` with the publisher's configuration, which names no operator: both run
    // on the worker, and each has one consumer, with nothing left to deliver or acknowledge
    // once the worker is done.
    eventually("status showing the worker's operators done", async || {
        let out = common::streamex_command("warn")
            .args(["status", "--json", "--config"])
            .arg(&run_config)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let on_worker = report["operators"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["worker_pid"].is_i64() && o["processing"] == true)
            .count();
        let consumers = report["jetstream"]["consumer_states"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let done = consumers.iter().all(|c| {
            c["pending"] == 0 && c["ack_pending"] == 0 && c["ack_floor"].as_u64() > Some(0)
        });
        Ok(on_worker == 2 && consumers.len() == 2 && done)
    })
    .await?;
    let text = common::streamex_command("warn")
        .args(["status", "--config"])
        .arg(&run_config)
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        text.matches("running on a worker (backend pid").count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.matches("0 messages not yet delivered, 0 delivered and not acknowledged")
            .count(),
        2,
        "{text}"
    );

    // SIGTERM stops it cleanly.
    let status = terminate(&mut worker)?;
    assert!(status.success(), "the worker exited with {status}");
    service.kill()?;
    service.wait()?;
    Ok(())
}

#[tokio::test]
async fn a_worker_keeps_the_blog_tables_exact_across_sigkills_and_a_jetstream_outage()
-> anyhow::Result<()> {
    use Disruption::*;
    let url = testing::server().create_database().await?;
    // STREAMEX_WORKER_KILLS: how many SIGKILLs (4 by default), the outage after the second.
    let kills: usize = std::env::var("STREAMEX_WORKER_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(4);
    let mut disruptions = vec![KillWorker; kills];
    disruptions.insert(kills.min(2), JetStreamOutage);
    blog_through_a_worker(&url, None, &disruptions).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_out_a_database_crash_and_stays_exact() -> anyhow::Result<()> {
    use Disruption::*;
    let cluster = testing::Cluster::start()?;
    let url = cluster.create_database().await?;
    blog_through_a_worker(
        &url,
        Some(&cluster),
        &[KillWorker, DatabaseCrash, KillWorker],
    )
    .await
}

/// The configuration's operators replaced by two declarative ones on `posts`: one that fails
/// on every post whose id is a multiple of 7 and sets them aside, one that halts on post 5.
fn failing_operators(url: &str, nats: &NatsServer) -> (String, String) {
    let (publisher, worker) = configs(url, nats, "");
    let cut = worker.find("\n[[operators]]").unwrap_or(worker.len());
    let operators = r#"
[[operators]]
name = "every_post"
query = "INSERT INTO seen (id) SELECT $1::bigint WHERE 1 / (CASE WHEN $1::bigint % 7 = 0 THEN 0 ELSE 1 END) = 1 ON CONFLICT DO NOTHING"
id = { posts = "id" }
retry = { retries = 1, initial = "10ms", max = "10ms", on_failure = "dead_letter" }
# The posts may be written before the worker starts: they come from the stream, in order
# (a backfill would read them in the order of their ids' text).
backfill = false

[[operators]]
name = "halting"
query = "INSERT INTO seen_by_halting (id) SELECT $1::bigint WHERE 1 / (CASE WHEN $1::bigint = 5 THEN 0 ELSE 1 END) = 1 ON CONFLICT DO NOTHING"
id = { posts = "id" }
retry = { retries = 1, initial = "10ms", max = "10ms", on_failure = "halt" }
backfill = false
"#;
    let worker = format!("{}{operators}{}", &worker[..cut], nats_section(nats));
    (publisher, worker)
}

async fn dead_letters(pool: &PgPool, operator: &str) -> anyhow::Result<Vec<(Option<i64>, String)>> {
    Ok(sqlx::query_as(
        "SELECT (event->'new_record'->>'id')::bigint, error FROM streamex.dead_letters \
          WHERE operator = $1 ORDER BY commit_lsn, ordinal",
    )
    .bind(operator)
    .fetch_all(pool)
    .await?)
}

async fn state_of(pool: &PgPool, operator: &str) -> anyhow::Result<Option<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT state, coalesce(last_error, '') FROM streamex.operator_state WHERE operator = $1",
    )
    .bind(operator)
    .fetch_optional(pool)
    .await?)
}

#[tokio::test]
async fn failures_through_a_worker_go_to_dead_letters_halt_and_resume() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE seen (id bigint PRIMARY KEY); CREATE TABLE seen_by_halting (id bigint PRIMARY KEY);",
    )
    .execute(&pool)
    .await?;
    let dir = tempfile::tempdir()?;
    let (publisher, worker) = failing_operators(&url, &nats);
    let run_config = dir.path().join("run.toml");
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;
    let run_log = dir.path().join("run.log");
    let worker_log = dir.path().join("worker.log");
    let mut service = spawn_service(&run_config, &run_log, "info")?;
    let mut worker = spawn_worker(&worker_config, &worker_log)?;
    for id in 1..=20i64 {
        sqlx::query("INSERT INTO posts (id, title) VALUES ($1, 'p')")
            .bind(id)
            .execute(&pool)
            .await?;
    }

    // Every post but 7 and 14 is seen; those two are dead letters, with the error.
    eventually("every_post handled every post", async || {
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM seen")
            .fetch_one(&pool)
            .await?;
        Ok(seen == 18 || dead_letters(&pool, "every_post").await?.len() > 2)
    })
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(&worker_log).unwrap_or_default();
        anyhow::anyhow!("{e}; the worker's log:\n{log}")
    })?;
    eventually("every_post set two posts aside", async || {
        Ok(dead_letters(&pool, "every_post").await?.len() >= 2)
    })
    .await?;
    let seen: Vec<i64> = sqlx::query_scalar("SELECT id FROM seen ORDER BY id")
        .fetch_all(&pool)
        .await?;
    let expected: Vec<i64> = (1..=20).filter(|id| id % 7 != 0).collect();
    assert_eq!(seen, expected);
    let dead = dead_letters(&pool, "every_post").await?;
    assert_eq!(
        dead.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [Some(7), Some(14)]
    );
    assert!(dead[0].1.contains("division by zero"), "{dead:?}");

    // `halting` stopped on post 5: the four before it are applied, its state says why.
    eventually("halting halted", async || {
        Ok(state_of(&pool, "halting")
            .await?
            .is_some_and(|(state, _)| state == "halted"))
    })
    .await?;
    let (_, error) = state_of(&pool, "halting").await?.unwrap_or_default();
    assert!(error.contains("division by zero"), "{error}");
    let halted: Vec<i64> = sqlx::query_scalar("SELECT id FROM seen_by_halting ORDER BY id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(halted, [1, 2, 3, 4]);

    // resume --skip-current sets post 5 aside; the worker goes on with the others.
    let resumed = common::streamex_command("warn")
        .args(["resume", "halting", "--skip-current", "--config"])
        .arg(&worker_config)
        .output()?;
    assert!(resumed.status.success(), "{resumed:?}");
    eventually("halting handled every post after 5", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM seen_by_halting")
            .fetch_one(&pool)
            .await?;
        Ok(n == 19)
    })
    .await?;
    let set_aside = dead_letters(&pool, "halting").await?;
    assert_eq!(
        set_aside.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [Some(5)]
    );

    // A message whose payload is no event (published by hand, after every event): the
    // dead-letter operator stores it, the other halts on it; neither handler sees it.
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, "FFFFFFFF/0#0");
    headers.insert("Streamex-Entity", "posts");
    headers.insert("Streamex-Type", "insert");
    js.publish_with_headers("blog.public.posts", headers, "not an event".into())
        .await?
        .await?;
    eventually("the unreadable message is a dead letter", async || {
        Ok(dead_letters(&pool, "every_post").await?.len() == 3)
    })
    .await?;
    let dead = dead_letters(&pool, "every_post").await?;
    assert!(
        dead[2].0.is_none() && dead[2].1.contains("is not JSON"),
        "{dead:?}"
    );
    eventually("halting halted on the unreadable message", async || {
        Ok(state_of(&pool, "halting")
            .await?
            .is_some_and(|(state, error)| state == "halted" && error.contains("is not JSON")))
    })
    .await?;
    assert!(terminate(&mut worker)?.success());
    service.kill()?;
    service.wait()?;
    Ok(())
}

#[tokio::test]
async fn a_worker_without_its_stream_or_nats_or_on_another_slot_s_stream_says_what_to_fix()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let (_, worker) = configs(&url, &nats, "");
    let config = dir.path().join("worker.toml");
    // No `streamex setup` ran: the stream is missing.
    std::fs::write(&config, &worker)?;
    let missing = common::streamex_command("warn")
        .args(["worker", "--config"])
        .arg(&config)
        .output()?;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("JetStream stream \"blog\" does not exist")
            && stderr.contains("streamex setup"),
        "{stderr}"
    );
    // A stream whose events come from another database and slot: the checkpoints would
    // not be theirs.
    let (publisher, _) = configs(&url, &nats, "");
    let run_config = dir.path().join("run.toml");
    std::fs::write(&run_config, publisher)?;
    common::setup_service(&run_config)?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, "0/10#0");
    headers.insert("Streamex-Source", "elsewhere/other_slot");
    js.publish_with_headers("blog.public.posts", headers, "{}".into())
        .await?
        .await?;
    let other = common::streamex_command("warn")
        .args(["worker", "--config"])
        .arg(&config)
        .output()?;
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("holds the events of elsewhere/other_slot")
            && stderr.contains(&format!("is for {}/{}", slot_for(&url), slot_for(&url))),
        "{stderr}"
    );

    let cut = worker.find("\n[nats]").unwrap_or(worker.len());
    std::fs::write(&config, &worker[..cut])?;
    let without = common::streamex_command("warn")
        .args(["worker", "--config"])
        .arg(&config)
        .output()?;
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("no [nats] section"), "{stderr}");

    // Partitions on workers: not for a declarative operator.
    let declarative = worker.replace(
        "name = \"post_with_comments_counts\"\n",
        "name = \"post_with_comments_counts\"\npartitions = 2\n",
    );
    anyhow::ensure!(declarative != worker, "the example's operator entry moved");
    std::fs::write(&config, &declarative)?;
    let refused = common::streamex_command("warn")
        .args(["worker", "--config"])
        .arg(&config)
        .output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("post_with_comments_counts") && stderr.contains("declarative"),
        "{stderr}"
    );
    // `streamex run` takes partitions of either kind, within range.
    std::fs::write(
        &config,
        declarative.replace("partitions = 2\n", "partitions = 300\n"),
    )?;
    let on_run = common::streamex_command("warn")
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    assert!(!on_run.status.success());
    let stderr = String::from_utf8_lossy(&on_run.stderr);
    assert!(
        stderr.contains("partitions = 300 is out of range"),
        "{stderr}"
    );
    Ok(())
}

/// What a webhook receiver got: each event's position and title, in the order of arrival.
type Arrivals = Arc<std::sync::Mutex<Vec<(streamex::Position, String)>>>;

async fn hook(
    axum::extract::State(arrivals): axum::extract::State<Arrivals>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let position = format!(
        "{}#{}",
        event["commit_lsn"].as_str().unwrap_or_default(),
        event["ordinal"]
    );
    let title = event["new_record"]["title"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    match position.parse() {
        Ok(position) => {
            arrivals.lock().unwrap().push((position, title));
            axum::http::StatusCode::OK
        }
        Err(_) => axum::http::StatusCode::BAD_REQUEST,
    }
}

#[tokio::test]
async fn a_webhook_on_a_worker_gets_every_event_at_least_once_in_wal_order() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", listener.local_addr()?);
    let arrivals = Arrivals::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let (publisher, worker) = configs(&url, &nats, "");
    let cut = worker.find("\n[[operators]]").unwrap_or(worker.len());
    let worker = format!(
        "{}\n[[operators]]\nname = \"notify_posts\"\nwebhook = {{ url = {hook_url:?}, entities = [\"posts\"], types = [\"insert\"] }}\n{}",
        &worker[..cut],
        nats_section(&nats)
    );
    let run_config = dir.path().join("run.toml");
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;
    let log = dir.path().join("worker.log");
    let mut service = spawn_service(&run_config, &dir.path().join("run.log"), "info")?;
    let mut worker = spawn_worker(&worker_config, &log)?;
    let titles: Vec<String> = (0..60).map(|i| format!("post {i}")).collect();
    for (i, title) in titles.iter().enumerate() {
        sqlx::query("INSERT INTO posts (title) VALUES ($1)")
            .bind(title)
            .execute(&pool)
            .await?;
        // Updates and comments are not its events: skipped, and acknowledged.
        sqlx::query("UPDATE posts SET body = 'b' WHERE title = $1")
            .bind(title)
            .execute(&pool)
            .await?;
        if i == 20 || i == 40 {
            // After some have arrived, not all: killed with deliveries in flight.
            eventually("some posts arrived", async || {
                Ok(arrivals.lock().unwrap().len() > i / 2)
            })
            .await?;
            worker.kill()?;
            worker.wait()?;
            worker = spawn_worker(&worker_config, &log)?;
        }
    }
    eventually("every post arrived", async || {
        let got: std::collections::BTreeSet<String> = arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.clone())
            .collect();
        Ok(got.len() == titles.len())
    })
    .await?;
    let arrived = arrivals.lock().unwrap().clone();
    // In WAL order: each event's first arrival comes after every event before it.
    let mut first = std::collections::BTreeMap::new();
    let mut order = Vec::new();
    for (position, title) in &arrived {
        if first.insert(*position, title.clone()).is_none() {
            order.push(*position);
        }
    }
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "first arrivals out of WAL order: {order:?}"
    );
    let in_order: Vec<String> = first.into_values().collect();
    assert_eq!(
        in_order, titles,
        "one arrival per insert, none of the updates"
    );
    assert!(terminate(&mut worker)?.success());
    service.kill()?;
    service.wait()?;
    Ok(())
}

#[tokio::test]
async fn processed_waits_for_every_worker_operator_listening_to_the_entity() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    streamex::status::migrate(&pool).await?;
    streamex::status::store_item(&pool, "posts", 2_000, streamex::Lsn(0x20)).await?;
    let processed = async |entity: &str, micros: i64| -> anyhow::Result<(bool, bool)> {
        let sql: bool = sqlx::query_scalar(
            "SELECT streamex.processed($1, to_timestamp($2::double precision / 1e6))",
        )
        .bind(entity)
        .bind(micros)
        .fetch_one(&pool)
        .await?;
        let rust = streamex::status::is_processed(&pool, entity, micros).await?;
        Ok((sql, rust))
    };
    assert_eq!(processed("posts", 1_500).await?, (true, true));
    // A worker's operator on posts that has done nothing yet, one on comments far ahead.
    sqlx::query(
        "INSERT INTO streamex.worker_progress (slot, operator, entity, timestamp, lsn) VALUES
            ('s', 'a', 'posts', -9223372036854775808, '0/0'),
            ('s', 'b', 'comments', 9000, '0/90')",
    )
    .execute(&pool)
    .await?;
    assert_eq!(processed("posts", 1_500).await?, (false, false));
    sqlx::query("UPDATE streamex.worker_progress SET timestamp = 1000 WHERE operator = 'a'")
        .execute(&pool)
        .await?;
    assert_eq!(processed("posts", 1_500).await?, (false, false));
    assert_eq!(processed("posts", 1_000).await?, (true, true));
    sqlx::query("UPDATE streamex.worker_progress SET timestamp = 1500 WHERE operator = 'a'")
        .execute(&pool)
        .await?;
    assert_eq!(processed("posts", 1_500).await?, (true, true));
    // The worker is ahead of run: run's process status still decides.
    assert_eq!(processed("posts", 2_500).await?, (false, false));
    // An entity run has never processed is not processed, whatever the workers say.
    assert_eq!(processed("comments", 10).await?, (false, false));
    Ok(())
}

/// An operator runs in one place: `streamex run` refuses to start while a worker runs one of
/// its operators, naming it and the worker's backend, and after, until it is rebuilt (its
/// checkpoint is a position in the stream, not of the slot); while `run` is active, a worker
/// started with its operators stands by instead of running them beside it.
#[tokio::test]
async fn an_operator_runs_on_a_worker_or_under_run_never_both() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let slot = slot_for(&url);
    let dir = tempfile::tempdir()?;
    let (publisher, both) = configs(&url, &nats, "");
    let publisher_config = dir.path().join("run.toml");
    std::fs::write(&publisher_config, publisher)?;
    common::setup_service(&publisher_config)?;
    // `both` has the blog operators and [nats]: what a worker runs, and what `run` would too.
    let config = dir.path().join("both.toml");
    std::fs::write(&config, both)?;
    let holds = |operator: &'static str| {
        let pool = pool.clone();
        let key = format!("streamex worker {slot} {operator}");
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(key)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n > 0)
        }
    };

    let worker_log = dir.path().join("worker.log");
    let mut worker = spawn_worker(&config, &worker_log)?;
    eventually("the worker holding the tallies' lock", async || {
        holds("post_comment_tallies").await
    })
    .await?;
    let run_log = dir.path().join("run.log");
    let mut run = spawn_service(&config, &run_log, "info")?;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let status = loop {
        if let Some(status) = run.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            run.kill()?;
            anyhow::bail!(
                "run went on beside the worker:\n{}",
                std::fs::read_to_string(&run_log)?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&run_log)?;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("is run by a `streamex worker`")
            && text.contains("\"post_comment_tallies\"")
            && text.contains("backend pid"),
        "the error must name the operator and the worker's backend:\n{text}"
    );
    // `streamex rebuild` of an operator a worker runs is refused: the worker would never
    // carry it out.
    let refused = common::streamex_command("warn")
        .args(["rebuild", "post_comment_tallies", "--no-wait", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("runs on a `streamex worker`")
            && stderr.contains("streamex rebuild"),
        "{stderr}"
    );
    let requests: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM streamex.operator_state WHERE backfill_request IS NOT NULL",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(requests, 0, "a refused rebuild asks for nothing");
    assert!(terminate(&mut worker)?.success());
    sqlx::query("INSERT INTO posts (title) VALUES ('while nothing runs the operators')")
        .execute(&pool)
        .await?;

    // The worker is gone, but the operators' checkpoints are where it left them in the
    // stream: `run` refuses them until they are rebuilt.
    let refused = common::streamex_command("warn")
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("was run by a `streamex worker`")
            && stderr.contains("streamex rebuild post_comment_tallies --no-wait"),
        "{stderr}"
    );
    for (command, operator) in [
        ("backfill", "post_with_comments_counts"),
        ("rebuild", "post_comment_tallies"),
    ] {
        let asked = common::streamex_command("warn")
            .args([command, operator, "--no-wait", "--config"])
            .arg(&config)
            .output()?;
        assert!(asked.status.success(), "{asked:?}");
    }

    // Now `run` is active first: it rebuilds the operators, and a worker with the same
    // operators stands by.
    let mut run = spawn_service(&config, &run_log, "info")?;
    eventually("run holding the operators' locks", async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE l.locktype = 'advisory' AND l.granted
                AND a.application_name = $1
                AND ((l.classid::bigint << 32) | l.objid::bigint)
                    = hashtextextended($2, 0)",
        )
        .bind(format!("streamex instance {slot}"))
        .bind(format!("streamex worker {slot} post_comment_tallies"))
        .fetch_one(&pool)
        .await?;
        Ok(n == 1)
    })
    .await?;
    let standby_log = dir.path().join("standby.log");
    let mut standby = spawn_worker(&config, &standby_log)?;
    eventually("the worker standing by for both operators", async || {
        let text = std::fs::read_to_string(&standby_log).unwrap_or_default();
        Ok(text
            .matches("standby: another worker, or the active `streamex run`")
            .count()
            >= 2)
    })
    .await?;
    sqlx::query("INSERT INTO posts (title) VALUES ('one place')")
        .execute(&pool)
        .await?;
    settle_exact(&pool).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM streamex.worker_progress")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 0, "the rebuilds remove the worker's rows");
    assert!(terminate(&mut standby)?.success());
    assert!(terminate(&mut run)?.success());
    Ok(())
}

/// The database goes back in time while the worker is away (a restore of a backup, or a
/// failover to a standby without the last commits): the derived tables and the operators'
/// checkpoints are earlier than what JetStream has acknowledged. The worker starts again
/// after the stored checkpoints, not after the acknowledgements, and the derived tables come
/// out exact.
#[tokio::test]
async fn a_worker_goes_on_from_the_checkpoints_of_a_database_that_went_back() -> anyhow::Result<()>
{
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let (publisher, worker) = configs(&url, &nats, "");
    let run_config = dir.path().join("run.toml");
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;
    let run_log = dir.path().join("run.log");
    let worker_log = dir.path().join("worker.log");
    let mut service = spawn_service(&run_config, &run_log, "info")?;
    let mut worker = spawn_worker(&worker_config, &worker_log)?;

    sqlx::raw_sql(
        "INSERT INTO posts (id, title) SELECT i, 'p' || i FROM generate_series(1, 20) i;
         INSERT INTO comments (post_id, body) SELECT 1 + i % 20, 'c' || i FROM generate_series(1, 200) i;",
    )
    .execute(&pool)
    .await?;
    settle_exact(&pool).await?;
    // The backup: what the operators derived, their checkpoints, and the worker's rows.
    const SAVED: [&str; 5] = [
        "post_with_comments_counts",
        "post_comment_tallies",
        "streamex.operator_checkpoints",
        "streamex.worker_progress",
        "streamex.worker_consumers",
    ];
    for (i, table) in SAVED.iter().enumerate() {
        sqlx::raw_sql(&format!("CREATE TABLE saved_{i} AS SELECT * FROM {table}"))
            .execute(&pool)
            .await?;
    }
    sqlx::raw_sql(
        "INSERT INTO comments (post_id, body) SELECT 1 + i % 20, 'later' || i FROM generate_series(1, 300) i;
         UPDATE posts SET title = title || '+' WHERE id <= 10;",
    )
    .execute(&pool)
    .await?;
    settle_exact(&pool).await?;
    assert!(terminate(&mut worker)?.success());

    // The restore, while the worker is away (the source tables keep their rows: they are
    // what the slot and the stream had already sent).
    for (i, table) in SAVED.iter().enumerate() {
        sqlx::raw_sql(&format!(
            "DELETE FROM {table}; INSERT INTO {table} SELECT * FROM saved_{i}"
        ))
        .execute(&pool)
        .await?;
    }
    assert_ne!(
        derived_mismatches(&pool).await?,
        (0, 0),
        "the restore must take the derived tables back"
    );

    let mut worker = spawn_worker(&worker_config, &worker_log)?;
    settle(&pool).await?;
    eventually("the derived tables exact after the restore", async || {
        Ok(derived_mismatches(&pool).await? == (0, 0))
    })
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(&worker_log).unwrap_or_default();
        anyhow::anyhow!("{e}\nworker log:\n{log}")
    })?;
    let log = std::fs::read_to_string(&worker_log)?;
    assert!(
        log.contains("stored checkpoint is behind its consumer's acknowledgements"),
        "{log}"
    );
    assert!(terminate(&mut worker)?.success());
    service.kill()?;
    service.wait()?;
    Ok(())
}

/// Holders of the operators' worker locks, by backend pid (one per operator's lock held).
async fn lock_holders(pool: &PgPool, slot: &str) -> anyhow::Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT a.pid FROM pg_stat_activity a
          WHERE a.application_name LIKE 'streamex worker ' || $1 || ' %'
            AND EXISTS (SELECT 1 FROM pg_locks l
                         WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)
          ORDER BY 1",
    )
    .bind(slot)
    .fetch_all(pool)
    .await?)
}

/// The names of the consumers of the stream `stream`.
async fn consumer_names(nats: &NatsServer, stream: &str) -> anyhow::Result<Vec<String>> {
    use futures_util::TryStreamExt as _;
    let client = async_nats::connect(nats.url()).await?;
    let stream = async_nats::jetstream::new(client)
        .get_stream(stream)
        .await?;
    Ok(stream.consumer_names().try_collect().await?)
}

/// A worker frozen by SIGSTOP keeps its lock sessions open, but stops renewing their lease:
/// the server ends them after `[lock] lease`, a standby worker takes the operators over, and
/// the frozen one, woken up, finds its lease over and stands by. The derived tables stay
/// exact throughout.
#[tokio::test]
async fn a_frozen_worker_s_operators_are_taken_over_after_its_lease() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let (publisher, worker) = configs(&url, &nats, "");
    anyhow::ensure!(
        worker.contains("lease = \"30s\""),
        "the example's [lock] lease line moved"
    );
    let worker = worker.replace("lease = \"30s\"", "lease = \"3s\"");
    let run_config = dir.path().join("run.toml");
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let logs = || {
        format!(
            "--- worker A:\n{}\n--- worker B:\n{}",
            std::fs::read_to_string(&log_a).unwrap_or_default(),
            std::fs::read_to_string(&log_b).unwrap_or_default()
        )
    };
    let mut service = spawn_service(&run_config, &dir.path().join("run.log"), "info")?;
    let mut a = spawn_worker(&worker_config, &log_a)?;
    eventually("worker A holding both operators' locks", async || {
        Ok(lock_holders(&pool, &slot).await?.len() == 2)
    })
    .await?;
    let held_by_a = lock_holders(&pool, &slot).await?;
    let mut b = spawn_worker(&worker_config, &log_b)?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(common::seed_from_env("STREAMEX_WORKER_SEED") | 1);
        async move {
            let mut changes = 0;
            while !stop.load(Ordering::Relaxed) {
                changes += blog_activity(&pool, &mut rng).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(changes)
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid_a = libc::pid_t::try_from(a.id())?;
    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    anyhow::ensure!(
        unsafe { libc::kill(pid_a, libc::SIGSTOP) } == 0,
        "SIGSTOP failed"
    );
    let taken_over = eventually("worker B taking both operators over", async || {
        let holders = lock_holders(&pool, &slot).await?;
        Ok(holders.len() == 2 && holders.iter().all(|pid| !held_by_a.contains(pid)))
    })
    .await;
    // SAFETY: as above.
    anyhow::ensure!(
        unsafe { libc::kill(pid_a, libc::SIGCONT) } == 0,
        "SIGCONT failed"
    );
    taken_over.map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await??;
    assert!(changes > 50, "only {changes} changes were written");

    settle_exact(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    let log = std::fs::read_to_string(&log_a)?;
    assert!(
        log.contains("lease ran out") || log.contains("worker lock session failed"),
        "worker A did not notice it lost its lease:\n{}",
        logs()
    );
    // Woken up, A stands by: B still holds both locks.
    let holders = lock_holders(&pool, &slot).await?;
    assert!(
        holders.iter().all(|pid| !held_by_a.contains(pid)),
        "{}",
        logs()
    );
    // Each session made a consumer of its own and deleted the operator's others: one per
    // operator is left, B's, so that A, woken up, could pull only from its own, deleted.
    let mut names = consumer_names(&nats, "blog").await?;
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}\n{}", logs());
    for (name, operator) in names
        .iter()
        .zip(["post_comment_tallies", "post_with_comments_counts"])
    {
        let session = name
            .strip_prefix(&format!("{slot}-{operator}-s"))
            .unwrap_or_else(|| panic!("{name} is not a session's consumer of {operator}"));
        assert!(
            session.len() == 16 && session.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}"
        );
        assert!(
            std::fs::read_to_string(&log_b)?.contains(name.as_str()),
            "{name} is not B's\n{}",
            logs()
        );
    }
    for worker in [&mut a, &mut b] {
        let status = terminate(worker)?;
        assert!(
            status.success(),
            "a worker exited with {status}\n{}",
            logs()
        );
    }
    service.kill()?;
    service.wait()?;
    Ok(())
}

/// FNV-1a, 64 bits, written here apart from streamex's: the partition rule that the README
/// gives consumers in other languages.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// With `nats.partitions = 4` each row's events go to `<table subject>.<p>`, `p` from its key
/// (`Streamex-Key`), and a worker still runs the blog operators exactly. Then the stream goes
/// back to no partitions while the worker is away: its next consumer must still get the
/// partitioned messages it had not handled, which its table's subject alone would miss.
#[tokio::test]
async fn partitioned_subjects_keep_rows_apart_and_a_worker_gets_them_before_and_after()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let write = |partitions: u32| -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
        let (publisher, worker) = configs(&url, &nats, "");
        let with = |config: String| format!("{config}partitions = {partitions}\n");
        let (run, work) = (
            dir.path().join(format!("run-{partitions}.toml")),
            dir.path().join(format!("worker-{partitions}.toml")),
        );
        std::fs::write(&run, with(publisher))?;
        std::fs::write(&work, with(worker))?;
        Ok((run, work))
    };
    let (run_4, worker_4) = write(4)?;
    let (run_1, worker_1) = write(1)?;
    common::setup_service(&run_4)?;
    let log = dir.path().join("worker.log");
    let run_log = dir.path().join("run.log");
    let mut rng = Rng(common::seed_from_env("STREAMEX_WORKER_SEED") | 1);
    let activity = async |rng: &mut Rng, rounds: usize| -> anyhow::Result<u64> {
        let mut changes = 0;
        for _ in 0..rounds {
            changes += blog_activity(&pool, rng).await?;
        }
        Ok(changes)
    };

    let mut service = spawn_service(&run_4, &run_log, "info")?;
    let mut worker = spawn_worker(&worker_4, &log)?;
    // `processed` counts a worker's operators once it has registered them.
    let slot = slot_for(&url);
    let running = async || -> anyhow::Result<()> {
        eventually("the worker running both operators", async || {
            Ok(lock_holders(&pool, &slot).await?.len() == 2)
        })
        .await
    };
    running().await?;
    assert!(activity(&mut rng, 40).await? > 40);
    settle(&pool).await?;
    assert_eq!(
        derived_mismatches(&pool).await?.0,
        0,
        "{}",
        std::fs::read_to_string(&log)?
    );

    // Every table message on its row's partition.
    let client = async_nats::connect(nats.url()).await?;
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("blog")
        .await?;
    let last = stream.info().await?.state.last_sequence;
    let mut used = std::collections::BTreeSet::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let record = if event["type"] == "delete" {
            &event["old_record"]
        } else {
            &event["new_record"]
        };
        let id = record["id"].to_string();
        let key = message.headers.get("Streamex-Key").map(|k| k.as_str());
        assert_eq!(key, Some(id.as_str()), "message {sequence}");
        let partition = fnv1a(id.as_bytes()) % 4;
        used.insert(partition);
        assert_eq!(
            message.subject.as_str(),
            format!(
                "blog.public.{}.{partition}",
                event["table"].as_str().unwrap_or("?")
            ),
            "message {sequence}"
        );
    }
    assert_eq!(used.len(), 4, "{last} messages, on partitions {used:?}");

    // The worker away, more partitioned messages; then no partitions.
    terminate(&mut worker)?;
    let before = stream.info().await?.state.last_sequence;
    let written = activity(&mut rng, 20).await?;
    eventually("the publisher publishing the changes", async || {
        Ok(stream.info().await?.state.last_sequence >= before + written)
    })
    .await?;
    service.kill()?;
    service.wait()?;
    let mut service = spawn_service(&run_1, &run_log, "info")?;
    activity(&mut rng, 20).await?;
    let mut worker = spawn_worker(&worker_1, &log)?;
    running().await?;
    settle(&pool).await?;
    // The marker is a post: the tallies (comments only) are waited for apart.
    eventually("the derived tables exact", async || {
        Ok(derived_mismatches(&pool).await? == (0, 0))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
    assert!(
        std::fs::read_to_string(&log)?.contains("partitioned messages of the operator's table"),
        "the tallies' consumer (comments only) did not take every subject"
    );
    terminate(&mut worker)?;
    service.kill()?;
    service.wait()?;
    Ok(())
}

/// How many partitions of the tallies the worker whose endpoint is on `port` holds, from its
/// `/metrics`.
async fn partitions_held(client: &reqwest::Client, port: u16) -> anyhow::Result<usize> {
    // Not listening yet (starting), or gone: none.
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    else {
        return Ok(0);
    };
    let text = response.text().await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("streamex_worker_lock_held{operator=\"post_comment_tallies#")
                && l.ends_with(" 1")
        })
        .count())
}

/// Two workers share the tallies' four partitions, two each; a truncate among the writes
/// passes every partition in order; a SIGKILLed worker's partitions are taken over by the
/// other; the tallies stay exact throughout.
#[tokio::test]
async fn two_workers_share_an_operator_s_partitions_and_take_a_killed_one_s_over()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let (publisher, worker) = configs(&url, &nats, "");
    anyhow::ensure!(worker.contains("name = \"post_comment_tallies\"\n"));
    let worker = worker
        .replace(
            "name = \"post_comment_tallies\"\n",
            "name = \"post_comment_tallies\"\npartitions = 4\n",
        )
        .replace("lease = \"30s\"", "lease = \"3s\"");
    let run_config = dir.path().join("run.toml");
    std::fs::write(&run_config, publisher)?;
    let port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (port_a, port_b) = (port()?, port()?);
    let (config_a, config_b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    for (path, port) in [(&config_a, port_a), (&config_b, port_b)] {
        std::fs::write(
            path,
            format!("{worker}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
        )?;
    }
    common::setup_service(&run_config)?;
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let logs = || {
        format!(
            "--- worker A:\n{}\n--- worker B:\n{}",
            std::fs::read_to_string(&log_a).unwrap_or_default(),
            std::fs::read_to_string(&log_b).unwrap_or_default()
        )
    };
    let client = common::http_client()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut service = spawn_service(&run_config, &dir.path().join("run.log"), "info")?;
    let mut a = spawn_worker(&config_a, &log_a)?;
    eventually("worker A holding the four partitions", async || {
        Ok(partitions_held(&client, port_a).await? == 4)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(common::seed_from_env("STREAMEX_WORKER_SEED") | 1);
        async move {
            let mut changes = 0;
            while !stop.load(Ordering::Relaxed) {
                changes += blog_activity(&pool, &mut rng).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(changes)
        }
    });
    let mut b = spawn_worker(&config_b, &log_b)?;
    eventually("the two workers holding two partitions each", async || {
        Ok(partitions_held(&client, port_a).await? == 2
            && partitions_held(&client, port_b).await? == 2)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("TRUNCATE comments").execute(&pool).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.kill()?;
    a.wait()?;
    eventually("worker B taking the four partitions over", async || {
        Ok(partitions_held(&client, port_b).await? == 4)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await??;
    assert!(changes > 50, "only {changes} changes were written");

    settle(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    // The marker is a post, which the tallies do not listen to: wait for them.
    eventually("the derived tables exact", async || {
        Ok(derived_mismatches(&pool).await? == (0, 0))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    let checkpoints: Vec<String> = sqlx::query_scalar(
        "SELECT operator FROM streamex.operator_checkpoints WHERE slot = $1 ORDER BY 1",
    )
    .bind(&slot)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        checkpoints,
        [
            "post_comment_tallies#0/4",
            "post_comment_tallies#1/4",
            "post_comment_tallies#2/4",
            "post_comment_tallies#3/4",
            "post_with_comments_counts"
        ],
        "each partition keeps its own checkpoint"
    );
    let status = terminate(&mut b)?;
    assert!(
        status.success(),
        "worker B exited with {status}\n{}",
        logs()
    );
    service.kill()?;
    service.wait()?;
    Ok(())
}

/// Rows written before the slot exists are in no stream: a worker operator's first run must
/// read them (its backfill), then go on with the stream's events after its snapshot. The
/// worker is SIGKILLed while it backfills (and once more later); the tallies run in
/// `partitions` (1: whole), whose partition 0 backfills for all of them.
async fn a_worker_backfills_rows_the_stream_never_had(partitions: u32) -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let slot = slot_for(&url);
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    // Before the slot: 300 posts with 40,000 comments between them, and some of them gone.
    sqlx::raw_sql(
        "INSERT INTO posts (title) SELECT 'early ' || i FROM generate_series(1, 300) i;
         INSERT INTO comments (post_id, body)
              SELECT 1 + i % 300, 'early' FROM generate_series(1, 40000) i;
         DELETE FROM comments WHERE id % 7 = 0;
         DELETE FROM posts WHERE id % 50 = 0;",
    )
    .execute(&pool)
    .await?;
    let dir = tempfile::tempdir()?;
    let (publisher, worker) = configs(&url, &nats, "");
    anyhow::ensure!(worker.contains("name = \"post_comment_tallies\"\n"));
    let worker = worker.replace(
        "name = \"post_comment_tallies\"\n",
        &format!("name = \"post_comment_tallies\"\npartitions = {partitions}\n"),
    );
    let (run_config, worker_config) = (dir.path().join("run.toml"), dir.path().join("w.toml"));
    std::fs::write(&run_config, publisher)?;
    std::fs::write(&worker_config, worker)?;
    common::setup_service(&run_config)?;
    let mut service = spawn_service(&run_config, &dir.path().join("run.log"), "info")?;
    let worker_log = dir.path().join("worker.log");
    let log = || std::fs::read_to_string(&worker_log).unwrap_or_default();

    let seed = common::seed_from_env("STREAMEX_WORKER_SEED");
    println!("STREAMEX_WORKER_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(seed.rotate_left(17) | 1);
        async move {
            let mut changes = 0;
            while !stop.load(Ordering::Relaxed) {
                changes += blog_activity(&pool, &mut rng).await?;
                tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            }
            anyhow::Ok(changes)
        }
    });
    tokio::time::sleep(Duration::from_millis(300 + rng.below(500))).await;
    let mut worker = spawn_worker(&worker_config, &worker_log)?;
    // Killed as soon as it says it reads the rows: the backfill must roll back whole, and
    // the next start backfill again.
    eventually("the worker starting its backfill", async || {
        Ok(log().contains("backfill: reading the existing rows"))
    })
    .await?;
    worker.kill()?;
    worker.wait()?;
    worker = spawn_worker(&worker_config, &worker_log)?;
    tokio::time::sleep(Duration::from_millis(800 + rng.below(1200))).await;
    worker.kill()?;
    worker.wait()?;
    worker = spawn_worker(&worker_config, &worker_log)?;
    tokio::time::sleep(Duration::from_millis(500 + rng.below(500))).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await??;
    assert!(changes > 50, "only {changes} changes were written");

    settle(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    eventually("the derived tables exact", async || {
        Ok(derived_mismatches(&pool).await? == (0, 0))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    // The early rows (the workload moves and deletes a few) are counted, through the
    // backfill alone: the stream never had them.
    let (early, tallied): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM comments WHERE body = 'early'),
                (SELECT coalesce(sum(comments), 0)::int8 FROM post_comment_tallies)",
    )
    .fetch_one(&pool)
    .await?;
    assert!(early > 20_000, "only {early} early comments are left");
    assert!(
        tallied >= early,
        "{tallied} comments tallied, {early} early ones exist"
    );
    let text = log();
    assert!(text.contains("backfill done"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    if partitions > 1 {
        assert!(
            text.contains("this partition waits for its checkpoint"),
            "the other partitions wait for partition 0's backfill\n{text}"
        );
    }
    let halted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM streamex.operator_state WHERE slot = $1 AND state = 'halted'",
    )
    .bind(&slot)
    .fetch_one(&pool)
    .await?;
    assert_eq!(halted, 0, "{text}");
    let status = terminate(&mut worker)?;
    assert!(status.success(), "the worker exited with {status}\n{text}");
    service.kill()?;
    service.wait()?;
    Ok(())
}

#[tokio::test]
async fn a_worker_backfills_its_operators_first_run() -> anyhow::Result<()> {
    a_worker_backfills_rows_the_stream_never_had(1).await
}

#[tokio::test]
async fn a_worker_backfills_a_partitioned_operator_whole_then_its_partitions_go_on()
-> anyhow::Result<()> {
    a_worker_backfills_rows_the_stream_never_had(3).await
}
