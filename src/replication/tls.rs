//! The transport under the wire protocol: plain TCP, a Unix socket, or TLS over TCP.
//!
//! TLS is negotiated the classic way, before the startup packet:
//!
//! ```text
//! client                                   server
//!   │── SSLRequest (Int32 8, Int32 80877103) ──►│
//!   │◄──────────── 'S' (yes) or 'N' (no) ────────│
//!   │   'S': TLS handshake, then everything inside TLS
//!   │   'N': plain (sslmode=prefer) or an error (require, verify-ca, verify-full)
//! ```
//!
//! The modes follow libpq:
//!
//! | sslmode     | TLS                | certificate checked                               |
//! |-------------|--------------------|---------------------------------------------------|
//! | disable     | never              | -                                                 |
//! | prefer      | when offered       | only when a root certificate file is present      |
//! | require     | always             | only when a root certificate file is present      |
//! | verify-ca   | always             | chain, not the host name                          |
//! | verify-full | always             | chain and host name (an IP host as an IP address) |
//!
//! The root certificates are `sslrootcert`, else `~/.postgresql/root.crt` when it exists, else
//! (for verify-ca and verify-full only) the webpki roots. Unix sockets never use TLS. As in
//! libpq, a failed TLS handshake under `prefer` is followed by a second connection in plain.
//!
//! The SQL pool's connections go through this same code whenever the certificate is verified
//! (relay.rs explains how, and why sqlx's own TLS will not do).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::ReplicationError;
use super::params::{ConnectParams, Host, SslMode};

/// A connected byte stream to the server.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A Unix socket (never TLS).
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The `tls-server-end-point` channel binding data (RFC 5929) for SCRAM-SHA-256-PLUS: the
    /// hash of the server's certificate, with the hash of its signature algorithm (SHA-256
    /// for MD5 and SHA-1). `None` without TLS or for algorithms without a usable hash
    /// (SHA-512, RSA-PSS, Ed25519), in which case SCRAM runs without channel binding.
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        let Transport::Tls(stream) = self else {
            return None;
        };
        let cert = stream.get_ref().1.peer_certificates()?.first()?;
        let hash = end_point_hash(signature_algorithm(cert.as_ref())?)?;
        Some(hash.hash(cert.as_ref()).as_ref().to_vec())
    }

    /// Opens the transport for `params`: connects, then negotiates TLS as `sslmode` says.
    /// With `prefer`, as libpq does, a failed TLS handshake is followed by a second
    /// connection without TLS.
    pub async fn connect(params: &ConnectParams) -> Result<Transport, ReplicationError> {
        match Transport::connect_once(params, params.sslmode).await {
            Err(error @ (ReplicationError::Tls(_) | ReplicationError::TlsVerification { .. }))
                if params.sslmode == SslMode::Prefer =>
            {
                tracing::warn!(
                    server = %params.target(), error = %error,
                    "tls handshake failed; sslmode=prefer, so connecting again without tls"
                );
                Transport::connect_once(params, SslMode::Disable).await
            }
            result => result,
        }
    }

    async fn connect_once(
        params: &ConnectParams,
        sslmode: SslMode,
    ) -> Result<Transport, ReplicationError> {
        let connect_error = |source| ReplicationError::Connect {
            target: params.target(),
            source,
        };
        let tcp = match &params.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", params.port));
                let stream = UnixStream::connect(&path).await.map_err(connect_error)?;
                tracing::debug!(socket = %path.display(), "connected over the unix socket");
                return Ok(Transport::Unix(stream));
            }
            Host::Ip(ip) => TcpStream::connect((*ip, params.port)).await,
            Host::Name(name) => TcpStream::connect((name.as_str(), params.port)).await,
        }
        .map_err(connect_error)?;
        // Small messages (standby status updates) must not wait for Nagle.
        tcp.set_nodelay(true).map_err(connect_error)?;
        tracing::debug!(server = %params.target(), "connected over tcp");
        if sslmode == SslMode::Disable {
            return Ok(Transport::Tcp(tcp));
        }
        negotiate(tcp, params).await
    }
}

/// Whether a connection to `params` verifies the server's certificate, which is when there
/// are root certificates to verify it with: always under verify-ca and verify-full, and under
/// prefer and require when a root certificate file is present. Never over a Unix socket.
pub fn verifies_certificate(params: &ConnectParams) -> bool {
    if matches!(params.host, Host::Unix(_)) {
        return false;
    }
    match params.sslmode {
        SslMode::Disable => false,
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Prefer | SslMode::Require => root_certificate_file(params).is_some(),
    }
}

