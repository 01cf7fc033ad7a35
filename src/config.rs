//! The configuration file (TOML), with every key overridable from the environment.
//!
//! `STREAMEX_DATABASE_URL` overrides `database_url`; nested keys join with a double
//! underscore: `STREAMEX_PROCESS_STATUS__BACKEND=memory` overrides `[process_status] backend`.
//! Unknown keys and bad values are refused with a message naming the key.
//!
//! See `config/streamex.toml` for a working example with every key explained.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::backoff::Backoff;

mod nats;
mod worker;
pub use nats::{NatsConfig, NatsStorage};
pub use worker::WorkerConfig;

/// A configuration that could not be read, with the key and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the configuration file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key of the file is unknown or has a bad value.
    #[error("configuration file {path}: {message}")]
    Invalid {
        /// The file (or what stands for it).
        path: String,
        /// The key and what is wrong with it.
        message: String,
    },
    /// A `STREAMEX_*` variable does not name a key or has a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The database to stream from and where operators write, as a postgres:// URL.
    pub database_url: String,
    /// The logical replication slot (created when missing).
    #[serde(default = "default_name")]
    pub slot: String,
    /// The publication (created when missing).
    #[serde(default = "default_name")]
    pub publication: String,
    /// Tables to publish, `schema.table` or `table` (of `default_schema`); empty means all
    /// tables.
    #[serde(default)]
    pub tables: Vec<String>,
    /// The schema a table name without one means, here and in operators, channels and
    /// process status (`comments` is `public.comments`; `archive.comments` must be named so).
    #[serde(default = "default_schema")]
    pub default_schema: String,
    /// `[replication]`: the stream's timing and capacities.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// `[lock]`: the instance lock that makes one instance per slot the active one.
    #[serde(default)]
    pub lock: LockConfig,
    /// `[process_status]`: where process status is kept.
    #[serde(default)]
    pub process_status: ProcessStatusConfig,
    /// Retry policy for every operator, unless an operator sets its own.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Channels per entity.
    #[serde(default)]
    pub entities: BTreeMap<String, EntityConfig>,
    /// The operators to run, in no particular order.
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
    /// The HTTP endpoint (metrics, health, process status, Server-Sent Events); off unless
    /// `listen` is set.
    #[serde(default)]
    pub http: HttpConfig,
    /// `[nats]`: every event also published to a NATS JetStream stream; off without it.
    pub nats: Option<NatsConfig>,
    /// `[worker]`: how `streamex worker` consumes that stream.
    #[serde(default)]
    pub worker: WorkerConfig,
}

fn default_name() -> String {
    "streamex".to_owned()
}

fn default_schema() -> String {
    crate::event::DEFAULT_SCHEMA.to_owned()
}

/// `[replication]`: the stream's timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Longest time between two status updates to the server (kept under a third of
    /// `wal_sender_timeout`).
    #[serde(deserialize_with = "duration")]
    pub status_interval: Duration,
    /// The first wait before reconnecting after a transient failure; it doubles up to
    /// `reconnect_max`.
    #[serde(deserialize_with = "duration")]
    pub reconnect_initial: Duration,
    /// The longest wait before reconnecting.
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// Decoded items that may wait between the reader and the operators.
    pub channel_capacity: usize,
    /// Most events an operator handles in one database transaction.
    pub batch_size: usize,
    /// How many bytes of decoded events may wait for one operator (or the JetStream
    /// publisher) before the reader waits for it: how far a slow operator may fall behind
    /// the others before it holds them back. Operators that listen to the same changes share
    /// them, so this bounds memory for all of them together, about.
    pub operator_backlog_bytes: usize,
    /// How many connections read a Rust operator's tables at once during its backfill (each
    /// takes the next table, or the next range of pages of a large one). Default: the
    /// machine's cores, at most 4.
    pub backfill_readers: usize,
    /// When the slot was invalidated (its WAL removed, past `max_slot_wal_keep_size`), drop
    /// and recreate it at start-up instead of stopping. The changes in between are lost to
    /// streamex: only for derived data that can be rebuilt.
    pub recreate_invalidated_slot: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            status_interval: Duration::from_secs(10),
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            channel_capacity: 4096,
            batch_size: 500,
            operator_backlog_bytes: crate::operator::DEFAULT_BACKLOG_BYTES,
            backfill_readers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 4),
            recreate_invalidated_slot: false,
        }
    }
}

impl ReplicationConfig {
    /// The waits between replication sessions: `reconnect_initial`, doubling, at most
    /// `reconnect_max`.
    pub fn reconnect(&self) -> Backoff {
        Backoff::new(self.reconnect_initial, 2.0, self.reconnect_max)
    }
}

/// `[lock]`: the instance lock, a lease the active instance renews (`src/service/lock.rs`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockConfig {
    /// How long the server keeps the lock of an instance that stopped renewing it (frozen,
    /// paused, cut off): a standby takes over about this long after the active instance
    /// stops. The active instance renews it every third of this, stops writing when a
    /// renewal fails or comes too late, and the server ends any of its transactions left idle
    /// this long.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            lease: Duration::from_secs(30),
        }
    }
}

/// `[http]`: the optional HTTP endpoint (`src/http`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The address and port to listen on (`"127.0.0.1:9187"`); no HTTP endpoint without it.
    #[serde(deserialize_with = "listen_address")]
    pub listen: Option<SocketAddr>,
    /// Events queued for one Server-Sent Events client before it is cut off (it is then sent
    /// an `event: lagged` message and the stream ends).
    pub sse_capacity: usize,
    /// Bytes of event JSON queued for one Server-Sent Events client before it is cut off, as
    /// for `sse_capacity`. One event larger than this still goes to a client that has nothing
    /// else queued.
    pub sse_max_bytes: usize,
    /// Server-Sent Events streams open at once; a client beyond them is answered 503.
    pub max_clients: usize,
    /// How often an idle Server-Sent Events stream gets a keep-alive comment.
    #[serde(deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// The web origin (`"https://app.example.com"`, or `"*"`) whose pages may follow
    /// `/channels/...` and ask `/process-status/...` from a browser (CORS
    /// `Access-Control-Allow-Origin`); none by default: same origin only.
    pub allow_origin: Option<String>,
    /// The bearer token `/channels/...` and `/process-status/...` (and `/metrics` with
    /// `metrics_auth`) require; none by default: no authentication.
    pub token: Option<Secret>,
    /// A file holding the token (its trailing newline removed), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// Whether `/metrics` requires the token too.
    pub metrics_auth: bool,
    /// The host names (`Host` header, any port) the endpoint answers to; `"*"` for any. By
    /// default, `localhost`, `127.0.0.1` and `[::1]` when `listen` is a loopback address, any
    /// otherwise.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            sse_capacity: 1024,
            sse_max_bytes: 16 << 20,
            max_clients: 256,
            keep_alive: Duration::from_secs(15),
            allow_origin: None,
            token: None,
            token_file: None,
            metrics_auth: false,
            allowed_hosts: None,
        }
    }
}

