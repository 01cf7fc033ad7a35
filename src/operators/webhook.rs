//! `webhook`: posts events as JSON to an HTTP endpoint, at least once and in WAL order.
//!
//! ```text
//! runner ──► Webhook::handle (one event) or handle_batch (up to batch_size) ──► POST url
//!               ◄── 2xx: delivered; the runner goes on, and the slot may move past it
//!               ◄── any other status, a time-out, no connection: an error ──► the retry policy
//! ```
//!
//! # The request
//!
//! `POST url`, the body being the event exactly as `streamex tail` prints it (the serde form
//! of [`Event`]); with a `batch_size` above 1, every body is a JSON array of 1 to
//! `batch_size` events in WAL order instead, so that a receiver always gets one shape. The
//! headers:
//!
//! | header | value |
//! | --- | --- |
//! | `Content-Type` | `application/json` |
//! | `Idempotency-Key` | the event's position, `0/16B3748#0` (commit LSN `#` ordinal); for several events, the first and last: `0/16B3748#0..0/16B39A0#2` |
//! | `X-Streamex-First-Position`, `X-Streamex-Last-Position` | the first and the last event's position (the same for one event) |
//! | `X-Streamex-Events` | how many events the body holds |
//! | `X-Streamex-Operator` | the operator's name |
//! | `X-Streamex-Timestamp` | when the request was made, in seconds since the Unix epoch |
//! | `X-Streamex-Signature` | with a secret: `sha256=` and the lowercase hex HMAC-SHA256, under the secret, of the timestamp header's value, a `.`, and the body's bytes |
//!
//! plus the configured extra headers (`Authorization`, ...), whose values are marked
//! sensitive. Redirects are not followed (a 3xx is a failure, as any status but 2xx).
//!
//! # The signature
//!
//! A receiver computes `HMAC-SHA256(secret, timestamp + "." + body)` over the body's bytes as
//! received (before any JSON parsing), compares it in constant time with the hex after
//! `sha256=`, and refuses a timestamp too far from its own clock (five minutes, say): signing
//! the timestamp with the body stops an old request from being replayed later. Each try of a
//! delivery is signed again with its own timestamp.
//!
//! # Delivery
//!
//! At least once ([`Delivery::AtLeastOnce`]): a 2xx answer is the only success; anything
//! else is an error, and the operator's retry policy (`[retry]` or `[operators.retry]`)
//! applies: backoff, then `halt` or `dead_letter`. A `Retry-After` header on a failed answer
//! (seconds, or an HTTP date; a `429` or `503` usually) makes the next try wait at least that
//! long, up to ten minutes ([`RetryAfter`]); it still counts as a try. Every failure is
//! retried alike, a 400 as a 503: a receiver that can never take an event should answer 2xx and keep it aside
//! itself, or let the policy put it in `streamex.dead_letters`. The same event can arrive
//! more than once: again after a failed try whose request the receiver did handle, after a
//! crash (the slot's confirmed position may be behind what was posted), and, with batches, when a
//! batch fails (its events are then posted again one per request, from its first). Events
//! arrive in WAL order, so a receiver that stores the greatest position it has handled can
//! drop any event at or before it; positions order by commit LSN (two hexadecimal numbers)
//! and then ordinal, as the body's `commit_lsn` and `ordinal` give them.
//!
//! A webhook does not backfill unless told to (`backfill = true` on its `[[operators]]`
//! entry, or [`WebhookBuilder::backfill`]): it then posts every existing row of its tables,
//! as `read` events, before the changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;
use tracing::debug;

use crate::config::{Secret, WebhookConfig};
use crate::event::Event;
use crate::lsn::Position;
use crate::operator::{Context, Delivery, Operator, RetryAfter, Subscription};

