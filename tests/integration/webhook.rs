//! The webhook operator against a real HTTP server started by the test (and a real
//! PostgreSQL): events arrive in order, signed, with their position; failed posts are retried
//! and hold the slot back; an event that keeps failing is dead-lettered and the later ones
//! still arrive; batches; HTTPS with a private authority.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde_json::Value;
use sqlx::PgPool;
use streamex::config::Config;
use streamex::pubsub::PubSub;
use streamex::status::MemoryStatus;
use streamex::{Event, Position, testing};

use crate::common::{self, Service, eventually, slot_for};

const SECRET: &str = "a test key, not a real one";

/// A request as the receiver got it, and what it answered.
#[derive(Clone, Debug)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Bytes,
    answered: StatusCode,
    /// When it arrived.
    at: std::time::Instant,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    /// The events of the body: the event, or each of an array.
    fn events(&self) -> Vec<Value> {
        match serde_json::from_slice(&self.body).expect("a JSON body") {
            Value::Array(events) => events,
            event => vec![event],
        }
    }

    fn delivered(&self) -> bool {
        self.answered.is_success()
    }
}

/// Where an event of a body is: `commit_lsn#ordinal`.
fn position(event: &Value) -> Position {
    let text = format!(
        "{}#{}",
        event["commit_lsn"].as_str().expect("commit_lsn"),
        event["ordinal"]
    );
    text.parse().expect("a position")
}

fn title(event: &Value) -> &str {
    event["new_record"]["title"].as_str().unwrap_or("")
}

/// What the receiver answers.
#[derive(Default)]
struct Behaviour {
    /// Answer 500 to this many more requests.
    failing: AtomicUsize,
    /// Answer 422 to every body that holds this text.
    refuse: Option<&'static str>,
    /// Keep the first request waiting until this is notified.
    hold_first: Option<Arc<tokio::sync::Semaphore>>,
    /// Answer the failing requests 429 with this `Retry-After` instead of 500.
    retry_after: Option<&'static str>,
}

struct Receiver {
    behaviour: Behaviour,
    received: Mutex<Vec<Received>>,
}

impl Receiver {
    /// A server on 127.0.0.1 (a port of its own), posting to `/hooks/...`; its URL.
    async fn start(behaviour: Behaviour) -> anyhow::Result<(Arc<Receiver>, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks/T0/path-token", listener.local_addr()?);
        let receiver = Receiver::new(behaviour);
        let app = receiver.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((receiver, url))
    }

    fn new(behaviour: Behaviour) -> Arc<Receiver> {
        Arc::new(Receiver {
            behaviour,
            received: Mutex::default(),
        })
    }

    fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/hooks/T0/path-token", axum::routing::post(hook))
            .with_state(self.clone())
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::delivered)
            .collect()
    }

    /// The events it answered 2xx to, in order.
    fn delivered_events(&self) -> Vec<Value> {
        self.delivered().iter().flat_map(Received::events).collect()
    }
}

async fn hook(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap) {
    let at = std::time::Instant::now();
    let first = receiver.received.lock().unwrap().is_empty();
    if let (true, Some(gate)) = (first, &receiver.behaviour.hold_first) {
        let _ = gate.acquire().await;
    }
    let behaviour = &receiver.behaviour;
    let refused = behaviour
        .refuse
        .is_some_and(|text| String::from_utf8_lossy(&body).contains(text));
    let failing = behaviour
        .failing
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let mut answer = HeaderMap::new();
    let answered = if refused {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if let (true, Some(after)) = (failing, behaviour.retry_after) {
        answer.insert("retry-after", after.parse().expect("a header value"));
        StatusCode::TOO_MANY_REQUESTS
    } else if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    };
    let headers = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    receiver.received.lock().unwrap().push(Received {
        headers,
        body,
        answered,
        at,
    });
    (answered, answer)
}

