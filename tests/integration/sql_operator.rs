//! The declarative operator's batches against a real server: text and UUID ids that need
//! quoting, run as one string of prepared statements, give the same rows as one statement per event.

use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::PgPool;
use streamex::event::{Event, EventType};
use streamex::operator::{Operator, SqlOperator};
use streamex::testing::{self, OperatorTest};

const SCHEMA: &str = "
CREATE TABLE tags (name text PRIMARY KEY);
CREATE TABLE tag_uses (id serial PRIMARY KEY, tag text NOT NULL);
ALTER TABLE tag_uses REPLICA IDENTITY FULL;
CREATE TABLE tag_counts (name text PRIMARY KEY, uses bigint NOT NULL);
CREATE TABLE docs (id uuid PRIMARY KEY, title text NOT NULL);
CREATE TABLE doc_copies (id uuid PRIMARY KEY, title text NOT NULL);
";

fn tag_counts() -> SqlOperator {
    SqlOperator::builder("tag_counts")
        .query(
            "INSERT INTO tag_counts (name, uses)
             SELECT t.name, (SELECT count(*) FROM tag_uses u WHERE u.tag = t.name)
               FROM tags t WHERE t.name = $1
             ON CONFLICT (name) DO UPDATE SET uses = EXCLUDED.uses",
        )
        .id("tags", "name")
        .id("tag_uses", "tag")
        .delete_with("tags", "DELETE FROM tag_counts WHERE name = $1")
        .build()
        .expect("a valid operator")
}

fn doc_copies() -> SqlOperator {
    SqlOperator::builder("doc_copies")
        .query(
            "INSERT INTO doc_copies SELECT id, title FROM docs WHERE id = $1
             ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
        )
        .id("docs", "id")
        .delete_with("docs", "DELETE FROM doc_copies WHERE id = $1")
        .build()
        .expect("a valid operator")
}

const TAGS: [&str; 4] = ["it's", r"back\slash", "$streamex$ tag", "plain"];

#[tokio::test]
async fn text_ids_with_quotes_backslashes_and_dollar_tags_are_recomputed() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    kit.run(
        Arc::new(tag_counts()),
        &[
            r"INSERT INTO tags VALUES ('it''s'), (E'back\\slash'), ('$streamex$ tag'), ('plain')",
            r"INSERT INTO tag_uses (tag) VALUES ('it''s'), ('it''s'), (E'back\\slash'),
                ('$streamex$ tag'), ('plain')",
            "DELETE FROM tag_uses WHERE tag = 'plain'",
            "DELETE FROM tags WHERE name = 'plain'",
        ],
    )
    .await?;
    let counts: Vec<(String, i64)> = kit
        .query_as("SELECT name, uses FROM tag_counts ORDER BY name")
        .await?;
    let mut expected = vec![
        ("$streamex$ tag".to_owned(), 1),
        (r"back\slash".to_owned(), 1),
        ("it's".to_owned(), 2),
    ];
    expected.sort();
    assert_eq!(counts, expected);
    Ok(())
}

fn event(kind: EventType, entity: &str, record: Value, ordinal: u64) -> Arc<Event> {
    let (new, old) = match kind {
        EventType::Delete => (Value::Null, record),
        _ => (record, Value::Null),
    };
    Arc::new(testing::event(kind, entity, new, old, ordinal))
}

/// Inserts [`TAGS`] and returns their insert events.
async fn insert_tags(pool: &PgPool) -> anyhow::Result<Vec<Arc<Event>>> {
    for tag in TAGS {
        sqlx::query("INSERT INTO tags VALUES ($1)")
            .bind(tag)
            .execute(pool)
            .await?;
    }
    Ok(TAGS
        .iter()
        .enumerate()
        .map(|(i, tag)| event(EventType::Insert, "tags", json!({"name": tag}), i as u64))
        .collect())
}

/// `operator.handle_batch(events)` in a transaction of its own, committed when it succeeds.
async fn run_batch(
    pool: &PgPool,
    operator: &impl Operator,
    events: &[Arc<Event>],
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let mut ctx = testing::context(&mut tx);
    operator.handle_batch(events, &mut ctx).await?;
    tx.commit().await?;
    Ok(())
}

