//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod jsonb_text;
pub mod nats;

use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;
use streamex::Event;
use streamex::decode::Decoded;
use streamex::replication::{
    self, Acknowledger, ConnectParams, PublicationTables, ReplicationStream, StreamConfig, setup,
};
use tokio_util::sync::CancellationToken;

/// The blog example's schema.
pub const BLOG: &str = include_str!("../../../examples/blog/schema.sql");

/// An HTTP client builder for the tests' plain-HTTP requests. reqwest is built without a
/// crypto provider of its own (streamex gives its webhook client a rustls configuration with
/// ring): the process-wide default is set to ring here, once.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// How long a test waits for something that should come before it gives up; a guard against
/// hanging, not a measure of speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The slot name a test uses on database `url`: slots are cluster-wide, so it is named after
/// the test's own database.
pub fn slot_for(url: &str) -> String {
    url.rsplit('/').next().unwrap_or("streamex").to_owned()
}

/// A stream on a fresh database's publication `streamex` (all tables) and slot
/// [`slot_for`] the database.
pub struct Streaming {
    pub url: String,
    pub pool: PgPool,
    pub stream: ReplicationStream,
    pub stop: CancellationToken,
}

impl Streaming {
    /// Creates publication and slot on `url` (after `schema` has run) and starts streaming.
    pub async fn start(url: &str, schema: &str) -> anyhow::Result<Streaming> {
        let pool = PgPool::connect(url).await?;
        if !schema.is_empty() {
            sqlx::raw_sql(schema).execute(&pool).await?;
        }
        setup::check_server(&pool).await?;
        setup::ensure_publication(&pool, "streamex", &PublicationTables::All).await?;
        setup::ensure_slot(&pool, &slot_for(url)).await?;
        Self::attach(url, pool, |_| {}).await
    }

    /// Starts streaming from the existing slot [`slot_for`] the database.
    pub async fn attach(
        url: &str,
        pool: PgPool,
        tune: impl FnOnce(&mut StreamConfig),
    ) -> anyhow::Result<Streaming> {
        let params = ConnectParams::parse(url)?;
        let mut config = StreamConfig::new(params, &slot_for(url), "streamex");
        config.reconnect.initial = Duration::from_millis(100);
        config.reconnect.max = Duration::from_secs(1);
        tune(&mut config);
        let stop = CancellationToken::new();
        let stream =
            replication::spawn(config, pool.clone(), Acknowledger::default(), stop.clone());
        Ok(Streaming {
            url: url.to_owned(),
            pool,
            stream,
            stop,
        })
    }

    /// The next decoded item, acknowledging commits as they pass.
    pub async fn next(&mut self) -> anyhow::Result<Decoded> {
        let item = tokio::time::timeout(PATIENCE, self.stream.items.recv())
            .await
            .context("no item from the stream in time")?;
        match item {
            Some(item) => {
                if let Decoded::Commit { end_lsn, .. } = &item {
                    self.stream.ack.ack(*end_lsn);
                }
                Ok(item)
            }
            None => {
                self.stop.cancel();
                let task = (&mut self.stream.task).await?;
                bail!("the stream ended: {task:?}")
            }
        }
    }

    /// The next `n` events, skipping begins and commits.
    pub async fn events(&mut self, n: usize) -> anyhow::Result<Vec<Event>> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            if let Decoded::Event(event) = self.next().await? {
                events.push(std::sync::Arc::unwrap_or_clone(event));
            }
        }
        Ok(events)
    }

    /// Stops the stream and returns its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        drop(self.stream.items);
        self.stream.task.await??;
        Ok(())
    }
}