/// Sends the SSLRequest when the mode asks for TLS and, when the server agrees, runs the
/// handshake.
async fn negotiate(
    mut tcp: TcpStream,
    params: &ConnectParams,
) -> Result<Transport, ReplicationError> {
    if params.sslmode == SslMode::Disable {
        return Ok(Transport::Tcp(tcp));
    }
    // Build the configuration first: a bad sslrootcert should fail before any I/O.
    let config = client_config(params)?;
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&80_877_103i32.to_be_bytes());
    tcp.write_all(&request)
        .await
        .map_err(ReplicationError::io("sending the ssl request"))?;
    // Exactly one byte: anything the server sent after it must come through TLS (CVE-2021-23222).
    let answer = tcp.read_u8().await.map_err(ReplicationError::io(
        "reading the answer to the ssl request",
    ))?;
    match answer {
        b'S' => {}
        b'N' if params.sslmode.requires_tls() => {
            return Err(ReplicationError::TlsUnavailable {
                target: params.target(),
                sslmode: params.sslmode.to_string(),
            });
        }
        b'N' => {
            tracing::debug!(server = %params.target(), "server does not offer tls, continuing in plain");
            return Ok(Transport::Tcp(tcp));
        }
        b'E' => {
            return Err(ReplicationError::Protocol(
                "the server answered the ssl request with an error (a server older than 7.0?)"
                    .to_owned(),
            ));
        }
        other => {
            return Err(ReplicationError::Protocol(format!(
                "unexpected answer {other:#04x} to the ssl request: is this a postgresql server?"
            )));
        }
    }
    let name = server_name(&params.host)?;
    let connector = TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(stream) => {
            tracing::debug!(server = %params.target(), sslmode = %params.sslmode, "tls established");
            Ok(Transport::Tls(Box::new(stream)))
        }
        Err(error) => Err(handshake_error(error, params)),
    }
}

/// Maps a failed handshake: certificate problems are verification errors (definite), other
/// TLS errors are [`ReplicationError::Tls`], plain I/O errors stay I/O errors (transient).
fn handshake_error(error: io::Error, params: &ConnectParams) -> ReplicationError {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match tls {
        Some(rustls::Error::InvalidCertificate(reason)) => ReplicationError::TlsVerification {
            target: params.target(),
            sslmode: params.sslmode.to_string(),
            reason: certificate_reason(&reason),
        },
        Some(other) => ReplicationError::Tls(format!(
            "handshake with {} failed: {other}",
            params.target()
        )),
        None => ReplicationError::Io {
            context: "tls handshake",
            source: error,
        },
    }
}

fn certificate_reason(error: &CertificateError) -> String {
    match error {
        CertificateError::UnknownIssuer => {
            "the certificate is not signed by a trusted certificate authority".to_owned()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("the certificate is not valid for this host name ({error:?})")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the certificate has expired".to_owned()
        }
        other => format!("{other:?}"),
    }
}

fn server_name(host: &Host) -> Result<ServerName<'static>, ReplicationError> {
    match host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(name) => ServerName::try_from(name.clone()).map_err(|_| {
            ReplicationError::Tls(format!("\"{name}\" is not a valid tls server name"))
        }),
        Host::Unix(_) => Err(ReplicationError::Tls(
            "tls is not used over unix sockets".to_owned(),
        )),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client configuration for the mode and root certificates of `params`.