impl HttpConfig {
    /// The bearer token, read from `token_file` if that is where it is; `None` when neither
    /// is set. The error names the key, never the token.
    pub fn bearer_token(&self) -> Result<Option<Secret>, String> {
        let (token, key) = match (&self.token, &self.token_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(
                    "http.token and http.token_file are both set: keep one of them".to_owned(),
                );
            }
            (Some(token), None) => (token.clone(), "http.token"),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("http.token_file: reading {}: {e}", path.display()))?;
                (
                    Secret(text.trim_end_matches(['\n', '\r']).to_owned()),
                    "http.token_file",
                )
            }
        };
        if token.0.is_empty() {
            return Err(format!(
                "{key} is empty: give a long random token (e.g. from `openssl rand -hex 32`), \
                 or leave {key} out for no authentication"
            ));
        }
        if !token.0.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "{key} may hold only visible ASCII characters, without spaces (it is sent in \
                 an Authorization header)"
            ));
        }
        Ok(Some(token))
    }
}

/// A setting that must stay secret (`[http] token`): its `Debug` shows no more than that it
/// is set, and errors about it never quote it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, to compare a request's token with (in constant time).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Text {
            // serde's own message would quote the value.
            fn refuse<E: serde::de::Error>(self) -> Result<Secret, E> {
                Err(E::custom(
                    "a secret must be a string in quotes (in an environment variable too: \
                     STREAMEX_HTTP__TOKEN='\"...\"' if it reads as a number or a boolean)",
                ))
            }
        }
        impl serde::de::Visitor<'_> for Text {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_owned()))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                self.refuse()
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                self.refuse()
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                self.refuse()
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                self.refuse()
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// Where process status is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusBackendKind {
    /// In the process: lost on restart.
    Memory,
    /// The `streamex.process_status` table, which applications can read.
    #[default]
    Postgres,
}

/// `[process_status]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessStatusConfig {
    /// `"postgres"` (the default) or `"memory"`.
    pub backend: StatusBackendKind,
    /// The record field holding the row's timestamp; the commit time when a table has none.
    pub timestamp_field: String,
}

impl Default for ProcessStatusConfig {
    fn default() -> Self {
        ProcessStatusConfig {
            backend: StatusBackendKind::Postgres,
            timestamp_field: "updated_at".to_owned(),
        }
    }
}

/// What happens to an event whose handler still fails after the last retry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Stop the operator; its position stays unacknowledged until `streamex resume`.
    #[default]
    Halt,
    /// Store the event in `streamex.dead_letters` and go on.
    DeadLetter,
}

/// Retries with exponential backoff (EventStreamex's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// The wait before the first retry.
    #[serde(deserialize_with = "duration")]
    pub initial: Duration,
    /// By how much each wait grows.
    pub multiplier: f64,
    /// The longest wait.
    #[serde(deserialize_with = "duration")]
    pub max: Duration,
    /// How many times a failing event is tried again before `on_failure` applies.
    pub retries: u32,
    /// What happens then.
    pub on_failure: FailurePolicy,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(500),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            retries: 5,
            on_failure: FailurePolicy::Halt,
        }
    }
}

impl RetryConfig {
    /// The waits between the retries of one event: `initial`, `multiplier` times longer each
    /// time, at most `max`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial, self.multiplier, self.max)
    }

    /// The wait before retry number `attempt` (1 for the first retry): the `attempt`-th wait
    /// of [`RetryConfig::backoff`].
    pub fn delay(&self, attempt: u32) -> Duration {
        let skip = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff().nth(skip).unwrap_or(self.max)
    }
}

/// `[entities.<name>]`: extra channels for one table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// Scoped channels: each scope is a list of `"field -> parent_entity"` pairs, in order;
    /// `[["post_id -> posts"]]` on `comments` gives `posts/<post_id>/comments`.
    #[serde(default)]
    pub scopes: Vec<Vec<String>>,
}

impl EntityConfig {
    /// The scopes as `(field, parent)` pairs.
    pub fn parsed_scopes(&self) -> Result<Vec<Vec<(String, String)>>, String> {
        self.scopes
            .iter()
            .map(|scope| {
                scope
                    .iter()
                    .map(|pair| {
                        let (field, parent) = pair.split_once("->").ok_or_else(|| {
                            format!("scope {pair:?} is not of the form \"field -> entity\"")
                        })?;
                        let (field, parent) = (field.trim(), parent.trim());
                        if field.is_empty() || parent.is_empty() {
                            return Err(format!(
                                "scope {pair:?} is not of the form \"field -> entity\""
                            ));
                        }
                        Ok((field.to_owned(), parent.to_owned()))
                    })
                    .collect()
            })
            .collect()
    }
}

