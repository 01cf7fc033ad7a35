//! What a worker holds of an operator's deliveries: the messages delivered and not yet
//! acknowledged, in stream order, and what tells a new message from one sent again or one
//! that went missing.
//!
//! ```text
//!  delivery (stream seq, consumer seq) ──► arrive: New | Again { done } | Missed
//!  New ─► hold(seq, message) ─► (the operator handles it) ─► done_through(seq) ─► the message to acknowledge
//! ```
//!
//! Acknowledgement is cumulative (the consumer's ack policy is `all`): acknowledging the
//! newest message the operator is done through acknowledges every one before it, so
//! [`Held::done_through`] gives at most one message to acknowledge, and only one the operator
//! is durably done with.

use std::collections::VecDeque;

/// How a delivery relates to what came before it in this session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A message after every one delivered so far: to handle.
    New,
    /// A message delivered before (JetStream sends one again once its `ack_wait` passes).
    /// `done`: the operator is done with it, and it is acknowledged at once; otherwise the
    /// first copy, still held, is acknowledged when it is done.
    Again { done: bool },
    /// A delivery before this one never arrived (lost on the way, or to a pull request
    /// given up): JetStream sends it again only after `ack_wait`, after the messages that
    /// follow it, so the session must start again from what is done to keep stream order.
    Missed {
        /// The consumer sequence that was expected.
        expected: u64,
        /// The one that came.
        got: u64,
    },
}

/// Messages `M` delivered and not yet acknowledged, by stream sequence.
#[derive(Debug)]
pub(crate) struct Held<M> {
    queue: VecDeque<(u64, M)>,
    /// Every message up to this stream sequence is acknowledged (or was before the session).
    acked_through: u64,
    /// The greatest stream sequence delivered in this session.
    highest: Option<u64>,
    /// The consumer sequence of the last delivery (each delivery, a repeated one too, takes
    /// the next one); 0 before the first, since each session makes its consumer anew.
    last_delivery: u64,
}

impl<M> Held<M> {
    /// Nothing held; everything through `acked_through` is acknowledged.
    pub(crate) fn new(acked_through: u64) -> Self {
        Held {
            queue: VecDeque::new(),
            acked_through,
            highest: None,
            last_delivery: 0,
        }
    }

    /// Tells what the delivery of stream sequence `stream` as consumer sequence `delivery`
    /// is.
    ///
    /// Only the consumer sequence after the last one is taken, from 1 on (the session made
    /// the consumer). Any other is [`Arrival::Missed`]: one skipped went to someone else or
    /// was lost; one that goes back comes from another state of the consumer (the server
    /// restarted from an older one, or another worker of the operator, holding it after a
    /// lost lock, made the consumer anew under the same name and its deliveries now reach this
    /// pull). Taking such a delivery could hand the operator a message whose predecessors it
    /// never got, and its checkpoint's compare-and-set, which stops doubles, cannot tell a gap.
    pub(crate) fn arrive(&mut self, stream: u64, delivery: u64) -> Arrival {
        let expected = self.last_delivery.saturating_add(1);
        if delivery != expected {
            return Arrival::Missed {
                expected,
                got: delivery,
            };
        }
        self.last_delivery = delivery;
        if stream <= self.acked_through {
            return Arrival::Again { done: true };
        }
        if self.highest.is_some_and(|highest| stream <= highest) {
            return Arrival::Again { done: false };
        }
        self.highest = Some(stream);
        Arrival::New
    }

    /// Holds `message`, at stream sequence `stream` (after [`Arrival::New`]), until the
    /// operator is done through it.
    pub(crate) fn hold(&mut self, stream: u64, message: M) {
        debug_assert!(self.queue.back().is_none_or(|(last, _)| *last < stream));
        self.queue.push_back((stream, message));
    }

    /// The operator is done through stream sequence `through`: drops the messages up to it
    /// and returns the last of them, to acknowledge (with every one before it).
    pub(crate) fn done_through(&mut self, through: u64) -> Option<M> {
        let mut last = None;
        while self.queue.front().is_some_and(|(seq, _)| *seq <= through) {
            last = self.queue.pop_front();
        }
        let (seq, message) = last?;
        self.acked_through = self.acked_through.max(seq);
        Some(message)
    }

    /// The greatest stream sequence delivered in this session.
    pub(crate) fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Every message up to here is acknowledged.
    pub(crate) fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// How many messages are held (delivered, not yet acknowledged).
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_acknowledged_before_the_operator_is_done_and_then_the_newest_done_message() {
        let mut held = Held::new(10);
        for (stream, delivery) in [(11, 1), (12, 2), (15, 3)] {
            assert_eq!(held.arrive(stream, delivery), Arrival::New);
            held.hold(stream, format!("m{stream}"));
        }
        assert_eq!(held.done_through(10), None, "done only through the start");
        assert_eq!(held.acked_through(), 10);
        assert_eq!(held.done_through(14), Some("m12".to_owned()));
        assert_eq!(held.acked_through(), 12);
        assert_eq!(held.len(), 1);
        assert_eq!(held.done_through(14), None, "nothing new");
        assert_eq!(held.done_through(15), Some("m15".to_owned()));
        assert_eq!(held.acked_through(), 15);
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn a_message_sent_again_is_not_handled_twice_and_is_acknowledged_once_done() {
        let mut held = Held::new(0);
        assert_eq!(held.arrive(1, 1), Arrival::New);
        held.hold(1, 1);
        assert_eq!(held.arrive(2, 2), Arrival::New);
        held.hold(2, 2);
        // ack_wait passed: both come again, as deliveries 3 and 4.
        assert_eq!(held.arrive(1, 3), Arrival::Again { done: false });
        assert_eq!(held.done_through(1), Some(1));
        assert_eq!(held.arrive(2, 4), Arrival::Again { done: false });
        assert_eq!(held.arrive(1, 5), Arrival::Again { done: true });
        assert_eq!(held.arrive(3, 6), Arrival::New);
    }

    #[test]
    fn only_the_next_delivery_of_the_session_s_consumer_is_taken() {
        let mut held: Held<()> = Held::new(4);
        assert_eq!(
            held.arrive(6, 2),
            Arrival::Missed {
                expected: 1,
                got: 2
            },
            "the first delivery of a consumer this session made is 1: 1 went elsewhere"
        );
        let mut held: Held<()> = Held::new(4);
        assert_eq!(held.arrive(5, 1), Arrival::New);
        // Stream sequences may jump (a filtered consumer); deliveries may not.
        assert_eq!(held.arrive(9, 2), Arrival::New);
        assert_eq!(
            held.arrive(12, 4),
            Arrival::Missed {
                expected: 3,
                got: 4
            }
        );
        assert_eq!(
            held.arrive(6, 1),
            Arrival::Missed {
                expected: 3,
                got: 1
            },
            "a consumer sequence going back is another state of the consumer"
        );
        assert_eq!(held.arrive(10, 3), Arrival::New);
    }
}
