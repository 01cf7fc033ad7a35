//! `post_comment_tallies`: the blog example's Rust operator.
//!
//! Keeps `post_comment_tallies (post_id, comments)` by adding 1 for each inserted comment and
//! subtracting 1 for each deleted one (and moving 1 when a comment changes post). It is not
//! idempotent on purpose: a tally that is right after crashes shows that each event was
//! applied exactly once. Its first run on a slot counts the comments that already exist (the
//! backfill's `read` events, +1 each). Needs `comments` with REPLICA IDENTITY FULL, so that a delete carries
//! the comment's `post_id`. A TRUNCATE of `comments` sets every tally to 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::Value;

use crate::event::{Event, EventType};
use crate::operator::{Context, Operator, Subscription};

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PostCommentTallies;

const ADD: &str = "INSERT INTO post_comment_tallies (post_id, comments) VALUES ($1, $2)
                   ON CONFLICT (post_id) DO UPDATE SET comments = post_comment_tallies.comments + EXCLUDED.comments";

fn post_id(record: Option<&crate::event::Record>, what: &str) -> anyhow::Result<Option<i64>> {
    match record.and_then(|r| r.get("post_id")) {
        Some(Value::Number(n)) => Ok(n.as_i64()),
        Some(Value::Null) => Ok(None),
        Some(other) => anyhow::bail!("post_id of the {what} comment is not a number: {other}"),
        None => anyhow::bail!(
            "the {what} comment carries no post_id (the table's REPLICA IDENTITY sends only its \
             key): run ALTER TABLE comments REPLICA IDENTITY FULL for the changes to come. This \
             one is already in the WAL as it is and cannot be re-read: `streamex resume \
             post_comment_tallies --skip-current` sets it aside as a dead letter"
        ),
    }
}

async fn add(conn: &mut sqlx::PgConnection, post: Option<i64>, n: i32) -> anyhow::Result<()> {
    if let Some(post) = post {
        sqlx::query(ADD)
            .bind(post)
            .bind(n)
            .execute(conn)
            .await
            .context("updating post_comment_tallies")?;
    }
    Ok(())
}

/// The same upsert for many posts at once: `$1` post ids, `$2` the amounts to add.
const ADD_MANY: &str = "INSERT INTO post_comment_tallies (post_id, comments)
                        SELECT * FROM unnest($1::bigint[], $2::int[])
                        ON CONFLICT (post_id) DO UPDATE SET comments = post_comment_tallies.comments + EXCLUDED.comments";

/// After a TRUNCATE of comments, no post has any.
const RESET: &str = "UPDATE post_comment_tallies SET comments = 0 WHERE comments <> 0";

/// What one comment event adds to which posts.
fn deltas(event: &Event) -> anyhow::Result<[(Option<i64>, i32); 2]> {
    Ok(match event.kind {
        // A comment that existed before the operator's first run (its backfill) counts as
        // one inserted then.
        EventType::Insert | EventType::Read => {
            [(post_id(event.new_record.as_ref(), "new")?, 1), (None, 0)]
        }
        EventType::Delete => [
            (post_id(event.old_record.as_ref(), "deleted")?, -1),
            (None, 0),
        ],
        EventType::Update => {
            let old = post_id(event.old_record.as_ref(), "old")?;
            let new = post_id(event.new_record.as_ref(), "new")?;
            if old == new {
                [(None, 0), (None, 0)]
            } else {
                [(old, -1), (new, 1)]
            }
        }
        EventType::Truncate | EventType::Message => [(None, 0), (None, 0)],
    })
}

impl Operator for PostCommentTallies {
    fn name(&self) -> &str {
        "post_comment_tallies"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::only(
            "comments",
            &[EventType::Insert, EventType::Update, EventType::Delete],
        )]
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        if event.kind == EventType::Truncate {
            return reset(ctx.db()?).await;
        }
        for (post, n) in deltas(event)? {
            if n != 0 {
                add(ctx.db()?, post, n).await?;
            }
        }
        Ok(())
    }

    /// `streamex rebuild post_comment_tallies`: every tally goes, then the backfill counts
    /// the comments again.
    async fn reset(&self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM post_comment_tallies")
            .execute(ctx.db()?)
            .await
            .context("clearing post_comment_tallies for a rebuild")?;
        Ok(())
    }

    /// The batch's deltas summed per post and written in one statement: the same rows as one
    /// upsert per event (a post whose deltas sum to 0 still gets its row, as it would).
    async fn handle_batch(
        &self,
        events: &[Arc<Event>],
        ctx: &mut Context<'_>,
    ) -> anyhow::Result<()> {
        // Summed between truncates, which reset everything before them.
        for run in events.split_inclusive(|e| e.kind == EventType::Truncate) {
            let mut sums: BTreeMap<i64, i32> = BTreeMap::new();
            for event in run {
                for (post, n) in deltas(event)? {
                    if let (Some(post), true) = (post, n != 0) {
                        *sums.entry(post).or_default() += n;
                    }
                }
            }
            add_many(ctx.db()?, sums).await?;
            if run.last().is_some_and(|e| e.kind == EventType::Truncate) {
                reset(ctx.db()?).await?;
            }
        }
        Ok(())
    }
}

async fn reset(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    sqlx::query(RESET)
        .execute(conn)
        .await
        .context("resetting post_comment_tallies after a truncate")?;
    Ok(())
}

async fn add_many(conn: &mut sqlx::PgConnection, sums: BTreeMap<i64, i32>) -> anyhow::Result<()> {
    if sums.is_empty() {
        return Ok(());
    }
    let (posts, amounts): (Vec<i64>, Vec<i32>) = sums.into_iter().unzip();
    sqlx::query(ADD_MANY)
        .bind(posts)
        .bind(amounts)
        .execute(conn)
        .await
        .context("updating post_comment_tallies")?;
    Ok(())
}
