//! `streamex setup`, `status` and `resume`, and configuration errors, run as the real binary.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{BLOG, slot_for};
use serde_json::Value;
use sqlx::PgPool;
use streamex::replication::Lsn;
use streamex::testing;

fn streamex(args: &[&str], config: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()?)
}

/// The example configuration for database `url`, written to a file in `dir`.
fn write_config(dir: &Path, url: &str, extra: &str) -> anyhow::Result<std::path::PathBuf> {
    write_config_on(dir, url, &slot_for(url), extra)
}

/// The example configuration for database `url` and slot `slot`, written to a file in `dir`.
fn write_config_on(
    dir: &Path,
    url: &str,
    slot: &str,
    extra: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/streamex.toml"))?;
    let text = example
        .replace(
            "database_url = \"postgres://postgres@127.0.0.1:5432/blog\"",
            &format!("database_url = {url:?}"),
        )
        .replace("slot = \"streamex\"", &format!("slot = {slot:?}"));
    let path = dir.join("streamex.toml");
    std::fs::write(&path, format!("{extra}\n{text}"))?;
    Ok(path)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn setup_status_and_resume_work_and_never_show_the_password() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    // Trust authentication ignores the password; it must still never be printed.
    let with_password = url.replacen("postgres@", "postgres:hunter2secret@", 1);
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &with_password, "")?;

    for _ in 0..2 {
        let out = streamex(&["setup"], &config)?;
        assert!(out.status.success(), "setup failed: {}", text(&out));
    }
    let slot: Option<String> =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot_for(&url))
            .fetch_optional(&pool)
            .await?;
    assert_eq!(slot.as_deref(), Some("pgoutput"));

    streamex::status::set_operator_halted(
        &pool,
        &slot_for(&url),
        "post_comment_tallies",
        "boom: the tallies table is gone",
        Lsn(0x1234),
        3,
        6,
    )
    .await?;
    let out = streamex(&["status", "--json"], &config)?;
    assert!(out.status.success(), "status failed: {}", text(&out));
    assert!(!text(&out).contains("hunter2secret"), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["slot"]["plugin"], "pgoutput");
    assert!(report["slot"]["retained_bytes"].is_number());
    let operators = report["operators"].as_array().unwrap();
    let tallies = operators
        .iter()
        .find(|o| o["name"] == "post_comment_tallies")
        .unwrap();
    assert_eq!(tallies["state"], "halted");
    assert_eq!(tallies["failed_at"], "0/1234#3");
    assert!(tallies["last_error"].as_str().unwrap().contains("boom"));
    let counts = operators
        .iter()
        .find(|o| o["name"] == "post_with_comments_counts")
        .unwrap();
    assert_eq!(counts["state"], "running");

    let out = streamex(&["status"], &config)?;
    let human = text(&out);
    assert!(
        human.contains("streamex resume post_comment_tallies"),
        "{human}"
    );
    assert!(human.contains("WAL retained"), "{human}");
    assert!(!human.contains("hunter2secret"), "{human}");

    let out = streamex(&["resume", "post_comment_tallies"], &config)?;
    assert!(out.status.success(), "resume failed: {}", text(&out));
    let state: String = sqlx::query_scalar(
        "SELECT state FROM streamex.operator_state WHERE operator = 'post_comment_tallies'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(state, "running");

    let out = streamex(&["resume", "no_such_operator"], &config)?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("post_comment_tallies"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[tokio::test]
async fn configuration_mistakes_stop_start_up_with_the_key_named() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let dir = tempfile::tempdir()?;

    let config = write_config(dir.path(), &url, "slott = \"x\"")?;
    let out = streamex(&["setup"], &config)?;
    assert!(!out.status.success());
    assert!(text(&out).contains("slott"), "{}", text(&out));

    let config = write_config(dir.path(), &url, "")?;
    let broken = std::fs::read_to_string(&config)?.replace(
        "name = \"post_comment_tallies\"",
        "name = \"post_comment_talies\"",
    );
    std::fs::write(&config, broken)?;
    let out = streamex(&["run"], &config)?;
    assert!(!out.status.success());
    let message = text(&out);
    assert!(
        message.contains("post_comment_talies") && message.contains("post_comment_tallies"),
        "the message names the unknown operator and the registered ones: {message}"
    );

    // A table the configuration publishes but the database lacks (no blog schema here).
    let config = write_config(dir.path(), &url, "")?;
    let out = streamex(&["setup"], &config)?;
    assert!(!out.status.success());
    assert!(text(&out).contains("public.posts"), "{}", text(&out));

    let missing = dir.path().join("nope.toml");
    let out = streamex(&["status"], &missing)?;
    assert!(!out.status.success());
    assert!(text(&out).contains("nope.toml"), "{}", text(&out));
    Ok(())
}

#[tokio::test]
async fn status_names_the_active_instance() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &url, "")?;
    let report = |config: &Path| -> anyhow::Result<Value> {
        let out = streamex(&["status", "--json"], config)?;
        assert!(out.status.success(), "status failed: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    assert_eq!(report(&config)?["active_instance_pid"], Value::Null);

    let mut run = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let pid = loop {
        if let Some(pid) = report(&config)?["active_instance_pid"].as_i64() {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no active instance shown"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let application: String =
        sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(i32::try_from(pid)?)
            .fetch_one(&pool)
            .await?;
    assert!(
        application.starts_with("streamex instance "),
        "{application}"
    );
    let active = report(&config)?;
    assert_eq!(active["standby_instance_pids"], serde_json::json!([]));
    assert_eq!(active["instance_active"], true, "{active:#}");
    assert_eq!(
        operator(&active, "post_comment_tallies")["processing"],
        true,
        "{active:#}"
    );

    // A second instance on the same slot waits as a standby, and is listed as one.
    let mut second = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let standbys = loop {
        let report = report(&config)?;
        let standbys = report["standby_instance_pids"].as_array().cloned();
        if standbys.as_ref().is_some_and(|s| !s.is_empty()) {
            assert_eq!(report["active_instance_pid"].as_i64(), Some(pid));
            break standbys.unwrap_or_default();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no standby instance shown"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(standbys.len(), 1, "{standbys:?}");
    let out = streamex(&["status"], &config)?;
    assert!(
        text(&out).contains("standby   1 waiting to take over"),
        "{}",
        text(&out)
    );
    second.kill()?;
    second.wait()?;
    run.kill()?;
    run.wait()?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_is_definite_and_an_unreachable_server_is_waited_for() -> anyhow::Result<()>
{
    let cluster = testing::Cluster::builder()
        .setting("password_encryption", "scram-sha-256")
        .hba(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .start()?;
    let admin = PgPool::connect(&cluster.url("postgres")).await?;
    sqlx::query("CREATE ROLE app LOGIN REPLICATION PASSWORD 'right-password'")
        .execute(&admin)
        .await?;
    let dir = tempfile::tempdir()?;
    let wrong = format!(
        "postgres://app:wrong-password@127.0.0.1:{}/postgres",
        cluster.port()
    );
    let config = write_config(dir.path(), &wrong, "")?;
    let out = streamex(&["setup"], &config)?;
    assert!(!out.status.success(), "a wrong password must stop setup");
    let message = text(&out);
    assert!(message.contains("check the user and password"), "{message}");
    assert!(!message.contains("wrong-password"), "{message}");

    // Nothing listens on this port: the service waits and says so, instead of exiting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let unreachable = format!("postgres://app@127.0.0.1:{port}/postgres");
    let config = write_config(dir.path(), &unreachable, "")?;
    let log = dir.path().join("run.log");
    let mut run = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let still_running = run.try_wait()?.is_none();
    run.kill()?;
    run.wait()?;
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        still_running,
        "the service gave up on an unreachable server:\n{logged}"
    );
    assert!(
        logged.contains("database unreachable; retrying"),
        "{logged}"
    );
    Ok(())
}

/// `setup`, `run` and `status` under sslmode=verify-ca against 127.0.0.1, with a server
/// certificate issued for `localhost` only: the chain is verified, the name is not, on every
/// connection the service opens (pool, process status, operators, instance lock, replication).
#[tokio::test]
async fn the_service_runs_under_verify_ca_with_a_certificate_for_another_name() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let ca = common::Ca::new("streamex test ca")?;
    let ca_file = common::encoded(&ca.write(&dir, "ca.pem")?);
    let cluster = common::tls_cluster(&ca, &["localhost"])?;
    let url = cluster.create_database().await?;
    let db = url.rsplit('/').next().unwrap_or_default().to_owned();
    // The test's own connections go over the socket, so every TCP client is the service.
    let pool = PgPool::connect_with(
        sqlx::postgres::PgConnectOptions::new()
            .socket(cluster.socket_dir())
            .port(cluster.port())
            .username("postgres")
            .database(&db),
    )
    .await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        common::blog_config(
            &format!("{url}?sslmode=verify-ca&sslrootcert={ca_file}"),
            &slot_for(&url),
        ),
    )?;

    let out = setup_within_patience(&config).await?;
    assert!(out.status.success(), "setup failed: {}", text(&out));
    let log = dir.path().join("run.log");
    let mut run = common::spawn_service(&config, &log, "warn")?;
    let settled = common::settle(&pool).await;
    let clients: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl)
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.datname = current_database() AND a.client_addr IS NOT NULL",
    )
    .fetch_one(&pool)
    .await;
    let status = streamex(&["status", "--json"], &config)?;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(run.id())?, libc::SIGTERM) };
    let exit = run.wait()?;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    settled.map_err(|e| anyhow::anyhow!("{e}\nservice log:\n{logged}"))?;
    assert!(
        exit.success(),
        "SIGTERM should end the service cleanly: {exit}\n{logged}"
    );
    assert_eq!(common::derived_mismatches(&pool).await?, (0, 0), "{logged}");

    // The pool, the instance lock and the walsender at least, all over TLS.
    let (clients, encrypted) = clients?;
    assert!(clients >= 3, "{clients} clients\n{logged}");
    assert_eq!(encrypted, clients, "{logged}");

    assert!(status.status.success(), "status failed: {}", text(&status));
    let report: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(report["slot"]["plugin"], "pgoutput");

    // The chain is still checked: a certificate from another CA stops setup, with the reason.
    let other_ca = common::Ca::new("unrelated ca")?;
    let other_file = common::encoded(&other_ca.write(&dir, "other.pem")?);
    std::fs::write(
        &config,
        common::blog_config(
            &format!("{url}?sslmode=verify-ca&sslrootcert={other_file}"),
            &slot_for(&url),
        ),
    )?;
    let out = setup_within_patience(&config).await?;
    let message = text(&out);
    assert!(!out.status.success(), "{message}");
    assert!(
        message.contains("not signed by a trusted certificate authority")
            && !message.contains("retrying"),
        "{message}"
    );
    Ok(())
}

