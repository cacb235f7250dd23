//! `payguard bench SUITE`: measured comparisons, each against a baseline measured
//! in the same run, because absolute times on shared machines drift.

mod engine;
mod guards;

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
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.suite {
        Suite::Engine(a) => engine::run(a),
        Suite::Guards(a) => guards::run(a),
    }
}