/// Writes a marker post and waits until `streamex.processed` says it has gone through every
/// operator: then everything committed before it has too.
pub async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    // Tests also insert explicit ids: move the sequence past them first (again if a writer
    // running beside this took the id meanwhile).
    let mut attempts = 0;
    let ts: String = loop {
        sqlx::query(
            // Never backwards (nextval): a writer's uncommitted id may be above max(id).
            "SELECT setval(pg_get_serial_sequence('posts', 'id'), \
                    greatest(coalesce(max(id), 0) + 1, nextval(pg_get_serial_sequence('posts', 'id'))), false) \
               FROM posts",
        )
        .execute(pool)
        .await?;
        let inserted = sqlx::query_scalar(
            "INSERT INTO posts (title) VALUES ('marker') RETURNING updated_at::text",
        )
        .fetch_one(pool)
        .await;
        match inserted {
            Ok(ts) => break ts,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("23505") && attempts < 20 =>
            {
                attempts += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // Before the service has set up its schema, the function does not exist yet.
        let done: bool = sqlx::query_scalar(
            "SELECT to_regprocedure('streamex.processed(text,timestamptz)') IS NOT NULL
                    AND streamex.processed('posts', $1::timestamptz)",
        )
        .bind(&ts)
        .fetch_one(pool)
        .await
        .unwrap_or(false);
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the marker was never processed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settles on a marker post, then: the declarative operator (which listens to posts) is exact
/// at once, since `streamex.processed('posts')` waits for it (on a worker too); the tallies listen
/// to comments only, so `processed('posts')` does not wait for them, and they are waited for.
pub async fn settle_exact(pool: &PgPool) -> anyhow::Result<()> {
    settle(pool).await?;
    let counts = derived_mismatches(pool).await?.0;
    anyhow::ensure!(
        counts == 0,
        "streamex.processed said the marker post was processed with {counts} posts' counts wrong"
    );
    eventually("the tallies exact", async || {
        Ok(derived_mismatches(pool).await? == (0, 0))
    })
    .await
}

/// Rows where the derived tables differ from what `posts` and `comments` say they should be.
pub async fn derived_mismatches(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let counts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            (SELECT p.id, p.title, p.body, (SELECT count(*) FROM comments c WHERE c.post_id = p.id)::int
               FROM posts p
             EXCEPT SELECT id, title, body, comments_count FROM post_with_comments_counts)
            UNION ALL
            (SELECT id, title, body, comments_count FROM post_with_comments_counts
             EXCEPT SELECT p.id, p.title, p.body, (SELECT count(*) FROM comments c WHERE c.post_id = p.id)::int
               FROM posts p)) d",
    )
    .fetch_one(pool)
    .await?;
    let tallies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM
           (SELECT p.id, count(c.id) AS n FROM posts p LEFT JOIN comments c ON c.post_id = p.id GROUP BY p.id) truth
           FULL JOIN post_comment_tallies t ON t.post_id = truth.id
          WHERE coalesce(truth.n, 0) <> coalesce(t.comments, 0)",
    )
    .fetch_one(pool)
    .await?;
    Ok((counts, tallies))
}

/// A small deterministic generator (xorshift64*), seeded per run and printed, so a failing run
/// can be repeated.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed named by environment variable `var`, or a fresh one.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos(),
            ) | 1
        })
}

/// The example configuration (`config/streamex.toml`) with `database_url` and `slot` replaced.
pub fn blog_config(database_url: &str, slot: &str) -> String {
    let example = include_str!("../../../config/streamex.toml");
    let config = example
        .replace(
            "database_url = \"postgres://postgres@127.0.0.1:5432/blog\"",
            &format!("database_url = {database_url:?}"),
        )
        .replace("slot = \"streamex\"", &format!("slot = {slot:?}"));
    assert!(
        config.contains(database_url),
        "the example's database_url line moved"
    );
    config
}

/// The blog configuration with `partitions` for both of its operators.
pub fn with_partitions(config: &str, partitions: u32) -> String {
    let mut out = String::new();
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("name = \"post_") {
            out.push_str(&format!("partitions = {partitions}\n"));
        }
    }
    let given = format!("\npartitions = {partitions}\n");
    assert_eq!(
        out.matches(&given).count(),
        2,
        "the blog operators' names moved"
    );
    out
}

/// A `streamex` command with the tests' own `STREAMEX_*` variables removed (the service
/// refuses variables that are not configuration keys, see [`is_test_variable`]) and
/// `RUST_LOG` set to `log`.
pub fn streamex_command(log: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_streamex"));
    command.env("RUST_LOG", log);
    for (var, _) in std::env::vars() {
        if is_test_variable(&var) {
            command.env_remove(var);
        }
    }
    command
}

