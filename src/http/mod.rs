//! The optional HTTP endpoint (`[http] listen`): metrics, health, process status and the
//! pub/sub channels as Server-Sent Events.
//!
//! ```text
//!  GET /metrics                  Metrics::render(operator reports, pg_replication_slots row)
//!  GET /healthz                  200 while the process runs
//!  GET /readyz                   200 when active, streaming, and no operator halted; else 503
//!  GET /process-status/{entity}  ProcessStatusStorage::processed(entity, ?timestamp=): 200 / 425
//!  GET /channels/{*channel}      PubSub::subscribe_with_max_bytes(channel) ─► text/event-stream
//!                                (sse.rs); 503 beyond [http] max_clients
//!
//!  every route but the probes:   421 for a Host not allowed, 401 without the token (guard.rs)
//! ```
//!
//! The server is started by `run_service` when configured and stops with the service's
//! shutdown token; open event streams end on the same token, so they never hold shutdown up.
//! Every request but the probes passes `guard` first: the `Host` check against DNS
//! rebinding, then the bearer token when `[http] token` is set.
//!
//! # Slow clients
//!
//! An event stream is bounded three ways: `sse_capacity` events and `sse_max_bytes` bytes
//! queued per client (over either, it is cut off with a last `event: lagged`), and
//! `max_clients` streams at once (beyond, 503). The bytes of an event are serialised once and
//! shared by every client ([`crate::pubsub::Published`]), down to the socket writes, so a
//! thousand clients that stop reading hold one copy of a large row. Nothing `/metrics` and the
//! probes need (the catalog pool, the metrics, the operators' reports) is shared with the
//! streams or waits for them.
//!
//! A client keeps its place under `max_clients` as long as its stream is open, and a client
//! that stops reading keeps its stream open until it has taken what the server's write
//! buffer holds (a few hundred KiB, shared bytes), the `lagged` message included: the cap
//! counts such connections too, so they cannot pile up without bound.

mod guard;
pub(crate) use guard::{Guard, guarded};
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::HttpConfig;
use crate::event::micros_rfc3339;
use crate::metrics::{Metrics, Phase};
use crate::operator::{OperatorReport, OperatorStateKind};
use crate::pubsub::PubSub;
use crate::replication::setup;
use crate::status::ProcessStatusStorage;

/// The operators' progress as the engine reports it.
pub type Reporter = Arc<dyn Fn() -> Vec<OperatorReport> + Send + Sync>;

/// What the endpoint serves from.
pub struct Endpoint<S> {
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// The catalog pool, for the slot's figures at scrape time.
    pub pool: PgPool,
    pub slot: String,
    /// The publication, to answer 404 for an entity it does not publish.
    pub publication: String,
    /// The schema of unqualified entity names.
    pub default_schema: String,
    pub status: S,
    pub pubsub: PubSub,
    /// What `[http]` sets.
    pub settings: Settings,
    /// Ends the server and every open event stream.
    pub shutdown: CancellationToken,
}

/// What `[http]` sets, checked and resolved once at start-up (the token file read, the
/// allowed hosts decided).
#[derive(Debug)]
pub struct Settings {
    /// Queue of one Server-Sent Events client, in events and in bytes
    /// ([`PubSub::subscribe_with_max_bytes`]).
    sse_capacity: usize,
    sse_max_bytes: usize,
    keep_alive: Duration,
    /// `Access-Control-Allow-Origin` for `/channels` and `/process-status`.
    allow_origin: Option<HeaderValue>,
    guard: guard::Guard,
    /// One permit per event stream open at once, `max_clients` of them.
    clients: Arc<Semaphore>,
    max_clients: usize,
}

impl Settings {
    /// The settings of `config`; the error names the key.
    pub fn new(config: &HttpConfig) -> anyhow::Result<Settings> {
        let allow_origin = match &config.allow_origin {
            Some(origin) => Some(origin.parse().context("[http] allow_origin")?),
            None => None,
        };
        Ok(Settings {
            sse_capacity: config.sse_capacity,
            sse_max_bytes: config.sse_max_bytes,
            keep_alive: config.keep_alive,
            allow_origin,
            guard: guard::Guard::new(config).map_err(anyhow::Error::msg)?,
            clients: Arc::new(Semaphore::new(
                config.max_clients.min(Semaphore::MAX_PERMITS),
            )),
            max_clients: config.max_clients,
        })
    }
}

/// How long a stopping server waits for its connections before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Binds the configured address; the error names the setting.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the HTTP endpoint to {addr} (the [http] listen setting, or \
             STREAMEX_HTTP__LISTEN): choose a free address and port, or leave [http] listen out"
        )
    })
}