/// A webhook that could not be built, or a delivery that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// A setting of the webhook is wrong; the message names it and the fix.
    #[error("webhook {0}")]
    Invalid(String),
    /// The HTTP client could not be set up.
    #[error("webhook: the HTTP client could not be set up")]
    Client(#[source] reqwest::Error),
    /// The request got no answer in time.
    #[error("webhook {origin}: no answer within {timeout:?} (the webhook's timeout)")]
    Timeout {
        /// `scheme://host[:port]` of the URL.
        origin: String,
        /// The configured time-out.
        timeout: Duration,
        /// What the HTTP client says (without the URL, whose path may be a credential).
        #[source]
        source: reqwest::Error,
    },
    /// The server's certificate was not trusted.
    #[error(
        "webhook {origin}: the server's certificate was refused; a certificate of a private \
         authority needs that authority's PEM certificate as the webhook's ca_file (the webpki \
         roots, Mozilla's list, are trusted otherwise)"
    )]
    Certificate {
        /// `scheme://host[:port]` of the URL.
        origin: String,
        /// What the HTTP client says (without the URL).
        #[source]
        source: reqwest::Error,
    },
    /// The request could not be sent (no connection, the connection lost).
    #[error("webhook {origin}: the request could not be sent")]
    Request {
        /// `scheme://host[:port]` of the URL.
        origin: String,
        /// What the HTTP client says (without the URL).
        #[source]
        source: reqwest::Error,
    },
    /// The endpoint answered with a status other than 2xx.
    #[error("webhook {origin} answered {status}: only a 2xx status counts as delivered")]
    Status {
        /// `scheme://host[:port]` of the URL.
        origin: String,
        /// The status it answered.
        status: reqwest::StatusCode,
        /// How long its `Retry-After` header asked the next try to wait, if it sent one.
        retry_after: Option<Duration>,
    },
}

/// Posts the events it subscribes to, as JSON, to a URL, at least once and in WAL order;
/// see the module documentation for the request, its headers and the signature.
///
/// ```
/// use std::time::Duration;
/// use streamex::EventType;
/// use streamex::config::Secret;
/// use streamex::operator::Subscription;
/// use streamex::operators::Webhook;
///
/// let webhook = Webhook::builder("notify_comments", "https://example.com/hooks")
///     .subscribe(Subscription::only("comments", &[EventType::Insert]))
///     .secret(Secret::new("a long random key"))
///     .timeout(Duration::from_secs(5))
///     .header("Authorization", "Bearer abc")
///     .build()?;
/// // Service::builder().operator(webhook) runs it.
/// # let _ = webhook;
/// # Ok::<(), streamex::operators::WebhookError>(())
/// ```
pub struct Webhook {
    name: String,
    subscriptions: Vec<Subscription>,
    url: reqwest::Url,
    /// `scheme://host[:port]`: what logs and errors show of the URL.
    origin: String,
    key: Option<hmac::Key>,
    batch_size: usize,
    timeout: Duration,
    headers: HeaderMap,
    backfill: bool,
    client: reqwest::Client,
}

/// Builds a [`Webhook`]: [`Webhook::builder`].
#[derive(Debug)]
pub struct WebhookBuilder {
    name: String,
    url: String,
    subscriptions: Vec<Subscription>,
    secret: Option<Secret>,
    batch_size: usize,
    timeout: Duration,
    headers: Vec<(String, Secret)>,
    ca_file: Option<PathBuf>,
    backfill: bool,
}

impl Webhook {
    /// A webhook named `name` (its checkpoint's key, as for any operator) posting to `url`;
    /// give it at least one subscription.
    pub fn builder(name: &str, url: &str) -> WebhookBuilder {
        WebhookBuilder {
            name: name.to_owned(),
            url: url.to_owned(),
            subscriptions: Vec::new(),
            secret: None,
            batch_size: 1,
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            ca_file: None,
            backfill: false,
        }
    }

