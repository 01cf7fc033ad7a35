//! Who may ask what: the `Host` check, then the bearer token, before any route runs.
//!
//! ```text
//!  request ──► /healthz, /readyz ───────────────────────────────────────► the probe
//!     │
//!     ▼
//!  Host in [http] allowed_hosts? ── no ──► 421 {"error": ".. [http] allowed_hosts .."}
//!     │ yes
//!     ▼
//!  token set, and the path is not /metrics (or metrics_auth)?
//!     │ yes: `Authorization: Bearer T`, or `?access_token=T` on /channels only
//!     │      T is the [http] token? ── no ──► 401 WWW-Authenticate: Bearer
//!     ▼
//!  the route
//! ```
//!
//! # Why the `Host` check
//!
//! A page on any site can have its own name resolve to 127.0.0.1 a moment after it loaded
//! (DNS rebinding); its scripts then reach this endpoint as if it were their own origin, and
//! read `/channels/...`, which carry row data. The browser still sends the page's name as
//! `Host`, so answering only the names this endpoint is known by defeats it. By default a
//! loopback `listen` answers only `localhost`, `127.0.0.1` and `[::1]`; another address
//! answers any name unless `allowed_hosts` is set (it is reached from other machines, under
//! names only its operator knows).
//!
//! The probes are exempt from both checks: they say nothing about rows, and a load balancer or
//! an orchestrator probes with an address as `Host` and no token.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq as _;

use super::Endpoint;
use crate::config::{HttpConfig, Secret};

/// The names a loopback `listen` answers to when `allowed_hosts` is not set.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The checks of the [module documentation](self), as `[http]` sets them.
#[derive(Debug)]
pub(crate) struct Guard {
    /// The host names accepted (lower case, IPv6 addresses without brackets); `None`: any.
    hosts: Option<Vec<String>>,
    /// Whether `hosts` is the loopback default rather than `allowed_hosts`.
    loopback_default: bool,
    token: Option<Secret>,
    metrics_auth: bool,
}

impl Guard {
    /// The checks `config` asks for; reads the token file. The error names the key.
    pub(crate) fn new(config: &HttpConfig) -> Result<Guard, String> {
        let loopback = config.listen.is_some_and(|a| a.ip().is_loopback());
        let (hosts, loopback_default) = match &config.allowed_hosts {
            Some(list) if list.iter().any(|h| h == "*") => (None, false),
            Some(list) => (Some(list.iter().map(|h| bare(h)).collect()), false),
            None if loopback => (Some(LOOPBACK_NAMES.map(str::to_owned).to_vec()), true),
            None => (None, false),
        };
        Ok(Guard {
            hosts,
            loopback_default,
            token: config.bearer_token()?,
            metrics_auth: config.metrics_auth,
        })
    }

