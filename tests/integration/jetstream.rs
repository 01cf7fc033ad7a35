//! Events on NATS JetStream (`[nats]`), against a real `nats-server -js` of the test's own:
//! every change of the blog workload (and its outbox messages) exactly once, in WAL order,
//! across SIGKILLs of streamex and of nats-server; the stream's settings checked by setup.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use streamex::Position;
use streamex::testing;

use crate::common::nats::NatsServer;
use crate::common::{
    self, BLOG, Rng, blog_activity, blog_config, derived_mismatches, eventually, settle, slot_for,
    spawn_service,
};

/// Per transaction (xid), its changes of `posts` and `comments` and its messages, in order:
/// `(entity, type)`.
type Story = BTreeMap<u32, Vec<(String, String)>>;

/// The blog configuration with a `[nats]` section for `nats`.
fn config_with_nats(url: &str, nats: &NatsServer, extra: &str) -> String {
    format!(
        "{}\n[nats]\nurl = {:?}\nstream = \"blog\"\nsubject_prefix = \"blog\"\n{extra}",
        blog_config(url, &slot_for(url)),
        nats.url()
    )
}

/// What the audit slot (test_decoding) saw: the committed story of the published tables.
async fn audited(pool: &PgPool, slot: &str) -> anyhow::Result<Story> {
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, 'include-xids', '1')",
    )
    .bind(slot)
    .fetch_all(pool)
    .await?;
    let mut story = Story::new();
    let mut current: Option<(u32, Vec<(String, String)>)> = None;
    for line in lines {
        if let Some(xid) = line.strip_prefix("BEGIN ") {
            current = Some((xid.parse()?, Vec::new()));
        } else if line.starts_with("COMMIT") {
            if let Some((xid, changes)) = current.take()
                && !changes.is_empty()
            {
                story.insert(xid, changes);
            }
        } else if let Some(rest) = line.strip_prefix("table public.") {
            let (table, rest) = rest.split_once(": ").unwrap_or_default();
            if table == "posts" || table == "comments" {
                let kind = rest.split(':').next().unwrap_or_default().to_lowercase();
                if let Some((_, changes)) = current.as_mut() {
                    changes.push((table.to_owned(), kind));
                }
            }
        } else if line.starts_with("message: transactional: 1 prefix: blog,")
            && let Some((_, changes)) = current.as_mut()
        {
            changes.push(("blog".to_owned(), "message".to_owned()));
        }
    }
    Ok(story)
}

/// Every message of stream `blog`, checked for order (stream order is position order, each
/// position once) and subject; returns the story it tells.
async fn published(nats: &NatsServer) -> anyhow::Result<(Story, u64)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("blog").await?;
    let last = stream.info().await?.state.last_sequence;
    let mut story = Story::new();
    let mut previous: Option<Position> = None;
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        let id: Position = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().parse())
            .transpose()?
            .ok_or_else(|| anyhow::anyhow!("message {sequence} has no Nats-Msg-Id"))?;
        anyhow::ensure!(
            previous.is_none_or(|p| p < id),
            "message {sequence} ({id}) does not come after the one before ({previous:?})"
        );
        previous = Some(id);
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        let entity = event["entity"].as_str().unwrap_or_default().to_owned();
        let expected_subject = if kind == "message" {
            "blog.messages.blog".to_owned()
        } else {
            format!("blog.public.{entity}")
        };
        assert_eq!(message.subject.as_str(), expected_subject);
        assert_eq!(
            Position::new(
                event["commit_lsn"].as_str().unwrap_or_default().parse()?,
                event["ordinal"].as_u64().unwrap_or(u64::MAX)
            ),
            id
        );
        let xid = u32::try_from(event["xid"].as_u64().unwrap_or_default())?;
        let changes = story.entry(xid).or_default();
        assert_eq!(
            event["ordinal"].as_u64(),
            Some(changes.len() as u64),
            "message {sequence}: ordinals of transaction {xid} are not 0, 1, 2, ..."
        );
        changes.push((entity, kind));
    }
    Ok((story, last))
}

