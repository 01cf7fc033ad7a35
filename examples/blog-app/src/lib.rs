//! blog-app: an application built on streamex, in a crate of its own.
//!
//! ```text
//! src/lib.rs        the operator post_titles, its settings, and registry(): stock + own
//! src/main.rs       the binary: streamex::cli::main(blog_app::registry())
//! config.toml       the operators it runs, with post_titles' settings
//! schema.sql        posts, comments, and the tables the operators keep
//! examples/         embedded.rs: the service inside a program of one's own (Service::builder)
//! tests/app/        the operator, its settings and the binary, on a real PostgreSQL
//! ```
//!
//! `post_titles` keeps the derived table `post_titles (post_id, title)` in step with `posts`:
//! an insert or update writes the post's row, a delete removes it, a truncate of `posts`
//! empties the table. Its writes go through the transaction streamex commits with the
//! operator's checkpoint, so each change is applied exactly once, across crashes.

use anyhow::Context as _;
use serde::Deserialize;
use streamex::event::{Event, EventType};
use streamex::operator::{Context, Operator, Registry, Subscription};

/// The name `post_titles` is registered and configured under (and its checkpoint's key).
pub const POST_TITLES: &str = "post_titles";

/// `settings` of the `[[operators]]` entry named `post_titles`:
///
/// ```toml
/// [[operators]]
/// name = "post_titles"
/// settings = { uppercase = true, max_title_length = 80 }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostTitlesSettings {
    /// Store titles in upper case (default: as written).
    #[serde(default)]
    pub uppercase: bool,
    /// Cut titles to at most this many characters (default: no limit). At least 1.
    pub max_title_length: Option<usize>,
}

/// Keeps `post_titles` in step with `posts`; see the crate documentation.
#[derive(Clone, Debug, Default)]
pub struct PostTitles {
    settings: PostTitlesSettings,
}

/// The columns of `posts` the operator reads (the others are ignored).
#[derive(Debug, Deserialize)]
struct Post {
    id: i64,
    title: String,
}

/// The key of a post, as an update that changes it carries in its old record.
#[derive(Debug, Deserialize)]
struct PostKey {
    id: i64,
}

const UPSERT: &str = "INSERT INTO post_titles (post_id, title) VALUES ($1, $2)
                      ON CONFLICT (post_id) DO UPDATE SET title = EXCLUDED.title";
const DELETE: &str = "DELETE FROM post_titles WHERE post_id = $1";
/// DELETE rather than TRUNCATE: readers of post_titles are not blocked until the commit.
const CLEAR: &str = "DELETE FROM post_titles";

impl PostTitles {
    /// With `settings`; refuses a `max_title_length` of 0, which would store empty titles.
    pub fn new(settings: PostTitlesSettings) -> anyhow::Result<Self> {
        if settings.max_title_length == Some(0) {
            anyhow::bail!("max_title_length must be at least 1 (leave it out for no limit)");
        }
        Ok(PostTitles { settings })
    }

    /// `title` as the settings want it stored: upper-cased first, then cut to the limit (in
    /// characters, never inside one), so that the stored title respects the limit.
    pub fn title(&self, title: &str) -> String {
        let title = if self.settings.uppercase {
            title.to_uppercase()
        } else {
            title.to_owned()
        };
        match self.settings.max_title_length {
            Some(max) => title.chars().take(max).collect(),
            None => title,
        }
    }
}

impl Operator for PostTitles {
    fn name(&self) -> &str {
        POST_TITLES
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::all("posts")]
    }

    /// Refuses to start (naming the operator) when the derived table is missing or lacks a
    /// column, instead of failing at the first event.
    async fn check(&self, db: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        sqlx::query("SELECT post_id, title FROM post_titles LIMIT 0")
            .execute(db)
            .await
            .context("post_titles (post_id bigint, title text) must exist: see schema.sql")?;
        Ok(())
    }

    async fn handle(&self, event: &Event, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        match event.kind {
            // A read is a post that existed before the operator's first run (its backfill).
            EventType::Insert | EventType::Update | EventType::Read => {
                let post: Post = event.new_record_as()?;
                // An update that changes the key carries the old key: that row goes.
                if event.kind == EventType::Update && event.old_record.is_some() {
                    let old: PostKey = event.old_record_as()?;
                    if old.id != post.id {
                        delete(ctx.db()?, old.id).await?;
                    }
                }
                sqlx::query(UPSERT)
                    .bind(post.id)
                    .bind(self.title(&post.title))
                    .execute(ctx.db()?)
                    .await
                    .context("writing post_titles")?;
            }
            EventType::Delete => delete(ctx.db()?, event.get("id")?).await?,
            EventType::Truncate => {
                sqlx::query(CLEAR)
                    .execute(ctx.db()?)
                    .await
                    .context("clearing post_titles after a truncate of posts")?;
            }
            // Outbox messages go to subscriptions to messages, never to one to a table.
            EventType::Message => {}
        }
        Ok(())
    }
}

async fn delete(db: &mut sqlx::PgConnection, post_id: i64) -> anyhow::Result<()> {
    sqlx::query(DELETE)
        .bind(post_id)
        .execute(db)
        .await
        .context("deleting from post_titles")?;
    Ok(())
}

/// The operators this application's configuration may name: those that ship with streamex
/// ([`streamex::operators::registry`]) and its own `post_titles`, built from its entry's
/// `settings` ([`PostTitlesSettings`]; a key of the wrong type is refused naming it).
pub fn registry() -> Registry {
    streamex::operators::registry()
        .merge(Registry::new().register_with(POST_TITLES, PostTitles::new))
}
