//! Acknowledgement: how downstream tells the stream what is durably done.
//!
//! The slot's confirmed position is the promise streamex makes: PostgreSQL may remove the WAL
//! before it, and after a restart streaming resumes from it. So it moves only when downstream
//! calls [`Acknowledger::ack`] with the end of a commit whose every change is durably
//! processed, and it never moves backwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::lsn::Lsn;

/// A cloneable handle to the stream's acknowledged position.
#[derive(Clone, Debug, Default)]
pub struct Acknowledger {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    flushed: AtomicU64,
    changed: Notify,
}

impl Acknowledger {
    /// A handle starting at `lsn` (what the slot had already confirmed).
    pub fn starting_at(lsn: Lsn) -> Self {
        let ack = Self::default();
        ack.inner.flushed.store(lsn.0, Ordering::Release);
        ack
    }

    /// Declares everything before `lsn` durably processed: the end LSN of a commit
    /// ([`crate::decode::Decoded::Commit`]'s `end_lsn`) once all of its changes are done.
    /// A smaller value than before is ignored: progress never moves backwards.
    pub fn ack(&self, lsn: Lsn) {
        let previous = self.inner.flushed.fetch_max(lsn.0, Ordering::AcqRel);
        if lsn.0 > previous {
            self.inner.changed.notify_one();
        }
    }

    /// The position acknowledged so far.
    pub fn acknowledged(&self) -> Lsn {
        Lsn(self.inner.flushed.load(Ordering::Acquire))
    }

    /// Waits until the position moves (or returns at once if it moved since the last wait).
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_moves_backwards() {
        let ack = Acknowledger::starting_at(Lsn(100));
        ack.ack(Lsn(50));
        assert_eq!(ack.acknowledged(), Lsn(100));
        ack.ack(Lsn(200));
        let clone = ack.clone();
        clone.ack(Lsn(150));
        assert_eq!(ack.acknowledged(), Lsn(200));
    }

    #[tokio::test]
    async fn wakes_a_waiter_when_it_moves() {
        let ack = Acknowledger::default();
        let waiter = {
            let ack = ack.clone();
            tokio::spawn(async move {
                ack.changed().await;
                ack.acknowledged()
            })
        };
        ack.ack(Lsn(7));
        assert_eq!(waiter.await.unwrap(), Lsn(7));
    }
}
