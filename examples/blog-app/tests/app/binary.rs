//! The application's own binary (`src/main.rs`: `streamex::cli::main(blog_app::registry())`):
//! its commands know `post_titles`, with the settings of its configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use streamex::testing;

use super::{CONFIG, SCHEMA, TITLES};

/// How long a test waits for the running service before it gives up: a guard against
/// hanging, not a measure of speed.
const PATIENCE: Duration = Duration::from_secs(60);

fn blog_app(args: &[&str], config: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_blog-app"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()?)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// config.toml for database `url`, with a slot named after the database (slots are
/// cluster-wide), written to `dir`.
fn write_config(dir: &Path, url: &str, config: &str) -> anyhow::Result<PathBuf> {
    let database = url.rsplit('/').next().unwrap_or("blog_app");
    let text = config
        .replace(
            "database_url = \"postgres://postgres@127.0.0.1:5432/blog\"",
            &format!("database_url = {url:?}"),
        )
        .replace("slot = \"blog_app\"", &format!("slot = {database:?}"));
    assert!(text.contains(url) && text.contains(&format!("slot = {database:?}")));
    let path = dir.join("config.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A `blog-app run`, killed if the test ends before it stopped.
struct Running(Option<Child>);

impl Running {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("still running")
    }

    /// Waits until it has exited (at most [`PATIENCE`]), with what it wrote.
    async fn exited(mut self) -> anyhow::Result<Output> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.child().try_wait()?.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "blog-app run had not exited {PATIENCE:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(self.0.take().expect("still running").wait_with_output()?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn setup_status_and_run_know_post_titles() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &url, CONFIG)?;

    let out = blog_app(&["setup"], &config)?;
    assert!(out.status.success(), "setup failed: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ready"),
        "{}",
        text(&out)
    );

    let out = blog_app(&["status", "--json"], &config)?;
    assert!(out.status.success(), "status failed: {}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = report["operators"]
        .as_array()
        .map(|operators| {
            operators
                .iter()
                .filter_map(|o| o["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, ["post_titles", "post_comment_tallies"], "{report}");

    let mut run = Running(Some(
        Command::new(env!("CARGO_BIN_EXE_blog-app"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    ));
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'first post');
         INSERT INTO comments (post_id) VALUES (1), (1);",
    )
    .execute(&pool)
    .await?;
    // Both operators, the application's and the stock one, run in the binary.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let titles: Vec<(i64, String)> = sqlx::query_as(TITLES).fetch_all(&pool).await?;
        let tallies: Vec<(i64, i32)> =
            sqlx::query_as("SELECT post_id, comments FROM post_comment_tallies")
                .fetch_all(&pool)
                .await?;
        if titles == [(1, "first post".to_owned())] && tallies == [(1, 2)] {
            break;
        }
        if let Some(status) = run.child().try_wait()? {
            panic!("blog-app run stopped ({status}) before processing the writes");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {PATIENCE:?}: post_titles {titles:?}, post_comment_tallies {tallies:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: it finishes what is in flight and exits 0.
    let term = Command::new("kill")
        .args(["-TERM", &run.child().id().to_string()])
        .status()?;
    assert!(term.success());
    let out = run.exited().await?;
    assert!(
        out.status.success(),
        "run did not stop cleanly: {}",
        text(&out)
    );
    Ok(())
}

#[tokio::test]
async fn setup_refuses_a_wrong_setting_and_a_missing_table_naming_them() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let dir = tempfile::tempdir()?;

    // Refused as the configuration is read, before anything is connected.
    let wrong = CONFIG.replace("uppercase = false", "uppercase = 1");
    let config = write_config(dir.path(), &url, &wrong)?;
    let out = blog_app(&["setup"], &config)?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("operators.post_titles.settings.uppercase"),
        "{}",
        text(&out)
    );

    // The schema without post_titles: the operator's check refuses it, naming it.
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(&SCHEMA.replace(
        "CREATE TABLE IF NOT EXISTS post_titles",
        "CREATE TABLE IF NOT EXISTS post_titles_elsewhere",
    ))
    .execute(&pool)
    .await?;
    let config = write_config(dir.path(), &url, CONFIG)?;
    let out = blog_app(&["setup"], &config)?;
    assert!(!out.status.success());
    let message = text(&out);
    assert!(
        message.contains("post_titles") && message.contains("schema.sql"),
        "{message}"
    );
    Ok(())
}

#[test]
fn the_binary_goes_by_its_own_name_and_version() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_blog-app"))
        .arg("--version")
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("blog-app ", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(env!("CARGO_BIN_EXE_blog-app"))
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: blog-app"), "{help}");
    assert!(help.contains("post_titles operator"), "{help}");
    Ok(())
}
