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

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use crate::pubsub::{RecvError, Subscription};

pub(super) async fn channel<S>(State(endpoint): State<Arc<Endpoint<S>>>, uri: Uri) -> Response {
    let Some(channel) = channel_name(uri.path()) else {
        return (
            StatusCode::BAD_REQUEST,
            "the channel name is not valid percent-encoded UTF-8\n",
        )
            .into_response();
    };
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

/// The channel named by a request path `/channels/<name>`, percent-decoded except for `%2F`,
/// `%2C` and `%25`: those stand for `/`, `,` and `%` inside a key value in channel names
/// (see [`crate::pubsub`]), so they stay encoded. `None` for bytes that are not UTF-8.
fn channel_name(path: &str) -> Option<String> {
    let raw = path.strip_prefix("/channels/")?.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                let byte = u8::try_from(high * 16 + low).ok()?;
                match byte {
                    b'/' | b',' | b'%' => {
                        bytes.extend_from_slice(format!("%{byte:02X}").as_bytes())
                    }
                    byte => bytes.push(byte),
                }
                i += 3;
            }
            (byte, _, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::channel_name;

    #[test]
    fn channel_names_keep_encoded_separators_and_decode_the_rest() {
        assert_eq!(
            channel_name("/channels/posts/42/comments").as_deref(),
            Some("posts/42/comments")
        );
        assert_eq!(
            channel_name("/channels/tags/a%2fb%2Cc%25d").as_deref(),
            Some("tags/a%2Fb%2Cc%25d")
        );
        assert_eq!(
            channel_name("/channels/tags/caf%C3%A9%20bar").as_deref(),
            Some("tags/café bar")
        );
        assert_eq!(
            channel_name("/channels/tags/100%").as_deref(),
            Some("tags/100%")
        );
        assert_eq!(channel_name("/channels/tags/%FF"), None);
        assert_eq!(channel_name("/other"), None);
    }
}
