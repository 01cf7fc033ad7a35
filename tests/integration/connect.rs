//! The replication connection's lower layer against real private clusters: transports,
//! startup, authentication, TLS modes, errors, simple queries and CopyBoth.

use std::time::Duration;

use sqlx::Connection as _;
use streamex::replication::{
    self, ConnectOptions, ConnectParams, Connection, CopyMessage, ReplicationError,
};
use streamex::testing::{self, Cluster};

use crate::common;

use common::{Ca, encoded, tls_cluster};

/// Parses a URL without looking at `$PGPASSWORD`/`$PGUSER`, so the environment cannot change
/// what the tests see.
fn params(url: &str) -> ConnectParams {
    ConnectParams::parse_with_env(url, |_| None).expect("valid url")
}

fn replication() -> ConnectOptions {
    ConnectOptions::replication()
}

/// `postgres://user[:password]@127.0.0.1:port/db?extra`.
fn url_for(port: u16, user: &str, password: Option<&str>, db: &str, extra: &str) -> String {
    let auth = match password {
        Some(p) => format!("{user}:{p}"),
        None => user.to_owned(),
    };
    let query = if extra.is_empty() {
        String::new()
    } else {
        format!("?{extra}")
    };
    format!("postgres://{auth}@127.0.0.1:{port}/{db}{query}")
}

async fn admin(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    Ok(sqlx::PgConnection::connect(url).await?)
}

#[tokio::test]
async fn trust_over_tcp_identifies_the_system() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let dbname = url.rsplit('/').next().unwrap().to_owned();
    let p = params(&url);
    let mut conn = Connection::connect(&p, &replication()).await?;
    assert!(conn.backend_pid() > 0);
    assert!(conn.server_parameter("server_version").is_some());
    assert_eq!(conn.server_parameter("client_encoding"), Some("UTF8"));
    assert!(!conn.is_tls());

    // IDENTIFY_SYSTEM only works when replication=database really reached the server.
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(
        row.get("systemid")
            .is_some_and(|s| s.parse::<u64>().is_ok())
    );
    assert_eq!(row.get("timeline"), Some("1"));
    assert!(row.get("xlogpos").is_some_and(|s| s.contains('/')));
    assert_eq!(row.get("dbname"), Some(dbname.as_str()));

    // A failed statement leaves the connection usable.
    let e = conn
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("42P01"));
    assert!(!e.is_transient());
    let rows = conn
        .simple_query("SELECT 1 AS one, NULL AS nothing")
        .await?;
    assert_eq!(rows[0].get("one"), Some("1"));
    assert_eq!(rows[0].get("nothing"), None);
    assert_eq!(rows[0].columns(), ["one", "nothing"]);
    conn.close().await;
    Ok(())
}