/// `streamex setup --config config`, killed if it has not ended within [`common::PATIENCE`]
/// (an error taken for a passing one makes it wait for the server for ever).
async fn setup_within_patience(config: &Path) -> anyhow::Result<Output> {
    let mut setup = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["setup", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while setup.try_wait()?.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if setup.try_wait()?.is_none() {
        setup.kill()?;
    }
    Ok(setup.wait_with_output()?)
}

/// The operator `name` of a `status --json` report.
fn operator<'r>(report: &'r Value, name: &str) -> &'r Value {
    report["operators"]
        .as_array()
        .and_then(|operators| operators.iter().find(|o| o["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Two configurations on one database, each with its own slot and the same operators: what
/// the operators of one have done (their checkpoints) is not the other's.
#[tokio::test]
async fn two_slots_on_one_database_keep_their_operators_apart() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let slot_b = format!("{}_b", slot_for(&url));
    let config_a = write_config(dir_a.path(), &url, "")?;
    let config_b = write_config_on(dir_b.path(), &url, &slot_b, "")?;
    common::setup_service(&config_a)?;
    common::setup_service(&config_b)?;

    // Only the first configuration runs, over a post with a comment.
    let log = dir_a.path().join("run.log");
    let mut run = common::spawn_service(&config_a, &log, "warn")?;
    let written = async {
        sqlx::raw_sql(
            "INSERT INTO posts (id, title) VALUES (1, 'one');
             INSERT INTO comments (post_id) VALUES (1);",
        )
        .execute(&pool)
        .await?;
        common::settle(&pool).await
    }
    .await;
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(run.id())?, libc::SIGTERM) };
    let exit = run.wait()?;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    written.map_err(|e| anyhow::anyhow!("{e}\nservice log:\n{logged}"))?;
    assert!(exit.success(), "{exit}\n{logged}");

    let report = |config: &Path| -> anyhow::Result<Value> {
        let out = streamex(&["status", "--json"], config)?;
        assert!(out.status.success(), "status failed: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let (a, b) = (report(&config_a)?, report(&config_b)?);
    for name in ["post_comment_tallies", "post_with_comments_counts"] {
        assert!(
            operator(&a, name)["checkpoint_commit_lsn"].is_string(),
            "{name} has a checkpoint on the slot that ran it: {a:#}"
        );
        assert_eq!(
            operator(&b, name)["checkpoint_commit_lsn"],
            Value::Null,
            "{name} never ran on slot {slot_b}: {b:#}"
        );
    }
    let keyed: Vec<(String, String)> =
        sqlx::query_as("SELECT slot, operator FROM streamex.operator_checkpoints ORDER BY 2")
            .fetch_all(&pool)
            .await?;
    let slot_a = slot_for(&url);
    assert_eq!(
        keyed,
        [
            (slot_a.clone(), "post_comment_tallies".to_owned()),
            (slot_a, "post_with_comments_counts".to_owned())
        ]
    );
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot_b)
        .execute(&pool)
        .await?;
    Ok(())
}

/// With no instance running, `status` says so and calls no operator running; an operator
/// with rows for the slot that the configuration no longer names is listed, marked, with what
/// it holds back (nothing) and how to forget it.
#[tokio::test]
async fn status_says_no_instance_runs_and_lists_operators_left_out_of_the_config()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &url, "")?;
    common::setup_service(&config)?;
    let slot = slot_for(&url);
    streamex::status::set_operator_halted(
        &pool,
        &slot,
        "retired_mailer",
        "smtp refused",
        Lsn(0x42),
        0,
        6,
    )
    .await?;
    streamex::status::store_checkpoint(&pool, &slot, "retired_mailer", Lsn(0x40), 2).await?;
    // The same name on another slot is not this configuration's.
    streamex::status::set_operator_running(&pool, "another_slot", "other_slots_operator").await?;

    let out = streamex(&["status", "--json"], &config)?;
    assert!(out.status.success(), "status failed: {}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["instance_active"], false, "{report:#}");
    let counts = operator(&report, "post_with_comments_counts");
    assert_eq!(counts["state"], "running", "{report:#}");
    assert_eq!(counts["processing"], false, "{report:#}");
    assert_eq!(counts["in_config"], true, "{report:#}");
    let retired = operator(&report, "retired_mailer");
    assert_eq!(retired["in_config"], false, "{report:#}");
    assert_eq!(retired["state"], "halted", "{report:#}");
    assert_eq!(retired["checkpoint_commit_lsn"], "0/40", "{report:#}");
    assert!(
        retired["checkpoint_behind_wal_bytes"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{report:#}"
    );
    assert_eq!(
        operator(&report, "other_slots_operator"),
        &Value::Null,
        "{report:#}"
    );

    let out = streamex(&["status"], &config)?;
    let human = text(&out);
    assert!(
        human.contains("instance  NONE ACTIVE for this slot"),
        "{human}"
    );
    assert!(
        human.contains("post_with_comments_counts")
            && human.contains("will run (no instance active)"),
        "{human}"
    );
    assert!(!human.contains("  running  "), "{human}");
    assert!(human.contains("retired_mailer (not in config)"), "{human}");
    assert!(human.contains("holds nothing back"), "{human}");
    assert!(
        human.contains(&format!(
            "DELETE FROM streamex.operator_state WHERE slot = '{slot}' AND operator = 'retired_mailer'"
        )),
        "{human}"
    );
    assert!(
        !human.contains("streamex resume retired_mailer"),
        "resume refuses an operator the configuration lacks: {human}"
    );
    Ok(())
}

#[tokio::test]
async fn status_and_resume_work_when_an_operator_s_settings_are_what_is_broken()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &url, "")?;
    common::setup_service(&config)?;
    let slot = slot_for(&url);
    streamex::status::set_operator_halted(
        &pool,
        &slot,
        "post_comment_tallies",
        "disk full",
        Lsn(0x42),
        0,
        6,
    )
    .await?;
    // Now an operator's settings are wrong: run and setup refuse the configuration...
    let mut text_of_config = std::fs::read_to_string(&config)?;
    text_of_config.push_str(
        "\n[[operators]]\nname = \"count_events\"\nsettings = { entities = \"posts\" }\n",
    );
    std::fs::write(&config, text_of_config)?;
    let out = streamex(&["setup"], &config)?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("count_events"), "{}", text(&out));

    // ...but the commands for finding out what is wrong still answer.
    let out = streamex(&["status", "--json"], &config)?;
    assert!(out.status.success(), "status failed: {}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        operator(&report, "post_comment_tallies")["state"],
        "halted",
        "{report:#}"
    );
    let out = streamex(&["resume", "post_comment_tallies"], &config)?;
    assert!(out.status.success(), "resume failed: {}", text(&out));
    let states = streamex::status::load_operator_states(&pool, &slot).await?;
    assert_eq!(
        states["post_comment_tallies"].state,
        streamex::status::OperatorRunState::Running
    );
    Ok(())
}

