//! Connection parameters from a `postgres://` URL, read the way libpq reads it.
//!
//! ```text
//! postgres[ql]://[user[:password]@][host][:port][/dbname][?param=value&...]
//! ```
//!
//! - `host` is a name, an IPv4 literal, an IPv6 literal in brackets (`[::1]`), or a Unix socket
//!   directory: a host starting with `/`, percent-encoded in the host part
//!   (`postgres://u@%2Fvar%2Frun%2Fpostgresql/db`) or given as `?host=/var/run/postgresql`.
//!   Without a host, `localhost` over TCP.
//! - `port` defaults to 5432 (for a socket it picks the socket file `.s.PGSQL.<port>`).
//! - Several servers, as libpq: `postgres://u@a:5432,b:5433/db`, or `?host=a,b&port=5432,5433`
//!   (one port for every host, or one per host). A connection tries them in order and takes
//!   the first that answers and is what `target_session_attrs` asks for: `any` (the default),
//!   `read-write`, `read-only`, `primary`, `standby` or `prefer-standby` (a standby, else any).
//! - `dbname` defaults to the user name.
//! - user, password, host and dbname are percent-decoded.
//! - Query parameters: `sslmode` (disable, allow, prefer (default), require, verify-ca,
//!   verify-full; `allow` is treated as `prefer`), `sslrootcert` (a PEM file),
//!   `application_name`, `connect_timeout` (whole seconds, default 10, 0 waits forever, for
//!   each server tried), `target_session_attrs`, and,
//!   as libpq allows, `host`, `port`, `user`, `password` and `dbname`, which override the
//!   parts of the URL. Anything else is an error.
//! - Without a user in the URL, `$PGUSER`, then `$USER`. Without a password in the URL,
//!   `$PGPASSWORD` (as libpq). The `.pgpass` file is not read.
//!
//! The password never appears in [`ConnectParams`]'s `Debug`, in [`ConnectParams::redacted_url`]
//! or in any error.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use super::error::ReplicationError;

/// The default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;
/// The default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const QUERY_PARAMETERS: &str = "host, port, user, password, dbname, sslmode, sslrootcert, \
                                application_name, connect_timeout, target_session_attrs";

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name, resolved when connecting.
    Name(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A directory holding the server's Unix socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// Whether and how to use TLS, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it (libpq's default; `allow` is read as this).
    #[default]
    Prefer,
    /// Use TLS or fail; the certificate is not verified unless a root certificate is present.
    Require,
    /// Use TLS and verify the certificate chain, not the host name.
    VerifyCa,
    /// Use TLS and verify the certificate chain and the host name.
    VerifyFull,
}

impl SslMode {
    /// The name as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection fails without TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ReplicationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ReplicationError::InvalidUrl {
                    reason: format!(
                        "invalid sslmode \"{other}\": accepted values are disable, allow, prefer, \
                         require, verify-ca, verify-full"
                    ),
                });
            }
        })
    }
}

/// Which of the servers a URL names a connection accepts, as libpq's `target_session_attrs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TargetSessionAttrs {
    /// The first server that answers.
    #[default]
    Any,
    /// One whose sessions may write (`transaction_read_only` off): a primary.
    ReadWrite,
    /// One whose sessions are read-only (a standby, or a primary that defaults to read-only).
    ReadOnly,
    /// One that is not in recovery.
    Primary,
    /// One that is in recovery: a standby.
    Standby,
    /// A standby when one answers, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// The name as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in this state is accepted, in the pass that accepts only the
    /// preferred kind (`prefer-standby` accepts any server in a second pass).
    pub fn accepts(self, state: ServerState) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::ReadWrite => !state.read_only,
            TargetSessionAttrs::ReadOnly => state.read_only,
            TargetSessionAttrs::Primary => !state.in_recovery,
            TargetSessionAttrs::Standby | TargetSessionAttrs::PreferStandby => state.in_recovery,
        }
    }

    /// Whether a server's state must be asked for before a connection is accepted.
    pub fn needs_state(self) -> bool {
        self != TargetSessionAttrs::Any
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = ReplicationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            other => {
                return Err(invalid(format!(
                    "invalid target_session_attrs \"{other}\": accepted values are any, \
                     read-write, read-only, primary, standby, prefer-standby"
                )));
            }
        })
    }
}

