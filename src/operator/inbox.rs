//! An operator's inbox, bounded by the bytes of the events waiting in it.
//!
//! ```text
//!  dispatcher ──send(event, its size)──► [ waits while the operator's backlog is full ]
//!                                          │ permits: the event's bytes, held while it waits
//!                                          ▼
//!  runner ◄──recv()── the permits go back as the runner takes the event
//! ```
//!
//! The dispatcher hands events out in WAL order, one inbox after the other, so an inbox
//! that is full makes it wait, and every other operator with it. Bounding each inbox by
//! bytes (`replication.operator_backlog_bytes`) instead of a small count lets a slow
//! operator fall that far behind a fast one before it holds it back: the fast one goes on
//! at its own pace meanwhile. The events are shared (`Arc`), so operators that listen to
//! the same changes hold them once: what waits is at most the largest backlog, not the sum.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::runner::Input;
use crate::event::Event;

/// What a task that takes inputs needs from its inbox: an [`Inbox`] from the dispatcher, or
/// a plain channel (a worker feeds its runner itself).
pub(crate) trait InputSource {
    /// The next input; `None` once the sender is gone and the inbox is empty.
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Input>> + Send;
    /// The next input if one is waiting.
    fn try_recv(&mut self) -> Result<Input, mpsc::error::TryRecvError>;
}

impl InputSource for mpsc::Receiver<Input> {
    async fn recv(&mut self) -> Option<Input> {
        mpsc::Receiver::recv(self).await
    }

    fn try_recv(&mut self) -> Result<Input, mpsc::error::TryRecvError> {
        mpsc::Receiver::try_recv(self)
    }
}

type Slot = (Input, Option<OwnedSemaphorePermit>);

/// The dispatcher's end of an operator's inbox.
#[derive(Debug)]
pub(crate) struct InboxSender {
    tx: mpsc::Sender<Slot>,
    backlog: Arc<Backlog>,
}

/// The bytes an inbox may hold, as permits: taken by each event sent, given back as the task
/// takes it.
#[derive(Debug)]
pub(crate) struct Backlog {
    permits: Arc<Semaphore>,
    /// The most permits one event takes: the whole backlog, so that an event larger than it
    /// waits for an empty inbox and then goes alone, instead of never.
    most: u32,
}

impl Backlog {
    /// The permits an event of `bytes` takes: at least one, at most the whole backlog.
    fn permits_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes).unwrap_or(u32::MAX).clamp(1, self.most)
    }

    /// The bytes of events waiting in the inbox.
    pub fn waiting_bytes(&self) -> usize {
        (self.most as usize).saturating_sub(self.permits.available_permits())
    }
}

/// The task's end of an operator's inbox.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Slot>,
}

/// An inbox that holds at most `bytes` of events (and `count` inputs, a bound that only
/// guards against events far smaller than estimated).
pub(crate) fn channel(bytes: usize, count: usize) -> (InboxSender, Inbox) {
    let most = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    let (tx, rx) = mpsc::channel(count.max(1));
    let sender = InboxSender {
        tx,
        backlog: Arc::new(Backlog {
            permits: Arc::new(Semaphore::new(most as usize)),
            most,
        }),
    };
    (sender, Inbox { rx })
}

impl InboxSender {
    /// Sends `input`, first waiting until the inbox has room for `bytes` more (a commit
    /// marker takes none). An error when the task is gone.
    pub async fn send(&self, input: Input, bytes: usize) -> Result<(), Gone> {
        let permit = match &input {
            Input::Event(_) => Some(
                self.backlog
                    .permits
                    .clone()
                    .acquire_many_owned(self.backlog.permits_for(bytes))
                    .await
                    .map_err(|_| Gone)?,
            ),
            Input::Commit { .. } | Input::Gate(..) => None,
        };
        self.tx.send((input, permit)).await.map_err(|_| Gone)
    }

    /// Sends `input` if the inbox has room for it now; gives it back otherwise (or when the
    /// task is gone: [`send`](Self::send) then says so).
    pub fn try_send(&self, input: Input, bytes: usize) -> Result<(), Input> {
        let permit = match &input {
            Input::Event(_) => {
                let n = self.backlog.permits_for(bytes);
                match self.backlog.permits.clone().try_acquire_many_owned(n) {
                    Ok(permit) => Some(permit),
                    Err(_) => return Err(input),
                }
            }
            Input::Commit { .. } | Input::Gate(..) => None,
        };
        self.tx
            .try_send((input, permit))
            .map_err(|error| error.into_inner().0)
    }

    /// The inbox's backlog, for reports.
    pub fn backlog(&self) -> Arc<Backlog> {
        self.backlog.clone()
    }

    #[cfg(test)]
    fn waiting_bytes(&self) -> usize {
        self.backlog.waiting_bytes()
    }
}

/// The task behind an inbox is gone.
#[derive(Debug)]
pub(crate) struct Gone;

