//! The dispatcher: reads decoded items in WAL order and hands each event to the inboxes of
//! the operators that subscribe to it (waiting while one is full: backpressure), to the
//! pub/sub (never waiting), and each commit's process-status items to the coordinator.
//!
//! ```text
//!  Decoded ──► dispatch ──► inbox per operator (bounded in bytes: a full one makes the dispatcher wait)
//!                 │  └───► pubsub channels (transient listeners; cut off, never waited for)
//!                 └─ per commit: Commit marker to every inbox, then Pending ──► coordinator
//! ```

use foldhash::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Subscription;
use super::board::Board;
use super::engine::Lane;
use super::engine::{Engine, EngineExit};
use super::inbox::{self, InboxSender};
use super::partition::{self, Gate, Route};
use super::progress::{Item, Listeners, Pending};
use super::runner::Input;
use crate::decode::Decoded;
use crate::event::{Event, EventType, Peek, Raw};
use crate::pubsub::{self, ChannelSpec};
use crate::status::{self, ProcessStatusStorage};

impl<S: ProcessStatusStorage + Clone> Engine<S> {
    /// Reads decoded items and hands them out, until shutdown or the end of the stream.
    pub(super) async fn dispatch(
        &self,
        items: &mut mpsc::Receiver<Decoded>,
        inboxes: &mut [Option<InboxSender>],
        lanes: &[Lane],
        board: &Board,
        pending: mpsc::Sender<Pending>,
        shutdown: &CancellationToken,
    ) -> EngineExit {
        let subscriptions: Vec<Vec<Subscription>> = self
            .operators
            .iter()
            .map(|o| o.operator.subscriptions())
            .collect();
        let mut specs: HashMap<Arc<str>, ChannelSpec> = HashMap::default();
        let mut routes = Routes::default();
        let mut current = Pending::default();
        let mut channels: Vec<String> = Vec::new();
        let mut tally = self.metrics.tally();
        // The last event handed out. After a reconnection inside a transaction the stream
        // sends it again from its start: operators and channels already have the events up
        // to here, so only process status (which starts the transaction over) sees them again.
        let mut handed_out: Option<crate::lsn::Position> = None;
        let mut warned_untransactional = false;
        let mut last_timestamp = LastTimestamp::default();
        loop {
            if shutdown.is_cancelled() {
                return EngineExit::Shutdown;
            }
            // What is waiting is taken without a wait (cheaper by far during a drain); the
            // wait, with its watch on shutdown, only when nothing is.
            let item = match items.try_recv() {
                Ok(item) => item,
                Err(mpsc::error::TryRecvError::Disconnected) => return EngineExit::StreamEnded,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return EngineExit::Shutdown,
                    item = items.recv() => match item {
                        Some(item) => item,
                        None => return EngineExit::StreamEnded,
                    },
                },
            };
            match item {
                Decoded::Begin { .. } | Decoded::Interrupted => {
                    current.items.clear();
                    tally.discard();
                }
                Decoded::Message { prefix, lsn, .. } => {
                    if !warned_untransactional {
                        warned_untransactional = true;
                        warn!(
                            %prefix, %lsn,
                            "a message written outside a transaction \
                             (pg_logical_emit_message(false, ..)) is not delivered: nothing \
                             orders it among the changes or makes it durable with them; write \
                             it with pg_logical_emit_message(true, ..) in the transaction it \
                             belongs to (this warning is given once per run)"
                        );
                    }
                }
                Decoded::Event(event) if *event.schema == *status::SCHEMA => {}
                Decoded::Event(event) => {
                    tally.event(&event.entity);
                    // A message is no table's change: it has no process status.
                    if event.kind != EventType::Message {
                        let item = Item {
                            timestamp: self.status_timestamp(&event, &mut last_timestamp),
                            position: event.position(),
                        };
                        match current.items.get_mut(&event.entity) {
                            Some((entry, _)) => entry.merge(item),
                            None => {
                                let listeners = routes.listeners(&subscriptions, lanes, &event);
                                current
                                    .items
                                    .insert(event.entity.clone(), (item, listeners));
                            }
                        }
                    }
                    if handed_out.is_some_and(|done| event.position() <= done) {
                        continue;
                    }
                    handed_out = Some(event.position());

                    if self.pubsub.channel_count() > 0 {
                        let spec =
                            specs
                                .entry(event.entity.clone())
                                .or_insert_with(|| ChannelSpec {
                                    key_columns: event.key_columns.to_vec(),
                                    scopes: self
                                        .scopes
                                        .get(&*event.entity)
                                        .cloned()
                                        .unwrap_or_default(),
                                });
                        channels.clear();
                        channels.extend(pubsub::channels(&event, spec));
                        self.pubsub.publish(&channels, &event);
                    }
                    // The JetStream publisher, after the operators, gets every event.
                    let participants = lanes.last().map_or(0, |l| l.participants().end);
                    let publisher = (inboxes.len() > participants).then_some(participants);
                    let mut bytes = None;
                    for &operator in routes.operators(&subscriptions, &event) {
                        let lane = &lanes[operator];
                        let whole = &self.operators[operator].operator.0;
                        let sql = whole.as_sql();
                        if sql.is_none()
                            && lane.inherited.as_ref().is_some_and(|i| {
                                event.position() <= i.through
                                    && i.done(
                                        crate::jetstream::row_key(&event).as_deref(),
                                        event.position(),
                                    )
                            })
                        {
                            continue; // applied by the operator's earlier count of partitions
                        }
                        if lane.partitions == 1 {
                            let bytes = *bytes.get_or_insert_with(|| inbox::event_bytes(&event));
                            let input = Input::Event(event.clone());
                            if !send_to(inboxes, lane.first, input, bytes, board, shutdown).await {
                                return EngineExit::Shutdown;
                            }
                            continue;
                        }
                        let route = match sql {
                            Some(sql) => sql.route(&event, lane.partitions),
                            None => partition::route_of_row(&event, lane.partitions),
                        };
                        let at = |p: u32| lane.first + p as usize;
                        let sends: Vec<(usize, Input)> = match route {
                            Route::One(p) => vec![(at(p), Input::Event(event.clone()))],
                            Route::Each(ps) => ps
                                .into_iter()
                                .map(|p| (at(p), Input::Event(event.clone())))
                                .collect(),
                            Route::Crossing { applier, others } => {
                                let gate = Arc::new(Gate::new(
                                    at(applier),
                                    others.iter().map(|&p| at(p)).collect(),
                                ));
                                std::iter::once((
                                    at(applier),
                                    Input::Gate(gate.clone(), Some(event.clone())),
                                ))
                                .chain(
                                    others
                                        .into_iter()
                                        .map(|p| (at(p), Input::Gate(gate.clone(), None))),
                                )
                                .collect()
                            }
                        };
                        for (index, input) in sends {
                            let bytes = *bytes.get_or_insert_with(|| inbox::event_bytes(&event));
                            if !send_to(inboxes, index, input, bytes, board, shutdown).await {
                                return EngineExit::Shutdown;
                            }
                        }
                    }
                    if let Some(index) = publisher {
                        let bytes = *bytes.get_or_insert_with(|| inbox::event_bytes(&event));
                        let input = Input::Event(event.clone());
                        if !send_to(inboxes, index, input, bytes, board, shutdown).await {
                            return EngineExit::Shutdown;
                        }
                    }
                }
                Decoded::Commit {
                    end_lsn, timestamp, ..
                } => {
                    tally.commit(end_lsn, timestamp);
                    for inbox in inboxes.iter_mut() {
                        if !send(inbox, Input::Commit { end_lsn }, 0, shutdown).await
                            && shutdown.is_cancelled()
                        {
                            return EngineExit::Shutdown;
                        }
                    }
                    current.end_lsn = end_lsn;
                    let done = std::mem::take(&mut current);
                    tokio::select! {
                        biased;
                        sent = pending.send(done) => if sent.is_err() {
                            return EngineExit::StreamEnded;
                        },
                        _ = shutdown.cancelled() => return EngineExit::Shutdown,
                    }
                }
            }
        }
    }

    /// The process-status timestamp of an event: the configured record field (µs since the
    /// Unix epoch), else the commit time; never later than the commit time. A row whose
    /// field lies in the future (`updated_at = '2099-01-01'`) would otherwise make every later
    /// write look processed: what has been processed is bounded by the commits processed.
    fn status_timestamp(&self, event: &Event, last: &mut LastTimestamp) -> i64 {
        read_status_timestamp(event, &self.timestamp_field, last)
    }
}

