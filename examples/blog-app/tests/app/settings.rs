//! `post_titles` built from its `[[operators]]` entry through `blog_app::registry()`, as
//! `blog-app run` builds it: the settings are honoured, and a wrong one is refused naming it.

use streamex::testing::{KitError, OperatorTest};

use super::{CONFIG, SCHEMA, TITLES};

/// config.toml with post_titles' settings replaced by `settings`.
fn config_with(settings: &str) -> String {
    let shipped = "settings = { uppercase = false, max_title_length = 80 }";
    assert!(
        CONFIG.contains(shipped),
        "config.toml changed: update this test"
    );
    CONFIG.replace(shipped, &format!("settings = {settings}"))
}

async fn kit(config: &str) -> anyhow::Result<OperatorTest> {
    Ok(OperatorTest::start(SCHEMA)
        .await?
        .with_config(config)?
        .with_registry(blog_app::registry()))
}

#[tokio::test]
async fn the_shipped_configuration_keeps_titles_as_written() -> anyhow::Result<()> {
    let kit = kit(CONFIG).await?;
    kit.run_configured(
        "post_titles",
        &["INSERT INTO posts (id, title) VALUES (1, 'Hello, World')"],
    )
    .await?;
    let rows: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(rows, [(1, "Hello, World".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn uppercase_and_max_title_length_shape_the_stored_title() -> anyhow::Result<()> {
    let kit = kit(&config_with("{ uppercase = true, max_title_length = 5 }")).await?;
    kit.run_configured(
        "post_titles",
        &[
            "INSERT INTO posts (id, title) VALUES (1, 'hello, world'), (2, 'ok')",
            // Characters, not bytes: five letters of a word with multi-byte ones.
            "INSERT INTO posts (id, title) VALUES (3, 'élégance')",
            "UPDATE posts SET title = 'straße' WHERE id = 2",
        ],
    )
    .await?;
    let rows: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert_eq!(
        rows,
        [
            (1, "HELLO".to_owned()),
            // Upper-cased before it is cut: ß becomes SS, and the limit holds.
            (2, "STRAS".to_owned()),
            (3, "ÉLÉGA".to_owned()),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_setting_of_the_wrong_type_is_refused_naming_the_key() -> anyhow::Result<()> {
    let kit = kit(&config_with("{ uppercase = \"yes\" }")).await?;
    let error = kit
        .run_configured(
            "post_titles",
            &["INSERT INTO posts (id, title) VALUES (1, 'one')"],
        )
        .await
        .expect_err("uppercase is not a boolean");
    assert!(matches!(error, KitError::Build { .. }), "{error:?}");
    let message = streamex::error::Chain(&error).to_string();
    assert!(
        message.contains("operators.post_titles.settings.uppercase"),
        "{message}"
    );
    // Nothing ran: the post is still waiting for a valid operator.
    let rows: Vec<(i64, String)> = kit.query_as(TITLES).await?;
    assert!(rows.is_empty(), "{rows:?}");
    Ok(())
}

#[tokio::test]
async fn an_unknown_setting_and_a_zero_length_are_refused() -> anyhow::Result<()> {
    let kit = kit(&config_with("{ upper_case = true }")).await?;
    let error = kit
        .run_configured("post_titles", &[])
        .await
        .expect_err("upper_case is not a setting");
    let message = streamex::error::Chain(&error).to_string();
    assert!(
        message.contains("operators.post_titles.settings") && message.contains("upper_case"),
        "{message}"
    );

    // The same database, another configuration.
    let kit = kit.with_config(&config_with("{ max_title_length = 0 }"))?;
    let error = kit
        .run_configured("post_titles", &[])
        .await
        .expect_err("a limit of 0 is refused");
    let message = streamex::error::Chain(&error).to_string();
    assert!(
        message.contains("operators.post_titles") && message.contains("max_title_length"),
        "{message}"
    );
    Ok(())
}
