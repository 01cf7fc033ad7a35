//! The bus: a registry of bounded subscriber queues, cut off when full.
//!
//! Each subscription owns a `tokio::sync::mpsc` channel of its own; the bus keeps the only
//! sender. Publishing `try_send`s under a `std::sync::Mutex` held for the whole
//! [`PubSub::publish`] call (never across an `.await`). On `Full` the bus records the position
//! of the refused event in the subscription's cut-off cell, *then* drops the sender: the
//! receiver drains what it already has, sees the channel closed, finds the cell set and
//! reports [`RecvError::Lagged`]. Since the sender is gone, nothing published later can reach
//! the subscription, so it never sees an event after a gap.
//!
//! An event goes out as a [`Published`]: the `Arc<Event>` and one lazily filled cell for its
//! JSON, shared by every subscriber of every channel it is published on, so that many
//! subscribers serialising it (the Server-Sent Events clients) hold one copy of the bytes.
//! A subscription may also be bounded in bytes ([`PubSub::subscribe_with_max_bytes`]): the
//! bus then serialises the event before taking the lock, weighs it by its JSON, and cuts the
//! subscription off as on `Full` when the bytes it has queued would pass the bound.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use crate::event::Event;
use crate::lsn::{Lsn, Position};

/// The name of the channel [`EntityProcessed`] notices go to.
pub const PROCESSED_CHANNEL: &str = "EntityProcessed";

/// Why a subscription yields no more items.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The subscriber's queue was full when an item was published, so the subscriber was cut
    /// off. `dropped_at` is the position of the first item it missed; it has received every
    /// item before that one.
    #[error(
        "subscriber of {channel} fell behind and was cut off; first missed event at {dropped_at}"
    )]
    Lagged {
        /// The channel it was subscribed to.
        channel: String,
        /// The first event it did not get.
        dropped_at: Position,
    },
    /// The bus was dropped; the subscriber has received everything published before.
    #[error("the publish/subscribe bus is closed")]
    Closed,
}

/// Notice that an entity's events have been processed up to a position (EventStreamex's
/// `EntityProcessed` message), published on [`PROCESSED_CHANNEL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityProcessed {
    /// The entity (see [`crate::event::Event::entity`]).
    pub entity: String,
    /// The entity's last processed event.
    pub position: Position,
    /// The process-status timestamp, in microseconds since the Unix epoch.
    pub timestamp: i64,
}

/// One published event as its subscribers receive it: the event, and its JSON (what
/// `streamex tail` prints) serialised at most once for all of them. Cheap to clone: clones
/// share the event and the JSON.
#[derive(Clone)]
pub struct Published(Arc<PublishedInner>);

struct PublishedInner {
    event: Arc<Event>,
    json: OnceLock<Bytes>,
}

impl Published {
    /// `event`, not serialised yet.
    pub fn new(event: Arc<Event>) -> Self {
        Published(Arc::new(PublishedInner {
            event,
            json: OnceLock::new(),
        }))
    }

    /// The event.
    pub fn event(&self) -> &Arc<Event> {
        &self.0.event
    }

    /// The event's JSON ([`Event::to_json`]), written on the first call and shared by every
    /// later one, from any clone: every subscriber gets the same allocation.
    pub fn json(&self) -> &Bytes {
        self.0
            .json
            .get_or_init(|| Bytes::from(self.0.event.to_json()))
    }
}

impl fmt::Debug for Published {
    // The position only: records hold row values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let position = self.0.event.position();
        f.debug_struct("Published")
            .field("position", &format_args!("{position}"))
            .field("json_bytes", &self.0.json.get().map(Bytes::len))
            .finish()
    }
}

/// What an item weighs in a queue bounded in bytes.
trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Published {
    fn weight(&self) -> usize {
        self.json().len()
    }
}

impl Weigh for Arc<EntityProcessed> {
    fn weight(&self) -> usize {
        std::mem::size_of::<EntityProcessed>() + self.entity.len()
    }
}

/// Where a subscription was cut off; set once, by the bus, before it drops the sender.
type CutOff = Arc<OnceLock<Position>>;

/// The bytes a subscription's queue holds: added by the bus when it queues an item, taken
/// off by the receiver when it takes the item out.
type Queued = Arc<AtomicUsize>;

/// A queue's bound in bytes.
struct ByteBound {
    max: usize,
    queued: Queued,
}

