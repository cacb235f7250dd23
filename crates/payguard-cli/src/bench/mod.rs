//! `payguard bench SUITE`: measured comparisons, each against a baseline measured
//! in the same run, because absolute times on shared machines drift.

mod cpu;
mod engine;
mod guards;
mod http;
mod scale;

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub suite: Suite,
}

#[derive(clap::Subcommand, Debug)]
pub enum Suite {
    /// Durable deductions/s of the engine vs raw rusqlite doing the same writes.
    Engine(engine::EngineBenchArgs),
    /// Storm throughput and latency of `seed` vs `full` through HTTP, one run.
    Guards(guards::GuardsBenchArgs),
    /// HTTP cost: a plain axum handler, /healthz, first charges and replays, by our
    /// client and by wrk in the same run; ratios to /healthz of the same client.
    Http(http::HttpBenchArgs),
    /// 1 and N instances on one PostgreSQL, with and without the Redis lock.
    Scale(scale::ScaleBenchArgs),
    /// Concurrent maps under the write-up's workloads; ratios to Mutex<HashMap>.
    Cache(payguard_bench_suites::CacheArgs),
    /// Hash functions and reductions for lane routing.
    Routing(payguard_bench_suites::RoutingArgs),
    /// Channels into one lane owner; ratios to tokio mpsc.
    Queue(payguard_bench_suites::QueueArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.suite {
        Suite::Engine(a) => engine::run(a),
        Suite::Guards(a) => guards::run(a),
        Suite::Http(a) => http::run(a),
        Suite::Scale(a) => scale::run(a),
        Suite::Cache(a) => suite(payguard_bench_suites::run_cache(&a)),
        Suite::Routing(a) => suite(payguard_bench_suites::run_routing(&a)),
        Suite::Queue(a) => suite(payguard_bench_suites::run_queue(&a)),
    }
}

/// A bad flag value is bad usage (exit 2, via main); the suites print their own tables.
fn suite(result: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    result.map(|()| ExitCode::SUCCESS)
}