/// A declarative operator whose statement fails on every event, with three retries: the
/// error is logged in full when it first fails and again when the operator halts, not on
/// every retry.
#[tokio::test]
async fn a_failing_statement_is_logged_once_then_at_the_halt() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("streamex.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\"]\n\n\
             [[operators]]\nname = \"broken\"\n\
             query = \"UPDATE posts SET title = title || (1 / (id - id))::text WHERE id = $1\"\n\
             id = {{ posts = \"id\" }}\nbackfill = false\n\
             [operators.retry]\ninitial = \"10ms\"\nmax = \"20ms\"\nretries = 3\n\
             on_failure = \"halt\"\n",
            slot_for(&url)
        ),
    )?;
    common::setup_service(&config)?;
    sqlx::query("INSERT INTO posts (title) VALUES ('p')")
        .execute(&pool)
        .await?;
    let log = dir.path().join("run.log");
    let mut run = common::spawn_service(&config, &log, "info")?;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let halted = loop {
        let halted: Option<(Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT last_error, attempts FROM streamex.operator_state
              WHERE operator = 'broken' AND state = 'halted'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap_or(None);
        if let Some(halted) = halted {
            break halted;
        }
        if std::time::Instant::now() > deadline {
            break (None, None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
    unsafe { libc::kill(libc::pid_t::try_from(run.id())?, libc::SIGTERM) };
    run.wait()?;
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        halted
            .0
            .as_deref()
            .is_some_and(|e| e.contains("division by zero")),
        "never halted: {halted:?}\n{logged}"
    );
    assert_eq!(halted.1, Some(4), "{logged}");
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("division by zero"))
        .collect();
    assert_eq!(lines.len(), 2, "{logged}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("operator failed; retrying"),
        "{logged}"
    );
    assert!(
        lines[1].contains("ERROR") && lines[1].contains("operator halted"),
        "{logged}"
    );
    // The statement that failed is named.
    assert!(lines[0].contains("running query"), "{logged}");
    Ok(())
}
