//! `payguard bench engine` on SQLite, run by run: the raw rusqlite ceiling, the
//! store alone, the engine at each `--batch-max`, the write-up's `seed` guard and
//! the engine at half its measured peak. Each run is one method of [`SqliteRuns`]
//! (every run gets a fresh database in the same folder and is audited after), so
//! the order of the runs reads in `super::run` and each run's steps read here.

use super::{
    bench_engine_config, closed_loop, ms, open_loop, print_round, raw, raw_two_phase, setup,
    start_engine, store_direct, two_phase_cost, EngineBenchArgs, Payment, RunResult, TwoPhaseCost,
    HALF_LOAD_SECS_MAX,
};
use payguard::store::sqlite::{SqliteConfig, SqliteStore};
use payguard::Engine;
use std::path::Path;
use std::sync::Arc;

/// What every SQLite run shares: the flags, the runtime, the databases' folder and
/// the sizes.
pub(super) struct SqliteRuns<'a> {
    pub args: &'a EngineBenchArgs,
    pub rt: &'a tokio::runtime::Runtime,
    pub dir: &'a Path,
    pub orders: usize,
    pub accounts: usize,
}

/// The engine runs over every `--batch-max`, the fastest of them and its batch_max.
pub(super) struct Sweep {
    pub runs: Vec<RunResult>,
    pub best: RunResult,
    pub best_batch_max: usize,
}

