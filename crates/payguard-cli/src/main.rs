//! `payguard`: the one binary. `serve` runs the HTTP API; `demo` shows the
//! incident beside the fix; `storm` and `check-history` prove exactly-once under
//! duplicate storms; `audit` checks (and repairs) a database; `forensics`
//! rebuilds races from logs; `bench` measures. Flags follow
//! `shared/spec/CLI.md`; every flag also reads `PAYGUARD_<FLAG>`.
#![forbid(unsafe_code)]

use payguard_cli::{audit, bench, demo, serve, storm};

/// mimalloc instead of glibc's malloc (issue #16: malloc and free were 13–17 %
/// of a loaded server's CPU; measured in BENCHMARKS.md, "http").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The incident and its fix side by side: naive vs full, same storm, no setup.
    Demo(demo::DemoArgs),
    /// Load + duplicate storm + audit against running services; exit 1 on any violation.
    Storm(storm::StormArgs),
    /// Check a `storm --history` file: each order charged at most once, ok means
    /// once, balances within what the history allows; exit 1 on any violation.
    CheckHistory(storm::CheckHistoryArgs),
    /// Invariant checks straight on a database; --fix-plan / --apply pay back duplicates.
    Audit(audit::AuditArgs),
    /// Rebuild races from log fragments of many hosts (shared/spec/LOGS.md);
    /// exit 0 with no incident, 1 with incidents.
    Forensics(payguard_forensics::ForensicsArgs),
    /// Measured comparisons; prints ratios against baselines measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Storm(args) => storm::run(args),
        Command::Audit(args) => audit::run(args),
        Command::CheckHistory(args) => storm::check_history(args),
        Command::Bench(args) => bench::run(args),
        Command::Forensics(args) => {
            let mut out = std::io::stdout().lock();
            payguard_forensics::run(&args, &mut out).map(|code| ExitCode::from(code as u8))
        }
    };
    match result {
        Ok(code) => code,
        // The reader went away (`payguard audit --fix-plan | head -5`): it has
        // what it wanted; end quietly, as ripgrep does.
        Err(e) if payguard_cli::out::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("payguard: {e:#}");
            ExitCode::from(2)
        }
    }
}
