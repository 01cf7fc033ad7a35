//! `post_titles` keeps its table in step with `posts` through every kind of change.

use blog_app::{PostTitles, PostTitlesSettings};
use streamex::testing::OperatorTest;

use super::{SCHEMA, TITLES};

fn titles() -> PostTitles {
    PostTitles::new(PostTitlesSettings::default()).expect("default settings are valid")
}

#[tokio::test]
async fn inserts_and_updates_write_the_title_and_deletes_remove_it() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        titles(),
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two'), (3, 'three')",
            "UPDATE posts SET title = 'one, edited' WHERE id = 1",
            "UPDATE posts SET body = 'no title change' WHERE id = 2",
            "DELETE FROM posts WHERE id = 3",
        ],
    )
    .await?;
    let rows: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(rows, [(1, "one, edited".to_owned()), (2, "two".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn an_update_of_the_key_moves_the_row() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        titles(),
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'one')",
            "UPDATE posts SET id = 10 WHERE id = 1",
        ],
    )
    .await?;
    let rows: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(rows, [(10, "one".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn a_truncate_of_posts_clears_the_table_and_later_posts_come_back() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        titles(),
        &["INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')"],
    )
    .await?;
    let before: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(before.len(), 2);
    // A second run resumes after the first one's checkpoint, as `blog-app run` does after a
    // restart.
    kit.run(
        titles(),
        &[
            "TRUNCATE posts CASCADE",
            "INSERT INTO posts (id, title) VALUES (3, 'three')",
        ],
    )
    .await?;
    let after: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(after, [(3, "three".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn a_missing_table_stops_the_operator_before_it_runs() -> anyhow::Result<()> {
    let kit = OperatorTest::start(&SCHEMA.replace(
        "CREATE TABLE IF NOT EXISTS post_titles",
        "CREATE TABLE IF NOT EXISTS post_titles_elsewhere",
    ))
    .await?;
    let error = kit
        .run(
            titles(),
            &["INSERT INTO posts (id, title) VALUES (1, 'one')"],
        )
        .await
        .expect_err("post_titles is missing");
    let message = streamex::error::Chain(&error).to_string();
    assert!(
        message.contains("post_titles") && message.contains("schema.sql"),
        "{message}"
    );
    Ok(())
}
