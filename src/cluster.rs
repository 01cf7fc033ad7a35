// Used by `streamex demo`; the rest is for tests, through `streamex::testing`.
#![cfg_attr(not(feature = "testing"), allow(dead_code))]
//! A private PostgreSQL cluster, started from the machine's own PostgreSQL binaries.
//!
//! ```text
//! Cluster::start()
//!   ├─ initdb into a new temporary directory (as the `postgres` user when run as root)
//!   ├─ postgresql.conf: wal_level=logical, a free port on 127.0.0.1, the socket in that directory
//!   ├─ pg_ctl start
//!   └─ a guard process that waits on a pipe from us: when the pipe closes (Drop, normal exit,
//!      a panic or even SIGKILL of this process) it stops the server and removes the directory
//! ```
//!
//! The guard is what makes a cluster kept in a `static` (one per test binary) go away at the
//! end: statics are never dropped, but the pipe always closes when the process ends.

use std::ffi::CString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What went wrong while starting or driving the private cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No `initdb`/`pg_ctl` could be found.
    #[error(
        "no PostgreSQL server binaries found: looked in $STREAMEX_PG_BINDIR, $PATH, `pg_config --bindir` \
         and /usr/lib/postgresql/*/bin; install the PostgreSQL server package (Debian: postgresql) \
         or set STREAMEX_PG_BINDIR to the directory holding initdb and pg_ctl"
    )]
    NoBinaries,
    /// Running as root without a `postgres` user to run the server as.
    #[error(
        "running as root, but there is no `postgres` user to run the server as (PostgreSQL refuses to run as root): \
         create one with `useradd --system postgres`"
    )]
    NoPostgresUser,
    /// A PostgreSQL program (initdb, pg_ctl) failed.
    #[error("{step} failed: {detail}")]
    Command {
        /// What was run.
        step: String,
        /// Its output.
        detail: String,
    },
    /// A file or process operation failed.
    #[error("{step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A query on the cluster failed.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> ClusterError {
    move |source| ClusterError::Io { step, source }
}

/// How to stop the server, as `pg_ctl stop -m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a checkpoint, stop.
    Fast,
    /// Stop at once, as a crash would; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Settings for a cluster before it starts.
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
    hba: Option<String>,
    files: Vec<(String, Vec<u8>)>,
}

impl ClusterBuilder {
    /// Adds `name = 'value'` to postgresql.conf (after the defaults, so it wins).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Replaces pg_hba.conf. The default trusts every local and loopback connection.
    pub fn hba(mut self, contents: &str) -> Self {
        self.hba = Some(contents.to_owned());
        self
    }

    /// Writes a file into the data directory before the server starts (a key or certificate),
    /// readable only by the server's user.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// Creates and starts the cluster; returns once it accepts connections.
    pub fn start(self) -> Result<Cluster, ClusterError> {
        Cluster::start_with(self)
    }
}

/// A running private PostgreSQL cluster. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    guard: Child,
}

impl Cluster {
    /// A cluster with the defaults: `wal_level = logical`, trust authentication on 127.0.0.1.
    pub fn start() -> Result<Cluster, ClusterError> {
        Self::builder().start()
    }

