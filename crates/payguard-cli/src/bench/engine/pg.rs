//! `payguard bench engine --db postgres://…`: the engine over the PostgreSQL store,
//! beside `pgbench -N` on the same server in the same run.
//!
//! Why pgbench: it is PostgreSQL's own yardstick for short write transactions, and
//! `-N` (one account update, one select, one history insert per transaction) is
//! close to one un-batched deduct. It runs with `--pgbench-clients` connections
//! (default: the engine's lanes, because the engine never has more than one
//! transaction per lane in flight, so that is the concurrency the database sees).
//! Each engine run gets its own scratch database with the same order ids and
//! amounts as the SQLite runs, and is audited afterwards. By default the orders
//! are spread over as many accounts as pgbench has (1 000 000 at scale 10), so
//! neither side queues on a hot row; `--accounts 1000` measures the engine under
//! the SQLite runs' contention (each account in about two of 2048 in-flight
//! orders, which different lanes' transactions then wait on).

use super::{closed_loop, ms, Payment, RunResult};
use payguard::engine::Guard;
use payguard::store::postgres::{PgConfig, PgStore, ScratchDb};
use payguard::{Engine, Store};
use serde::Serialize;
use std::process::ExitCode;
use std::sync::Arc;

/// pgbench's scale factor (100 000 accounts per unit).
const PGBENCH_SCALE: u32 = 10;
/// The engine runs' default account count: pgbench's at [`PGBENCH_SCALE`].
const PGBENCH_ACCOUNTS: usize = PGBENCH_SCALE as usize * 100_000;
/// pgbench's worker threads (`-j`); the machine this was written on has 2 cores.
const PGBENCH_THREADS: usize = 2;

#[derive(Serialize, Debug)]
struct PgReport {
    orders: usize,
    accounts: usize,
    concurrency: usize,
    lanes: usize,
    cores: usize,
    pgbench_clients: usize,
    pgbench_secs: u64,
    runs: Vec<RunResult>,
    best_engine_ratio: f64,
    /// A two-phase payment's cost as a multiple of a deduct's, same batch_max.
    two_phase_cost: super::TwoPhaseCost,
}

