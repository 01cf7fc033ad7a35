//! The operator service against a real PostgreSQL: the blog example, channels, filtering,
//! concurrency and EntityProcessed, retries with halt and resume, dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use sqlx::PgPool;
use streamex::config::Config;
use streamex::event::{Event, EventType};
use streamex::operator::{AnyOperator, Context, Delivery, Operator, Subscription};
use streamex::pubsub::PubSub;
use streamex::status::{
    MemoryStatus, PostgresStatus, ProcessStatusStorage, StatusError, StatusItem,
};
use streamex::testing;

use crate::common::{self, eventually};

use common::{BLOG, PATIENCE, Service, derived_mismatches, settle, slot_for};

/// The example configuration, pointed at `url`, with quick retries.
fn blog_config(url: &str, extra: &str) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/streamex.toml"))?;
    let text = format!("{text}\n{extra}");
    Ok(Config::parse(
        &text,
        "config/streamex.toml",
        [
            ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
            ("STREAMEX_SLOT".to_owned(), slot_for(url)),
            ("STREAMEX_RETRY__INITIAL".to_owned(), "10ms".to_owned()),
            ("STREAMEX_RETRY__MAX".to_owned(), "20ms".to_owned()),
            ("STREAMEX_RETRY__RETRIES".to_owned(), "2".to_owned()),
        ],
    )?)
}

#[tokio::test]
async fn the_blog_operators_keep_their_derived_tables() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = blog_config(&url, "")?;
    let operators = streamex::operators::build(&config.operators)?;
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        operators,
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two'), (3, 'three');
         INSERT INTO comments (post_id, body) SELECT 1 + i % 3, 'c' || i FROM generate_series(1, 30) i;
         UPDATE posts SET title = 'uno' WHERE id = 1;
         DELETE FROM comments WHERE id % 5 = 0;
         UPDATE comments SET post_id = 3 WHERE id = 1;
         DELETE FROM posts WHERE id = 2;",
    )
    .execute(&pool)
    .await?;
    settle(&pool).await?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    let (title, count): (String, i32) =
        sqlx::query_as("SELECT title, comments_count FROM post_with_comments_counts WHERE id = 1")
            .fetch_one(&pool)
            .await?;
    assert_eq!(title, "uno");
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM comments WHERE post_id = 1")
        .fetch_one(&pool)
        .await?;
    assert_eq!(i64::from(count), expected);
    // delete_with: the deleted post's derived row is gone.
    let gone: Option<i64> =
        sqlx::query_scalar("SELECT id FROM post_with_comments_counts WHERE id = 2")
            .fetch_optional(&pool)
            .await?;
    assert_eq!(gone, None);
    // Process status is plain SQL.
    let entities: Vec<String> =
        sqlx::query_scalar("SELECT entity FROM streamex.process_status ORDER BY entity")
            .fetch_all(&pool)
            .await?;
    assert_eq!(entities, ["comments", "posts"]);
    service.stop().await
}

/// A test operator: records what it handled in table `handled`, in its own transaction (so
/// only committed handling counts); fails on posts titled `poison` (and panics on `panic`)
/// until `cured`.
struct Recorder {
    name: String,
    subscriptions: Vec<Subscription>,
    cured: Arc<AtomicBool>,
    delay: Duration,
}

impl Recorder {
    fn new(name: &str, subscriptions: Vec<Subscription>) -> Arc<Recorder> {
        Arc::new(Recorder {
            name: name.to_owned(),
            subscriptions,
            cured: Arc::new(AtomicBool::new(false)),
            delay: Duration::ZERO,
        })
    }

    /// What it has handled, committed, in order: (type, entity, id).
    async fn seen(&self, pool: &PgPool) -> anyhow::Result<Vec<(String, String, i64)>> {
        Ok(
            sqlx::query_as("SELECT kind, entity, id FROM handled WHERE operator = $1 ORDER BY seq")
                .bind(&self.name)
                .fetch_all(pool)
                .await?,
        )
    }
}

fn seen(kind: &str, entity: &str, id: i64) -> (String, String, i64) {
    (kind.to_owned(), entity.to_owned(), id)
}