    /// The webhook of `[[operators]] name = NAME, webhook = { .. }`.
    pub fn from_config(name: &str, config: &WebhookConfig) -> Result<Webhook, WebhookError> {
        let key = format!("operators.{name}.webhook");
        let mut builder = Webhook::builder(name, &config.url)
            .timeout(config.timeout)
            .batch_size(config.batch_size);
        for entity in &config.entities {
            builder = builder.subscribe(Subscription::only(entity, &config.types));
        }
        if let Some(secret) = config.signing_secret(&key).map_err(WebhookError::Invalid)? {
            builder = builder.secret(secret);
        }
        for (name, value) in &config.headers {
            builder = builder.header(name, value.expose());
        }
        if let Some(path) = &config.ca_file {
            builder = builder.ca_file(path.clone());
        }
        builder.build()
    }

    /// The `X-Streamex-Signature` value of a request with `body` and `X-Streamex-Timestamp:
    /// timestamp`: `sha256=` and the lowercase hex HMAC-SHA256, under `secret`, of the
    /// timestamp in decimal, a `.`, and the body.
    pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
        sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), timestamp, body)
    }

    /// The body of a request carrying `events`: the event itself, or with batches an array.
    fn body(&self, events: &[&Event]) -> Vec<u8> {
        match events {
            [event] if self.batch_size == 1 => event.to_json(),
            events => {
                let mut body = vec![b'['];
                for (i, event) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    event.write_json(&mut body);
                }
                body.push(b']');
                body
            }
        }
    }

    /// The headers of a request with `body`, made at `timestamp`, carrying `events` events
    /// from position `first` to `last`.
    fn headers(
        &self,
        body: &[u8],
        timestamp: u64,
        first: Position,
        last: Position,
        events: usize,
    ) -> HeaderMap {
        let mut headers = self.headers.clone();
        let mut set = |name: &'static str, value: String| {
            // Positions, numbers, a name checked when built and hex: always valid values.
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        set("content-type", "application/json".to_owned());
        set(
            "idempotency-key",
            if first == last {
                first.to_string()
            } else {
                format!("{first}..{last}")
            },
        );
        set("x-streamex-first-position", first.to_string());
        set("x-streamex-last-position", last.to_string());
        set("x-streamex-events", events.to_string());
        set("x-streamex-operator", self.name.clone());
        set("x-streamex-timestamp", timestamp.to_string());
        if let Some(key) = &self.key {
            set("x-streamex-signature", sign(key, timestamp, body));
        }
        headers
    }

    /// Posts `events` (at least one) in one request.
    async fn post(&self, events: &[&Event]) -> Result<(), WebhookError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let (first, last) = (first.position(), last.position());
        let body = self.body(events);
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let headers = self.headers(&body, timestamp, first, last, events.len());
        let response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.request_error(e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| retry_after(value, SystemTime::now()));
        drain(response).await;
        debug!(
            operator = %self.name, origin = %self.origin, first = %first, last = %last,
            events = events.len(), status = status.as_u16(), "posted"
        );
        if !status.is_success() {
            return Err(WebhookError::Status {
                origin: self.origin.clone(),
                status,
                retry_after,
            });
        }
        Ok(())
    }

    fn request_error(&self, error: reqwest::Error) -> WebhookError {
        let origin = self.origin.clone();
        let source = error.without_url();
        if source.is_timeout() {
            WebhookError::Timeout {
                origin,
                timeout: self.timeout,
                source,
            }
        } else if certificate_refused(&source) {
            WebhookError::Certificate { origin, source }
        } else {
            WebhookError::Request { origin, source }
        }
    }
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("subscriptions", &self.subscriptions)
            .field("signed", &self.key.is_some())
            .field("batch_size", &self.batch_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookBuilder {
    /// Posts the events of `subscription` too.
    pub fn subscribe(mut self, subscription: Subscription) -> Self {
        self.subscriptions.push(subscription);
        self
    }

    /// Signs every request with `secret` (the `X-Streamex-Signature` header).
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// At most how many events one request carries (default 1: one event per request, the
    /// body being the event). With more than 1, every body is a JSON array.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long a request may take, connecting and reading the answer included (default
    /// 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends header `name: value` with every request too; the value is marked sensitive.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), Secret::new(value)));
        self
    }

    /// Trusts the certificate authorities of PEM file `path` for an `https://` URL, beside
    /// the webpki roots (Mozilla's list).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Whether its first run on the slot starts by posting every existing row of its tables
    /// (as `read` events); default false.
    pub fn backfill(mut self, backfill: bool) -> Self {
        self.backfill = backfill;
        self
    }

    /// The webhook, with its HTTP client. Refuses a bad URL, no subscription, a batch size
    /// or time-out out of range, a bad or reserved header, an empty secret and an unusable
    /// `ca_file`, each by name.
    pub fn build(self) -> Result<Webhook, WebhookError> {
        let invalid = |message: String| WebhookError::Invalid(message);
        if self.name.is_empty() {
            return Err(invalid("name: must not be empty".to_owned()));
        }
        let url =
            crate::config::webhook_url(&self.url).map_err(|e| invalid(format!("url: {e}")))?;
        if self.subscriptions.is_empty() {
            return Err(invalid(format!(
                "{}: no subscriptions: name the tables whose events it posts, e.g. \
                 .subscribe(Subscription::all(\"comments\"))",
                self.name
            )));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(invalid(format!(
                "batch_size: {} is out of range: write a number from 1 to 10000",
                self.batch_size
            )));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout: must be more than 0".to_owned()));
        }
        let key = match &self.secret {
            Some(secret) if secret.expose().is_empty() => {
                return Err(invalid(
                    "secret: is empty: give a long random key, or none for unsigned requests"
                        .to_owned(),
                ));
            }
            Some(secret) => Some(hmac::Key::new(
                hmac::HMAC_SHA256,
                secret.expose().as_bytes(),
            )),
            None => None,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            crate::config::webhook_header(name, value.expose())
                .map_err(|e| invalid(format!("headers: {e}")))?;
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("headers: {name:?} is not a header name")))?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                invalid(format!(
                    "headers: the value of {name:?} is not a header value"
                ))
            })?;
            value.set_sensitive(true);
            headers.append(header, value);
        }
        let tls = tls_config(self.ca_file.as_deref()).map_err(invalid)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            // A POST redirected would become a GET without the body: not a delivery.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("streamex/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(WebhookError::Client)?;
        Ok(Webhook {
            origin: url.origin().ascii_serialization(),
            name: self.name,
            subscriptions: self.subscriptions,
            url,
            key,
            batch_size: self.batch_size,
            timeout: self.timeout,
            headers,
            backfill: self.backfill,
            client,
        })
    }
}

