//! The HTTP routes as a library user gets them (`ServiceHandle::router`), merged into an app
//! of their own, which has a fallback of its own: answers for things that do not exist.

use anyhow::Context as _;
use sqlx::PgPool;
use streamex::Service;
use streamex::config::Config;
use streamex::testing;

use crate::common;

use common::{BLOG, slot_for};

#[tokio::test]
async fn the_routes_merge_into_an_app_and_answer_404_for_what_does_not_exist() -> anyhow::Result<()>
{
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(BLOG).execute(&pool).await?;
    let mut config = Config::new(&url);
    config.slot = slot_for(&url);
    config.tables = vec!["posts".into(), "comments".into()];
    let service = Service::builder().config(config).build().await?;
    let routes = service.handle().router()?;
    // The app's own fallback: the routes have none, so the merge is allowed.
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hello" }))
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "the app's own 404") })
        .merge(routes);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let running = tokio::spawn(service.run(std::future::pending()));

    let client = crate::common::http_client().build()?;
    let get = |path: &str| {
        let request = client.get(format!("{base}{path}"));
        async move {
            let response = request.send().await.context("request")?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            anyhow::Ok((status, body))
        }
    };
    assert_eq!(get("/hello").await?, (200, "hello".to_owned()));
    assert_eq!(get("/healthz").await?.0, 200);

    let (status, body) = get("/process-status/nosuchtable?timestamp=0").await?;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("nosuchtable") && body.contains("publication"),
        "{body}"
    );
    let (status, body) = get("/channels/nosuchtable").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("nosuchtable"), "{body}");
    assert_eq!(
        get("/nowhere").await?,
        (404, "the app's own 404".to_owned())
    );

    // A published table answers, with or without its default schema.
    for entity in ["posts", "public.posts"] {
        let (status, body) = get(&format!("/process-status/{entity}?timestamp=0")).await?;
        assert!(status == 200 || status == 425, "{entity}: {status} {body}");
    }
    running.abort();
    server.abort();
    Ok(())
}
