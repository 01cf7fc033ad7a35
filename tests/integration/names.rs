//! Hostile names (mixed case, spaces, quotes) are quoted everywhere; tables without a key
//! behave as PostgreSQL makes them behave, and setup says so.

use crate::common;

use common::{Streaming, slot_for};
use serde_json::json;
use sqlx::PgPool;
use streamex::EventType;
use streamex::replication::PublicationTables;
use streamex::replication::setup::{self, tables_without_identity};
use streamex::testing;

/// Publication `publication` on `tables` and the slot, then a stream from them.
async fn stream(
    url: &str,
    schema: &str,
    publication: &'static str,
    tables: Vec<(String, String)>,
) -> anyhow::Result<Streaming> {
    let pool = PgPool::connect(url).await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    setup::check_server(&pool).await?;
    let created =
        setup::ensure_publication(&pool, publication, &PublicationTables::Tables(tables)).await?;
    assert!(created.created);
    setup::ensure_slot(&pool, &slot_for(url)).await?;
    Streaming::attach(url, pool, |config| {
        config.publication = publication.to_owned();
    })
    .await
}

#[tokio::test]
async fn schema_table_column_and_publication_names_with_case_spaces_and_quotes()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = stream(
        &url,
        r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "My Schema"."Odd ""Table"" Name" (id int PRIMARY KEY, "Weird Col" text);"#,
        "Pub \"X\"",
        vec![("My Schema".into(), "Odd \"Table\" Name".into())],
    )
    .await?;
    // Setting it up again finds what exists.
    assert!(
        !setup::ensure_publication(
            &s.pool,
            "Pub \"X\"",
            &PublicationTables::Tables(vec![("My Schema".into(), "Odd \"Table\" Name".into())]),
        )
        .await?
        .changed()
    );

    sqlx::raw_sql(
        r#"INSERT INTO "My Schema"."Odd ""Table"" Name" VALUES (1, 'a');
           UPDATE "My Schema"."Odd ""Table"" Name" SET "Weird Col" = 'b' WHERE id = 1;
           DELETE FROM "My Schema"."Odd ""Table"" Name" WHERE id = 1;"#,
    )
    .execute(&s.pool)
    .await?;
    let events = s.events(3).await?;
    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventType::Insert, EventType::Update, EventType::Delete]
    );
    for event in &events {
        assert_eq!(&*event.schema, "My Schema");
        assert_eq!(&*event.table, "Odd \"Table\" Name");
        // Outside the default schema the entity is qualified; a part with a quote is quoted.
        assert_eq!(&*event.entity, r#"My Schema."Odd ""Table"" Name""#);
    }
    assert_eq!(
        events[0].new_record.as_ref().map(|r| r.get("Weird Col")),
        Some(Some(&json!("a")))
    );
    assert_eq!(
        events[1].new_record.as_ref().map(|r| r.get("Weird Col")),
        Some(Some(&json!("b")))
    );
    assert_eq!(
        events[2].old_record.as_ref().map(|r| r.get("id")),
        Some(Some(&json!(1)))
    );
    s.stop().await
}

const NO_KEYS: &str = r#"
    CREATE TABLE keyed (id int PRIMARY KEY, v text);
    CREATE TABLE no_key (id int, v text);
    CREATE TABLE "No Key ""Full""" (id int, v text);
    ALTER TABLE "No Key ""Full""" REPLICA IDENTITY FULL;
    CREATE TABLE nothing (id int PRIMARY KEY, v text);
    ALTER TABLE nothing REPLICA IDENTITY NOTHING;
    CREATE TABLE by_index (id int NOT NULL, v text);
    CREATE UNIQUE INDEX by_index_id ON by_index (id);
    ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_id;
"#;

fn public(tables: &[&str]) -> Vec<(String, String)> {
    tables
        .iter()
        .map(|t| ("public".to_owned(), (*t).to_owned()))
        .collect()
}

/// The SQLSTATE of `statement`'s error, which must fail.
async fn refused(pool: &PgPool, statement: &str) -> String {
    match sqlx::query(statement).execute(pool).await {
        Ok(done) => panic!("{statement} was accepted ({} rows)", done.rows_affected()),
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        Err(e) => panic!("{statement}: {e}"),
    }
}