impl Operator for Webhook {
    fn name(&self) -> &str {
        &self.name
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        self.subscriptions.clone()
    }

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    fn at_least_once_batch(&self) -> usize {
        self.batch_size
    }

    fn backfill(&self) -> bool {
        self.backfill
    }

    async fn handle(&self, event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.post(&[event]).await.map_err(operator_error)
    }

    /// `batch_size` events per request, in order; the first failure fails the whole batch
    /// (the runner then posts its events one by one, with the retry policy).
    async fn handle_batch(
        &self,
        events: &[Arc<Event>],
        _ctx: &mut Context<'_>,
    ) -> anyhow::Result<()> {
        for chunk in events.chunks(self.batch_size) {
            let chunk: Vec<&Event> = chunk.iter().map(|e| &**e).collect();
            self.post(&chunk).await.map_err(operator_error)?;
        }
        Ok(())
    }
}

/// `error` for the runner: with the receiver's `Retry-After`, as a [`RetryAfter`], so that
/// the next try waits at least that long.
fn operator_error(error: WebhookError) -> anyhow::Error {
    match error {
        WebhookError::Status {
            retry_after: Some(wait),
            ..
        } => anyhow::Error::new(error).context(RetryAfter(wait)),
        error => error.into(),
    }
}

/// The wait a `Retry-After` value asks for at `now`: delay-seconds (`120`) or an HTTP date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`; a date already past asks for none). `None` when it is
/// neither.
fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let value = value.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `sha256=` and the hex HMAC-SHA256 under `key` of `timestamp`, `.` and `body`.
fn sign(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    format!(
        "sha256={}",
        hmac_hex(key, &[timestamp.as_bytes(), b".", body])
    )
}