/// What a server said about itself, for [`TargetSessionAttrs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// `pg_is_in_recovery()`: a standby (or a server still recovering).
    pub in_recovery: bool,
    /// `transaction_read_only` of a new session.
    pub read_only: bool,
}

/// Everything needed to open a connection, parsed from a database URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// The role to connect as.
    pub user: String,
    password: Option<String>,
    /// Where the server is.
    pub host: Host,
    /// The TCP port, or the number in the socket file's name.
    pub port: u16,
    /// The servers to try after `host:port`, in order, when the URL names several.
    pub other_hosts: Vec<(Host, u16)>,
    /// Which of the servers a connection accepts.
    pub target_session_attrs: TargetSessionAttrs,
    /// The database.
    pub dbname: String,
    /// Whether and how to use TLS.
    pub sslmode: SslMode,
    /// A PEM file with the certificate authorities to trust.
    pub sslrootcert: Option<PathBuf>,
    /// Sent as `application_name`, shown in `pg_stat_activity`.
    pub application_name: Option<String>,
    /// The limit on connecting, TLS and authentication together; `None` waits forever.
    pub connect_timeout: Option<Duration>,
}

impl ConnectParams {
    /// Parses a `postgres://` or `postgresql://` URL, taking the user from `$PGUSER`/`$USER`
    /// and the password from `$PGPASSWORD` when the URL has none.
    pub fn parse(url: &str) -> Result<ConnectParams, ReplicationError> {
        Self::parse_with_env(url, |name| std::env::var(name).ok())
    }

