//! The replication stream's own figures, for `/metrics` and `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::lsn::PG_EPOCH_OFFSET_MICROS;

/// The replication stream's own figures, updated by the stream task.
#[derive(Debug)]
pub struct StreamStats {
    streaming: AtomicBool,
    reconnects: AtomicU64,
    /// This machine's clock less the server's, in microseconds: the least difference seen
    /// between a message's arrival and the server's clock when it sent it (transit and
    /// buffering only add to it). `i64::MAX` until a message has come.
    clock_offset: AtomicI64,
}

impl Default for StreamStats {
    fn default() -> Self {
        StreamStats {
            streaming: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            clock_offset: AtomicI64::new(i64::MAX),
        }
    }
}

/// Now, in microseconds since the Unix epoch, by this machine's clock.
pub(crate) fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl StreamStats {
    /// A message arrived that the server sent at `clock` (its clock, microseconds since
    /// 2000-01-01).
    pub fn server_clock(&self, clock: i64) {
        let offset = unix_micros_now().saturating_sub(clock.saturating_add(PG_EPOCH_OFFSET_MICROS));
        self.clock_offset.fetch_min(offset, Ordering::Relaxed);
    }

    /// The server's clock now, in microseconds since the Unix epoch, as this machine's clock
    /// and the messages' send times tell it (this machine's clock until a message came): what
    /// commit times are compared with to tell how far behind an operator is, whatever the
    /// skew between the two clocks.
    pub fn server_now(&self) -> i64 {
        let offset = self.clock_offset.load(Ordering::Relaxed);
        let now = unix_micros_now();
        if offset == i64::MAX {
            now
        } else {
            now.saturating_sub(offset)
        }
    }

    /// A session has started streaming (`START_REPLICATION` accepted).
    pub fn streaming(&self) {
        self.streaming.store(true, Ordering::Relaxed);
    }

    /// The session ended (shutdown, or a failure that may be retried).
    pub fn ended(&self) {
        self.streaming.store(false, Ordering::Relaxed);
    }

    /// A new session is about to be tried after a transient failure.
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a session is streaming now.
    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// How many sessions were restarted after a transient failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_s_clock_is_this_one_less_the_least_offset_seen() {
        let stats = StreamStats::default();
        let before = unix_micros_now();
        assert!((stats.server_now() - before).abs() < 60_000_000);
        // A server whose clock is an hour behind ours; one message came late (buffered).
        let hour = 3_600_000_000;
        let server = |skew: i64| unix_micros_now() - PG_EPOCH_OFFSET_MICROS - skew;
        stats.server_clock(server(hour + 5_000_000));
        stats.server_clock(server(hour));
        let now = stats.server_now();
        let expected = unix_micros_now() - hour;
        assert!(
            (now - expected).abs() < 1_000_000,
            "{now} vs {expected}: the late message must not count"
        );
    }
}
