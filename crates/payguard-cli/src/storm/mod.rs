//! `payguard storm`: a duplicate storm against running services, then an audit.
//!
//! It creates accounts (some too poor for their orders) and orders, then fires
//! every deduct `--dup` times at once from different connections (a barrier per
//! wave, each copy to a different `--target` when there are several), mixes in
//! refunds (duplicated, and one that would cross the amount), then reads what it
//! left behind through the API (`observe.rs`), and with `--db` audits the database
//! itself. Every run becomes a history (`history/`): the one checker
//! (`history/check.rs`) decides every invariant on it, the same code that
//! `check-history` runs on a file: orders charged more than once, 200 answers
//! whose entries disagree, acknowledged charges or refunds missing from the
//! ledger, refunds over the amount, balances off their ledger or outside what the
//! answers allow, failed audits, answers no operation may give (`status.rs`).
//! The numbers (throughput, latency, timeline, money lost) are `stats.rs`'s.
//!
//! With `--two-phase F` that share of the orders is authorized instead of
//! deducted, then raced by duplicate captures, voids, both, captures and voids
//! around the hold's expiry, or left to the servers' sweepers (`two_phase.rs`);
//! the run waits for its short holds to be released (at most `--hold-grace-ms`
//! past their expiry), reads every two-phase order and each account's `held`,
//! and the checker's two-phase part (`history/check/two_phase.rs`) judges one
//! hold per order, one winner of capture, void and expiry, every answer naming
//! that winner, the sweepers' liveness and `held` adding up.
//!
//! Liveness is checked too (`liveness.rs`): a 500 is always a violation; in a run
//! without injected faults, so is a 503, a request without an answer, or one
//! slower than `--slow-ms`. A run that injects faults says so with `--faults`:
//! then those are counted, not violations (a 503 still promises nothing moved,
//! and the money checks hold it to that). The report shows every target on its
//! own, over time (`targets.rs`). Exit status 1 when any violation is found.

pub mod history;
mod html;
pub mod liveness;
mod load;
mod observe;
mod report;
mod stats;
pub mod status;
pub mod targets;
mod two_phase;

pub use report::{yuan, Latency, Report, Violation};

use std::path::PathBuf;
use std::process::ExitCode;

/// Per-request timeout; a request past it is recorded as an unknown outcome.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Upper bound on `--orders`, so a typo cannot start an endless storm.
pub const ORDERS_MAX: usize = 10_000_000;
/// Upper bound on `--dup`.
pub const DUP_MAX: usize = 1_000;
/// Default `--hold-grace-ms`: the servers' default `--sweep-interval` (1 s)
/// plus a second of slack for a sweep in progress and a busy machine.
pub const HOLD_GRACE_MS_DEFAULT: u64 = 2_000;
/// Upper bound on `--hold-grace-ms` (the run waits up to this long for expiries).
pub const HOLD_GRACE_MS_MAX: u64 = 600_000;