pub(super) fn run(args: &super::EngineBenchArgs, url: &str) -> anyhow::Result<ExitCode> {
    let orders = args
        .orders
        .unwrap_or(if args.quick { 3_000 } else { 100_000 });
    anyhow::ensure!(orders > 0, "--orders must be at least 1");
    anyhow::ensure!(!args.batch_max.is_empty(), "--batch-max needs a value");
    let pgbench_secs = args.pgbench_secs.unwrap_or(if args.quick { 5 } else { 30 });
    let clients = args.lanes.max(1);
    let accounts = args.accounts.unwrap_or(PGBENCH_ACCOUNTS);
    anyhow::ensure!(accounts > 0, "--accounts must be at least 1");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        eprintln!(
            "bench engine (PostgreSQL): {orders} deductions per run on {accounts} accounts, \
             {cores} cores, pgbench -N -c {clients} -j {PGBENCH_THREADS} -T {pgbench_secs}"
        );
        let raw = pgbench(url, clients, pgbench_secs).await?;
        eprintln!("  pgbench: {:.0} tps", raw.ops_per_sec);
        let mut runs = vec![raw.clone()];
        for &bm in &args.batch_max {
            let mut r = engine_run(
                url,
                args,
                Guard::Full,
                orders,
                accounts,
                bm,
                Payment::Deduct,
            )
            .await?;
            r.ratio_to_raw = r.ops_per_sec / raw.ops_per_sec;
            eprintln!("  {}: {:.0} ops/s", r.name, r.ops_per_sec);
            runs.push(r);
        }
        let best_run = runs[1..]
            .iter()
            .max_by(|a, b| a.ratio_to_raw.total_cmp(&b.ratio_to_raw))
            .cloned()
            .expect("at least one engine run");
        let best = best_run.ratio_to_raw;
        let best_bm = args.batch_max[runs[1..]
            .iter()
            .position(|r| r.name == best_run.name)
            .unwrap_or(0)];
        // Rounds of a deduct run and a two-phase run back to back (see
        // `TwoPhaseCost`): the machine's load moves both sides of a round alike.
        let mut pairs = Vec::new();
        for round in 0..args.two_phase_rounds() {
            let mut pair = Vec::new();
            for payment in [Payment::Deduct, Payment::TwoPhase] {
                let mut r =
                    engine_run(url, args, Guard::Full, orders, accounts, best_bm, payment).await?;
                r.ratio_to_raw = r.ops_per_sec / raw.ops_per_sec;
                pair.push(r);
            }
            let (d, t) = (pair.remove(0), pair.remove(0));
            super::print_round(round, &d, &t);
            pairs.push((d, t));
        }
        let two_phase_cost = super::TwoPhaseCost::of(pairs);
        runs.push(two_phase_cost.run.clone());
        // The write-up's fix as written, in the same run: a lock and a locked
        // transaction per request (`SELECT … FOR UPDATE`, re-check, write), no batching.
        let seed_orders = args
            .seed_orders
            .unwrap_or(orders.min(5_000))
            .clamp(1, orders);
        let mut seed = engine_run(
            url,
            args,
            Guard::Seed,
            seed_orders,
            accounts,
            1,
            Payment::Deduct,
        )
        .await?;
        seed.ratio_to_raw = seed.ops_per_sec / raw.ops_per_sec;
        eprintln!("  {}: {:.0} ops/s", seed.name, seed.ops_per_sec);
        runs.push(seed);
        Ok::<_, anyhow::Error>(PgReport {
            orders,
            accounts,
            concurrency: args.concurrency,
            lanes: args.lanes,
            cores,
            pgbench_clients: clients,
            pgbench_secs,
            runs,
            best_engine_ratio: best,
            two_phase_cost,
        })
    })?;
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if !report.runs.iter().all(|r| r.audit_ok) {
        eprintln!("bench engine: an audit failed after a run; the numbers are not valid");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `pgbench -i` then `pgbench -N` in a scratch database; TPS without connection time.
async fn pgbench(url: &str, clients: usize, secs: u64) -> anyhow::Result<RunResult> {
    let db = ScratchDb::create(url, "pg_bench").await?;
    let mut conn_args: Vec<String> = Vec::new();
    if let Some(host) = db.config.get_hosts().first() {
        match host {
            payguard::store::postgres::tokio_postgres::config::Host::Tcp(h) => {
                conn_args.extend(["-h".into(), h.clone()]);
            }
            payguard::store::postgres::tokio_postgres::config::Host::Unix(p) => {
                conn_args.extend(["-h".into(), p.display().to_string()]);
            }
        }
    }
    if let Some(port) = db.config.get_ports().first() {
        conn_args.extend(["-p".into(), port.to_string()]);
    }
    if let Some(user) = db.config.get_user() {
        conn_args.extend(["-U".into(), user.to_owned()]);
    }
    let password = db
        .config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let pgbench = |extra: Vec<String>| {
        let mut cmd = tokio::process::Command::new("pgbench");
        cmd.args(&conn_args).args(extra).arg(&db.name);
        if let Some(p) = &password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.kill_on_drop(true);
        cmd
    };
    let init = pgbench(vec![
        "-i".into(),
        "-q".into(),
        "-s".into(),
        PGBENCH_SCALE.to_string(),
    ])
    .output()
    .await?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let out = pgbench(vec![
        "-N".into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        PGBENCH_THREADS.to_string(),
        "-T".into(),
        secs.to_string(),
    ])
    .output()
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = stdout
        .lines()
        .filter(|l| l.starts_with("tps = "))
        .find_map(|l| {
            l["tps = ".len()..]
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench output:\n{stdout}"))?;
    let txns = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("number of transactions actually processed: ")?
                .split('/')
                .next()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    db.drop_db().await?;
    Ok(RunResult {
        name: format!("pgbench -N -c {clients} -j {PGBENCH_THREADS} -T {secs} (baseline)"),
        ops: txns,
        secs: secs as f64,
        ops_per_sec: tps,
        ratio_to_raw: 1.0,
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        mean_batch: None,
        cpu_us_per_op: None,
        audit_ok: true,
    })
}

async fn engine_run(
    url: &str,
    args: &super::EngineBenchArgs,
    guard: Guard,
    orders: usize,
    accounts: usize,
    batch_max: usize,
    payment: Payment,
) -> anyhow::Result<RunResult> {
    let db = ScratchDb::create(url, "pg_bench").await?;
    // Order i pays from account i mod `accounts`: only the first min(accounts,
    // orders) are ever touched, so only those are created.
    let store = PgStore::connect(PgConfig::new(db.config.clone())).await?;
    let client = db.connect().await?;
    client
        .execute(
            "INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
             SELECT 'acct-' || a, 'CNY', 1000000000000, 1000000000000, 0, 0
             FROM generate_series(0, $1::bigint - 1) a",
            &[&(accounts.min(orders) as i64)],
        )
        .await?;
    // The same ids, accounts and amounts as the SQLite runs' `setup`.
    client
        .execute(
            "INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
             SELECT 'OD20261126B' || lpad(i::text, 8, '0'), 'acct-' || (i % $2::bigint),
                    100 + (i % 900), 'PREPARE', 0, 0, 0
             FROM generate_series(0, $1::bigint - 1) i",
            &[&(orders as i64), &(accounts as i64)],
        )
        .await?;
    client.batch_execute("ANALYZE").await?;
    let mut cfg = super::bench_engine_config(args, batch_max);
    cfg.guard = guard;
    let concurrency = match guard {
        Guard::Seed => args.seed_concurrency,
        _ => args.concurrency,
    };
    let engine = Arc::new(Engine::start(Arc::new(store.clone()), cfg));
    let (secs, h) = closed_loop(engine.clone(), orders, concurrency, payment).await?;
    let stats = engine.stats();
    let batches_run = payguard::engine::EngineStats::get(&stats.batches);
    let batched = payguard::engine::EngineStats::get(&stats.batched_ops);
    let audit = store.audit().await?;
    engine.shutdown().await?;
    drop(client);
    db.drop_db().await?;
    Ok(RunResult {
        name: match guard {
            Guard::Seed => format!(
                "seed guard on PostgreSQL (lock + locked transaction per request), {concurrency} callers"
            ),
            _ if payment == Payment::TwoPhase => format!(
                "two-phase (authorize + capture) on PostgreSQL, batch_max={batch_max}, {concurrency} callers"
            ),
            _ => format!("engine on PostgreSQL, batch_max={batch_max}, {concurrency} callers"),
        },
        ops: orders,
        secs,
        ops_per_sec: orders as f64 / secs,
        ratio_to_raw: 0.0,
        p50_ms: Some(ms(&h, 0.5)),
        p99_ms: Some(ms(&h, 0.99)),
        max_ms: Some(h.max() as f64 / 1000.0),
        // The seed guard runs no batches.
        mean_batch: (batches_run > 0).then(|| batched as f64 / batches_run as f64),
        // This process is the client only; the database's CPU is another process's.
        cpu_us_per_op: None,
        // One debit per deduct; a hold and a capture per two-phase payment.
        audit_ok: audit.ok
            && audit.entries_checked
                == orders as i64 * if payment == Payment::TwoPhase { 2 } else { 1 },
    })
}

fn print_table(r: &PgReport) {
    crate::outln!(
        "engine bench on PostgreSQL: {} deductions per run on {} accounts, {} lanes, {} callers, {} cores",
        r.orders, r.accounts, r.lanes, r.concurrency, r.cores
    );
    crate::outln!();
    crate::outln!("| run | ops/s | × pgbench | p50 ms | p99 ms | max ms | mean batch | audit |");
    crate::outln!("|---|---:|---:|---:|---:|---:|---:|---|");
    for run in &r.runs {
        crate::outln!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            run.name,
            run.ops_per_sec,
            run.ratio_to_raw,
            super::opt(run.p50_ms, 2),
            super::opt(run.p99_ms, 2),
            super::opt(run.max_ms, 2),
            super::opt(run.mean_batch, 1),
            if run.audit_ok { "ok" } else { "FAILED" }
        );
    }
    crate::outln!();
    crate::outln!(
        "best engine run: {:.2} × pgbench -N (a pgbench transaction is one un-batched debit)",
        r.best_engine_ratio
    );
    crate::outln!("{}", r.two_phase_cost.line());
}