/// The bus's end of one subscription.
struct Slot<T> {
    tx: mpsc::Sender<T>,
    cut_off: CutOff,
    bytes: Option<ByteBound>,
}

impl<T: Weigh> Slot<T> {
    /// Offers `item`; `false` when the slot must be removed (full, in items or in bytes: cut
    /// off; or closed).
    fn offer(&self, item: T, position: Position) -> bool {
        if let Some(bound) = &self.bytes {
            let weight = item.weight();
            // Only the receiver takes bytes off meanwhile, so this errs on the safe side.
            let queued = bound.queued.load(Ordering::Acquire);
            // One item larger than the bound still goes to a queue that holds nothing else,
            // or a subscriber could never get it.
            if queued > 0 && queued.saturating_add(weight) > bound.max {
                let _ = self.cut_off.set(position);
                return false;
            }
            // Added before the item is sent, so the receiver never takes off more than this.
            bound.queued.fetch_add(weight, Ordering::AcqRel);
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                // Set before the sender is dropped (by the caller removing the slot), so the
                // receiver, seeing the channel closed, always finds it.
                let _ = self.cut_off.set(position);
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// Offers `item` to every slot, in order, removing those that are full or closed.
fn deliver<T: Clone + Weigh>(slots: &mut Vec<Slot<T>>, item: &T, position: Position) {
    slots.retain(|slot| slot.offer(item.clone(), position));
}

/// The largest queue a subscription gets; tokio's bounded channel panics above
/// `usize::MAX >> 3`, and the queue is not preallocated, so this is no practical limit.
const MAX_CAPACITY: usize = usize::MAX >> 4;

/// A new subscription's two ends, bounded in bytes too if `max_bytes` is given. The capacity
/// is clamped to `1..=MAX_CAPACITY`.
fn pair<T>(capacity: usize, max_bytes: Option<usize>) -> (Slot<T>, Inbox<T>) {
    let (tx, rx) = mpsc::channel(capacity.clamp(1, MAX_CAPACITY));
    let cut_off = CutOff::default();
    let bytes = max_bytes.map(|max| ByteBound {
        max,
        queued: Queued::default(),
    });
    let inbox = Inbox {
        rx,
        cut_off: cut_off.clone(),
        queued: bytes.as_ref().map(|b| b.queued.clone()),
        channel: Arc::from(""),
    };
    (Slot { tx, cut_off, bytes }, inbox)
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Vec<Slot<Published>>>,
    processed: Vec<Slot<Arc<EntityProcessed>>>,
}

type Shared = Mutex<State>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while the lock was held cannot leave the registry inconsistent in a way that
    // matters (at worst a subscriber is kept or removed), so carry on.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The in-process publish/subscribe bus for transient listeners; see the
/// [module documentation](super). Cheap to clone: clones share one registry. When the last
/// clone is dropped, every subscription ends with [`RecvError::Closed`] after draining.
#[derive(Clone)]
pub struct PubSub {
    shared: Arc<Shared>,
    through: Arc<tokio::sync::watch::Sender<Lsn>>,
}

impl Default for PubSub {
    fn default() -> Self {
        PubSub {
            shared: Arc::default(),
            through: Arc::new(tokio::sync::watch::Sender::new(Lsn::ZERO)),
        }
    }
}

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.shared);
        f.debug_struct("PubSub")
            .field("channels", &state.channels.len())
            .field("processed_subscribers", &state.processed.len())
            .finish()
    }
}

