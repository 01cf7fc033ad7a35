//! `cargo bench --bench pipeline [-- OPTIONS]`: end-to-end throughput, latency and memory of
//! streamex on a private PostgreSQL cluster. Prints one report and writes it as Markdown
//! (`BENCHMARKS.md`, or `target/benchmarks-ci.md` for small runs). Nothing is asserted.
//!
//! What is measured:
//!
//! 1. **Drain.** One pgoutput slot per consumer is created, then a backlog of `--rows` changes
//!    is written to the blog tables (1,000-change transactions of inserts, updates and
//!    deletes). Each consumer then runs alone, as a child process, timed from its start until
//!    its slot's `confirmed_flush_lsn` passes the last commit of the backlog (polled every
//!    50 ms), and is stopped with SIGINT. CPU time (user + sys) and peak RSS come from the
//!    child's `wait4` rusage; the walsender's CPU from `/proc/<active_pid>/stat`.
//!    (a) `pg_recvlogical` to /dev/null, the walsender's own limit; (b) `streamex tail`;
//!    (c) `streamex run` with only `count_events` and in-memory process status; (d) `streamex
//!    run` with `config/streamex.toml` (the two blog operators, process status in PostgreSQL);
//!    (e) (d) with `one_event_per_transaction = true`; (f) `streamex run` with no operator and
//!    `[nats]`: every event published to JetStream (a private `nats-server -js`, file store,
//!    left out without a nats-server), the slot acknowledged through what JetStream has
//!    acknowledged. After (d) and (e) the derived tables are compared with what posts and
//!    comments say they should be, after (f) the stream's message count with the backlog's.
//! 2. **Latency.** Writer tasks insert single-row comments at each `--rate` (transactions/s) for
//!    `--latency-seconds`, while the service runs in-process (`streamex::Service`).
//!    For each commit: *delivered* = wall clock when an extra non-transactional recording
//!    operator gets the event, minus the commit time the server wrote in the WAL (pgoutput's
//!    commit timestamp, same machine clock); *processed* = wall clock of the first
//!    `EntityProcessed` notice covering the commit (every operator done, process status
//!    stored, just before the slot is acknowledged), minus the same commit time.
//! 3. **Huge transaction.** One transaction of `--huge-rows` comment inserts, drained by
//!    configuration (c): time and peak RSS.
//! 4. **Hot aggregates.** Backlogs of comment inserts only (1,000 to a transaction, dealt
//!    round-robin over posts written before the slots), each in a database of its own whose
//!    tables have autovacuum off: the *hot* backlog of `--hot-rows` with 2,000 comments per
//!    post, then one backlog of `--sweep-rows` per entry of `--comments-per-post`. Each is
//!    drained by (a) and (d) as above; also the whole server's CPU, the recomputes of the
//!    declarative operator (rows written to its table, from `pg_stat_user_tables`), and the
//!    derived tables checked.
//!
//! 5. **Backfill.** `--backfill-rows` comments (a tenth as many posts) that exist before any
//!    slot, read by `COPY ... TO STDOUT` and backfilled by `streamex run` with `count_events`
//!    and with the blog operators, each timed until its checkpoints are stored.
//! 6. **Workers** (`pipeline/workers.rs`). `--worker-rows` comment inserts published to
//!    JetStream, then `post_comment_tallies` run from the stream by `streamex worker`
//!    processes: whole on one, then with 4 partitions on each count of `--workers`.
//! 7. **Instructions per event** (`pipeline/instructions.rs`). `--instruction-rows` changes
//!    drained by (b) and (c) under `valgrind --tool=callgrind` (left out without valgrind).
//!
//! The `streamex` binary is `CARGO_BIN_EXE_streamex`, which `cargo bench` builds in the
//! `bench` profile (the release profile's settings, with `debug = 1`).
//!
//! Options: `--rows N` (500000), `--latency-seconds S` (30), `--huge-rows N` (1000000),
//! `--rate LIST` (1000,5000), `--skip-latency`, `--max-seconds S` (300, per drain: a consumer still
//! running then is stopped and its rate estimated from the WAL it confirmed), `--only a,b,..`
//! (drain consumers to run; skips latency and the huge transaction), `--wrap "CMD ARGS"`
//! (prefix for the streamex children, e.g. `valgrind --tool=callgrind`), `--out PATH`,
//! `--hot-rows N` (200000; 0 for none), `--sweep-rows N` (100000; 0 for none),
//! `--comments-per-post LIST` (6,100,2000,20000; `none`), `--backfill-rows N` (1000000; 0 for
//! none; runs unless `--only` is given without it), `--worker-rows N` (200000; 0 for none) and
//! `--workers LIST` (1,2,4), which run unless `--only` is given without one of them, and need
//! a nats-server; `--instruction-rows N` (50000; 0 for none), which runs unless `--only` is
//! given without it; `--partitions N` (1) runs the blog operators of (d) and of the hot
//! aggregates in N partitions. The hot aggregates run unless
//! `--only` is given; with `--only`, when one of their three options is.
//! `STREAMEX_BENCH_LOG=<filter>` (as `RUST_LOG`) prints the in-process service's logs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use streamex::config::Config;
use streamex::event::{Event, EventType};
use streamex::operator::{Context, Delivery, Operator, Subscription};
use streamex::pubsub::PubSub;
use streamex::testing::Cluster;

#[path = "pipeline/instructions.rs"]
mod instructions;
#[path = "pipeline/workers.rs"]
mod workers;

const SCHEMA: &str = include_str!("../examples/blog/schema.sql");
const BLOG_CONFIG: &str = include_str!("../config/streamex.toml");
const STREAMEX: &str = env!("CARGO_BIN_EXE_streamex");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the hand-written part of the report begins; kept when the figures are rewritten.
const NOTES: &str = "<!-- notes: kept by the bench -->";