    /// Parses a URL, looking environment variables up with `env`.
    pub fn parse_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnectParams, ReplicationError> {
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .ok_or_else(|| invalid("the url must start with postgres:// or postgresql://"))?;
        if rest.contains('#') {
            return Err(invalid("the url must not have a #fragment"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };

        let mut user = None;
        let mut password = None;
        if let Some(userinfo) = userinfo {
            let (u, p) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !u.is_empty() {
                user = Some(decode(u, "user")?);
            }
            if let Some(p) = p {
                password = Some(decode(p, "password")?);
            }
        }

        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        if !hostport.is_empty() {
            for entry in hostport.split(',') {
                let (host_part, port_part) = split_host_port(entry)?;
                hosts.push(host_part.map(parse_host).transpose()?);
                ports.push(port_part.map(parse_port).transpose()?);
            }
        }
        let mut dbname = match path {
            Some(p) if !p.is_empty() => Some(decode(p, "dbname")?),
            _ => None,
        };

        let mut sslmode = SslMode::default();
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut connect_timeout = Some(DEFAULT_CONNECT_TIMEOUT);
        let mut target_session_attrs = TargetSessionAttrs::default();
        for pair in query.unwrap_or_default().split('&') {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').ok_or_else(|| {
                invalid(format!(
                    "query parameter \"{}\" has no value (write name=value)",
                    decode_lossy(pair)
                ))
            })?;
            let name = decode(name, "a query parameter name")?;
            match name.as_str() {
                "host" => {
                    hosts = decode(value, "host")?
                        .split(',')
                        .map(|h| parse_host_value(h).map(Some))
                        .collect::<Result<_, _>>()?;
                }
                "port" => {
                    ports = decode(value, "port")?
                        .split(',')
                        .map(|p| parse_port(p).map(Some))
                        .collect::<Result<_, _>>()?;
                }
                "target_session_attrs" => {
                    target_session_attrs = decode(value, "target_session_attrs")?.parse()?;
                }
                "user" => user = Some(decode(value, "user")?),
                "password" => password = Some(decode(value, "password")?),
                "dbname" => dbname = Some(decode(value, "dbname")?),
                "sslmode" => sslmode = decode(value, "sslmode")?.parse()?,
                "sslrootcert" => sslrootcert = Some(PathBuf::from(decode(value, "sslrootcert")?)),
                "application_name" => {
                    application_name = Some(decode(value, "application_name")?);
                }
                "connect_timeout" => {
                    let value = decode(value, "connect_timeout")?;
                    let secs: u64 = value.trim().parse().map_err(|_| {
                        invalid(format!(
                            "invalid connect_timeout \"{value}\": accepted values are whole \
                             seconds (0 waits forever)"
                        ))
                    })?;
                    connect_timeout = (secs > 0).then(|| Duration::from_secs(secs));
                }
                other => {
                    return Err(invalid(format!(
                        "unknown query parameter \"{other}\": accepted parameters are \
                         {QUERY_PARAMETERS}"
                    )));
                }
            }
        }

        let user = match user {
            Some(user) => user,
            None => env("PGUSER")
                .or_else(|| env("USER"))
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    invalid("the url names no user and neither $PGUSER nor $USER is set: write postgres://USER@host/dbname")
                })?,
        };
        let password = password.or_else(|| env("PGPASSWORD").filter(|p| !p.is_empty()));
        let dbname = dbname.unwrap_or_else(|| user.clone());
        if hosts.is_empty() {
            hosts.push(None);
        }
        let ports = match ports.len() {
            0 => vec![None; hosts.len()],
            1 => vec![ports[0]; hosts.len()],
            n if n == hosts.len() => ports,
            n => {
                return Err(invalid(format!(
                    "{n} ports for {} hosts: give one port for every host, or one per host",
                    hosts.len()
                )));
            }
        };
        let mut servers = hosts.into_iter().zip(ports).map(|(host, port)| {
            (
                host.unwrap_or_else(|| Host::Name("localhost".to_owned())),
                port.unwrap_or(DEFAULT_PORT),
            )
        });
        let (host, port) = servers
            .next()
            .unwrap_or((Host::Name("localhost".to_owned()), DEFAULT_PORT));
        Ok(ConnectParams {
            user,
            password,
            host,
            port,
            other_hosts: servers.collect(),
            target_session_attrs,
            dbname,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
        })
    }

    /// The password, from the URL or `$PGPASSWORD`.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Replaces the password.
    pub fn set_password(&mut self, password: Option<String>) {
        self.password = password;
    }

    /// `host:port` for TCP, the socket file's path for a Unix socket: for messages. With
    /// several servers, the first ([`targets`](Self::targets) names them all).
    pub fn target(&self) -> String {
        target(&self.host, self.port)
    }

    /// Every server the URL names, comma-separated: for messages.
    pub fn targets(&self) -> String {
        std::iter::once((&self.host, self.port))
            .chain(self.other_hosts.iter().map(|(h, p)| (h, *p)))
            .map(|(h, p)| target(h, p))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether a connection must choose among servers: several hosts, or a
    /// `target_session_attrs` other than `any`.
    pub fn chooses_server(&self) -> bool {
        !self.other_hosts.is_empty() || self.target_session_attrs.needs_state()
    }

    /// One set of parameters per server, in the order they are tried, each naming that
    /// server alone (with `target_session_attrs` kept).
    pub fn servers(&self) -> Vec<ConnectParams> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.other_hosts.iter().cloned())
            .map(|(host, port)| ConnectParams {
                host,
                port,
                other_hosts: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// The URL with the password replaced by `***`, safe for logs; parsing it gives the same
    /// parameters except the password.
    pub fn redacted_url(&self) -> String {
        let mut url = format!("postgres://{}", encode(&self.user));
        if self.password.is_some() {
            url.push_str(":***");
        }
        url.push('@');
        let mut query = Vec::new();
        let servers: Vec<(&Host, u16)> = std::iter::once((&self.host, self.port))
            .chain(self.other_hosts.iter().map(|(h, p)| (h, *p)))
            .collect();
        if servers.iter().any(|(h, _)| matches!(h, Host::Unix(_))) {
            // A socket directory goes in the query, and with it every host and port.
            let hosts: Vec<String> = servers.iter().map(|(h, _)| h.to_string()).collect();
            let ports: Vec<String> = servers.iter().map(|(_, p)| p.to_string()).collect();
            query.push(format!("host={}", encode(&hosts.join(","))));
            if servers.iter().any(|(_, p)| *p != DEFAULT_PORT) {
                query.push(format!("port={}", ports.join(",")));
            }
        } else {
            let hosts: Vec<String> = servers
                .iter()
                .map(|(h, p)| match *p {
                    DEFAULT_PORT => h.to_string(),
                    p => format!("{h}:{p}"),
                })
                .collect();
            url.push_str(&hosts.join(","));
        }
        url.push('/');
        url.push_str(&encode(&self.dbname));
        if self.sslmode != SslMode::default() {
            query.push(format!("sslmode={}", self.sslmode));
        }
        if let Some(path) = &self.sslrootcert {
            query.push(format!(
                "sslrootcert={}",
                encode(&path.display().to_string())
            ));
        }
        if let Some(name) = &self.application_name {
            query.push(format!("application_name={}", encode(name)));
        }
        if self.connect_timeout != Some(DEFAULT_CONNECT_TIMEOUT) {
            let secs = self.connect_timeout.map_or(0, |t| t.as_secs());
            query.push(format!("connect_timeout={secs}"));
        }
        if self.target_session_attrs != TargetSessionAttrs::default() {
            query.push(format!(
                "target_session_attrs={}",
                self.target_session_attrs
            ));
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query.join("&"));
        }
        url
    }
}