/// Writes outbox messages: each transaction a post and a message about it.
async fn outbox_writer(pool: PgPool, stop: Arc<AtomicBool>) -> u64 {
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) {
        let step = async {
            let mut tx = pool.begin().await?;
            let id: i64 = sqlx::query_scalar("INSERT INTO posts (title) VALUES ('o') RETURNING id")
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_logical_emit_message(true, 'blog', $1)")
                .bind(format!("{{\"post\": {id}}}"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        };
        if step.await.is_ok() {
            written += 1;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    written
}

#[tokio::test]
async fn every_change_reaches_jetstream_once_in_order_across_kills_of_streamex_and_nats()
-> anyhow::Result<()> {
    let mut nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(&config, config_with_nats(&url, &nats, "max_in_flight = 64"))?;
    common::setup_service(&config)?;
    let audit = format!("{}_audit", slot_for(&url));
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&audit)
        .execute(&pool)
        .await?;

    let seed = common::seed_from_env("STREAMEX_JETSTREAM_SEED");
    let mut rng = Rng(seed | 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(seed.rotate_left(17) | 1);
        async move {
            let mut changes = 0;
            while !stop.load(Ordering::Relaxed) {
                changes += blog_activity(&pool, &mut rng).await.unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
            }
            changes
        }
    });
    let outbox = tokio::spawn(outbox_writer(pool.clone(), stop.clone()));

    let log = dir.path().join("streamex.log");
    let mut service = spawn_service(&config, &log, "info")?;
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(600 + rng.below(900))).await;
        if round == 1 {
            // JetStream goes away under a running streamex, and comes back.
            nats.kill()?;
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
            nats.restart()?;
        } else {
            service.kill()?;
            service.wait()?;
            service = spawn_service(&config, &log, "info")?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await?;
    let messages = outbox.await?;
    settle(&pool).await?;
    let story = audited(&pool, &audit).await;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&audit)
        .execute(&pool)
        .await?;
    let story = story?;
    let expected: usize = story.values().map(Vec::len).sum();
    eventually("JetStream has as many events as the WAL", async || {
        Ok(published(&nats).await?.1 >= expected as u64)
    })
    .await?;
    let (seen, count) = published(&nats).await?;
    service.kill()?;
    service.wait()?;
    assert_eq!(count, expected as u64, "events in JetStream vs in the WAL");
    let differing: Vec<_> = story
        .iter()
        .filter(|(xid, changes)| seen.get(xid) != Some(changes))
        .map(|(xid, changes)| (xid, changes, seen.get(xid)))
        .take(3)
        .collect();
    assert!(differing.is_empty(), "transactions differ: {differing:?}");
    assert_eq!(seen.len(), story.len());
    assert!(
        changes > 100 && messages > 20,
        "{changes} changes, {messages} messages"
    );
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    Ok(())
}

