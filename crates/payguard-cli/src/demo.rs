//! `payguard demo`: the incident's night and its fix, side by side, no setup.
//!
//! Starts `--guard naive` and `--guard full` in this process, each on its own
//! temporary SQLite file, storms both with the same seed, and prints what each
//! did to the money: double-charged orders, money lost, throughput, violations.

use crate::storm::{self, Report, StormArgs};
use payguard::engine::Guard;
use payguard::store::sqlite::SqliteConfig;
use payguard::EngineConfig;
use payguard_server::app::{self, AppSpec, Database, Running};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seed of the storm (both sides get the same one).
    #[arg(long, env = "PAYGUARD_SEED", default_value_t = 2024)]
    pub seed: u64,
    /// Orders per side.
    #[arg(long, env = "PAYGUARD_ORDERS", default_value_t = 600)]
    pub orders: usize,
    /// Copies of each deduct.
    #[arg(long, env = "PAYGUARD_DUP", default_value_t = 8)]
    pub dup: usize,
    /// Requests in flight at once.
    #[arg(long, env = "PAYGUARD_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// The naive side's pause between check and act (ms).
    #[arg(long, env = "PAYGUARD_NAIVE_GAP_MS", default_value_t = crate::serve::DEFAULT_NAIVE_GAP_MS)]
    pub naive_gap_ms: u64,
    /// Keep the two databases (and print where) instead of deleting them.
    #[arg(long)]
    pub keep: bool,
    /// Print both reports as JSON.
    #[arg(long, env = "PAYGUARD_JSON")]
    pub json: bool,
}

/// A payguard server running inside this process on port 0, on its own SQLite
/// file, assembled by the composition root ([`payguard_server::app`]).
pub struct LocalServer {
    pub url: String,
    running: Running,
}

impl LocalServer {
    pub async fn start(path: &Path, guard: Guard, instance: &str) -> anyhow::Result<Self> {
        let spec = AppSpec::new(
            Database::Sqlite(SqliteConfig::new(path)),
            EngineConfig {
                guard,
                instance_id: instance.to_owned(),
                ..EngineConfig::default()
            },
        );
        Self::start_spec(spec).await
    }

    /// A server on 127.0.0.1:0 assembled from `spec` by the composition root.
    pub async fn start_spec(spec: AppSpec) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = app::build(spec).await?.spawn(listener)?;
        Ok(LocalServer {
            url: running.url.clone(),
            running,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.running.stop().await
    }
}

async fn side(
    args: &DemoArgs,
    dir: &Path,
    name: &str,
    guard: Guard,
) -> anyhow::Result<(Report, PathBuf)> {
    let path = dir.join(format!("{name}.db"));
    let server = LocalServer::start(&path, guard, &format!("demo-{name}")).await?;
    let storm_args = StormArgs {
        orders: args.orders,
        dup: args.dup,
        concurrency: args.concurrency,
        duration: 120,
        seed: args.seed,
        run_tag: Some(format!("demo{}", args.seed)),
        ..StormArgs::in_process(
            vec![server.url.clone()],
            format!("sqlite://{}", path.display()),
        )
    };
    let report = storm::storm(&storm_args).await;
    server.stop().await?;
    Ok((report?, path))
}

/// The two sides' reports side by side, and where the databases are (`--keep`).
fn print_table(
    args: &DemoArgs,
    naive: &Report,
    full: &Report,
    naive_db: &Path,
    full_db: PathBuf,
    dir: tempfile::TempDir,
) {
    let yuan = storm::yuan;
    let row = |label: &str, a: String, b: String| crate::outln!("  {label:<28} {a:>22} {b:>22}");
    row("", "naive (the incident)".into(), "full (payguard)".into());
    row(
        "double-charged orders",
        naive.double_charged_orders.to_string(),
        full.double_charged_orders.to_string(),
    );
    row("money lost", yuan(naive.money_lost), yuan(full.money_lost));
    row(
        "deducts/s",
        format!("{:.0}", naive.deducts_per_sec),
        format!("{:.0}", full.deducts_per_sec),
    );
    row(
        "deduct p99 (ms)",
        format!(
            "{:.1}",
            naive.latency.get("deduct").map_or(0.0, |l| l.p99_ms)
        ),
        format!(
            "{:.1}",
            full.latency.get("deduct").map_or(0.0, |l| l.p99_ms)
        ),
    );
    row(
        "replays answered",
        naive.replays.to_string(),
        full.replays.to_string(),
    );
    row(
        "violations",
        naive.violation_count().to_string(),
        full.violation_count().to_string(),
    );
    row(
        "database audit",
        if naive.db_audit_ok == Some(true) {
            "ok"
        } else {
            "FAILED"
        }
        .into(),
        if full.db_audit_ok == Some(true) {
            "ok"
        } else {
            "FAILED"
        }
        .into(),
    );
    crate::outln!();
    if args.keep {
        let kept = dir.keep();
        crate::outln!("databases kept in {}", kept.display());
        crate::outln!(
            "  pay the naive side's victims back once: payguard audit --db sqlite://{} --apply",
            kept.join(naive_db.file_name().unwrap_or_default())
                .display()
        );
        let _ = full_db;
    } else {
        crate::outln!("(run with --keep to keep both databases and repair the naive one with `payguard audit --apply`)");
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    if !args.json {
        crate::outln!(
            "payguard demo: the same storm ({} orders, each deduct sent {} times at once, seed {}) against",
            args.orders, args.dup, args.seed
        );
        crate::outln!(
            "  naive — the incident's code: check a cache, pause {} ms, debit with no condition",
            args.naive_gap_ms
        );
        crate::outln!(
            "  full  — payguard: lanes, single flight, group commit, database constraints"
        );
        crate::outln!();
    }
    let (naive, naive_db) = rt.block_on(side(
        &args,
        dir.path(),
        "naive",
        Guard::Naive {
            gap_ms: args.naive_gap_ms,
        },
    ))?;
    let (full, full_db) = rt.block_on(side(&args, dir.path(), "full", Guard::Full))?;
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"naive": naive, "full": full}))?
        );
    } else {
        print_table(&args, &naive, &full, &naive_db, full_db, dir);
    }
    // The demo succeeds when it shows both: the incident, and its fix holding.
    Ok(
        if naive.double_charged_orders > 0 && full.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}
