//! The storm's statistics, kept apart from its checks: what was sent, what came
//! back and how fast (throughput, latency, a timeline, every target on its own
//! via `targets.rs`), and what the ledger shows (paid orders, replays, double
//! charges, money lost). Nothing here decides a violation: the report is these
//! numbers plus the one checker's verdict (`history/check.rs`).

use super::history::{FinalState, Verdict};
use super::liveness::{self, Rules};
use super::load::{OpKind, Record, Run};
use super::report::{Latency, Report, TwoPhaseStats};
use super::targets;
use super::StormArgs;
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Width of one bucket of the throughput-over-time series.
const TIMELINE_BUCKET_MS: f64 = 100.0;

pub fn latency(records: &[&Record]) -> Latency {
    let mut h = Histogram::<u64>::new(3).expect("histogram bounds");
    for r in records {
        let _ = h.record(r.latency_us.max(1));
    }
    if h.is_empty() {
        return Latency::default();
    }
    let mut buckets = Vec::new();
    let mut upper = 0.125_f64;
    let mut below = 0;
    while upper < 120_000.0 {
        let n = h.count_between(0, (upper * 1000.0) as u64);
        buckets.push((upper, n - below));
        below = n;
        if n == h.len() {
            break;
        }
        upper *= 2.0;
    }
    Latency {
        count: h.len(),
        p50_ms: h.value_at_quantile(0.50) as f64 / 1e3,
        p90_ms: h.value_at_quantile(0.90) as f64 / 1e3,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: h.max() as f64 / 1e3,
        buckets,
    }
}

/// A request of the storm proper (not a create).
fn in_storm(r: &Record) -> bool {
    !matches!(r.kind, OpKind::CreateAccount | OpKind::CreateOrder)
}

/// Completed storm requests (deducts, authorizes, captures, voids, refunds)
/// per 100 ms since the first deduct or authorize.
fn timeline(records: &[Record]) -> Vec<u64> {
    let storm = || records.iter().filter(|r| in_storm(r));
    let start_ms = storm()
        .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Authorize))
        .map(|r| r.started_ms)
        .fold(f64::INFINITY, f64::min);
    let mut timeline = Vec::new();
    if !start_ms.is_finite() {
        return timeline;
    }
    for r in storm() {
        let done = r.started_ms + r.latency_us as f64 / 1e3 - start_ms;
        let b = (done.max(0.0) / TIMELINE_BUCKET_MS) as usize;
        if timeline.len() <= b {
            timeline.resize(b + 1, 0);
        }
        timeline[b] += 1;
    }
    timeline
}

/// What the ledger shows: orders debited (or captured) more than once, the
/// money that cost (Σ of every debit or capture past an order's first, minor
/// units), and refunds that moved.
#[derive(Default)]
struct Ledgered {
    double_charged: usize,
    money_lost: i64,
    refunds_moved: usize,
}

fn ledgered(run: &Run, fin: &FinalState) -> Ledgered {
    let mut taken: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut l = Ledgered::default();
    for e in &fin.ledger {
        match e.kind.as_str() {
            "debit" | "capture" => taken.entry(e.order.as_str()).or_default().push(e.amount),
            "refund" => l.refunds_moved += 1,
            _ => {}
        }
    }
    for o in &run.orders {
        if let Some([_, extra @ ..]) = taken.get(o.id.as_str()).map(Vec::as_slice) {
            if !extra.is_empty() {
                l.double_charged += 1;
                l.money_lost += extra.iter().sum::<i64>();
            }
        }
    }
    l
}

/// Whether every audit of `source` passed (`None`: none ran).
fn audit_ok(fin: &FinalState, source: &str) -> Option<bool> {
    fin.audits
        .iter()
        .filter(|a| a.source == source)
        .fold(None, |ok, a| Some(ok.unwrap_or(true) && a.ok))
}

/// Orders with at least one deduct answered `status`.
fn orders_with(records: &[Record], status: u16) -> usize {
    records
        .iter()
        .filter(|r| r.kind == OpKind::Deduct && r.status == status)
        .filter_map(|r| r.order)
        .collect::<HashSet<usize>>()
        .len()
}

