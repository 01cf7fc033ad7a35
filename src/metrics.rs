//! What the service counts for `GET /metrics`, and how it stays off the hot path.
//!
//! ```text
//!  dispatcher ── EventTally: a plain u64 per entity, bumped per event (no lock, no hash);
//!      │          at each commit added to pre-resolved counter handles; offers the commit
//!      │          to the lag probe (two atomics) if none is being timed
//!  coordinator ── Metrics::processed_through(end): the timed commit is done ─► lag histogram
//!  replication stream ── StreamStats: streaming flag, reconnect count (atomics)
//!  engine Board ── events, retries, dead letters, state per operator (already atomics)
//!  scrape ── Snapshot of the above plus the slot from pg_replication_slots ─► text
//! ```
//!
//! The lag histogram is *sampled*: one commit at a time is timed, from its commit time (the
//! server's clock) to the moment every operator is done with it and its process status is
//! stored. Under load that is one sample per acknowledgement round, enough for quantiles
//! without a lock or an allocation per transaction.
//!
//! Each service owns its [`Metrics`] (prometheus-client keeps metrics in a registry value, not
//! in a process-wide recorder), so several services in one process, as in the tests, do not
//! mix their figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::lsn::Lsn;
use crate::replication::SlotInfo;
pub use crate::replication::StreamStats;

/// An operator's state as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorStateKind {
    /// Handling events.
    Running,
    /// Stopped on an error until `streamex resume`.
    Halted,
    /// Reading the rows that existed before its first run (its backfill).
    Backfilling,
    /// A partition stopped at an event of several partitions behind one of its operator's
    /// partitions that is halted; it goes on once that one is resumed.
    Held,
}

impl OperatorStateKind {
    /// `running`, `halted`, `backfilling` or `held`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OperatorStateKind::Running => "running",
            OperatorStateKind::Halted => "halted",
            OperatorStateKind::Backfilling => "backfilling",
            OperatorStateKind::Held => "held",
        }
    }
}

/// What the engine knows of one operator, for status and metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OperatorReport {
    pub name: String,
    pub state: OperatorStateKind,
    /// Every commit up to this end position is done.
    pub done_through: Lsn,
    pub events: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
    /// While it backfills: the rows handled so far.
    pub backfill_rows: Option<u64>,
    /// While it backfills: the rows its tables hold, as the statistics estimate.
    pub backfill_estimate: Option<u64>,
    /// The bytes of events waiting in its inbox, about (see `replication.operator_backlog_bytes`):
    /// near that bound, it is what holds the WAL reader back. `None` without an inbox (halted,
    /// backfilling, or on a worker).
    pub backlog_bytes: Option<u64>,
}