#[tokio::test]
async fn trust_over_the_unix_socket() -> anyhow::Result<()> {
    let Some(cluster) = testing::server().cluster() else {
        return Ok(()); // an external server: no socket directory known
    };
    let dir = cluster.socket_dir().display().to_string();
    let encoded = percent_encoding::utf8_percent_encode(&dir, percent_encoding::NON_ALPHANUMERIC);
    for url in [
        format!("postgres://postgres@{encoded}:{}/postgres", cluster.port()),
        format!(
            // Unix sockets never use TLS, whatever sslmode says (as libpq).
            "postgres://postgres@/postgres?host={encoded}&port={}&sslmode=require",
            cluster.port()
        ),
    ] {
        let p = params(&url);
        let mut conn = Connection::connect(&p, &replication()).await?;
        assert!(!conn.is_tls());
        let rows = conn
            .simple_query("SELECT client_addr IS NULL AS local FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            .await?;
        assert_eq!(rows[0].get("local"), Some("t"));
        let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
        assert_eq!(rows.len(), 1);
        conn.close().await;
        // The pool too.
        let pool = replication::catalog_pool(&p, 1).await?;
        let local: bool = sqlx::query_scalar(
            "SELECT client_addr IS NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await?;
        assert!(local, "{url}");
        pool.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn startup_settings_are_applied() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let options = ConnectOptions {
        replication: false,
        settings: vec![
            ("DateStyle".to_owned(), "ISO".to_owned()),
            ("TimeZone".to_owned(), "UTC".to_owned()),
        ],
    };
    let mut conn = Connection::connect(
        &params(&format!("{url}?application_name=streamex-test")),
        &options,
    )
    .await?;
    let rows = conn.simple_query("SHOW DateStyle").await?;
    assert!(rows[0].get("DateStyle").unwrap().starts_with("ISO, "));
    let rows = conn.simple_query("SHOW TimeZone").await?;
    assert_eq!(rows[0].get("TimeZone"), Some("UTC"));
    assert_eq!(conn.server_parameter("TimeZone"), Some("UTC"));
    assert_eq!(
        conn.server_parameter("application_name"),
        Some("streamex-test")
    );
    // The last result set of several statements.
    let rows = conn
        .simple_query("SELECT 1 AS a; SELECT 2 AS b, 3 AS c")
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get("c"), Some("3"));
    conn.close().await;
    Ok(())
}

/// One cluster, one pg_hba.conf line per method.
#[tokio::test]
async fn password_authentication_methods() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .setting("password_encryption", "scram-sha-256")
        .hba(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all clear_user 127.0.0.1/32 password\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all scram_user 127.0.0.1/32 scram-sha-256\n",
        )
        .start()?;
    let mut admin = admin(&cluster.url("postgres")).await?;
    for statement in [
        "CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear pw'",
        "SET password_encryption = md5",
        "CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-pw'",
        "RESET password_encryption",
        "CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'sçram pw'",
    ] {
        sqlx::raw_sql(statement).execute(&mut admin).await?;
    }
    let stored: String =
        sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'")
            .fetch_one(&mut admin)
            .await?;
    assert!(
        stored.starts_with("md5"),
        "md5_user's password is stored as {stored}"
    );

    let port = cluster.port();
    for (user, password) in [
        ("clear_user", "clear%20pw"),
        ("md5_user", "md5-pw"),
        ("scram_user", "s%C3%A7ram%20pw"),
    ] {
        let p = params(&url_for(port, user, Some(password), "postgres", ""));
        let mut conn = Connection::connect(&p, &replication()).await?;
        let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
        assert_eq!(rows.len(), 1, "{user}");
        conn.close().await;

        let wrong = "Wr0ngPassw0rd";
        let p = params(&url_for(port, user, Some(wrong), "postgres", ""));
        let e = Connection::connect(&p, &replication()).await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{user}: {e}");
        assert!(!e.is_transient(), "{user}: {e}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "authentication failed for user \"{user}\": check the password in the database url"
            )),
            "{text}"
        );
        assert!(
            !text.contains(wrong) && !format!("{e:?}").contains(wrong),
            "{text}"
        );

        // No password at all: a clear error before anything is sent.
        let p = params(&url_for(port, user, None, "postgres", ""));
        let e = Connection::connect(&p, &replication()).await.unwrap_err();
        assert!(matches!(e, ReplicationError::Auth(_)), "{user}: {e:?}");
        assert!(e.to_string().contains("password"), "{e}");
        assert!(!e.is_transient());
    }

    // No pg_hba.conf line for this user.
    sqlx::raw_sql("CREATE ROLE nobody LOGIN")
        .execute(&mut admin)
        .await?;
    let e = Connection::connect(
        &params(&url_for(port, "nobody", None, "postgres", "")),
        &replication(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28000"), "{e}");
    assert!(e.to_string().contains("pg_hba.conf"), "{e}");
    assert!(!e.is_transient());
    Ok(())
}

#[tokio::test]
async fn definite_errors_for_privileges_and_missing_databases() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut admin = admin(&url).await?;
    sqlx::raw_sql(
        "DO $$ BEGIN CREATE ROLE streamex_no_repl LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .execute(&mut admin)
    .await?;
    let mut p = params(&url);
    p.user = "streamex_no_repl".to_owned();
    let e = Connection::connect(&p, &replication()).await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("42501"), "{e}");
    assert!(!e.is_transient());
    assert!(
        e.to_string().starts_with(
            "role \"streamex_no_repl\" lacks the REPLICATION attribute: ALTER ROLE \"streamex_no_repl\" REPLICATION"
        ),
        "{e}"
    );
    // The same role may connect without replication.
    Connection::connect(&p, &ConnectOptions::default())
        .await?
        .close()
        .await;

    let mut p = params(&url);
    p.dbname = "streamex_no_such_db".to_owned();
    let e = Connection::connect(&p, &replication()).await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("3D000"), "{e}");
    assert!(!e.is_transient());
    assert!(
        e.to_string()
            .contains("\"streamex_no_such_db\" does not exist"),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn refused_port_is_transient() -> anyhow::Result<()> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let e = Connection::connect(
        &params(&url_for(port, "postgres", None, "postgres", "")),
        &replication(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ReplicationError::Connect { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    Ok(())
}

#[tokio::test]
async fn silent_server_times_out() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let holder = tokio::spawn(async move {
        let accepted = listener.accept().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(accepted);
    });
    let started = std::time::Instant::now();
    let e = Connection::connect(
        &params(&url_for(
            port,
            "postgres",
            None,
            "postgres",
            "connect_timeout=1&sslmode=disable",
        )),
        &replication(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ReplicationError::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(e.to_string().contains("connect_timeout"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(4));
    holder.abort();
    Ok(())
}

#[tokio::test]
async fn copy_both_round_trip() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let mut sql = admin(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text); CREATE PUBLICATION p FOR ALL TABLES",
    )
    .execute(&mut sql)
    .await?;

    let mut conn = Connection::connect(&params(&url), &replication()).await?;
    let slot = format!("s_{}", std::process::id());
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput"
        ))
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get("slot_name"), Some(slot.as_str()));
    assert_eq!(rows[0].get("output_plugin"), Some("pgoutput"));
    let (mut reader, mut writer) = conn
        .start_copy_both(&format!(
            "START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names 'p')"
        ))
        .await?;

    sqlx::query("INSERT INTO items VALUES (1, 'one')")
        .execute(&mut sql)
        .await?;

    let mut saw_insert = false;
    let mut last_end = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !saw_insert {
        let message = tokio::time::timeout_at(deadline, reader.next()).await??;
        let CopyMessage::Data(data) = message else {
            panic!("copy ended early");
        };
        match data[0] {
            b'w' => {
                assert!(data.len() > 25);
                last_end = u64::from_be_bytes(data[9..17].try_into()?);
                // pgoutput: 'B' begin, 'R' relation, 'I' insert, 'C' commit.
                if data[25] == b'I' {
                    saw_insert = true;
                }
            }
            b'k' => {
                assert_eq!(data.len(), 18);
                last_end = last_end.max(u64::from_be_bytes(data[1..9].try_into()?));
            }
            other => panic!("unexpected copy data {other:#04x}"),
        }
    }

    // A standby status update goes out while the reader half stays with us.
    let mut update = vec![b'r'];
    for _ in 0..3 {
        update.extend_from_slice(&last_end.to_be_bytes());
    }
    update.extend_from_slice(&0i64.to_be_bytes());
    update.push(0);
    writer.send(&update).await?;

    // Ending the copy from our side: the server answers with CopyDone.
    writer.done().await?;
    loop {
        match tokio::time::timeout_at(deadline, reader.next()).await?? {
            CopyMessage::Done => break,
            CopyMessage::Data(_) => {}
        }
    }
    // Then CommandComplete and ReadyForQuery, after which nothing is read any more.
    for _ in 0..3 {
        let message = tokio::time::timeout_at(deadline, reader.next()).await??;
        assert_eq!(message, CopyMessage::Done);
    }
    Ok(())
}
async fn ssl_in_use(conn: &mut Connection) -> anyhow::Result<String> {
    let rows = conn
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await?;
    assert_eq!(rows.len(), 1);
    Ok(rows[0].get("ssl").expect("ssl column").to_owned())
}