#[tokio::test]
async fn tables_without_a_key_stream_inserts_and_postgres_refuses_their_updates()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut s = stream(
        &url,
        NO_KEYS,
        "streamex",
        public(&["no_key", "No Key \"Full\"", "nothing"]),
    )
    .await?;

    // No key, REPLICA IDENTITY DEFAULT: inserts stream; PostgreSQL itself refuses updates and
    // deletes (55000, object_not_in_prerequisite_state) since the publication publishes them.
    sqlx::query("INSERT INTO no_key VALUES (1, 'a')")
        .execute(&s.pool)
        .await?;
    let insert = s.events(1).await?.remove(0);
    assert_eq!(
        (insert.kind, &*insert.entity),
        (EventType::Insert, "no_key")
    );
    assert_eq!(
        insert.new_record,
        json!({"id": 1, "v": "a"})
            .as_object()
            .cloned()
            .map(Into::into)
    );
    assert_eq!(refused(&s.pool, "UPDATE no_key SET v = 'b'").await, "55000");
    assert_eq!(refused(&s.pool, "DELETE FROM no_key").await, "55000");

    // REPLICA IDENTITY NOTHING: likewise.
    sqlx::query("INSERT INTO nothing VALUES (1, 'a')")
        .execute(&s.pool)
        .await?;
    let insert = s.events(1).await?.remove(0);
    assert_eq!(
        (insert.kind, &*insert.entity),
        (EventType::Insert, "nothing")
    );
    assert_eq!(
        refused(&s.pool, "UPDATE nothing SET v = 'b'").await,
        "55000"
    );
    assert_eq!(refused(&s.pool, "DELETE FROM nothing").await, "55000");

    // REPLICA IDENTITY FULL without a key: updates and deletes carry the whole old row.
    sqlx::raw_sql(
        r#"INSERT INTO "No Key ""Full""" VALUES (1, 'a');
           UPDATE "No Key ""Full""" SET v = 'b';
           DELETE FROM "No Key ""Full""";"#,
    )
    .execute(&s.pool)
    .await?;
    let events = s.events(3).await?;
    assert!(events.iter().all(|e| &*e.table == "No Key \"Full\""));
    assert!(events.iter().all(|e| &*e.entity == r#""No Key ""Full""""#));
    assert_eq!(events[1].kind, EventType::Update);
    assert_eq!(
        events[1].old_record,
        json!({"id": 1, "v": "a"})
            .as_object()
            .cloned()
            .map(Into::into)
    );
    assert_eq!(
        events[1].new_record,
        json!({"id": 1, "v": "b"})
            .as_object()
            .cloned()
            .map(Into::into)
    );
    let change = events[1].changes.as_ref().and_then(|c| c.get("v")).cloned();
    assert_eq!(
        change.map(|c| (c.old_value, c.new_value)),
        Some((json!("a"), json!("b")))
    );
    assert_eq!(events[2].kind, EventType::Delete);
    assert_eq!(
        events[2].old_record,
        json!({"id": 1, "v": "b"})
            .as_object()
            .cloned()
            .map(Into::into)
    );
    s.stop().await
}

#[tokio::test]
async fn setup_names_the_tables_whose_updates_and_deletes_would_be_refused() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(NO_KEYS).execute(&pool).await?;
    sqlx::raw_sql(
        r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "My Schema"."Odd ""Table"" Name" ("Weird Col" text);"#,
    )
    .execute(&pool)
    .await?;

    let listed = PublicationTables::Tables(vec![
        ("public".into(), "keyed".into()),
        ("public".into(), "no_key".into()),
        ("public".into(), "No Key \"Full\"".into()),
        ("public".into(), "nothing".into()),
        ("public".into(), "by_index".into()),
        ("My Schema".into(), "Odd \"Table\" Name".into()),
    ]);
    let found = tables_without_identity(&pool, &listed).await?;
    let names: Vec<(&str, &str)> = found
        .iter()
        .map(|(s, t, _)| (s.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("My Schema", "Odd \"Table\" Name"),
            ("public", "no_key"),
            ("public", "nothing"),
        ]
    );
    assert!(
        found[0]
            .2
            .starts_with("no primary key and REPLICA IDENTITY DEFAULT")
    );
    assert!(found[0].2.contains("updates and deletes will be refused"));
    assert!(found[0].2.contains("no <entity>/<id> channel"));
    assert!(found[2].2.starts_with("REPLICA IDENTITY NOTHING"));

    // Only the listed tables count.
    let keyed = PublicationTables::Tables(public(&["keyed", "by_index"]));
    assert!(tables_without_identity(&pool, &keyed).await?.is_empty());

    // FOR ALL TABLES: every user table of the database.
    let all = tables_without_identity(&pool, &PublicationTables::All).await?;
    let all: Vec<(&str, &str)> = all
        .iter()
        .map(|(s, t, _)| (s.as_str(), t.as_str()))
        .collect();
    assert_eq!(all, names);
    Ok(())
}

#[tokio::test]
async fn setup_names_full_identity_tables_with_virtual_generated_columns() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await?;
    if version < 180_000 {
        eprintln!(
            "skipped: virtual generated columns exist from PostgreSQL 18 on, this is {version} \
             (server_version_num)"
        );
        return Ok(());
    }
    sqlx::raw_sql(
        "CREATE TABLE virt (id int, a int, b int GENERATED ALWAYS AS (a * 2) VIRTUAL);
         ALTER TABLE virt REPLICA IDENTITY FULL;
         CREATE TABLE stored (id int, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
         ALTER TABLE stored REPLICA IDENTITY FULL;
         CREATE TABLE keyed_virt (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) VIRTUAL);
         INSERT INTO virt (id, a) VALUES (1, 1);",
    )
    .execute(&pool)
    .await?;
    let tables = PublicationTables::Tables(public(&["virt", "stored", "keyed_virt"]));
    let found = tables_without_identity(&pool, &tables).await?;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1.as_str()),
        ("public", "virt")
    );
    assert!(
        found[0].2.contains("virtual generated column"),
        "{}",
        found[0].2
    );
    assert!(found[0].2.contains("updates and deletes will be refused"));
    // As the server says, once the table is published.
    setup::ensure_publication(&pool, "streamex", &tables).await?;
    let refused = sqlx::query("UPDATE virt SET a = 2")
        .execute(&pool)
        .await
        .expect_err("PostgreSQL 18 refuses it");
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("42P10")
    );
    sqlx::query("UPDATE stored SET a = 2")
        .execute(&pool)
        .await?;
    Ok(())
}

#[tokio::test]
async fn streamex_setup_warns_about_tables_without_identity() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(NO_KEYS).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {url:?}\nslot = {:?}\npublication = \"streamex\"\n\
             tables = [\"keyed\", \"no_key\", \"nothing\"]\n",
            slot_for(&url)
        ),
    )?;
    let output = common::streamex_command("warn")
        .args(["setup", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{output:?}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("published table"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("no_key") && l.contains("no primary key")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("nothing") && l.contains("REPLICA IDENTITY NOTHING")),
        "{stderr}"
    );
    Ok(())
}