/// The last timestamp read from a record's text, and its reading: the rows of a transaction
/// usually share theirs (`now()`), so each of the others compares a few bytes instead.
#[derive(Default)]
struct LastTimestamp {
    kind: Option<Raw>,
    text: Vec<u8>,
    micros: Option<i64>,
}

impl LastTimestamp {
    fn read(&mut self, kind: Raw, text: &[u8]) -> Option<i64> {
        if self.kind != Some(kind) || self.text != text {
            self.micros = raw_timestamp(text, kind == Raw::TimestampTz);
            self.kind = Some(kind);
            self.text.clear();
            self.text.extend_from_slice(text);
        }
        self.micros
    }
}

/// The process-status timestamp of `event`: its record's `field` (µs since the Unix epoch),
/// else the commit time; never later than the commit time (see
/// `Engine::status_timestamp`). A worker's process status uses it too.
pub(crate) fn status_timestamp(event: &Event, field: &str) -> i64 {
    read_status_timestamp(event, field, &mut LastTimestamp::default())
}

/// [`status_timestamp`], remembering the last timestamp read from text in `last`.
fn read_status_timestamp(event: &Event, field: &str, last: &mut LastTimestamp) -> i64 {
    event
        .record()
        .and_then(|r| r.peek(field))
        .and_then(|value| match value {
            Peek::Value(v) => parse_timestamp(v),
            // A usual timestamp is read from its text, building nothing.
            Peek::Raw(kind @ (Raw::Timestamp | Raw::TimestampTz), text) => last.read(kind, text),
            Peek::Raw(kind, text) => parse_timestamp(&kind.to_value(text)),
        })
        .map_or(event.timestamp, |ts| ts.min(event.timestamp))
}