#[derive(clap::Args, Debug, Clone)]
pub struct StormArgs {
    /// Base URL(s) of the payguard instances, comma separated; duplicates of one
    /// request go to different targets.
    #[arg(
        long,
        env = "PAYGUARD_TARGET",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: Vec<String>,
    /// Bearer API key, when the targets require one.
    #[arg(long, env = "PAYGUARD_API_KEY")]
    pub api_key: Option<String>,
    /// How many orders (the run's size).
    #[arg(long, env = "PAYGUARD_ORDERS", default_value_t = 1_000)]
    pub orders: usize,
    /// Copies of each deduct, fired at the same instant.
    #[arg(long, env = "PAYGUARD_DUP", default_value_t = 4)]
    pub dup: usize,
    /// Requests in flight at once (a wave holds concurrency / dup orders).
    #[arg(long, env = "PAYGUARD_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Upper bound on the storm's length in seconds; no new wave starts after it.
    #[arg(long, env = "PAYGUARD_DURATION", default_value_t = 120)]
    pub duration: u64,
    /// Fraction of paid orders that get refunds (duplicated, plus one over the amount).
    #[arg(long, env = "PAYGUARD_REFUND_RATIO", default_value_t = 0.2)]
    pub refund_ratio: f64,
    /// Fraction of accounts opened with only half of what their orders need.
    #[arg(long, env = "PAYGUARD_POOR_RATIO", default_value_t = 0.1)]
    pub poor_ratio: f64,
    /// Seed of amounts, account assignment and refunds: the same seed, the same storm.
    #[arg(long, env = "PAYGUARD_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Prefix of every id this run creates [default: from the clock], so runs
    /// against one database never collide.
    #[arg(long, env = "PAYGUARD_RUN_TAG")]
    pub run_tag: Option<String>,
    /// Also audit this database directly (`sqlite://PATH` or `postgres://…`).
    #[arg(long, env = "PAYGUARD_DB")]
    pub db: Option<String>,
    /// Print the report as JSON.
    #[arg(long, env = "PAYGUARD_JSON")]
    pub json: bool,
    /// Write a self-contained HTML report (liveness, every target over time,
    /// latency histograms, throughput over time).
    #[arg(long, env = "PAYGUARD_HTML")]
    pub html: Option<PathBuf>,
    /// Record every operation (invoke / ok / fail / unknown) and the final state
    /// as JSON lines, for `payguard check-history`.
    #[arg(long, env = "PAYGUARD_HISTORY")]
    pub history: Option<PathBuf>,
    /// This run injects faults (kills, partitions, failpoints): a 503, an unanswered
    /// or a slow request is counted, not a violation. A 500 always is one.
    #[arg(long, env = "PAYGUARD_FAULTS")]
    pub faults: bool,
    /// Without `--faults`, an answer slower than this (ms) is a violation (`slow_request`).
    #[arg(long, env = "PAYGUARD_SLOW_MS", default_value_t = liveness::SLOW_MS_DEFAULT)]
    pub slow_ms: u64,
    /// No progress bar (it is also hidden with --json or when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Share of orders paid in two phases (authorize, then duplicate captures,
    /// voids, both racing, or nothing: left to expire) instead of by deduct.
    #[arg(long, env = "PAYGUARD_TWO_PHASE", default_value_t = 0.0)]
    pub two_phase: f64,
    /// How long past its `hold_expires_at` a hold may stay AUTHORIZED before the
    /// run calls the sweepers late (`hold_outlived_expiry`): the servers'
    /// `--sweep-interval` plus slack.
    #[arg(long, env = "PAYGUARD_HOLD_GRACE_MS", default_value_t = HOLD_GRACE_MS_DEFAULT)]
    pub hold_grace_ms: u64,
}

impl StormArgs {
    /// A storm started from code (`demo`, the benches): the command line's
    /// defaults, no output of its own, strict (no fault injected), against
    /// `target` and audited in `db`. Callers override what they measure.
    pub fn in_process(target: Vec<String>, db: String) -> Self {
        StormArgs {
            target,
            api_key: None,
            orders: 1_000,
            dup: 4,
            concurrency: 64,
            duration: 600,
            refund_ratio: 0.2,
            poor_ratio: 0.1,
            seed: 7,
            run_tag: None,
            db: Some(db),
            json: true,
            html: None,
            history: None,
            faults: false,
            slow_ms: liveness::SLOW_MS_DEFAULT,
            no_progress: true,
            two_phase: 0.0,
            hold_grace_ms: HOLD_GRACE_MS_DEFAULT,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.target.is_empty(), "--target needs at least one URL");
        for t in &self.target {
            anyhow::ensure!(
                t.starts_with("http://") || t.starts_with("https://"),
                "--target {t:?} is not an http(s) URL"
            );
        }
        anyhow::ensure!(
            (1..=ORDERS_MAX).contains(&self.orders),
            "--orders must be 1..={ORDERS_MAX}"
        );
        anyhow::ensure!(
            (1..=DUP_MAX).contains(&self.dup),
            "--dup must be 1..={DUP_MAX}"
        );
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(self.duration >= 1, "--duration must be at least 1 second");
        anyhow::ensure!(self.slow_ms >= 1, "--slow-ms must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.refund_ratio) && (0.0..=1.0).contains(&self.poor_ratio),
            "--refund-ratio and --poor-ratio are fractions in 0..=1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.two_phase),
            "--two-phase is a fraction in 0..=1"
        );
        anyhow::ensure!(
            (1..=HOLD_GRACE_MS_MAX).contains(&self.hold_grace_ms),
            "--hold-grace-ms must be 1..={HOLD_GRACE_MS_MAX}"
        );
        Ok(())
    }
}