#[derive(Debug)]
struct Args {
    rows: u64,
    latency_seconds: u64,
    huge_rows: u64,
    rates: Vec<u64>,
    skip_latency: bool,
    max_seconds: u64,
    only: Option<String>,
    /// Which latency runs (`c`, `d`); given explicitly, they run even with `--only`.
    latency: Option<Vec<String>>,
    wrap: Vec<String>,
    out: PathBuf,
    /// Rows of the hot-aggregate backlog (0: none).
    hot_rows: u64,
    /// Rows of each backlog of the sweep over comments per post.
    sweep_rows: u64,
    /// Comments each post ends with, one sweep backlog each.
    comments_per_post: Vec<u64>,
    /// A hot-aggregate option was given: the shapes run even with `--only`.
    shapes_asked: bool,
    /// Comments of the backfill's table (0: none); a tenth as many posts.
    backfill_rows: u64,
    /// `--backfill-rows` was given: the backfill runs even with `--only`.
    backfill_asked: bool,
    /// Comment inserts of the workers' section (0: none).
    worker_rows: u64,
    /// The numbers of workers sharing the partitioned operator, one run each.
    workers: Vec<u64>,
    /// A workers' option was given: the section runs even with `--only`.
    workers_asked: bool,
    /// Changes of the backlog drained under callgrind (0: none).
    instruction_rows: u64,
    /// `--instruction-rows` was given: the section runs even with `--only`.
    instructions_asked: bool,
    /// The blog operators' `partitions` in the drains (d) and the hot aggregates (1: whole).
    partitions: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        rows: 500_000,
        latency_seconds: 30,
        huge_rows: 1_000_000,
        rates: vec![1_000, 5_000],
        skip_latency: false,
        partitions: 1,
        max_seconds: 300,
        only: None,
        latency: None,
        wrap: Vec::new(),
        out: PathBuf::new(),
        hot_rows: 200_000,
        sweep_rows: 100_000,
        comments_per_post: vec![6, 100, 2_000, 20_000],
        shapes_asked: false,
        backfill_rows: 1_000_000,
        backfill_asked: false,
        worker_rows: 200_000,
        workers: vec![1, 2, 4],
        workers_asked: false,
        instruction_rows: 50_000,
        instructions_asked: false,
    };
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rows" => args.rows = value()?.parse()?,
            "--latency-seconds" => args.latency_seconds = value()?.parse()?,
            "--huge-rows" => args.huge_rows = value()?.parse()?,
            "--rate" => {
                args.rates = value()?
                    .split(',')
                    .map(|r| r.trim().parse())
                    .collect::<Result<_, _>>()?;
            }
            "--max-seconds" => args.max_seconds = value()?.parse()?,
            "--skip-latency" => args.skip_latency = true,
            "--only" => args.only = Some(value()?),
            "--latency" => args.latency = Some(value()?.split(',').map(str::to_owned).collect()),
            "--wrap" => args.wrap = value()?.split_whitespace().map(str::to_owned).collect(),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--hot-rows" => {
                args.hot_rows = value()?.parse()?;
                args.shapes_asked = true;
            }
            "--sweep-rows" => {
                args.sweep_rows = value()?.parse()?;
                args.shapes_asked = true;
            }
            "--comments-per-post" => {
                let list = value()?;
                args.comments_per_post = if list == "none" {
                    Vec::new()
                } else {
                    list.split(',')
                        .map(|n| n.trim().parse::<u64>().map(|n| n.max(1)))
                        .collect::<Result<_, _>>()?
                };
                args.shapes_asked = true;
            }
            "--backfill-rows" => {
                args.backfill_rows = value()?.parse()?;
                args.backfill_asked = true;
            }
            "--worker-rows" => {
                args.worker_rows = value()?.parse()?;
                args.workers_asked = true;
            }
            "--workers" => {
                args.workers = value()?
                    .split(',')
                    .map(|n| n.trim().parse::<u64>().map(|n| n.max(1)))
                    .collect::<Result<_, _>>()?;
                args.workers_asked = true;
            }
            "--partitions" => args.partitions = value()?.parse()?,
            "--instruction-rows" => {
                args.instruction_rows = value()?.parse()?;
                args.instructions_asked = true;
            }
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other:?}"),
        }
    }
    args.out = out.unwrap_or_else(|| {
        if args.rows < 100_000 {
            Path::new(ROOT).join("target/benchmarks-ci.md")
        } else {
            Path::new(ROOT).join("BENCHMARKS.md")
        }
    });
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    eprintln!("pipeline bench: {args:?}; streamex binary {STREAMEX}");
    // The in-process service of the latency runs logs only when asked, to stderr
    // (`STREAMEX_BENCH_LOG=streamex::operator=debug`, say): a look at what it did.
    if let Ok(filter) = std::env::var("STREAMEX_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let cluster = Cluster::builder()
        .setting("max_wal_size", "4GB")
        .setting("wal_sender_timeout", "60s")
        .setting("checkpoint_timeout", "30min")
        .start()
        .context("starting the private cluster")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&args, &cluster));
    drop(runtime);
    drop(cluster);
    result
}

/// One drained consumer's figures.
struct Drain {
    label: &'static str,
    events: f64,
    seconds: f64,
    cpu: f64,
    walsender_cpu: Option<f64>,
    /// Every server process: walsender, the consumer's backends, the rest.
    server_cpu: Option<f64>,
    rss_kib: i64,
    partial: bool,
}

/// One hot-aggregate backlog and its drains, (a) then (d).
struct Shape {
    hot: bool,
    posts: u64,
    per_post: u64,
    drains: Vec<Drain>,
    /// Rows written to `post_with_comments_counts` during (d): one per recompute.
    recomputes: Option<i64>,
}

struct Report {
    machine: String,
    drains: Vec<Drain>,
    checks: Vec<String>,
    latency: Vec<String>,
    latency_note: String,
    huge: Option<(u64, Drain)>,
    backlog_note: String,
    shapes: Vec<Shape>,
    shape_checks: Vec<String>,
    /// The backfill section's table rows and notes.
    backfill: Vec<String>,
    /// The workers' section, rendered.
    workers: String,
    /// The instructions-per-event section, rendered.
    instructions: String,
}

