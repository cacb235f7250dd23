//! `payguard bench engine`: durable deductions per second through the engine,
//! beside raw rusqlite doing the same writes in the same run.
//!
//! The baseline is the ceiling: the same schema, pragmas (WAL, synchronous=FULL)
//! and prepared statements, doing exactly the money path's writes (balance update,
//! ledger insert, order status update) in 1000-row transactions from one thread,
//! with no HTTP, no channels and none of the engine's checks. The engine runs the
//! full deduct (order read, conditional updates, replay detection) behind lanes,
//! single flight and group commit, driven by `--concurrency` concurrent callers.
//! A second engine run offers half the measured peak as an open-loop load and
//! reports latency from each request's scheduled start (no coordinated omission).
//!
//! With `--db postgres://…` the same engine runs over the PostgreSQL store (each
//! run in a scratch database on that server), and the baseline is `pgbench -N`
//! on the same server in the same run (see [`pg`]).

mod pg;
mod sqlite;

use super::cpu;
use hdrhistogram::Histogram;
use payguard::domain::{OrderId, RequestId};
use payguard::store::sqlite::{migrate, open_connection, SqliteConfig, SqliteStore};
use payguard::store::{Command, Op, Output};
use payguard::{Engine, EngineConfig};
use rusqlite::params;
use serde::Serialize;
use sqlite::SqliteRuns;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per transaction in the raw baseline (the definition of the ceiling).
const RAW_TXN_ROWS: usize = 1000;
/// Accounts the SQLite runs' orders are spread over (order i pays from account
/// i mod accounts), unless `--accounts` says otherwise.
const ACCOUNTS: usize = 1000;
/// Longest the half-load run may take.
const HALF_LOAD_SECS_MAX: f64 = 10.0;

#[derive(clap::Args, Debug)]
pub struct EngineBenchArgs {
    /// Small sizes for a smoke run (CI).
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write a self-contained HTML page (inline SVG bars of ops/s and p99).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Accounts the orders are spread over, order i on account i mod N [default:
    /// 1000 on SQLite (one writer: no row contention either way); on PostgreSQL
    /// pgbench's own account count at its scale, 1 000 000, so the engine and
    /// `pgbench -N` see the same (absent) row contention].
    #[arg(long)]
    pub accounts: Option<usize>,
    /// Deductions per run [default: 100000, --quick: 3000].
    #[arg(long)]
    pub orders: Option<usize>,
    /// Concurrent callers driving the engine.
    #[arg(long, default_value_t = 2048)]
    pub concurrency: usize,
    /// Lanes of the engine.
    #[arg(long, default_value_t = 16)]
    pub lanes: usize,
    /// Engine batch_max values to compare (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 256])]
    pub batch_max: Vec<usize>,
    /// Microseconds a lane waits to fill a batch.
    #[arg(long, default_value_t = 100)]
    pub batch_wait_us: u64,
    /// Most ops the SQLite writer commits per transaction.
    #[arg(long, default_value_t = 1024)]
    pub writer_batch_max: usize,
    /// Async worker threads [default: cores − 1, at least 1: the SQLite writer
    /// thread needs a core of its own].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Deductions in the `seed` run (one transaction each, so it is kept short)
    /// [default: min(orders, 5000)].
    #[arg(long)]
    pub seed_orders: Option<usize>,
    /// Concurrent callers of the `seed` run (its requests queue on SQLite's write
    /// lock; thousands of them would only time out waiting).
    #[arg(long, default_value_t = 64)]
    pub seed_concurrency: usize,
    /// Folder for the temporary databases (must be a real disk for fsync to count).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run against PostgreSQL instead (`postgres://USER@HOST/DB`: each run gets a
    /// scratch database on that server, dropped afterwards).
    #[arg(long)]
    pub db: Option<String>,
    /// PostgreSQL only: seconds of the `pgbench -N` baseline [default: 30, --quick: 5].
    #[arg(long)]
    pub pgbench_secs: Option<u64>,
    /// Rounds of the two-phase comparison: each round runs a deduct run and a
    /// two-phase run back to back at the best batch_max, and the cost is the
    /// median of the rounds' ratios [default: 3, --quick: 1]. One pair alone
    /// spread from 1.65× to 2.28× on this shared machine.
    #[arg(long)]
    pub two_phase_rounds: Option<usize>,
}

/// Rounds of the two-phase comparison when `--two-phase-rounds` is not given.
pub const TWO_PHASE_ROUNDS_DEFAULT: usize = 3;

impl EngineBenchArgs {
    fn two_phase_rounds(&self) -> usize {
        self.two_phase_rounds
            .unwrap_or(if self.quick {
                1
            } else {
                TWO_PHASE_ROUNDS_DEFAULT
            })
            .max(1)
    }
}

/// A two-phase payment's cost next to a deduct's, over rounds of one deduct run
/// and one two-phase run each (same batch_max, fresh databases, back to back, so
/// the machine's load moves both sides of a round alike).
#[derive(Serialize, Debug, Clone)]
struct TwoPhaseCost {
    /// Each round's deduct payments/s over its two-phase payments/s.
    rounds: Vec<f64>,
    /// The median of `rounds`: the figure the target is read against.
    median: f64,
    /// Each round's two-phase CPU per payment over its deduct CPU per payment
    /// (SQLite: the whole process; empty where not measured): the same cost by
    /// a figure the machine's other load moves less.
    cpu_rounds: Vec<f64>,
    /// The median of `cpu_rounds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_median: Option<f64>,
    /// The two-phase run of the median round, for the table.
    #[serde(skip)]
    run: RunResult,
}

impl TwoPhaseCost {
    /// From `(deduct, two-phase)` pairs; at least one.
    fn of(pairs: Vec<(RunResult, RunResult)>) -> Self {
        let cpu_rounds: Vec<f64> = pairs
            .iter()
            .filter_map(|(d, t)| Some(t.cpu_us_per_op? / d.cpu_us_per_op?))
            .collect();
        let cpu_median = (!cpu_rounds.is_empty()).then(|| {
            let mut sorted = cpu_rounds.clone();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        });
        let mut rounds: Vec<(f64, RunResult)> = pairs
            .into_iter()
            .map(|(d, t)| (two_phase_cost(&d, &t), t))
            .collect();
        let costs: Vec<f64> = rounds.iter().map(|(c, _)| *c).collect();
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (median, run) = rounds.swap_remove(rounds.len() / 2);
        TwoPhaseCost {
            rounds: costs,
            median,
            cpu_rounds,
            cpu_median,
            run,
        }
    }

