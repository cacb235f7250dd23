//! A thin standalone front end for the suites, for testing them outside payguard:
//! `payguard-bench-suites cache|routing|queue [--quick] [--json] [--html FILE]`.
//! Inside payguard the same Args structs hang off `payguard bench SUITE`.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use payguard_bench_suites::{
    run_cache, run_queue, run_routing, ArgError, CacheArgs, QueueArgs, RoutingArgs,
};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "payguard-bench-suites",
    about = "payguard's cache, routing and queue benchmark suites"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Concurrent maps under the write-up's workloads.
    Cache(CacheArgs),
    /// Hash functions and reductions for lane routing.
    Routing(RoutingArgs),
    /// Channels into a single consumer.
    Queue(QueueArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.suite {
        Suite::Cache(a) => run_cache(a),
        Suite::Routing(a) => run_routing(a),
        Suite::Queue(a) => run_queue(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad usage is 2, as everywhere in payguard's CLI.
            if e.downcast_ref::<ArgError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
