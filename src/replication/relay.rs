//! TLS and the choice among several servers for the SQL pool: a relay between sqlx and the
//! server.
//!
//! sqlx 0.8 cannot verify the server as libpq does. Its rustls verifier for verify-ca
//! forgives only `CertificateError::NotValidForName`, while rustls 0.23 reports a wrong name
//! as `NotValidForNameContext`, so verify-ca checks the name after all; sqlx 0.9 forgives
//! both. And in every sqlx release so far the root certificates are the webpki roots *and*
//! sslrootcert, where libpq trusts sslrootcert alone: under verify-ca that would admit any
//! server with a publicly issued certificate, whatever its name. sqlx takes no stream from
//! outside, only a TCP address or a Unix socket; so when the server's certificate is to be
//! verified ([`super::tls::verifies_certificate`]), the pool connects in plain to a Unix
//! socket of ours, and each connection on it is relayed to the server over a [`Transport`]
//! opened by tls.rs: the same SSLRequest, root certificates and verifier as the replication
//! connection.
//!
//! ```text
//! sqlx ── plain, Unix socket in a 0700 directory ──► relay ── Transport: TCP + TLS ──► server
//! ```
//!
//! - The relay lives as long as whoever holds the [`Relay`]: the pool's `after_connect` hook
//!   (catalog.rs). When it is dropped the socket stops accepting and its directory is
//!   removed; connections already relayed go on until sqlx or the server closes them.
//! - sqlx sends its startup packet first; the relay reads it, opens the transport within
//!   `connect_timeout` and passes the packet on. When the transport cannot be opened, sqlx
//!   gets an ErrorResponse whose message is the [`ReplicationError`], with SQLSTATE
//!   [`TRANSIENT`] when retrying may help (refused, timed out) and [`DEFINITE`] when it
//!   cannot (certificate rejected, no TLS on the server, an unreadable sslrootcert). sqlx's
//!   own TLS reports a rejected certificate as an I/O error, which reads as transient: the
//!   service would wait for the server for ever instead of saying what is wrong.
//! - Authentication runs end to end between sqlx and the server: the relay holds no
//!   password. (sqlx never does SCRAM channel binding, with TLS of its own or not.)
//! - Only our own user (and root) can open the socket; whoever does must still authenticate
//!   to the server, as over TCP.
//!
//! sqlx cannot follow several servers either: it connects to one host. So when the URL names
//! several, or a `target_session_attrs` ([`ConnectParams::chooses_server`]), the pool goes
//! through the relay too, and for each new pool connection the relay first finds the server
//! as the replication connection does ([`Connection::choose`]: a connection of its own,
//! authenticated, asking each server in turn whether it is in recovery), then relays to
//! that one. After a failover the pool's connections to the old primary fail, and those it
//! opens next reach the new one. For this the relay holds the password (only then).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::conn::{ConnectOptions, Connection};
use super::error::ReplicationError;
use super::params::ConnectParams;
use super::tls::Transport;

/// SQLSTATE sent to sqlx for a transient failure to reach the server:
/// sqlclient_unable_to_establish_sqlconnection, class 08, which
/// [`crate::error::is_transient_sqlstate`] retries.
pub const TRANSIENT: &str = "08001";
/// SQLSTATE sent to sqlx for a failure retrying cannot mend: system_error ("external to
/// PostgreSQL itself"), which [`crate::error::is_transient_sqlstate`] does not retry.
pub const DEFINITE: &str = "58000";

/// PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP_PACKET: usize = 10_000;

/// A listening relay to the server of one [`ConnectParams`].
#[derive(Debug)]
pub struct Relay {
    // Dropped in this order: the listener is told to stop, then the directory goes.
    _stop: DropGuard,
    dir: tempfile::TempDir,
}

