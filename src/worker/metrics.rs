//! A worker's figures, served on `/metrics` when `[http] listen` is set (`http.rs`).
//!
//! ```text
//! streamex_worker_lock_held{operator}            1 while this worker runs the operator
//! streamex_worker_acked_sequence{operator}       the stream sequence acknowledged through
//! streamex_worker_delivered_events_total{operator} events given to the operator
//! streamex_worker_sessions_total{operator}       consumers made (starts, resumes, lost deliveries)
//! streamex_worker_nats_connected                 1 while the NATS connection is up
//! ```

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type OperatorLabel = [(&'static str, String); 1];

/// Every figure of one worker.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    registry: Registry,
    lock_held: Family<OperatorLabel, Gauge>,
    acked: Family<OperatorLabel, Gauge<u64, AtomicU64>>,
    delivered: Family<OperatorLabel, Counter>,
    sessions: Family<OperatorLabel, Counter>,
    nats_connected: Gauge,
}

/// The figures of one operator.
#[derive(Clone, Debug)]
pub(crate) struct OperatorMetrics {
    pub lock_held: Gauge,
    pub acked: Gauge<u64, AtomicU64>,
    pub delivered: Counter,
    pub sessions: Counter,
}

impl WorkerMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("streamex_worker");
        let lock_held = Family::<OperatorLabel, Gauge>::default();
        registry.register(
            "lock_held",
            "1 while this worker holds the operator's lock and runs it, 0 while it stands by",
            lock_held.clone(),
        );
        let acked = Family::<OperatorLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "acked_sequence",
            "The stream sequence through which the operator's consumer is acknowledged (the operator is durably done)",
            acked.clone(),
        );
        let delivered = Family::<OperatorLabel, Counter>::default();
        registry.register(
            "delivered_events",
            "Events given to the operator (a message it does not subscribe to is not counted)",
            delivered.clone(),
        );
        let sessions = Family::<OperatorLabel, Counter>::default();
        registry.register(
            "sessions",
            "Consumers made for the operator: starts, resumes, and restarts after a lost delivery or a pull error",
            sessions.clone(),
        );
        let nats_connected = Gauge::default();
        registry.register(
            "nats_connected",
            "1 while the connection to NATS (nats.url) is up",
            nats_connected.clone(),
        );
        WorkerMetrics {
            registry,
            lock_held,
            acked,
            delivered,
            sessions,
            nats_connected,
        }
    }

    /// The figures of `operator`, shown from now on (at 0).
    pub(crate) fn operator(&self, operator: &str) -> OperatorMetrics {
        let label = [("operator", operator.to_owned())];
        OperatorMetrics {
            lock_held: self.lock_held.get_or_create(&label).clone(),
            acked: self.acked.get_or_create(&label).clone(),
            delivered: self.delivered.get_or_create(&label).clone(),
            sessions: self.sessions.get_or_create(&label).clone(),
        }
    }

    /// Says whether the NATS connection is up.
    pub(crate) fn nats_connected(&self, connected: bool) {
        self.nats_connected.set(i64::from(connected));
    }

    /// The OpenMetrics text.
    pub(crate) fn render(&self) -> String {
        let mut text = String::with_capacity(2048);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operator_s_figures_are_labelled_with_its_name() {
        let metrics = WorkerMetrics::new();
        let tallies = metrics.operator("tallies");
        let _counts = metrics.operator("counts");
        tallies.lock_held.set(1);
        tallies.acked.set(42);
        tallies.delivered.inc_by(3);
        tallies.sessions.inc();
        metrics.nats_connected(true);
        let text = metrics.render();
        for line in [
            "streamex_worker_lock_held{operator=\"tallies\"} 1",
            "streamex_worker_lock_held{operator=\"counts\"} 0",
            "streamex_worker_acked_sequence{operator=\"tallies\"} 42",
            "streamex_worker_delivered_events_total{operator=\"tallies\"} 3",
            "streamex_worker_sessions_total{operator=\"tallies\"} 1",
            "streamex_worker_nats_connected 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