    fn line(&self) -> String {
        self.line_of(
            "a two-phase payment (authorize + capture)",
            "; target ≤ 2.2",
        )
    }

    /// The same figures for the raw floor ([`raw_two_phase`] over [`raw`]).
    fn floor_line(&self) -> String {
        self.line_of(
            "the schema's floor: raw rusqlite's authorize + capture",
            ", no target",
        )
    }

    fn line_of(&self, what: &str, target: &str) -> String {
        let list = |v: &[f64]| {
            v.iter()
                .map(|c| format!("{c:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let cpu = match self.cpu_median {
            Some(m) => format!(
                "; in CPU per payment {m:.2} × (rounds: {})",
                list(&self.cpu_rounds)
            ),
            None => String::new(),
        };
        format!(
            "{what} costs {:.2} × a deduct (median of {} rounds: {}{target}){cpu}",
            self.median,
            self.rounds.len(),
            list(&self.rounds)
        )
    }
}

#[derive(Serialize, Debug, Clone)]
struct RunResult {
    name: String,
    ops: usize,
    secs: f64,
    ops_per_sec: f64,
    ratio_to_raw: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    mean_batch: Option<f64>,
    /// CPU time per op (per payment in the payment runs), microseconds: of this
    /// process for the SQLite engine runs (the writer thread included), of the
    /// measuring thread for the store-only runs. Steadier than ops/s on a shared
    /// machine, since others' work does not inflate it; `None` where not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_op: Option<f64>,
    audit_ok: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    orders: usize,
    concurrency: usize,
    lanes: usize,
    cores: usize,
    runs: Vec<RunResult>,
    half_load: Option<RunResult>,
    best_engine_ratio: f64,
    /// What a two-phase payment (authorize, then capture) costs next to a deduct.
    two_phase_cost: Option<TwoPhaseCost>,
    /// The same cost for raw rusqlite making the contract's writes (SQLite):
    /// how much of `two_phase_cost` is the schema's, whatever the code above.
    #[serde(skip_serializing_if = "Option::is_none")]
    two_phase_floor: Option<TwoPhaseCost>,
}

/// How a bench order is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Payment {
    /// One step: `deduct`.
    Deduct,
    /// Two steps, one after the other: `authorize`, then `capture` of the whole hold.
    TwoPhase,
}

/// How long a bench hold lasts: far longer than any run.
const BENCH_HOLD_TTL_MS: i64 = 3_600_000;

fn setup(path: &Path, orders: usize, accounts: usize) -> anyhow::Result<()> {
    let mut conn = open_connection(path)?;
    migrate(&mut conn)?;
    let tx = conn.transaction()?;
    {
        let mut acct = tx.prepare(
            "INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
             VALUES (?1, 'CNY', ?2, ?2, 0, 0)",
        )?;
        for a in 0..accounts.min(orders) {
            acct.execute(params![format!("acct-{a}"), 1_000_000_000_000_i64])?;
        }
        let mut order = tx.prepare(
            "INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'PREPARE', 0, 0, 0)",
        )?;
        for i in 0..orders {
            order.execute(params![
                order_id(i),
                format!("acct-{}", i % accounts),
                100 + (i % 900) as i64
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn order_id(i: usize) -> String {
    format!("OD20261126B{i:08}")
}

/// Each order's id, account and amount, as the raw paths need them: made
/// before timing, from the same formulas as [`setup`].
fn raw_jobs(orders: usize, accounts: usize) -> Vec<(String, String, i64)> {
    (0..orders)
        .map(|i| {
            (
                order_id(i),
                format!("acct-{}", i % accounts),
                100 + (i % 900) as i64,
            )
        })
        .collect()
}

fn raw(path: &Path, orders: usize, accounts: usize) -> anyhow::Result<RunResult> {
    let mut conn = open_connection(path)?;
    let jobs = raw_jobs(orders, accounts);
    let cpu0 = cpu::thread_cpu_secs();
    let started = Instant::now();
    for chunk in jobs.chunks(RAW_TXN_ROWS) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (oid, acct, amount) in chunk {
            let balance: i64 = tx
                .prepare_cached(
                    "UPDATE accounts SET balance = balance - ?1, updated_at = ?2
                     WHERE id = ?3 AND balance >= ?1 RETURNING balance",
                )?
                .query_row(params![amount, 1, acct], |r| r.get(0))?;
            let entry: i64 = tx
                .prepare_cached(
                    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
                     VALUES (?1, ?2, 'debit', ?3, ?4, ?5) RETURNING id",
                )?
                .query_row(params![oid, acct, amount, balance, 1], |r| r.get(0))?;
            let changed = tx
                .prepare_cached(
                    "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, updated_at = ?2
                     WHERE id = ?3 AND status = 'PREPARE'",
                )?
                .execute(params![entry, 1, oid])?;
            anyhow::ensure!(changed == 1, "raw baseline: order {oid} not in PREPARE");
        }
        tx.commit()?;
    }
    let mut run = raw_result(
        &mut conn,
        format!("raw rusqlite, {RAW_TXN_ROWS}-row txns (ceiling)"),
        orders,
        started,
        cpu0,
    )?;
    run.ratio_to_raw = 1.0;
    Ok(run)
}

/// The floor of a two-phase payment, as [`raw`] is a deduct's: raw rusqlite
/// making the contract's writes for an authorize (the account's `held`, a hold
/// entry, the order AUTHORIZED with its hold and expiry) and then for a capture
/// of the whole hold (balance and `held`, a capture entry, the order PAID with
/// its captured sum), in [`RAW_TXN_ROWS`]-row transactions, every payment's
/// authorize in one and its capture in the next (as the engine never batches
/// a capture with its own hold). Like [`raw`], no events and no reads: what is
/// left of a two-phase payment's cost over a deduct's here is the schema's
/// (the bigger rows, the second entry, the indexes and triggers), which no
/// code above SQLite can remove.
fn raw_two_phase(path: &Path, orders: usize, accounts: usize) -> anyhow::Result<RunResult> {
    let mut conn = open_connection(path)?;
    let jobs = raw_jobs(orders, accounts);
    let cpu0 = cpu::thread_cpu_secs();
    let started = Instant::now();
    for chunk in jobs.chunks(RAW_TXN_ROWS) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (oid, acct, amount) in chunk {
            let balance: i64 = tx
                .prepare_cached(
                    "UPDATE accounts SET held = held + ?1, updated_at = ?2
                     WHERE id = ?3 AND balance - held >= ?1 RETURNING balance",
                )?
                .query_row(params![amount, 1, acct], |r| r.get(0))?;
            tx.prepare_cached(
                "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
                 VALUES (?1, ?2, 'hold', ?3, ?4, ?5)",
            )?
            .execute(params![oid, acct, amount, balance, 1])?;
            let changed = tx
                .prepare_cached(
                    "UPDATE orders SET status = 'AUTHORIZED', held = ?1, hold_expires_at = ?2,
                            updated_at = ?3
                     WHERE id = ?4 AND status = 'PREPARE'",
                )?
                .execute(params![amount, BENCH_HOLD_TTL_MS, 1, oid])?;
            anyhow::ensure!(changed == 1, "raw two-phase: order {oid} not in PREPARE");
        }
        tx.commit()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (oid, acct, amount) in chunk {
            let balance: i64 = tx
                .prepare_cached(
                    "UPDATE accounts SET balance = balance - ?1, held = held - ?1, updated_at = ?2
                     WHERE id = ?3 AND held >= ?1 RETURNING balance",
                )?
                .query_row(params![amount, 1, acct], |r| r.get(0))?;
            let entry: i64 = tx
                .prepare_cached(
                    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
                     VALUES (?1, ?2, 'capture', ?3, ?4, ?5) RETURNING id",
                )?
                .query_row(params![oid, acct, amount, balance, 1], |r| r.get(0))?;
            let changed = tx
                .prepare_cached(
                    "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, captured = ?2,
                            held = 0, updated_at = ?3
                     WHERE id = ?4 AND status = 'AUTHORIZED'",
                )?
                .execute(params![entry, amount, 1, oid])?;
            anyhow::ensure!(changed == 1, "raw two-phase: order {oid} not AUTHORIZED");
        }
        tx.commit()?;
    }
    raw_result(
        &mut conn,
        format!("raw rusqlite, authorize then capture, {RAW_TXN_ROWS}-row txns"),
        orders,
        started,
        cpu0,
    )
}

/// A raw run's result: its rate since `started`, the measuring thread's CPU
/// per payment since `cpu0`, and the audit of what it wrote.
fn raw_result(
    conn: &mut rusqlite::Connection,
    name: String,
    orders: usize,
    started: Instant,
    cpu0: Option<f64>,
) -> anyhow::Result<RunResult> {
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_per_payment(cpu0, cpu::thread_cpu_secs(), orders);
    let audit_ok = payguard::store::sqlite::audit_connection(conn)?.ok;
    let mut run = RunResult::throughput(name, orders, secs, audit_ok);
    run.cpu_us_per_op = cpu;
    Ok(run)
}

/// The store's own deduct (order read, conditional writes, results built) driven
/// directly in 1000-op transactions: no lanes, channels or tasks. It splits the
/// gap between raw SQL and the engine into "the money path's SQL" and "the engine".
fn store_direct(path: &Path, orders: usize, payment: Payment) -> anyhow::Result<RunResult> {
    let mut conn = open_connection(path)?;
    let payments: Vec<Vec<Command>> = (0..orders).map(|i| payment_ops(i, payment)).collect();
    let cpu0 = cpu::thread_cpu_secs();
    let started = Instant::now();
    for chunk in payments.chunks(RAW_TXN_ROWS) {
        // Step by step: every payment's first step in one transaction, then every
        // second step in the next, as the engine never batches a capture with its
        // own hold.
        for step in 0..chunk[0].len() {
            let ops: Vec<Command> = chunk.iter().map(|p| p[step].clone()).collect();
            let now = chrono::Utc::now().timestamp_millis();
            for r in payguard::store::sqlite::apply_ops(&mut conn, &ops, now)? {
                check(r.map_err(payguard::EngineError::from))?;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_per_payment(cpu0, cpu::thread_cpu_secs(), orders);
    let audit_ok = payguard::store::sqlite::audit_connection(&mut conn)?.ok;
    let mut run = RunResult::throughput(
        match payment {
            Payment::Deduct => {
                format!("store only: the engine's deduct SQL, {RAW_TXN_ROWS}-op txns, no lanes")
            }
            Payment::TwoPhase => {
                format!("store only: authorize then capture SQL, {RAW_TXN_ROWS}-op txns, no lanes")
            }
        },
        orders,
        secs,
        audit_ok,
    );
    run.cpu_us_per_op = cpu;
    Ok(run)
}

impl RunResult {
    /// A run measured by throughput alone (no per-request latency).
    fn throughput(name: String, ops: usize, secs: f64, audit_ok: bool) -> Self {
        RunResult {
            name,
            ops,
            secs,
            ops_per_sec: ops as f64 / secs,
            ratio_to_raw: 0.0,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            mean_batch: None,
            cpu_us_per_op: None,
            audit_ok,
        }
    }
}

/// Least CPU a run must use for its CPU per payment to be reported: `/proc`
/// counts 10 ms ticks, so below 25 of them one tick moves the figure by 4 % or
/// more (the CI smoke's 2,000 orders, a few ticks a run, once gave a two-phase
/// CPU ratio of 4.33×; 30,000 store-only deducts use about 0.33 s).
const CPU_FIGURE_MIN_SECS: f64 = 0.25;

/// CPU microseconds per payment between two readings, or `None` when the run
/// used less than [`CPU_FIGURE_MIN_SECS`] (or there is no `/proc`).
pub(super) fn cpu_per_payment(
    before: Option<f64>,
    after: Option<f64>,
    payments: usize,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    if after - before < CPU_FIGURE_MIN_SECS {
        return None;
    }
    cpu::us_per_request(Some(before), Some(after), payments as u64)
}

/// Async worker threads for the engine runs: one core is left to the SQLite
/// writer thread, which every write funnels through.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// The engine configuration every engine run of this suite uses.
pub(super) fn bench_engine_config(args: &EngineBenchArgs, batch_max: usize) -> EngineConfig {
    EngineConfig {
        guard: payguard::engine::Guard::Full,
        lanes: args.lanes,
        batch_max,
        batch_wait_us: args.batch_wait_us,
        lane_queue_depth_max: args.concurrency.max(1024),
        order_cache_entries_max: 0,
        instance_id: "bench".into(),
        failpoint_pause_after_lock_ms: 0,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn start_engine(path: &Path, args: &EngineBenchArgs, batch_max: usize) -> anyhow::Result<Engine> {
    let mut cfg = SqliteConfig::new(path);
    cfg.writer_batch_ops_max = args.writer_batch_max;
    let store = SqliteStore::open(cfg)?;
    Ok(Engine::start(
        Arc::new(store),
        bench_engine_config(args, batch_max),
    ))
}

fn deduct_op(i: usize) -> Command {
    Command::new(Op::Deduct {
        order_id: OrderId::parse(&order_id(i)).expect("valid id"),
    })
}

/// The commands that pay order `i`, in order.
fn payment_ops(i: usize, payment: Payment) -> Vec<Command> {
    let order_id = OrderId::parse(&order_id(i)).expect("valid id");
    match payment {
        Payment::Deduct => vec![Command::new(Op::Deduct { order_id })],
        Payment::TwoPhase => vec![
            Command::new(Op::Authorize {
                order_id: order_id.clone(),
                hold_ttl_ms: BENCH_HOLD_TTL_MS,
            }),
            Command::new(Op::Capture {
                order_id,
                amount: None,
            }),
        ],
    }
}

fn check(out: Result<Output, payguard::EngineError>) -> anyhow::Result<()> {
    match out {
        Ok(Output::Movement {
            replayed: false, ..
        }) => Ok(()),
        other => anyhow::bail!("bench payment did not commit: {other:?}"),
    }
}

/// `orders` payments by `concurrency` callers, each paying one order at a time
/// (both steps of a two-phase payment, one after the other); latency is the
/// whole payment's.
async fn closed_loop(
    engine: Arc<Engine>,
    orders: usize,
    concurrency: usize,
    payment: Payment,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    // The ops are built before the clock starts, as the raw baseline's are.
    let ops: Arc<Vec<Vec<Command>>> =
        Arc::new((0..orders).map(|i| payment_ops(i, payment)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let engine = engine.clone();
        let next = next.clone();
        let ops = ops.clone();
        tasks.push(tokio::spawn(async move {
            // Plain microsecond samples, folded into a histogram after the clock
            // stops: 2048 auto-resizing histograms cost the async side more CPU
            // than the engine itself (callgrind: memset in `record`, 36 %).
            let mut samples: Vec<u32> = Vec::with_capacity(orders / concurrency.max(1) + 1);
            let req = RequestId::parse("bench").expect("valid id");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= orders {
                    break;
                }
                let t0 = Instant::now();
                for op in &ops[i] {
                    check(engine.submit(op.clone(), req.clone()).await)?;
                }
                samples.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    let mut samples = Vec::with_capacity(concurrency);
    for t in tasks {
        samples.push(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new(3)?;
    for v in samples.into_iter().flatten() {
        all.record(u64::from(v))?;
    }
    Ok((secs, all))
}

async fn open_loop(
    engine: Arc<Engine>,
    orders: usize,
    rate: f64,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let wall = Instant::now();
    for i in 0..orders {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let engine = engine.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let res = engine
                .submit(deduct_op(i), RequestId::parse("bench").expect("valid id"))
                .await;
            let lat = tokio::time::Instant::now().duration_since(scheduled);
            let _ = tx.send((res, lat));
        });
    }
    drop(tx);
    let mut h = Histogram::<u64>::new(3)?;
    while let Some((res, lat)) = rx.recv().await {
        check(res)?;
        h.record(lat.as_micros() as u64)?;
    }
    Ok((wall.elapsed().as_secs_f64(), h))
}

pub fn run(args: EngineBenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = args.db.as_deref() {
        match crate::serve::DbUrl::parse(url)? {
            crate::serve::DbUrl::Postgres(url) => return pg::run(&args, &url),
            crate::serve::DbUrl::Sqlite(_) => {
                anyhow::bail!("--db is for PostgreSQL; the SQLite runs use --dir")
            }
        }
    }
    let orders = args
        .orders
        .unwrap_or(if args.quick { 3_000 } else { 100_000 });
    anyhow::ensure!(orders > 0, "--orders must be at least 1");
    anyhow::ensure!(!args.batch_max.is_empty(), "--batch-max needs a value");
    let accounts = args.accounts.unwrap_or(ACCOUNTS);
    anyhow::ensure!(accounts > 0, "--accounts must be at least 1");
    let base = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.unwrap_or_else(default_worker_threads))
        .enable_all()
        .build()?;
    // Engine::start spawns its lanes on the current runtime.
    let _rt_guard = rt.enter();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench engine: {orders} deductions per run, {cores} cores, databases in {}",
        base.path().display()
    );

    let sqlite = SqliteRuns {
        args: &args,
        rt: &rt,
        dir: base.path(),
        orders,
        accounts,
    };
    let raw = sqlite.raw()?;
    let direct = sqlite.store_only(&raw)?;
    let sweep = sqlite.sweep(&raw)?;
    let seed = sqlite.seed(&raw)?;
    let half = sqlite.half_load(&raw, &sweep)?;
    let two_phase_cost = sqlite.two_phase(&raw, &sweep)?;
    let two_phase_floor = sqlite.two_phase_floor()?;
    let mut runs = vec![raw];
    runs.extend(direct);
    runs.extend(sweep.runs);
    runs.push(two_phase_cost.run.clone());
    runs.push(seed);
    let report = Report {
        orders,
        concurrency: args.concurrency,
        lanes: args.lanes,
        cores,
        best_engine_ratio: sweep.best.ratio_to_raw,
        runs,
        half_load: Some(half),
        two_phase_cost: Some(two_phase_cost),
        two_phase_floor: Some(two_phase_floor),
    };
    finish(&args, &report)
}

/// Prints the report (JSON or a table), writes the HTML page if asked, and fails
/// the command (exit 1) when any run's audit failed.
fn finish(args: &EngineBenchArgs, report: &Report) -> anyhow::Result<ExitCode> {
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_table(report);
    }
    if let Some(path) = &args.html {
        std::fs::write(path, html(report))?;
    }
    let all_ok = report.runs.iter().all(|r| r.audit_ok)
        && report.half_load.as_ref().is_none_or(|r| r.audit_ok);
    if !all_ok {
        eprintln!("bench engine: an audit failed after a run; the numbers are not valid");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// One round of the two-phase comparison, as it finishes.
fn print_round(round: usize, deduct: &RunResult, two_phase: &RunResult) {
    let cpu = match (deduct.cpu_us_per_op, two_phase.cpu_us_per_op) {
        (Some(d), Some(t)) => format!("; CPU {d:.1} and {t:.1} µs per payment, {:.2}×", t / d),
        _ => String::new(),
    };
    eprintln!(
        "  round {}: deduct {:.0}/s, {}: {:.0} payments/s ({:.2}×{cpu})",
        round + 1,
        deduct.ops_per_sec,
        two_phase.name,
        two_phase.ops_per_sec,
        two_phase_cost(deduct, two_phase)
    );
}

/// A two-phase payment's cost as a multiple of a deduct's (payments/s ratio).
fn two_phase_cost(deduct: &RunResult, two_phase: &RunResult) -> f64 {
    deduct.ops_per_sec / two_phase.ops_per_sec.max(f64::MIN_POSITIVE)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn print_table(r: &Report) {
    crate::outln!(
        "engine bench: {} deductions per run, {} lanes, {} cores, SQLite WAL synchronous=FULL",
        r.orders,
        r.lanes,
        r.cores
    );
    crate::outln!();
    crate::outln!("| run | ops/s | × raw | p50 ms | p99 ms | max ms | mean batch | audit |");
    crate::outln!("|---|---:|---:|---:|---:|---:|---:|---|");
    for run in r.runs.iter().chain(r.half_load.iter()) {
        crate::outln!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            run.name,
            run.ops_per_sec,
            run.ratio_to_raw,
            opt(run.p50_ms, 2),
            opt(run.p99_ms, 2),
            opt(run.max_ms, 2),
            opt(run.mean_batch, 1),
            if run.audit_ok { "ok" } else { "FAILED" }
        );
    }
    crate::outln!();
    crate::outln!(
        "best engine run: {:.2} × raw rusqlite (target ≥ 0.80)",
        r.best_engine_ratio
    );
    if let Some(cost) = &r.two_phase_cost {
        crate::outln!("{}", cost.line());
    }
    if let Some(floor) = &r.two_phase_floor {
        crate::outln!("{}", floor.floor_line());
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained page: one bar a run (ops/s, with × raw and p99 as labels).
fn html(r: &Report) -> String {
    let runs: Vec<&RunResult> = r.runs.iter().chain(r.half_load.iter()).collect();
    let max = runs.iter().map(|x| x.ops_per_sec).fold(1.0, f64::max);
    let mut bars = String::new();
    for (i, run) in runs.iter().enumerate() {
        let w = run.ops_per_sec / max * 420.0;
        let y = 10 + i * 34;
        bars.push_str(&format!(
            "<text x=\"4\" y=\"{}\">{}</text><rect x=\"470\" y=\"{y}\" width=\"{w:.1}\" height=\"24\" fill=\"#4a7bd0\"/>\
             <text x=\"{:.1}\" y=\"{}\">{:.0}/s · {:.2} × raw{}</text>",
            y + 16,
            esc(&run.name),
            476.0 + w,
            y + 16,
            run.ops_per_sec,
            run.ratio_to_raw,
            run.p99_ms.map_or(String::new(), |p| format!(" · p99 {p:.1} ms")),
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>payguard bench engine</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}text{{font-size:12px}}</style></head><body>\
         <h1>payguard bench engine</h1><p>{} deductions per run, {} lanes, {} cores, SQLite WAL synchronous=FULL; \
         best engine run {:.2} × raw rusqlite.</p><svg width=\"1150\" height=\"{}\">{bars}</svg></body></html>",
        r.orders,
        r.lanes,
        r.cores,
        r.best_engine_ratio,
        20 + runs.len() * 34
    )
}