/// Serves `endpoint` on `listener` until its shutdown token is cancelled.
pub fn spawn<S: ProcessStatusStorage + Clone>(
    listener: TcpListener,
    endpoint: Endpoint<S>,
) -> JoinHandle<()> {
    let shutdown = endpoint.shutdown.clone();
    let address = listener.local_addr().ok();
    let app = router(endpoint);
    tokio::spawn(async move {
        if let Some(address) = address {
            info!(%address, "http endpoint listening");
        }
        let stopped = shutdown.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned());
        let mut server = std::pin::pin!(server.into_future());
        let result = tokio::select! {
            result = &mut server => result,
            // Connections still open a while after shutdown (a client that never reads) are
            // not waited for longer.
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(STOP_GRACE).await;
            } => Ok(()),
        };
        if let Err(error) = result {
            warn!(error = %error, "http endpoint failed");
        }
    })
}

/// The routes, for [`spawn`] and for merging into a user's own router: no fallback of
/// their own (axum merges two routers only when at most one has a fallback), the Host and
/// token guard on every route.
pub fn routes<S: ProcessStatusStorage + Clone>(endpoint: Endpoint<S>) -> Router {
    let endpoint = Arc::new(endpoint);
    endpoints::<S>()
        .layer(axum::middleware::from_fn_with_state(
            endpoint.clone(),
            guard::check::<S>,
        ))
        .with_state(endpoint)
}

/// The stock endpoint: [`routes`] and a short JSON 404 for any other path, behind the same
/// Host and token guard (an unknown Host is refused before a path is looked at).
pub fn router<S: ProcessStatusStorage + Clone>(endpoint: Endpoint<S>) -> Router {
    let endpoint = Arc::new(endpoint);
    endpoints::<S>()
        .fallback(|uri: axum::http::Uri| async move {
            not_found(format!(
                "no endpoint {}: the endpoints are /healthz, /readyz, /metrics, \
                 /process-status/{{entity}} and /channels/{{channel}}",
                uri.path()
            ))
        })
        .layer(axum::middleware::from_fn_with_state(
            endpoint.clone(),
            guard::check::<S>,
        ))
        .with_state(endpoint)
}

fn endpoints<S: ProcessStatusStorage + Clone>() -> Router<Arc<Endpoint<S>>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/process-status/{entity}", get(process_status::<S>))
        .route("/channels/{*channel}", get(sse::channel::<S>))
}

type Shared<S> = State<Arc<Endpoint<S>>>;

/// Why the service is not ready, if it is not.
fn unready_reason<S>(endpoint: &Endpoint<S>) -> Option<String> {
    match endpoint.metrics.phase() {
        Phase::Starting => return Some("starting".to_owned()),
        Phase::Standby => {
            return Some(format!(
                "standby: waiting for the instance lock of slot {:?} (another instance is active)",
                endpoint.slot
            ));
        }
        Phase::Active => {}
    }
    if !endpoint.metrics.stream.is_streaming() {
        return Some("not streaming: the replication session is connecting".to_owned());
    }
    let halted: Vec<String> = (endpoint.reporter)()
        .into_iter()
        .filter(|r| r.state == OperatorStateKind::Halted)
        .map(|r| r.name)
        .collect();
    if !halted.is_empty() {
        return Some(format!(
            "operator halted: {} (see `streamex status`, then `streamex resume NAME`)",
            halted.join(", ")
        ));
    }
    None
}