#[tokio::test]
async fn tls_modes_against_a_certificate_for_localhost() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("streamex test ca")?;
    let other_ca = Ca::new("unrelated ca")?;
    let ca_file = encoded(&ca.write(&dir, "ca.pem")?);
    let other_ca_file = encoded(&other_ca.write(&dir, "other.pem")?);
    let cluster = tls_cluster(&ca, &["localhost", "127.0.0.1"])?;
    let port = cluster.port();

    // verify-full by IP address and by name, and the connection really is encrypted.
    for host in ["127.0.0.1", "localhost"] {
        let url = format!(
            "postgres://postgres@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={ca_file}"
        );
        let mut conn = Connection::connect(&params(&url), &replication()).await?;
        assert!(conn.is_tls());
        assert_eq!(ssl_in_use(&mut conn).await?, "t", "{host}");
        assert_eq!(conn.simple_query("IDENTIFY_SYSTEM").await?.len(), 1);
        conn.close().await;
    }

    // verify-full and verify-ca with an unrelated CA.
    for mode in ["verify-full", "verify-ca"] {
        let url = url_for(
            port,
            "postgres",
            None,
            "postgres",
            &format!("sslmode={mode}&sslrootcert={other_ca_file}"),
        );
        let e = Connection::connect(&params(&url), &replication())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReplicationError::TlsVerification { .. }),
            "{mode}: {e:?}"
        );
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("not signed by a trusted certificate authority"),
            "{text}"
        );
        assert!(text.contains(&format!("sslmode={mode}")), "{text}");
    }

    // verify-full without sslrootcert uses the webpki roots, which do not hold our CA.
    let home_root = std::env::var_os("HOME")
        .map(|h| std::path::Path::new(&h).join(".postgresql/root.crt"))
        .is_some_and(|p| p.exists());
    if !home_root {
        let url = url_for(port, "postgres", None, "postgres", "sslmode=verify-full");
        let e = Connection::connect(&params(&url), &replication())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReplicationError::TlsVerification { .. }),
            "{e:?}"
        );

        // require and prefer encrypt without verifying (no root certificate).
        for mode in ["require", "prefer"] {
            let url = url_for(
                port,
                "postgres",
                None,
                "postgres",
                &format!("sslmode={mode}"),
            );
            let mut conn = Connection::connect(&params(&url), &replication()).await?;
            assert!(conn.is_tls());
            assert_eq!(ssl_in_use(&mut conn).await?, "t", "{mode}");
            conn.close().await;
        }
    }

    // SCRAM over TLS: the server offers SCRAM-SHA-256-PLUS, and the channel binding to its
    // certificate must verify.
    let mut admin = admin(&cluster.url("postgres")).await?;
    sqlx::raw_sql("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'tls pw'")
        .execute(&mut admin)
        .await?;
    let scram_url = |password: &str| {
        format!(
            "postgres://scram_user:{password}@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={ca_file}"
        )
    };
    let mut conn = Connection::connect(&params(&scram_url("tls%20pw")), &replication()).await?;
    assert_eq!(ssl_in_use(&mut conn).await?, "t");
    conn.close().await;
    let e = Connection::connect(&params(&scram_url("nope")), &replication())
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28P01"), "{e}");

    // disable stays in plain against a server with ssl=on.
    let url = url_for(port, "postgres", None, "postgres", "sslmode=disable");
    let mut conn = Connection::connect(&params(&url), &replication()).await?;
    assert!(!conn.is_tls());
    assert_eq!(ssl_in_use(&mut conn).await?, "f");
    conn.close().await;
    Ok(())
}

