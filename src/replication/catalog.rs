//! The ordinary SQL connections that go with a replication connection: the same server,
//! database, role and TLS settings, for set-up, catalog look-ups, process status, operators
//! and the instance lock.
//!
//! When the server's certificate is verified, or the URL names several servers (or a
//! `target_session_attrs`), sqlx connects through a [`Relay`] and the TLS and the choice of
//! server are ours (relay.rs); otherwise sqlx connects to the server itself.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection as _, PgConnection, PgPool};

use super::relay::Relay;
use super::tls::verifies_certificate;
use super::{ConnectParams, Host, SslMode};

/// A pool of at most `max` connections to the server `params` names.
///
/// Options taken from the pool (`PgPool::connect_options`) open connections of the same
/// kind for as long as the pool exists.
pub async fn catalog_pool(params: &ConnectParams, max: u32) -> Result<PgPool, sqlx::Error> {
    catalog_pool_with(params, max, None).await
}

/// [`catalog_pool`], every session of which has the server end a transaction left idle for
/// `idle_transactions` (`idle_in_transaction_session_timeout`), from the moment it opens: a
/// frozen instance's open transaction, and the row locks it holds, cannot outlive its lease.
pub(crate) async fn catalog_pool_with(
    params: &ConnectParams,
    max: u32,
    idle_transactions: Option<Duration>,
) -> Result<PgPool, sqlx::Error> {
    let (mut options, relay) = connect_options(params)?;
    if let Some(idle) = idle_transactions {
        options = options.options([("idle_in_transaction_session_timeout", idle.as_millis())]);
    }
    let mut pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(params.connect_timeout.unwrap_or(Duration::from_secs(30)));
    if let Some(relay) = relay {
        // sqlx keeps this hook as long as the pool exists, so the relay lives exactly as long:
        // the pool opens connections through it until its last handle is gone.
        pool = pool.after_connect(move |_, _| {
            let _relay = &relay;
            Box::pin(async { Ok(()) })
        });
    }
    pool.connect_with(options).await
}

/// One connection like the pool's, for a quick check that the server answers: unlike a
/// pool, it does not keep trying while nothing listens.
pub async fn catalog_connection(params: &ConnectParams) -> Result<PgConnection, sqlx::Error> {
    let (options, relay) = connect_options(params)?;
    let connection = PgConnection::connect_with(&options).await;
    // The relay stops listening here; the connection it relays goes on until it is closed.
    drop(relay);
    connection
}

/// sqlx options for the server `params` names and, when the certificate is verified, the
/// relay they connect through, which must outlive every connection opened with them.
fn connect_options(
    params: &ConnectParams,
) -> Result<(PgConnectOptions, Option<Relay>), sqlx::Error> {
    let mut options = PgConnectOptions::new_without_pgpass()
        .port(params.port)
        .username(&params.user)
        .database(&params.dbname)
        .application_name(params.application_name.as_deref().unwrap_or("streamex"));
    if let Some(password) = params.password() {
        options = options.password(password);
    }
    if verifies_certificate(params) || params.chooses_server() {
        let relay = Relay::start(params).map_err(|e| sqlx::Error::Configuration(e.into()))?;
        // Plain to the relay, which opens the TLS to the server.
        let options = options
            .socket(relay.socket_dir())
            .ssl_mode(PgSslMode::Disable);
        return Ok((options, Some(relay)));
    }
    options = match &params.host {
        Host::Unix(dir) => options.socket(dir),
        Host::Name(name) => options.host(name),
        Host::Ip(ip) => options.host(&ip.to_string()),
    };
    options = options.ssl_mode(match (&params.host, params.sslmode) {
        // sqlx would ask for TLS over a Unix socket too, and the server always says no: like
        // libpq and tls.rs, never ask there.
        (Host::Unix(_), _) | (_, SslMode::Disable) => PgSslMode::Disable,
        // Over TCP only prefer and require without a root certificate get here (a verified
        // certificate goes through the relay): sqlx encrypts without verifying, as tls.rs.
        (_, SslMode::Prefer) => PgSslMode::Prefer,
        (_, SslMode::Require) => PgSslMode::Require,
        (_, SslMode::VerifyCa) => PgSslMode::VerifyCa,
        (_, SslMode::VerifyFull) => PgSslMode::VerifyFull,
    });
    Ok((options, None))
}