/// Whether `var` is one of the tests' own variables (a seed to repeat a run, a count, a
/// binary's path) rather than a configuration key: `STREAMEX_<TEST>_...` for each test that
/// reads some. A variable left in a service's environment by mistake fails its start with
/// "unknown field", so every test variable must match here.
fn is_test_variable(var: &str) -> bool {
    const TESTS: &[&str] = &[
        "BACKFILL",
        "CHAOS",
        "CRASH",
        "FAILOVER",
        "JETSTREAM",
        "LEASE",
        "WORKER",
    ];
    let Some(rest) = var.strip_prefix("STREAMEX_") else {
        return false;
    };
    rest == "NATS_SERVER"
        || TESTS.iter().any(|test| {
            rest.strip_prefix(test)
                .is_some_and(|after| after.starts_with('_') && !after.starts_with("__"))
        })
}

#[test]
fn every_test_variable_is_kept_from_the_service() {
    for var in [
        "STREAMEX_BACKFILL_SEED",
        "STREAMEX_CHAOS_SEED",
        "STREAMEX_CHAOS_NO_AUDIT",
        "STREAMEX_CRASH_KILLS",
        "STREAMEX_FAILOVER_SEED",
        "STREAMEX_JETSTREAM_SEED",
        "STREAMEX_LEASE_LENGTH",
        "STREAMEX_WORKER_SEED",
        "STREAMEX_NATS_SERVER",
    ] {
        assert!(is_test_variable(var), "{var}");
    }
    // Configuration keys reach the service: `[worker] ack_wait` is STREAMEX_WORKER__ACK_WAIT.
    for var in [
        "STREAMEX_WORKER__ACK_WAIT",
        "STREAMEX_DATABASE_URL",
        "STREAMEX_SLOT",
    ] {
        assert!(!is_test_variable(var), "{var}");
    }
}

/// `streamex run --config config`, its stderr appended to `log`.
pub fn spawn_service(
    config: &std::path::Path,
    log: &std::path::Path,
    rust_log: &str,
) -> anyhow::Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(streamex_command(rust_log)
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Runs `streamex setup --config config` and fails unless it succeeds.
pub fn setup_service(config: &std::path::Path) -> anyhow::Result<()> {
    let setup = streamex_command("warn")
        .args(["setup", "--config"])
        .arg(config)
        .output()?;
    anyhow::ensure!(setup.status.success(), "streamex setup failed: {setup:?}");
    Ok(())
}

/// One random piece of blog activity, in its own transaction: inserts of posts with comments,
/// comments on random posts, updates, moves of comments, deletes of comments and of posts
/// with their comments (cascading), and transactions mixing several of these. Returns the
/// number of rows changed.
pub async fn blog_activity(pool: &PgPool, rng: &mut Rng) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    let steps = if rng.below(5) == 0 {
        2 + rng.below(3)
    } else {
        1
    };
    let mut changes = 0;
    for _ in 0..steps {
        changes += blog_step(&mut tx, rng).await?;
    }
    tx.commit().await.context(CommitUnknown)?;
    Ok(changes)
}

/// The blog workload ([`blog_activity`], up to 5 ms between transactions) running in a task
/// of its own until stopped.
pub struct Workload {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    made: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Workload {
    pub fn start(pool: &PgPool, seed: u64) -> Workload {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let made = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let (pool, stop, made) = (pool.clone(), stop.clone(), made.clone());
            async move {
                let mut rng = Rng(seed);
                while !stop.load(Ordering::Relaxed) {
                    made.fetch_add(blog_activity(&pool, &mut rng).await?, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
                }
                anyhow::Ok(())
            }
        });
        Workload { stop, made, task }
    }

    /// Stops it; how many changes it made.
    pub async fn stop(self) -> anyhow::Result<u64> {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        Ok(self.made.load(Ordering::Relaxed))
    }
}

/// The context of an error from COMMIT itself: the connection may have died after the server
/// committed, so whether the transaction committed is unknown.
#[derive(Debug)]
pub struct CommitUnknown;

impl std::fmt::Display for CommitUnknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("COMMIT failed; the transaction may or may not have committed")
    }
}

async fn blog_step(tx: &mut sqlx::PgConnection, rng: &mut Rng) -> anyhow::Result<u64> {
    Ok(match rng.below(10) {
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
            "UPDATE comments SET post_id = p.id, updated_at = now()
               FROM (SELECT id FROM posts ORDER BY random() LIMIT 1) p
              WHERE comments.id IN (SELECT id FROM comments ORDER BY random() LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        _ => {
            // A post with its comments (ON DELETE CASCADE).
            let rows = sqlx::query_scalar::<_, i64>(
                "WITH p AS (DELETE FROM posts WHERE id IN (SELECT id FROM posts ORDER BY random() LIMIT 1) RETURNING id)
                 SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM comments c JOIN p ON c.post_id = p.id)",
            )
            .fetch_one(&mut *tx)
            .await?;
            u64::try_from(rows)?
        }
    })
}