impl InputSource for Inbox {
    async fn recv(&mut self) -> Option<Input> {
        // The permits go back as the event leaves the inbox.
        self.rx.recv().await.map(|(input, _permit)| input)
    }

    fn try_recv(&mut self) -> Result<Input, mpsc::error::TryRecvError> {
        self.rx.try_recv().map(|(input, _permit)| input)
    }
}

/// About how many bytes of memory `event` holds: its struct and what its records, changes
/// and message point to. An estimate for the backlog's bound, cheap enough for every event.
pub(crate) fn event_bytes(event: &Event) -> usize {
    let records = [&event.new_record, &event.old_record]
        .into_iter()
        .flatten()
        .map(record_bytes)
        .sum::<usize>();
    let changes = event.changes.as_ref().map_or(0, |changes| {
        changes
            .0
            .iter()
            .map(|c| {
                std::mem::size_of_val(c)
                    + c.column.len()
                    + value_bytes(&c.old_value)
                    + value_bytes(&c.new_value)
            })
            .sum()
    });
    let message = event
        .message
        .as_ref()
        .map_or(0, |m| m.prefix.len() + value_bytes(&m.content));
    // The event behind its `Arc`, with the two counts.
    allocation(std::mem::size_of::<Event>() + 16)
        + records
        + changes
        + message
        + event
            .unavailable_columns
            .iter()
            .map(String::len)
            .sum::<usize>()
        + event.decode_error.as_ref().map_or(0, String::len)
}

/// A map entry: its key and value in a B-tree node, whose slots are about two thirds full,
/// and the node's own bookkeeping.
const ENTRY_BYTES: usize = std::mem::size_of::<(String, serde_json::Value)>() * 3 / 2 + 16;

/// What the allocator takes for `len` bytes of a string: its size class (a multiple of 16
/// here) and its bookkeeping.
fn allocation(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.next_multiple_of(16) + 16
    }
}

/// A record's values (its column names are the table's, shared): its slots, the text of
/// its raw values and what its built values point to.
fn record_bytes(record: &crate::event::Record) -> usize {
    let (text, built) = record.heap_bytes(value_bytes);
    allocation(record.slots() * crate::event::Record::SLOT_SIZE) + allocation(text) + built
}

fn map_bytes(map: &serde_json::Map<String, serde_json::Value>) -> usize {
    map.iter()
        .map(|(key, value)| ENTRY_BYTES + allocation(key.len()) + value_bytes(value))
        .sum()
}

/// What a JSON value points to (its own size is counted where it is held).
fn value_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => allocation(s.len()),
        Value::Array(items) => items
            .iter()
            .map(|v| std::mem::size_of::<Value>() + value_bytes(v))
            .sum(),
        Value::Object(map) => map_bytes(map),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn event(text: &str) -> Arc<Event> {
        Arc::new(crate::testing::event(
            crate::event::EventType::Insert,
            "t",
            serde_json::json!({ "id": 1, "body": text }),
            serde_json::Value::Null,
            0,
        ))
    }

    #[test]
    fn an_event_weighs_its_values() {
        let small = event_bytes(&event("x"));
        let large = event_bytes(&event(&"x".repeat(10_000)));
        assert!(small >= std::mem::size_of::<Event>());
        // The text's allocation, rounded to its size class.
        assert_eq!(large - small, 10_000 - 16);
    }

    /// The dispatcher waits while the inbox holds its bytes' worth, and goes on as soon as
    /// the task takes an event; a commit marker never waits; an event larger than the
    /// whole backlog still goes, once the inbox is empty.
    #[tokio::test]
    async fn the_inbox_holds_its_bytes_and_no_more() {
        let one = event_bytes(&event("x"));
        let (tx, mut rx) = channel(2 * one, 100);
        tx.send(Input::Event(event("x")), one).await.unwrap();
        tx.send(Input::Event(event("x")), one).await.unwrap();
        assert_eq!(tx.waiting_bytes(), 2 * one);
        let mut third = Box::pin(tx.send(Input::Event(event("x")), one));
        assert!(
            futures_util::FutureExt::now_or_never(third.as_mut()).is_none(),
            "the third event must wait"
        );
        tx.send(Input::Commit { end_lsn: Lsn(1) }, 0).await.unwrap();
        assert!(matches!(rx.recv().await, Some(Input::Event(_))));
        let Ok(()) = third.await else {
            panic!("the runner is there")
        };
        assert_eq!(tx.waiting_bytes(), 2 * one);
        assert!(matches!(rx.recv().await, Some(Input::Event(_))));
        assert!(matches!(rx.recv().await, Some(Input::Commit { .. })));
        assert!(matches!(rx.try_recv(), Ok(Input::Event(_))));
        assert_eq!(tx.waiting_bytes(), 0);
        tx.send(Input::Event(event("x")), 100 * one).await.unwrap();
        assert_eq!(tx.waiting_bytes(), 2 * one);
        drop(tx);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
    }
}
