//! The blog example's operators, tested with the testing kit (`streamex::testing`): the way
//! an operator author tests their own. Each test has a fresh database with the blog schema;
//! the operator runs through the real pipeline (slot, decoder, engine) over the statements.

use std::sync::Arc;

use streamex::operator::SqlOperator;
use streamex::operators::PostCommentTallies;
use streamex::testing::{KitError, OperatorTest};

const SCHEMA: &str = include_str!("../../examples/blog/schema.sql");
const CONFIG: &str = include_str!("../../config/streamex.toml");

const TALLIES: &str = "SELECT post_id, comments FROM post_comment_tallies ORDER BY 1";
const COUNTS: &str = "SELECT id, title, comments_count FROM post_with_comments_counts ORDER BY 1";

// post_comment_tallies (src/operators/tallies.rs)

#[tokio::test]
async fn tallies_count_inserted_and_deleted_comments() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        Arc::new(PostCommentTallies),
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')",
            "INSERT INTO comments (id, post_id) VALUES (1, 1), (2, 1), (3, 1), (4, 2)",
            "DELETE FROM comments WHERE id IN (1, 4)",
        ],
    )
    .await?;
    let tallies: Vec<(i64, i32)> = kit.query_as(TALLIES).await?;
    assert_eq!(tallies, [(1, 2), (2, 0)]);
    Ok(())
}

#[tokio::test]
async fn tallies_move_a_comment_that_changes_post() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        Arc::new(PostCommentTallies),
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')",
            "INSERT INTO comments (id, post_id) VALUES (1, 1), (2, 1)",
            "UPDATE comments SET post_id = 2 WHERE id = 1",
            "UPDATE comments SET body = 'edited' WHERE id = 2", // same post: no change
        ],
    )
    .await?;
    let tallies: Vec<(i64, i32)> = kit.query_as(TALLIES).await?;
    assert_eq!(tallies, [(1, 1), (2, 1)]);
    Ok(())
}

#[tokio::test]
async fn tallies_continue_from_their_checkpoint_on_a_second_run() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    let first = &[
        "INSERT INTO posts (id, title) VALUES (1, 'one')",
        "INSERT INTO comments (post_id) VALUES (1), (1)",
    ];
    kit.run(Arc::new(PostCommentTallies), first).await?;
    let checkpoint = kit.checkpoint("post_comment_tallies").await?;
    // A new instance, as after a restart: it must not count the first run's comments again
    // (the tally is not idempotent, so a replay would show).
    kit.run(
        Arc::new(PostCommentTallies),
        &["INSERT INTO comments (post_id) VALUES (1)"],
    )
    .await?;
    assert!(kit.checkpoint("post_comment_tallies").await? > checkpoint);
    let tallies: Vec<(i64, i32)> = kit.query_as(TALLIES).await?;
    assert_eq!(tallies, [(1, 3)]);
    Ok(())
}

// post_with_comments_counts, the declarative operator of config/streamex.toml

#[tokio::test]
async fn counts_follow_inserted_posts_and_comments_and_title_updates() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?.with_config(CONFIG)?;
    kit.run_configured(
        "post_with_comments_counts",
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')",
            "INSERT INTO comments (post_id) VALUES (1), (1), (2)",
            "UPDATE posts SET title = 'uno' WHERE id = 1",
        ],
    )
    .await?;
    let counts: Vec<(i64, String, i32)> = kit.query_as(COUNTS).await?;
    assert_eq!(counts, [(1, "uno".into(), 2), (2, "two".into(), 1)]);
    Ok(())
}

#[tokio::test]
async fn counts_lose_the_row_of_a_deleted_post() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?.with_config(CONFIG)?;
    let statements = &[
        "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two')",
        "INSERT INTO comments (post_id) VALUES (1), (2), (2)",
        "DELETE FROM posts WHERE id = 2", // its comments go too (ON DELETE CASCADE)
    ];
    kit.run_configured("post_with_comments_counts", statements)
        .await?;
    let counts: Vec<(i64, String, i32)> = kit.query_as(COUNTS).await?;
    assert_eq!(counts, [(1, "one".into(), 1)]);
    Ok(())
}

// The kit's own behaviour: what an operator author sees when something goes wrong.

#[tokio::test]
async fn a_failing_statement_is_named_in_the_error() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    let error = kit
        .run(
            Arc::new(PostCommentTallies),
            &[
                "INSERT INTO posts (id, title) VALUES (1, 'one')",
                "INSERT INTO comments (post_id) VALUES (42)",
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, KitError::Statement { number: 2, statement, .. } if statement.contains("VALUES (42)")),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_statement_that_cannot_prepare_is_refused_before_the_run() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    let broken = SqlOperator::builder("broken")
        .query("UPDATE no_such_table SET n = n + 1 WHERE id = $1")
        .id("posts", "id")
        .build()?;
    let error = kit
        .run(
            Arc::new(broken),
            &["INSERT INTO posts (title) VALUES ('p')"],
        )
        .await
        .unwrap_err();
    let KitError::Service(error) = &error else {
        panic!("expected the service to refuse the operator, got {error:?}");
    };
    let text = format!("{error:#}");
    assert!(
        text.contains("broken") && text.contains("no_such_table"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_halting_operator_fails_the_run_with_its_last_error() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    // Prepares (so the check passes) but fails on every event.
    let broken = SqlOperator::builder("broken")
        .query("UPDATE posts SET title = title || (1 / (id - id))::text WHERE id = $1")
        .id("posts", "id")
        .build()?;
    let error = kit
        .run(
            Arc::new(broken),
            &["INSERT INTO posts (title) VALUES ('p')"],
        )
        .await
        .unwrap_err();
    match &error {
        KitError::Halted { operator, error } => {
            assert_eq!(operator, "broken");
            assert!(error.contains("division by zero"), "{error}");
        }
        other => panic!("expected a halt, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn an_unknown_configured_operator_lists_the_configured_ones() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?.with_config(CONFIG)?;
    let error = kit.run_configured("post_counts", &[]).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("post_with_comments_counts, post_comment_tallies"),
        "{error}"
    );
    Ok(())
}