/// The lowercase hex HMAC of `parts`, one after the other, under `key`.
fn hmac_hex(key: &hmac::Key, parts: &[&[u8]]) -> String {
    let mut context = hmac::Context::with_key(key);
    for part in parts {
        context.update(part);
    }
    hex(context.sign().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether `error` comes from rustls refusing the server's certificate: found by the error's
/// type down its chain of causes (an I/O error may carry it), never by its text.
fn certificate_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if matches!(
            error.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        ) {
            return true;
        }
        // An I/O error's `source` is its inner error's source: step into the inner one.
        cause = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}

/// Reads what is left of an answer's body (at most 64 KiB), so that the connection can
/// serve the next request; what it holds is not used.
async fn drain(mut response: reqwest::Response) {
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match response.chunk().await {
            Ok(Some(chunk)) => left = left.saturating_sub(chunk.len()),
            Ok(None) | Err(_) => break,
        }
    }
}

/// TLS as the rest of streamex has it: rustls with the ring provider, trusting the webpki
/// roots and the authorities of `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let file = || format!("ca_file \"{}\"", path.display());
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", file()))?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut std::io::Cursor::new(bytes)) {
            let cert = cert.map_err(|e| format!("{} is not valid PEM: {e}", file()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{} holds an unusable certificate: {e}", file()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                file()
            ));
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("configuring tls: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn event(ordinal: u64, id: i64) -> Event {
        crate::testing::event(
            EventType::Insert,
            "comments",
            serde_json::json!({"id": id, "body": "hello"}),
            serde_json::Value::Null,
            ordinal,
        )
    }

    fn webhook(batch_size: usize) -> Webhook {
        Webhook::builder(
            "notify",
            "https://hooks.example.com/services/T0/B0/token?x=1",
        )
        .subscribe(Subscription::all("comments"))
        .secret(Secret::new("whsec-test"))
        .header("Authorization", "Bearer abc")
        .batch_size(batch_size)
        .build()
        .expect("a valid webhook")
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_a_status_error_carries_it() {
        let value = |text: &str| HeaderValue::from_str(text).expect("a header value");
        // Wed, 21 Oct 2015 07:28:00 GMT is 1445412480 s after the epoch.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480 - 90);
        assert_eq!(
            retry_after(&value("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&value(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&value("Wed, 21 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::from_secs(90))
        );
        let later = now + Duration::from_secs(3600);
        assert_eq!(
            retry_after(&value("Wed, 21 Oct 2015 07:28:00 GMT"), later),
            Some(Duration::ZERO),
            "a date already past"
        );
        for bad in ["-5", "soon", "1.5", ""] {
            assert_eq!(retry_after(&value(bad), now), None, "{bad:?}");
        }

        let status = |retry_after| WebhookError::Status {
            origin: "https://hooks.example.com".to_owned(),
            status: reqwest::StatusCode::TOO_MANY_REQUESTS,
            retry_after,
        };
        let asked = operator_error(status(Some(Duration::from_secs(30))));
        assert_eq!(RetryAfter::of(&asked), Some(Duration::from_secs(30)));
        assert!(
            crate::error::chain(&asked).contains("answered 429"),
            "{}",
            crate::error::chain(&asked)
        );
        assert_eq!(RetryAfter::of(&operator_error(status(None))), None);
        let huge = operator_error(status(Some(Duration::from_secs(86_400))));
        assert_eq!(RetryAfter::of(&huge), Some(RetryAfter::MAX), "capped");
    }

    /// RFC 4231's test cases 1, 2 and 6 for HMAC-SHA256.
    #[test]
    fn hmac_sha256_gives_rfc_4231_s_values() {
        let cases: [(&[u8], &[u8], &str); 3] = [
            (
                &[0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, data, expected) in cases {
            let key = hmac::Key::new(hmac::HMAC_SHA256, key);
            assert_eq!(hmac_hex(&key, &[data]), expected);
            // Split anywhere, the same.
            let (a, b) = data.split_at(data.len() / 2);
            assert_eq!(hmac_hex(&key, &[a, b]), expected);
        }
    }

    /// The signature is of the timestamp, a dot and the body: the value `openssl dgst
    /// -sha256 -hmac whsec-test` gives for `1700000000.{"type":"insert"}`.
    #[test]
    fn the_signature_covers_the_timestamp_and_the_body() {
        let body = br#"{"type":"insert"}"#;
        assert_eq!(
            Webhook::signature(b"whsec-test", 1_700_000_000, body),
            "sha256=0a37ea706ed3f8d5ecbc5ad6f8d423f3f738819d0df11ee2a24048e361995052"
        );
        assert_ne!(
            Webhook::signature(b"whsec-test", 1_700_000_001, body),
            Webhook::signature(b"whsec-test", 1_700_000_000, body),
            "another timestamp, another signature"
        );
    }

    #[test]
    fn one_event_is_its_tail_json_and_with_batches_every_body_is_an_array() {
        let (a, b) = (event(0, 1), event(1, 2));
        let single = webhook(1);
        assert_eq!(single.body(&[&a]), serde_json::to_vec(&a).unwrap());
        let batched = webhook(10);
        let one: serde_json::Value = serde_json::from_slice(&batched.body(&[&a])).unwrap();
        assert_eq!(one, serde_json::json!([serde_json::to_value(&a).unwrap()]));
        let two: serde_json::Value = serde_json::from_slice(&batched.body(&[&a, &b])).unwrap();
        assert_eq!(two[1]["new_record"]["id"], 2);
        assert_eq!(two.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn headers_carry_the_positions_the_signature_and_the_extra_headers() {
        let hook = webhook(10);
        let (a, b) = (event(0, 1), event(2, 2));
        let body = hook.body(&[&a]);
        let headers = hook.headers(&body, 1_700_000_000, a.position(), a.position(), 1);
        let get = |h: &HeaderMap, name: &str| h.get(name).unwrap().to_str().unwrap().to_owned();
        assert_eq!(get(&headers, "content-type"), "application/json");
        assert_eq!(get(&headers, "idempotency-key"), "0/100#0");
        assert_eq!(get(&headers, "x-streamex-first-position"), "0/100#0");
        assert_eq!(get(&headers, "x-streamex-last-position"), "0/100#0");
        assert_eq!(get(&headers, "x-streamex-events"), "1");
        assert_eq!(get(&headers, "x-streamex-operator"), "notify");
        assert_eq!(get(&headers, "x-streamex-timestamp"), "1700000000");
        assert_eq!(
            get(&headers, "x-streamex-signature"),
            Webhook::signature(b"whsec-test", 1_700_000_000, &body)
        );
        assert_eq!(get(&headers, "authorization"), "Bearer abc");
        assert!(headers["authorization"].is_sensitive());

        let body = hook.body(&[&a, &b]);
        let headers = hook.headers(&body, 1_700_000_000, a.position(), b.position(), 2);
        assert_eq!(get(&headers, "idempotency-key"), "0/100#0..0/100#2");
        assert_eq!(get(&headers, "x-streamex-first-position"), "0/100#0");
        assert_eq!(get(&headers, "x-streamex-last-position"), "0/100#2");
        assert_eq!(get(&headers, "x-streamex-events"), "2");

        let unsigned = Webhook::builder("plain", "http://127.0.0.1:9/")
            .subscribe(Subscription::all("comments"))
            .build()
            .unwrap();
        let headers = unsigned.headers(b"{}", 1, a.position(), a.position(), 1);
        assert!(headers.get("x-streamex-signature").is_none());
        assert!(headers.get("authorization").is_none());
    }

    #[test]
    fn bad_settings_are_refused_by_name_without_quoting_secrets() {
        let base = || {
            Webhook::builder("notify", "https://example.com/hooks/secret-path")
                .subscribe(Subscription::all("comments"))
        };
        let refused = |builder: WebhookBuilder| builder.build().unwrap_err().to_string();
        for (url, expected) in [
            (
                "ftp://example.com/x",
                "the scheme \"ftp\" is not http or https",
            ),
            ("example.com/hooks", "not a URL"),
            ("https://", "not a URL"),
            ("unix:/run/hooks", "is not http or https"),
        ] {
            let message = refused(Webhook::builder("n", url).subscribe(Subscription::all("c")));
            assert!(message.starts_with("webhook url: "), "{message}");
            assert!(message.contains(expected), "{url}: {message}");
            assert!(message.contains("https://example.com/hooks\""), "{message}");
        }
        let message = refused(Webhook::builder("notify", "https://example.com/hooks"));
        assert!(message.contains("no subscriptions"), "{message}");
        let message = refused(base().batch_size(0));
        assert!(message.contains("batch_size"), "{message}");
        let message = refused(base().timeout(Duration::ZERO));
        assert!(message.contains("timeout"), "{message}");
        let message = refused(base().secret(Secret::new("")));
        assert!(message.contains("secret: is empty"), "{message}");
        let message = refused(base().header("X-Streamex-Signature", "forged"));
        assert!(message.contains("set by the webhook itself"), "{message}");
        let message = refused(base().header("Bad Header", "v"));
        assert!(message.contains("not a header name"), "{message}");
        let message = refused(base().header("Authorization", "Bearer s3cr3t\n"));
        assert!(message.contains("visible ASCII"), "{message}");
        assert!(!message.contains("s3cr3t"), "{message}");
        let message = refused(base().ca_file("/nonexistent/ca.pem"));
        assert!(
            message.contains("ca_file \"/nonexistent/ca.pem\""),
            "{message}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let message = refused(base().ca_file(&empty));
        assert!(message.contains("holds no PEM certificate"), "{message}");
    }

    /// As hyper-rustls wraps it: an I/O error in an I/O error around rustls's.
    #[test]
    fn a_refused_certificate_is_found_by_type_inside_io_errors() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let outer = std::io::Error::other(inner);
        assert!(certificate_refused(&outer));
        let other = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        ));
        assert!(!certificate_refused(&other));
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!certificate_refused(&plain));
    }

    #[test]
    fn debug_shows_neither_the_url_s_path_nor_the_secret() {
        let text = format!("{:?}", webhook(1));
        assert!(text.contains("https://hooks.example.com"), "{text}");
        assert!(!text.contains("token"), "{text}");
        assert!(!text.contains("whsec"), "{text}");
        assert!(!text.contains("Bearer"), "{text}");
    }

    /// Ships as streamex's own: the client takes the ring rustls configuration (a rustls of
    /// another version than reqwest's would be refused here, at build time).
    #[test]
    fn an_https_webhook_builds_with_the_ring_provider() {
        let hook = webhook(1);
        assert_eq!(hook.url.scheme(), "https");
        assert_eq!(hook.delivery(), Delivery::AtLeastOnce);
        assert_eq!(hook.at_least_once_batch(), 1);
        assert!(!hook.backfill());
    }
}