impl Relay {
    /// Listens on `.s.PGSQL.<port>` in a new private directory and relays every connection
    /// to the server `params` names. Must be called within a tokio runtime, where the
    /// relay's tasks then run.
    pub fn start(params: &ConnectParams) -> io::Result<Relay> {
        let dir = tempfile::Builder::new()
            .prefix("streamex-tls-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let socket = dir.path().join(format!(".s.PGSQL.{}", params.port));
        let listener = UnixListener::bind(&socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "listening on {} for the sql pool's tls: {e} (a shorter TMPDIR helps when \
                     the path is too long)",
                    socket.display()
                ),
            )
        })?;
        let mut upstream = params.clone();
        if !params.chooses_server() {
            upstream.set_password(None);
        }
        let stop = CancellationToken::new();
        tokio::spawn(listen(listener, Arc::new(upstream), stop.clone()));
        tracing::debug!(socket = %socket.display(), server = %params.target(), "tls relay listening");
        Ok(Relay {
            _stop: stop.drop_guard(),
            dir,
        })
    }

    /// The directory holding the socket, for sqlx's `PgConnectOptions::socket` (with the
    /// port of the [`ConnectParams`]).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn listen(listener: UnixListener, params: Arc<ConnectParams>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                tokio::spawn(relay(client, params.clone()));
            }
            Err(error) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!(error = %error, "tls relay: accepting a pool connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One pool connection: its startup packet, then the transport, then bytes both ways.
async fn relay(mut client: UnixStream, params: Arc<ConnectParams>) {
    let startup = match read_packet(&mut client).await {
        Ok(startup) => startup,
        Err(error) => {
            tracing::debug!(error = %error, "tls relay: no startup packet from the pool");
            return;
        }
    };
    let mut server = match open(&params).await {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(server = %params.targets(), error = %error, "relay: cannot reach the server");
            let _ = client.write_all(&error_response(&error)).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    if let Err(error) = server.write_all(&startup).await {
        tracing::debug!(error = %error, "tls relay: sending the startup packet failed");
        return;
    }
    // Ends when either side closes: the pool dropped the connection, or the server ended it.
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(error = %error, "tls relay: connection ended with an error");
    }
}

/// The transport to the server, within `connect_timeout` as the replication connection.
/// Among several servers, to the one a connection of ours chose (see the module's notes).
async fn open(params: &ConnectParams) -> Result<Transport, ReplicationError> {
    let chosen;
    let params = match params.chooses_server() {
        true => {
            let (probe, server) = Connection::choose(params, &ConnectOptions::default()).await?;
            probe.close().await;
            chosen = server;
            &chosen
        }
        false => params,
    };
    let connect = Transport::connect(params);
    match params.connect_timeout {
        None => connect.await,
        Some(limit) => tokio::time::timeout(limit, connect)
            .await
            .unwrap_or_else(|_| {
                Err(ReplicationError::Timeout {
                    context: format!(
                        "connecting to {} (connect_timeout in the database url)",
                        params.target()
                    ),
                    after: limit,
                })
            }),
    }
}

/// A startup packet (or any untyped first packet): Int32 length, itself included, then the
/// body.
async fn read_packet(client: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut length = [0u8; 4];
    client.read_exact(&mut length).await?;
    let total = usize::try_from(u32::from_be_bytes(length)).unwrap_or(usize::MAX);
    if !(8..=MAX_STARTUP_PACKET).contains(&total) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("startup packet of {total} bytes"),
        ));
    }
    let mut packet = vec![0u8; total];
    packet[..4].copy_from_slice(&length);
    client.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// A FATAL ErrorResponse carrying `error`, which sqlx reports as a database error with this
/// SQLSTATE and message.
fn error_response(error: &ReplicationError) -> Vec<u8> {
    let code = if error.is_transient() {
        TRANSIENT
    } else {
        DEFINITE
    };
    let message = error.to_string();
    let mut body = Vec::with_capacity(message.len() + 32);
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message.as_str()),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let length = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    let mut response = Vec::with_capacity(body.len() + 5);
    response.push(b'E');
    response.extend_from_slice(&length.to_be_bytes());
    response.extend_from_slice(&body);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::DbError;

    #[test]
    fn error_responses_carry_the_message_and_the_retry_class() {
        let refused = ReplicationError::Connect {
            target: "db:5432".to_owned(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let rejected = ReplicationError::TlsVerification {
            target: "db:5432".to_owned(),
            sslmode: "verify-ca".to_owned(),
            reason: "the certificate is not signed by a trusted certificate authority".to_owned(),
        };
        for (error, code) in [(refused, TRANSIENT), (rejected, DEFINITE)] {
            let response = error_response(&error);
            assert_eq!(response[0], b'E');
            let length = i32::from_be_bytes(response[1..5].try_into().unwrap());
            assert_eq!(usize::try_from(length).unwrap(), response.len() - 1);
            let parsed = DbError::parse(&response[5..]).unwrap();
            assert_eq!(parsed.severity, "FATAL");
            assert_eq!(parsed.code, code);
            assert_eq!(parsed.message, error.to_string());
            assert_eq!(parsed.is_transient(), error.is_transient());
        }
    }

    #[tokio::test]
    async fn the_socket_is_private_and_goes_with_the_relay() {
        let params =
            ConnectParams::parse_with_env("postgres://u@127.0.0.1:1/d?sslmode=verify-ca", |_| None)
                .unwrap();
        let relay = Relay::start(&params).unwrap();
        let dir = relay.socket_dir().to_owned();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        let socket = dir.join(".s.PGSQL.1");
        UnixStream::connect(&socket).await.unwrap();
        drop(relay);
        assert!(!dir.exists());
        assert!(UnixStream::connect(&socket).await.is_err());
    }
}
