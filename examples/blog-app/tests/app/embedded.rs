//! The application's operators embedded with `Service::builder()`, as
//! `examples/embedded.rs` does: the routes merged into the program's own axum app, and a
//! subscription of the program's own.

use std::time::Duration;

use sqlx::PgPool;
use streamex::Service;
use streamex::config::Config;
use streamex::testing;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{CONFIG, SCHEMA, TITLES};

/// A guard against hanging, not a measure of speed.
const PATIENCE: Duration = Duration::from_secs(60);

/// `GET path` on `address`, answered with the status line and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

#[tokio::test]
async fn the_builder_runs_the_apps_operators_beside_the_programs_routes_and_listeners()
-> anyhow::Result<()> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let mut config = Config::parse(CONFIG, "config.toml", [])?;
    config.database_url = url.clone();
    config.slot = url.rsplit('/').next().unwrap_or("blog_app").to_owned();

    let service = Service::builder()
        .config(config)
        .registry(blog_app::registry())
        .build()
        .await?;
    let handle = service.handle();
    // The comments of post 1 (config.toml scopes comments to their post).
    let mut comments = handle.pubsub().subscribe("posts/1/comments", 16);
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "blog-app\n" }))
        .merge(handle.router()?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let running = tokio::spawn(service.run(shutdown.clone().cancelled_owned()));

    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'one'), (2, 'two');
         INSERT INTO comments (post_id, body) VALUES (2, 'elsewhere');
         INSERT INTO comments (post_id, body) VALUES (1, 'hello');",
    )
    .execute(&pool)
    .await?;
    let event = tokio::time::timeout(PATIENCE, comments.recv()).await??;
    assert_eq!(event.get::<String>("body")?, "hello");

    // The program's own route and streamex's, on one server.
    let (status, body) = get(address, "/").await?;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, "blog-app\n");
    let (status, _) = get(address, "/healthz").await?;
    assert!(status.contains(" 200 "), "{status}");

    // post_titles, the application's operator, runs in the embedded service too.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(TITLES).fetch_all(&pool).await?;
        if rows == [(1, "one".to_owned()), (2, "two".to_owned())] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "post_titles: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    shutdown.cancel();
    running.await??;
    server.await??;
    Ok(())
}
