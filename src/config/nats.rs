//! `[nats]`: every event published to a NATS JetStream stream (see `src/jetstream`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Secret, duration};

/// `[nats]`: where events are published. Without this section nothing is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server(s): `nats://host:4222`, several separated by commas (the client reconnects
    /// to any of them), `tls://` to require TLS.
    pub url: String,
    /// The JetStream stream, created by `streamex setup` when missing. It belongs to
    /// streamex: nothing else may publish to it (each publication names the stream sequence
    /// it expects to follow).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subjects are `<subject_prefix>.<schema>.<table>` for a table's events and
    /// `<subject_prefix>.messages.<message prefix>` for outbox messages; the stream takes
    /// `<subject_prefix>.>`.
    #[serde(default = "default_stream")]
    pub subject_prefix: String,
    /// Partitions of each table's subject: with more than 1, a row's events go to
    /// `<subject_prefix>.<schema>.<table>.<p>`, `p` from the hash of its key (the
    /// `Streamex-Key` header): FNV-1a (64 bits) of the header's bytes, modulo `partitions`.
    /// Events without a key (a truncate, a table without a replica identity key) and
    /// outbox messages go to partition 0. 1 (the default): no partition token.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// A `.creds` file (JWT and NKey seed) to authenticate with.
    pub credentials: Option<PathBuf>,
    /// A user name, with `password`.
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<Secret>,
    /// A token to authenticate with.
    pub token: Option<Secret>,
    /// CA certificate(s) (PEM) to verify the server with, instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), with `tls_key`, for servers that ask for one.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Publications sent and not yet acknowledged by JetStream, at most.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long to wait for JetStream's acknowledgement of one publication (or an answer to
    /// any request) before taking the server as unavailable.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The stream's duplicate window (JetStream drops a publication whose `Nats-Msg-Id` it
    /// has seen within it).
    #[serde(default = "default_duplicate_window", deserialize_with = "duration")]
    pub duplicate_window: Duration,
    /// How long the stream keeps a message; 0 (the default): no limit.
    #[serde(default, deserialize_with = "duration")]
    pub max_age: Duration,
    /// The stream's size limit in bytes, oldest messages discarded past it; none by default.
    pub max_bytes: Option<i64>,
    /// `file` (the default) or `memory` (lost when the server restarts).
    #[serde(default)]
    pub storage: NatsStorage,
    /// Copies of the stream in a JetStream cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

/// Where JetStream keeps the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// On disk.
    #[default]
    File,
    /// In memory.
    Memory,
}

fn default_stream() -> String {
    "streamex".to_owned()
}

fn default_partitions() -> u32 {
    1
}

/// The most partitions a stream's subjects take.
pub(crate) const MAX_PARTITIONS: u32 = 1024;

fn default_max_in_flight() -> usize {
    512
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

fn default_replicas() -> usize {
    1
}

impl NatsConfig {
    /// A section for `url` with every other setting at its default.
    pub fn new(url: &str) -> Self {
        NatsConfig {
            url: url.to_owned(),
            stream: default_stream(),
            subject_prefix: default_stream(),
            partitions: default_partitions(),
            credentials: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            max_in_flight: default_max_in_flight(),
            timeout: default_timeout(),
            duplicate_window: default_duplicate_window(),
            max_age: Duration::ZERO,
            max_bytes: None,
            storage: NatsStorage::File,
            replicas: default_replicas(),
        }
    }

    /// What does not hold together; the message names the key and the fix.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err(
                "nats.url is empty: give the server, such as \"nats://127.0.0.1:4222\"".into(),
            );
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.stream) {
            return Err(format!(
                "nats.stream: {:?} may hold only letters, digits, '_' and '-' (JetStream's rule \
                 for stream names)",
                self.stream
            ));
        }
        let prefix_ok = self.subject_prefix.split('.').all(name_ok);
        if !prefix_ok {
            return Err(format!(
                "nats.subject_prefix: {:?} must be one or more tokens of letters, digits, '_' \
                 and '-' separated by dots (such as \"cdc.shop\")",
                self.subject_prefix
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(format!(
                "nats.partitions: {} is out of range: give 1 (no partition token) to \
                 {MAX_PARTITIONS}",
                self.partitions
            ));
        }
        if self.max_in_flight == 0 || self.replicas == 0 || self.timeout.is_zero() {
            return Err(
                "nats.max_in_flight, nats.replicas and nats.timeout must be more than 0".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("nats.user and nats.password go together: set both, or neither".into());
        }
        let ways = [
            self.credentials.is_some(),
            self.user.is_some(),
            self.token.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(
                "nats.credentials, nats.user/password and nats.token are three ways to \
                 authenticate: keep one of them"
                    .into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("nats.tls_cert and nats.tls_key go together: set both, or neither".into());
        }
        if self.duplicate_window.is_zero() {
            return Err(
                "nats.duplicate_window must be more than 0: it is what lets JetStream drop a \
                 publication sent again after a lost acknowledgement"
                    .into(),
            );
        }
        if !self.max_age.is_zero() && self.duplicate_window > self.max_age {
            return Err(format!(
                "nats.duplicate_window ({:?}) is longer than nats.max_age ({:?}): JetStream \
                 refuses that; shorten the window or keep messages longer",
                self.duplicate_window, self.max_age
            ));
        }
        Ok(())
    }
}