async fn bench(args: &Args, cluster: &Cluster) -> anyhow::Result<()> {
    let url = cluster.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect(&url)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    streamex::status::migrate(&pool).await?;
    sqlx::query("CREATE PUBLICATION streamex FOR TABLE posts, comments")
        .execute(&pool)
        .await?;
    let machine = machine(&pool).await?;
    eprintln!("{machine}");

    // (f) needs a nats-server: without one it is left out (and said so).
    let nats_binary = nats_server_binary();
    let all: Vec<&str> = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .filter(|c| *c != "f" || nats_binary.is_some())
        .collect();
    if nats_binary.is_none() {
        eprintln!("no nats-server on this machine: (f), the JetStream publisher, is left out");
    }
    let only: Vec<&str> = match &args.only {
        Some(list) if list == "none" => Vec::new(),
        Some(list) => list.split(',').collect(),
        None => all.clone(),
    };
    let nats = match (only.contains(&"f"), &nats_binary) {
        (true, Some(binary)) => Some(NatsServer::start(binary)?),
        (true, None) => bail!("--only f: no nats-server (install Debian's nats-server)"),
        _ => None,
    };
    for c in &only {
        create_slot(&pool, &format!("bench_{c}")).await?;
    }
    // The latency runs take their posts from the backlog; the hot aggregates have their own.
    let latency_asked = args.latency.is_some() && !args.skip_latency;
    let (changes, last_commit, backlog_note) = if only.is_empty() && !latency_asked {
        (0, String::new(), String::new())
    } else {
        let started = Instant::now();
        let (changes, last_commit) = write_backlog(&pool, args.rows).await?;
        let write_secs = started.elapsed().as_secs_f64();
        let note = format!(
            "Backlog: {changes} changes in {} transactions of 1,000 (per transaction: 100 post \
             inserts, 600 comment inserts, 150 comment updates, 50 post updates, 100 comment \
             deletes), written in {write_secs:.1} s ({:.0} changes/s).",
            changes / 1000,
            changes as f64 / write_secs
        );
        eprintln!("{note}");
        (changes, last_commit, note)
    };

    let dir = tempfile::tempdir()?;
    let configs = write_configs(
        dir.path(),
        &url,
        nats.as_ref().map(|n| n.port),
        args.partitions,
    )?;
    let mut drains = Vec::new();
    let mut checks = Vec::new();
    for c in only.iter().copied() {
        let slot = format!("bench_{c}");
        let (label, mut command): (&'static str, Command) = match c {
            "a" => (
                "(a) pg_recvlogical -> /dev/null",
                recvlogical(cluster, &url, &slot),
            ),
            "b" => {
                let mut cmd = streamex_command(&args.wrap);
                cmd.args(["tail", "--database-url", &url, "--slot", &slot])
                    .args(["--publication", "streamex"]);
                ("(b) streamex tail -> /dev/null", cmd)
            }
            "c" | "d" | "e" | "f" => {
                reset_derived(&pool).await?;
                let (config, label) = match c {
                    "c" => (&configs.count, "(c) run: count_events, memory status"),
                    "d" => (&configs.blog, "(d) run: blog operators, pg status"),
                    "f" => (
                        &configs.jetstream,
                        "(f) run: JetStream publisher only, memory status",
                    ),
                    _ => (&configs.blog_one, "(e) (d), one event per transaction"),
                };
                let mut cmd = streamex_command(&args.wrap);
                cmd.arg("run")
                    .arg("--config")
                    .arg(config)
                    .env("STREAMEX_DATABASE_URL", &url)
                    .env("STREAMEX_SLOT", &slot);
                (label, cmd)
            }
            other => bail!("--only: unknown consumer {other:?} (a, b, c, d, e or f)"),
        };
        command.stdout(Stdio::null());
        command.stderr(std::fs::File::create(dir.path().join(format!("{c}.log")))?);
        eprintln!("draining {label}...");
        let max = Duration::from_secs(args.max_seconds);
        let d = drain(&pool, label, &slot, &last_commit, changes, command, max).await?;
        eprintln!("  {:.2} s, {:.0} events/s", d.seconds, d.events / d.seconds);
        drains.push(d);
        if c == "d" || c == "e" {
            checks.push(check_derived(&pool, label).await?);
        }
        if let (Some(nats), "f") = (&nats, c) {
            checks.push(nats.check(label, changes).await?);
        }
        let log = std::fs::read_to_string(dir.path().join(format!("{c}.log")))?;
        if log.contains("ERROR") || log.contains("panicked") {
            checks.push(format!("{label}: errors in its log:\n{}", tail(&log, 10)));
        }
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&pool)
            .await?;
    }

    let mut shapes = Vec::new();
    let mut shape_checks = Vec::new();
    if args.only.is_none() || args.shapes_asked {
        let mut plan = Vec::new();
        if args.hot_rows > 0 {
            plan.push((true, args.hot_rows, HOT_COMMENTS_PER_POST));
        }
        if args.sweep_rows > 0 {
            plan.extend(
                args.comments_per_post
                    .iter()
                    .map(|&n| (false, args.sweep_rows, n)),
            );
        }
        for (hot, rows, per_post) in plan {
            match hot_aggregates(cluster, &pool, dir.path(), args, hot, rows, per_post).await {
                Ok((shape, checks)) => {
                    shapes.push(shape);
                    shape_checks.extend(checks);
                }
                Err(e) => shape_checks.push(format!(
                    "**WARNING** the backlog of {rows} rows, {per_post} comments per post, \
                     failed: {e:#}"
                )),
            }
        }
    }

    let mut backfill = Vec::new();
    if (args.only.is_none() || args.backfill_asked) && args.backfill_rows > 0 {
        match backfill_bench(cluster, dir.path(), args).await {
            Ok(lines) => backfill = lines,
            Err(e) => checks.push(format!("**WARNING** the backfill bench failed: {e:#}")),
        }
    }

    let mut workers = String::new();
    if (args.only.is_none() || args.workers_asked) && args.worker_rows > 0 {
        match &nats_binary {
            Some(binary) => match workers::bench(cluster, dir.path(), args, binary).await {
                Ok(section) => workers = section,
                Err(e) => checks.push(format!("**WARNING** the workers' bench failed: {e:#}")),
            },
            None => checks.push(
                "The workers' section is left out: no nats-server on this machine.".to_owned(),
            ),
        }
    }

    let mut instructions = String::new();
    if (args.only.is_none() || args.instructions_asked) && args.instruction_rows > 0 {
        match instructions::bench(cluster, dir.path(), args).await {
            Ok(section) => instructions = section,
            Err(e) => checks.push(format!("**WARNING** the instructions bench failed: {e:#}")),
        }
    }

    let mut latency = Vec::new();
    let mut latency_note = String::new();
    let mut huge = None;
    let latency_runs: Vec<bool> = match &args.latency {
        Some(list) => list.iter().map(|l| l == "d").collect(),
        None if args.only.is_none() => vec![false, true],
        None => Vec::new(),
    };
    if !args.skip_latency {
        for &rate in &args.rates {
            for &blog in &latency_runs {
                match latency_run(&pool, &url, args, blog, rate).await {
                    Ok((line, note)) => {
                        latency.push(line);
                        latency_note.push_str(&note);
                    }
                    Err(e) => checks.push(format!("**WARNING** latency run failed: {e:#}")),
                }
            }
        }
    }
    if args.only.is_none() {
        match huge_transaction(&pool, &url, &configs, args).await {
            Ok(d) => huge = Some((args.huge_rows, d)),
            Err(e) => checks.push(format!("**WARNING** huge transaction failed: {e:#}")),
        }
    }

    let report = Report {
        machine,
        drains,
        checks,
        latency,
        latency_note,
        huge,
        backlog_note,
        shapes,
        shape_checks,
        backfill,
        workers,
        instructions,
    };
    let mut text = render(&report, args);
    println!("{text}");
    // Hand-written notes (methodology, profile) after NOTES survive a new run.
    if let Ok(previous) = std::fs::read_to_string(&args.out) {
        if let Some(at) = previous.find(NOTES) {
            text.push('\n');
            text.push_str(&previous[at..]);
        }
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &text)?;
    eprintln!("written to {}", args.out.display());
    pool.close().await;
    Ok(())
}

/// The backfill: `--backfill-rows` comments over a tenth as many posts, existing before any
/// slot. Reference: `COPY ... TO STDOUT` of both tables, read to the end. Then, each from a
/// slot of its own, `streamex run` with `count_events` (memory status) and with the blog
/// operators, timed from the start of the process until every operator's checkpoint is
/// stored (its backfill committed), then stopped.
async fn backfill_bench(cluster: &Cluster, dir: &Path, args: &Args) -> anyhow::Result<Vec<String>> {
    use futures_util::StreamExt as _;
    let url = cluster.create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let comments = args.backfill_rows;
    let posts = (comments / 10).max(1);
    eprintln!("backfill: writing {posts} posts and {comments} comments...");
    sqlx::query("INSERT INTO posts (title) SELECT 'p ' || i FROM generate_series(1, $1) i")
        .bind(i64::try_from(posts)?)
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO comments (post_id, body) SELECT 1 + i % $1, 'c' FROM generate_series(1, $2) i",
    )
    .bind(i64::try_from(posts)?)
    .bind(i64::try_from(comments)?)
    .execute(&pool)
    .await?;
    for table in ["posts", "comments"] {
        // One statement each: VACUUM cannot run in the implicit transaction of several.
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(&pool)
            .await?;
    }
    let rows = posts + comments;

    let mut copy_secs = 0.0;
    let mut copy_bytes = 0usize;
    {
        let mut conn = pool.acquire().await?;
        let started = Instant::now();
        for table in ["posts", "comments"] {
            let mut out = conn
                .copy_out_raw(&format!("COPY {table} TO STDOUT"))
                .await?;
            while let Some(chunk) = out.next().await {
                copy_bytes += chunk?.len();
            }
        }
        copy_secs += started.elapsed().as_secs_f64();
    }
    let copy_rate = rows as f64 / copy_secs;
    let mut lines = vec![format!(
        "| `COPY posts, comments TO STDOUT` | {rows} | {copy_secs:.2} | {copy_rate:.0} | 1.00 | \
         ({:.0} MiB) |",
        copy_bytes as f64 / 1_048_576.0
    )];

    for (label, operators, config) in [
        (
            "`streamex run`: count_events, memory status",
            1,
            format!(
                "database_url = {url:?}\nslot = \"bench_backfill_c\"\npublication = \"streamex\"\n\
                 tables = [\"posts\", \"comments\"]\n\n[process_status]\nbackend = \"memory\"\n\n\
                 [[operators]]\nname = \"count_events\"\n"
            ),
        ),
        (
            "`streamex run`: the blog operators, pg status",
            2,
            BLOG_CONFIG
                .replace(
                    "database_url = \"postgres://postgres@127.0.0.1:5432/blog\"",
                    &format!("database_url = {url:?}"),
                )
                .replace("slot = \"streamex\"", "slot = \"bench_backfill_d\""),
        ),
    ] {
        let path = dir.join(format!("backfill-{operators}.toml"));
        std::fs::write(&path, &config)?;
        let log = dir.join(format!("backfill-{operators}.log"));
        let mut cmd = streamex_command(&args.wrap);
        cmd.env("RUST_LOG", "info")
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        eprintln!("backfilling with {label}...");
        let started = Instant::now();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id())?;
        let slot = if operators == 1 {
            "bench_backfill_c"
        } else {
            "bench_backfill_d"
        };
        let deadline = started + Duration::from_secs(args.max_seconds);
        let done = loop {
            let stored: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM streamex.operator_checkpoints WHERE slot = $1 \
                  AND to_regclass('streamex.operator_checkpoints') IS NOT NULL",
            )
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            if stored >= operators {
                break true;
            }
            if Instant::now() > deadline || try_reap(pid)?.is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = started.elapsed().as_secs_f64();
        // SAFETY: kill has no memory-safety preconditions; the pid is our own running child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let (cpu, rss_kib) = reap(pid, Duration::from_secs(30))?;
        std::mem::forget(child);
        if !done {
            lines.push(format!(
                "| {label} | {rows} | did not finish in {secs:.0} s (log: {}) | | | |",
                tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5)
            ));
            continue;
        }
        let rate = rows as f64 / secs;
        // The backfill's own time, as its log says (from the snapshot to the commit; the
        // longest when operators backfill side by side), without the process's start.
        let own = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("backfill done"))
            .filter_map(|l| {
                l.split("seconds=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .fold(None, |max: Option<f64>, s| {
                Some(max.map_or(s, |m| m.max(s)))
            });
        let own = own.map_or_else(String::new, |own| {
            let own_rate = rows as f64 / own.max(1e-6);
            format!(
                "; the backfill alone {own:.2} s, {own_rate:.0} rows/s, {:.2}x COPY",
                own_rate / copy_rate
            )
        });
        lines.push(format!(
            "| {label} | {rows} | {secs:.2} | {rate:.0} | {:.2} | CPU {cpu:.1} s, peak RSS {:.0} MiB{own} |",
            rate / copy_rate,
            rss_kib as f64 / 1024.0
        ));
        if operators == 2 {
            let (counts, tallies) = {
                let counts: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM posts p LEFT JOIN post_with_comments_counts d ON d.id = p.id \
                      WHERE d.comments_count IS DISTINCT FROM (SELECT count(*) FROM comments c WHERE c.post_id = p.id)",
                )
                .fetch_one(&pool)
                .await?;
                let tallies: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT post_id, count(*) AS n FROM comments GROUP BY 1) truth \
                      FULL JOIN post_comment_tallies t USING (post_id) \
                      WHERE coalesce(truth.n, 0) <> coalesce(t.comments, 0)",
                )
                .fetch_one(&pool)
                .await?;
                (counts, tallies)
            };
            lines.push(format!(
                "\nAfter the blog operators' backfill: {counts} wrong rows in \
                 post_with_comments_counts, {tallies} in post_comment_tallies."
            ));
        }
    }
    pool.close().await;
    Ok(lines)
}