/// `[[operators]]`: one operator to run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// A Rust operator registered under this name, or the name of a declarative one.
    pub name: String,
    /// Declarative form: the statement run with `$1` bound to the event's id.
    pub query: Option<String>,
    /// Declarative form: per entity, the record field that gives `$1`
    /// (`{ comments = "post_id", posts = "id" }`); also the entities it listens to.
    #[serde(default)]
    pub id: BTreeMap<String, String>,
    /// Declarative form: entities whose deletes run `delete_query` instead of `query`.
    #[serde(default)]
    pub delete_with: Vec<String>,
    /// Declarative form: the statement run for a delete of a `delete_with` entity.
    pub delete_query: Option<String>,
    /// Declarative form: the statement(s) run, with no parameter, when one of the operator's
    /// tables is truncated; without it every id found in the tables is recomputed (and a
    /// truncate of a `delete_with` table is an error, since only this can say which derived
    /// rows must go).
    pub truncate_query: Option<String>,
    /// Declarative form: the statement(s) `streamex rebuild` runs, with no parameter, in the
    /// backfill's transaction before every id is recomputed (a DELETE of every derived row).
    pub reset_query: Option<String>,
    /// This operator's retry policy, replacing `[retry]`.
    pub retry: Option<RetryConfig>,
    /// Settings passed to a Rust operator's constructor.
    #[serde(default)]
    pub settings: toml::Table,
    /// Run each event in its own transaction instead of batching (slower; for comparison).
    #[serde(default)]
    pub one_event_per_transaction: bool,
    /// The operator's rows split into this many partitions (by the hash of their key; a
    /// declarative operator's by its id), handled side by side, each in order, with a
    /// checkpoint of its own (`<operator>#<p>/<N>`). Under `streamex run` they run at once
    /// on as many connections; on workers (`streamex worker`, Rust operators only) the
    /// workers that run the operator share them. 1 (the default): the operator runs whole.
    pub partitions: Option<u32>,
    /// Whether the operator's first run on the slot starts with the rows that already exist
    /// (as `read` events); unset, the operator says (a Rust operator's
    /// `Operator::backfill`, true unless it says otherwise; true for a declarative one).
    pub backfill: Option<bool>,
    /// The built-in webhook operator: posts the events of `entities` to `url`.
    pub webhook: Option<WebhookConfig>,
}

/// `[[operators]] webhook = { url = "...", entities = [...] }`: an operator that posts each
/// event (or a batch) as JSON to a URL, at least once (see [`crate::operators::Webhook`]).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the events are posted: an `http://` or `https://` URL.
    pub url: String,
    /// The tables whose events are posted, named as in `tables`.
    #[serde(default)]
    pub entities: Vec<String>,
    /// The event types posted (`insert`, `update`, `delete`); empty means all of them. A
    /// table's truncates are always posted.
    #[serde(default)]
    pub types: Vec<crate::event::EventType>,
    /// The key of the `X-Streamex-Signature` header (HMAC-SHA256); unsigned without it.
    pub secret: Option<Secret>,
    /// A file holding the key (its trailing newline removed), instead of `secret`.
    pub secret_file: Option<PathBuf>,
    /// How long a request may take, connecting and reading the answer included (default
    /// 10 s); one that takes longer has failed.
    #[serde(default = "default_webhook_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// At most how many events one request carries (default 1). With more than 1, every
    /// body is a JSON array, of 1 to `batch_size` events.
    #[serde(default = "default_webhook_batch_size")]
    pub batch_size: usize,
    /// More headers sent with every request (`{ Authorization = "Bearer ..." }`); their
    /// values are kept as secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// PEM certificates of the authorities trusted for an `https://` URL, beside the webpki
    /// roots (Mozilla's list).
    pub ca_file: Option<PathBuf>,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_webhook_batch_size() -> usize {
    1
}

impl std::fmt::Debug for WebhookConfig {
    // The URL's path and query may be a credential (many services put the token there):
    // only its origin is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &url_origin(&self.url))
            .field("entities", &self.entities)
            .field("types", &self.types)
            .field("secret", &self.secret)
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .field("batch_size", &self.batch_size)
            .field("headers", &self.headers)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl WebhookConfig {
    /// The signing key, read from `secret_file` if that is where it is; `None` when neither
    /// is set. `key` (`operators.NAME.webhook`) names the setting in errors, which never
    /// quote the secret.
    pub fn signing_secret(&self, key: &str) -> Result<Option<Secret>, String> {
        let secret = match (&self.secret, &self.secret_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{key}.secret and {key}.secret_file are both set: keep one of them"
                ));
            }
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{key}.secret_file: reading {}: {e}", path.display()))?;
                Secret(text.trim_end_matches(['\n', '\r']).to_owned())
            }
        };
        if secret.0.is_empty() {
            return Err(format!(
                "{key}.secret is empty: give a long random key (e.g. from `openssl rand -hex \
                 32`), or leave it out for unsigned requests"
            ));
        }
        Ok(Some(secret))
    }

    /// Checks what can be checked without the network; `key` is `operators.NAME.webhook`.
    fn check(&self, key: &str) -> Result<(), String> {
        webhook_url(&self.url).map_err(|e| format!("{key}.url: {e}"))?;
        if self.entities.is_empty() {
            return Err(format!(
                "{key}.entities: a webhook needs the tables whose events it posts, such as \
                 entities = [\"comments\"]"
            ));
        }
        within(&format!("{key}.batch_size"), self.batch_size, 1, 10_000)?;
        within_time(
            &format!("{key}.timeout"),
            self.timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        self.signing_secret(key)?;
        for (name, value) in &self.headers {
            webhook_header(name, value.expose()).map_err(|e| format!("{key}.headers: {e}"))?;
        }
        Ok(())
    }
}

/// `text` as a webhook URL: `http://` or `https://`, with a host. The error says what is
/// wrong without quoting the URL, whose path may be a credential.
pub(crate) fn webhook_url(text: &str) -> Result<url::Url, String> {
    let example = "write an http:// or https:// URL, such as \"https://example.com/hooks\"";
    let url = url::Url::parse(text.trim()).map_err(|e| format!("not a URL ({e}): {example}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme {:?} is not http or https: {example}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("the URL has no host: {example}"));
    }
    Ok(url)
}

/// The headers a webhook sets itself, which extra headers may not replace.
pub(crate) const WEBHOOK_OWN_HEADERS: [&str; 10] = [
    "content-type",
    "content-length",
    "host",
    "idempotency-key",
    "x-streamex-operator",
    "x-streamex-first-position",
    "x-streamex-last-position",
    "x-streamex-events",
    "x-streamex-timestamp",
    "x-streamex-signature",
];

/// Checks an extra webhook header: a valid name that is not one of the webhook's own, and a
/// value of visible ASCII and spaces. The error never quotes the value.
pub(crate) fn webhook_header(name: &str, value: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!(
            "{name:?} is not a header name: write letters, digits and dashes, such as \
             \"Authorization\""
        ));
    }
    if WEBHOOK_OWN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{name:?} is set by the webhook itself (see the README's Webhooks section): leave \
             it out"
        ));
    }
    if !value
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err(format!(
            "the value of {name:?} may hold only visible ASCII characters and spaces"
        ));
    }
    Ok(())
}

