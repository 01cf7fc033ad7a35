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
//! - `dbname` defaults to the user name.
//! - user, password, host and dbname are percent-decoded.
//! - Query parameters: `sslmode` (disable, allow, prefer (default), require, verify-ca,
//!   verify-full; `allow` is treated as `prefer`), `sslrootcert` (a PEM file),
//!   `application_name`, `connect_timeout` (whole seconds, default 10, 0 waits forever), and,
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
                                application_name, connect_timeout";

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

        let (host_part, port_part) = split_host_port(hostport)?;
        let mut host = match host_part {
            Some(h) => Some(parse_host(h)?),
            None => None,
        };
        let mut port = match port_part {
            Some(p) => parse_port(p)?,
            None => DEFAULT_PORT,
        };
        let mut dbname = match path {
            Some(p) if !p.is_empty() => Some(decode(p, "dbname")?),
            _ => None,
        };

        let mut sslmode = SslMode::default();
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut connect_timeout = Some(DEFAULT_CONNECT_TIMEOUT);
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
                "host" => host = Some(parse_host_value(&decode(value, "host")?)?),
                "port" => port = parse_port(&decode(value, "port")?)?,
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
        Ok(ConnectParams {
            user,
            password,
            host: host.unwrap_or_else(|| Host::Name("localhost".to_owned())),
            port,
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

    /// `host:port` for TCP, the socket file's path for a Unix socket: for messages.
    pub fn target(&self) -> String {
        match &self.host {
            Host::Unix(dir) => dir
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string(),
            host => format!("{host}:{}", self.port),
        }
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
        match &self.host {
            Host::Unix(dir) => {
                query.push(format!("host={}", encode(&dir.display().to_string())));
            }
            host => url.push_str(&host.to_string()),
        }
        if self.port != DEFAULT_PORT {
            url.push_str(&format!(":{}", self.port));
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

/// Splits `host[:port]` or `[v6][:port]` (both parts optional).
fn split_host_port(hostport: &str) -> Result<(Option<&str>, Option<&str>), ReplicationError> {
    if hostport.contains(',') {
        return Err(invalid(
            "several hosts are not supported: give one host in the url",
        ));
    }
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
        assert!(error("postgres://u@h1,h2/d").contains("several hosts"));
        assert!(error("postgres://u@h/d?sslmode").contains("no value"));
        assert!(error("postgres://h/d").contains("no user"));
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