impl PubSub {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transient subscription to `channel` with a bounded queue of `capacity` events (at
    /// least 1). It is cut off if the queue is full when an event is published.
    pub fn subscribe(&self, channel: &str, capacity: usize) -> Subscription {
        self.subscribe_bounded(channel, capacity, None)
    }

    /// [`subscribe`](Self::subscribe), with the queue bounded in bytes too: the subscription
    /// is also cut off when an event's JSON ([`Published::json`]) would take the bytes it has
    /// queued past `max_bytes`. An event larger than `max_bytes` still goes to a queue that
    /// holds nothing else.
    pub fn subscribe_with_max_bytes(
        &self,
        channel: &str,
        capacity: usize,
        max_bytes: usize,
    ) -> Subscription {
        self.subscribe_bounded(channel, capacity, Some(max_bytes))
    }

    fn subscribe_bounded(
        &self,
        channel: &str,
        capacity: usize,
        max_bytes: Option<usize>,
    ) -> Subscription {
        let (slot, mut inbox) = pair(capacity, max_bytes);
        inbox.channel = Arc::from(channel);
        lock(&self.shared)
            .channels
            .entry(channel.to_owned())
            .or_default()
            .push(slot);
        Subscription {
            inbox,
            bus: Arc::downgrade(&self.shared),
        }
    }

    /// Delivers `event` (shared, not cloned) to every subscriber of each channel in
    /// `channels`, in that order. Never blocks and never waits for a subscriber: one whose
    /// queue is full is cut off (see [`RecvError::Lagged`]). A channel nobody listens to costs
    /// one hash lookup. Events published by one thread reach each subscriber in publish order.
    /// When a subscriber counts bytes, the event is serialised here, once, before the lock
    /// is taken for delivery.
    pub fn publish(&self, channels: &[String], event: &Arc<Event>) {
        let Some(counts_bytes) = self.listeners(channels) else {
            return;
        };
        let position = event.position();
        let item = Published::new(event.clone());
        if counts_bytes {
            // Outside the lock: subscribing and leaving never wait behind a large event.
            let _ = item.json();
        }
        let mut state = lock(&self.shared);
        for channel in channels {
            let Some(slots) = state.channels.get_mut(channel.as_str()) else {
                continue;
            };
            deliver(slots, &item, position);
            if slots.is_empty() {
                state.channels.remove(channel.as_str());
            }
        }
    }

    /// `None` when nobody listens to any of `channels`; else whether a listener counts bytes.
    fn listeners(&self, channels: &[String]) -> Option<bool> {
        let state = lock(&self.shared);
        let mut slots = channels
            .iter()
            .filter_map(|channel| state.channels.get(channel.as_str()))
            .flatten()
            .peekable();
        slots.peek()?;
        Some(slots.any(|slot| slot.bytes.is_some()))
    }

    /// Publishes an [`EntityProcessed`] notice on [`PROCESSED_CHANNEL`], with the same
    /// cut-off rule as [`publish`](Self::publish).
    pub fn entity_processed(&self, notice: EntityProcessed) {
        let position = notice.position;
        let mut state = lock(&self.shared);
        if state.processed.is_empty() {
            return;
        }
        deliver(&mut state.processed, &Arc::new(notice), position);
    }

    /// A transient subscription to [`EntityProcessed`] notices, with a bounded queue of
    /// `capacity` notices (at least 1) and the same cut-off rule as [`subscribe`](Self::subscribe).
    pub fn subscribe_processed(&self, capacity: usize) -> ProcessedSubscription {
        let (slot, mut inbox) = pair(capacity, None);
        inbox.channel = Arc::from(PROCESSED_CHANNEL);
        lock(&self.shared).processed.push(slot);
        ProcessedSubscription {
            inbox,
            bus: Arc::downgrade(&self.shared),
        }
    }

    /// The end of the last commit that every operator has durably processed (with its process
    /// status stored): the position the slot is acknowledged to. It only moves forward;
    /// [`Lsn::ZERO`] until the first commit is done.
    pub fn processed_through(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.through.subscribe()
    }

    /// Moves [`processed_through`](Self::processed_through) forward to `end` (never back).
    pub(crate) fn set_processed_through(&self, end: Lsn) {
        self.through.send_if_modified(|through| {
            let moved = end > *through;
            if moved {
                *through = end;
            }
            moved
        });
    }

    /// How many live subscriptions `channel` has (cut-off and dropped ones are not counted).
    pub fn subscriber_count(&self, channel: &str) -> usize {
        lock(&self.shared).channels.get(channel).map_or(0, |slots| {
            slots.iter().filter(|s| !s.tx.is_closed()).count()
        })
    }

    /// How many live subscriptions to [`EntityProcessed`] notices there are.
    pub fn processed_subscriber_count(&self) -> usize {
        lock(&self.shared)
            .processed
            .iter()
            .filter(|s| !s.tx.is_closed())
            .count()
    }

    /// How many channels have at least one subscription registered.
    pub fn channel_count(&self) -> usize {
        lock(&self.shared).channels.len()
    }
}

/// The receiving end shared by both kinds of subscription.
struct Inbox<T> {
    rx: mpsc::Receiver<T>,
    cut_off: CutOff,
    /// The bytes queued, when the queue is bounded in bytes.
    queued: Option<Queued>,
    channel: Arc<str>,
}

impl<T: Weigh> Inbox<T> {
    async fn recv(&mut self) -> Result<T, RecvError> {
        match self.rx.recv().await {
            Some(item) => Ok(self.taken(item)),
            None => Err(self.ended()),
        }
    }