/// `scheme://host[:port]` of `text`, for logs and `Debug`: never the path, query or
/// credentials.
pub(crate) fn url_origin(text: &str) -> String {
    match url::Url::parse(text.trim()) {
        Ok(url) if url.has_host() => url.origin().ascii_serialization(),
        _ => "(not a URL)".to_owned(),
    }
}

impl Config {
    /// A configuration for `database_url` with every other setting at its default (the
    /// slot and publication `streamex`, every table published, no operators): set the
    /// fields you need, then give it to [`crate::Service::builder`].
    pub fn new(database_url: &str) -> Config {
        Config::parse(
            &format!(
                "database_url = {}",
                toml::Value::String(database_url.to_owned())
            ),
            "Config::new",
            std::iter::empty(),
        )
        .expect("the defaults are valid")
    }

    /// Reads `path`, applies `STREAMEX_*` environment overrides, and checks the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses configuration `text` (named `origin` in errors) with overrides from `env`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        let mut from_env: Vec<(String, String)> = Vec::new();
        for (var, value) in env {
            let Some(key) = var.strip_prefix("STREAMEX_") else {
                continue;
            };
            // Variables of the command line and the tests, not configuration keys.
            if matches!(
                key,
                "LOG_FORMAT" | "TEST_DATABASE_URL" | "PG_BINDIR" | "FUZZ_CASES" | "CONFIG"
            ) {
                continue;
            }
            let path: Vec<String> = key.split("__").map(|p| p.to_ascii_lowercase()).collect();
            override_key(&mut table, &path, &value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
            from_env.push((path.join("."), var));
        }
        let names = operator_names(&table);
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = readable_key(&e.path().to_string(), &names);
                let message = e.inner().message().trim_end().to_owned();
                match from_env.iter().find(|(k, _)| *k == key) {
                    Some((_, var)) => ConfigError::Env {
                        var: var.clone(),
                        message: format!("{key}: {message}"),
                    },
                    None => invalid(match line_of(text, &key) {
                        Some(line) => format!("{key} (line {line}): {message}"),
                        None => format!("{key}: {message}"),
                    }),
                }
            })?;
        config.normalize_names().map_err(invalid)?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Writes every table name of the configuration in its canonical form (see
    /// [`crate::event::EntityName`]), so that `public.comments` and `comments` are one entity
    /// everywhere: in `tables`, `[entities]` and their scopes, and operators' `id` and
    /// `delete_with`.
    fn normalize_names(&mut self) -> Result<(), String> {
        use crate::event::EntityName;
        if self.default_schema.is_empty() {
            return Err("default_schema: must not be empty".to_owned());
        }
        let default_schema = self.default_schema.clone();
        let canonical = |key: &str, name: &str| -> Result<String, String> {
            EntityName::parse(name)
                .map(|n| n.canonical(&default_schema))
                .map_err(|e| format!("{key}: {e}"))
        };
        for table in &mut self.tables {
            *table = canonical("tables", table)?;
        }
        let mut entities = BTreeMap::new();
        for (name, mut entity) in std::mem::take(&mut self.entities) {
            let key = canonical("entities", &name)?;
            for scope in &mut entity.scopes {
                for pair in scope.iter_mut() {
                    if let Some((field, parent)) = pair.split_once("->") {
                        let parent = canonical(&format!("entities.{name}.scopes"), parent.trim())?;
                        *pair = format!("{} -> {parent}", field.trim());
                    }
                }
            }
            if entities.insert(key.clone(), entity).is_some() {
                return Err(format!(
                    "entities: {key:?} is configured twice (with and without its schema)"
                ));
            }
        }
        self.entities = entities;
        for op in &mut self.operators {
            let key = format!("operators.{}", op.name);
            let mut ids = BTreeMap::new();
            for (entity, field) in std::mem::take(&mut op.id) {
                if ids
                    .insert(canonical(&format!("{key}.id"), &entity)?, field)
                    .is_some()
                {
                    return Err(format!(
                        "{key}.id: {entity:?} is named twice (with and without its schema)"
                    ));
                }
            }
            op.id = ids;
            for entity in &mut op.delete_with {
                *entity = canonical(&format!("{key}.delete_with"), entity)?;
            }
            if let Some(webhook) = &mut op.webhook {
                for entity in &mut webhook.entities {
                    *entity = canonical(&format!("{key}.webhook.entities"), entity)?;
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(nats) = &self.nats {
            nats.validate()?;
        }
        self.worker.validate()?;
        if self.slot.is_empty() || self.slot.len() > 63 {
            return Err(format!(
                "slot: {:?} must be 1 to 63 characters (PostgreSQL's limit for a slot name)",
                self.slot
            ));
        }
        if !self
            .slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "slot: {:?} may hold only lower-case letters, digits and underscores (PostgreSQL's rule for slot names)",
                self.slot
            ));
        }
        if self.http.sse_capacity == 0
            || self.http.sse_max_bytes == 0
            || self.http.max_clients == 0
            || self.http.keep_alive.is_zero()
        {
            return Err(
                "http.sse_capacity, http.sse_max_bytes, http.max_clients and http.keep_alive \
                 must be more than 0"
                    .to_owned(),
            );
        }
        // Read here too, so that a missing or empty token file stops start-up by its key.
        let token = self.http.bearer_token()?;
        if self.http.metrics_auth && token.is_none() {
            return Err(
                "http.metrics_auth needs a token to require: set http.token or http.token_file"
                    .to_owned(),
            );
        }
        for host in self.http.allowed_hosts.iter().flatten() {
            let name = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_graphic() && c != '/')
                || (name.contains(':') && name.parse::<std::net::Ipv6Addr>().is_err())
            {
                return Err(format!(
                    "http.allowed_hosts: {host:?} is not a host name: write a name or an \
                     address without a port (\"localhost\", \"app.example.com\", \"[::1]\"), \
                     or \"*\" for any"
                ));
            }
        }
        if self.http.allowed_hosts.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "http.allowed_hosts is empty, which would refuse every request: list the \
                 names clients use, or leave it out for the default"
                    .to_owned(),
            );
        }
        if let Some(origin) = &self.http.allow_origin {
            if origin.is_empty() || !origin.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "http.allow_origin: {origin:?} is not an origin: write one such as \"https://app.example.com\", or \"*\" for any"
                ));
            }
        }
        let r = &self.replication;
        within(
            "replication.channel_capacity",
            r.channel_capacity,
            1,
            1_000_000,
        )?;
        within("replication.batch_size", r.batch_size, 1, 1_000_000)?;
        within(
            "replication.operator_backlog_bytes",
            r.operator_backlog_bytes,
            1 << 16,
            1 << 31,
        )?;
        within("replication.backfill_readers", r.backfill_readers, 1, 64)?;
        within_time(
            "replication.status_interval",
            r.status_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within_time(
            "replication.reconnect_initial",
            r.reconnect_initial,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        within_time(
            "replication.reconnect_max",
            r.reconnect_max,
            r.reconnect_initial,
            Duration::from_secs(3600),
        )?;
        within_time(
            "lock.lease",
            self.lock.lease,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        let retries = std::iter::once(("retry".to_owned(), &self.retry)).chain(
            self.operators
                .iter()
                .filter_map(|o| Some((format!("operators.{}.retry", o.name), o.retry.as_ref()?))),
        );
        for (key, retry) in retries {
            within(&format!("{key}.retries"), retry.retries, 0, 1_000)?;
            within_time(
                &format!("{key}.initial"),
                retry.initial,
                Duration::ZERO,
                Duration::from_secs(3600),
            )?;
            within_time(
                &format!("{key}.max"),
                retry.max,
                retry.initial,
                Duration::from_secs(86_400),
            )?;
            if !(retry.multiplier.is_finite() && (1.0..=100.0).contains(&retry.multiplier)) {
                return Err(format!(
                    "{key}.multiplier: {} is out of range: write a number from 1 to 100",
                    retry.multiplier
                ));
            }
        }
        for (entity, config) in &self.entities {
            config
                .parsed_scopes()
                .map_err(|e| format!("entities.{entity}.scopes: {e}"))?;
        }
        let mut names = std::collections::HashSet::new();
        for op in &self.operators {
            if !names.insert(op.name.as_str()) {
                return Err(format!("operators: the name {:?} is used twice", op.name));
            }
            if let Some(webhook) = &op.webhook {
                let key = format!("operators.{}", op.name);
                if op.query.is_some() {
                    return Err(format!(
                        "{key}: `webhook` and `query` are two kinds of operator (one posts \
                         events, the other runs SQL): keep one, or give each an [[operators]] \
                         entry of its own"
                    ));
                }
                if !op.settings.is_empty() {
                    return Err(format!(
                        "{key}: `settings` are for a Rust operator's constructor; a webhook \
                         takes everything in its `webhook` table"
                    ));
                }
                webhook.check(&format!("{key}.webhook"))?;
            }
            if op.query.is_none()
                && (!op.id.is_empty()
                    || !op.delete_with.is_empty()
                    || op.delete_query.is_some()
                    || op.truncate_query.is_some()
                    || op.reset_query.is_some())
            {
                return Err(format!(
                    "operators.{}: id, delete_with, delete_query, truncate_query and reset_query belong to a declarative operator, which needs `query`",
                    op.name
                ));
            }
            if op.query.is_some() {
                if op.id.is_empty() {
                    return Err(format!(
                        "operators.{}: a declarative operator needs `id`, the field giving $1 per entity, e.g. id = {{ posts = \"id\" }}",
                        op.name
                    ));
                }
                for entity in &op.delete_with {
                    if !op.id.contains_key(entity) {
                        return Err(format!(
                            "operators.{}: delete_with names {entity:?}, which is not in `id`",
                            op.name
                        ));
                    }
                }
                if !op.delete_with.is_empty() && op.delete_query.is_none() {
                    return Err(format!(
                        "operators.{}: delete_with needs `delete_query`, the statement that deletes the derived row with $1",
                        op.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The published tables as `(schema, table)`; empty for all tables.
    pub fn table_list(&self) -> Vec<(String, String)> {
        self.tables
            .iter()
            .filter_map(|t| crate::event::EntityName::parse(t).ok())
            .map(|name| {
                let schema = name.schema_or(&self.default_schema).to_owned();
                (schema, name.table)
            })
            .collect()
    }
}

/// The `name` of each `[[operators]]` entry, in order, to name them in errors.
fn operator_names(table: &toml::Table) -> Vec<String> {
    table
        .get("operators")
        .and_then(|v| v.as_array())
        .map(|entries| {
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    e.get("name")
                        .and_then(|n| n.as_str())
                        .map_or_else(|| format!("#{}", i + 1), str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A serde path (`operators[1].retry.max`) as the key a person writes
/// (`operators.post_comment_tallies.retry.max`).
fn readable_key(path: &str, operators: &[String]) -> String {
    let mut key = path.to_owned();
    for (i, name) in operators.iter().enumerate() {
        key = key.replace(&format!("operators[{i}]"), &format!("operators.{name}"));
    }
    if key == "." {
        key.clear();
    }
    key
}

/// The line of `text` where `key` (`retry.on_failure`) is set: under its section's header
/// (`[retry]`), the line that assigns its last part; for a key without such a line (a whole
/// section), the header's line. `None` when it cannot be found (a key from an inline table).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let (name, section) = parts.split_last()?;
    let section = section.join(".");
    let mut current = String::new();
    let mut header_line = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line
                .trim_matches(|c| c == '[' || c == ']')
                .replace('"', "")
                .trim()
                .to_owned();
            if current == key {
                header_line = header_line.or(Some(number + 1));
            }
            continue;
        }
        let assigned = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"'));
        if assigned == Some(*name) && current == section {
            return Some(number + 1);
        }
    }
    header_line
}

/// Refuses `value` of `key` outside `min..=max`.
fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{key}: {value} is out of range: write a number from {min} to {max}"
        ));
    }
    Ok(())
}

/// Refuses duration `value` of `key` outside `min..=max`.
fn within_time(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{key}: {value:?} is out of range: write a duration from {min:?} to {max:?}"
        ));
    }
    Ok(())
}

fn override_key(table: &mut toml::Table, path: &[String], value: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut current = table;
    let mut parts = parents.iter();
    while let Some(part) = parts.next() {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(table) => table,
            // An entry of a list of tables (`[[operators]]`) is named by its `name`:
            // STREAMEX_OPERATORS__NOTIFY__WEBHOOK__SECRET is that entry's webhook.secret.
            toml::Value::Array(entries) => {
                let upper = part.to_ascii_uppercase();
                let name = parts.next().ok_or_else(|| {
                    format!("{part} is a list: name its entry, as in STREAMEX_{upper}__NAME__KEY")
                })?;
                entries
                    .iter_mut()
                    .filter_map(toml::Value::as_table_mut)
                    .find(|entry| {
                        entry
                            .get("name")
                            .and_then(toml::Value::as_str)
                            .is_some_and(|n| n.eq_ignore_ascii_case(name))
                    })
                    .ok_or_else(|| format!("no [[{part}]] entry is named {name:?}"))?
            }
            _ => return Err(format!("key {part:?} is not a table")),
        };
    }
    // A value that parses as TOML (a number, a boolean, an array) is taken as such; anything
    // else is a string.
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    current.insert(last.clone(), parsed);
    Ok(())
}

