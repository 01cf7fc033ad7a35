//! `post_comment_tallies`: the blog example's Rust operator.
//!
//! Keeps `post_comment_tallies (post_id, comments)` by adding 1 for each inserted comment and
//! subtracting 1 for each deleted one (and moving 1 when a comment changes post). It is not
//! idempotent on purpose: a tally that is right after crashes shows that each event was
//! applied exactly once. Needs `comments` with REPLICA IDENTITY FULL, so that a delete carries
//! the comment's `post_id`.

use anyhow::Context as _;
use serde_json::Value;

use crate::event::{Event, EventType};
use crate::operator::{Context, HandlerFuture, Operator, Subscription};

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
            "the {what} comment carries no post_id: set REPLICA IDENTITY FULL on comments"
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

    fn handle<'a>(&'a self, event: &'a Event, ctx: &'a mut Context<'_>) -> HandlerFuture<'a> {
        Box::pin(async move {
            match event.kind {
                EventType::Insert => {
                    add(ctx.db(), post_id(event.new_record.as_ref(), "new")?, 1).await
                }
                EventType::Delete => {
                    add(ctx.db(), post_id(event.old_record.as_ref(), "deleted")?, -1).await
                }
                EventType::Update => {
                    let old = post_id(event.old_record.as_ref(), "old")?;
                    let new = post_id(event.new_record.as_ref(), "new")?;
                    if old != new {
                        add(ctx.db(), old, -1).await?;
                        add(ctx.db(), new, 1).await?;
                    }
                    Ok(())
                }
                EventType::Truncate => Ok(()),
            }
        })
    }
}