impl FromStr for ConnectParams {
    type Err = ReplicationError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        ConnectParams::parse(url)
    }
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("other_hosts", &self.other_hosts)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl fmt::Display for ConnectParams {
    /// The redacted URL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

fn target(host: &Host, port: u16) -> String {
    match host {
        Host::Unix(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
        host => format!("{host}:{port}"),
    }
}

fn invalid(reason: impl Into<String>) -> ReplicationError {
    ReplicationError::InvalidUrl {
        reason: reason.into(),
    }
}

fn decode(s: &str, what: &str) -> Result<String, ReplicationError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            invalid(format!(
                "the {what} is not valid UTF-8 once percent-decoded"
            ))
        })
}

fn decode_lossy(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Characters escaped in the redacted URL.
const ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'/')
    .add(b':')
    .add(b'@')
    .add(b'?')
    .add(b'#')
    .add(b'&')
    .add(b'=')
    .add(b'%')
    .add(b'[')
    .add(b']');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, ESCAPE).to_string()
}

/// Splits `host[:port]` or `[v6][:port]` (both parts optional): one entry of the host list.
fn split_host_port(hostport: &str) -> Result<(Option<&str>, Option<&str>), ReplicationError> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 address opened with [ is not closed with ]"))?;
        let port =
            match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    invalid("unexpected characters after the ] of the IPv6 address")
                })?),
            };
        return Ok((Some(hostport.get(..v6.len() + 2).unwrap_or(hostport)), port));
    }
    let (host, port) = match hostport.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    };
    Ok(((!host.is_empty()).then_some(host), port))
}

/// The host part of the URL: `[v6]`, an IPv4 address, a name or a percent-encoded socket
/// directory.
fn parse_host(raw: &str) -> Result<Host, ReplicationError> {
    if let Some(v6) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| invalid(format!("invalid IPv6 address \"{v6}\" in the host")));
    }
    parse_host_value(&decode(raw, "host")?)
}