/// `pg_recvlogical` reading `slot` to /dev/null, acknowledging every second.
fn recvlogical(cluster: &Cluster, url: &str, slot: &str) -> Command {
    // The cluster's own directory, else $PATH (the server may be run by wrappers).
    let own = cluster.bindir().join("pg_recvlogical");
    let mut cmd = Command::new(if own.is_file() {
        own
    } else {
        PathBuf::from("pg_recvlogical")
    });
    cmd.args(["-d", url, "--slot", slot, "--start", "-F", "1", "-s", "1"])
        .args(["-o", "proto_version=1", "-o", "publication_names=streamex"])
        .args(["-f", "/dev/null"]);
    cmd
}

fn streamex_command(wrap: &[String]) -> Command {
    let mut cmd = match wrap.split_first() {
        Some((program, rest)) => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(STREAMEX);
            cmd
        }
        None => Command::new(STREAMEX),
    };
    // The service refuses unknown STREAMEX_* variables: pass none of ours.
    for (var, _) in std::env::vars() {
        if var.starts_with("STREAMEX_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

async fn machine(pool: &PgPool) -> anyhow::Result<String> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?;
    // CI runs the benchmark in the dev profile (to check that it works, not to measure).
    let profile = if cfg!(debug_assertions) {
        "the `dev` profile (unoptimised: these figures measure nothing)"
    } else {
        "the `bench` profile (release + debug = 1)"
    };
    Ok(format!(
        "{cores} cores ({model}), {:.1} GiB memory, PostgreSQL {version} (private cluster: \
         fsync off, shared_buffers 128MB, max_wal_size 4GB, wal_sender_timeout 60s), \
         streamex built in {profile}.",
        mem_kib as f64 / 1024.0 / 1024.0
    ))
}

async fn create_slot(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .execute(pool)
        .await?;
    Ok(())
}

/// Writes `rows` changes (rounded up to whole transactions of 1,000). Returns the number of
/// changes and an LSN between the last change and the last commit record.
async fn write_backlog(pool: &PgPool, rows: u64) -> anyhow::Result<(u64, String)> {
    let transactions = rows.div_ceil(1000).max(1);
    let mut changes = 0;
    let mut last = String::new();
    for _ in 0..transactions {
        let mut tx = pool.begin().await?;
        let posts: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO posts (title, body) SELECT 'post ' || g, 'body of the post'
               FROM generate_series(1, 100) g RETURNING id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut n = posts.len() as u64;
        for sql in [
            "INSERT INTO comments (post_id, body)
               SELECT p, 'a comment' FROM unnest($1::bigint[]) p, generate_series(1, 6)",
            "UPDATE comments SET body = body || '!', updated_at = now() WHERE id IN
               (SELECT id FROM comments WHERE post_id = ANY($1) ORDER BY id LIMIT 150)",
            "UPDATE posts SET title = title || '!', updated_at = now()
               WHERE id = ANY(($1::bigint[])[1:50])",
            "DELETE FROM comments WHERE id IN
               (SELECT id FROM comments WHERE post_id = ANY($1) ORDER BY id DESC LIMIT 100)",
        ] {
            n += sqlx::query(sql)
                .bind(&posts)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if n != 1000 {
            bail!("a backlog transaction made {n} changes, not 1000");
        }
        changes += n;
        last = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok((changes, last))
}

struct Configs {
    count: PathBuf,
    blog: PathBuf,
    blog_one: PathBuf,
    /// No operator, memory status, `[nats]` (when a server runs).
    jetstream: PathBuf,
    count_text: String,
}

/// `nats-server` on the PATH, else Debian's `/usr/sbin/nats-server`.
fn nats_server_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|p| p.is_file())
}

/// A private `nats-server -js` on a free port with a temporary file store, for (f).
struct NatsServer {
    port: u16,
    child: std::process::Child,
    _store: tempfile::TempDir,
}

impl NatsServer {
    fn start(binary: &Path) -> anyhow::Result<NatsServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(NatsServer {
            port,
            child,
            _store: store,
        })
    }

    /// Whether the stream holds the backlog's events, once each.
    async fn check(&self, label: &str, changes: u64) -> anyhow::Result<String> {
        let client = async_nats::connect(format!("nats://127.0.0.1:{}", self.port)).await?;
        let js = async_nats::jetstream::new(client);
        let messages = js.get_stream("bench").await?.info().await?.state.messages;
        Ok(if messages == changes {
            format!("{label}: JetStream holds the {messages} events, once each")
        } else {
            format!("**WARNING** {label}: JetStream holds {messages} events for {changes} changes")
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_configs(
    dir: &Path,
    url: &str,
    nats_port: Option<u16>,
    partitions: u32,
) -> anyhow::Result<Configs> {
    let count_text = format!(
        "database_url = {url:?}\nslot = \"bench\"\npublication = \"streamex\"\n\
         tables = [\"posts\", \"comments\"]\n\n[process_status]\nbackend = \"memory\"\n\n\
         [[operators]]\nname = \"count_events\"\nbackfill = false\n"
    );
    // The drains measure streaming a backlog: no operator backfills the rows already there.
    let blog = streamed_blog_config(partitions)?;
    let blog_one = blog
        .replace(
            "name = \"post_with_comments_counts\"\n",
            "name = \"post_with_comments_counts\"\none_event_per_transaction = true\n",
        )
        .replace(
            "name = \"post_comment_tallies\"\n",
            "name = \"post_comment_tallies\"\none_event_per_transaction = true\n",
        );
    if blog_one.matches("one_event_per_transaction = true").count() != 2 {
        bail!("config/streamex.toml changed: could not set one_event_per_transaction");
    }
    let jetstream_text = format!(
        "database_url = {url:?}\nslot = \"bench\"\npublication = \"streamex\"\n\
         tables = [\"posts\", \"comments\"]\n\n[process_status]\nbackend = \"memory\"\n\n\
         [nats]\nurl = \"nats://127.0.0.1:{}\"\nstream = \"bench\"\nsubject_prefix = \"bench\"\n",
        nats_port.unwrap_or(4222)
    );
    let configs = Configs {
        count: dir.join("count.toml"),
        blog: dir.join("blog.toml"),
        blog_one: dir.join("blog_one.toml"),
        jetstream: dir.join("jetstream.toml"),
        count_text,
    };
    std::fs::write(&configs.jetstream, jetstream_text)?;
    std::fs::write(&configs.count, &configs.count_text)?;
    std::fs::write(&configs.blog, blog)?;
    std::fs::write(&configs.blog_one, blog_one)?;
    Ok(configs)
}

async fn reset_derived(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "TRUNCATE post_with_comments_counts, post_comment_tallies, streamex.process_status,
                  streamex.operator_checkpoints",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs `command` until the slot's confirmed position passes `last_commit`, then stops it.
async fn drain(
    pool: &PgPool,
    label: &'static str,
    slot: &str,
    last_commit: &str,
    changes: u64,
    mut command: Command,
    max: Duration,
) -> anyhow::Result<Drain> {
    let start_lsn: String = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?;
    let server_before = server_cpu_seconds(pool).await?;
    let started = Instant::now();
    let child = command.spawn().context("starting the consumer")?;
    let pid = i32::try_from(child.id())?;
    let mut partial = false;
    let mut fraction = 1.0;
    let walsender_cpu = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (done, active_pid, progress): (bool, Option<i32>, f64) = sqlx::query_as(
            "SELECT coalesce(confirmed_flush_lsn > $2::pg_lsn, false), active_pid,
                    coalesce(pg_wal_lsn_diff(confirmed_flush_lsn, $3::pg_lsn)
                             / nullif(pg_wal_lsn_diff($2::pg_lsn, $3::pg_lsn), 0), 0)::float8
               FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .bind(last_commit)
        .bind(&start_lsn)
        .fetch_one(pool)
        .await?;
        let timed_out = started.elapsed() >= max;
        if done || timed_out {
            if !done {
                partial = true;
                fraction = progress.clamp(0.0, 1.0);
            }
            break active_pid.and_then(process_cpu_seconds);
        }
        if let Some(status) = try_reap(pid)? {
            bail!("{label} exited before draining the backlog: {status:?}");
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = server_cpu_seconds(pool)
        .await?
        .zip(server_before)
        .map(|(after, before)| after - before);
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let usage = tokio::task::spawn_blocking(move || reap(pid, Duration::from_secs(60))).await??;
    drop(child);
    Ok(Drain {
        label,
        events: changes as f64 * fraction,
        seconds,
        cpu: usage.0,
        walsender_cpu,
        server_cpu,
        rss_kib: usage.1,
        partial,
    })
}

/// `Some(status)` if the child has exited (and is reaped), without waiting.
fn try_reap(pid: i32) -> anyhow::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; a null rusage is allowed.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some(status)),
        _ => Err(std::io::Error::last_os_error().into()),
    }
}

/// Waits for the child (SIGKILL after `grace`); returns its user+sys CPU seconds and peak RSS.
fn reap(pid: i32, grace: Duration) -> anyhow::Result<(f64, i64)> {
    let deadline = Instant::now() + grace;
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid out-pointers for the call.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return Ok((secs(usage.ru_utime) + secs(usage.ru_stime), usage.ru_maxrss));
        }
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if Instant::now() >= deadline {
            // SAFETY: as above; our own child, which did not stop on SIGINT.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: `[1]` is the parent's pid,
/// `[11]`..`[14]` utime, stime, cutime, cstime in clock ticks.
fn proc_stat(pid: i32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat.rsplit_once(')')?.1.split_whitespace();
    // The state (a letter) is field 0: kept as 0 so that the indices stay those of proc(5).
    Some(fields.map(|f| f.parse().unwrap_or(0)).collect())
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// User + system CPU seconds of a process so far, from /proc.
fn process_cpu_seconds(pid: i32) -> Option<f64> {
    let fields = proc_stat(pid)?;
    Some(ticks_to_seconds(fields.get(11)? + fields.get(12)?))
}

/// User + system CPU seconds of the whole server so far: the postmaster (found as the parent of
/// this pool's backend), its live children, and those it has reaped (its cutime and cstime).
async fn server_cpu_seconds(pool: &PgPool) -> anyhow::Result<Option<f64>> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let Some(postmaster) = proc_stat(backend).and_then(|f| Some(*f.get(1)?)) else {
        return Ok(None);
    };
    let Some(own) = proc_stat(i32::try_from(postmaster)?) else {
        return Ok(None);
    };
    let mut ticks: u64 = own.get(11..15).map_or(0, |t| t.iter().sum());
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(f) = proc_stat(pid) {
            if f.get(1) == Some(&postmaster) {
                ticks += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
            }
        }
    }
    Ok(Some(ticks_to_seconds(ticks)))
}

/// Compares the derived tables with posts and comments; a line saying so.
async fn check_derived(pool: &PgPool, label: &str) -> anyhow::Result<String> {
    let (counts, tallies): (i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM
              (SELECT p.id, p.title, p.body,
                      (SELECT count(*) FROM comments c WHERE c.post_id = p.id)::int AS n
                 FROM posts p) e
              FULL JOIN post_with_comments_counts d USING (id)
             WHERE (e.title, e.body, e.n) IS DISTINCT FROM (d.title, d.body, d.comments_count)),
           (SELECT count(*) FROM
              (SELECT post_id, count(*)::int AS n FROM comments GROUP BY post_id) e
              FULL JOIN (SELECT * FROM post_comment_tallies WHERE comments <> 0) t USING (post_id)
             WHERE e.n IS DISTINCT FROM t.comments)",
    )
    .fetch_one(pool)
    .await?;
    Ok(if counts == 0 && tallies == 0 {
        format!("{label}: derived tables correct")
    } else {
        format!(
            "**WARNING** {label}: {counts} wrong rows in post_with_comments_counts, {tallies} in \
             post_comment_tallies (a partial drain leaves them incomplete)"
        )
    })
}

/// Comments each post of the hot-aggregate backlog ends with (the 100 posts of 2,000).
const HOT_COMMENTS_PER_POST: u64 = 2_000;
/// The `application_name` of the bench's own connections to a hot-aggregate database.
const BENCH_APP: &str = "pipeline-bench";

/// A backlog of comment inserts only, 1,000 to a transaction, dealt round-robin over
/// `rows / per_post` posts so that each post ends with `per_post` comments, in a database of
/// its own whose tables have autovacuum off. Drained by (a) and by (d), each from its own slot
/// created after the posts; returns the figures and the lines of the derived-table checks.
/// The blog configuration for streaming a backlog (no operator backfills the rows already
/// there), the operators in `partitions` (1: whole).
fn streamed_blog_config(partitions: u32) -> anyhow::Result<String> {
    let blog = BLOG_CONFIG.replace("backfill = true", "backfill = false");
    if blog.matches("backfill = false").count() != 2 {
        bail!("config/streamex.toml changed: could not set backfill = false");
    }
    if partitions <= 1 {
        return Ok(blog);
    }
    let given = format!("\npartitions = {partitions}\n");
    let blog = blog
        .replace(
            "name = \"post_with_comments_counts\"\n",
            &format!("name = \"post_with_comments_counts\"{given}"),
        )
        .replace(
            "name = \"post_comment_tallies\"\n",
            &format!("name = \"post_comment_tallies\"{given}"),
        );
    if blog.matches(&given).count() != 2 {
        bail!("config/streamex.toml changed: could not set partitions");
    }
    Ok(blog)
}

async fn hot_aggregates(
    cluster: &Cluster,
    admin: &PgPool,
    dir: &Path,
    args: &Args,
    hot: bool,
    rows: u64,
    per_post: u64,
) -> anyhow::Result<(Shape, Vec<String>)> {
    let url = cluster.create_database().await?;
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.application_name(BENCH_APP))
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    streamex::status::migrate(&pool).await?;
    // Autovacuum would run at a moment that depends on the machine and change what the
    // recomputes read (the visibility map, dead tuples): off for every table written.
    sqlx::raw_sql(
        "CREATE PUBLICATION streamex FOR TABLE posts, comments;
         ALTER TABLE posts SET (autovacuum_enabled = false);
         ALTER TABLE comments SET (autovacuum_enabled = false);
         ALTER TABLE post_with_comments_counts SET (autovacuum_enabled = false);
         ALTER TABLE post_comment_tallies SET (autovacuum_enabled = false);
         ALTER TABLE streamex.process_status SET (autovacuum_enabled = false);
         ALTER TABLE streamex.operator_checkpoints SET (autovacuum_enabled = false);",
    )
    .execute(&pool)
    .await?;
    let posts = (rows / per_post).max(1);
    let total = posts * per_post;
    let first: i64 = sqlx::query_scalar(
        "WITH p AS (INSERT INTO posts (title, body)
                      SELECT 'post ' || g, 'body of the post' FROM generate_series(1, $1) g
                      RETURNING id)
         SELECT min(id) FROM p",
    )
    .bind(i64::try_from(posts)?)
    .fetch_one(&pool)
    .await?;
    let slots = ["bench_hot_a", "bench_hot_d"];
    for slot in slots {
        create_slot(&pool, slot).await?;
    }
    eprintln!("writing {total} comment inserts over {posts} posts ({per_post} each)...");
    let started = Instant::now();
    let last = write_comments(&pool, first, posts, total).await?;
    eprintln!("  written in {:.1} s", started.elapsed().as_secs_f64());

    let max = Duration::from_secs(args.max_seconds);
    let mut drains = Vec::new();
    let mut checks = Vec::new();
    let mut cmd = recvlogical(cluster, &url, slots[0]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    eprintln!("draining (a) pg_recvlogical...");
    let a = drain(
        &pool,
        "(a) pg_recvlogical -> /dev/null",
        slots[0],
        &last,
        total,
        cmd,
        max,
    );
    drains.push(a.await?);
    let log_path = dir.join(format!("hot-{per_post}-{total}.log"));
    let mut cmd = streamex_command(&args.wrap);
    // The posts are there before the slots: streamed, not backfilled.
    let config_path = dir.join("hot-blog.toml");
    std::fs::write(&config_path, streamed_blog_config(args.partitions)?)?;
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("STREAMEX_DATABASE_URL", &url)
        .env("STREAMEX_SLOT", slots[1])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    let label = "(d) run: blog operators, pg status";
    eprintln!("draining {label}...");
    let d = drain(&pool, label, slots[1], &last, total, cmd, max).await?;
    eprintln!(
        "  {:.2} s, {:.0} rows/s ({:.2} x (a))",
        d.seconds,
        d.events / d.seconds,
        (d.events / d.seconds) / (drains[0].events / drains[0].seconds)
    );
    drains.push(d);
    let recomputes = recomputes(&pool).await?;
    let what = format!(
        "{label}, {} backlog, {per_post} comments per post",
        if hot { "hot" } else { "sweep" }
    );
    checks.push(check_derived(&pool, &what).await?);
    let log = std::fs::read_to_string(&log_path)?;
    if log.contains("ERROR") || log.contains("panicked") {
        checks.push(format!("{what}: errors in its log:\n{}", tail(&log, 10)));
    }

    for slot in slots {
        drop_slot(&pool, slot).await?;
    }
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(admin)
        .await?;
    let shape = Shape {
        hot,
        posts,
        per_post,
        drains,
        recomputes,
    };
    Ok((shape, checks))
}

/// Inserts `total` comments dealt round-robin over the `posts` posts from id `first`, 1,000 to
/// a transaction; returns an LSN between the last insert and the last commit record.
async fn write_comments(
    pool: &PgPool,
    first: i64,
    posts: u64,
    total: u64,
) -> anyhow::Result<String> {
    let mut last = String::new();
    for start in (0..total).step_by(1000) {
        let end = (start + 1000).min(total);
        let mut tx = pool.begin().await?;
        let n = sqlx::query(
            "INSERT INTO comments (post_id, body)
               SELECT $1 + g % $2, 'a comment' FROM generate_series($3, $4) g",
        )
        .bind(first)
        .bind(i64::try_from(posts)?)
        .bind(i64::try_from(start)?)
        .bind(i64::try_from(end - 1)?)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != end - start {
            bail!(
                "a backlog transaction inserted {n} comments, not {}",
                end - start
            );
        }
        last = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(last)
}

/// Rows written to `post_with_comments_counts` (inserted or updated: one per recompute), once
/// the service's backends are gone (they report their statistics as they exit).
async fn recomputes(pool: &PgPool) -> anyhow::Result<Option<i64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut previous = None;
    loop {
        let (others, written): (i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND backend_type = 'client backend'
                        AND application_name <> $1),
                    (SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables
                      WHERE relid = 'post_with_comments_counts'::regclass)",
        )
        .bind(BENCH_APP)
        .fetch_one(pool)
        .await?;
        // Settled: no other backend left, and the same figure twice in a row.
        if (others == 0 && previous == Some(written)) || Instant::now() >= deadline {
            return Ok(written);
        }
        previous = (others == 0).then_some(written);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Drops a slot once its consumer's walsender has let go of it (at most 10 s).
async fn drop_slot(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let result = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await;
        match result {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Records, for each comment insert, its commit LSN, commit time and when it arrived.
struct Recorder {
    seen: Arc<Mutex<Vec<(u64, i64, i64)>>>,
}

impl Operator for Recorder {
    fn name(&self) -> &str {
        "bench_recorder"
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::only("comments", &[EventType::Insert])]
    }

    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn handle(&self, event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let now = now_micros();
        self.seen
            .lock()
            .expect("not poisoned")
            .push((event.commit_lsn.0, event.timestamp, now));
        Ok(())
    }
}

fn now_micros() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Steady single-row load with the service in-process; one table row and a note.
async fn latency_run(
    pool: &PgPool,
    url: &str,
    args: &Args,
    blog: bool,
    rate: u64,
) -> anyhow::Result<(String, String)> {
    let slot = if blog { "bench_lat_d" } else { "bench_lat_c" };
    let label = if blog {
        "(d) blog operators, pg status"
    } else {
        "(c) counting operator, memory status"
    };
    eprintln!("latency {label}, {rate} commits/s...");
    reset_derived(pool).await?;
    let env = [
        ("STREAMEX_DATABASE_URL".to_owned(), url.to_owned()),
        ("STREAMEX_SLOT".to_owned(), slot.to_owned()),
    ];
    let config = if blog {
        Config::parse(BLOG_CONFIG, "config/streamex.toml", env)?
    } else {
        let text = format!(
            "database_url = {url:?}\nslot = {slot:?}\ntables = [\"posts\", \"comments\"]\n\
             [process_status]\nbackend = \"memory\"\n"
        );
        Config::parse(&text, "latency.toml", env)?
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pubsub = PubSub::new();
    let mut processed_rx = pubsub.subscribe_processed(1 << 20);
    let processed = Arc::new(Mutex::new(Vec::<(u64, i64)>::new()));
    let listener = tokio::spawn({
        let processed = processed.clone();
        async move {
            while let Ok(notice) = processed_rx.recv().await {
                let now = now_micros();
                processed
                    .lock()
                    .expect("not poisoned")
                    .push((notice.position.commit_lsn.0, now));
            }
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The configured status backend: PostgreSQL for the blog, memory for the counting run.
    let service = streamex::Service::builder()
        .config(config)
        .registry(streamex::operators::registry())
        .backfill(false)
        .operator(Recorder { seen: seen.clone() })
        .pubsub(pubsub)
        .build()
        .await?;
    let service = tokio::spawn(service.run(async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(1)).await; // let it connect and start streaming

    let (written, elapsed) = steady_load(pool, url, rate, args.latency_seconds).await?;
    let achieved = written as f64 / elapsed;
    // Let the service catch up (at most 120 s), then stop it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last_seen = {
            let seen = seen.lock().expect("not poisoned");
            (seen.len() as u64 >= written).then(|| seen.iter().map(|s| s.0).max().unwrap_or(0))
        };
        let caught_up = last_seen.is_some_and(|lsn| {
            processed
                .lock()
                .expect("not poisoned")
                .iter()
                .any(|p| p.0 >= lsn)
        });
        if caught_up || Instant::now() >= deadline || service.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    service.await??;
    listener.abort();
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(pool)
        .await?;

    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    let mut processed = std::mem::take(&mut *processed.lock().expect("not poisoned"));
    processed.sort_unstable();
    if let Some(dir) = std::env::var_os("PIPELINE_LATENCY_DUMP") {
        // commit time, delivered, processed (µs since the epoch) for a closer look at outliers.
        let mut csv = String::from("commit_us,delivered_us,processed_us\n");
        for (lsn, commit, at) in &seen {
            let i = processed.partition_point(|p| p.0 < *lsn);
            let done = processed.get(i).map_or(-1, |p| p.1);
            let _ = writeln!(csv, "{commit},{at},{done}");
        }
        std::fs::write(
            Path::new(&dir).join(format!("latency-{slot}-{rate}.csv")),
            csv,
        )?;
    }
    let mut delivered: Vec<i64> = seen.iter().map(|s| s.2 - s.1).collect();
    // Each commit is processed at the first notice covering its LSN (notices come in LSN order).
    let mut done: Vec<i64> = Vec::new();
    let mut done_at: Vec<(i64, i64)> = Vec::new();
    let mut missing = 0;
    for (lsn, commit, _) in &seen {
        let i = processed.partition_point(|p| p.0 < *lsn);
        match processed.get(i) {
            Some(p) => {
                done.push(p.1 - commit);
                done_at.push((*commit, p.1 - commit));
            }
            None => missing += 1,
        }
    }
    // Whether latency climbs over the run: processed p99 of the commits of its first and of
    // its last 20 s (a third of the run, when shorter).
    let (climb_first, climb_last) = {
        let first = done_at.iter().map(|d| d.0).min().unwrap_or(0);
        let last = done_at.iter().map(|d| d.0).max().unwrap_or(0);
        let window = ((last - first) / 3).min(20_000_000);
        let p99 = |from: i64, to: i64| {
            let mut values: Vec<i64> = done_at
                .iter()
                .filter(|d| d.0 >= from && d.0 < to)
                .map(|d| d.1)
                .collect();
            percentiles(&mut values)
                .split(" | ")
                .nth(1)
                .unwrap_or("-")
                .to_owned()
        };
        (p99(first, first + window), p99(last - window, last + 1))
    };
    let unseen = written.saturating_sub(seen.len() as u64) + missing;
    let line = format!(
        "| {label} | {rate} | {achieved:.0} | {} | {} | {} | {climb_first} | {climb_last} |",
        written,
        percentiles(&mut delivered),
        percentiles(&mut done),
    );
    let mut note = String::new();
    if achieved < rate as f64 * 0.95 {
        let _ = writeln!(
            note,
            "- {label}: the writers reached {achieved:.0} transactions/s, below the {} asked \
             for (the writers, the server and the service share the machine's cores).",
            rate
        );
    }
    if unseen > 0 {
        let _ = writeln!(
            note,
            "- **{label}: {unseen} of {written} commits not processed within 120 s after the load \
             ended** (the service cannot keep up with this rate)."
        );
    }
    Ok((line, note))
}

/// "p50 / p99 / max" in milliseconds.
fn percentiles(values: &mut [i64]) -> String {
    if values.is_empty() {
        return "- | - | -".to_owned();
    }
    values.sort_unstable();
    // Nearest rank: the smallest value with at least q of the values at or below it.
    let at = |per_mille: usize| {
        let n = values.len();
        let rank = (n * per_mille).div_ceil(1000).clamp(1, n);
        values[rank - 1] as f64 / 1000.0
    };
    format!(
        "{:.1} | {:.1} | {:.1}",
        at(500),
        at(990),
        values[values.len() - 1] as f64 / 1000.0
    )
}

/// Inserts single-row comments at `rate` transactions/s for `seconds` from 16 writer tasks on
/// their own runtime; returns how many were written and how long it took.
async fn steady_load(
    pool: &PgPool,
    url: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(u64, f64)> {
    let max_post: i64 = sqlx::query_scalar("SELECT max(id) FROM posts")
        .fetch_one(pool)
        .await?;
    let posts = max_post.clamp(1, 1000);
    let url = url.to_owned();
    let handle = std::thread::spawn(move || -> anyhow::Result<(u64, f64)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // A pool of this runtime: connections must not outlive the runtime that drives them.
        runtime.block_on(async move {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .connect(&url)
                .await?;
            let ticket = Arc::new(AtomicU64::new(0));
            let written = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let start = tokio::time::Instant::now();
            let end = start + Duration::from_secs(seconds);
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (pool, ticket, written, stop) =
                    (pool.clone(), ticket.clone(), written.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let k = ticket.fetch_add(1, Ordering::Relaxed);
                        let at = start + period.mul_f64(k as f64);
                        if at >= end {
                            break;
                        }
                        tokio::time::sleep_until(at).await;
                        let post = 1 + i64::try_from(k)? % posts;
                        sqlx::query("INSERT INTO comments (post_id, body) VALUES ($1, 'live')")
                            .bind(post)
                            .execute(&pool)
                            .await?;
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await??;
            }
            stop.store(true, Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            pool.close().await;
            Ok((written.load(Ordering::Relaxed), elapsed))
        })
    });
    tokio::task::spawn_blocking(move || handle.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
}

async fn huge_transaction(
    pool: &PgPool,
    url: &str,
    configs: &Configs,
    args: &Args,
) -> anyhow::Result<Drain> {
    let slot = "bench_huge";
    create_slot(pool, slot).await?;
    reset_derived(pool).await?;
    let posts: i64 = sqlx::query_scalar("SELECT max(id) FROM posts")
        .fetch_one(pool)
        .await?;
    eprintln!("writing one transaction of {} inserts...", args.huge_rows);
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "INSERT INTO comments (post_id, body)
           SELECT 1 + g % $2, 'one of many' FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(args.huge_rows)?)
    .bind(posts.max(1))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let last: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut cmd = streamex_command(&args.wrap);
    cmd.arg("run")
        .arg("--config")
        .arg(&configs.count)
        .env("STREAMEX_DATABASE_URL", url)
        .env("STREAMEX_SLOT", slot)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    eprintln!("draining the huge transaction...");
    let max = Duration::from_secs(args.max_seconds);
    let d = drain(
        pool,
        "(c) run: count_events, memory status",
        slot,
        &last,
        n,
        cmd,
        max,
    )
    .await?;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(pool)
        .await?;
    Ok(d)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The hot-aggregate section: one line per backlog and consumer.
fn render_shapes(s: &mut String, r: &Report, args: &Args) {
    let list: Vec<String> = args.comments_per_post.iter().map(u64::to_string).collect();
    let _ = writeln!(
        s,
        "\n## Hot aggregates\n\n\
         `cargo bench --bench pipeline -- --hot-rows {} --sweep-rows {} --comments-per-post {}` \
         (this section's options)\n\n\
         Backlogs of comment inserts only, in transactions of 1,000, dealt round-robin over \
         posts written before the slots were created, so that each post ends with the given \
         number of comments: the *hot* backlog ({HOT_COMMENTS_PER_POST} comments per post), \
         then a sweep over comments per post at a fixed number of rows. The more comments per \
         post, the fewer posts a transaction touches (each touches min(posts, 1,000)) and the \
         more comments each recompute of the declarative operator `post_with_comments_counts` \
         counts. Each backlog is written to a database of its own whose tables all have \
         **autovacuum off** (`ALTER TABLE ... SET (autovacuum_enabled = false)`), so the \
         figures do not depend on when autovacuum runs (nor is a visibility map ever set: each \
         `count(*)` visits the heap for every comment it counts). (a) is `pg_recvlogical`, \
         (d) `streamex run --config config/streamex.toml` (both blog operators, process \
         status in PostgreSQL), each from its own slot; after (d) the derived tables are \
         checked. *CPU s (server)*: every server process, the walsender and the service's \
         backends included. *Recomputes*: rows written to `post_with_comments_counts` \
         (`n_tup_ins + n_tup_upd` in `pg_stat_user_tables`), one per recompute.\n\n\
         | backlog | comments per post | posts | consumer | rows | seconds | rows/s | vs (a) | CPU s (consumer) | CPU s (server) | peak RSS MiB | recomputes | rows per recompute |\n\
         | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        args.hot_rows,
        args.sweep_rows,
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(",")
        },
    );
    for shape in &r.shapes {
        let base = shape
            .drains
            .iter()
            .find(|d| d.label.starts_with("(a)"))
            .map(|d| d.events / d.seconds);
        for d in &shape.drains {
            let rate = d.events / d.seconds;
            let (recomputes, per) = match (d.label.starts_with("(d)"), shape.recomputes) {
                (true, Some(n)) if n > 0 => (n.to_string(), format!("{:.1}", d.events / n as f64)),
                (true, Some(n)) => (n.to_string(), "-".to_owned()),
                _ => ("-".to_owned(), "-".to_owned()),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {}{} | {:.0} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1} | {} | {} |",
                if shape.hot { "hot" } else { "sweep" },
                shape.per_post,
                shape.posts,
                d.label,
                if d.partial {
                    " (stopped at --max-seconds; rows estimated from the WAL confirmed)"
                } else {
                    ""
                },
                d.events,
                d.seconds,
                rate,
                base.map_or("-".to_owned(), |b| format!("{:.2}", rate / b)),
                d.cpu,
                d.server_cpu.map_or("-".to_owned(), |c| format!("{c:.2}")),
                d.rss_kib as f64 / 1024.0,
                recomputes,
                per,
            );
        }
    }
    for check in &r.shape_checks {
        let _ = writeln!(s, "\n{check}");
    }
}

fn render(r: &Report, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# streamex pipeline benchmark\n");
    let _ = writeln!(
        s,
        "`cargo bench --bench pipeline -- --rows {} --latency-seconds {} --rate {} --huge-rows {}{}`\n",
        args.rows,
        args.latency_seconds,
        args.rates
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.huge_rows,
        if args.skip_latency {
            " --skip-latency"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "Machine: {}\n", r.machine);
    if !r.drains.is_empty() {
        let _ = writeln!(s, "## Drain a backlog\n\n{}\n", r.backlog_note);
        let _ = writeln!(
            s,
            "| consumer | events | seconds | events/s | vs (a) | CPU s (consumer) | CPU s (walsender) | peak RSS MiB |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
    }
    let base = r
        .drains
        .iter()
        .find(|d| d.label.starts_with("(a)"))
        .map(|d| d.events / d.seconds);
    for d in &r.drains {
        let rate = d.events / d.seconds;
        let _ = writeln!(
            s,
            "| {}{} | {:.0} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1} |",
            d.label,
            if d.partial {
                " (stopped at --max-seconds; events estimated from the WAL confirmed)"
            } else {
                ""
            },
            d.events,
            d.seconds,
            rate,
            base.map_or("-".to_owned(), |b| format!("{:.2}", rate / b)),
            d.cpu,
            d.walsender_cpu
                .map_or("-".to_owned(), |c| format!("{c:.2}")),
            d.rss_kib as f64 / 1024.0
        );
    }
    for check in &r.checks {
        let _ = writeln!(s, "\n{check}");
    }
    if !r.backfill.is_empty() {
        let _ = writeln!(
            s,
            "\n## Backfill\n\n\
             `cargo bench --bench pipeline -- --backfill-rows {}` (this section's option)\n\n\
             Comments over a tenth as many posts, all there before any slot; *rows* counts both \
             tables. The reference is `COPY posts TO STDOUT` then `COPY comments TO STDOUT`, \
             read to the end over one connection. Each `streamex run` backfills from a slot of \
             its own and is timed from the start of its process (connecting, setting up and the \
             snapshot included) until every operator's checkpoint is stored, that is, its \
             backfill committed.\n\n\
             | reader | rows | seconds | rows/s | vs COPY | notes |\n\
             | --- | ---: | ---: | ---: | ---: | --- |",
            args.backfill_rows
        );
        for line in &r.backfill {
            let _ = writeln!(s, "{line}");
        }
    }
    if !r.shapes.is_empty() || !r.shape_checks.is_empty() {
        render_shapes(&mut s, r, args);
    }
    s.push_str(&r.workers);
    s.push_str(&r.instructions);
    if !r.latency.is_empty() {
        let _ = writeln!(
            s,
            "\n## Latency under a steady load\n\nSingle-row comment inserts for {} s; \
             milliseconds from the commit (the server's commit timestamp in the WAL) to \
             *delivered* (an operator has the event) and *processed* (every operator done and \
             process status stored, the `EntityProcessed` notice); *first* and *last*: the \
             processed p99 of the commits of the run's first and last 20 s (a third of the run \
             when shorter), which tells whether latency climbs.\n\n\
             | service | target tx/s | achieved tx/s | commits | delivered p50 | p99 | max | processed p50 | p99 | max | first p99 | last p99 |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            args.latency_seconds
        );
        for line in &r.latency {
            let _ = writeln!(s, "{line}");
        }
        if !r.latency_note.is_empty() {
            let _ = write!(s, "\n{}", r.latency_note);
        }
    }
    if let Some((rows, d)) = &r.huge {
        let _ = writeln!(
            s,
            "\n## One huge transaction\n\nOne transaction of {rows} comment inserts, drained by \
             {}.\n\n| events | seconds | events/s | CPU s | peak RSS MiB |\n| ---: | ---: | ---: | ---: | ---: |\n\
             | {:.0}{} | {:.2} | {:.0} | {:.2} | {:.1} |",
            d.label,
            d.events,
            if d.partial { " (partial)" } else { "" },
            d.seconds,
            d.events / d.seconds,
            d.cpu,
            d.rss_kib as f64 / 1024.0
        );
    }
    s
}
