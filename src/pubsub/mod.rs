//! In-process publish/subscribe of change events, for transient listeners.
//!
//! # Where the bus sits
//!
//! ```text
//!                                ┌──► operators   durable, bounded, backpressure: a slow
//!                                │                operator holds back the WAL acknowledgement
//! decoder ──► dispatcher ────────┤
//!                                │
//!                                └──► PubSub      transient, bounded, cut-off: a slow
//!                                                 subscriber is dropped, nobody waits for it
//! ```
//!
//! Operators are durable subscribers: they do not use this bus. [`PubSub`] is for transient
//! listeners — a web client following `posts/42/comments`, a `tail`-like view, tests — that
//! may come and go, and whose slowness must never hold up the WAL reader.
//!
//! # Channels
//!
//! Channel names follow EventStreamex's. For an event on `comments` whose primary key is
//! `id`, with the scopes `[("post_id", "posts")]` and `[("org_id", "orgs"), ("post_id",
//! "posts")]` declared for `comments`:
//!
//! | channel                                    | receives                                  |
//! |--------------------------------------------|-------------------------------------------|
//! | `comments`                                 | every event of the table (truncate too)   |
//! | `comments/<id>`                            | the events of one row                     |
//! | `posts/<post_id>/comments`                 | the comments of one post                  |
//! | `posts/<post_id>/comments/<id>`            | one comment, through its post             |
//! | `orgs/<org_id>/posts/<post_id>/comments`   | the comments of one post of one org       |
//! | `orgs/<org_id>/posts/<post_id>/comments/<id>` | one comment, through its org and post  |
//! | `message:<prefix>`                         | messages of `pg_logical_emit_message(true, prefix, ..)` |
//! | `EntityProcessed` ([`PubSub::subscribe_processed`]) | [`EntityProcessed`] notices      |
//!
//! A value in a name is the column's JSON value as text: a string without its quotes, a
//! number as its digits (`42`, `9007199254740993`, `1.50`), a boolean as `true`/`false`. A
//! composite primary key joins its values with `,` in key-column order (`order_items/7,3`).
//! A table without a primary key has no `<entity>/<id>` channels; an event whose scope field
//! is null or absent has no channels for that scope; a truncate goes to `<entity>` only. The
//! record used is [`Event::record`](crate::event::Event::record): the old one for a delete.
//! In a value, `%`, `/` and `,` are written `%25`, `%2F` and `%2C` (percent-encoding, as in a
//! URL path segment), so that a text key holding them gives one unambiguous name: the row
//! `'a/b'` of `tags` is on `tags/a%2Fb`, not on a channel that reads as `tags/a`, then `b`.
//!
//! [`channels`] computes the names for one event; [`PubSub::publish`] delivers it to them.
//!
//! # Overflow
//!
//! Every subscription has a bounded queue of the capacity it asked for. Publishing never
//! blocks and never waits for a subscriber: when a subscriber's queue is full, that
//! subscriber is **cut off** — removed from the bus — and once it has received the events
//! already in its queue, its next receive yields [`RecvError::Lagged`], naming the channel
//! and the position `(commit_lsn, ordinal)` of the first event it missed. Nothing is ever
//! dropped silently: there is no drop-oldest, and a subscriber never sees an event after a
//! gap. A cut-off listener re-subscribes (and re-reads whatever state it needs) if it wants
//! to go on.
//!
//! A queue may be bounded in bytes as well ([`PubSub::subscribe_with_max_bytes`]; the HTTP
//! endpoint's `[http] sse_max_bytes`): an event then weighs its JSON, and the subscriber is
//! cut off the same way when its queued bytes would pass the bound. Every subscriber gets
//! the same [`Published`] for an event, whose JSON is serialised once and shared, so a
//! thousand slow listeners hold one copy of a large row, not a thousand.

mod bus;
mod channels;

pub use bus::{
    EntityProcessed, PROCESSED_CHANNEL, ProcessedSubscription, PubSub, Published, RecvError,
    Subscription,
};
pub(crate) use channels::row_id;
pub use channels::{ChannelSpec, MESSAGE_CHANNEL, channels, message_channel, value_text};