impl SqliteRuns<'_> {
    /// The ceiling: raw rusqlite doing the money path's writes.
    pub fn raw(&self) -> anyhow::Result<RunResult> {
        let raw_path = self.dir.join("raw.db");
        setup(&raw_path, self.orders, self.accounts)?;
        let raw = raw(&raw_path, self.orders, self.accounts)?;
        eprintln!("  raw: {:.0} ops/s", raw.ops_per_sec);
        Ok(raw)
    }

    /// The floor under the two-phase cost: `--two-phase-rounds` pairs of raw
    /// rusqlite runs, a deduct's writes and then a two-phase payment's, each on
    /// a fresh database, back to back.
    pub fn two_phase_floor(&self) -> anyhow::Result<TwoPhaseCost> {
        let mut pairs = Vec::new();
        for round in 0..self.args.two_phase_rounds() {
            let fresh = |name: &str| {
                let path = self.dir.join(format!("floor-{name}-r{round}.db"));
                setup(&path, self.orders, self.accounts).map(|()| path)
            };
            let d = raw(&fresh("deduct")?, self.orders, self.accounts)?;
            let t = raw_two_phase(&fresh("two-phase")?, self.orders, self.accounts)?;
            anyhow::ensure!(
                d.audit_ok && t.audit_ok,
                "floor round {}: an audit failed after a raw run; the numbers are not valid",
                round + 1
            );
            eprintln!(
                "  floor round {}: raw deduct {:.0}/s, raw authorize + capture {:.0} payments/s ({:.2}×)",
                round + 1,
                d.ops_per_sec,
                t.ops_per_sec,
                two_phase_cost(&d, &t)
            );
            pairs.push((d, t));
        }
        Ok(TwoPhaseCost::of(pairs))
    }

    /// The store's own SQL without lanes, as a ratio to `raw`: deducts, then
    /// two-phase payments (authorize, then capture), so the two-phase cost of the
    /// SQL alone reads beside the engine's; then deducts of twice the orders, so
    /// the two-phase run is also compared at an equal ledger (a two-phase payment
    /// writes two entries and two events where a deduct writes one of each, and
    /// every insert costs more in bigger tables).
    pub fn store_only(&self, raw: &RunResult) -> anyhow::Result<[RunResult; 2]> {
        let run = |payment: Payment, orders: usize| {
            let path = self.dir.join(format!("direct-{payment:?}-{orders}.db"));
            setup(&path, orders, self.accounts)?;
            let mut direct = store_direct(&path, orders, payment)?;
            direct.ratio_to_raw = direct.ops_per_sec / raw.ops_per_sec;
            Ok::<_, anyhow::Error>(direct)
        };
        let deduct = run(Payment::Deduct, self.orders)?;
        let two_phase = run(Payment::TwoPhase, self.orders)?;
        let same_ledger = run(Payment::Deduct, self.orders * 2)?;
        let cpu = |d: &RunResult| Some(two_phase.cpu_us_per_op? / d.cpu_us_per_op?);
        let cpu_line = match (cpu(&deduct), cpu(&same_ledger)) {
            (Some(a), Some(b)) => format!("; in CPU per payment {a:.2}× and {b:.2}×"),
            _ => String::new(),
        };
        eprintln!(
            "  store only: {:.0} deducts/s, {:.0} two-phase payments/s ({:.2}×; {:.2}× against {:.0} deducts/s with as many ledger lines{cpu_line})",
            deduct.ops_per_sec,
            two_phase.ops_per_sec,
            two_phase_cost(&deduct, &two_phase),
            two_phase_cost(&same_ledger, &two_phase),
            same_ledger.ops_per_sec,
        );
        Ok([deduct, two_phase])
    }

    /// The engine, closed loop, at each `--batch-max`.
    pub fn sweep(&self, raw: &RunResult) -> anyhow::Result<Sweep> {
        let mut runs = Vec::new();
        let mut best: Option<RunResult> = None;
        for &bm in &self.args.batch_max {
            let r = self.engine_run(bm, raw)?;
            eprintln!("  {}: {:.0} ops/s", r.name, r.ops_per_sec);
            if best.as_ref().is_none_or(|b| r.ops_per_sec > b.ops_per_sec) {
                best = Some(r.clone());
            }
            runs.push(r);
        }
        let best = best.expect("at least one engine run");
        let best_batch_max =
            self.args.batch_max[runs.iter().position(|r| r.name == best.name).unwrap_or(0)];
        Ok(Sweep {
            runs,
            best,
            best_batch_max,
        })
    }

    /// Two-phase payments (authorize, then capture) against deducts at the best
    /// deduct run's batch_max: `--two-phase-rounds` pairs, back to back.
    pub fn two_phase(&self, raw: &RunResult, sweep: &Sweep) -> anyhow::Result<TwoPhaseCost> {
        let bm = sweep.best_batch_max;
        let mut pairs = Vec::new();
        for round in 0..self.args.two_phase_rounds() {
            let d = self.payment_run(bm, raw, Payment::Deduct, &format!("r{round}"))?;
            let t = self.payment_run(bm, raw, Payment::TwoPhase, &format!("r{round}"))?;
            anyhow::ensure!(
                d.audit_ok && t.audit_ok,
                "two-phase round {}: an audit failed after a run; the numbers are not valid",
                round + 1
            );
            print_round(round, &d, &t);
            pairs.push((d, t));
        }
        Ok(TwoPhaseCost::of(pairs))
    }

    fn engine_run(&self, bm: usize, raw: &RunResult) -> anyhow::Result<RunResult> {
        self.payment_run(bm, raw, Payment::Deduct, "sweep")
    }

    fn payment_run(
        &self,
        bm: usize,
        raw: &RunResult,
        payment: Payment,
        tag: &str,
    ) -> anyhow::Result<RunResult> {
        let (args, rt, orders) = (self.args, self.rt, self.orders);
        let path = self.dir.join(format!("engine-{bm}-{payment:?}-{tag}.db"));
        setup(&path, orders, self.accounts)?;
        let engine = Arc::new(start_engine(&path, args, bm)?);
        let cpu0 = crate::bench::cpu::process_cpu_secs();
        let (secs, h) = rt.block_on(closed_loop(
            engine.clone(),
            orders,
            args.concurrency,
            payment,
        ))?;
        let cpu = super::cpu_per_payment(cpu0, crate::bench::cpu::process_cpu_secs(), orders);
        let stats = engine.stats();
        let batches = payguard::engine::EngineStats::get(&stats.batches).max(1);
        let batched = payguard::engine::EngineStats::get(&stats.batched_ops);
        let audit_ok = rt.block_on(engine.audit())?.ok;
        rt.block_on(engine.shutdown())?;
        Ok(RunResult {
            name: match payment {
                Payment::Deduct => format!("engine, batch_max={bm}, {} callers", args.concurrency),
                Payment::TwoPhase => format!(
                    "two-phase (authorize + capture), batch_max={bm}, {} callers",
                    args.concurrency
                ),
            },
            ops: orders,
            secs,
            ops_per_sec: orders as f64 / secs,
            ratio_to_raw: (orders as f64 / secs) / raw.ops_per_sec,
            p50_ms: Some(ms(&h, 0.5)),
            p99_ms: Some(ms(&h, 0.99)),
            max_ms: Some(h.max() as f64 / 1000.0),
            mean_batch: Some(batched as f64 / batches as f64),
            cpu_us_per_op: cpu,
            audit_ok,
        })
    }

    /// The write-up's fix as written, in the same run: a lock and a locked
    /// transaction per request, no batching.
    pub fn seed(&self, raw: &RunResult) -> anyhow::Result<RunResult> {
        let (args, rt) = (self.args, self.rt);
        let seed_orders = args
            .seed_orders
            .unwrap_or(self.orders.min(5_000))
            .clamp(1, self.orders);
        let path = self.dir.join("engine-seed.db");
        setup(&path, seed_orders, self.accounts)?;
        let seed_engine = {
            let mut cfg = SqliteConfig::new(&path);
            cfg.writer_batch_ops_max = args.writer_batch_max;
            let mut ecfg = bench_engine_config(args, 1);
            ecfg.guard = payguard::engine::Guard::Seed;
            Arc::new(Engine::start(Arc::new(SqliteStore::open(cfg)?), ecfg))
        };
        let (secs, h) = rt.block_on(closed_loop(
            seed_engine.clone(),
            seed_orders,
            args.seed_concurrency,
            Payment::Deduct,
        ))?;
        let audit_ok = rt.block_on(seed_engine.audit())?.ok;
        rt.block_on(seed_engine.shutdown())?;
        let mut seed = RunResult::throughput(
            format!(
                "seed guard (lock + BEGIN IMMEDIATE per request), {} callers",
                args.seed_concurrency
            ),
            seed_orders,
            secs,
            audit_ok,
        );
        seed.ratio_to_raw = seed.ops_per_sec / raw.ops_per_sec;
        seed.p50_ms = Some(ms(&h, 0.5));
        seed.p99_ms = Some(ms(&h, 0.99));
        seed.max_ms = Some(h.max() as f64 / 1000.0);
        eprintln!("  seed: {:.0} ops/s", seed.ops_per_sec);
        Ok(seed)
    }

    /// The best engine configuration offered half its measured peak, open loop:
    /// latency from each request's scheduled start.
    pub fn half_load(&self, raw: &RunResult, sweep: &Sweep) -> anyhow::Result<RunResult> {
        let best_bm = sweep.best_batch_max;
        let rate = sweep.best.ops_per_sec / 2.0;
        let half_orders = self.orders.min((rate * HALF_LOAD_SECS_MAX) as usize).max(1);
        let path = self.dir.join("engine-half.db");
        setup(&path, half_orders, self.accounts)?;
        let engine = Arc::new(start_engine(&path, self.args, best_bm)?);
        let (secs, h) = self
            .rt
            .block_on(open_loop(engine.clone(), half_orders, rate))?;
        let audit_ok = self.rt.block_on(engine.audit())?.ok;
        self.rt.block_on(engine.shutdown())?;
        Ok(RunResult {
            name: format!("engine at half peak ({rate:.0} ops/s offered), batch_max={best_bm}"),
            ops: half_orders,
            secs,
            ops_per_sec: half_orders as f64 / secs,
            ratio_to_raw: (half_orders as f64 / secs) / raw.ops_per_sec,
            p50_ms: Some(ms(&h, 0.5)),
            p99_ms: Some(ms(&h, 0.99)),
            max_ms: Some(h.max() as f64 / 1000.0),
            mean_batch: None,
            cpu_us_per_op: None,
            audit_ok,
        })
    }
}