type EntityLabel = [(&'static str, String); 1];

/// Upper bounds, in seconds, of the commit-to-processed lag histogram's buckets.
const LAG_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Where the service is, for `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and setting up.
    Starting = 0,
    /// Waiting for another instance to release the slot's instance lock.
    Standby = 1,
    /// Holding the instance lock: the pipeline runs.
    Active = 2,
}

/// One commit being timed from its commit time to the end of its processing.
#[derive(Debug, Default)]
struct LagProbe {
    /// The timed commit's end position; 0 when none is timed. Only the dispatcher sets it
    /// (from 0), only the coordinator clears it.
    end: AtomicU64,
    /// Its commit time, µs since the Unix epoch; written before `end`.
    committed_at: AtomicI64,
}

/// The service's metrics; see the [module documentation](self).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events_received: Family<EntityLabel, Counter>,
    lag: Histogram,
    probe: LagProbe,
    phase: AtomicU8,
    /// Shared with the replication stream ([`crate::replication::StreamConfig::stats`]).
    pub stream: Arc<StreamStats>,
    /// With `[nats]`: the JetStream publisher's figures.
    pub jetstream: std::sync::OnceLock<Arc<crate::jetstream::PublisherStats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("streamex");
        let events_received = Family::<EntityLabel, Counter>::default();
        registry.register(
            "events_received",
            "Change events received from the replication stream, per entity (counted at commit)",
            events_received.clone(),
        );
        let lag = Histogram::new(LAG_BUCKETS);
        registry.register(
            "commit_to_processed_seconds",
            "Time from a transaction's commit to the moment every operator is done with it and its process status is stored (sampled)",
            lag.clone(),
        );
        Metrics {
            registry,
            events_received,
            lag,
            probe: LagProbe::default(),
            phase: AtomicU8::new(Phase::Starting as u8),
            stream: Arc::default(),
            jetstream: std::sync::OnceLock::new(),
        }
    }

    /// A tally for the dispatcher to count received events with.
    pub fn tally(self: &Arc<Self>) -> EventTally {
        EventTally {
            metrics: self.clone(),
            entities: Vec::new(),
            last: 0,
        }
    }

    /// Every commit up to `end` is processed (its status stored): ends the timing of the
    /// sampled commit if it is one of them.
    pub fn processed_through(&self, end: Lsn) {
        let timed = self.probe.end.load(Ordering::Acquire);
        if timed == 0 || timed > end.0 {
            return;
        }
        let committed_at = self.probe.committed_at.load(Ordering::Relaxed);
        let now = unix_micros();
        // The commit time is the server's clock: a clock ahead of ours reads as no lag.
        self.lag
            .observe((now.saturating_sub(committed_at)).max(0) as f64 / 1e6);
        self.probe.end.store(0, Ordering::Release);
    }

    fn offer(&self, end: Lsn, committed_at: i64) {
        if end.0 != 0 && self.probe.end.load(Ordering::Acquire) == 0 {
            self.probe
                .committed_at
                .store(committed_at, Ordering::Relaxed);
            self.probe.end.store(end.0, Ordering::Release);
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Standby,
            2 => Phase::Active,
            _ => Phase::Starting,
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads), with the
    /// operators' figures and the slot's (`None` when it could not be read) as of now.
    pub fn render(&self, operators: Vec<OperatorReport>, slot: Option<SlotInfo>) -> String {
        let mut now = Registry::with_prefix("streamex");
        now.register_collector(Box::new(Snapshot {
            operators,
            slot,
            phase: self.phase(),
            streaming: self.stream.is_streaming(),
            reconnects: self.stream.reconnects(),
            jetstream: self.jetstream.get().map(|j| j.read()),
        }));
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &now);
        let _ = prometheus_client::encoding::text::encode_eof(&mut text);
        text
    }
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The dispatcher's count of received events: one `u64` per entity, bumped per event with
/// no lock and no hash (the entity name is compared by pointer first: the decoder shares
/// one per table), added to the registry's counters once per commit.
#[derive(Debug)]
pub struct EventTally {
    metrics: Arc<Metrics>,
    /// Per entity seen: its name, its counter (resolved once) and the events not yet added.
    entities: Vec<(Arc<str>, Counter, u64)>,
    last: usize,
}

impl EventTally {
    /// One event of `entity`.
    #[inline]
    pub fn event(&mut self, entity: &Arc<str>) {
        match self.entities.get_mut(self.last) {
            Some(e) if Arc::ptr_eq(&e.0, entity) => e.2 += 1,
            _ => self.find(entity),
        }
    }

    fn find(&mut self, entity: &Arc<str>) {
        let found = self
            .entities
            .iter()
            .position(|e| Arc::ptr_eq(&e.0, entity) || e.0 == *entity);
        self.last = found.unwrap_or_else(|| {
            let counter = self
                .metrics
                .events_received
                .get_or_create(&[("entity", entity.to_string())])
                .clone();
            self.entities.push((entity.clone(), counter, 0));
            self.entities.len() - 1
        });
        self.entities[self.last].2 += 1;
    }

    /// The transaction ending at `end`, committed at `committed_at` (µs since the Unix
    /// epoch), is complete: its events count, and it may become the timed commit.
    pub fn commit(&mut self, end: Lsn, committed_at: i64) {
        for (_, counter, pending) in &mut self.entities {
            if *pending > 0 {
                counter.inc_by(*pending);
                *pending = 0;
            }
        }
        self.metrics.offer(end, committed_at);
    }

    /// The transaction was interrupted (it comes again in full): forget its events.
    pub fn discard(&mut self) {
        for e in &mut self.entities {
            e.2 = 0;
        }
    }
}

/// The figures read at scrape time.
#[derive(Debug)]
struct Snapshot {
    operators: Vec<OperatorReport>,
    slot: Option<SlotInfo>,
    phase: Phase,
    streaming: bool,
    reconnects: u64,
    /// `(published, skipped, paused, in flight)`.
    jetstream: Option<(u64, u64, u64, u64)>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut metric = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    for (operator, value) in values {
        let labels = [("operator", *operator)];
        ConstCounter::new(*value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ops = &self.operators;
        let per_operator = |f: fn(&OperatorReport) -> u64| -> Vec<(&str, u64)> {
            ops.iter().map(|o| (o.name.as_str(), f(o))).collect()
        };
        counter(
            &mut encoder,
            "operator_events_processed",
            "Events an operator has durably handled (or dead-lettered) since the pipeline started",
            &per_operator(|o| o.events),
        )?;
        counter(
            &mut encoder,
            "operator_retries",
            "Handler retries of an operator since the pipeline started",
            &per_operator(|o| o.retries),
        )?;
        counter(
            &mut encoder,
            "operator_dead_letters",
            "Events an operator stored in streamex.dead_letters since the pipeline started",
            &per_operator(|o| o.dead_letters),
        )?;
        {
            let g = ConstGauge::new(0u64);
            let mut metric = encoder.encode_descriptor(
                "operator_state",
                "1 for the state an operator is in (running, halted, backfilling, or held behind a halted partition), 0 for the others",
                None,
                g.metric_type(),
            )?;
            for o in ops {
                for (state, kind) in [
                    ("running", OperatorStateKind::Running),
                    ("halted", OperatorStateKind::Halted),
                    ("backfilling", OperatorStateKind::Backfilling),
                    ("held", OperatorStateKind::Held),
                ] {
                    let labels = [("operator", o.name.as_str()), ("state", state)];
                    ConstGauge::new(u64::from(o.state == kind))
                        .encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, value) in [
            (
                "operator_backfill_rows",
                "Rows a backfilling operator has handled so far",
                (|o: &OperatorReport| o.backfill_rows) as fn(&OperatorReport) -> Option<u64>,
            ),
            (
                "operator_backfill_rows_estimated",
                "Rows the tables of a backfilling operator hold, as the statistics estimate",
                |o: &OperatorReport| o.backfill_estimate,
            ),
            (
                "operator_backlog_bytes",
                "Bytes of decoded events waiting in an operator's inbox, about: near \
                 replication.operator_backlog_bytes, the operator holds the WAL reader back",
                |o: &OperatorReport| o.backlog_bytes,
            ),
        ] {
            let g = ConstGauge::new(0u64);
            let mut metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            for o in ops {
                if let Some(v) = value(o) {
                    ConstGauge::new(v)
                        .encode(metric.encode_family(&[("operator", o.name.as_str())])?)?;
                }
            }
        }
        {
            let g = ConstGauge::new(0u64);
            let mut metric = encoder.encode_descriptor(
                "operator_done_through_lsn",
                "The end position (LSN as a number) through which an operator is done",
                None,
                g.metric_type(),
            )?;
            for o in ops {
                ConstGauge::new(o.done_through.0)
                    .encode(metric.encode_family(&[("operator", o.name.as_str())])?)?;
            }
        }
        if let Some(slot) = &self.slot {
            if let Some(confirmed) = slot.confirmed_flush_lsn {
                gauge(
                    &mut encoder,
                    "slot_confirmed_flush_lsn",
                    "The slot's confirmed_flush_lsn as a number: everything before it is acknowledged",
                    confirmed.0,
                )?;
            }
            if let Some(retained) = slot.retained_bytes {
                gauge(
                    &mut encoder,
                    "slot_wal_retained_bytes",
                    "WAL the slot keeps from removal: pg_current_wal_lsn() - restart_lsn",
                    u64::try_from(retained).unwrap_or(0),
                )?;
            }
            if let Some(lag) = slot.lag_bytes {
                gauge(
                    &mut encoder,
                    "slot_lag_bytes",
                    "WAL written after the slot's confirmed position: pg_current_wal_lsn() - confirmed_flush_lsn",
                    u64::try_from(lag).unwrap_or(0),
                )?;
            }
        }
        if let Some((published, skipped, paused, in_flight)) = self.jetstream {
            for (name, help, value) in [
                (
                    "jetstream_published",
                    "Events JetStream has acknowledged since the pipeline started",
                    published,
                ),
                (
                    "jetstream_skipped",
                    "Events not published again because the stream already had them (after a restart)",
                    skipped,
                ),
            ] {
                let c = ConstCounter::new(value);
                c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
            gauge(
                &mut encoder,
                "jetstream_paused",
                "1 while JetStream is unavailable and the pipeline waits for it (nothing is acknowledged)",
                paused,
            )?;
            gauge(
                &mut encoder,
                "jetstream_in_flight",
                "Publications awaiting JetStream's acknowledgement",
                in_flight,
            )?;
        }
        let c = ConstCounter::new(self.reconnects);
        c.encode(encoder.encode_descriptor(
            "replication_reconnects",
            "Replication sessions started again after a transient failure",
            None,
            c.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "replication_streaming",
            "1 while a replication session is streaming",
            u64::from(self.streaming),
        )?;
        gauge(
            &mut encoder,
            "instance_active",
            "1 when this instance holds the slot's instance lock, 0 while standby or starting",
            u64::from(self.phase == Phase::Active),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_at_commit_and_forget_interrupted_transactions() {
        let metrics = Arc::new(Metrics::new());
        let mut tally = metrics.tally();
        let (posts, comments): (Arc<str>, Arc<str>) = (Arc::from("posts"), Arc::from("comments"));
        tally.event(&posts);
        tally.event(&comments);
        tally.event(&Arc::from("posts")); // an equal name in another allocation
        let text = metrics.render(Vec::new(), None);
        assert!(!text.contains("entity=\"posts\"} 2"), "{text}");
        tally.commit(Lsn(100), 0);
        tally.event(&posts);
        tally.discard();
        tally.commit(Lsn(200), 0);
        let text = metrics.render(Vec::new(), None);
        assert!(
            text.contains("streamex_events_received_total{entity=\"posts\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("streamex_events_received_total{entity=\"comments\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn one_commit_at_a_time_is_timed() {
        let metrics = Arc::new(Metrics::new());
        let mut tally = metrics.tally();
        let long_ago = unix_micros() - 2_000_000;
        tally.commit(Lsn(100), long_ago);
        tally.commit(Lsn(200), 0); // not timed: 100 is
        metrics.processed_through(Lsn(50));
        assert!(
            metrics
                .render(Vec::new(), None)
                .contains("streamex_commit_to_processed_seconds_count 0")
        );
        metrics.processed_through(Lsn(150));
        let text = metrics.render(Vec::new(), None);
        assert!(
            text.contains("streamex_commit_to_processed_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("streamex_commit_to_processed_seconds_bucket{le=\"1.0\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("streamex_commit_to_processed_seconds_bucket{le=\"2.5\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn operators_and_slot_are_rendered_as_of_the_scrape() {
        let metrics = Metrics::new();
        metrics.stream.streaming();
        metrics.stream.reconnecting();
        let report = OperatorReport {
            name: "tallies".into(),
            state: OperatorStateKind::Halted,
            done_through: Lsn(0x100),
            events: 7,
            retries: 2,
            dead_letters: 1,
            last_error: Some("boom".into()),
            backfill_rows: None,
            backfill_estimate: None,
            backlog_bytes: Some(4096),
        };
        let text = metrics.render(vec![report], None);
        for line in [
            "streamex_operator_events_processed_total{operator=\"tallies\"} 7",
            "streamex_operator_retries_total{operator=\"tallies\"} 2",
            "streamex_operator_dead_letters_total{operator=\"tallies\"} 1",
            "streamex_operator_state{operator=\"tallies\",state=\"halted\"} 1",
            "streamex_operator_state{operator=\"tallies\",state=\"running\"} 0",
            "streamex_operator_done_through_lsn{operator=\"tallies\"} 256",
            "streamex_operator_backlog_bytes{operator=\"tallies\"} 4096",
            "streamex_replication_reconnects_total 1",
            "streamex_replication_streaming 1",
            "streamex_instance_active 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("slot_"), "{text}");
    }
}