/// Checks the signature as a receiver would, with ring and nothing of streamex: HMAC-SHA256
/// under the secret of the timestamp header, a dot, and the body's bytes.
fn signed(request: &Received) -> bool {
    let Some(hex) = request
        .header("x-streamex-signature")
        .strip_prefix("sha256=")
    else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut signed = request.header("x-streamex-timestamp").as_bytes().to_vec();
    signed.push(b'.');
    signed.extend_from_slice(&request.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

/// A configuration on database `url` with `operators` (TOML), quick retries and frequent
/// status updates.
fn config(url: &str, retry: &str, operators: &str) -> anyhow::Result<Config> {
    Ok(Config::parse(
        &format!(
            "database_url = {url:?}\nslot = {:?}\ntables = [\"posts\", \"comments\"]\n\
             [replication]\nstatus_interval = \"100ms\"\n\
             [retry]\ninitial = \"10ms\"\nmax = \"20ms\"\n{retry}\n{operators}",
            slot_for(url)
        ),
        "test.toml",
        [(
            "STREAMEX_OPERATORS__NOTIFY__WEBHOOK__SECRET".to_owned(),
            SECRET.to_owned(),
        )],
    )?)
}

/// The service on `config`, its webhooks built as `streamex run` builds them.
async fn start(config: &Config) -> anyhow::Result<Service> {
    let operators = streamex::operators::build(&config.operators)?;
    Service::start(config, MemoryStatus::new(), PubSub::new(), operators).await
}

async fn database() -> anyhow::Result<(String, PgPool)> {
    let url = testing::server().create_database().await?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(common::BLOG).execute(&pool).await?;
    Ok((url, pool))
}

/// Whether the slot's confirmed position is at or before `position`'s commit: it has not
/// been acknowledged past that event.
async fn slot_held_at(pool: &PgPool, position: Position) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT confirmed_flush_lsn <= $1::pg_lsn FROM pg_replication_slots
          WHERE database = current_database()",
    )
    .bind(position.commit_lsn.to_string())
    .fetch_one(pool)
    .await?)
}

