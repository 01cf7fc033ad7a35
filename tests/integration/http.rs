//! The HTTP endpoint (`[http]`) of a running service, over real TCP, on a private cluster:
//! probes, metrics, process status, channels as Server-Sent Events (and lagging clients, cut
//! off by events or by bytes, and clients beyond `max_clients`), the bearer token, the `Host`
//! check, shutdown, and a real headless browser following a channel with `EventSource`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use sqlx::{Connection as _, PgPool};
use streamex::config::Config;
use streamex::event::Event;
use streamex::operator::{AnyOperator, Context, Operator, Subscription};
use streamex::pubsub::PubSub;
use streamex::status::{PostgresStatus, ProcessStatusStorage};
use streamex::testing;

use crate::common;

use common::{BLOG, PATIENCE, settle, slot_for};

/// A port nobody listens on now (the service binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `text` pointed at `url`, with the HTTP endpoint on `port` and `env` overrides on top.
fn config(url: &str, port: u16, text: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
    let mut vars = vec![
        ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
        ("STREAMEX_SLOT".to_owned(), slot_for(url)),
        (
            "STREAMEX_HTTP__LISTEN".to_owned(),
            format!("127.0.0.1:{port}"),
        ),
    ];
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Ok(Config::parse(text, "test.toml", vars)?)
}

/// The example configuration (the blog's two operators).
fn blog_config(url: &str, port: u16) -> anyhow::Result<Config> {
    config(
        url,
        port,
        include_str!("../../config/streamex.toml"),
        &[
            ("STREAMEX_RETRY__INITIAL", "10ms"),
            ("STREAMEX_RETRY__MAX", "20ms"),
        ],
    )
}

/// No operators from the configuration; `comments` also on `posts/<post_id>/comments`.
const CHANNELS: &str =
    "database_url = \"\"\n[entities.comments]\nscopes = [[\"post_id -> posts\"]]\n";

struct Service {
    base: String,
    /// The service's bus, to see its subscriptions.
    pubsub: PubSub,
    inner: common::Service,
}

impl Service {
    async fn start<S: ProcessStatusStorage + Clone>(
        config: &Config,
        status: S,
        operators: Vec<AnyOperator>,
    ) -> anyhow::Result<Service> {
        let pubsub = PubSub::new();
        let inner = common::Service::start(config, status, pubsub.clone(), operators).await?;
        let base = format!("http://{}", config.http.listen.context("no [http] listen")?);
        let service = Service {
            base,
            pubsub,
            inner,
        };
        service.wait_listening().await?;
        Ok(service)
    }

    /// Waits until `/healthz` answers 200.
    async fn wait_listening(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = client().get(self.url("/healthz")).send().await {
                ensure!(r.status() == 200, "/healthz answered {}", r.status());
                return Ok(());
            }
            ensure!(
                !self.inner.task.is_finished(),
                "the service stopped before listening"
            );
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the service never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (status, _, body) = self.get_with(path, &[]).await?;
        Ok((status, body))
    }