/// Runs a storm and returns its report (used by `payguard demo` and the tests).
///
/// The run becomes a history in memory (`history/mod.rs`), written out with
/// `--history`; the one checker judges it (`history/check.rs`), and the report
/// is the run's statistics (`stats.rs`) plus that verdict.
pub async fn storm(args: &StormArgs) -> anyhow::Result<Report> {
    args.validate()?;
    let run = load::run(args).await?;
    let http = load::Http::new(args)?;
    let rules = liveness::Rules {
        faults: args.faults,
        slow_ms: args.slow_ms,
    };
    let fin = observe::final_state(&http, &run, args.concurrency, args.db.as_deref()).await?;
    let lines = history::lines_of(&run, &http.targets, rules, args.hold_grace_ms, fin);
    if let Some(path) = &args.history {
        history::write(path, &lines)?;
    }
    let verdict = history::judge(&lines, rules)?;
    let fin = history::final_state(&lines)
        .ok_or_else(|| anyhow::anyhow!("the history has no final line"))?;
    Ok(stats::report(
        args,
        &run,
        http.targets.clone(),
        fin,
        verdict,
    ))
}

pub fn run(args: StormArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(storm(&args))?;
    if let Some(path) = &args.html {
        std::fs::write(path, html::render(&report))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::out!("{}", report.to_text());
    }
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(clap::Args, Debug)]
pub struct CheckHistoryArgs {
    /// A history written by `payguard storm --history FILE`.
    pub file: PathBuf,
    /// Print the violations as JSON.
    #[arg(long, env = "PAYGUARD_JSON")]
    pub json: bool,
    /// Judge the history as a run that injected faults, whatever it recorded
    /// (503, unanswered and slow requests counted, not violations).
    #[arg(long, env = "PAYGUARD_FAULTS")]
    pub faults: bool,
    /// The slow-request threshold (ms) [default: the one the run recorded, else 1000].
    #[arg(long, env = "PAYGUARD_SLOW_MS")]
    pub slow_ms: Option<u64>,
}

/// `payguard check-history FILE`: exit 1 when the history breaks an invariant
/// (money or liveness).
pub fn check_history(args: CheckHistoryArgs) -> anyhow::Result<ExitCode> {
    let lines = history::read(&args.file)?;
    let mut rules = history::recorded_rules(&lines);
    rules.faults |= args.faults;
    if let Some(ms) = args.slow_ms {
        anyhow::ensure!(ms >= 1, "--slow-ms must be at least 1");
        rules.slow_ms = ms;
    }
    let violations = history::check_with(&lines, rules)?;
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&violations)?);
    } else if violations.is_empty() {
        crate::outln!(
            "history {}: {} lines, every invariant holds ({})",
            args.file.display(),
            lines.len(),
            if rules.faults {
                "faults injected"
            } else {
                "no faults: every request answered, quickly"
            }
        );
    } else {
        let total: usize = violations.iter().map(Violation::weight).sum();
        crate::outln!("history {}: {total} VIOLATIONS", args.file.display());
        for v in violations.iter().take(50) {
            crate::outln!(
                "  {} {}{}: {}",
                v.kind,
                v.order_id.as_deref().unwrap_or(""),
                v.account_id.as_deref().unwrap_or(""),
                v.detail
            );
            for e in &v.examples {
                crate::outln!("    e.g. {}", e.describe());
            }
        }
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