impl Operator for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.subscriptions.clone()
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        tokio::time::sleep(self.delay).await;
        let record = event.record().context("a record")?;
        if record.get("title") == Some(&json!("poison")) && !self.cured.load(Ordering::SeqCst) {
            anyhow::bail!("poisoned post");
        }
        if record.get("title") == Some(&json!("panic")) && !self.cured.load(Ordering::SeqCst) {
            panic!("the handler panicked on purpose");
        }
        // Written in the operator's transaction: commits with the checkpoint, or not at all.
        let id = record.get("id").and_then(|v| v.as_i64()).unwrap_or(-1);
        sqlx::query("INSERT INTO handled (operator, kind, entity, id) VALUES ($1, $2, $3, $4)")
            .bind(&self.name)
            .bind(event.kind.as_str())
            .bind(&*event.entity)
            .bind(id)
            .execute(ctx.db()?)
            .await?;
        Ok(())
    }
}

const HANDLED: &str = "CREATE TABLE handled (seq bigserial PRIMARY KEY, operator text, kind text, entity text, id bigint);";

fn minimal_config(url: &str, extra: &str) -> anyhow::Result<Config> {
    Ok(Config::parse(
        &format!(
            "database_url = {url:?}\nslot = {:?}\n{extra}\n[retry]\ninitial = \"10ms\"\nmax = \"20ms\"\nretries = 2\n",
            slot_for(url)
        ),
        "test.toml",
        std::iter::empty(),
    )?)
}

#[tokio::test]
async fn operators_see_only_what_they_listen_to_and_entity_processed_follows_both()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(
        &url,
        "tables = [\"posts\", \"comments\"]\n[entities.comments]\nscopes = [[\"post_id -> posts\"]]",
    )?;
    let inserts = Recorder::new(
        "inserts",
        vec![Subscription::only("posts", &[EventType::Insert])],
    );
    let slow = Arc::new(Recorder {
        delay: Duration::from_millis(100),
        ..Arc::into_inner(Recorder::new(
            "slow",
            vec![Subscription::all("posts"), Subscription::all("comments")],
        ))
        .unwrap()
    });
    let pubsub = PubSub::new();
    let mut processed = pubsub.subscribe_processed(1024);
    let mut scoped = pubsub.subscribe("posts/1/comments", 1024);
    let mut row = pubsub.subscribe("posts/1", 1024);
    let status = MemoryStatus::new();
    let service = Service::start(
        &config,
        status.clone(),
        pubsub.clone(),
        vec![
            AnyOperator::new(inserts.clone()),
            AnyOperator::new(slow.clone()),
        ],
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one');
         UPDATE posts SET title = 'uno' WHERE id = 1;
         INSERT INTO comments (id, post_id, body) VALUES (10, 1, 'hi');",
    )
    .execute(&pool)
    .await?;
    // EntityProcessed for comments comes only after the slow operator handled the comment.
    let notice = loop {
        let notice = tokio::time::timeout(PATIENCE, processed.recv()).await??;
        if notice.entity == "comments" {
            break notice;
        }
    };
    assert!(
        slow.seen(&pool)
            .await?
            .contains(&seen("insert", "comments", 10))
    );
    assert_eq!(
        inserts.seen(&pool).await?,
        [seen("insert", "posts", 1)],
        "the insert-only operator saw exactly the post's insert"
    );
    assert_eq!(
        slow.seen(&pool).await?,
        [
            seen("insert", "posts", 1),
            seen("update", "posts", 1),
            seen("insert", "comments", 10)
        ],
        "WAL order, each once"
    );
    assert!(status.processed("comments", notice.timestamp).await?);
    // Channels: the row's own and the scope.
    let comment = tokio::time::timeout(PATIENCE, scoped.recv()).await??;
    assert_eq!(comment.new_record.as_ref().unwrap()["id"], json!(10));
    let first = tokio::time::timeout(PATIENCE, row.recv()).await??;
    let second = tokio::time::timeout(PATIENCE, row.recv()).await??;
    assert_eq!(
        (first.kind, second.kind),
        (EventType::Insert, EventType::Update)
    );
    service.stop().await
}

