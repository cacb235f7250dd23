//! `payguard bench scale`: what many instances and the Redis lock cost or buy.
//!
//! The same duplicate storm (every copy of an order sent to a different
//! instance) against 1 and N `payguard serve` processes on one PostgreSQL, each
//! count with and without `--redis`, in one run, each configuration on a fresh
//! database. Prints throughput, latency, 503s and unanswered requests, and each
//! row's ratio to the same instance count without Redis (the baseline measured
//! in the same run). Fails when any storm has a violation.
//!
//! The instances are this binary's `serve`, started as child processes on
//! loopback port 0, so the numbers include real HTTP and real process boundaries.

use crate::storm::{storm, Report, StormArgs};
use anyhow::{bail, Context};
use payguard::store::postgres::ScratchDb;
use serde::Serialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long an instance may take to start before the bench gives up.
const INSTANCE_START_MS_MAX: u64 = 30_000;
/// PostgreSQL connections per instance, so the largest run fits the server's
/// default `max_connections` (100) with room for the storm's audit.
const INSTANCE_PG_POOL_MAX: usize = 12;
/// Largest instance count accepted (each is a process with its own pool).
const INSTANCES_MAX: usize = 6;

#[derive(clap::Args, Debug)]
pub struct ScaleBenchArgs {
    /// PostgreSQL server to create scratch databases on (any database name; a
    /// fresh one is created per configuration and dropped after).
    #[arg(long, env = "PAYGUARD_BENCH_POSTGRES_URL")]
    pub db: Option<String>,
    /// Redis for the `--redis` rows.
    #[arg(long, env = "PAYGUARD_BENCH_REDIS_URL")]
    pub redis: Option<String>,
    /// Instance counts to compare, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    pub instances: Vec<usize>,
    /// Orders per storm [default: 600, --quick: 60].
    #[arg(long)]
    pub orders: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub dup: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 12)]
    pub seed: u64,
    /// Runs of each configuration, interleaved (1, 1+Redis, N, N+Redis, then
    /// again); each row is the run with the median throughput [default: 3,
    /// --quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Small sizes for a smoke run.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    instances: usize,
    redis: bool,
    deducts_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    unavailable_503: usize,
    no_answer: usize,
    replays: usize,
    violations: usize,
    /// What reached PostgreSQL: transactions committed and rolled back (a
    /// rollback is a batch retried after a deadlock or serialisation failure, or a
    /// failed one), and deadlocks detected, from `pg_stat_database`.
    pg: PgWork,
    /// Orders left out of a batch because another instance held their lock
    /// (`lock_wait` log events), each later run again.
    lock_waits: usize,
    /// Ops the committed state answered without taking their lock, after a
    /// wait or on a settled hint (`settled_without_lock` log events).
    settled_without_lock: usize,
    /// Throughput over the same instance count without Redis.
    over_no_redis: Option<f64>,
}

#[derive(Serialize, Default, Clone, Copy)]
struct PgWork {
    xact_commit: i64,
    xact_rollback: i64,
    deadlocks: i64,
}

fn row(instances: usize, redis: bool, r: &Report) -> Row {
    let l = r.latency.get("deduct").cloned().unwrap_or_default();
    Row {
        instances,
        redis,
        deducts_per_sec: r.deducts_per_sec,
        p50_ms: l.p50_ms,
        p99_ms: l.p99_ms,
        max_ms: l.max_ms,
        unavailable_503: r.unavailable_503,
        no_answer: r.no_answer,
        replays: r.replays,
        violations: r.violations.len(),
        pg: PgWork::default(),
        lock_waits: 0,
        settled_without_lock: 0,
        over_no_redis: None,
    }
}

/// A `payguard serve` child process; killed if the bench fails part-way.
struct Instance {
    child: Child,
    url: String,
}