/// Parses a duration written as a number and a unit: `500ms`, `10s`, `2min`, `1h`, `1d`; a
/// bare number is milliseconds (as PostgreSQL prints its own settings).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis: u64 = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" | "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(number.checked_mul(millis)?))
}

fn listen_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address to listen on: write an IP address and a port, such as \"127.0.0.1:9187\" or \"[::1]:9187\""
        ))
    })
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration: write a number and a unit, such as \"500ms\", \"10s\" or \"2min\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"database_url = "postgres://localhost/blog""#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            "test.toml",
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn defaults_are_eventstreamex_s() {
        let config = parse(MINIMAL, &[]).unwrap();
        assert_eq!(config.slot, "streamex");
        assert_eq!(config.retry.initial, Duration::from_millis(500));
        assert_eq!(config.retry.max, Duration::from_secs(10));
        assert_eq!(config.retry.retries, 5);
        assert_eq!(config.retry.on_failure, FailurePolicy::Halt);
        assert_eq!(config.process_status.backend, StatusBackendKind::Postgres);
        assert_eq!(config.process_status.timestamp_field, "updated_at");
        assert_eq!(config.lock.lease, Duration::from_secs(30));
        let config = parse(&format!("{MINIMAL}\n[lock]\nlease = \"3s\""), &[]).unwrap();
        assert_eq!(config.lock.lease, Duration::from_secs(3));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = parse(&format!("{MINIMAL}\nslott = \"x\""), &[]).unwrap_err();
        assert!(err.to_string().contains("slott"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[retry]\nretires = 3"), &[]).unwrap_err();
        assert!(err.to_string().contains("retires"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = parse(&format!("{MINIMAL}\n[retry]\ninitial = \"soon\""), &[]).unwrap_err();
        assert!(
            err.to_string().contains("soon") && err.to_string().contains("duration"),
            "{err}"
        );
        let err = parse(
            &format!("{MINIMAL}\n[process_status]\nbackend = \"redis\""),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("redis"), "{err}");
        let err = parse(&format!("{MINIMAL}\nslot = \"My Slot\""), &[]).unwrap_err();
        assert!(err.to_string().contains("slot"), "{err}");
        let err = parse("slot = \"x\"", &[]).unwrap_err();
        assert!(err.to_string().contains("database_url"), "{err}");
    }

    #[test]
    fn environment_overrides_any_key() {
        let config = parse(
            MINIMAL,
            &[
                ("STREAMEX_DATABASE_URL", "postgres://other/db"),
                ("STREAMEX_PROCESS_STATUS__BACKEND", "memory"),
                ("STREAMEX_RETRY__RETRIES", "2"),
                ("STREAMEX_LOG_FORMAT", "json"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(config.database_url, "postgres://other/db");
        assert_eq!(config.process_status.backend, StatusBackendKind::Memory);
        assert_eq!(config.retry.retries, 2);
        let err = parse(MINIMAL, &[("STREAMEX_RETRY__TYPO", "1")]).unwrap_err();
        assert!(
            err.to_string().contains("TYPO") || err.to_string().contains("typo"),
            "{err}"
        );
    }

    #[test]
    fn declarative_operators_are_checked() {
        let text = format!(
            "{MINIMAL}\n[[operators]]\nname = \"counts\"\nquery = \"SELECT $1\"\ndelete_with = [\"posts\"]\nid = {{ comments = \"post_id\" }}"
        );
        let err = parse(&text, &[]).unwrap_err();
        assert!(err.to_string().contains("delete_with"), "{err}");
    }

    #[test]
    fn scopes_parse_as_field_entity_pairs() {
        let text = format!("{MINIMAL}\n[entities.comments]\nscopes = [[\"post_id -> posts\"]]");
        let config = parse(&text, &[]).unwrap();
        assert_eq!(
            config.entities["comments"].parsed_scopes().unwrap(),
            vec![vec![("post_id".to_owned(), "posts".to_owned())]]
        );
        let bad = format!("{MINIMAL}\n[entities.comments]\nscopes = [[\"post_id posts\"]]");
        assert!(
            parse(&bad, &[])
                .unwrap_err()
                .to_string()
                .contains("entities.comments.scopes")
        );
    }

    #[test]
    fn table_names_mean_the_default_schema_unless_qualified() {
        let text = format!(
            "{MINIMAL}\ntables = [\"posts\", \"public.comments\", \"archive.comments\"]\n\
             [entities.\"public.comments\"]\nscopes = [[\"post_id -> public.posts\"]]\n\
             [[operators]]\nname = \"counts\"\nquery = \"SELECT $1\"\n\
             id = {{ \"public.posts\" = \"id\", \"archive.comments\" = \"post_id\" }}\n\
             delete_with = [\"public.posts\"]\ndelete_query = \"SELECT $1\""
        );
        let config = parse(&text, &[]).unwrap();
        assert_eq!(config.tables, ["posts", "comments", "archive.comments"]);
        assert_eq!(
            config.table_list(),
            [
                ("public".to_owned(), "posts".to_owned()),
                ("public".to_owned(), "comments".to_owned()),
                ("archive".to_owned(), "comments".to_owned()),
            ]
        );
        assert_eq!(
            config.entities["comments"].parsed_scopes().unwrap(),
            vec![vec![("post_id".to_owned(), "posts".to_owned())]]
        );
        let op = &config.operators[0];
        assert_eq!(
            op.id.keys().collect::<Vec<_>>(),
            ["archive.comments", "posts"]
        );
        assert_eq!(op.delete_with, ["posts"]);

        // Another default schema: its tables are unqualified, public's are not.
        let text =
            format!("{MINIMAL}\ndefault_schema = \"app\"\ntables = [\"posts\", \"public.posts\"]");
        let config = parse(&text, &[]).unwrap();
        assert_eq!(config.tables, ["posts", "public.posts"]);
        assert_eq!(
            config.table_list()[0],
            ("app".to_owned(), "posts".to_owned())
        );

        let err = parse(&format!("{MINIMAL}\ntables = [\"a.b.c\"]"), &[]).unwrap_err();
        assert!(err.to_string().contains("tables"), "{err}");
    }

    #[test]
    fn http_is_off_unless_listen_is_set() {
        let config = parse(MINIMAL, &[]).unwrap();
        assert_eq!(config.http.listen, None);
        assert_eq!(config.http.sse_capacity, 1024);
        assert_eq!(config.http.keep_alive, Duration::from_secs(15));
        let config = parse(
            &format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:9187\"\nkeep_alive = \"5s\""),
            &[],
        )
        .unwrap();
        assert_eq!(config.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(config.http.keep_alive, Duration::from_secs(5));
        let config = parse(
            MINIMAL,
            &[
                ("STREAMEX_HTTP__LISTEN", "[::1]:9000"),
                ("STREAMEX_HTTP__SSE_CAPACITY", "8"),
            ],
        )
        .unwrap();
        assert_eq!(config.http.listen, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(config.http.sse_capacity, 8);
    }

    #[test]
    fn http_settings_are_checked_by_name() {
        let err = parse(&format!("{MINIMAL}\n[http]\nlisten = \"localhost\""), &[]).unwrap_err();
        assert!(
            err.to_string().contains("localhost") && err.to_string().contains("127.0.0.1:9187"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}\n[http]\nport = 9187"), &[]).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[http]\nallow_origin = \"a b\""), &[]).unwrap_err();
        assert!(err.to_string().contains("http.allow_origin"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[http]\nsse_capacity = 0"), &[]).unwrap_err();
        assert!(err.to_string().contains("http.sse_capacity"), "{err}");
    }

    #[test]
    fn value_errors_name_the_key_and_where_it_came_from() {
        let err = parse(
            &format!("{MINIMAL}\n[retry]\nretries = 3\non_failure = \"deadletter\""),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("test.toml")
                && err.contains("retry.on_failure (line 4)")
                && err.contains("dead_letter"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}\n[retry]\nmax = 10"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.max (line 3)"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[retry]\ninitial = \"10 sec\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("retry.initial") && err.contains("duration"),
            "{err}"
        );
        let err = parse(MINIMAL, &[("STREAMEX_REPLICATION__BATCH_SIZE", "abc")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment variable STREAMEX_REPLICATION__BATCH_SIZE")
                && err.contains("replication.batch_size")
                && !err.contains("test.toml"),
            "{err}"
        );
        let text =
            format!("{MINIMAL}\n[[operators]]\nname = \"tallies\"\n[operators.retry]\nmax = 5");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("operators.tallies.retry.max"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused_by_key() {
        for (text, key) in [
            (
                "[replication]\nchannel_capacity = 4611686018427387904",
                "replication.channel_capacity",
            ),
            (
                "[replication]\nchannel_capacity = 0",
                "replication.channel_capacity",
            ),
            (
                "[replication]\nbatch_size = 100000000",
                "replication.batch_size",
            ),
            (
                "[replication]\noperator_backlog_bytes = 1000",
                "replication.operator_backlog_bytes",
            ),
            (
                "[replication]\nstatus_interval = \"0s\"",
                "replication.status_interval",
            ),
            (
                "[replication]\nreconnect_initial = \"10s\"\nreconnect_max = \"1s\"",
                "replication.reconnect_max",
            ),
            ("[lock]\nlease = \"500ms\"", "lock.lease"),
            ("[lock]\nlease = \"2h\"", "lock.lease"),
            ("[retry]\nmultiplier = -1.0", "retry.multiplier"),
            ("[retry]\nretries = 100000", "retry.retries"),
            ("[retry]\nmax = \"30d\"", "retry.max"),
            (
                "[[operators]]\nname = \"x\"\n[operators.retry]\nmultiplier = 1000.0",
                "operators.x.retry.multiplier",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{text}"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("out of range"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn retry_delays_grow_to_the_cap() {
        let retry = RetryConfig::default();
        assert_eq!(retry.delay(1), Duration::from_millis(500));
        assert_eq!(retry.delay(2), Duration::from_secs(1));
        assert_eq!(retry.delay(5), Duration::from_secs(8));
        assert_eq!(retry.delay(6), Duration::from_secs(10));
        assert_eq!(retry.delay(1_000), Duration::from_secs(10));
        // 0 reads as the first retry, as it always has.
        assert_eq!(retry.delay(0), Duration::from_millis(500));
        let mut backoff = retry.backoff();
        for attempt in 1..=8 {
            assert_eq!(backoff.next(), Some(retry.delay(attempt)), "{attempt}");
        }
        let reconnect = ReplicationConfig::default().reconnect();
        let waits: Vec<Duration> = reconnect.take(8).collect();
        assert_eq!(waits[0], Duration::from_millis(500));
        assert_eq!(waits[7], Duration::from_secs(30));
    }

    const WEBHOOK: &str = "[[operators]]\nname = \"notify\"\n";

    fn webhook(table: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL}\n{WEBHOOK}webhook = {table}"), &[])
    }

    #[test]
    fn a_webhook_is_read_with_its_defaults() {
        let config = webhook(
            r#"{ url = "https://example.com/hooks", entities = ["comments", "archive.posts"], types = ["insert"] }"#,
        )
        .unwrap();
        let hook = config.operators[0].webhook.as_ref().unwrap();
        assert_eq!(hook.entities, ["comments", "archive.posts"]);
        assert_eq!(hook.types, [crate::event::EventType::Insert]);
        assert_eq!(hook.timeout, Duration::from_secs(10));
        assert_eq!(hook.batch_size, 1);
        assert!(hook.signing_secret("k").unwrap().is_none());
        // Entities are named as everywhere else: public.comments is comments.
        let config =
            webhook(r#"{ url = "http://127.0.0.1:8080/", entities = ["public.comments"], timeout = "2s", batch_size = 50 }"#)
                .unwrap();
        let hook = config.operators[0].webhook.as_ref().unwrap();
        assert_eq!(hook.entities, ["comments"]);
        assert_eq!(hook.timeout, Duration::from_secs(2));
        assert_eq!(hook.batch_size, 50);
    }

    #[test]
    fn webhook_settings_are_checked_by_name() {
        for (table, key, fix) in [
            (
                r#"{ url = "example.com/hooks", entities = ["c"] }"#,
                "operators.notify.webhook.url",
                "https://example.com/hooks",
            ),
            (
                r#"{ url = "ftp://example.com/", entities = ["c"] }"#,
                "operators.notify.webhook.url",
                "not http or https",
            ),
            (
                r#"{ url = "https://example.com/" }"#,
                "operators.notify.webhook.entities",
                "entities = [\"comments\"]",
            ),
            (
                r#"{ url = "https://example.com/", entities = [] }"#,
                "operators.notify.webhook.entities",
                "entities = [\"comments\"]",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], batch_size = 0 }"#,
                "operators.notify.webhook.batch_size",
                "from 1 to 10000",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], timeout = "0s" }"#,
                "operators.notify.webhook.timeout",
                "out of range",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], timeout = "soon" }"#,
                "operators.notify.webhook.timeout",
                "duration",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], types = ["upsert"] }"#,
                "operators.notify.webhook.types",
                "insert",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], secret = "" }"#,
                "operators.notify.webhook.secret",
                "openssl rand",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], secret = "k", secret_file = "/k" }"#,
                "operators.notify.webhook.secret and",
                "keep one",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], secret_file = "/nonexistent/key" }"#,
                "operators.notify.webhook.secret_file",
                "/nonexistent/key",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], headers = { Idempotency-Key = "x" } }"#,
                "operators.notify.webhook.headers",
                "leave it out",
            ),
            (
                r#"{ url = "https://example.com/", entities = ["c"], verify = false }"#,
                "operators.notify.webhook",
                "verify",
            ),
        ] {
            let err = webhook(table).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(fix), "{table}: {err}");
        }
        let text = format!(
            "{MINIMAL}\n{WEBHOOK}query = \"SELECT $1\"\nid = {{ c = \"id\" }}\n\
             webhook = {{ url = \"https://example.com/\", entities = [\"c\"] }}"
        );
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(
            err.contains("operators.notify: `webhook` and `query`"),
            "{err}"
        );
        let text = format!(
            "{MINIMAL}\n{WEBHOOK}settings = {{ a = 1 }}\n\
             webhook = {{ url = \"https://example.com/\", entities = [\"c\"] }}"
        );
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("operators.notify: `settings`"), "{err}");
    }

    #[test]
    fn a_webhook_secret_comes_from_the_environment_or_a_file_and_never_shows() {
        let text = format!(
            "{MINIMAL}\n{WEBHOOK}webhook = {{ url = \"https://hooks.example.com/T0/token\", entities = [\"c\"] }}"
        );
        let config = parse(
            &text,
            &[("STREAMEX_OPERATORS__NOTIFY__WEBHOOK__SECRET", "from-env")],
        )
        .unwrap();
        let hook = config.operators[0].webhook.as_ref().unwrap();
        let secret = hook.signing_secret("k").unwrap().unwrap();
        assert_eq!(secret.expose(), "from-env");
        let debug = format!("{config:?}");
        assert!(debug.contains("https://hooks.example.com"), "{debug}");
        assert!(
            !debug.contains("from-env") && !debug.contains("T0/token"),
            "{debug}"
        );
        // An entry no operator has, and a list without an entry's name, are refused.
        let err = parse(
            &text,
            &[("STREAMEX_OPERATORS__OTHER__WEBHOOK__SECRET", "x")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("STREAMEX_OPERATORS__OTHER__WEBHOOK__SECRET")
                && err.contains("no [[operators]] entry is named \"other\""),
            "{err}"
        );
        let err = parse(&text, &[("STREAMEX_OPERATORS__WEBHOOK", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STREAMEX_OPERATORS__NAME__KEY"), "{err}");
        // A value that reads as a number must be quoted, and the message does not quote it.
        let err = parse(
            &text,
            &[("STREAMEX_OPERATORS__NOTIFY__WEBHOOK__SECRET", "12345")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("operators.notify.webhook.secret") && !err.contains("12345"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file\n").unwrap();
        let text = format!(
            "{MINIMAL}\n{WEBHOOK}webhook = {{ url = \"https://example.com/\", entities = [\"c\"], secret_file = {:?} }}",
            path.display().to_string()
        );
        let config = parse(&text, &[]).unwrap();
        let hook = config.operators[0].webhook.as_ref().unwrap();
        assert_eq!(
            hook.signing_secret("k").unwrap().unwrap().expose(),
            "from-file"
        );
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_duration("ms"), None);
    }
}