#[tokio::test]
async fn a_failing_operator_is_retried_halted_and_resumed_while_others_go_on() -> anyhow::Result<()>
{
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(&url, "tables = [\"posts\"]")?;
    let fragile = Recorder::new("fragile", vec![Subscription::all("posts")]);
    let sturdy = Recorder::new("sturdy", vec![Subscription::all("posts")]);
    sturdy.cured.store(true, Ordering::SeqCst);
    let service = Service::start(
        &config,
        PostgresStatus::new(pool.clone()),
        PubSub::new(),
        vec![
            AnyOperator::new(fragile.clone()),
            AnyOperator::new(sturdy.clone()),
        ],
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'fine');
         INSERT INTO posts (id, title) VALUES (2, 'poison');
         INSERT INTO posts (id, title) VALUES (3, 'after');",
    )
    .execute(&pool)
    .await?;
    eventually("the halt", || async {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT state FROM streamex.operator_state WHERE operator = 'fragile'",
        )
        .fetch_optional(&pool)
        .await?
        .as_deref()
            == Some("halted"))
    })
    .await?;
    let (error, attempts): (Option<String>, Option<i32>) = sqlx::query_as(
        "SELECT last_error, attempts FROM streamex.operator_state WHERE operator = 'fragile'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(error.unwrap().contains("poisoned post"));
    assert_eq!(attempts, Some(3), "first try and two retries");
    // The other operator goes on past the poison.
    eventually("the sturdy operator passing the poison", || async {
        Ok(sturdy.seen(&pool).await?.len() == 3)
    })
    .await?;
    assert_eq!(fragile.seen(&pool).await?, [seen("insert", "posts", 1)]);
    // The slot stays before the poisoned commit while the operator is halted.
    let held: bool = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn < (SELECT min(commit_lsn) FROM streamex.operator_checkpoints WHERE operator = 'sturdy')
           FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await?;
    assert!(
        held,
        "the slot moved past what the halted operator has not done"
    );

    // Fix the cause, resume: the operator replays from the slot and finishes; nothing twice.
    fragile.cured.store(true, Ordering::SeqCst);
    streamex::status::set_operator_running(&pool, &config.slot, "fragile").await?;
    eventually("the resumed operator finishing", || async {
        Ok(fragile.seen(&pool).await?.len() == 3)
    })
    .await?;
    settle(&pool).await?;
    let ids: Vec<i64> = fragile.seen(&pool).await?.iter().map(|s| s.2).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4],
        "each post once, in order (4 is the marker)"
    );
    let ids: Vec<i64> = sturdy.seen(&pool).await?.iter().map(|s| s.2).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4],
        "the replay did not run the other operator twice"
    );
    service.stop().await
}

#[tokio::test]
async fn a_failing_event_goes_to_the_dead_letters_and_the_operator_goes_on() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(&url, "tables = [\"posts\"]\n")?;
    let mut config = config;
    config.retry.on_failure = streamex::config::FailurePolicy::DeadLetter;
    let fragile = Recorder::new("fragile", vec![Subscription::all("posts")]);
    let service = Service::start(
        &config,
        MemoryStatus::new(),
        PubSub::new(),
        vec![AnyOperator::new(fragile.clone())],
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'fine');
         INSERT INTO posts (id, title) VALUES (2, 'poison');
         INSERT INTO posts (id, title) VALUES (3, 'panic');
         INSERT INTO posts (id, title) VALUES (4, 'after');",
    )
    .execute(&pool)
    .await?;
    eventually("the operator going past both failures", || async {
        Ok(fragile.seen(&pool).await?.len() == 2)
    })
    .await?;
    let ids: Vec<i64> = fragile.seen(&pool).await?.iter().map(|s| s.2).collect();
    assert_eq!(ids, [1, 4]);
    let letters: Vec<(String, i32, serde_json::Value, String)> = sqlx::query_as(
        "SELECT operator, attempts, event, error FROM streamex.dead_letters ORDER BY commit_lsn",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].1, 3);
    assert_eq!(letters[0].2["new_record"]["title"], json!("poison"));
    assert!(letters[0].3.contains("poisoned post"));
    assert!(
        letters[1].3.contains("panicked on purpose"),
        "{}",
        letters[1].3
    );
    service.stop().await
}

