//! `streamex demo`, as the README's quick start runs it.

use std::process::Command;

#[test]
fn the_demo_runs_the_blog_example_and_cleans_up() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["demo", "--seconds", "6", "--rate", "20"])
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("tx/s written"), "{stdout}");
    assert!(
        stdout.contains("processed: comments"),
        "operators processed comments:\n{stdout}"
    );
    assert!(
        stdout.contains("sample event on channel comments"),
        "{stdout}"
    );
    assert!(stdout.contains("private cluster removed"), "{stdout}");
    Ok(())
}

/// With `--http`, the demo's service serves its metrics while it runs.
#[test]
fn the_demo_serves_metrics_with_http() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_streamex"))
        .args(["demo", "--seconds", "20", "--rate", "20", "--http"])
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if std::time::Instant::now() > deadline || demo.try_wait()?.is_some() {
            break false;
        }
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream.write_all(
                b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )?;
            last.clear();
            stream.read_to_string(&mut last)?;
            // Events counted once the blog activity has gone through.
            if last.starts_with("HTTP/1.1 200")
                && last.lines().any(|l| {
                    l.starts_with("streamex_events_received_total{entity=\"comments\"}")
                        && !l.ends_with(" 0")
                })
            {
                break true;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // SIGINT, as Ctrl-C: the demo stops cleanly and removes its cluster.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(i32::try_from(demo.id())?, libc::SIGINT) };
    let status = demo.wait()?;
    assert!(found, "no comment events counted in /metrics:\n{last}");
    assert!(status.success(), "the demo did not stop cleanly: {status}");
    Ok(())
}
