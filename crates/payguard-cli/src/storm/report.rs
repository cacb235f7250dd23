//! The storm's report: what was sent, what came back, what the checks found,
//! as a struct (`--json`) and as text. The HTML page is `html.rs`.

use super::liveness::{Example, Liveness};
use super::targets::TargetStats;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Violations printed in the text report (the rest: `--json`).
const TEXT_VIOLATIONS_MAX: usize = 10;
/// Widest over-time line in the text report; more buckets are merged.
const TEXT_COLUMNS_MAX: usize = 100;
/// Latency levels of the text sparkline, lowest first.
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Violation {
    /// Decided by the one checker (`history/check.rs`): `unexpected_status`,
    /// `charged_more_than_once`, `replays_disagree`, `ok_not_charged_once`,
    /// `failed_but_charged`, `refund_over_amount`, `ok_refund_missing`,
    /// `balance_drift`, `balance_outside_history`, `negative_balance`,
    /// `account_missing`, `api_audit_failed`, `db_audit_failed`; two-phase
    /// (`history/check/two_phase.rs`): `held_more_than_once`,
    /// `hold_replays_disagree`, `ok_hold_missing`, `failed_but_held`,
    /// `paths_mixed`, `captured_more_than_once`, `captured_and_released`,
    /// `released_more_than_once`, `order_off_ledger`, `settle_replays_disagree`,
    /// `ok_capture_not_captured`, `ok_void_not_voided`,
    /// `refusal_names_wrong_winner`, `hold_outlived_expiry`,
    /// `refund_over_captured`, `held_mismatch`; liveness: `server_error`,
    /// `unavailable`, `unanswered`, `slow_request`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub detail: String,
    /// Requests this one violation stands for (the liveness kinds: one per kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// A few of those requests, earliest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
}

impl Violation {
    pub fn new(
        kind: &'static str,
        order_id: Option<String>,
        account_id: Option<String>,
        detail: String,
    ) -> Self {
        Violation {
            kind,
            order_id,
            account_id,
            detail,
            count: None,
            examples: Vec::new(),
        }
    }

    /// Requests (or findings) this violation stands for.
    pub fn weight(&self) -> usize {
        self.count.unwrap_or(1)
    }
}

/// The two-phase orders of a run (`--two-phase`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct TwoPhaseStats {
    /// Orders an authorize was sent for.
    pub orders: usize,
    /// Of those, authorized with a short `hold_ttl_s`, to expire mid-run.
    pub short_holds: usize,
    /// Status of each as read after the run (`PAID`, `VOIDED`, `EXPIRED`, …).
    pub final_status: BTreeMap<String, usize>,
    /// Orders captured for less than their amount.
    pub partial_captures: usize,
    /// `"<op> <status> [<code>|replayed]"` → answers.
    pub answers: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Histogram for the HTML page: (upper bound ms, count), log-spaced.
    pub buckets: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub targets: Vec<String>,
    pub run_tag: String,
    pub seed: u64,
    pub orders: usize,
    pub accounts: usize,
    /// Accounts opened with half of what their orders need (402s expected there).
    pub poor_accounts: usize,
    pub dup: usize,
    pub concurrency: usize,
    pub waves: usize,
    pub cut_short: bool,
    pub storm_secs: f64,
    pub requests: usize,
    pub by_status: BTreeMap<String, usize>,
    pub deducts_per_sec: f64,
    pub requests_per_sec: f64,
    pub latency: BTreeMap<&'static str, Latency>,
    /// Deduct answers 200 with `replayed: true`.
    pub replays: usize,
    /// Deduct answers 200 with `replayed: false` (one per paid order when correct).
    pub originals: usize,
    pub paid_orders: usize,
    pub refused_insufficient: usize,
    pub refunds_moved: usize,
    pub double_charged_orders: usize,
    /// Σ over orders of (debits − 1) × amount, in minor units.
    pub money_lost: i64,
    pub unavailable_503: usize,
    pub no_answer: usize,
    pub server_errors_500: usize,
    /// Answered, but slower than `--slow-ms`.
    pub slow_requests: usize,
    /// The four liveness kinds: counts, whether this run counts them as
    /// violations (`--faults`), examples.
    pub liveness: Liveness,
    /// Each target on its own, with its requests over time.
    pub per_target: Vec<TargetStats>,
    /// Width of `per_target[_].buckets` (ms, by request start since the run began).
    pub target_bucket_ms: u64,
    pub api_audit_ok: Option<bool>,
    pub db_audit_ok: Option<bool>,
    pub violations: Vec<Violation>,
    /// Completed requests per 100 ms since the storm began.
    pub timeline: Vec<u64>,
    /// `--two-phase`: the two-phase orders and their answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub two_phase: Option<TwoPhaseStats>,
}