#[tokio::test]
async fn setup_creates_the_stream_and_refuses_one_with_other_settings() -> anyhow::Result<()> {
    let mut nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(&config, config_with_nats(&url, &nats, ""))?;
    let setup = common::streamex_command("warn")
        .args(["setup", "--config"])
        .arg(&config)
        .output()?;
    assert!(setup.status.success(), "{setup:?}");
    let stdout = String::from_utf8_lossy(&setup.stdout);
    assert!(
        stdout.contains("JetStream stream \"blog\" (blog.>)"),
        "{stdout}"
    );

    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let info = js.get_stream("blog").await?.info().await?.config.clone();
    assert_eq!(info.subjects, ["blog.>"]);
    assert_eq!(info.duplicate_window, Duration::from_secs(120));

    let status = |config: &std::path::Path| -> anyhow::Result<String> {
        let out = common::streamex_command("warn")
            .args(["status", "--config"])
            .arg(config)
            .output()?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let shown = status(&config)?;
    assert!(
        shown.contains(&format!(
            "jetstream stream \"blog\" at {}: 0 messages (0 B), last sequence 0, last event none",
            nats.url()
        )),
        "{shown}"
    );

    // The same stream asked for with another window and storage: refused, naming both.
    std::fs::write(
        &config,
        config_with_nats(
            &url,
            &nats,
            "duplicate_window = \"30s\"\nstorage = \"memory\"",
        ),
    )?;
    let refused = common::streamex_command("warn")
        .args(["setup", "--config"])
        .arg(&config)
        .output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("nats.duplicate_window asks for 30s, the stream has 120s")
            && stderr.contains("nats.storage asks for memory, the stream has file")
            && stderr.contains("nats stream edit blog"),
        "{stderr}"
    );

    // With the server gone, status still answers, and says so.
    nats.kill()?;
    let shown = status(&config)?;
    assert!(
        shown.contains("jetstream stream \"blog\"") && shown.contains("UNREADABLE"),
        "{shown}"
    );
    assert!(shown.contains("operators"), "{shown}");
    Ok(())
}

#[tokio::test]
async fn a_stream_that_holds_another_slots_events_pauses_the_pipeline_and_says_why()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let mut databases = Vec::new();
    for name in ["first", "second"] {
        let url = testing::server().create_database().await?;
        let pool = PgPool::connect(&url).await?;
        sqlx::raw_sql(BLOG).execute(&pool).await?;
        let config = dir.path().join(format!("{name}.toml"));
        // Only the publisher: the same stream for both.
        let text = format!(
            "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\", \"comments\"]\n\
             [nats]\nurl = {:?}\nstream = \"blog\"\nsubject_prefix = \"blog\"\n",
            slot_for(&url),
            nats.url()
        );
        std::fs::write(&config, text)?;
        common::setup_service(&config)?;
        databases.push((url, pool, config, dir.path().join(format!("{name}.log"))));
    }
    let (_, first_pool, first_config, first_log) = &databases[0];
    let mut first = spawn_service(first_config, first_log, "info")?;
    sqlx::query("INSERT INTO posts (title) VALUES ('from the first')")
        .execute(first_pool)
        .await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    eventually("the first database's post is in the stream", async || {
        Ok(js.get_stream("blog").await?.info().await?.state.messages >= 1)
    })
    .await?;
    first.kill()?;
    first.wait()?;

    let (second_url, second_pool, second_config, second_log) = &databases[1];
    let mut second = spawn_service(second_config, second_log, "info")?;
    sqlx::query("INSERT INTO posts (title) VALUES ('from the second')")
        .execute(second_pool)
        .await?;
    let wanted = "holds events of";
    eventually("the second instance says why it waits", async || {
        Ok(std::fs::read_to_string(second_log)?.contains(wanted))
    })
    .await?;
    second.kill()?;
    second.wait()?;
    let log = std::fs::read_to_string(second_log)?;
    let first_db = slot_for(&databases[0].0);
    assert!(
        log.contains(&format!("{first_db}/{first_db}")) && log.contains("a stream of its own"),
        "{log}"
    );
    // Nothing of the second database was published or acknowledged past its post.
    assert_eq!(js.get_stream("blog").await?.info().await?.state.messages, 1);
    let (unconfirmed,): (bool,) = sqlx::query_as(
        "SELECT confirmed_flush_lsn < pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot_for(second_url))
    .fetch_one(second_pool)
    .await?;
    assert!(unconfirmed);
    Ok(())
}