    /// The answer to `request` if it may not reach its route.
    fn refusal(&self, request: &Request) -> Option<Response> {
        let path = request.uri().path();
        if path == "/healthz" || path == "/readyz" {
            return None;
        }
        if let Some(refused) = self.host_refusal(request) {
            return Some(refused);
        }
        let token = self.token.as_ref()?;
        if path == "/metrics" && !self.metrics_auth {
            return None;
        }
        // An `EventSource` cannot send headers, so a page passes the token in its URL.
        let channels = path.starts_with("/channels/");
        match presented_token(request, channels) {
            Some(presented) if same_token(&presented, token) => None,
            Some(_) => Some(unauthorized(
                "Bearer realm=\"streamex\", error=\"invalid_token\"",
                "the bearer token is not the [http] token".to_owned(),
            )),
            None => Some(unauthorized(
                "Bearer realm=\"streamex\"",
                format!(
                    "this endpoint needs the [http] token: send `Authorization: Bearer <token>`{}",
                    if channels {
                        ", or add ?access_token=<token> to the URL (for an EventSource)"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    fn host_refusal(&self, request: &Request) -> Option<Response> {
        let allowed = self.hosts.as_ref()?;
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        if host
            .and_then(host_name)
            .is_some_and(|name| allowed.contains(&name))
        {
            return None;
        }
        let default = if self.loopback_default {
            " (not set: [http] listen is a loopback address, so only localhost, 127.0.0.1 and \
             [::1] are answered)"
        } else {
            ""
        };
        let message = match host {
            Some(host) => format!(
                "the Host {host:?} is not in [http] allowed_hosts{default}: add the name clients \
                 use to reach this endpoint"
            ),
            None => format!(
                "a request without a Host header is refused by [http] allowed_hosts{default}"
            ),
        };
        Some(
            (
                StatusCode::MISDIRECTED_REQUEST,
                axum::Json(json!({ "error": message })),
            )
                .into_response(),
        )
    }
}

/// Runs the [`Guard`] before the routes.
pub(super) async fn check<S>(
    State(endpoint): State<Arc<Endpoint<S>>>,
    request: Request,
    next: Next,
) -> Response {
    match endpoint.settings.guard.refusal(&request) {
        None => next.run(request).await,
        Some(mut refused) => {
            // So that a page of the allowed origin can read why.
            let path = request.uri().path();
            if path.starts_with("/channels/") || path.starts_with("/process-status/") {
                super::allow_origin(&endpoint, &mut refused);
            }
            refused
        }
    }
}

/// Runs a [`Guard`] of its own before the routes (a worker's endpoint).
pub(crate) async fn guarded(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    match guard.refusal(&request) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

fn unauthorized(challenge: &'static str, message: String) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )],
        axum::Json(json!({ "error": message })),
    )
        .into_response()
}

/// The token `request` presents: its `Authorization: Bearer` header, or with `in_query` its
/// `access_token` query parameter. A header of another scheme presents an empty token, so it
/// is answered "wrong", not "missing".
fn presented_token(request: &Request, in_query: bool) -> Option<Cow<'_, str>> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or_default();
        return Some(match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Cow::Borrowed(token.trim())
            }
            _ => Cow::Borrowed(""),
        });
    }
    if !in_query {
        return None;
    }
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "access_token")
        .map(|(_, token)| token)
}

/// Whether `presented` is `token`, compared in constant time (`subtle`): how long the
/// comparison takes does not depend on where the two differ, so a token cannot be found out
/// byte by byte from response times. Only a difference in length shows, and the length of a
/// long random token is not worth keeping secret.
fn same_token(presented: &str, token: &Secret) -> bool {
    presented.as_bytes().ct_eq(token.expose().as_bytes()).into()
}

/// A host name as `allowed_hosts` lists it, for comparison: lower case, an IPv6 address
/// without its brackets.
fn bare(name: &str) -> String {
    name.strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The host name of a `Host` value (`example.com:9187`, `[::1]:9187`, `localhost`), as
/// [`bare`] writes it; `None` if the value is not of that form.
fn host_name(value: &str) -> Option<String> {
    let (name, rest) = match value.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']')?,
        None => value.split_at(value.find(':').unwrap_or(value.len())),
    };
    let port_ok = rest.is_empty()
        || rest
            .strip_prefix(':')
            .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    (port_ok && !name.is_empty()).then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_give_their_name_without_the_port() {
        for (value, name) in [
            ("localhost", Some("localhost")),
            ("LocalHost:9187", Some("localhost")),
            ("127.0.0.1:80", Some("127.0.0.1")),
            ("[::1]:9187", Some("::1")),
            ("[::1]", Some("::1")),
            ("app.example.com", Some("app.example.com")),
            ("evil.example:", None),
            ("evil.example:80:80", None),
            ("[::1", None),
            ("[::1]x", None),
            (":9187", None),
            ("", None),
        ] {
            assert_eq!(host_name(value).as_deref(), name, "{value:?}");
        }
        assert_eq!(bare("[::1]"), "::1");
        assert_eq!(bare("App.Example.com"), "app.example.com");
    }

    #[test]
    fn tokens_compare_whole() {
        let token = Secret::new("s3cret");
        assert!(same_token("s3cret", &token));
        for other in ["", "s3cre", "s3cret!", "S3cret", "s3crex"] {
            assert!(!same_token(other, &token), "{other}");
        }
        assert_eq!(format!("{token:?}"), "Secret(redacted)");
    }
}
