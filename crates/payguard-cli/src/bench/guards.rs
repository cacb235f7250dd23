//! `payguard bench guards`: the same storm through HTTP against `seed` (the
//! write-up's fix, our baseline) and `full` (payguard), in one run, each on a
//! fresh SQLite file in this process. Prints throughput and latency side by side
//! and the ratio full / seed; fails when either side has a violation.

use crate::demo::LocalServer;
use crate::storm::{storm, Report, StormArgs};
use payguard::engine::Guard;
use serde::Serialize;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct GuardsBenchArgs {
    /// Small sizes for a smoke run.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
    /// Orders per side [default: 4000, --quick: 200].
    #[arg(long)]
    pub orders: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub dup: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
}

#[derive(Serialize)]
struct Side {
    guard: &'static str,
    deducts_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    violations: usize,
    replays: usize,
}

fn side(guard: &'static str, r: &Report) -> Side {
    let l = r.latency.get("deduct").cloned().unwrap_or_default();
    Side {
        guard,
        deducts_per_sec: r.deducts_per_sec,
        p50_ms: l.p50_ms,
        p99_ms: l.p99_ms,
        max_ms: l.max_ms,
        violations: r.violation_count(),
        replays: r.replays,
    }
}

pub fn run(args: GuardsBenchArgs) -> anyhow::Result<ExitCode> {
    let orders = args.orders.unwrap_or(if args.quick { 200 } else { 4000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut sides = Vec::new();
    for (name, guard) in [("seed", Guard::Seed), ("full", Guard::Full)] {
        let db = dir.path().join(format!("{name}.db"));
        let report = rt.block_on(async {
            let server = LocalServer::start(&db, guard, &format!("bench-{name}")).await?;
            let report = storm(&StormArgs {
                orders,
                dup: args.dup,
                concurrency: args.concurrency,
                refund_ratio: 0.0,
                seed: args.seed,
                run_tag: Some(format!("bench{}", args.seed)),
                ..StormArgs::in_process(
                    vec![server.url.clone()],
                    format!("sqlite://{}", db.display()),
                )
            })
            .await;
            server.stop().await?;
            report
        })?;
        eprintln!("  {name}: {:.0} deducts/s", report.deducts_per_sec);
        sides.push(side(name, &report));
    }
    let ratio = sides[1].deducts_per_sec / sides[0].deducts_per_sec.max(1e-9);
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "orders": orders, "dup": args.dup, "concurrency": args.concurrency,
                "sides": sides, "full_over_seed": ratio
            }))?
        );
    } else {
        crate::outln!(
            "guards bench: storm of {orders} orders × {} duplicates, {} in flight, SQLite, one run",
            args.dup,
            args.concurrency
        );
        crate::outln!();
        crate::outln!("| guard | deducts/s | p50 ms | p99 ms | max ms | replays | violations |");
        crate::outln!("|---|---:|---:|---:|---:|---:|---:|");
        for s in &sides {
            crate::outln!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
                s.guard,
                s.deducts_per_sec,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.replays,
                s.violations
            );
        }
        crate::outln!();
        crate::outln!("full / seed throughput: {ratio:.1}× (target ≥ 5×)");
    }
    Ok(if sides.iter().all(|s| s.violations == 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
