//! blog-app's operators inside a program of one's own, without the command line: the service
//! built with `Service::builder()`, its HTTP routes merged into the program's own axum app, and
//! a task of the program's following the `comments` channel.
//!
//! ```sh
//! cargo run -p blog-app --example embedded -- examples/blog-app/config.toml 127.0.0.1:3000
//! curl http://127.0.0.1:3000/            # the program's own route
//! curl http://127.0.0.1:3000/healthz     # streamex's routes, merged in
//! curl -N http://127.0.0.1:3000/channels/comments
//! ```
//!
//! Ctrl-C stops it: the service finishes what is in flight, stores progress and
//! acknowledges; the HTTP server stops once its event streams have ended.

use anyhow::Context as _;
use streamex::Service;
use streamex::config::Config;
use streamex::pubsub::RecvError;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    streamex::cli::init_logging(streamex::cli::LogFormat::Human);
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "config.toml".to_owned());
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    let config = Config::load(path.as_ref())?;
    // Connects, migrates, sets up the publication and the slot, and checks every operator
    // the configuration names (post_titles' table must exist).
    let service = Service::builder()
        .config(config)
        .registry(blog_app::registry())
        .build()
        .await?;
    let handle = service.handle();

    // The program's own listener: told of each comment once it is committed. A listener that
    // falls 256 events behind is cut off (never silently skipped) and must subscribe again.
    let mut comments = handle.pubsub().subscribe("comments", 256);
    tokio::spawn(async move {
        loop {
            match comments.recv().await {
                Ok(event) => {
                    let post_id: Option<i64> = event.get("post_id").ok();
                    tracing::info!(kind = event.kind.as_str(), post_id, position = %event.position(), "comment");
                }
                Err(error @ RecvError::Lagged { .. }) => {
                    tracing::warn!(error = %error, "comments listener cut off");
                    break;
                }
                Err(_) => break,
            }
        }
    });

    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "blog-app\n" }))
        .merge(handle.router()?);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(address = %listen, "serving HTTP");

    // Signals are handled here, in main; the service and the server are told to stop.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let result = service.run(shutdown.clone().cancelled_owned()).await;
    // Also when the service stopped on its own, with an error: the server goes with it.
    shutdown.cancel();
    server.await?.context("serving HTTP")?;
    Ok(result?)
}
