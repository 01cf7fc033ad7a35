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