#[tokio::test]
async fn events_arrive_in_order_signed_and_with_their_position() -> anyhow::Result<()> {
    let (url, pool) = database().await?;
    let (receiver, hook_url) = Receiver::start(Behaviour::default()).await?;
    let config = config(
        &url,
        "",
        &format!(
            "[[operators]]\nname = \"notify\"\n\
             webhook = {{ url = {hook_url:?}, entities = [\"comments\"], types = [\"insert\", \"delete\"], \
             headers = {{ Authorization = \"Bearer t\" }} }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'p');
         INSERT INTO comments (id, post_id, body) VALUES (1, 1, 'one');
         INSERT INTO comments (id, post_id, body) VALUES (2, 1, 'two');
         BEGIN;
         INSERT INTO comments (id, post_id, body) VALUES (3, 1, 'three'), (4, 1, 'four');
         COMMIT;
         UPDATE comments SET body = 'edited' WHERE id = 2;
         DELETE FROM comments WHERE id = 1;",
    )
    .execute(&pool)
    .await?;
    eventually("the five posts", || async {
        Ok(receiver.received().len() >= 5)
    })
    .await?;
    service.stop().await?;

    let received = receiver.received();
    let summary: Vec<(String, i64)> = received
        .iter()
        .map(|r| {
            let event = &r.events()[0];
            let record = if event["type"] == "delete" {
                &event["old_record"]
            } else {
                &event["new_record"]
            };
            (
                event["type"].as_str().unwrap_or("").to_owned(),
                record["id"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let expected = [
        ("insert", 1),
        ("insert", 2),
        ("insert", 3),
        ("insert", 4),
        ("delete", 1),
    ]
    .map(|(kind, id)| (kind.to_owned(), id));
    assert_eq!(
        summary, expected,
        "each event once, in WAL order; the update is not posted"
    );
    let mut last = None;
    for request in &received {
        assert!(signed(request), "a bad signature: {request:?}");
        assert_eq!(request.header("content-type"), "application/json");
        assert_eq!(request.header("x-streamex-operator"), "notify");
        assert_eq!(request.header("x-streamex-events"), "1");
        assert_eq!(request.header("authorization"), "Bearer t");
        // The body is the event as `streamex tail` prints it.
        let event: Event = serde_json::from_slice(&request.body)?;
        assert_eq!(serde_json::to_vec(&event)?, request.body);
        let at = event.position();
        assert_eq!(at, position(&request.events()[0]));
        assert_eq!(request.header("idempotency-key"), at.to_string());
        assert_eq!(request.header("x-streamex-first-position"), at.to_string());
        assert_eq!(request.header("x-streamex-last-position"), at.to_string());
        assert!(last < Some(at), "positions go forward");
        last = Some(at);
    }
    // A forged body does not pass the check the receiver makes.
    let mut forged = received[0].clone();
    forged.body = Bytes::from(String::from_utf8_lossy(&forged.body).replace("one", "eno"));
    assert!(!signed(&forged));
    Ok(())
}

#[tokio::test]
async fn failed_posts_are_retried_and_hold_the_slot_until_delivered() -> anyhow::Result<()> {
    let (url, pool) = database().await?;
    let failing = Behaviour {
        failing: AtomicUsize::new(usize::MAX),
        ..Behaviour::default()
    };
    let (flaky, flaky_url) = Receiver::start(failing).await?;
    let (steady, steady_url) = Receiver::start(Behaviour::default()).await?;
    let config = config(
        &url,
        "retries = 1000",
        &format!(
            "[[operators]]\nname = \"notify\"\nwebhook = {{ url = {flaky_url:?}, entities = [\"posts\"] }}\n\
             [[operators]]\nname = \"steady\"\nwebhook = {{ url = {steady_url:?}, entities = [\"posts\"] }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::query("INSERT INTO posts (id, title) VALUES (1, 'first')")
        .execute(&pool)
        .await?;
    eventually("three failed posts of the first event", || async {
        Ok(flaky.received().len() >= 3)
    })
    .await?;
    // Later events reach the other webhook; the slot stays before the undelivered one.
    sqlx::query("INSERT INTO posts (id, title) VALUES (2, 'second')")
        .execute(&pool)
        .await?;
    eventually("the steady webhook getting both", || async {
        Ok(steady.delivered().len() == 2)
    })
    .await?;
    let first = position(&flaky.received()[0].events()[0]);
    assert!(
        slot_held_at(&pool, first).await?,
        "the slot moved past an event the webhook has not delivered"
    );
    assert!(flaky.delivered().is_empty());

    // The endpoint recovers: the same event again, then the next; the slot moves on.
    flaky.behaviour.failing.store(0, Ordering::SeqCst);
    eventually("both delivered", || async {
        Ok(flaky.delivered().len() == 2)
    })
    .await?;
    let second = position(&steady.delivered()[1].events()[0]);
    eventually("the slot acknowledged past both", || async {
        Ok(!slot_held_at(&pool, second).await?)
    })
    .await?;
    service.stop().await?;

    let received = flaky.received();
    let (tries, rest) = received.split_at(received.len() - 2);
    assert!(tries.len() >= 3, "{} failed tries", tries.len());
    assert!(
        tries
            .iter()
            .all(|r| r.answered == StatusCode::INTERNAL_SERVER_ERROR)
    );
    for request in tries.iter().chain(&rest[..1]) {
        // Every try is the same event, with the same key, signed anew.
        assert_eq!(request.body, received[0].body);
        assert_eq!(request.header("idempotency-key"), first.to_string());
        assert!(signed(request));
    }
    let titles: Vec<String> = flaky
        .delivered_events()
        .iter()
        .map(|e| title(e).to_owned())
        .collect();
    assert_eq!(titles, ["first", "second"]);
    Ok(())
}

/// A 429 with `Retry-After: 2` makes the next try wait two seconds, though the retry
/// policy's own backoff is 10 to 20 ms.
#[tokio::test]
async fn a_retry_after_header_is_waited_for() -> anyhow::Result<()> {
    let (url, pool) = database().await?;
    let limited = Behaviour {
        failing: AtomicUsize::new(2),
        retry_after: Some("2"),
        ..Behaviour::default()
    };
    let (receiver, hook_url) = Receiver::start(limited).await?;
    let config = config(
        &url,
        "retries = 5",
        &format!(
            "[[operators]]\nname = \"notify\"\nwebhook = {{ url = {hook_url:?}, entities = [\"posts\"] }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::query("INSERT INTO posts (id, title) VALUES (1, 'first')")
        .execute(&pool)
        .await?;
    eventually("the event delivered", || async {
        Ok(receiver.delivered().len() == 1)
    })
    .await?;
    service.stop().await?;
    let received = receiver.received();
    let answered: Vec<StatusCode> = received.iter().map(|r| r.answered).collect();
    assert_eq!(
        answered,
        [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::NO_CONTENT
        ]
    );
    for pair in received.windows(2) {
        let waited = pair[1].at.duration_since(pair[0].at);
        assert!(
            waited >= std::time::Duration::from_secs(2),
            "the next try came {waited:?} after a Retry-After of 2 s"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_event_that_keeps_failing_is_dead_lettered_and_later_events_arrive() -> anyhow::Result<()>
{
    let (url, pool) = database().await?;
    let refusing = Behaviour {
        refuse: Some("poison"),
        ..Behaviour::default()
    };
    let (receiver, hook_url) = Receiver::start(refusing).await?;
    let config = config(
        &url,
        "retries = 2\non_failure = \"dead_letter\"",
        &format!(
            "[[operators]]\nname = \"notify\"\nwebhook = {{ url = {hook_url:?}, entities = [\"posts\"] }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::raw_sql(
        "INSERT INTO posts (id, title) VALUES (1, 'fine');
         INSERT INTO posts (id, title) VALUES (2, 'poison');
         INSERT INTO posts (id, title) VALUES (3, 'after');",
    )
    .execute(&pool)
    .await?;
    eventually("the event after the poison", || async {
        Ok(receiver.delivered().len() == 2)
    })
    .await?;
    service.stop().await?;
    let titles: Vec<String> = receiver
        .delivered_events()
        .iter()
        .map(|e| title(e).to_owned())
        .collect();
    assert_eq!(titles, ["fine", "after"]);
    let refused = receiver
        .received()
        .iter()
        .filter(|r| !r.delivered())
        .count();
    assert_eq!(refused, 3, "the first try and two retries");
    let letters: Vec<(String, i32, Value, String)> =
        sqlx::query_as("SELECT operator, attempts, event, error FROM streamex.dead_letters")
            .fetch_all(&pool)
            .await?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (operator, attempts, event, error) = &letters[0];
    assert_eq!((operator.as_str(), *attempts), ("notify", 3));
    assert_eq!(title(event), "poison");
    assert!(
        error.contains("answered 422 Unprocessable Entity"),
        "{error}"
    );
    // The error names the endpoint by its origin, never its path (which may be a credential).
    assert!(
        error.contains("http://127.0.0.1:") && !error.contains("path-token"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn batches_carry_up_to_batch_size_events_in_order() -> anyhow::Result<()> {
    let (url, pool) = database().await?;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let holding = Behaviour {
        hold_first: Some(gate.clone()),
        ..Behaviour::default()
    };
    let (batched, batched_url) = Receiver::start(holding).await?;
    let (witness, witness_url) = Receiver::start(Behaviour::default()).await?;
    let config = config(
        &url,
        "",
        &format!(
            "[[operators]]\nname = \"notify\"\n\
             webhook = {{ url = {batched_url:?}, entities = [\"posts\"], batch_size = 10 }}\n\
             [[operators]]\nname = \"witness\"\nwebhook = {{ url = {witness_url:?}, entities = [\"posts\"] }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::query("INSERT INTO posts (title) SELECT 'p' || i FROM generate_series(1, 30) i")
        .execute(&pool)
        .await?;
    // The events are handed to every operator in WAL order: once the witness has the last,
    // the batched webhook's inbox holds all of them behind its first, held request.
    eventually("the witness getting all", || async {
        Ok(witness.received().len() == 30)
    })
    .await?;
    gate.add_permits(1);
    eventually("all delivered in batches", || async {
        Ok(batched.delivered_events().len() == 30)
    })
    .await?;
    service.stop().await?;

    let requests = batched.received();
    let titles: Vec<String> = batched
        .delivered_events()
        .iter()
        .map(|e| title(e).to_owned())
        .collect();
    let expected: Vec<String> = (1..=30).map(|i| format!("p{i}")).collect();
    assert_eq!(titles, expected, "each once, in order");
    let sizes: Vec<usize> = requests.iter().map(|r| r.events().len()).collect();
    assert!(requests.iter().all(Received::delivered), "{sizes:?}");
    assert!(
        sizes.len() >= 3 && sizes.iter().all(|&n| (1..=10).contains(&n)),
        "{sizes:?}"
    );
    assert!(
        sizes[1..sizes.len() - 1].iter().all(|&n| n == 10),
        "{sizes:?}"
    );
    for request in &requests {
        assert!(signed(request));
        assert!(request.body.starts_with(b"["), "every body is an array");
        let events = request.events();
        let (first, last) = (position(&events[0]), position(&events[events.len() - 1]));
        assert_eq!(
            request.header("x-streamex-first-position"),
            first.to_string()
        );
        assert_eq!(request.header("x-streamex-last-position"), last.to_string());
        assert_eq!(
            request.header("x-streamex-events"),
            events.len().to_string()
        );
        let key = if events.len() == 1 {
            first.to_string()
        } else {
            format!("{first}..{last}")
        };
        assert_eq!(request.header("idempotency-key"), key);
    }
    Ok(())
}

/// Accepts TLS connections for axum, with the certificate of a test authority.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses the certificate ends its handshake: wait for the next.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[tokio::test]
async fn https_is_verified_against_the_configured_authority() -> anyhow::Result<()> {
    let (url, pool) = database().await?;
    let ca = common::Ca::new("streamex webhook test ca")?;
    let (cert, key) = ca.issue(&["127.0.0.1"])?;
    let dir = tempfile::tempdir()?;
    let ca_file = ca.write(&dir, "ca.pem")?;
    let certs = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key.as_bytes())?.expect("a key");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("https://{}/hooks/T0/path-token", tcp.local_addr()?);
    let receiver = Receiver::new(Behaviour::default());
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    };
    let app = receiver.router();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // One webhook trusts the test authority, the other only the webpki roots.
    let config = config(
        &url,
        "retries = 0\non_failure = \"dead_letter\"",
        &format!(
            "[[operators]]\nname = \"notify\"\n\
             webhook = {{ url = {hook_url:?}, entities = [\"posts\"], ca_file = {ca_file:?} }}\n\
             [[operators]]\nname = \"untrusting\"\nwebhook = {{ url = {hook_url:?}, entities = [\"posts\"] }}"
        ),
    )?;
    let service = start(&config).await?;
    sqlx::query("INSERT INTO posts (id, title) VALUES (1, 'over tls')")
        .execute(&pool)
        .await?;
    eventually("the post over TLS and the refusal", || async {
        let refused: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM streamex.dead_letters WHERE operator = 'untrusting'",
        )
        .fetch_one(&pool)
        .await?;
        Ok(receiver.delivered().len() == 1 && refused == 1)
    })
    .await?;
    service.stop().await?;
    let delivered = receiver.delivered();
    assert_eq!(
        delivered.len(),
        1,
        "only the webhook that trusts the authority got through"
    );
    assert_eq!(title(&delivered[0].events()[0]), "over tls");
    assert!(signed(&delivered[0]));
    let error: String =
        sqlx::query_scalar("SELECT error FROM streamex.dead_letters WHERE operator = 'untrusting'")
            .fetch_one(&pool)
            .await?;
    assert!(
        error.contains("certificate was refused") && error.contains("ca_file"),
        "{error}"
    );
    Ok(())
}