#[tokio::test]
async fn verify_ca_ignores_only_the_host_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("streamex test ca")?;
    let ca_file = encoded(&ca.write(&dir, "ca.pem")?);
    let cluster = tls_cluster(&ca, &["db.other.example"])?;
    let port = cluster.port();

    for host in ["127.0.0.1", "localhost"] {
        let url = format!(
            "postgres://postgres@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={ca_file}"
        );
        let e = Connection::connect(&params(&url), &replication())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReplicationError::TlsVerification { .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());
        assert!(
            e.to_string().contains("not valid for this host name"),
            "{e}"
        );
    }

    let url = url_for(
        port,
        "postgres",
        None,
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={ca_file}"),
    );
    let mut conn = Connection::connect(&params(&url), &replication()).await?;
    assert!(conn.is_tls());
    assert_eq!(ssl_in_use(&mut conn).await?, "t");
    conn.close().await;
    Ok(())
}

/// The SQL pool (catalog look-ups, process status, operators, the instance lock) verifies the
/// server as the replication connection does: verify-ca checks the chain against sslrootcert
/// and not the name, verify-full checks both.
#[tokio::test]
async fn the_pool_verifies_the_server_as_libpq_does() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("streamex test ca")?;
    let other_ca = Ca::new("unrelated ca")?;
    let ca_file = encoded(&ca.write(&dir, "ca.pem")?);
    let other_ca_file = encoded(&other_ca.write(&dir, "other.pem")?);
    // Issued for the name only: connecting to 127.0.0.1 does not match it.
    let cluster = tls_cluster(&ca, &["localhost"])?;
    let port = cluster.port();
    let url = |host: &str, mode: &str, root: &str| {
        params(&format!(
            "postgres://postgres@{host}:{port}/postgres?sslmode={mode}&sslrootcert={root}"
        ))
    };
    async fn ssl_of(conn: impl sqlx::PgExecutor<'_>) -> anyhow::Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(conn)
                .await?,
        )
    }

    for (host, mode) in [
        ("127.0.0.1", "verify-ca"),
        ("localhost", "verify-ca"),
        ("localhost", "verify-full"),
    ] {
        let pool = replication::catalog_pool(&url(host, mode, &ca_file), 2).await?;
        // Two connections at once: the second is opened as the first is held.
        let mut first = pool.acquire().await?;
        let mut second = pool.acquire().await?;
        assert!(ssl_of(&mut *first).await?, "{host} {mode}");
        assert!(ssl_of(&mut *second).await?, "{host} {mode}");
        drop((first, second));
        // A connection of its own from the pool's options, as the instance lock opens it.
        let mut own = sqlx::PgConnection::connect_with(pool.connect_options().as_ref()).await?;
        assert!(ssl_of(&mut own).await?, "{host} {mode}");
        own.close().await?;
        // The relay goes with the pool.
        let socket = pool.connect_options().get_socket().cloned();
        assert!(socket.is_some(), "{host} {mode}: not through the relay");
        pool.close().await;
        drop(pool);
        // The relay goes when sqlx drops the pool's last part, which its background tasks
        // may still hold for a moment after the pool is closed.
        let socket = socket.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while socket.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !socket.exists(),
            "{host} {mode}: the relay outlived its pool"
        );
    }

    // SCRAM runs end to end between sqlx and the server, through the relay.
    let mut admin = admin(&cluster.url("postgres")).await?;
    sqlx::raw_sql("CREATE ROLE scram_user LOGIN PASSWORD 'tls pw'")
        .execute(&mut admin)
        .await?;
    let scram = |password: &str| {
        params(&format!(
            "postgres://scram_user:{password}@127.0.0.1:{port}/postgres?sslmode=verify-ca&sslrootcert={ca_file}"
        ))
    };
    let pool = replication::catalog_pool(&scram("tls%20pw"), 1).await?;
    assert!(ssl_of(&pool).await?);
    pool.close().await;
    let e = replication::catalog_connection(&scram("nope"))
        .await
        .unwrap_err();
    let code = e.as_database_error().and_then(|db| db.code());
    assert_eq!(code.as_deref(), Some("28P01"), "{e}");

    // Nothing listens: transient, and said at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let e = replication::catalog_connection(&params(&format!(
        "postgres://postgres@127.0.0.1:{closed}/postgres?sslmode=verify-ca&sslrootcert={ca_file}"
    )))
    .await
    .unwrap_err();
    assert!(streamex::error::is_transient_sqlx(&e), "{e:?}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{closed}")),
        "{e}"
    );

    // verify-full checks the name: the certificate is not for 127.0.0.1.
    let e = replication::catalog_pool(&url("127.0.0.1", "verify-full", &ca_file), 2)
        .await
        .unwrap_err();
    assert!(!streamex::error::is_transient_sqlx(&e), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("127.0.0.1") && text.contains("not valid for this host name"),
        "{text}"
    );

    // Both verify modes check the chain: a certificate from another CA is refused.
    for mode in ["verify-ca", "verify-full"] {
        let e = replication::catalog_pool(&url("localhost", mode, &other_ca_file), 2)
            .await
            .unwrap_err();
        assert!(!streamex::error::is_transient_sqlx(&e), "{mode}: {e:?}");
        let text = e.to_string();
        assert!(
            text.contains("not signed by a trusted certificate authority")
                && text.contains(&format!("sslmode={mode}")),
            "{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn server_without_tls() -> anyhow::Result<()> {
    let Some(cluster) = testing::server().cluster() else {
        return Ok(()); // an external server may have ssl on
    };
    let port = cluster.port();
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = url_for(
            port,
            "postgres",
            None,
            "postgres",
            &format!("sslmode={mode}"),
        );
        let e = Connection::connect(&params(&url), &replication())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReplicationError::TlsUnavailable { .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("does not support tls") && text.contains(&format!("sslmode={mode}")),
            "{text}"
        );
    }
    for mode in ["prefer", "allow"] {
        let url = url_for(
            port,
            "postgres",
            None,
            "postgres",
            &format!("sslmode={mode}"),
        );
        let mut conn = Connection::connect(&params(&url), &replication()).await?;
        assert!(!conn.is_tls());
        assert_eq!(ssl_in_use(&mut conn).await?, "f");
        conn.close().await;
    }
    Ok(())
}