    /// A cluster to configure before it starts (settings, pg_hba.conf, files).
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    fn start_with(builder: ClusterBuilder) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let owner = server_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("streamex-pg-")
            .tempdir()
            .map_err(io("creating the cluster directory"))?
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(io("giving the cluster directory to the postgres user"))?;
        }
        // From here on the guard owns the directory: start it first so that nothing is left
        // behind whatever fails next.
        let guard = spawn_guard(&bindir, &dir, owner)?;
        let mut cluster = Cluster {
            bindir,
            dir,
            port: 0,
            owner,
            guard,
        };
        cluster.init(builder)?;
        Ok(cluster)
    }

    fn init(&mut self, builder: ClusterBuilder) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run(
            "initdb",
            Command::new(self.bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
        )?;

        self.port = free_port()?;
        let mut conf = String::new();
        let defaults = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", self.dir.display().to_string()),
            ("wal_level", "logical".to_owned()),
            // Every test of the integration binary takes a database with a slot or two on
            // the one shared cluster, and nothing drops them before the cluster goes.
            ("max_replication_slots", "512".to_owned()),
            ("max_wal_senders", "64".to_owned()),
            ("max_connections", "200".to_owned()),
            ("wal_sender_timeout", "10s".to_owned()),
            ("fsync", "off".to_owned()),
            ("shared_buffers", "128MB".to_owned()),
            ("log_min_messages", "warning".to_owned()),
            ("log_line_prefix", "'%m [%p] %q%u@%d '".to_owned()),
        ];
        for (name, value) in defaults {
            let value = if value.starts_with('\'') {
                value
            } else {
                format!("'{value}'")
            };
            let _ = writeln!(conf, "{name} = {value}");
        }
        for (name, value) in &builder.settings {
            let _ = writeln!(conf, "{name} = '{}'", value.replace('\'', "''"));
        }
        append(&data.join("postgresql.conf"), conf.as_bytes())?;
        if let Some(hba) = &builder.hba {
            self.write_file("pg_hba.conf", hba.as_bytes())?;
        }
        for (name, contents) in &builder.files {
            self.write_file(name, contents)?;
        }
        self.pg_ctl_start()
    }

    /// Writes a file into the data directory, owned by the server's user, mode 0600.
    fn write_file(&self, name: &str, contents: &[u8]) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents).map_err(io("writing a file into the data directory"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting a file's mode in the data directory"))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io(
                "giving a file in the data directory to the postgres user",
            ))?;
        }
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The TCP port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the PostgreSQL binaries this cluster runs.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A URL for `database` as the superuser `postgres`, over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database with a unique name and returns its URL.
    pub async fn create_database(&self) -> Result<String, ClusterError> {
        create_database_at(&self.url("postgres")).await
    }

    /// Stops the server.
    pub fn stop(&self, mode: StopMode) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl stop",
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", mode.arg(), "-w", "stop"]),
        )
    }

    /// Starts the server again after [`Cluster::stop`]; returns once it accepts connections.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    /// Stops the server with `mode` and starts it again.
    pub fn restart(&self, mode: StopMode) -> Result<(), ClusterError> {
        self.stop(mode)?;
        self.pg_ctl_start()
    }

    /// A physical standby of this cluster, streaming from it through the physical slot
    /// `slot`, which the caller creates on this cluster
    /// (`pg_create_physical_replication_slot`). The standby is a copy of this cluster's data
    /// directory taken while the server is cleanly stopped (so this server stops for a
    /// moment), with `standby.signal`, `primary_conninfo` (with `dbname`, for slot
    /// synchronization), `primary_slot_name`, `hot_standby_feedback = on` and its own port
    /// and socket; `settings` are added after those (for example `sync_replication_slots`).
    /// Returns once the standby accepts connections.
    pub fn standby(&self, slot: &str, settings: &[(&str, &str)]) -> Result<Cluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("streamex-pg-")
            .tempdir()
            .map_err(io("creating the standby's directory"))?
            .keep();
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(io("giving the standby's directory to the postgres user"))?;
        }
        let guard = spawn_guard(&self.bindir, &dir, self.owner)?;
        let standby = Cluster {
            bindir: self.bindir.clone(),
            dir,
            port: free_port()?,
            owner: self.owner,
            guard,
        };
        self.stop(StopMode::Fast)?;
        let copied = self.run(
            "copying the data directory",
            Command::new("cp")
                .arg("-a")
                .arg(self.data_dir())
                .arg(standby.data_dir()),
        );
        self.pg_ctl_start()?;
        copied?;
        // What the copy must not keep: the primary's slots and its pid file.
        let data = standby.data_dir();
        for entry in std::fs::read_dir(data.join("pg_replslot"))
            .map_err(io("reading the standby's pg_replslot"))?
            .flatten()
        {
            std::fs::remove_dir_all(entry.path()).map_err(io("removing a copied slot"))?;
        }
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let mut conf = String::new();
        let base = [
            ("port", standby.port.to_string()),
            ("unix_socket_directories", standby.dir.display().to_string()),
            (
                "primary_conninfo",
                format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=standby",
                    self.port
                ),
            ),
            ("primary_slot_name", slot.to_owned()),
            ("hot_standby_feedback", "on".to_owned()),
        ];
        for (name, value) in base
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .chain(settings.iter().copied())
        {
            let _ = writeln!(conf, "{name} = '{}'", value.replace('\'', "''"));
        }
        append(&data.join("postgresql.conf"), conf.as_bytes())?;
        standby.write_file("standby.signal", b"")?;
        standby.pg_ctl_start()?;
        Ok(standby)
    }

    /// Promotes a standby ([`Cluster::standby`]) to a primary; returns once it is one.
    pub fn promote(&self) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl promote",
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-t", "60", "promote"]),
        )
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl start",
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_file())
                .args(["-w", "-t", "60", "start"]),
        )
    }

    /// Runs a PostgreSQL program as the server's user; its output goes into the error.
    fn run(&self, step: &str, command: &mut Command) -> Result<(), ClusterError> {
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        let output = command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::Command {
                step: step.to_owned(),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        Err(ClusterError::Command {
            step: step.to_owned(),
            detail: format!(
                "{}\n{}\n{}\nserver log (last lines):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Closing the guard's stdin tells it to stop the server and remove the directory.
        drop(self.guard.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.guard.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Creates a database with a unique name on the server at `admin_url` and returns its URL.
pub async fn create_database_at(admin_url: &str) -> Result<String, ClusterError> {
    use sqlx::Connection as _;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "streamex_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let mut url = url::Url::parse(admin_url).map_err(|e| ClusterError::Command {
        step: "parsing the server URL".to_owned(),
        detail: e.to_string(),
    })?;
    url.set_path(&name);
    Ok(url.to_string())
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io("opening postgresql.conf"))?;
    file.write_all(bytes).map_err(io("writing postgresql.conf"))
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

/// The guard: a shell that blocks reading its stdin, and on end-of-file stops the server and
/// removes the cluster's directory. It runs in its own process group so that a Ctrl-C meant
/// for us does not reach it before we have shut down cleanly.
fn spawn_guard(
    bindir: &Path,
    dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<Child, ClusterError> {
    const SCRIPT: &str = r#"
cat >/dev/null
if [ -f "$2/data/postmaster.pid" ]; then
  "$1/pg_ctl" -D "$2/data" -m fast -w -t 20 stop >/dev/null 2>&1 \
    || "$1/pg_ctl" -D "$2/data" -m immediate -w stop >/dev/null 2>&1
fi
rm -rf "$2"
"#;
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(SCRIPT)
        .arg("streamex-pg-guard")
        .arg(bindir)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    command.spawn().map_err(io("starting the cluster guard"))
}

/// When running as root, the uid and gid of `postgres`, the user the server must run as.
fn server_owner() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: `name` is a valid NUL-terminated string; the returned record is read at once,
    // before any other call that could overwrite getpwnam's static buffer.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

/// Where initdb and pg_ctl are: `$STREAMEX_PG_BINDIR` (unless empty), `$PATH`,
/// `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("STREAMEX_PG_BINDIR").filter(|dir| !dir.is_empty()) {
        let dir = PathBuf::from(dir);
        return has_tools(&dir).then_some(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d)) {
            return Some(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Some(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir)
}
