//! `GET /channels/{*channel}`: a pub/sub channel as Server-Sent Events.
//!
//! ```text
//!  : subscribed to posts/42/comments          first, once the subscription is registered
//!  id: 0/1A2B4F0#0                            per event: its (commit_lsn, ordinal)
//!  data: {"type":"insert",...}                the event as `streamex tail` prints it
//!  : keep-alive                               while idle, every [http] keep_alive
//!  event: lagged                              the client fell behind and was cut off:
//!  data: {"channel":..,"dropped_at":..}       the last message; the stream then ends
//! ```
//!
//! A client that falls `[http] sse_capacity` events behind is cut off by the bus
//! ([`RecvError::Lagged`]): it receives every event before the gap, then `event: lagged`,
//! and the response ends. It is never fed a gap silently; it re-subscribes (and re-reads the
//! state it needs) to go on. A browser's `EventSource` reconnects by itself when a stream
//! ends, so a page should `close()` it on `lagged` and decide what to re-read.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use crate::pubsub::{RecvError, Subscription};

pub(super) async fn channel<S>(
    State(endpoint): State<Arc<Endpoint<S>>>,
    Path(channel): Path<String>,
) -> Response {
    let subscription = endpoint.pubsub.subscribe(&channel, endpoint.sse_capacity);
    let first = SseEvent::default().comment(format!("subscribed to {channel}"));
    let events = stream::once(async move { Ok(first) })
        .chain(follow(subscription, endpoint.shutdown.clone()));
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(endpoint.keep_alive)
                .text("keep-alive"),
        )
        .into_response();
    super::allow_origin(&endpoint, &mut response);
    response
}

/// The subscription's events until it ends, it is cut off (a last `lagged` message), or
/// `shutdown`.
fn follow(
    subscription: Subscription,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    stream::unfold(Some((subscription, shutdown)), |state| async move {
        let (mut subscription, shutdown) = state?;
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            received = subscription.recv() => received,
        };
        match received {
            Ok(event) => {
                let (lsn, ordinal) = event.position();
                let message = match serde_json::to_string(&*event) {
                    Ok(data) => SseEvent::default()
                        .id(format!("{lsn}#{ordinal}"))
                        .data(data),
                    // An event always serializes; should one not, say so rather than
                    // skip it silently, and end the stream.
                    Err(error) => {
                        return Some((
                            Ok(lagged_message(json!({
                                "channel": subscription.channel(),
                                "error": format!("serializing event {lsn}#{ordinal}: {error}"),
                            }))),
                            None,
                        ));
                    }
                };
                Some((Ok(message), Some((subscription, shutdown))))
            }
            Err(RecvError::Lagged {
                channel,
                dropped_at: (lsn, ordinal),
            }) => Some((
                Ok(lagged_message(json!({
                    "channel": channel,
                    "dropped_at": format!("{lsn}#{ordinal}"),
                    "message": "this client fell behind and was cut off; every event \
                                before dropped_at was sent, none after: subscribe again \
                                and re-read the state you need",
                }))),
                None,
            )),
            Err(RecvError::Closed) => None,
        }
    })
}

fn lagged_message(data: serde_json::Value) -> SseEvent {
    SseEvent::default().event("lagged").data(data.to_string())
}