#[tokio::test]
async fn an_event_over_max_payload_waits_with_the_fix_and_goes_on_once_it_fits()
-> anyhow::Result<()> {
    let mut nats = NatsServer::start_with(Some(8192))?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\", \"comments\"]\n\
             [nats]\nurl = {:?}\nstream = \"blog\"\nsubject_prefix = \"blog\"\n",
            slot_for(&url),
            nats.url()
        ),
    )?;
    common::setup_service(&config)?;
    let log = dir.path().join("streamex.log");
    let mut service = spawn_service(&config, &log, "info")?;
    sqlx::query("INSERT INTO posts (title) VALUES ('small')")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO posts (title, body) VALUES ('large', repeat('x', 20000))")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO posts (title) VALUES ('after')")
        .execute(&pool)
        .await?;
    let named = eventually("the log names max_payload", async || {
        Ok(std::fs::read_to_string(&log)?.contains("raise max_payload"))
    })
    .await;
    if let Err(e) = named {
        anyhow::bail!("{e}:\n{}", std::fs::read_to_string(&log)?);
    }
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    assert_eq!(js.get_stream("blog").await?.info().await?.state.messages, 1);
    // The slot waits before the large post.
    let (waiting,): (bool,) = sqlx::query_as(
        "SELECT confirmed_flush_lsn < pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot_for(&url))
    .fetch_one(&pool)
    .await?;
    assert!(waiting);

    nats.restart_with(None)?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    eventually(
        "the large post and the one after it are in the stream",
        async || Ok(js.get_stream("blog").await?.info().await?.state.messages >= 3),
    )
    .await?;
    let titles: Vec<String> = {
        let stream = js.get_stream("blog").await?;
        let mut titles = Vec::new();
        for sequence in 1..=3 {
            let message = stream.get_raw_message(sequence).await?;
            let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
            titles.push(
                event["new_record"]["title"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        titles
    };
    assert_eq!(titles, ["small", "large", "after"]);
    service.kill()?;
    service.wait()?;
    Ok(())
}

#[tokio::test]
async fn with_the_last_message_deleted_a_restart_doubles_nothing() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\"]\n\
             [nats]\nurl = {:?}\nstream = \"blog\"\nsubject_prefix = \"blog\"\n",
            slot_for(&url),
            nats.url()
        ),
    )?;
    common::setup_service(&config)?;
    let log = dir.path().join("streamex.log");
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let count = async || -> anyhow::Result<u64> {
        Ok(js.get_stream("blog").await?.info().await?.state.messages)
    };
    let mut service = spawn_service(&config, &log, "info")?;
    for n in 1..=5 {
        sqlx::query("INSERT INTO posts (title) VALUES ($1)")
            .bind(format!("post {n}"))
            .execute(&pool)
            .await?;
    }
    eventually("five messages", async || Ok(count().await? >= 5)).await?;
    service.kill()?;
    service.wait()?;
    // Its last message gone, the stream no longer says where streamex was: a restart sends
    // again what the slot has not confirmed, and the duplicate window drops it.
    let stream = js.get_stream("blog").await?;
    assert!(stream.delete_message(5).await?);
    let mut service = spawn_service(&config, &log, "info")?;
    for n in 6..=7 {
        sqlx::query("INSERT INTO posts (title) VALUES ($1)")
            .bind(format!("post {n}"))
            .execute(&pool)
            .await?;
    }
    let last_title = async || -> anyhow::Result<String> {
        let mut stream = js.get_stream("blog").await?;
        let last = stream.info().await?.state.last_sequence;
        let message = stream.get_raw_message(last).await?;
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        Ok(event["new_record"]["title"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    eventually("post 7 is the last message", async || {
        Ok(last_title().await.unwrap_or_default() == "post 7")
    })
    .await?;
    service.kill()?;
    service.wait()?;
    let mut stream = js.get_stream("blog").await?;
    let last = stream.info().await?.state.last_sequence;
    let mut titles = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
            titles.push(
                event["new_record"]["title"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    // Post 5 was deleted by hand; nothing is there twice, and the rest is in order.
    assert_eq!(
        titles,
        ["post 1", "post 2", "post 3", "post 4", "post 6", "post 7"]
    );
    Ok(())
}