#[tokio::test]
async fn a_second_instance_stands_by_and_takes_over_without_applying_twice() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = blog_config(&url, "")?;
    let start = |config: Config, pool: PgPool| async move {
        let operators = streamex::operators::build(&config.operators)?;
        Service::start(&config, PostgresStatus::new(pool), PubSub::new(), operators).await
    };
    let write = |pool: PgPool| async move {
        sqlx::raw_sql(
            "WITH p AS (INSERT INTO posts (title) VALUES ('x') RETURNING id)
             INSERT INTO comments (post_id) SELECT id FROM p, generate_series(1, 3);
             DELETE FROM comments WHERE id = (SELECT min(id) FROM comments);",
        )
        .execute(&pool)
        .await
    };
    let active = start(config.clone(), pool.clone()).await?;
    write(pool.clone()).await?;
    settle(&pool).await?;
    // The standby starts while the first instance is active; it must not run anything yet.
    let standby = start(config.clone(), pool.clone()).await?;
    for _ in 0..5 {
        write(pool.clone()).await?;
    }
    settle(&pool).await?;
    assert_eq!(derived_mismatches(&pool).await?, (0, 0));
    active.stop().await?;
    // A clean stop acknowledges everything it finished: the slot is past the marker's commit.
    let acknowledged: bool = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn > (SELECT lsn FROM streamex.process_status WHERE entity = 'posts')
           FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await?;
    assert!(
        acknowledged,
        "the last processed commit was not acknowledged on shutdown"
    );
    for _ in 0..5 {
        write(pool.clone()).await?;
    }
    settle(&pool).await?;
    assert_eq!(
        derived_mismatches(&pool).await?,
        (0, 0),
        "the standby took over from the right place: nothing lost, nothing twice"
    );
    standby.stop().await
}

/// Without `tables`, the publication is `FOR ALL TABLES` and so covers streamex's own tables:
/// their changes (process status, checkpoints) must not come back as events, or each status
/// write would be processed and written again, forever.
#[tokio::test]
async fn a_publication_of_all_tables_leaves_streamex_own_tables_out() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(&url, "")?;
    let posts = Recorder::new("posts", vec![Subscription::all("posts")]);
    let pubsub = PubSub::new();
    let mut processed = pubsub.subscribe_processed(1024);
    let status = PostgresStatus::new(pool.clone());
    let service = Service::start(
        &config,
        status,
        pubsub,
        vec![AnyOperator::new(posts.clone())],
    )
    .await?;
    // Post 2 is written after post 1's process status was stored, so once post 2 is
    // processed, that status write has been read from the WAL too.
    for id in [1, 2] {
        sqlx::query("INSERT INTO posts (id, title) VALUES ($1, 'p')")
            .bind(id)
            .execute(&pool)
            .await?;
        loop {
            let notice = tokio::time::timeout(PATIENCE, processed.recv()).await??;
            if notice.entity == "posts" {
                break;
            }
        }
    }
    let entities: Vec<String> =
        sqlx::query_scalar("SELECT entity FROM streamex.process_status ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    assert!(
        !entities
            .iter()
            .any(|e| e == "process_status" || e == "operator_checkpoints"),
        "streamex's own tables were processed: {entities:?}"
    );
    assert!(entities.contains(&"posts".to_owned()), "{entities:?}");
    assert_eq!(
        posts.seen(&pool).await?,
        [seen("insert", "posts", 1), seen("insert", "posts", 2)]
    );
    service.stop().await
}

/// Process status kept in memory, counting the writes the engine asks for, each taking 5 ms.
#[derive(Clone, Default)]
struct CountingStatus {
    inner: MemoryStatus,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl ProcessStatusStorage for CountingStatus {
    async fn item_processed(
        &self,
        entity: &str,
        timestamp: i64,
        lsn: streamex::Lsn,
    ) -> Result<(), StatusError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.item_processed(entity, timestamp, lsn).await
    }

    async fn items_processed(&self, items: &[StatusItem]) -> Result<(), StatusError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        // As slow as a write to a busy server: slower than the operator, here.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.inner.items_processed(items).await
    }

    async fn load(&self) -> Result<Vec<StatusItem>, StatusError> {
        self.inner.load().await
    }

    async fn reset(&self) -> Result<(), StatusError> {
        self.inner.reset().await
    }

    async fn processed(&self, entity: &str, timestamp: i64) -> Result<bool, StatusError> {
        self.inner.processed(entity, timestamp).await
    }
}

/// Counts events, outside the database: faster than any process-status write.
#[derive(Default)]
struct Counter(std::sync::atomic::AtomicUsize);