impl Instance {
    fn start(
        log: &Path,
        name: &str,
        db: &str,
        redis: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--instance-id", name, "--db", db])
            .args(["--pg-pool-max", &INSTANCE_PG_POOL_MAX.to_string()]);
        if let Some((url, prefix)) = redis {
            cmd.args(["--redis", url, "--redis-prefix", prefix]);
        }
        let child = cmd
            .stdout(std::fs::File::create(log)?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting payguard serve")?;
        let mut instance = Instance {
            child,
            url: String::new(),
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(INSTANCE_START_MS_MAX) {
            if let Some(listen) = started_on(log)? {
                instance.url = format!("http://{listen}");
                return Ok(instance);
            }
            if let Ok(Some(status)) = instance.child.try_wait() {
                bail!(
                    "{name} exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{name} did not start within {INSTANCE_START_MS_MAX} ms")
    }

    /// SIGTERM, then waits for the drain.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address from the log's `server_started` line, once it is there.
fn started_on(log: &Path) -> anyhow::Result<Option<String>> {
    let file = std::fs::File::open(log)?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.contains("\"server_started\"") {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            return Ok(v["listen"].as_str().map(str::to_owned));
        }
    }
    Ok(None)
}

struct Plan<'a> {
    args: &'a ScaleBenchArgs,
    base: &'a str,
    redis: &'a str,
    orders: usize,
    dir: PathBuf,
}

/// What one configuration measured.
struct Measured {
    report: Report,
    pg: PgWork,
    lock_waits: usize,
    settled_without_lock: usize,
}

/// The scratch database's work as PostgreSQL counted it (read after every
/// instance exited, which flushes their statistics).
async fn pg_work(scratch: &ScratchDb) -> anyhow::Result<PgWork> {
    let client = scratch.connect().await?;
    let row = client
        .query_one(
            "SELECT xact_commit, xact_rollback, deadlocks FROM pg_stat_database WHERE datname = $1",
            &[&scratch.name],
        )
        .await?;
    drop(client);
    Ok(PgWork {
        xact_commit: row.get(0),
        xact_rollback: row.get(1),
        deadlocks: row.get(2),
    })
}

/// Numbers each configuration's Redis key prefix.
static PREFIX_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One configuration: a fresh database, `n` instances, the storm, teardown.
async fn measure(plan: &Plan<'_>, n: usize, with_redis: bool) -> anyhow::Result<Measured> {
    let tag = format!("scale{n}{}", if with_redis { "r" } else { "" });
    let scratch = ScratchDb::create(plan.base, &format!("pg_bench_{tag}"))
        .await
        .context("creating a scratch database")?;
    let db = scratch_url(plan.base, &scratch.name);
    // Unique per configuration and round: a settled hint left by one round
    // must not meet the same order ids in the next round's fresh database.
    let prefix = format!(
        "pgbench-{}-{tag}-{}",
        std::process::id(),
        PREFIX_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut instances = Vec::with_capacity(n);
    let mut logs = Vec::with_capacity(n);
    for i in 1..=n {
        let name = format!("{tag}-{i}");
        let log = plan.dir.join(format!("{name}.log"));
        let redis = with_redis.then_some((plan.redis, prefix.as_str()));
        instances.push(Instance::start(&log, &name, &db, redis)?);
        logs.push(log);
    }
    let report = storm(&StormArgs {
        orders: plan.orders,
        dup: plan.args.dup,
        concurrency: plan.args.concurrency,
        refund_ratio: 0.0,
        seed: plan.args.seed,
        run_tag: Some(tag.clone()),
        ..StormArgs::in_process(
            instances.iter().map(|i| i.url.clone()).collect(),
            db.clone(),
        )
    })
    .await;
    for i in instances {
        i.stop();
    }
    let texts: Vec<String> = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    let count = |event: &str| -> usize {
        let quoted = format!("\"{event}\"");
        texts.iter().map(|t| t.matches(&quoted).count()).sum()
    };
    let (lock_waits, settled_without_lock) = (count("lock_wait"), count("settled_without_lock"));
    let pg = pg_work(&scratch).await;
    scratch
        .drop_db()
        .await
        .context("dropping the scratch database")?;
    Ok(Measured {
        report: report?,
        pg: pg.context("reading pg_stat_database")?,
        lock_waits,
        settled_without_lock,
    })
}

/// `base` with its database name replaced by `name`.
fn scratch_url(base: &str, name: &str) -> String {
    match base.rsplit_once('/') {
        Some((server, _)) if server.contains("://") && !server.ends_with('/') => {
            format!("{server}/{name}")
        }
        _ => format!("{}/{name}", base.trim_end_matches('/')),
    }
}

pub fn run(args: ScaleBenchArgs) -> anyhow::Result<ExitCode> {
    let (Some(base), Some(redis)) = (args.db.clone(), args.redis.clone()) else {
        bail!("bench scale needs --db postgres://… and --redis redis://… (or PAYGUARD_BENCH_POSTGRES_URL and PAYGUARD_BENCH_REDIS_URL)");
    };
    if args.instances.is_empty() || args.instances.iter().any(|&n| n == 0 || n > INSTANCES_MAX) {
        bail!("--instances takes counts from 1 to {INSTANCES_MAX}");
    }
    let plan = Plan {
        args: &args,
        base: &base,
        redis: &redis,
        orders: args.orders.unwrap_or(if args.quick { 60 } else { 600 }),
        dir: tempfile::tempdir()?.keep(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let configs: Vec<(usize, bool)> = args
        .instances
        .iter()
        .flat_map(|&n| [(n, false), (n, true)])
        .collect();
    let mut runs: Vec<Vec<Row>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, &(n, with_redis)) in configs.iter().enumerate() {
            let m = rt.block_on(measure(&plan, n, with_redis))?;
            eprintln!(
                "  round {round}: {n} instance(s){}: {:.0} deducts/s, {} × 503",
                if with_redis { " + Redis" } else { "" },
                m.report.deducts_per_sec,
                m.report.unavailable_503
            );
            let mut r = row(n, with_redis, &m.report);
            r.pg = m.pg;
            r.lock_waits = m.lock_waits;
            r.settled_without_lock = m.settled_without_lock;
            runs[i].push(r);
        }
    }
    let mut rows: Vec<Row> = runs.into_iter().map(median_run).collect();
    for i in 0..rows.len() {
        if rows[i].redis {
            let base = rows
                .iter()
                .find(|b| b.instances == rows[i].instances && !b.redis)
                .map(|b| b.deducts_per_sec);
            rows[i].over_no_redis = base.map(|b| rows[i].deducts_per_sec / b.max(1e-9));
        }
    }
    let _ = std::fs::remove_dir_all(&plan.dir);
    print(&args, plan.orders, rounds, &rows)?;
    let clean = rows
        .iter()
        .all(|r| r.violations == 0 && r.unavailable_503 == 0 && r.no_answer == 0);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The run with the median throughput, carrying the worst of every run's 503s,
/// unanswered requests and violations (a clean median must not hide a bad run).
fn median_run(mut runs: Vec<Row>) -> Row {
    let unavailable = runs.iter().map(|r| r.unavailable_503).max().unwrap_or(0);
    let no_answer = runs.iter().map(|r| r.no_answer).max().unwrap_or(0);
    let violations = runs.iter().map(|r| r.violations).max().unwrap_or(0);
    runs.sort_by(|a, b| a.deducts_per_sec.total_cmp(&b.deducts_per_sec));
    let mut row = runs.swap_remove(runs.len() / 2);
    row.unavailable_503 = unavailable;
    row.no_answer = no_answer;
    row.violations = violations;
    row
}

fn print(args: &ScaleBenchArgs, orders: usize, rounds: usize, rows: &[Row]) -> anyhow::Result<()> {
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "orders": orders, "dup": args.dup, "concurrency": args.concurrency,
                "seed": args.seed, "rounds": rounds, "rows": rows,
            }))?
        );
        return Ok(());
    }
    crate::outln!(
        "scale bench: {orders} orders × {} duplicates (each copy to another instance), {} in flight, one PostgreSQL; median of {rounds} interleaved runs (503, unanswered, violations: the worst run)",
        args.dup, args.concurrency
    );
    crate::outln!();
    crate::outln!("| instances | Redis lock | deducts/s | p50 ms | p99 ms | max ms | 503 | unanswered | violations | PG commits | PG rollbacks | PG deadlocks | lock waits | settled without lock | × no Redis |");
    crate::outln!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        crate::outln!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.instances,
            if r.redis { "yes" } else { "no" },
            r.deducts_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.unavailable_503,
            r.no_answer,
            r.violations,
            r.pg.xact_commit,
            r.pg.xact_rollback,
            r.pg.deadlocks,
            r.lock_waits,
            r.settled_without_lock,
            r.over_no_redis
                .map_or_else(|| "1.00 (baseline)".to_owned(), |x| format!("{x:.2}")),
        );
    }
    crate::outln!();
    crate::outln!("targets: with Redis ≥ 0.8× without, deduct p99 < 100 ms, 0 × 503");
    Ok(())
}
