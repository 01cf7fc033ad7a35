//! The replication stream's own figures, for `/metrics` and `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The replication stream's own figures, updated by the stream task.
#[derive(Debug, Default)]
pub struct StreamStats {
    streaming: AtomicBool,
    reconnects: AtomicU64,
}

impl StreamStats {
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
