//! Section 6 of the pipeline bench, the workers. A backlog of `--worker-rows` comment inserts (1,000 to a transaction, over
//! a thousand posts written before the slot) is published to JetStream by a `streamex run`
//! with `[nats]` and no operator (timed as a drain, like (f)). Then `post_comment_tallies`
//! runs from the stream on `streamex worker` processes: once whole on one worker, then with
//! `partitions = 4` on each count of `--workers`, started together. Each run is timed from
//! the start of the workers until every consumer of the operator (each partition's) has the
//! stream's last message acknowledged (polled every 50 ms), then the workers are stopped with
//! SIGINT; their CPU and peak RSS come from `wait4`, the server's and nats-server's CPU from
//! `/proc`. Between runs the operator's table, its rows in `streamex`'s tables and its
//! consumers are removed, so each run reads the whole stream from its first message. After
//! each run the tallies are compared with the comments.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::TryStreamExt as _;
use sqlx::postgres::PgPoolOptions;

use super::{
    Args, BENCH_APP, NatsServer, create_slot, drain, drop_slot, process_cpu_seconds, reap,
    server_cpu_seconds, streamex_command, tail, try_reap, write_comments,
};

/// The partitions of the shared operator.
const PARTITIONS: u32 = 4;
const SLOT: &str = "bench_w";
const STREAM: &str = "bench_workers";
const OPERATOR: &str = "post_comment_tallies";

/// One run of the operator on workers.
struct Run {
    label: String,
    seconds: f64,
    /// User + system CPU of every worker process.
    cpu: f64,
    server_cpu: Option<f64>,
    nats_cpu: Option<f64>,
    /// The largest peak RSS among the workers.
    rss_kib: i64,
    partial: bool,
}

/// Runs the section; returns its Markdown (table and checks).
pub(super) async fn bench(
    cluster: &streamex::testing::Cluster,
    dir: &Path,
    args: &Args,
    nats_binary: &Path,
) -> anyhow::Result<String> {
    let url = cluster.create_database().await?;
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.application_name(BENCH_APP))
        .await?;
    sqlx::raw_sql(super::SCHEMA).execute(&pool).await?;
    streamex::status::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE PUBLICATION streamex FOR TABLE posts, comments;
         ALTER TABLE comments SET (autovacuum_enabled = false);
         ALTER TABLE post_comment_tallies SET (autovacuum_enabled = false);",
    )
    .execute(&pool)
    .await?;
    let posts: u64 = 1_000;
    let first: i64 = sqlx::query_scalar(
        "WITH p AS (INSERT INTO posts (title, body)
                      SELECT 'post ' || g, 'body' FROM generate_series(1, $1) g RETURNING id)
         SELECT min(id) FROM p",
    )
    .bind(i64::try_from(posts)?)
    .fetch_one(&pool)
    .await?;
    create_slot(&pool, SLOT).await?;
    let rows = args.worker_rows;
    eprintln!("workers: writing {rows} comment inserts over {posts} posts...");
    let last = write_comments(&pool, first, posts, rows).await?;

    let nats = NatsServer::start(nats_binary)?;
    let nats_url = format!("nats://127.0.0.1:{}", nats.port);
    let common = format!(
        "database_url = {url:?}\nslot = {SLOT:?}\npublication = \"streamex\"\n\
         tables = [\"posts\", \"comments\"]\n\n[lock]\nlease = \"5s\"\n\n\
         [nats]\nurl = {nats_url:?}\nstream = {STREAM:?}\nsubject_prefix = \"bench\"\n"
    );
    let publisher = dir.join("workers-publisher.toml");
    std::fs::write(
        &publisher,
        format!("{common}\n[process_status]\nbackend = \"memory\"\n"),
    )?;
    let worker_config = |partitions: u32| {
        let partitions = if partitions > 1 {
            format!("partitions = {partitions}\n")
        } else {
            String::new()
        };
        format!(
            "{common}\n[process_status]\nbackend = \"postgres\"\n\n\
             [[operators]]\nname = {OPERATOR:?}\nbackfill = false\n{partitions}"
        )
    };

    let mut cmd = streamex_command(&args.wrap);
    let log = dir.join("workers-publisher.log");
    cmd.arg("run")
        .arg("--config")
        .arg(&publisher)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let label = "publish: `streamex run`, `[nats]`, no operator";
    eprintln!("workers: {label}...");
    let max = Duration::from_secs(args.max_seconds);
    let published = drain(&pool, label, SLOT, &last, rows, cmd, max).await?;
    drop_slot(&pool, SLOT).await?;
    let client = async_nats::connect(&nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await?;
    let state = stream.info().await?.state.clone();
    let mut checks = Vec::new();
    if state.messages != rows {
        checks.push(format!(
            "**WARNING** the stream holds {} messages for {rows} comment inserts",
            state.messages
        ));
    }
    let last_sequence = state.last_sequence;

    let mut plan = vec![(1, 1)];
    plan.extend(args.workers.iter().map(|&w| (w, PARTITIONS)));
    let mut runs = Vec::new();
    for (workers, partitions) in plan {
        reset(&pool, &stream).await?;
        let config = dir.join(format!("workers-{workers}-{partitions}.toml"));
        std::fs::write(&config, worker_config(partitions))?;
        let label = if partitions == 1 {
            "1 worker, the operator whole".to_owned()
        } else {
            format!(
                "{workers} worker{}, {partitions} partitions",
                if workers == 1 { "" } else { "s" }
            )
        };
        eprintln!("workers: {label}...");
        let logs: Vec<_> = (0..workers)
            .map(|i| dir.join(format!("workers-{workers}-{partitions}-{i}.log")))
            .collect();
        let run = run_workers(
            &pool,
            &mut stream,
            &config,
            &logs,
            label,
            partitions,
            last_sequence,
            nats.child.id(),
            args,
        )
        .await?;
        eprintln!(
            "  {:.2} s, {:.0} rows/s",
            run.seconds,
            rows as f64 / run.seconds
        );
        checks.push(check_tallies(&pool, &run.label).await?);
        for log in &logs {
            let text = std::fs::read_to_string(log)?;
            if text.contains("ERROR") || text.contains("panicked") {
                checks.push(format!(
                    "{}: errors in a worker's log:\n{}",
                    run.label,
                    tail(&text, 10)
                ));
            }
        }
        runs.push(run);
    }
    pool.close().await;
    Ok(render(rows, &published, &runs, &checks, args))
}