/// The batch path itself (not the one-by-one fallback, which would hide a broken batch).
#[tokio::test]
async fn a_batch_runs_in_one_statement_and_matches_the_source() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    let pool = kit.pool();
    let ids: Vec<String> = (0..5)
        .map(|i| format!("6f1c2c3e-0d0a-4b8e-9a51-3c2f0e4b9d1{i}"))
        .collect();
    let mut events = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        sqlx::query("INSERT INTO docs VALUES ($1::uuid, $2)")
            .bind(id)
            .bind(format!("doc {i}"))
            .execute(pool)
            .await?;
        events.push(event(
            EventType::Insert,
            "docs",
            json!({"id": id}),
            i as u64,
        ));
    }
    sqlx::query("DELETE FROM docs WHERE id = $1::uuid")
        .bind(&ids[1])
        .execute(pool)
        .await?;
    events.push(event(EventType::Delete, "docs", json!({"id": ids[1]}), 9));
    run_batch(pool, &doc_copies(), &events).await?;
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM docs d FULL JOIN doc_copies c USING (id)
          WHERE d.title IS DISTINCT FROM c.title",
    )
    .fetch_one(pool)
    .await?;
    let copies: i64 = sqlx::query_scalar("SELECT count(*) FROM doc_copies")
        .fetch_one(pool)
        .await?;
    assert_eq!((wrong, copies), (0, 4));

    // The tags operator's batch with text ids, straight through handle_batch as well.
    let events = insert_tags(pool).await?;
    run_batch(pool, &tag_counts(), &events).await?;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM tag_counts ORDER BY name")
        .fetch_all(pool)
        .await?;
    let mut expected: Vec<String> = TAGS.iter().map(|t| (*t).to_owned()).collect();
    expected.sort();
    assert_eq!(names, expected);
    Ok(())
}

/// A statement PostgreSQL cannot `PREPARE` (a `CALL`) fails its first batch, which the
/// runner then handles one event at a time; later batches run it once per id.
#[tokio::test]
async fn a_statement_that_cannot_be_prepared_falls_back_to_one_by_one() -> anyhow::Result<()> {
    let kit = OperatorTest::start(SCHEMA).await?;
    let pool = kit.pool();
    sqlx::raw_sql(
        "CREATE PROCEDURE recount(tag text) LANGUAGE sql AS $$
           INSERT INTO tag_counts (name, uses)
           SELECT t.name, (SELECT count(*) FROM tag_uses u WHERE u.tag = t.name)
             FROM tags t WHERE t.name = tag
           ON CONFLICT (name) DO UPDATE SET uses = EXCLUDED.uses
         $$",
    )
    .execute(pool)
    .await?;
    let operator = Arc::new(
        SqlOperator::builder("recount")
            .query("CALL recount($1)")
            .id("tags", "name")
            .id("tag_uses", "tag")
            .build()?,
    );
    let events = insert_tags(pool).await?;
    let error = run_batch(pool, &operator, &events).await.unwrap_err();
    assert!(format!("{error:#}").contains("preparing"), "{error:#}");
    run_batch(pool, &operator, &events).await?;
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM tag_counts")
        .fetch_one(pool)
        .await?;
    assert_eq!(counted, TAGS.len() as i64);

    // Through the pipeline: the uses are counted whatever path each batch takes.
    kit.run(
        operator,
        &[r"INSERT INTO tag_uses (tag) VALUES ('it''s'), ('plain'), ('plain'), (E'back\\slash')"],
    )
    .await?;
    let uses: Vec<(String, i64)> = kit
        .query_as("SELECT name, uses FROM tag_counts WHERE uses > 0 ORDER BY name")
        .await?;
    assert_eq!(
        uses,
        [
            (r"back\slash".to_owned(), 1),
            ("it's".to_owned(), 1),
            ("plain".to_owned(), 2)
        ]
    );
    Ok(())
}