    fn try_recv(&mut self) -> Result<Option<T>, RecvError> {
        match self.rx.try_recv() {
            Ok(item) => Ok(Some(self.taken(item))),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(self.ended()),
        }
    }

    /// `item`, its bytes taken off the queue's count.
    fn taken(&self, item: T) -> T {
        if let Some(queued) = &self.queued {
            queued.fetch_sub(item.weight(), Ordering::AcqRel);
        }
        item
    }

    /// Why the channel is closed: cut off if the bus said so before dropping the sender.
    fn ended(&self) -> RecvError {
        match self.cut_off.get() {
            Some(&dropped_at) => RecvError::Lagged {
                channel: self.channel.to_string(),
                dropped_at,
            },
            None => RecvError::Closed,
        }
    }

    fn is_mine<U>(&self, slot: &Slot<U>) -> bool {
        Arc::ptr_eq(&self.cut_off, &slot.cut_off)
    }
}

/// A transient subscription to one channel. Dropping it removes it from the bus at once.
pub struct Subscription {
    inbox: Inbox<Published>,
    bus: Weak<Shared>,
}

impl Subscription {
    /// The next event, waiting for one. After the events already queued, yields
    /// [`RecvError::Lagged`] if the subscription was cut off (and again on every later
    /// call), or [`RecvError::Closed`] if the bus was dropped. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Arc<Event>, RecvError> {
        Ok(self.inbox.recv().await?.event().clone())
    }

    /// [`recv`](Self::recv), with the event's JSON shared with the other subscribers.
    pub async fn recv_published(&mut self) -> Result<Published, RecvError> {
        self.inbox.recv().await
    }

    /// The next event if one is queued (`Ok(None)` if none is), without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Event>>, RecvError> {
        Ok(self.inbox.try_recv()?.map(|p| p.event().clone()))
    }

    /// The channel subscribed to.
    pub fn channel(&self) -> &str {
        &self.inbox.channel
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.inbox.channel)
            .field("cut_off_at", &self.inbox.cut_off.get())
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(shared) = self.bus.upgrade() else {
            return;
        };
        let mut state = lock(&shared);
        let channel: &str = &self.inbox.channel;
        if let Some(slots) = state.channels.get_mut(channel) {
            slots.retain(|slot| !self.inbox.is_mine(slot));
            if slots.is_empty() {
                state.channels.remove(channel);
            }
        }
    }
}

/// A transient subscription to [`EntityProcessed`] notices. Dropping it removes it from the
/// bus at once.
pub struct ProcessedSubscription {
    inbox: Inbox<Arc<EntityProcessed>>,
    bus: Weak<Shared>,
}

impl ProcessedSubscription {
    /// The next notice, waiting for one; ends like [`Subscription::recv`]. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Arc<EntityProcessed>, RecvError> {
        self.inbox.recv().await
    }

    /// The next notice if one is queued (`Ok(None)` if none is), without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Arc<EntityProcessed>>, RecvError> {
        self.inbox.try_recv()
    }

    /// Always [`PROCESSED_CHANNEL`].
    pub fn channel(&self) -> &str {
        &self.inbox.channel
    }
}

impl fmt::Debug for ProcessedSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessedSubscription")
            .field("cut_off_at", &self.inbox.cut_off.get())
            .finish_non_exhaustive()
    }
}

