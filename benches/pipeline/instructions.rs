//! Section 7 of the pipeline bench, instructions per event. A backlog of `--instruction-rows`
//! changes (the drain's mix) in a database of its own is drained by (b) `streamex tail` and
//! (c) `streamex run` with the counting operator, each under `valgrind --tool=callgrind`;
//! the instructions of the whole process (every thread, start-up included: about 2 M, under
//! 0.5% of a 50k drain) are read from callgrind's output and divided by the events. Unlike
//! time, the count does not depend on what else the machine is doing. Left out, and said so,
//! where valgrind is not installed. `STREAMEX_BENCH_PROFILES=<dir>` keeps the two profiles
//! there (`callgrind.b`, `callgrind.c`) for `callgrind_annotate`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::postgres::PgPoolOptions;

use super::{Args, create_slot, drain, drop_slot, streamex_command, write_backlog, write_configs};

/// Runs the section; returns its Markdown.
pub(super) async fn bench(
    cluster: &streamex::testing::Cluster,
    dir: &Path,
    args: &Args,
) -> anyhow::Result<String> {
    let found = Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Ok(
            "\n## Instructions per event\n\nLeft out: valgrind is not installed \
                   (Debian's `valgrind`).\n\n"
                .to_owned(),
        );
    }
    let url = cluster.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    sqlx::raw_sql(super::SCHEMA).execute(&pool).await?;
    streamex::status::migrate(&pool).await?;
    sqlx::query("CREATE PUBLICATION streamex FOR TABLE posts, comments")
        .execute(&pool)
        .await?;
    let consumers = [
        ("b", "(b) streamex tail -> /dev/null"),
        ("c", "(c) run: count_events, memory status"),
    ];
    for (c, _) in consumers {
        create_slot(&pool, &format!("bench_i{c}")).await?;
    }
    let (changes, last_commit) = write_backlog(&pool, args.instruction_rows).await?;
    let dir = dir.join("instructions");
    std::fs::create_dir_all(&dir)?;
    let configs = write_configs(&dir, &url, None, 1)?;
    let mut rows = String::new();
    for (c, label) in consumers {
        let slot = format!("bench_i{c}");
        let out = dir.join(format!("callgrind.{c}"));
        let wrap = [
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let mut cmd = streamex_command(&wrap);
        match c {
            "b" => {
                cmd.args(["tail", "--database-url", &url, "--slot", &slot])
                    .args(["--publication", "streamex"]);
            }
            _ => {
                cmd.arg("run")
                    .arg("--config")
                    .arg(&configs.count)
                    .env("STREAMEX_DATABASE_URL", &url)
                    .env("STREAMEX_SLOT", &slot);
            }
        }
        cmd.stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(dir.join(format!("{c}.log")))?);
        eprintln!("draining {label} under callgrind...");
        let max = Duration::from_secs(args.max_seconds.max(600));
        let d = drain(&pool, label, &slot, &last_commit, changes, cmd, max).await?;
        if d.partial {
            bail!("{label} did not drain the backlog under callgrind in {max:?}");
        }
        let instructions = total_instructions(&out)?;
        if let Some(keep) = std::env::var_os("STREAMEX_BENCH_PROFILES") {
            let kept = Path::new(&keep).join(format!("callgrind.{c}"));
            std::fs::copy(&out, &kept)
                .with_context(|| format!("keeping the profile as {}", kept.display()))?;
            eprintln!("  profile kept: {} (callgrind_annotate)", kept.display());
        }
        let per_event = instructions as f64 / d.events;
        eprintln!("  {instructions} instructions, {per_event:.0} per event");
        rows.push_str(&format!(
            "| {label} | {:.0} | {:.1} M | {per_event:.0} |\n",
            d.events,
            instructions as f64 / 1e6
        ));
        drop_slot(&pool, &slot).await?;
    }
    Ok(format!(
        "\n## Instructions per event\n\n\
         {changes} changes of the drain's mix, each consumer under `valgrind --tool=callgrind` \
         (every thread of the process, start-up included). Targets: (c) at most 5,000, (b) at \
         most 7,000.\n\n\
         | consumer | events | instructions | per event |\n| --- | ---: | ---: | ---: |\n{rows}\n"
    ))
}

/// The total of callgrind's output file: its `summary:` (or `totals:`) line.
fn total_instructions(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading callgrind's output {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
        })
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no summary line in {}", path.display()))
}