/// Which operators get an event, cached per entity and event type (the dispatcher asks for
/// every event; the subscriptions are matched once).
#[derive(Default)]
struct Routes {
    /// By entity, then by event type.
    by_kind: HashMap<Arc<str>, Vec<KindRoute>>,
    listeners: HashMap<Arc<str>, Listeners>,
}

/// The operators that get events of one type (of an entity).
type KindRoute = (EventType, Box<[usize]>);

impl Routes {
    /// The operators a subscription of which matches `event`.
    fn operators(&mut self, subscriptions: &[Vec<Subscription>], event: &Event) -> &[usize] {
        let (entity, kind) = (&*event.entity, event.kind);
        let known = |kinds: &Vec<KindRoute>| kinds.iter().any(|k| k.0 == kind);
        // Looked up by name first, so that the usual case clones no key.
        if !self.by_kind.get(entity).is_some_and(known) {
            let operators = (0..subscriptions.len())
                .filter(|&i| subscriptions[i].iter().any(|s| s.matches(event)))
                .collect();
            self.by_kind
                .entry(event.entity.clone())
                .or_default()
                .push((kind, operators));
        }
        self.by_kind[entity]
            .iter()
            .find_map(|(k, operators)| (*k == kind).then_some(&**operators))
            .unwrap_or_default()
    }

    /// The participants (operators, or every partition of one) that listen to `event`'s
    /// entity, whatever the event type: those whose progress decides the entity's process
    /// status.
    fn listeners(
        &mut self,
        subscriptions: &[Vec<Subscription>],
        lanes: &[Lane],
        event: &Event,
    ) -> Listeners {
        self.listeners
            .entry(event.entity.clone())
            .or_insert_with(|| {
                (0..subscriptions.len())
                    .filter(|&i| {
                        subscriptions[i]
                            .iter()
                            .any(|s| !s.is_messages() && event.is_entity(&s.entity))
                    })
                    .flat_map(|i| lanes[i].participants())
                    .collect()
            })
            .clone()
    }
}

/// Sends to participant `index`'s inbox ([`send`]); false only on shutdown (a halted,
/// blocked or backfilling participant has no inbox and gets nothing).
async fn send_to(
    inboxes: &mut [Option<InboxSender>],
    index: usize,
    input: Input,
    bytes: usize,
    board: &Board,
    shutdown: &CancellationToken,
) -> bool {
    if send(&mut inboxes[index], input, bytes, shutdown).await {
        return true;
    }
    if shutdown.is_cancelled() {
        return false;
    }
    debug_assert!(board.is_halted(index) || board.is_blocked(index) || board.is_backfilling(index));
    true
}

/// Sends to an inbox, waiting while it is full. Returns false when the operator's task has
/// stopped (it halted; its inbox is then dropped) or on shutdown.
async fn send(
    inbox: &mut Option<InboxSender>,
    input: Input,
    bytes: usize,
    shutdown: &CancellationToken,
) -> bool {
    let Some(sender) = inbox else {
        return false;
    };
    if shutdown.is_cancelled() {
        return false;
    }
    // Without waiting first: the usual case, and much cheaper than a wait that is ready.
    let Err(input) = sender.try_send(input, bytes) else {
        return true;
    };
    let sent = tokio::select! {
        biased;
        sent = sender.send(input, bytes) => sent.is_ok(),
        _ = shutdown.cancelled() => return false,
    };
    if !sent {
        *inbox = None;
    }
    sent
}