/// Starts `logs.len()` workers with `config` and waits until every consumer of the operator's
/// `partitions` has `last_sequence` acknowledged; stops them.
#[allow(clippy::too_many_arguments)]
async fn run_workers(
    pool: &sqlx::PgPool,
    stream: &mut async_nats::jetstream::stream::Stream,
    config: &Path,
    logs: &[std::path::PathBuf],
    label: String,
    partitions: u32,
    last_sequence: u64,
    nats_pid: u32,
    args: &Args,
) -> anyhow::Result<Run> {
    let bases: Vec<String> = if partitions == 1 {
        vec![format!("{SLOT}-{OPERATOR}")]
    } else {
        // `<operator>#<p>/<N>`, '#' and '/' written -23 and -2F in consumer names.
        (0..partitions)
            .map(|p| format!("{SLOT}-{OPERATOR}-23{p}-2F{partitions}"))
            .collect()
    };
    let nats_pid = i32::try_from(nats_pid)?;
    let server_before = server_cpu_seconds(pool).await?;
    let nats_before = process_cpu_seconds(nats_pid);
    let started = Instant::now();
    let mut pids = Vec::new();
    for log in logs {
        let mut cmd: Command = streamex_command(&args.wrap);
        cmd.arg("worker")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        let child = cmd.spawn().context("starting a worker")?;
        pids.push(i32::try_from(child.id())?);
    }
    let max = Duration::from_secs(args.max_seconds);
    let mut partial = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if done(stream, &bases, last_sequence).await? {
            break;
        }
        if started.elapsed() >= max {
            partial = true;
            break;
        }
        for &pid in &pids {
            if let Some(status) = try_reap(pid)? {
                bail!("{label}: a worker exited before the end: {status:?}");
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = server_cpu_seconds(pool)
        .await?
        .zip(server_before)
        .map(|(after, before)| after - before);
    let nats_cpu = process_cpu_seconds(nats_pid)
        .zip(nats_before)
        .map(|(after, before)| after - before);
    for &pid in &pids {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let (mut cpu, mut rss_kib) = (0.0, 0);
    for pid in pids {
        let (c, r) =
            tokio::task::spawn_blocking(move || reap(pid, Duration::from_secs(60))).await??;
        cpu += c;
        rss_kib = rss_kib.max(r);
    }
    Ok(Run {
        label,
        seconds,
        cpu,
        server_cpu,
        nats_cpu,
        rss_kib,
        partial,
    })
}

/// Whether, for each name in `bases`, one of its consumers (`<base>` or `<base>-s<hex>`) has
/// everything through `last_sequence` acknowledged.
async fn done(
    stream: &mut async_nats::jetstream::stream::Stream,
    bases: &[String],
    last_sequence: u64,
) -> anyhow::Result<bool> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    let mut floors = vec![0; bases.len()];
    let mut listing = stream.consumers();
    while let Some(info) = listing.try_next().await? {
        let Some(i) = bases.iter().position(|b| {
            info.name
                .strip_prefix(b.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("-s"))
        }) else {
            continue;
        };
        // A consumer made to start at S has an ack floor of 0 until its first acknowledgement.
        let floor = match info.config.deliver_policy {
            DeliverPolicy::ByStartSequence { start_sequence } => info
                .ack_floor
                .stream_sequence
                .max(start_sequence.saturating_sub(1)),
            _ => info.ack_floor.stream_sequence,
        };
        floors[i] = floors[i].max(floor);
    }
    Ok(floors.iter().all(|&f| f >= last_sequence))
}

/// Removes what a run of the operator left: its table's rows, its rows in every `streamex`
/// table keyed by the slot, and its consumers.
async fn reset(
    pool: &sqlx::PgPool,
    stream: &async_nats::jetstream::stream::Stream,
) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE post_comment_tallies")
        .execute(pool)
        .await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns
          WHERE table_schema = 'streamex' AND column_name = 'slot'",
    )
    .fetch_all(pool)
    .await?;
    for table in tables {
        sqlx::query(&format!("DELETE FROM streamex.{table} WHERE slot = $1"))
            .bind(SLOT)
            .execute(pool)
            .await?;
    }
    let names: Vec<String> = stream.consumer_names().try_collect().await?;
    for name in names {
        stream.delete_consumer(&name).await?;
    }
    Ok(())
}

