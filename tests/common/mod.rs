//! Helpers shared by the integration tests.
#![allow(dead_code)]

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
pub const BLOG: &str = include_str!("../../examples/blog/schema.sql");

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
                events.push(event);
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
    // Tests also insert explicit ids: move the sequence past them first.
    sqlx::query(
        "SELECT setval(pg_get_serial_sequence('posts', 'id'), coalesce(max(id), 0) + 1, false) FROM posts",
    )
    .execute(pool)
    .await?;
    let ts: String = sqlx::query_scalar(
        "INSERT INTO posts (title) VALUES ('marker') RETURNING updated_at::text",
    )
    .fetch_one(pool)
    .await?;
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