/// The two-phase orders: how their authorizes were answered, what ended each
/// hold (as read after the run), and every capture and void answer.
fn two_phase(run: &Run, fin: &FinalState) -> Option<TwoPhaseStats> {
    let sent: HashSet<usize> = run
        .records
        .iter()
        .filter(|r| r.kind == OpKind::Authorize)
        .filter_map(|r| r.order)
        .collect();
    if sent.is_empty() {
        return None;
    }
    let mut t = TwoPhaseStats {
        orders: sent.len(),
        short_holds: sent
            .iter()
            .filter(|i| {
                run.orders[**i]
                    .two_phase
                    .as_ref()
                    .is_some_and(|p| p.ttl_s.is_some())
            })
            .count(),
        ..TwoPhaseStats::default()
    };
    let amount_of: HashMap<&str, i64> = run
        .orders
        .iter()
        .map(|o| (o.id.as_str(), o.amount))
        .collect();
    for o in &fin.orders {
        *t.final_status.entry(o.status.clone()).or_default() += 1;
        if o.captured
            .is_some_and(|c| amount_of.get(o.id.as_str()) != Some(&c))
        {
            t.partial_captures += 1;
        }
    }
    for r in &run.records {
        let op = match r.kind {
            OpKind::Authorize | OpKind::Capture | OpKind::Void => r.kind.name(),
            _ => continue,
        };
        let answer = match (r.status, r.replayed, r.code.as_deref()) {
            (200, Some(true), _) => "200 replayed".to_owned(),
            (200, _, _) => "200".to_owned(),
            (0, ..) => "no answer".to_owned(),
            (s, _, Some(c)) => format!("{s} {c}"),
            (s, _, None) => s.to_string(),
        };
        *t.answers.entry(format!("{op} {answer}")).or_default() += 1;
    }
    Some(t)
}

/// The report: the run's statistics, plus the checker's verdict.
pub fn report(
    args: &StormArgs,
    run: &Run,
    targets: Vec<String>,
    fin: &FinalState,
    verdict: Verdict,
) -> Report {
    let records = &run.records;
    let by_kind = |k: OpKind| -> Vec<&Record> { records.iter().filter(|r| r.kind == k).collect() };
    let lat = OpKind::ALL
        .iter()
        .map(|k| (k.name(), latency(&by_kind(*k))))
        .collect();
    let deducts = by_kind(OpKind::Deduct);
    let replayed = |flag: bool| {
        deducts
            .iter()
            .filter(|r| r.status == 200 && r.replayed == Some(flag))
            .count()
    };
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        *by_status.entry(r.status.to_string()).or_default() += 1;
    }
    let storm_requests = records.iter().filter(|r| in_storm(r)).count();
    let span_ms = records.iter().map(|r| r.started_ms).fold(0.0, f64::max);
    let l = &verdict.liveness;
    let rules = Rules {
        faults: l.faults,
        slow_ms: l.slow_ms,
    };
    let bucket_ms = targets::bucket_ms(span_ms);
    let money = ledgered(run, fin);
    Report {
        ok: verdict.violations.is_empty(),
        per_target: targets::per_target(&targets, records, rules, bucket_ms),
        target_bucket_ms: bucket_ms,
        targets,
        run_tag: run.tag.clone(),
        seed: args.seed,
        orders: run.orders.len(),
        accounts: run.accounts.len(),
        poor_accounts: run.accounts.iter().filter(|a| a.poor).count(),
        dup: args.dup,
        concurrency: args.concurrency,
        waves: run.waves,
        cut_short: run.cut_short,
        storm_secs: run.storm_secs,
        requests: records.len(),
        by_status,
        deducts_per_sec: deducts.len() as f64 / run.deduct_secs.max(1e-9),
        requests_per_sec: storm_requests as f64 / run.storm_secs.max(1e-9),
        latency: lat,
        replays: replayed(true),
        originals: replayed(false),
        paid_orders: orders_with(records, 200),
        refused_insufficient: orders_with(records, 402),
        refunds_moved: money.refunds_moved,
        double_charged_orders: money.double_charged,
        money_lost: money.money_lost,
        unavailable_503: l.count(liveness::UNAVAILABLE),
        no_answer: l.count(liveness::UNANSWERED),
        server_errors_500: l.count(liveness::SERVER_ERROR),
        slow_requests: l.count(liveness::SLOW_REQUEST),
        api_audit_ok: audit_ok(fin, "api"),
        db_audit_ok: audit_ok(fin, "db"),
        liveness: verdict.liveness,
        violations: verdict.violations,
        timeline: timeline(records),
        two_phase: two_phase(run, fin),
    }
}