/// A record field as a process-status timestamp in µs since the Unix epoch: a timestamp or
/// timestamptz as `to_jsonb` writes them, or a number (taken as µs).
fn parse_timestamp(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => usual_timestamp(s.as_bytes()).or_else(|| any_timestamp(s)),
        _ => None,
    }
}

/// [`parse_timestamp`]'s reading of any text, through chrono.
fn any_timestamp(s: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDateTime};
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc().timestamp_micros())
        })
}

/// The shape the decoder writes (`2024-01-02T03:04:05.123456+00:00`, the point, fraction
/// and offset each optional), read without chrono: it comes once per event, and chrono's
/// parser was 5% of a drain. `None` for anything else (which [`any_timestamp`] reads), and
/// where it answers it gives what chrono gives.
fn usual_timestamp(s: &[u8]) -> Option<i64> {
    fn digits(s: &[u8], at: usize, n: usize) -> Option<i64> {
        let field = s.get(at..at + n)?;
        field.iter().try_fold(0i64, |v, &c| {
            c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0'))
        })
    }
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if s.len() < 19 || separators.iter().any(|&(at, c)| s[at] != c) {
        return None;
    }
    let (year, month, day) = (digits(s, 0, 4)?, digits(s, 5, 2)?, digits(s, 8, 2)?);
    let (hour, minute, second) = (digits(s, 11, 2)?, digits(s, 14, 2)?, digits(s, 17, 2)?);
    let mut at = 19;
    let mut nanos = 0;
    if s.get(at) == Some(&b'.') {
        let start = at + 1;
        let end = start + s[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 9 {
            return None;
        }
        nanos = digits(s, start, end - start)? * 10i64.pow(u32::try_from(9 - (end - start)).ok()?);
        at = end;
    }
    let offset = match &s[at..] {
        [] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (digits(s, at + 1, 2)?, digits(s, at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let seconds = h * 3600 + m * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    micros_since_epoch([year, month, day, hour, minute, second], nanos, offset)
}

/// A usual timestamp as the server writes it (`2024-01-02 03:04:05[.123456]`, then for a
/// timestamptz `+05`: what the decoder keeps as [`Raw::Timestamp`] or [`Raw::TimestampTz`]),
/// read where it lies; `None` for any other text.
fn raw_timestamp(s: &[u8], with_zone: bool) -> Option<i64> {
    let digit = |i: usize| {
        let d = s.get(i)?.wrapping_sub(b'0');
        (d < 10).then_some(i64::from(d))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    if s.len() < 19
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b' '
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let fields = [
        two(0)? * 100 + two(2)?,
        two(5)?,
        two(8)?,
        two(11)?,
        two(14)?,
        two(17)?,
    ];
    let zone = if with_zone {
        s.len().checked_sub(3)?
    } else {
        s.len()
    };
    let nanos = match s.get(19..zone)? {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            let mut n = 0;
            for &c in fraction {
                let d = c.wrapping_sub(b'0');
                if d >= 10 {
                    return None;
                }
                n = n * 10 + i64::from(d);
            }
            n * 10i64.pow(u32::try_from(9 - fraction.len()).ok()?)
        }
        _ => return None,
    };
    let offset = match s.get(zone..)? {
        [] => 0,
        [sign @ (b'+' | b'-'), ..] => {
            let hours = two(zone + 1)?;
            if hours > 23 {
                return None;
            }
            if *sign == b'-' {
                -hours * 3600
            } else {
                hours * 3600
            }
        }
        _ => return None,
    };
    micros_since_epoch(fields, nanos, offset)
}

/// Microseconds since 1970-01-01 UTC of `[year, month, day, hour, minute, second]` and
/// `nanos` at `offset` seconds east of UTC; `None` for a field out of its range.
fn micros_since_epoch(fields: [i64; 6], nanos: i64, offset: i64) -> Option<i64> {
    let [year, month, day, hour, minute, second] = fields;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day == 0
        || day > month_days[usize::try_from(month - 1).ok()?]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    // Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(seconds * 1_000_000 + nanos / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        #[test]
        fn the_usual_shape_reads_as_chrono_reads_it(
            year in 0i64..10_000, month in 0i64..14, day in 0i64..33,
            hour in 0i64..25, minute in 0i64..61, second in 0i64..61,
            fraction in "(\\.[0-9]{0,10})?",
            offset in prop::option::of((any::<bool>(), 0i64..25, 0i64..61)),
        ) {
            let mut text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}"
            );
            if let Some((minus, h, m)) = offset {
                text.push_str(&format!("{}{h:02}:{m:02}", if minus { '-' } else { '+' }));
            }
            let chrono = any_timestamp(&text);
            match usual_timestamp(text.as_bytes()) {
                Some(fast) => prop_assert_eq!(Some(fast), chrono, "{}", text),
                // Where chrono reads the usual shape, so does the fast path, but for a leap
                // second and more than nine decimals, left to chrono.
                None => prop_assert!(
                    chrono.is_none() || second == 60 || fraction.len() > 10,
                    "{} read only by chrono", text
                ),
            }
        }

        /// The server's text of a usual timestamp read in place gives what its JSON value
        /// gives.
        #[test]
        fn a_raw_timestamp_reads_as_its_value_reads(
            year in 1000i64..10_000, month in 1i64..13, day in 1i64..32,
            hour in 0i64..25, minute in 0i64..60, second in 0i64..60,
            fraction in "(\\.[0-9]{1,7})?",
            zone in prop::option::of((any::<bool>(), 0i64..25)),
        ) {
            let text = format!(
                "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}{fraction}"
            );
            let (kind, text) = match zone {
                Some((minus, h)) => {
                    (Raw::TimestampTz, format!("{text}{}{h:02}", if minus { '-' } else { '+' }))
                }
                None => (Raw::Timestamp, text),
            };
            let value = parse_timestamp(&kind.to_value(text.as_bytes()));
            prop_assert_eq!(raw_timestamp(text.as_bytes(), kind == Raw::TimestampTz), value, "{}", text);
        }
    }

    #[test]
    fn parses_record_timestamps_as_to_jsonb_writes_them() {
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05.123456+00:00")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T05:04:05.123456+02:00")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05.123456")),
            Some(1_704_164_645_123_456)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05")),
            Some(1_704_164_645_000_000)
        );
        assert_eq!(
            parse_timestamp(&json!("2024-01-02T03:04:05.123456-01:30")),
            Some(1_704_164_645_123_456 + 5_400_000_000)
        );
        assert_eq!(
            parse_timestamp(&json!("1969-12-31T23:59:59.5")),
            Some(-500_000)
        );
        assert_eq!(parse_timestamp(&json!(42)), Some(42));
        assert_eq!(parse_timestamp(&json!("infinity")), None);
        assert_eq!(parse_timestamp(&json!(null)), None);
    }

    /// The status timestamp of a field kept as the server's text is the one of its value.
    #[test]
    fn a_raw_field_gives_the_timestamp_its_value_gives() {
        let commit = 2_000_000_000_000_000;
        let columns = crate::event::Names::shared(vec!["updated_at".into()]);
        for (kind, text, micros) in [
            (
                Raw::TimestampTz,
                "2024-01-02 05:04:05.123456+02",
                1_704_164_645_123_456,
            ),
            (Raw::Timestamp, "2024-01-02 03:04:05", 1_704_164_645_000_000),
            (Raw::Number, "42", 42),
            (Raw::Text, "2024-01-02T03:04:05Z", 1_704_164_645_000_000),
            (Raw::Text, "soon", commit),
        ] {
            let mut record = crate::event::Record::of(&columns);
            record.set_raw(0, kind, text.as_bytes());
            let mut event = crate::testing::event(
                EventType::Insert,
                "posts",
                json!({}),
                serde_json::Value::Null,
                0,
            );
            event.timestamp = commit;
            event.new_record = Some(record);
            assert_eq!(status_timestamp(&event, "updated_at"), micros, "{text}");
        }
        // Remembered, the last reading is the answer only for the same text.
        let mut last = LastTimestamp::default();
        for (kind, text, micros) in [
            (
                Raw::Timestamp,
                "2024-01-02 03:04:05",
                Some(1_704_164_645_000_000),
            ),
            (
                Raw::Timestamp,
                "2024-01-02 03:04:05",
                Some(1_704_164_645_000_000),
            ),
            (
                Raw::TimestampTz,
                "2024-01-02 03:04:05+01",
                Some(1_704_161_045_000_000),
            ),
            (
                Raw::Timestamp,
                "2024-01-02 03:04:06",
                Some(1_704_164_646_000_000),
            ),
            (Raw::Timestamp, "2024-13-02 03:04:06", None),
        ] {
            assert_eq!(last.read(kind, text.as_bytes()), micros, "{text}");
        }
    }
}
