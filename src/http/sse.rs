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
//! A client that falls `[http] sse_capacity` events or `[http] sse_max_bytes` bytes of event
//! JSON behind is cut off by the bus ([`RecvError::Lagged`]): it receives every event before
//! the gap, then `event: lagged`, and the response ends. It is never fed a gap silently; it
//! re-subscribes (and re-reads the state it needs) to go on. A browser's `EventSource`
//! reconnects by itself when a stream ends, so a page should `close()` it on `lagged` and
//! decide what to re-read. At most `[http] max_clients` streams are open at once; a client
//! beyond them is answered 503.
//!
//! # One copy of an event for all clients
//!
//! An event is written as three body frames: `id: ..\ndata: `, its JSON, `\n\n`. The JSON
//! frame is the [`Published::json`] the bus serialised once, cloned (a reference count),
//! never copied: the server queues frames as they are (vectored writes), so the bytes a
//! client has not read yet are shared with every other client of the event. Compact JSON
//! holds no line break, so it is one `data:` line.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use crate::pubsub::{Published, RecvError, Subscription};

pub(super) async fn channel<S>(State(endpoint): State<Arc<Endpoint<S>>>, uri: Uri) -> Response {
    let Some(channel) = channel_name(uri.path()) else {
        return (
            StatusCode::BAD_REQUEST,
            "the channel name is not valid percent-encoded UTF-8\n",
        )
            .into_response();
    };
    // The channel's first part names a table (`comments`, `posts/42/comments`).
    // A `message:<prefix>` channel names none.
    let first = channel.split('/').next().unwrap_or_default();
    let checked = match channel.starts_with(crate::pubsub::MESSAGE_CHANNEL) {
        true => Ok(()),
        false => super::published_entity(&endpoint, first).await.map(drop),
    };
    if let Err(mut response) = checked {
        super::allow_origin(&endpoint, &mut response);
        return response;
    }
    let settings = &endpoint.settings;
    // Held as long as the stream is: dropped with it.
    let Ok(place) = settings.clients.clone().try_acquire_owned() else {
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "error": format!(
                    "{} event streams are open, as many as [http] max_clients allows: \
                     try again later, or raise [http] max_clients",
                    settings.max_clients
                ),
            })),
        )
            .into_response();
        super::allow_origin(&endpoint, &mut response);
        return response;
    };
    let subscription = endpoint.pubsub.subscribe_with_max_bytes(
        &channel,
        settings.sse_capacity,
        settings.sse_max_bytes,
    );
    // A line break would end the comment; a channel name may hold one (a key value).
    let shown = channel.replace('\r', "%0D").replace('\n', "%0A");
    let first = Bytes::from(format!(": subscribed to {shown}\n\n"));
    let frames = stream::once(async move { first })
        .chain(follow(
            subscription,
            endpoint.shutdown.clone(),
            settings.keep_alive,
        ))
        .map(move |frame| {
            let _place = &place;
            Ok::<_, Infallible>(frame)
        });
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    super::allow_origin(&endpoint, &mut response);
    response
}

/// The subscription's events as body frames, a keep-alive comment after each `keep_alive`
/// without one, until the subscription ends, it is cut off (a last `lagged` message), or
/// `shutdown`.
fn follow(
    subscription: Subscription,
    shutdown: CancellationToken,
    keep_alive: Duration,
) -> impl Stream<Item = Bytes> + Send {
    stream::unfold(Some((subscription, shutdown)), move |state| async move {
        let (mut subscription, shutdown) = state?;
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            received = subscription.recv_published() => received,
            () = tokio::time::sleep(keep_alive) => {
                let frames = vec![Bytes::from_static(b": keep-alive\n\n")];
                return Some((frames, Some((subscription, shutdown))));
            }
        };
        match received {
            Ok(published) => Some((
                event_frames(&published).to_vec(),
                Some((subscription, shutdown)),
            )),
            Err(RecvError::Lagged {
                channel,
                dropped_at,
            }) => Some((
                vec![lagged_message(json!({
                    "channel": channel,
                    "dropped_at": dropped_at.to_string(),
                    "message": "this client fell behind and was cut off; every event \
                                before dropped_at was sent, none after: subscribe again \
                                and re-read the state you need",
                }))],
                None,
            )),
            Err(RecvError::Closed) => None,
        }
    })
    .flat_map(stream::iter)
}

/// One event's message: its id and `data: ` line, the shared JSON, the blank line.
fn event_frames(published: &Published) -> [Bytes; 3] {
    let position = published.event().position();
    [
        Bytes::from(format!("id: {position}\ndata: ")),
        published.json().clone(),
        Bytes::from_static(b"\n\n"),
    ]
}

fn lagged_message(data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: lagged\ndata: {data}\n\n"))
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
    use super::*;
    use crate::event::EventType;
    use crate::pubsub::PubSub;

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

    #[tokio::test]
    async fn every_stream_sends_the_one_serialisation_of_an_event() {
        let bus = PubSub::new();
        let shutdown = CancellationToken::new();
        let streams = [
            bus.subscribe_with_max_bytes("comments", 8, 1 << 20),
            bus.subscribe_with_max_bytes("posts/1/comments", 8, 1 << 20),
        ]
        .map(|sub| Box::pin(follow(sub, shutdown.clone(), Duration::from_secs(3600))));
        let event = Arc::new(crate::testing::event(
            EventType::Insert,
            "comments",
            json!({"id": 1, "post_id": 1, "body": "x".repeat(100_000)}),
            serde_json::Value::Null,
            0,
        ));
        bus.publish(
            &["comments".to_owned(), "posts/1/comments".to_owned()],
            &event,
        );
        let mut pointers = Vec::new();
        for mut frames in streams {
            let id = frames.next().await.unwrap();
            let position = event.position();
            assert_eq!(&id[..], format!("id: {position}\ndata: ").as_bytes());
            let data = frames.next().await.unwrap();
            assert_eq!(&data[..], serde_json::to_vec(&*event).unwrap());
            pointers.push(data.as_ptr());
            assert_eq!(&frames.next().await.unwrap()[..], b"\n\n");
        }
        assert_eq!(pointers[0], pointers[1], "each stream has its own copy");
    }
}