async fn readyz<S>(State(endpoint): Shared<S>) -> Response {
    match unready_reason(&endpoint) {
        None => (StatusCode::OK, axum::Json(json!({ "ready": true }))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn metrics<S>(State(endpoint): Shared<S>) -> Response {
    let slot = match tokio::time::timeout(
        Duration::from_secs(5),
        setup::slot_info(&endpoint.pool, &endpoint.slot),
    )
    .await
    {
        Ok(Ok(slot)) => slot,
        Ok(Err(error)) => {
            warn!(error = %error, "metrics: reading the slot failed; its figures are left out");
            None
        }
        Err(_) => {
            warn!("metrics: reading the slot took over 5 s; its figures are left out");
            None
        }
    };
    let text = endpoint.metrics.render((endpoint.reporter)(), slot);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ProcessStatusQuery {
    timestamp: Option<String>,
}

async fn process_status<S: ProcessStatusStorage>(
    State(endpoint): Shared<S>,
    Path(entity): Path<String>,
    Query(query): Query<ProcessStatusQuery>,
) -> Response {
    let mut response = check_processed(&endpoint, entity, query).await;
    allow_origin(&endpoint, &mut response);
    response
}

/// Lets pages of the configured origin read `response` from a browser.
fn allow_origin<S>(endpoint: &Endpoint<S>, response: &mut Response) {
    if let Some(origin) = &endpoint.settings.allow_origin {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
}

/// A 404 with a JSON reason.
fn not_found(message: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": message })),
    )
        .into_response()
}

/// `entity` in its canonical form (`public.posts` is `posts`) when the publication publishes
/// it; otherwise the 404 to answer, naming it.
pub(super) async fn published_entity<S>(
    endpoint: &Endpoint<S>,
    entity: &str,
) -> Result<String, Response> {
    let unknown = || {
        not_found(format!(
            "no published table {entity:?}: publication {:?} does not publish it (an entity is \
             `table` for a table of {:?}, `schema.table` otherwise)",
            endpoint.publication, endpoint.default_schema
        ))
    };
    let Ok(name) = crate::event::EntityName::parse(entity) else {
        return Err(unknown());
    };
    let schema = name.schema_or(&endpoint.default_schema).to_owned();
    let published: Result<bool, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                         WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
    )
    .bind(&endpoint.publication)
    .bind(&schema)
    .bind(&name.table)
    .fetch_one(&endpoint.pool)
    .await;
    match published {
        Ok(true) => Ok(name.canonical(&endpoint.default_schema)),
        Ok(false) => Err(unknown()),
        Err(error) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": format!("reading the publication's tables: {error}") })),
        )
            .into_response()),
    }
}

async fn check_processed<S: ProcessStatusStorage>(
    endpoint: &Endpoint<S>,
    entity: String,
    query: ProcessStatusQuery,
) -> Response {
    let entity = match published_entity(endpoint, &entity).await {
        Ok(entity) => entity,
        Err(response) => return response,
    };
    let bad = |message: String| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": message })),
        )
            .into_response()
    };
    let Some(text) = query.timestamp else {
        return bad("missing ?timestamp=: give an RFC 3339 timestamp (2026-11-22T07:33:00.123456Z) or microseconds since the Unix epoch".to_owned());
    };
    let Some(timestamp) = parse_timestamp(&text) else {
        return bad(format!(
            "timestamp {text:?} is neither RFC 3339 (2026-11-22T07:33:00.123456Z or \
             2026-11-22T07:33:00.123456%2B00:00, with + written %2B in a URL) nor an integer \
             number of microseconds since the Unix epoch"
        ));
    };
    match endpoint.status.processed(&entity, timestamp).await {
        Ok(processed) => {
            let code = if processed {
                StatusCode::OK
            } else {
                StatusCode::TOO_EARLY
            };
            let body = json!({
                "entity": entity,
                "timestamp": micros_rfc3339::format(timestamp),
                "processed": processed,
            });
            (code, axum::Json(body)).into_response()
        }
        Err(error) => {
            warn!(error = %error, "process status check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "error": format!("reading the process status: {error}") })),
            )
                .into_response()
        }
    }
}

/// A process-status timestamp from a query string, in µs since the Unix epoch: an integer
/// (µs), RFC 3339, or PostgreSQL's text form (`2026-11-22 07:33:00.123456+00`). A `+` sent
/// unencoded arrives as a space, which is read back as `+`.
fn parse_timestamp(text: &str) -> Option<i64> {
    use chrono::DateTime;
    let text = text.trim();
    if let Ok(micros) = text.parse::<i64>() {
        return Some(micros);
    }
    let parse = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
            .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%#z"))
            .ok()
            .map(|t| t.timestamp_micros())
    };
    parse(text).or_else(|| {
        let space = text.rfind(' ')?;
        // Only a space after the time can be a decoded `+`.
        if space < 11 {
            return None;
        }
        parse(&format!("{}+{}", &text[..space], &text[space + 1..]))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_timestamp;

    #[test]
    fn timestamps_are_read_in_every_form_the_sql_side_accepts() {
        let micros = 1_704_164_645_123_456;
        for text in [
            "1704164645123456",
            "2024-01-02T03:04:05.123456Z",
            "2024-01-02T03:04:05.123456+00:00",
            "2024-01-02T05:04:05.123456+02:00",
            "2024-01-02 03:04:05.123456+00",
            "2024-01-02T03:04:05.123456 00:00", // + decoded as a space
            "2024-01-02 03:04:05.123456 00",
        ] {
            assert_eq!(parse_timestamp(text), Some(micros), "{text}");
        }
        for text in [
            "",
            "yesterday",
            "2024-01-02",
            "2024-13-02T03:04:05Z",
            "12.5",
        ] {
            assert_eq!(parse_timestamp(text), None, "{text}");
        }
    }
}
