//! `payguard`: the one binary. `serve` runs the HTTP API; `bench` measures.
//! Flags follow `shared/spec/CLI.md`; every flag also reads `PAYGUARD_<FLAG>`.
#![forbid(unsafe_code)]

mod bench;
mod logging;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "payguard",
    version,
    about = "Move money exactly once per order, and prove it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (shared/spec/API.md).
    Serve(serve::ServeArgs),
    /// Measured comparisons; prints ratios against baselines measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("payguard: {e:#}");
            ExitCode::from(2)
        }
    }
}