/// Compares the tallies with the comments; a line saying so.
async fn check_tallies(pool: &sqlx::PgPool, label: &str) -> anyhow::Result<String> {
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM
           (SELECT post_id, count(*)::int AS n FROM comments GROUP BY post_id) e
           FULL JOIN (SELECT * FROM post_comment_tallies WHERE comments <> 0) t USING (post_id)
          WHERE e.n IS DISTINCT FROM t.comments",
    )
    .fetch_one(pool)
    .await?;
    Ok(if wrong == 0 {
        format!("{label}: tallies correct")
    } else {
        format!("**WARNING** {label}: {wrong} wrong rows in post_comment_tallies")
    })
}

fn render(
    rows: u64,
    published: &super::Drain,
    runs: &[Run],
    checks: &[String],
    args: &Args,
) -> String {
    use std::fmt::Write as _;
    let seconds = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
    let mut s = format!(
        "\n## Workers sharing an operator's partitions\n\n\
         `cargo bench --bench pipeline -- --worker-rows {rows} --workers {}` (this section's \
         options)\n\n\
         {rows} comment inserts (1,000 to a transaction, over 1,000 posts), published to \
         JetStream by `streamex run` with `[nats]` and no operator: {:.2} s, {:.0} events/s, \
         {:.2} CPU s, peak RSS {:.1} MiB. Then `post_comment_tallies` (transactional, PostgreSQL \
         process status) runs from the stream on `streamex worker` processes started together, \
         timed until every partition's consumer has the stream's last message acknowledged. \
         Each partition reads every message of the operator's subjects and handles its own \
         rows, so with 4 partitions the stream is read 4 times; *vs whole* compares with the \
         operator whole on one worker.\n\n\
         | workers | seconds | rows/s | vs whole | CPU s (workers) | CPU s (server) | CPU s (nats-server) | peak RSS MiB (largest worker) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        args.workers
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        published.seconds,
        published.events / published.seconds,
        published.cpu,
        published.rss_kib as f64 / 1024.0,
    );
    let whole = runs.first().map(|r| rows as f64 / r.seconds);
    for r in runs {
        let rate = rows as f64 / r.seconds;
        let _ = writeln!(
            s,
            "| {}{} | {:.2} | {rate:.0} | {} | {:.2} | {} | {} | {:.1} |",
            r.label,
            if r.partial {
                " (stopped at --max-seconds)"
            } else {
                ""
            },
            r.seconds,
            whole.map_or("-".to_owned(), |w| format!("{:.2}", rate / w)),
            r.cpu,
            seconds(r.server_cpu),
            seconds(r.nats_cpu),
            r.rss_kib as f64 / 1024.0
        );
    }
    for check in checks {
        let _ = write!(s, "\n{check}\n");
    }
    s
}