impl Drop for ProcessedSubscription {
    fn drop(&mut self) {
        if let Some(shared) = self.bus.upgrade() {
            lock(&shared)
                .processed
                .retain(|slot| !self.inbox.is_mine(slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::{EventType, Record};

    fn ev(entity: &str, id: u64, ordinal: u64) -> Arc<Event> {
        let mut record = Record::new();
        record.insert("id".into(), id.into());
        Arc::new(Event {
            kind: EventType::Insert,
            schema: Arc::from("public"),
            entity: Arc::from(entity),
            table: Arc::from(entity),
            new_record: Some(record),
            old_record: None,
            changes: None,
            unavailable_columns: vec![],
            timestamp: 0,
            lsn: Lsn(0x100 + ordinal),
            commit_lsn: Lsn(0x1000),
            xid: 7,
            ordinal,
            decode_error: None,
            message: None,
            key_columns: Arc::from([]),
        })
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_subscriber_gets_exactly_its_channel_in_order() {
        let bus = PubSub::new();
        let mut posts = bus.subscribe("posts", 16);
        let mut post_1 = bus.subscribe("posts/1", 16);
        let mut comments = bus.subscribe("comments", 16);
        for (i, id) in [1, 2, 1, 3].into_iter().enumerate() {
            let e = ev("posts", id, i as u64);
            bus.publish(&names(&["posts", &format!("posts/{id}")]), &e);
        }
        for i in 0..4 {
            assert_eq!(posts.recv().await.unwrap().ordinal, i);
        }
        assert_eq!(post_1.recv().await.unwrap().ordinal, 0);
        assert_eq!(post_1.recv().await.unwrap().ordinal, 2);
        assert_eq!(post_1.try_recv(), Ok(None));
        assert_eq!(posts.try_recv(), Ok(None));
        assert_eq!(comments.try_recv(), Ok(None));
        assert_eq!(posts.channel(), "posts");
    }

    #[tokio::test]
    async fn the_event_is_shared_not_cloned() {
        let bus = PubSub::new();
        let mut a = bus.subscribe("posts", 4);
        let mut b = bus.subscribe("posts", 4);
        let e = ev("posts", 1, 0);
        bus.publish(&names(&["posts"]), &e);
        assert!(Arc::ptr_eq(&a.recv().await.unwrap(), &e));
        assert!(Arc::ptr_eq(&b.recv().await.unwrap(), &e));
    }

    #[tokio::test]
    async fn subscribers_share_one_serialisation_of_an_event() {
        let bus = PubSub::new();
        let mut a = bus.subscribe("posts", 4);
        let mut b = bus.subscribe_with_max_bytes("posts/1", 4, 1 << 20);
        let mut c = bus.subscribe("posts/1", 4);
        let e = ev("posts", 1, 0);
        bus.publish(&names(&["posts", "posts/1"]), &e);
        let (a, b, c) = (
            a.recv_published().await.unwrap(),
            b.recv_published().await.unwrap(),
            c.recv_published().await.unwrap(),
        );
        assert!(Arc::ptr_eq(a.event(), &e));
        let json = a.json();
        assert_eq!(&json[..], serde_json::to_vec(&*e).unwrap());
        // The same allocation, not equal copies.
        for other in [&b, &c] {
            assert_eq!(other.json().as_ptr(), json.as_ptr());
            assert_eq!(other.json().len(), json.len());
        }
        assert!(!format!("{a:?}").contains("\"id\""), "{a:?}");
    }

    #[tokio::test]
    async fn a_subscriber_over_its_bytes_is_cut_off_with_lagged() {
        let bus = PubSub::new();
        let weight = Published::new(ev("posts", 1, 1)).json().len();
        // Room for three events' JSON, and far more events.
        let mut slow = bus.subscribe_with_max_bytes("posts", 100, 3 * weight);
        let mut reader = bus.subscribe_with_max_bytes("posts", 100, 3 * weight);
        for i in 1..=5 {
            bus.publish(&names(&["posts"]), &ev("posts", 1, i));
            // One that takes each event out is never over.
            assert_eq!(reader.recv().await.unwrap().ordinal, i);
        }
        for i in 1..=3 {
            assert_eq!(slow.recv().await.unwrap().ordinal, i);
        }
        assert_eq!(
            slow.recv().await.unwrap_err(),
            RecvError::Lagged {
                channel: "posts".into(),
                dropped_at: Position::new(Lsn(0x1000), 4),
            }
        );
        assert_eq!(bus.subscriber_count("posts"), 1);
    }

    #[tokio::test]
    async fn an_event_over_the_byte_bound_goes_to_an_empty_queue_only() {
        let bus = PubSub::new();
        let mut sub = bus.subscribe_with_max_bytes("posts", 100, 1);
        bus.publish(&names(&["posts"]), &ev("posts", 1, 0));
        assert_eq!(sub.recv().await.unwrap().ordinal, 0);
        bus.publish(&names(&["posts"]), &ev("posts", 1, 1));
        bus.publish(&names(&["posts"]), &ev("posts", 1, 2));
        assert_eq!(sub.recv().await.unwrap().ordinal, 1);
        assert_eq!(
            sub.recv().await.unwrap_err(),
            RecvError::Lagged {
                channel: "posts".into(),
                dropped_at: Position::new(Lsn(0x1000), 2),
            }
        );
    }

    #[tokio::test]
    async fn two_subscribers_on_one_channel_both_get_everything() {
        let bus = PubSub::new();
        let mut a = bus.subscribe("posts", 8);
        let mut b = bus.subscribe("posts", 8);
        assert_eq!(bus.subscriber_count("posts"), 2);
        for i in 0..5 {
            bus.publish(&names(&["posts"]), &ev("posts", i, i));
        }
        for i in 0..5 {
            assert_eq!(a.recv().await.unwrap().ordinal, i);
            assert_eq!(b.recv().await.unwrap().ordinal, i);
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_cut_off_with_lagged_and_never_sees_past_the_gap() {
        let bus = PubSub::new();
        let mut slow = bus.subscribe("posts", 2);
        let mut fast = bus.subscribe("posts", 16);
        for i in 1..=5 {
            bus.publish(&names(&["posts"]), &ev("posts", i, i));
        }
        assert_eq!(slow.recv().await.unwrap().ordinal, 1);
        assert_eq!(slow.recv().await.unwrap().ordinal, 2);
        let lagged = RecvError::Lagged {
            channel: "posts".into(),
            dropped_at: Position::new(Lsn(0x1000), 3),
        };
        assert_eq!(slow.recv().await.unwrap_err(), lagged);
        // Sticky: nothing after the gap, ever.
        bus.publish(&names(&["posts"]), &ev("posts", 6, 6));
        assert_eq!(slow.recv().await.unwrap_err(), lagged);
        assert_eq!(slow.try_recv().unwrap_err(), lagged);
        assert_eq!(
            lagged.to_string(),
            "subscriber of posts fell behind and was cut off; first missed event at 0/1000#3"
        );
        // The other subscriber is unaffected.
        for i in 1..=6 {
            assert_eq!(fast.recv().await.unwrap().ordinal, i);
        }
        assert_eq!(bus.subscriber_count("posts"), 1);
    }

    #[tokio::test]
    async fn a_subscriber_that_keeps_up_is_not_cut_off() {
        let bus = PubSub::new();
        let mut sub = bus.subscribe("posts", 1);
        for i in 0..10 {
            bus.publish(&names(&["posts"]), &ev("posts", i, i));
            assert_eq!(sub.recv().await.unwrap().ordinal, i);
        }
        assert_eq!(bus.subscriber_count("posts"), 1);
    }

    #[tokio::test]
    async fn recv_waits_for_a_publish_from_another_task() {
        let bus = PubSub::new();
        let mut sub = bus.subscribe("posts", 4);
        let publisher = bus.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            publisher.publish(&names(&["posts"]), &ev("posts", 1, 0));
        });
        let e = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("recv timed out")
            .unwrap();
        assert_eq!(e.ordinal, 0);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn dropped_subscriptions_are_removed() {
        let bus = PubSub::new();
        let a = bus.subscribe("posts", 4);
        let b = bus.subscribe("posts", 4);
        let c = bus.subscribe("posts/1", 4);
        assert_eq!(bus.subscriber_count("posts"), 2);
        assert_eq!(bus.channel_count(), 2);
        drop(a);
        assert_eq!(bus.subscriber_count("posts"), 1);
        drop(b);
        drop(c);
        assert_eq!(bus.subscriber_count("posts"), 0);
        assert_eq!(bus.subscriber_count("posts/1"), 0);
        assert_eq!(bus.channel_count(), 0);
        // Publishing to channels nobody listens to does nothing.
        bus.publish(&names(&["posts", "posts/1"]), &ev("posts", 1, 0));
        assert_eq!(bus.channel_count(), 0);

        let p = bus.subscribe_processed(4);
        assert_eq!(bus.processed_subscriber_count(), 1);
        drop(p);
        assert_eq!(bus.processed_subscriber_count(), 0);
    }

    #[tokio::test]
    async fn a_cut_off_subscription_leaves_the_registry() {
        let bus = PubSub::new();
        let sub = bus.subscribe("posts", 1);
        bus.publish(&names(&["posts"]), &ev("posts", 1, 0));
        bus.publish(&names(&["posts"]), &ev("posts", 1, 1));
        assert_eq!(bus.subscriber_count("posts"), 0);
        assert_eq!(bus.channel_count(), 0);
        drop(sub); // nothing left to remove
        assert_eq!(bus.channel_count(), 0);
    }

    #[tokio::test]
    async fn dropping_the_bus_closes_subscriptions_after_draining() {
        let bus = PubSub::new();
        let mut sub = bus.subscribe("posts", 4);
        let mut processed = bus.subscribe_processed(4);
        bus.publish(&names(&["posts"]), &ev("posts", 1, 0));
        drop(bus);
        assert_eq!(sub.recv().await.unwrap().ordinal, 0);
        assert_eq!(sub.recv().await.unwrap_err(), RecvError::Closed);
        assert_eq!(processed.recv().await.unwrap_err(), RecvError::Closed);
    }

    #[tokio::test]
    async fn entity_processed_notices_arrive_in_order() {
        let bus = PubSub::new();
        // No subscriber: nothing happens.
        bus.entity_processed(EntityProcessed {
            entity: "posts".into(),
            position: Position::new(Lsn(1), 0),
            timestamp: 0,
        });
        let mut sub = bus.subscribe_processed(8);
        assert_eq!(sub.channel(), PROCESSED_CHANNEL);
        let notices: Vec<EntityProcessed> = (0..5)
            .map(|i| EntityProcessed {
                entity: if i % 2 == 0 { "posts" } else { "comments" }.into(),
                position: Position::new(Lsn(0x2000 + i), i),
                timestamp: 1_700_000_000_000_000 + i as i64,
            })
            .collect();
        for n in &notices {
            bus.entity_processed(n.clone());
        }
        for n in &notices {
            assert_eq!(*sub.recv().await.unwrap(), *n);
        }
        assert_eq!(sub.try_recv(), Ok(None));
        // Event subscribers do not see notices, and the reverse.
        assert_eq!(bus.subscriber_count(PROCESSED_CHANNEL), 0);
    }

    #[tokio::test]
    async fn a_slow_processed_subscriber_is_cut_off() {
        let bus = PubSub::new();
        let mut sub = bus.subscribe_processed(1);
        for i in 0..3 {
            bus.entity_processed(EntityProcessed {
                entity: "posts".into(),
                position: Position::new(Lsn(0x3000), i),
                timestamp: 0,
            });
        }
        assert_eq!(sub.recv().await.unwrap().position.ordinal, 0);
        assert_eq!(
            sub.recv().await.unwrap_err(),
            RecvError::Lagged {
                channel: PROCESSED_CHANNEL.into(),
                dropped_at: Position::new(Lsn(0x3000), 1),
            }
        );
        assert_eq!(bus.processed_subscriber_count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn across_threads_a_subscriber_sees_a_gapless_prefix_then_lagged() {
        const N: u64 = 20_000;
        let bus = PubSub::new();
        let mut sub = bus.subscribe("posts", 8);
        let publisher = bus.clone();
        let task = tokio::task::spawn_blocking(move || {
            let channels = names(&["posts"]);
            for i in 0..N {
                publisher.publish(&channels, &ev("posts", i, i));
            }
        });
        let mut next = 0;
        let end = loop {
            match sub.recv().await {
                Ok(e) => {
                    assert_eq!(e.ordinal, next, "an event after a gap");
                    next += 1;
                }
                Err(end) => break end,
            }
            if next == N {
                break RecvError::Closed;
            }
        };
        task.await.unwrap();
        if next < N {
            assert_eq!(
                end,
                RecvError::Lagged {
                    channel: "posts".into(),
                    dropped_at: Position::new(Lsn(0x1000), next),
                }
            );
        }
    }

    #[tokio::test]
    async fn capacities_of_zero_and_huge_are_clamped() {
        let bus = PubSub::new();
        let mut zero = bus.subscribe("posts", 0);
        let mut huge = bus.subscribe("posts", usize::MAX);
        bus.publish(&names(&["posts"]), &ev("posts", 1, 0));
        assert_eq!(zero.recv().await.unwrap().ordinal, 0);
        assert_eq!(huge.recv().await.unwrap().ordinal, 0);
    }

    #[test]
    fn the_bus_and_subscriptions_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<PubSub>();
        send::<Subscription>();
        send::<ProcessedSubscription>();
    }
}