fn client_config(params: &ConnectParams) -> Result<rustls::ClientConfig, ReplicationError> {
    let provider = provider();
    let roots = match root_certificate_file(params) {
        Some(path) => Some(load_roots(&path)?),
        None if matches!(params.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) => {
            Some(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        }
        None => None,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplicationError::Tls(format!("configuring tls: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(NoVerification(provider)),
        Some(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ReplicationError::Tls(format!("configuring tls: {e}")))?;
            if params.sslmode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // Servers since PostgreSQL 17 check ALPN when the client sends it; older ones ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// `sslrootcert`, else `~/.postgresql/root.crt` when it exists.
fn root_certificate_file(params: &ConnectParams) -> Option<PathBuf> {
    if let Some(path) = &params.sslrootcert {
        return Some(path.clone());
    }
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

fn load_roots(path: &Path) -> Result<RootCertStore, ReplicationError> {
    let bytes = std::fs::read(path).map_err(|e| {
        ReplicationError::Tls(format!(
            "cannot read sslrootcert \"{}\": {e}",
            path.display()
        ))
    })?;
    let mut store = RootCertStore::empty();
    let mut reader = io::Cursor::new(bytes);
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| {
            ReplicationError::Tls(format!(
                "sslrootcert \"{}\" is not valid PEM: {e}",
                path.display()
            ))
        })?;
        store.add(cert).map_err(|e| {
            ReplicationError::Tls(format!(
                "sslrootcert \"{}\" holds an unusable certificate: {e}",
                path.display()
            ))
        })?;
    }
    if store.is_empty() {
        return Err(ReplicationError::Tls(format!(
            "sslrootcert \"{}\" holds no PEM certificate",
            path.display()
        )));
    }
    Ok(store)
}

/// Splits one DER element: (tag, contents, the rest after it).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// The OID (DER contents) of a certificate's signatureAlgorithm:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, ... }`.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, certificate, _) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, _, after_tbs) = der_element(certificate)? else {
        return None;
    };
    let (SEQUENCE, algorithm, _) = der_element(after_tbs)? else {
        return None;
    };
    let (OID, oid, _) = der_element(algorithm)? else {
        return None;
    };
    Some(oid)
}

/// The hash for `tls-server-end-point` given the signature algorithm's OID, from the ring
/// provider's TLS 1.3 suites.
fn end_point_hash(oid: &[u8]) -> Option<&'static dyn rustls::crypto::hash::Hash> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03]; // 1.2.840.10045.4.3
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
    let sha256 = TLS13_AES_128_GCM_SHA256.tls13()?.common.hash_provider;
    let sha384 = TLS13_AES_256_GCM_SHA384.tls13()?.common.hash_provider;
    if oid == ECDSA_SHA1 {
        return Some(sha256);
    }
    if let Some(last) = oid.strip_prefix(RSA) {
        return match last {
            [0x04 | 0x05 | 0x0b] => Some(sha256), // md5, sha1, sha256 WithRSAEncryption
            [0x0c] => Some(sha384),
            _ => None, // sha512, RSASSA-PSS
        };
    }
    if let Some(last) = oid.strip_prefix(ECDSA_SHA2) {
        return match last {
            [0x02] => Some(sha256),
            [0x03] => Some(sha384),
            _ => None,
        };
    }
    None
}

/// sslmode=verify-ca: the chain is verified by webpki; only a host name mismatch is ignored
/// (webpki checks the name after the chain, so the chain has been verified when it reports
/// that).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// sslmode=prefer/require without a root certificate: any certificate is accepted (as libpq),
/// but the handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            Transport::Unix(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_root_certificate_file_is_a_clear_error() {
        let params = ConnectParams::parse_with_env(
            "postgres://u@localhost/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            |_| None,
        )
        .unwrap();
        let e = client_config(&params).unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn finds_the_signature_algorithm_for_channel_binding() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        // rcgen's default key is ECDSA P-256 with SHA-256.
        let oid = signature_algorithm(cert.der()).unwrap();
        assert_eq!(oid, [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
        let hash = end_point_hash(oid).unwrap();
        assert_eq!(
            hash.algorithm(),
            rustls::crypto::hash::HashAlgorithm::SHA256
        );
        let rsa_sha384 = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
        assert_eq!(
            end_point_hash(&rsa_sha384).unwrap().algorithm(),
            rustls::crypto::hash::HashAlgorithm::SHA384
        );
        let rsa_pss = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
        assert!(end_point_hash(&rsa_pss).is_none());
        assert!(signature_algorithm(&cert.der()[..20]).is_none());
        assert!(signature_algorithm(b"").is_none());
    }

    #[test]
    fn certificates_are_verified_when_there_are_roots_to_verify_them_with() {
        let verifies = |url: &str| {
            verifies_certificate(&ConnectParams::parse_with_env(url, |_| None).unwrap())
        };
        for mode in ["verify-ca", "verify-full"] {
            assert!(verifies(&format!("postgres://u@db/d?sslmode={mode}")));
        }
        for mode in ["prefer", "require", "verify-ca", "verify-full"] {
            assert!(verifies(&format!(
                "postgres://u@db/d?sslmode={mode}&sslrootcert=/etc/ca.pem"
            )));
            // Unix sockets never use TLS.
            assert!(!verifies(&format!(
                "postgres://u@/d?host=/run/postgresql&sslmode={mode}&sslrootcert=/etc/ca.pem"
            )));
        }
        assert!(!verifies(
            "postgres://u@db/d?sslmode=disable&sslrootcert=/etc/ca.pem"
        ));
        let plain =
            ConnectParams::parse_with_env("postgres://u@db/d?sslmode=require", |_| None).unwrap();
        assert_eq!(
            verifies_certificate(&plain),
            root_certificate_file(&plain).is_some()
        );
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name(&Host::Ip("127.0.0.1".parse().unwrap())).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name(&Host::Name("localhost".into())).unwrap(),
            ServerName::DnsName(_)
        ));
    }
}