    /// `path` with these request headers: the status, the response headers and the body.
    async fn get_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, String)> {
        let mut request = client().get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Ok((status, headers, response.text().await?))
    }

    /// Polls `path` until it answers `status`; returns the last body.
    async fn wait_for(&self, path: &str, status: u16) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (got, body) = self.get(path).await?;
            if got == status {
                return Ok(body);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{path} still answers {got} ({body}), not {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` as `name{labels}` → value.
    async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let (status, text) = self.get("/metrics").await?;
        ensure!(status == 200, "/metrics answered {status}: {text}");
        let mut values = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').context("a sample line")?;
            values.insert(name.to_owned(), value.parse()?);
        }
        Ok(values)
    }

    async fn subscribe(&self, channel: &str) -> anyhow::Result<SseReader> {
        self.subscribe_as(channel, channel).await
    }

    /// Follows `/channels/{path}`, which the server must read as the channel `name`.
    async fn subscribe_as(&self, path: &str, name: &str) -> anyhow::Result<SseReader> {
        self.subscribe_with(path, name, &[]).await
    }

    /// [`subscribe_as`](Self::subscribe_as) with these request headers.
    async fn subscribe_with(
        &self,
        path: &str,
        name: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<SseReader> {
        let channel = name;
        let mut request = client().get(self.url(&format!("/channels/{path}")));
        for (header, value) in headers {
            request = request.header(*header, *value);
        }
        let response = request.send().await?;
        ensure!(
            response.status() == 200,
            "subscribing: {}",
            response.status()
        );
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let mut reader = SseReader {
            response,
            buffer: Vec::new(),
            scanned: 0,
        };
        // The first message says the subscription is in place: what is written from now on
        // reaches it.
        let first = reader.next().await?.context("the stream ended at once")?;
        ensure!(
            first.comments == [format!("subscribed to {channel}")],
            "{first:?}"
        );
        Ok(reader)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.inner.stop().await
    }
}

fn client() -> reqwest::Client {
    crate::common::http_client()
        .timeout(PATIENCE)
        .build()
        .expect("an HTTP client")
}

fn metric(values: &HashMap<String, f64>, name: &str) -> anyhow::Result<f64> {
    values
        .get(name)
        .copied()
        .with_context(|| format!("{name} not in /metrics: {values:?}"))
}

/// One Server-Sent Events message.
#[derive(Debug, Default)]
struct Message {
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
    comments: Vec<String>,
}

struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// How much of `buffer` holds no message end (large messages come in many chunks).
    scanned: usize,
}

impl SseReader {
    /// The next message; `None` when the stream ended.
    async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            let from = self.scanned.saturating_sub(1);
            if let Some(at) = self.buffer[from..].windows(2).position(|w| w == b"\n\n") {
                let end = from + at;
                let block = String::from_utf8(self.buffer[..end].to_vec())?;
                self.buffer.drain(..end + 2);
                self.scanned = 0;
                return Ok(Some(parse_message(&block)));
            }
            self.scanned = self.buffer.len();
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .context("no Server-Sent Events data in time")??;
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    ensure!(
                        self.buffer.is_empty(),
                        "the stream ended inside a message: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// The next message with data (skipping keep-alive comments).
    async fn next_data(&mut self) -> anyhow::Result<Message> {
        loop {
            let message = self.next().await?.context("the stream ended")?;
            if message.data.is_some() || message.event.is_some() {
                return Ok(message);
            }
        }
    }
}

fn parse_message(block: &str) -> Message {
    let mut message = Message::default();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            message.comments.push(comment.trim_start().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "event" => message.event = Some(value),
            "id" => message.id = Some(value),
            "data" => {
                message.data = Some(match message.data.take() {
                    Some(before) => format!("{before}\n{value}"),
                    None => value,
                })
            }
            _ => {}
        }
    }
    message
}

/// Checks that `message` carries an event exactly as `streamex tail` prints it, with its
/// position as the SSE id, and returns it.
fn event_of(message: &Message) -> anyhow::Result<Event> {
    let data = message.data.as_deref().context("a data line")?;
    let event: Event = serde_json::from_str(data).with_context(|| data.to_owned())?;
    ensure!(
        serde_json::to_string(&event)? == data,
        "not the JSON `streamex tail` prints: {data}"
    );
    let position = event.position();
    ensure!(
        message.id.as_deref() == Some(position.to_string().as_str()),
        "{message:?}"
    );
    Ok(event)
}

fn field<'a>(event: &'a Event, name: &str) -> Option<&'a serde_json::Value> {
    event.new_record.as_ref().and_then(|r| r.get(name))
}

#[tokio::test]
async fn probes_follow_standby_then_streaming_and_metrics_count_the_rows() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = blog_config(&url, free_port()?)?;
    // Another instance holds the slot's instance lock: this one must stand by.
    let mut active = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("streamex slot {}", slot_for(&url)))
        .execute(&mut active)
        .await?;
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), operators).await?;

    assert_eq!(service.get("/healthz").await?.0, 200);
    // Any other path: a short JSON 404 naming it.
    let (status, body) = service.get("/nowhere").await?;
    assert_eq!(status, 404, "{body}");
    let reason: serde_json::Value = serde_json::from_str(&body)?;
    assert!(
        reason["error"]
            .as_str()
            .is_some_and(|e| e.contains("/nowhere")),
        "{body}"
    );
    let (status, body) = service.get("/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    let metrics = service.metrics().await?;
    assert_eq!(metric(&metrics, "streamex_instance_active")?, 0.0);

    // The other instance goes away: this one takes over and streams.
    active.close().await?;
    service.wait_for("/readyz", 200).await?;

    let mut posts = 0;
    let mut comments = 0;
    for round in 0..4 {
        let mut tx = pool.begin().await?;
        let post: i64 = sqlx::query_scalar("INSERT INTO posts (title) VALUES ($1) RETURNING id")
            .bind(format!("post {round}"))
            .fetch_one(&mut *tx)
            .await?;
        let added = sqlx::query(
            "INSERT INTO comments (post_id, body) SELECT $1, 'c' FROM generate_series(1, $2::int)",
        )
        .bind(post)
        .bind(round + 1)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        posts += 1;
        comments += added;
    }
    settle(&pool).await?;
    posts += 1; // settle's marker

    let metrics = service.metrics().await?;
    let count = |name: &str| metric(&metrics, name);
    assert_eq!(
        count("streamex_events_received_total{entity=\"posts\"}")?,
        posts as f64
    );
    assert_eq!(
        count("streamex_events_received_total{entity=\"comments\"}")?,
        comments as f64
    );
    // The declarative operator listens to posts and comments, the tallies to comments.
    assert_eq!(
        count("streamex_operator_events_processed_total{operator=\"post_with_comments_counts\"}")?,
        (posts + comments) as f64
    );
    assert_eq!(
        count("streamex_operator_events_processed_total{operator=\"post_comment_tallies\"}")?,
        comments as f64
    );
    for operator in ["post_with_comments_counts", "post_comment_tallies"] {
        assert_eq!(
            count(&format!(
                "streamex_operator_state{{operator=\"{operator}\",state=\"running\"}}"
            ))?,
            1.0
        );
        assert_eq!(
            count(&format!(
                "streamex_operator_state{{operator=\"{operator}\",state=\"halted\"}}"
            ))?,
            0.0
        );
        assert_eq!(
            count(&format!(
                "streamex_operator_retries_total{{operator=\"{operator}\"}}"
            ))?,
            0.0
        );
        assert_eq!(
            count(&format!(
                "streamex_operator_dead_letters_total{{operator=\"{operator}\"}}"
            ))?,
            0.0
        );
    }
    // The slot's figures come from the server at scrape time.
    let confirmed = count("streamex_slot_confirmed_flush_lsn")?;
    let current: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
        .fetch_one(&pool)
        .await?;
    assert!(
        confirmed > 0.0 && confirmed <= current as f64,
        "{confirmed} {current}"
    );
    assert!(count("streamex_slot_wal_retained_bytes")? >= 0.0);
    assert!(count("streamex_commit_to_processed_seconds_count")? >= 1.0);
    assert_eq!(count("streamex_replication_streaming")?, 1.0);
    assert_eq!(count("streamex_replication_reconnects_total")?, 0.0);
    assert_eq!(count("streamex_instance_active")?, 1.0);
    service.stop().await
}

/// An operator on posts that does not finish any event until opened.
struct Gate {
    open: Arc<AtomicBool>,
}

impl Operator for Gate {
    fn name(&self) -> &str {
        "gate"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("posts")]
    }

    async fn handle(&self, _event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn process_status_is_too_early_until_the_operators_are_done() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = config(&url, free_port()?, CHANNELS, &[])?;
    let open = Arc::new(AtomicBool::new(false));
    let gate = AnyOperator::new(Gate { open: open.clone() });
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), vec![gate]).await?;
    service.wait_for("/readyz", 200).await?;

    let (text, rfc3339, micros): (String, String, i64) = sqlx::query_as(
        "INSERT INTO posts (title) VALUES ('hello')
         RETURNING updated_at::text, to_json(updated_at) #>> '{}',
                   (extract(epoch FROM updated_at) * 1000000)::bigint",
    )
    .fetch_one(&pool)
    .await?;
    let ask = |timestamp: String| {
        let address = reqwest::Url::parse_with_params(
            &service.url("/process-status/posts"),
            &[("timestamp", timestamp)],
        );
        async move {
            let response = client().get(address?).send().await?;
            let status = response.status().as_u16();
            anyhow::Ok((status, response.text().await?))
        }
    };
    let sql_says = |timestamp: String| {
        sqlx::query_scalar::<_, bool>("SELECT streamex.processed('posts', $1::timestamptz)")
            .bind(timestamp)
            .fetch_one(&pool)
    };

    // The gate holds the post: not processed yet, as SQL says too.
    let (status, body) = ask(rfc3339.clone()).await?;
    assert_eq!(status, 425, "{body}");
    assert!(body.contains("\"processed\":false"), "{body}");
    assert!(!sql_says(text.clone()).await?);

    open.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ask(rfc3339.clone()).await?.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sql_says(text.clone()).await?);
    // The same instant in every accepted form; PostgreSQL's text form has a `+` that the
    // query string carries encoded.
    for timestamp in [text.clone(), micros.to_string()] {
        let (status, body) = ask(timestamp.clone()).await?;
        assert_eq!(status, 200, "{timestamp}: {body}");
        assert!(body.contains("\"processed\":true"), "{body}");
    }
    // One µs later, and an hour later, are not processed; a table that is not published does
    // not exist for the endpoint.
    assert_eq!(ask((micros + 1).to_string()).await?.0, 425);
    let later: String = sqlx::query_scalar("SELECT to_json(now() + interval '1 hour') #>> '{}'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(ask(later).await?.0, 425);
    let (status, _) = service
        .get(&format!("/process-status/nothing?timestamp={micros}"))
        .await?;
    assert_eq!(status, 404);

    // A bad or missing timestamp is the client's mistake, said plainly.
    let (status, body) = ask("yesterday".to_owned()).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("yesterday") && body.contains("RFC 3339"),
        "{body}"
    );
    let (status, body) = service.get("/process-status/posts").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("timestamp"), "{body}");
    service.stop().await
}

/// An operator on posts whose handler always fails on a post titled `poison`.
struct Poisoned(&'static str);

impl Operator for Poisoned {
    fn name(&self) -> &str {
        self.0
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("posts")]
    }

    async fn handle(&self, event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        if field(event, "title") == Some(&serde_json::json!("poison")) {
            bail!("poisoned post");
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_halted_operator_makes_the_service_unready() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let retry = |policy: &str| {
        format!(
            "[operators.retry]\ninitial = \"10ms\"\nmax = \"20ms\"\nretries = 1\non_failure = \"{policy}\"\n"
        )
    };
    let text = format!(
        "{CHANNELS}[[operators]]\nname = \"strict\"\n{}[[operators]]\nname = \"lenient\"\n{}",
        retry("halt"),
        retry("dead_letter")
    );
    let config = config(&url, free_port()?, &text, &[])?;
    let operators = vec![
        AnyOperator::new(Poisoned("strict")),
        AnyOperator::new(Poisoned("lenient")),
    ];
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), operators).await?;
    service.wait_for("/readyz", 200).await?;

    sqlx::query("INSERT INTO posts (title) VALUES ('fine')")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO posts (title) VALUES ('poison')")
        .execute(&pool)
        .await?;
    let body = service.wait_for("/readyz", 503).await?;
    assert!(
        body.contains("operator halted") && body.contains("strict") && !body.contains("lenient"),
        "{body}"
    );
    // The other operator dead-letters the event and goes on.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let metrics = loop {
        let metrics = service.metrics().await?;
        if metrics.get("streamex_operator_dead_letters_total{operator=\"lenient\"}") == Some(&1.0) {
            break metrics;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (name, value) in [
        (
            "streamex_operator_state{operator=\"strict\",state=\"halted\"}",
            1.0,
        ),
        (
            "streamex_operator_state{operator=\"strict\",state=\"running\"}",
            0.0,
        ),
        (
            "streamex_operator_state{operator=\"lenient\",state=\"running\"}",
            1.0,
        ),
        ("streamex_operator_retries_total{operator=\"strict\"}", 1.0),
        ("streamex_operator_retries_total{operator=\"lenient\"}", 1.0),
        (
            "streamex_operator_events_processed_total{operator=\"strict\"}",
            1.0,
        ),
        (
            "streamex_operator_events_processed_total{operator=\"lenient\"}",
            2.0,
        ),
        (
            "streamex_operator_dead_letters_total{operator=\"strict\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric(&metrics, name)?, value, "{name}");
    }
    service.stop().await
}

#[tokio::test]
async fn channels_stream_events_as_tail_prints_them_until_shutdown() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql("INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')")
        .execute(&pool)
        .await?;
    let config = config(
        &url,
        free_port()?,
        CHANNELS,
        &[("STREAMEX_HTTP__KEEP_ALIVE", "200ms")],
    )?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let mut post_1 = service.subscribe("posts/1/comments").await?;
    let mut all = service.subscribe("comments").await?;
    // `comments` has REPLICA IDENTITY FULL: its rows' channels still go by the primary key.
    let mut comment_1 = service.subscribe("comments/1").await?;

    sqlx::raw_sql(
        "INSERT INTO comments (id, post_id, body) VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 1, 'c');
         UPDATE comments SET body = 'a2' WHERE id = 1;",
    )
    .execute(&pool)
    .await?;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = event_of(&post_1.next_data().await?)?;
        assert_eq!(&*event.entity, "comments");
        assert_eq!(field(&event, "post_id"), Some(&serde_json::json!(1)));
        seen.push((
            event.kind.as_str().to_owned(),
            field(&event, "body").cloned(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("insert".to_owned(), Some(serde_json::json!("a"))),
            ("insert".to_owned(), Some(serde_json::json!("c"))),
            ("update".to_owned(), Some(serde_json::json!("a2"))),
        ]
    );
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let event = event_of(&all.next_data().await?)?;
        bodies.push(field(&event, "body").cloned());
    }
    assert_eq!(
        bodies,
        ["a", "b", "c", "a2"].map(|b| Some(serde_json::json!(b)))
    );
    let mut one = Vec::new();
    for _ in 0..2 {
        let event = event_of(&comment_1.next_data().await?)?;
        one.push((
            event.kind.as_str().to_owned(),
            field(&event, "body").cloned(),
        ));
    }
    assert_eq!(
        one,
        [
            ("insert".to_owned(), Some(serde_json::json!("a"))),
            ("update".to_owned(), Some(serde_json::json!("a2"))),
        ]
    );
    // Nothing else for post 1: the idle stream gets keep-alive comments.
    let idle = post_1.next().await?.context("the stream ended")?;
    assert_eq!(idle.comments, ["keep-alive"], "{idle:?}");
    assert!(idle.data.is_none());

    // Shutdown ends the open streams instead of waiting for them, and the server.
    let healthz = service.url("/healthz");
    service.stop().await?;
    for reader in [&mut post_1, &mut all, &mut comment_1] {
        loop {
            match reader.next().await {
                Ok(Some(message)) => {
                    assert!(
                        message.data.is_none(),
                        "an event after shutdown: {message:?}"
                    )
                }
                Ok(None) => break,
                // The connection closed: ended too.
                Err(e) if !format!("{e:#}").contains("in time") => break,
                Err(e) => return Err(e),
            }
        }
    }
    assert!(
        client().get(healthz).send().await.is_err(),
        "the server still answers after shutdown"
    );
    Ok(())
}

/// A text key holding `/`, `,` or `%` is percent-encoded in its channel name, and the URL
/// of that channel is the name as it is.
#[tokio::test]
async fn a_key_with_separators_has_one_channel_reachable_by_url() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE tags (name text PRIMARY KEY, note text)")
        .execute(&pool)
        .await?;
    let config = config(&url, free_port()?, "database_url = \"\"\n", &[])?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let mut tag = service.subscribe("tags/a%2Fb%2Cc%25").await?;
    // The same name with its escapes in lower case, and a non-ASCII key decoded from the URL.
    let mut lower = service
        .subscribe_as("tags/a%2fb%2cc%25", "tags/a%2Fb%2Cc%25")
        .await?;
    let mut accented = service.subscribe_as("tags/caf%C3%A9", "tags/café").await?;
    sqlx::raw_sql(
        "INSERT INTO tags VALUES ('a', 'decoy'), ('a/b', 'decoy'), ('a/b,c%', 'this one');
         INSERT INTO tags VALUES ('café', 'accent');",
    )
    .execute(&pool)
    .await?;
    for reader in [&mut tag, &mut lower] {
        let event = event_of(&reader.next_data().await?)?;
        assert_eq!(field(&event, "note"), Some(&serde_json::json!("this one")));
    }
    let event = event_of(&accented.next_data().await?)?;
    assert_eq!(field(&event, "name"), Some(&serde_json::json!("café")));
    service.stop().await
}

#[tokio::test]
async fn a_lagging_client_is_told_so_and_its_stream_ends() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = config(
        &url,
        free_port()?,
        CHANNELS,
        &[("STREAMEX_HTTP__SSE_CAPACITY", "16")],
    )?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let mut reader = service.subscribe("comments").await?;

    // Far more than the socket buffers and the queue of 16 hold, while the client does not
    // read: it must be cut off.
    const ROWS: u64 = 20_000;
    sqlx::query("INSERT INTO posts (id, title) VALUES (1, 'one')")
        .execute(&pool)
        .await?;
    // One transaction: its events have ordinals 0, 1, 2...
    sqlx::query(
        "INSERT INTO comments (post_id, body) SELECT 1, repeat('x', 1000) FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(ROWS)?)
    .execute(&pool)
    .await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let published = service
            .metrics()
            .await?
            .get("streamex_events_received_total{entity=\"comments\"}")
            .copied();
        if published == Some(ROWS as f64) {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let received = read_until_cut_off(&mut reader, "comments").await?;
    assert!(received < ROWS, "never cut off");
    service.stop().await
}

/// Reads what a cut-off client was sent: a run of events of one transaction without a gap
/// (ordinals 0, 1, 2...), then `lagged` naming the first one missed, then the end. Returns
/// how many events came.
async fn read_until_cut_off(reader: &mut SseReader, channel: &str) -> anyhow::Result<u64> {
    let mut received: u64 = 0;
    let lagged = loop {
        let message = reader.next_data().await?;
        if message.event.as_deref() == Some("lagged") {
            break message;
        }
        let event = event_of(&message)?;
        ensure!(event.ordinal == received, "a gap before {message:?}");
        received += 1;
    };
    let data: serde_json::Value =
        serde_json::from_str(lagged.data.as_deref().context("lagged data")?)?;
    ensure!(data["channel"] == channel, "{data}");
    let dropped_at = data["dropped_at"].as_str().context("dropped_at")?;
    ensure!(
        dropped_at.ends_with(&format!("#{received}")),
        "{dropped_at} after {received} events"
    );
    ensure!(
        reader.next().await?.is_none(),
        "the stream goes on after lagged"
    );
    Ok(received)
}

/// Waits until `/metrics` counts `rows` events of `entity`: they have all been published.
async fn wait_published(service: &Service, entity: &str, rows: u64) -> anyhow::Result<()> {
    let name = format!("streamex_events_received_total{{entity=\"{entity}\"}}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if service.metrics().await?.get(&name).copied() == Some(rows as f64) {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Many clients that stop reading while large events pass: each holds no more than
/// `sse_max_bytes` of queued JSON before it is cut off (the event bound is out of reach), the
/// clients beyond `max_clients` are refused, and `/metrics` answers all along.
#[tokio::test]
async fn slow_clients_are_cut_off_by_bytes_and_capped_in_number() -> anyhow::Result<()> {
    const CLIENTS: usize = 6;
    const ROWS: u64 = 100;
    const ROW_BYTES: usize = 200_000;
    const CAPACITY: u64 = 100_000;
    const MAX_BYTES: usize = 256 << 10;
    // Cut off by bytes or not at all: no client can have CAPACITY events queued.
    const _: () = assert!(ROWS < CAPACITY && ROW_BYTES < MAX_BYTES);
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = config(
        &url,
        free_port()?,
        CHANNELS,
        &[
            ("STREAMEX_HTTP__SSE_CAPACITY", &CAPACITY.to_string()),
            ("STREAMEX_HTTP__SSE_MAX_BYTES", &MAX_BYTES.to_string()),
            ("STREAMEX_HTTP__MAX_CLIENTS", &CLIENTS.to_string()),
        ],
    )?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let mut readers = Vec::new();
    for _ in 0..CLIENTS {
        readers.push(service.subscribe("comments").await?);
    }
    assert_eq!(service.pubsub.subscriber_count("comments"), CLIENTS);
    // One more, on any channel, is refused by name.
    for channel in ["comments", "posts"] {
        let (status, headers, body) = service
            .get_with(&format!("/channels/{channel}"), &[])
            .await?;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("[http] max_clients"), "{body}");
        assert_eq!(headers["content-type"], "application/json");
    }
    assert_eq!(service.pubsub.subscriber_count("posts"), 0);

    // About 20 MB of JSON per client, far past what sockets and the server's write buffer
    // hold, while none of them reads.
    sqlx::query("INSERT INTO posts (id, title) VALUES (1, 'one')")
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO comments (post_id, body) SELECT 1, repeat('x', $2) FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(ROWS)?)
    .bind(i32::try_from(ROW_BYTES)?)
    .execute(&pool)
    .await?;
    wait_published(&service, "comments", ROWS).await?;
    // Every client was cut off, at once: none is on the bus any more.
    assert_eq!(service.pubsub.subscriber_count("comments"), 0);
    service.metrics().await?;

    for reader in &mut readers {
        let received = read_until_cut_off(reader, "comments").await?;
        assert!(received < ROWS, "never cut off");
    }
    drop(readers);
    // Their streams have ended: their places are free again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let _reader = loop {
        match service.subscribe("comments").await {
            Ok(reader) => break reader,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(format!("{e:#}").contains("503"), "{e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    };
    service.stop().await
}

const TOKEN: &str = "s3cret-t0ken";

#[tokio::test]
async fn a_token_guards_channels_and_process_status_but_not_the_probes() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql("INSERT INTO posts (id, title) VALUES (1, 'one')")
        .execute(&pool)
        .await?;
    let text = format!("{CHANNELS}[http]\ntoken = \"{TOKEN}\"\n");
    let config = config(&url, free_port()?, &text, &[])?;
    assert!(!format!("{config:?}").contains(TOKEN), "{config:?}");
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    // The probes need no token.
    assert_eq!(service.get("/healthz").await?.0, 200);
    service.wait_for("/readyz", 200).await?;
    // Nor, without metrics_auth, /metrics.
    service.metrics().await?;

    let bearer = format!("Bearer {TOKEN}");
    let basic = format!("Basic {TOKEN}");
    let refusals = [
        // (path, Authorization, what the error says)
        ("/channels/comments", None, "access_token"),
        (
            "/channels/comments",
            Some("Bearer nope"),
            "not the [http] token",
        ),
        (
            "/channels/comments?access_token=nope",
            None,
            "not the [http] token",
        ),
        (
            "/channels/comments",
            Some(&basic[..]),
            "not the [http] token",
        ),
        (
            "/process-status/posts?timestamp=0",
            None,
            "Authorization: Bearer",
        ),
        (
            "/process-status/posts?timestamp=0",
            Some(&bearer[..bearer.len() - 1]),
            "not the [http] token",
        ),
        // The query parameter is for EventSource only.
        (
            &format!("/process-status/posts?timestamp=0&access_token={TOKEN}"),
            None,
            "Authorization: Bearer",
        ),
    ];
    for (path, authorization, says) in refusals {
        let headers: Vec<_> = authorization
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let (status, response, body) = service.get_with(path, &headers).await?;
        assert_eq!(status, 401, "{path} {headers:?}: {body}");
        let challenge = response["www-authenticate"].to_str()?;
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        let error: serde_json::Value = serde_json::from_str(&body)?;
        let error = error["error"].as_str().context("an error")?;
        assert!(error.contains(says), "{path}: {error}");
        assert!(!error.contains(TOKEN), "{error}");
    }
    assert_eq!(service.pubsub.subscriber_count("comments"), 0);

    // The token in the header, or in the URL of a channel: streams as usual.
    let mut by_header = service
        .subscribe_with("comments", "comments", &[("authorization", &bearer)])
        .await?;
    let mut by_query = service
        .subscribe_as(&format!("comments?access_token={TOKEN}"), "comments")
        .await?;
    let (status, _, body) = service
        .get_with(
            "/process-status/posts?timestamp=0",
            &[("authorization", &bearer)],
        )
        .await?;
    // Let in: whether posts are processed yet is beside the point.
    assert!(
        (status == 200 || status == 425) && body.contains("\"processed\""),
        "{status} {body}"
    );
    sqlx::query("INSERT INTO comments (post_id, body) VALUES (1, 'hello')")
        .execute(&pool)
        .await?;
    for reader in [&mut by_header, &mut by_query] {
        let event = event_of(&reader.next_data().await?)?;
        assert_eq!(field(&event, "body"), Some(&serde_json::json!("hello")));
    }
    service.stop().await
}

#[tokio::test]
async fn metrics_auth_with_a_token_file_guards_metrics_too() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n"))?;
    let text = format!(
        "{CHANNELS}[http]\ntoken_file = {:?}\nmetrics_auth = true\n",
        file.display().to_string()
    );
    let config = config(&url, free_port()?, &text, &[])?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let (status, headers, body) = service.get_with("/metrics", &[]).await?;
    assert_eq!(status, 401, "{body}");
    assert!(headers.contains_key("www-authenticate"));
    // The file's newline is not part of the token.
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = service
        .get_with("/metrics", &[("authorization", &bearer)])
        .await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("streamex_instance_active 1"), "{body}");
    service.stop().await
}

#[tokio::test]
async fn the_endpoint_answers_only_the_host_names_it_is_known_by() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    // Listening on a loopback address: loopback names only, by default.
    let port = free_port()?;
    let loopback = config(&url, port, CHANNELS, &[])?;
    let service = Service::start(&loopback, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let host = |name: &str| format!("{name}:{port}");
    for name in ["localhost", "127.0.0.1", "[::1]", "LOCALHOST"] {
        let (status, _, body) = service
            .get_with("/metrics", &[("host", &host(name))])
            .await?;
        assert_eq!(status, 200, "{name}: {body}");
    }
    // A page whose own name was rebound to 127.0.0.1 sends its name.
    for path in [
        "/channels/comments",
        "/metrics",
        "/process-status/posts?timestamp=0",
        "/nothing",
    ] {
        let (status, _, body) = service
            .get_with(path, &[("host", &host("rebound.example"))])
            .await?;
        assert_eq!(status, 421, "{path}: {body}");
        assert!(
            body.contains("[http] allowed_hosts") && body.contains("loopback"),
            "{body}"
        );
    }
    assert_eq!(service.pubsub.subscriber_count("comments"), 0);
    // The probes answer any name.
    for path in ["/healthz", "/readyz"] {
        let (status, _, body) = service
            .get_with(path, &[("host", &host("rebound.example"))])
            .await?;
        assert_eq!(status, 200, "{path}: {body}");
    }
    service.stop().await?;

    // A list replaces the default.
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let port = free_port()?;
    let text = format!("{CHANNELS}[http]\nallowed_hosts = [\"streamex.internal\", \"[::1]\"]\n");
    let config = config(&url, port, &text, &[])?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;
    let host = |name: &str| format!("{name}:{port}");
    for (name, expected) in [
        ("streamex.internal", 200),
        ("[::1]", 200),
        ("localhost", 421),
        ("127.0.0.1", 421),
    ] {
        let (status, _, body) = service
            .get_with("/metrics", &[("host", &host(name))])
            .await?;
        assert_eq!(status, expected, "{name}: {body}");
    }
    let mut reader = service
        .subscribe_with("comments", "comments", &[("host", "streamex.internal")])
        .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one');
         INSERT INTO comments (post_id, body) VALUES (1, 'hello');",
    )
    .execute(&pool)
    .await?;
    let event = event_of(&reader.next_data().await?)?;
    assert_eq!(field(&event, "body"), Some(&serde_json::json!("hello")));
    service.stop().await
}

/// The token's settings are checked at load, by key, and the token is never shown.
#[test]
fn token_settings_are_refused_by_key_and_never_shown() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("token");
    let parse = |text: &str, env: &[(&str, &str)]| {
        Config::parse(
            &format!("database_url = \"postgres://localhost/db\"\n[http]\n{text}"),
            "test.toml",
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .map_err(|e| e.to_string())
    };
    let token_file = format!("token_file = {:?}\n", file.display().to_string());
    std::fs::write(&file, "\n")?;
    for (text, env, says) in [
        (
            format!("token = \"{TOKEN}\"\n{token_file}"),
            &[][..],
            "http.token and http.token_file are both set",
        ),
        ("token = \"\"".to_owned(), &[], "http.token is empty"),
        (token_file.clone(), &[], "http.token_file is empty"),
        (
            format!("token = \"{TOKEN} x\""),
            &[],
            "http.token may hold only visible ASCII",
        ),
        (
            "metrics_auth = true".to_owned(),
            &[],
            "http.metrics_auth needs a token",
        ),
        (
            String::new(),
            &[("STREAMEX_HTTP__TOKEN", "\"\"")],
            "http.token is empty",
        ),
        // A token that reads as a number is refused without being quoted.
        (
            String::new(),
            &[("STREAMEX_HTTP__TOKEN", "918273645")],
            "a secret must be a string",
        ),
        ("max_clients = 0".to_owned(), &[], "http.max_clients"),
        ("sse_max_bytes = 0".to_owned(), &[], "http.sse_max_bytes"),
        (
            "allowed_hosts = [\"localhost:9187\"]".to_owned(),
            &[],
            "http.allowed_hosts",
        ),
        (
            "allowed_hosts = []".to_owned(),
            &[],
            "http.allowed_hosts is empty",
        ),
    ] {
        let error = parse(&text, env).expect_err(&text);
        assert!(error.contains(says), "{text} {env:?}: {error}");
        assert!(
            !error.contains(TOKEN) && !error.contains("918273645"),
            "{error}"
        );
    }
    std::fs::remove_file(&file)?;
    let error = parse(&token_file, &[]).expect_err("no file");
    assert!(error.contains("http.token_file: reading"), "{error}");

    std::fs::write(&file, format!("{TOKEN}\r\n"))?;
    let config = parse(&token_file, &[]).map_err(anyhow::Error::msg)?;
    assert_eq!(
        config
            .http
            .bearer_token()
            .map_err(anyhow::Error::msg)?
            .context("a token")?
            .expose(),
        TOKEN
    );
    let config = parse("", &[("STREAMEX_HTTP__TOKEN", TOKEN)]).map_err(anyhow::Error::msg)?;
    assert!(!format!("{config:?}").contains(TOKEN), "{config:?}");
    assert_eq!(config.http.sse_max_bytes, 16 << 20);
    assert_eq!(config.http.max_clients, 256);
    assert!(!config.http.metrics_auth);
    Ok(())
}

#[tokio::test]
async fn a_busy_port_stops_start_up_naming_the_setting() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let config = config(&url, taken.local_addr()?.port(), CHANNELS, &[])?;
    let service = streamex::Service::builder().config(config).build().await?;
    let error = service
        .run(std::future::pending())
        .await
        .expect_err("the port is taken");
    let message = streamex::error::chain(&anyhow::Error::from(error));
    assert!(
        message.contains("[http] listen") && message.contains("STREAMEX_HTTP__LISTEN"),
        "{message}"
    );
    Ok(())
}

/// The page the browser runs: follows `comments` on the service with `EventSource`, writes
/// each event into the DOM, and reports to the test's own server.
fn browser_page(service: &str, expected: usize) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>comments</title></head>
<body><ul id="events"></ul>
<script>
const report = (body) => fetch('/report', {{ method: 'POST', body: JSON.stringify(body) }});
const source = new EventSource('{service}/channels/comments');
source.onopen = () => report({{ state: 'open' }});
source.onerror = () => report({{ state: 'error', readyState: source.readyState }});
source.onmessage = (message) => {{
  const item = document.createElement('li');
  item.dataset.id = message.lastEventId;
  item.textContent = message.data;
  document.getElementById('events').appendChild(item);
  const items = [...document.querySelectorAll('#events li')];
  if (items.length === {expected}) {{
    source.close();
    report({{ state: 'done', ids: items.map(i => i.dataset.id), dom: items.map(i => i.textContent) }});
  }}
}};
</script></body></html>"#
    )
}

#[tokio::test]
#[ignore = "needs Debian's chromium: cargo test --test integration -- --ignored browser"]
async fn a_browser_follows_a_channel_with_event_source() -> anyhow::Result<()> {
    match std::process::Command::new("chromium")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!("`chromium --version` failed: {out:?}"),
        Err(e) => bail!(
            "this test runs a real headless browser: install Debian's `chromium` package \
             (apt-get install chromium; CI's .ci/run does so): {e}"
        ),
    }
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql("INSERT INTO posts (id, title) VALUES (1, 'one')")
        .execute(&pool)
        .await?;

    // The test's own origin serves the page and takes its reports; the service allows it.
    let site = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", site.local_addr()?);
    let config = config(
        &url,
        free_port()?,
        CHANNELS,
        &[("STREAMEX_HTTP__ALLOW_ORIGIN", &origin)],
    )?;
    let service = Service::start(&config, PostgresStatus::new(pool.clone()), Vec::new()).await?;
    service.wait_for("/readyz", 200).await?;

    const EXPECTED: usize = 3;
    let page = browser_page(&service.base, EXPECTED);
    let (report_tx, mut reports) = tokio::sync::mpsc::unbounded_channel::<String>();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/report",
            axum::routing::post(move |body: String| async move {
                let _ = report_tx.send(body);
            }),
        );
    let site_task = tokio::spawn(async move { axum::serve(site, app).await });

    let profile = tempfile::tempdir()?;
    let log = profile.path().join("chromium.log");
    let mut browser = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox", // the tests may run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .arg(format!("{origin}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting chromium")?;

    let mut seen = Vec::new();
    let mut next_report = async |seen: &mut Vec<String>| -> anyhow::Result<serde_json::Value> {
        // Generous: a browser starting on a busy machine.
        let report = tokio::time::timeout(PATIENCE * 2, reports.recv())
            .await
            .ok()
            .flatten()
            .with_context(|| {
                format!(
                    "no report from the page; reports so far {seen:?}; chromium's log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
        seen.push(report.clone());
        Ok(serde_json::from_str(&report)?)
    };
    // Wait until the page's EventSource is open (the subscription is then in place).
    loop {
        if next_report(&mut seen).await?["state"] == "open" {
            break;
        }
    }
    sqlx::raw_sql(
        "INSERT INTO comments (post_id, body) VALUES (1, 'first');
         INSERT INTO comments (post_id, body) VALUES (1, 'second'), (1, 'third');",
    )
    .execute(&pool)
    .await?;
    let done = loop {
        let report = next_report(&mut seen).await?;
        if report["state"] == "done" {
            break report;
        }
    };
    let _ = browser.kill().await;
    site_task.abort();

    let dom = done["dom"].as_array().context("dom")?;
    let ids = done["ids"].as_array().context("ids")?;
    assert_eq!(dom.len(), EXPECTED, "{done}");
    let mut bodies = Vec::new();
    for (text, id) in dom.iter().zip(ids) {
        let message = Message {
            id: id.as_str().map(str::to_owned),
            data: text.as_str().map(str::to_owned),
            ..Message::default()
        };
        let event = event_of(&message)?;
        assert_eq!(&*event.entity, "comments");
        bodies.push(field(&event, "body").cloned());
    }
    assert_eq!(
        bodies,
        ["first", "second", "third"].map(|b| Some(serde_json::json!(b)))
    );
    service.stop().await
}