/// In front of `target`: the first connection agrees to TLS and then sends bytes that are no
/// TLS handshake; every later one is passed through to the server as it is.
async fn broken_tls_proxy(target: u16) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                let mut request = [0u8; 8];
                if client.read_exact(&mut request).await.is_ok() {
                    let _ = client.write_all(b"SHTTP/1.1 400 Bad Request\r\n\r\n").await;
                }
                continue; // dropped: closed
            }
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Ok(port)
}

#[tokio::test]
async fn prefer_connects_without_tls_after_a_failed_handshake() -> anyhow::Result<()> {
    let Some(cluster) = testing::server().cluster() else {
        return Ok(()); // the fallback is checked against the private cluster, without tls
    };
    // require: the failed handshake is the answer.
    let proxy = broken_tls_proxy(cluster.port()).await?;
    let url = url_for(proxy, "postgres", None, "postgres", "sslmode=require");
    let e = Connection::connect(&params(&url), &replication())
        .await
        .unwrap_err();
    assert!(matches!(e, ReplicationError::Tls(_)), "{e:?}");
    // prefer: a second connection without tls, as libpq does.
    let proxy = broken_tls_proxy(cluster.port()).await?;
    let url = url_for(proxy, "postgres", None, "postgres", "sslmode=prefer");
    let mut conn = Connection::connect(&params(&url), &replication()).await?;
    assert!(!conn.is_tls());
    assert_eq!(ssl_in_use(&mut conn).await?, "f");
    conn.close().await;
    Ok(())
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// Several hosts, as libpq: the replication connection and the SQL pool skip a server that
/// does not answer and one that is not what `target_session_attrs` asks for, and when none
/// would do the error names each server and what it is.
#[tokio::test]
async fn several_hosts_take_the_first_server_that_would_do() -> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let dbname = url.rsplit('/').next().unwrap().to_owned();
    let port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("a port in the test url");
    let dead = closed_port();
    let both = |attrs: &str| {
        params(&format!(
            "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{port}/{dbname}?target_session_attrs={attrs}"
        ))
    };

    // The first host refuses: the second, a primary, is taken for read-write and primary.
    for attrs in ["any", "read-write", "primary", "prefer-standby"] {
        let p = both(attrs);
        let mut conn = Connection::connect(&p, &replication()).await?;
        let rows = conn
            .simple_query("SELECT pg_is_in_recovery()::text AS r")
            .await?;
        assert_eq!(rows[0].get("r"), Some("false"), "{attrs}");
        conn.close().await;
        // The pool reaches the same server through the relay.
        let pool = replication::catalog_pool(&p, 2).await?;
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await?;
        assert_eq!(db, dbname, "{attrs}");
        pool.close().await;
    }

    // No standby among them: a definite answer for each, and a transient error (a standby
    // may be on its way).
    let p = both("standby");
    let error = Connection::connect(&p, &replication()).await.unwrap_err();
    let text = error.to_string();
    assert!(error.is_transient(), "{text}");
    assert!(
        text.contains("target_session_attrs")
            && text.contains(&format!("127.0.0.1:{dead}: could not connect"))
            && text.contains(&format!("127.0.0.1:{port} is a primary")),
        "{text}"
    );
    let pool_error = replication::catalog_pool(&p, 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        pool_error.contains(&format!("127.0.0.1:{port} is a primary")),
        "{pool_error}"
    );

    // A wrong password on the only server that answers is said as such, not as "no server".
    let wrong = params(&format!(
        "postgres://nosuchrole@127.0.0.1:{dead},127.0.0.1:{port}/{dbname}?target_session_attrs=read-write"
    ));
    let error = Connection::connect(&wrong, &replication())
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("nosuchrole"), "{error}");
    Ok(())
}