/// A decoded host value: a socket directory, an IP literal or a name.
fn parse_host_value(host: &str) -> Result<Host, ReplicationError> {
    if host.starts_with('/') {
        return Ok(Host::Unix(PathBuf::from(host)));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | ':' | '[' | ']' | ','))
    {
        return Err(invalid(format!(
            "invalid host \"{host}\": give a host name, an IP address, or a socket directory \
             starting with /"
        )));
    }
    Ok(Host::Name(host.to_owned()))
}

fn parse_port(raw: &str) -> Result<u16, ReplicationError> {
    match raw.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(invalid(format!(
            "invalid port \"{raw}\": accepted values are 1 to 65535"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(url: &str) -> ConnectParams {
        ConnectParams::parse_with_env(url, no_env).unwrap()
    }

    fn error(url: &str) -> String {
        ConnectParams::parse_with_env(url, no_env)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults() {
        let p = parse("postgres://alice@db.example.com");
        assert_eq!(p.user, "alice");
        assert_eq!(p.password(), None);
        assert_eq!(p.host, Host::Name("db.example.com".to_owned()));
        assert_eq!(p.port, 5432);
        assert_eq!(p.dbname, "alice");
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.sslrootcert, None);
        assert_eq!(p.application_name, None);
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(10)));
        let p = parse("postgresql://alice@/");
        assert_eq!(p.host, Host::Name("localhost".to_owned()));
        assert_eq!(p.dbname, "alice");
    }

    #[test]
    fn every_part_and_parameter() {
        let p = parse(
            "postgresql://bob:s3cret@10.1.2.3:6543/app?sslmode=verify-full&sslrootcert=/etc/ca.pem\
             &application_name=streamex%20test&connect_timeout=3",
        );
        assert_eq!(p.user, "bob");
        assert_eq!(p.password(), Some("s3cret"));
        assert_eq!(p.host, Host::Ip("10.1.2.3".parse().unwrap()));
        assert_eq!(p.port, 6543);
        assert_eq!(p.dbname, "app");
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.application_name.as_deref(), Some("streamex test"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(3)));
        assert_eq!(p.target(), "10.1.2.3:6543");
    }

    #[test]
    fn sslmode_round_trips() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.as_str().parse::<SslMode>().unwrap(), mode);
        }
        assert_eq!("allow".parse::<SslMode>().unwrap(), SslMode::Prefer);
        assert!(!SslMode::Prefer.requires_tls());
        assert!(SslMode::Require.requires_tls());
    }

    #[test]
    fn sslmodes() {
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Prefer),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(
                parse(&format!("postgres://u@h/d?sslmode={text}")).sslmode,
                mode
            );
        }
        let e = error("postgres://u@h/d?sslmode=always");
        assert!(e.contains("sslmode") && e.contains("verify-full"), "{e}");
    }

    #[test]
    fn connect_timeout_values() {
        assert_eq!(
            parse("postgres://u@h/d?connect_timeout=0").connect_timeout,
            None
        );
        let e = error("postgres://u@h/d?connect_timeout=5s");
        assert!(
            e.contains("connect_timeout") && e.contains("seconds"),
            "{e}"
        );
        let e = error("postgres://u@h/d?connect_timeout=-1");
        assert!(e.contains("connect_timeout"), "{e}");
    }

    #[test]
    fn percent_encoding() {
        let p = parse("postgres://us%40er:p%40ss%3Aw%2Fd@h/my%20db");
        assert_eq!(p.user, "us@er");
        assert_eq!(p.password(), Some("p@ss:w/d"));
        assert_eq!(p.dbname, "my db");
        // An @ in the password without encoding: the last @ ends the user info, as libpq.
        let p = parse("postgres://u:a@b@h/d");
        assert_eq!(p.password(), Some("a@b"));
        assert_eq!(p.host, Host::Name("h".to_owned()));
        assert!(error("postgres://u:%FF@h/d").contains("password"));
    }

    #[test]
    fn ipv6_literals() {
        let p = parse("postgres://u@[::1]:5433/d");
        assert_eq!(p.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(p.port, 5433);
        assert_eq!(p.target(), "[::1]:5433");
        let p = parse("postgres://u@[fe80::1:2]/d");
        assert_eq!(p.host, Host::Ip("fe80::1:2".parse().unwrap()));
        assert_eq!(p.port, 5432);
        assert!(error("postgres://u@[::1/d").contains("IPv6"));
        assert!(error("postgres://u@[nope]/d").contains("IPv6"));
    }

    #[test]
    fn socket_directories() {
        let p = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql:5433/d");
        assert_eq!(p.host, Host::Unix(PathBuf::from("/var/run/postgresql")));
        assert_eq!(p.target(), "/var/run/postgresql/.s.PGSQL.5433");
        let p = parse("postgres://u@/d?host=/tmp/pg%20sock");
        assert_eq!(p.host, Host::Unix(PathBuf::from("/tmp/pg sock")));
        // The query parameter wins over the host part, as in libpq.
        let p = parse("postgres://u@example.com/d?host=%2Ftmp&port=6000");
        assert_eq!(p.host, Host::Unix(PathBuf::from("/tmp")));
        assert_eq!(p.port, 6000);
    }

    #[test]
    fn query_overrides() {
        let p = parse("postgres://u@h/d?user=v&password=pw&dbname=e");
        assert_eq!(p.user, "v");
        assert_eq!(p.password(), Some("pw"));
        assert_eq!(p.dbname, "e");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = error("postgres://u@h/d?sslcert=x");
        assert!(
            e.contains("unknown query parameter \"sslcert\"") && e.contains("sslrootcert"),
            "{e}"
        );
        assert!(error("mysql://u@h/d").contains("postgres://"));
        assert!(error("postgres://u@h:0/d").contains("port"));
        assert!(error("postgres://u@h:99999/d").contains("port"));
        assert!(error("postgres://u@h:x/d").contains("port"));
        assert!(error("postgres://u@h1,h2/d?port=1,2,3").contains("3 ports for 2 hosts"));
        let e = error("postgres://u@h/d?target_session_attrs=master");
        assert!(
            e.contains("target_session_attrs") && e.contains("read-write"),
            "{e}"
        );
        assert!(error("postgres://u@h/d?sslmode").contains("no value"));
        assert!(error("postgres://h/d").contains("no user"));
    }

    #[test]
    fn several_hosts() {
        let p =
            parse("postgres://u@a:5433,[::1],%2Ftmp%2Fs:6000/d?target_session_attrs=read-write");
        assert_eq!(p.host, Host::Name("a".to_owned()));
        assert_eq!(p.port, 5433);
        assert_eq!(
            p.other_hosts,
            vec![
                (Host::Ip("::1".parse().unwrap()), 5432),
                (Host::Unix(PathBuf::from("/tmp/s")), 6000),
            ]
        );
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(p.chooses_server());
        assert_eq!(p.targets(), "a:5433, [::1]:5432, /tmp/s/.s.PGSQL.6000");
        let servers = p.servers();
        assert_eq!(servers.len(), 3);
        assert_eq!(
            (&servers[1].host, servers[1].port),
            (&p.other_hosts[0].0, 5432)
        );
        assert!(servers.iter().all(|s| s.other_hosts.is_empty()));
        assert!(servers.iter().all(|s| s.dbname == "d" && s.user == "u"));
        // One port for every host, or one per host, as libpq.
        let p = parse("postgres://u@/d?host=a,b&port=7000");
        assert_eq!((p.port, p.other_hosts[0].1), (7000, 7000));
        let p = parse("postgres://u@/d?host=a,b&port=7000,7001");
        assert_eq!((p.port, p.other_hosts[0].1), (7000, 7001));
        // One host, any server: nothing to choose.
        assert!(!parse("postgres://u@a/d").chooses_server());
        assert!(parse("postgres://u@a/d?target_session_attrs=primary").chooses_server());
    }

    #[test]
    fn several_hosts_round_trip_through_the_redacted_url() {
        for url in [
            "postgres://u@a:5433,b/d?target_session_attrs=read-write",
            "postgres://u@a,b:6000,[::1]:7000/d?target_session_attrs=prefer-standby",
            "postgres://u@/d?host=%2Ftmp,b&port=5432,6000",
        ] {
            let p = parse(url);
            assert_eq!(parse(&p.redacted_url()), p, "{url} -> {}", p.redacted_url());
        }
    }

    #[test]
    fn target_session_attrs_accept_the_right_servers() {
        let primary = ServerState {
            in_recovery: false,
            read_only: false,
        };
        let standby = ServerState {
            in_recovery: true,
            read_only: true,
        };
        let read_only_primary = ServerState {
            in_recovery: false,
            read_only: true,
        };
        use TargetSessionAttrs::*;
        for (attrs, accepted) in [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, false, true]),
            (Standby, [false, true, false]),
            (PreferStandby, [false, true, false]),
        ] {
            assert_eq!(attrs.as_str().parse::<TargetSessionAttrs>().unwrap(), attrs);
            let got = [primary, standby, read_only_primary].map(|s| attrs.accepts(s));
            assert_eq!(got, accepted, "{attrs}");
        }
    }

    #[test]
    fn environment_fallbacks() {
        let env = |name: &str| match name {
            "PGUSER" => Some("envuser".to_owned()),
            "USER" => Some("osuser".to_owned()),
            "PGPASSWORD" => Some("envpw".to_owned()),
            _ => None,
        };
        let p = ConnectParams::parse_with_env("postgres://h/d", env).unwrap();
        assert_eq!(p.user, "envuser");
        assert_eq!(p.password(), Some("envpw"));
        let p = ConnectParams::parse_with_env("postgres://u:urlpw@h", env).unwrap();
        assert_eq!(p.password(), Some("urlpw"));
        assert_eq!(p.dbname, "u");
        let only_user = |name: &str| (name == "USER").then(|| "osuser".to_owned());
        let p = ConnectParams::parse_with_env("postgres://h/d", only_user).unwrap();
        assert_eq!(p.user, "osuser");
        assert_eq!(p.password(), None);
    }

    #[test]
    fn redaction_in_display_debug_and_url() {
        let p = parse("postgres://bob:hunter2@db:6000/app?sslmode=require&application_name=x");
        let redacted = p.redacted_url();
        assert_eq!(
            redacted,
            "postgres://bob:***@db:6000/app?sslmode=require&application_name=x"
        );
        let debug = format!("{p:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
        let display = p.to_string();
        assert!(!display.contains("hunter2"), "{display}");
        // The redacted URL parses back to the same parameters, without the password.
        let mut back = parse(&redacted);
        assert_eq!(back.password(), Some("***"));
        back.set_password(Some("hunter2".to_owned()));
        assert_eq!(back, p);
        // A password from the query string is redacted too.
        let p = parse("postgres://bob@%2Ftmp/app?password=hunter2&connect_timeout=0");
        let redacted = p.redacted_url();
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert_eq!(
            redacted,
            "postgres://bob:***@/app?host=%2Ftmp&connect_timeout=0"
        );
        assert_eq!(
            parse("postgres://u@[::1]/d").redacted_url(),
            "postgres://u@[::1]/d"
        );
    }

    #[test]
    fn errors_never_contain_the_password() {
        let e = error("postgres://bob:hunter2@h/d?bogus=1");
        assert!(!e.contains("hunter2"), "{e}");
        let e = error("postgres://bob:hunter2@h:badport/d");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
