//! A private `nats-server -js` for a test: its own free port and a temporary store, killed
//! and restarted at will (on the same port and store), removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The server binary: `STREAMEX_NATS_SERVER`, else `nats-server` on the PATH, else
/// `/usr/sbin/nats-server` (Debian's package).
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STREAMEX_NATS_SERVER") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| "/usr/sbin/nats-server".into())
}

pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// The server's `max_payload`, when not its default (1 MB).
    max_payload: Option<u32>,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(None)
    }

    /// With `max_payload` bytes at most per message.
    pub fn start_with(max_payload: Option<u32>) -> anyhow::Result<NatsServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = NatsServer {
            port,
            store: tempfile::tempdir()?,
            child: None,
            max_payload,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.path().join("server.log"))?;
        let config = self.store.path().join("server.conf");
        let limit = self
            .max_payload
            .map(|n| format!("max_payload: {n}\n"))
            .unwrap_or_default();
        std::fs::write(&config, limit)?;
        let child = Command::new(binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install Debian's nats-server, or set STREAMEX_NATS_SERVER)",
                    binary().display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILLs the server (what it has written stays in its store).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Starts it again with another `max_payload`.
    pub fn restart_with(&mut self, max_payload: Option<u32>) -> anyhow::Result<()> {
        self.max_payload = max_payload;
        self.restart()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