/// `1185000` → `¥11,850.00` (integer arithmetic only).
pub fn yuan(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let major = (abs / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in major.chars().enumerate() {
        if i > 0 && (major.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}¥{grouped}.{:02}", abs % 100)
}

impl Report {
    /// Requests and findings behind the violations (a liveness violation counts
    /// each of its requests).
    pub fn violation_count(&self) -> usize {
        self.violations.iter().map(Violation::weight).sum()
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.text_load(&mut s);
        self.text_money(&mut s);
        self.text_liveness(&mut s);
        self.text_targets(&mut s);
        self.text_violations(&mut s);
        s
    }

    fn text_load(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "storm {}: {} orders × {} duplicates against {} ({} waves{})",
            self.run_tag,
            self.orders,
            self.dup,
            self.targets.join(", "),
            self.waves,
            if self.cut_short {
                ", CUT SHORT by --duration"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "  throughput: {:.0} deducts/s, {:.0} requests/s over {:.2} s",
            self.deducts_per_sec, self.requests_per_sec, self.storm_secs
        );
        let _ = writeln!(
            s,
            "  latency (ms)      count      p50      p90      p99      max"
        );
        for (k, l) in &self.latency {
            if l.count > 0 {
                let _ = writeln!(
                    s,
                    "    {k:<14} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                );
            }
        }
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(k, v)| format!("{}: {v}", if k == "0" { "no answer" } else { k }))
            .collect();
        let _ = writeln!(s, "  statuses: {}", statuses.join(", "));
    }

    fn text_money(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "  paid orders {}, refused (402) {}, deduct originals {}, replays {}, refunds moved {}",
            self.paid_orders,
            self.refused_insufficient,
            self.originals,
            self.replays,
            self.refunds_moved
        );
        let _ = writeln!(
            s,
            "  double-charged orders: {}   money lost: {} ({} fen)",
            self.double_charged_orders,
            yuan(self.money_lost),
            self.money_lost
        );
        let audit = |v: Option<bool>| match v {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "not run",
        };
        let _ = writeln!(
            s,
            "  audit: api {}, database {}",
            audit(self.api_audit_ok),
            audit(self.db_audit_ok)
        );
        self.text_two_phase(s);
    }

    fn text_two_phase(&self, s: &mut String) {
        let Some(t) = &self.two_phase else { return };
        let join = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "  two-phase: {} orders ({} short holds), {} partial captures; ended: {}",
            t.orders,
            t.short_holds,
            t.partial_captures,
            join(&t.final_status)
        );
        let _ = writeln!(s, "    answers: {}", join(&t.answers));
    }

    fn text_liveness(&self, s: &mut String) {
        let l = &self.liveness;
        let _ = writeln!(
            s,
            "  liveness ({}; slow: over {} ms):",
            if l.faults {
                "--faults: only a 500 is a violation"
            } else {
                "no faults injected: every request answered, quickly, never 503 or 500"
            },
            l.slow_ms
        );
        for (kind, k) in &l.kinds {
            let verdict = match (k.count, k.violation) {
                (0, _) => "",
                (_, true) => "  VIOLATION",
                (_, false) => "  (allowed: --faults)",
            };
            let _ = writeln!(s, "    {kind:<13} {:>8}{verdict}", k.count);
        }
    }

    fn text_targets(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "  {:<12}{:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}  target",
            "per target",
            "requests",
            "2xx",
            "4xx",
            "503",
            "500",
            "no answer",
            "slow",
            "p50 ms",
            "p99 ms",
            "max ms"
        );
        for t in &self.per_target {
            let st = &t.statuses;
            let _ = writeln!(
                s,
                "  {:<12}{:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8.2} {:>8.2} {:>8.2}  {}",
                "",
                t.requests,
                st.ok_2xx,
                st.refused_4xx,
                st.unavailable_503,
                st.server_error_500,
                st.unanswered,
                t.slow,
                t.p50_ms,
                t.p99_ms,
                t.max_ms,
                t.target
            );
        }
        self.text_over_time(s);
    }

    /// One sparkline of max latency and one line of marks per target, on a
    /// shared scale, so the one instance that stalled stands out.
    fn text_over_time(&self, s: &mut String) {
        let n = self
            .per_target
            .iter()
            .map(|t| t.buckets.len())
            .max()
            .unwrap_or(0);
        if n == 0 {
            return;
        }
        let per_col = n.div_ceil(TEXT_COLUMNS_MAX);
        let peak = self
            .per_target
            .iter()
            .map(|t| t.max_ms)
            .fold(self.liveness.slow_ms as f64, f64::max);
        let _ = writeln!(
            s,
            "  over time ({} ms per column, by request start; height: max latency, full = {peak:.0} ms; \
             marks: . answered, s slow, x 503/500/no answer):",
            self.target_bucket_ms * per_col as u64
        );
        for t in &self.per_target {
            let (mut spark, mut marks) = (String::new(), String::new());
            for col in t.buckets.chunks(per_col) {
                let requests: usize = col.iter().map(|b| b.requests).sum();
                let failed: usize = col.iter().map(|b| b.statuses.failed()).sum();
                let slow: usize = col.iter().map(|b| b.slow).sum();
                let max = col.iter().map(|b| b.max_ms).fold(0.0, f64::max);
                if requests == 0 {
                    spark.push(' ');
                    marks.push(' ');
                    continue;
                }
                let level = ((max / peak) * SPARK.len() as f64).ceil() as usize;
                spark.push(SPARK[level.clamp(1, SPARK.len()) - 1]);
                marks.push(match (failed, slow) {
                    (0, 0) => '.',
                    (0, _) => 's',
                    _ => 'x',
                });
            }
            let _ = writeln!(
                s,
                "    {}\n      latency {spark}\n      status  {marks}",
                t.target
            );
        }
    }

    fn text_violations(&self, s: &mut String) {
        if self.violations.is_empty() {
            let _ = writeln!(s, "  violations: 0");
            return;
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            *kinds.entry(v.kind).or_default() += v.weight();
        }
        let _ = writeln!(s, "  VIOLATIONS: {} {:?}", self.violation_count(), kinds);
        for v in self.violations.iter().take(TEXT_VIOLATIONS_MAX) {
            let _ = writeln!(
                s,
                "    {} {}{}: {}",
                v.kind,
                v.order_id.as_deref().unwrap_or(""),
                v.account_id.as_deref().unwrap_or(""),
                v.detail
            );
            for e in &v.examples {
                let _ = writeln!(s, "      e.g. {}", e.describe());
            }
        }
        if self.violations.len() > TEXT_VIOLATIONS_MAX {
            let _ = writeln!(
                s,
                "    … {} more (see --json)",
                self.violations.len() - TEXT_VIOLATIONS_MAX
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::yuan;

    #[test]
    fn yuan_is_grouped_integer_arithmetic() {
        assert_eq!(yuan(1_185_000), "¥11,850.00");
        assert_eq!(yuan(237_000_000), "¥2,370,000.00");
        assert_eq!(yuan(5), "¥0.05");
        assert_eq!(yuan(-123_456), "-¥1,234.56");
    }
}
