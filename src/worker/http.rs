//! A worker's HTTP endpoint, when its configuration has `[http] listen`: `/healthz` (the
//! process answers), `/readyz` (NATS connected and the database answering) and `/metrics`
//! ([`super::metrics`]), behind the same Host and token checks as `streamex run`'s (`[http]`
//! `allowed_hosts`, `token`, `metrics_auth`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::WorkerMetrics;
use crate::config::HttpConfig;

/// What the endpoint serves from.
pub(super) struct WorkerEndpoint {
    pub metrics: Arc<WorkerMetrics>,
    pub pool: sqlx::PgPool,
    pub client: async_nats::Client,
    /// `nats.url`, for the reason `/readyz` gives.
    pub nats_url: String,
}

/// Binds `[http] listen` and serves `endpoint` until `shutdown`; `None` without `listen`.
/// The error names the setting.
pub(super) async fn serve(
    config: &HttpConfig,
    endpoint: WorkerEndpoint,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(address) = config.listen else {
        return Ok(None);
    };
    let guard = crate::http::Guard::new(config).map_err(anyhow::Error::msg)?;
    let listener = crate::http::bind(address).await?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|uri: axum::http::Uri| async move {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "error": format!(
                    "no endpoint {}: a worker serves /healthz, /readyz and /metrics",
                    uri.path()
                ) })),
            )
        })
        .with_state(Arc::new(endpoint))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            crate::http::guarded,
        ));
    Ok(Some(tokio::spawn(async move {
        info!(%address, "worker http endpoint listening");
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            warn!(error = %error, "worker http endpoint failed");
        }
    })))
}

async fn readyz(State(endpoint): State<Arc<WorkerEndpoint>>) -> Response {
    use async_nats::connection::State as Connection;
    let reason = if endpoint.client.connection_state() != Connection::Connected {
        Some(format!(
            "not connected to NATS at {} (nats.url)",
            endpoint.nats_url
        ))
    } else {
        let answered = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&endpoint.pool),
        )
        .await;
        match answered {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the database does not answer (database_url): {e}")),
            Err(_) => Some("the database does not answer within 2 s (database_url)".to_owned()),
        }
    };
    match reason {
        None => (StatusCode::OK, axum::Json(json!({ "ready": true }))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn metrics(State(endpoint): State<Arc<WorkerEndpoint>>) -> Response {
    use async_nats::connection::State as Connection;
    endpoint
        .metrics
        .nats_connected(endpoint.client.connection_state() == Connection::Connected);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoint.metrics.render(),
    )
        .into_response()
}