impl Operator for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("posts")]
    }

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn handle(&self, _event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A backlog of many small commits is stored and acknowledged in groups: one process-status
/// write per commit cannot keep up with thousands of commits a second.
#[tokio::test]
async fn a_backlog_of_small_commits_is_stored_in_groups() -> anyhow::Result<()> {
    const COMMITS: usize = 400;
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(&url, "tables = [\"posts\"]")?;
    // The slot first, so that the backlog is waiting when the service starts.
    common::prepare(&config).await?;
    for id in 1..=COMMITS {
        sqlx::query("INSERT INTO posts (id, title) VALUES ($1, 'p')")
            .bind(i64::try_from(id)?)
            .execute(&pool)
            .await?;
    }
    let status = CountingStatus::default();
    let pubsub = PubSub::new();
    let mut processed = pubsub.subscribe_processed(4096);
    let counter = Arc::new(Counter::default());
    let service = Service::start(
        &config,
        status.clone(),
        pubsub,
        vec![AnyOperator::new(counter.clone())],
    )
    .await?;
    let last: i64 = sqlx::query_scalar("SELECT max(id) FROM posts")
        .fetch_one(&pool)
        .await?;
    assert_eq!(last, i64::try_from(COMMITS)?);
    // Until the last commit's notice: every commit is then stored.
    loop {
        let notice = tokio::time::timeout(PATIENCE, processed.recv()).await??;
        let seen = counter.0.load(Ordering::SeqCst);
        if notice.entity == "posts" && seen == COMMITS {
            break;
        }
    }
    service.stop().await?;
    let writes = status.writes.load(Ordering::SeqCst);
    assert!(
        writes * 4 <= COMMITS,
        "{writes} process-status writes for {COMMITS} commits"
    );
    Ok(())
}

/// Waits at its first event until the test opens its gate, then records each event as
/// [`Recorder`] does.
struct Gated {
    recorder: Arc<Recorder>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Operator for Gated {
    fn name(&self) -> &str {
        &self.recorder.name
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.recorder.subscriptions.clone()
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        drop(self.gate.acquire().await?);
        self.recorder.handle(event, ctx).await
    }
}

/// A stuck operator does not hold back one that keeps up (within
/// `replication.operator_backlog_bytes`): the fast one handles the whole backlog while the
/// stuck one has not finished its first event; the slot is not acknowledged past what the
/// stuck one has done, nor the process status stored; once it goes on, both have every
/// event, in order.
#[tokio::test]
async fn a_stuck_operator_does_not_hold_a_fast_one_back_nor_the_slot_past_itself()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    sqlx::raw_sql(HANDLED).execute(&pool).await?;
    let config = minimal_config(&url, "tables = [\"posts\"]")?;
    let fast = Recorder::new("fast", vec![Subscription::all("posts")]);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let stuck = Arc::new(Gated {
        recorder: Recorder::new("stuck", vec![Subscription::all("posts")]),
        gate: gate.clone(),
    });
    let status = MemoryStatus::new();
    let service = Service::start(
        &config,
        status.clone(),
        PubSub::new(),
        vec![
            AnyOperator::new(fast.clone()),
            AnyOperator::new(stuck.clone()),
        ],
    )
    .await?;
    // 5,000 posts in 50 commits: several times what a count-bounded inbox of 1,024 held.
    let first_micros: i64 = sqlx::query_scalar(
        "INSERT INTO posts (id, title) SELECT i, 'p' || i FROM generate_series(1, 100) i
         RETURNING (extract(epoch FROM updated_at) * 1000000)::bigint",
    )
    .fetch_one(&pool)
    .await?;
    let after_first: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await?;
    for batch in 1..50 {
        sqlx::query(
            "INSERT INTO posts (id, title) SELECT i, 'p' || i FROM generate_series($1, $1 + 99) i",
        )
        .bind(batch * 100 + 1)
        .execute(&pool)
        .await?;
    }
    let expected: Vec<_> = (1..=5000).map(|id| seen("insert", "posts", id)).collect();
    eventually("the fast operator through the whole backlog", async || {
        Ok(fast.seen(&pool).await?.len() == expected.len())
    })
    .await?;
    assert_eq!(fast.seen(&pool).await?, expected);
    assert!(stuck.recorder.seen(&pool).await?.is_empty());
    let slot = slot_for(&url);
    let held: bool = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn < $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .bind(&after_first)
    .fetch_one(&pool)
    .await?;
    assert!(
        held,
        "the slot was acknowledged past the first commit, which the stuck operator has not done"
    );
    assert!(!status.processed("posts", first_micros).await?);

    gate.add_permits(1);
    eventually(
        "the stuck operator through the backlog once let go",
        async || Ok(stuck.recorder.seen(&pool).await?.len() == expected.len()),
    )
    .await?;
    assert_eq!(stuck.recorder.seen(&pool).await?, expected);
    let after_last: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await?;
    eventually("the slot acknowledged through the backlog", async || {
        Ok(sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&after_last)
        .fetch_one(&pool)
        .await?)
    })
    .await?;
    service.stop().await
}