/// The service (`streamex::cli::run_service`, the code behind `streamex run`) in this process,
/// after `prepare` (schema, publication, slot).
pub struct Service {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// What `streamex setup` does for `config`: the streamex schema, the publication, the slot.
pub async fn prepare(config: &streamex::config::Config) -> anyhow::Result<()> {
    streamex::Service::builder()
        .config(config.clone())
        .registry(streamex::operators::registry())
        .build()
        .await?;
    Ok(())
}

impl Service {
    /// Runs `operators` on `config` without backfills: these tests are of what operators make
    /// of changes, so the rows written before an operator's first run come as changes too
    /// (backfill.rs tests the backfill, with [`Service::start_backfilling`]).
    pub async fn start<S: streamex::status::ProcessStatusStorage + Clone>(
        config: &streamex::config::Config,
        status: S,
        pubsub: streamex::pubsub::PubSub,
        operators: Vec<streamex::operator::AnyOperator>,
    ) -> anyhow::Result<Service> {
        Self::run(config, status, pubsub, operators, Some(false)).await
    }

    /// As [`Service::start`], with each operator's first run starting with a backfill as the
    /// operator says (`Operator::backfill`).
    pub async fn start_backfilling(
        config: &streamex::config::Config,
        operators: Vec<streamex::operator::AnyOperator>,
    ) -> anyhow::Result<Service> {
        let status = streamex::status::MemoryStatus::new();
        let pubsub = streamex::pubsub::PubSub::new();
        Self::run(config, status, pubsub, operators, None).await
    }

    async fn run<S: streamex::status::ProcessStatusStorage + Clone>(
        config: &streamex::config::Config,
        status: S,
        pubsub: streamex::pubsub::PubSub,
        operators: Vec<streamex::operator::AnyOperator>,
        backfill: Option<bool>,
    ) -> anyhow::Result<Service> {
        let mut builder = streamex::Service::builder()
            .config(config.clone())
            .configured_operators(false);
        if let Some(backfill) = backfill {
            builder = builder.backfill(backfill);
        }
        let service = builder
            .operators(operators)
            .pubsub(pubsub)
            .status(status)
            .build()
            .await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                service
                    .run(stop.cancelled_owned())
                    .await
                    .map_err(anyhow::Error::from)
            }
        });
        Ok(Service { stop, task })
    }

    /// Stops it as SIGINT does, and returns how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .context("the service did not stop in time")???;
        Ok(())
    }
}

/// Waits until `check` says yes, at most [`PATIENCE`]; an error naming `what` when it never
/// does.
pub async fn eventually(
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A certificate authority made for one test.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> anyhow::Result<Ca> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// A server certificate and its key (PEM) for the given names and addresses.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "streamex test server");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA certificate where the test process can read it.
    pub fn write(&self, dir: &tempfile::TempDir, name: &str) -> anyhow::Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, self.cert.pem())?;
        Ok(path.display().to_string())
    }
}

/// A cluster with ssl=on and a certificate from `ca` for `names`; `scram_user` must
/// authenticate with scram-sha-256 over TLS, everyone else is trusted, with or without TLS.
pub fn tls_cluster(ca: &Ca, names: &[&str]) -> anyhow::Result<streamex::testing::Cluster> {
    let (cert, key) = ca.issue(names)?;
    Ok(streamex::testing::Cluster::builder()
        .hba(
            "local all all trust\n\
             hostssl all scram_user 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n",
        )
        // scram_user's password must be stored for SCRAM: the default until PostgreSQL 14
        // was md5, which the scram-sha-256 line above refuses.
        .setting("password_encryption", "scram-sha-256")
        .setting("ssl", "on")
        .setting("ssl_cert_file", "server.crt")
        .setting("ssl_key_file", "server.key")
        .file("server.crt", cert)
        .file("server.key", key)
        .start()?)
}

/// `text` percent-encoded for a URL's query (a path given as `sslrootcert`).
pub fn encoded(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}
