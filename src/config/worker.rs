//! `[worker]`: how `streamex worker` consumes the JetStream stream (see `src/worker`).

use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// `[worker]`: the JetStream consumer of each operator a worker runs. Only `streamex worker`
/// reads it; every key has a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// How long JetStream waits for a delivered message's acknowledgement before it sends
    /// the message again (the consumer's `ack_wait`). A worker acknowledges a message once
    /// the operator has durably handled it, so this must be longer than a batch takes; a
    /// message sent again is recognised by its position and not handled twice.
    #[serde(deserialize_with = "duration")]
    pub ack_wait: Duration,
    /// Messages delivered to an operator and not yet acknowledged, at most (the consumer's
    /// `max_ack_pending`, and what a worker holds in memory per operator).
    pub max_ack_pending: usize,
    /// How long one pull request waits for messages before the worker asks again.
    #[serde(deserialize_with = "duration")]
    pub pull_wait: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
            pull_wait: Duration::from_secs(1),
        }
    }
}

impl WorkerConfig {
    /// What does not hold together; the message names the key and the fix.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.ack_wait < Duration::from_secs(1) {
            return Err(format!(
                "worker.ack_wait ({:?}) is too short: JetStream would send messages again while \
                 the operator is still handling them; give at least \"1s\" (the default is \
                 \"30s\")",
                self.ack_wait
            ));
        }
        if self.max_ack_pending == 0 || self.max_ack_pending > 1_000_000 {
            return Err(format!(
                "worker.max_ack_pending ({}) must be from 1 to 1000000 (the default is 1024)",
                self.max_ack_pending
            ));
        }
        if self.pull_wait < Duration::from_millis(10) || self.pull_wait > Duration::from_secs(60) {
            return Err(format!(
                "worker.pull_wait ({:?}) must be from \"10ms\" to \"60s\" (the default is \"1s\")",
                self.pull_wait
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;

    fn parse(extra: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        Config::parse(
            &format!("database_url = \"postgres://localhost/blog\"\n{extra}"),
            "test.toml",
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_section_has_defaults_takes_the_environment_and_names_what_is_refused() {
        let config = parse("", &[]).unwrap();
        assert_eq!(config.worker.ack_wait, Duration::from_secs(30));
        assert_eq!(config.worker.max_ack_pending, 1024);
        let config = parse(
            "[worker]\nack_wait = \"2min\"",
            &[("STREAMEX_WORKER__MAX_ACK_PENDING", "64")],
        )
        .unwrap();
        assert_eq!(config.worker.ack_wait, Duration::from_secs(120));
        assert_eq!(config.worker.max_ack_pending, 64);
        let short = parse("[worker]\nack_wait = \"10ms\"", &[]).unwrap_err();
        assert!(
            short.contains("worker.ack_wait") && short.contains("1s"),
            "{short}"
        );
        let none = parse("[worker]\nmax_ack_pending = 0", &[]).unwrap_err();
        assert!(none.contains("worker.max_ack_pending"), "{none}");
        let typo = parse("[worker]\nack_wiat = \"1s\"", &[]).unwrap_err();
        assert!(typo.contains("ack_wiat"), "{typo}");
    }
}
