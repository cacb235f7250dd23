//! The storm's verdict: every invariant checked through the API (and, with
//! `--db`, in the database itself), against what the clients were told.

use super::load::{Http, OpKind, Record, Run};
use super::StormArgs;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Width of one bucket of the throughput-over-time series.
const TIMELINE_BUCKET_MS: f64 = 100.0;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    /// `charged_more_than_once`, `entry_id_disagrees`, `acknowledged_charge_missing`,
    /// `refund_over_amount`, `acknowledged_refund_missing`, `balance_drift`,
    /// `server_error`, `unexpected_status`, `api_audit_failed`, `db_audit_failed`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub detail: String,
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
    pub api_audit_ok: Option<bool>,
    pub db_audit_ok: Option<bool>,
    pub violations: Vec<Violation>,
    /// Completed requests per 100 ms since the storm began.
    pub timeline: Vec<u64>,
}

fn latency(records: &[&Record]) -> Latency {
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

/// Statuses each operation may legitimately answer; anything else is a violation.
fn expected_status(kind: OpKind, status: u16) -> bool {
    match kind {
        OpKind::CreateAccount | OpKind::CreateOrder => matches!(status, 200 | 201 | 503 | 0),
        OpKind::Deduct => matches!(status, 200 | 402 | 503 | 0),
        OpKind::Refund => matches!(status, 200 | 409 | 503 | 0),
    }
}

struct Ledger {
    debits: Vec<(String, i64)>,
    refunds: Vec<(String, String, i64)>,
}

fn ledger_of(body: &Value) -> Option<Ledger> {
    let entries = body["entries"].as_array()?;
    let mut l = Ledger {
        debits: Vec::new(),
        refunds: Vec::new(),
    };
    for e in entries {
        let id = e["id"].as_str().unwrap_or_default().to_owned();
        let amount = e["amount"].as_i64().unwrap_or(0);
        match e["kind"].as_str() {
            Some("debit") => l.debits.push((id, amount)),
            Some("refund") => l.refunds.push((
                id,
                e["refund_id"].as_str().unwrap_or_default().to_owned(),
                amount,
            )),
            _ => {}
        }
    }
    Some(l)
}

pub async fn check(args: &StormArgs, run: Run) -> anyhow::Result<Report> {
    let http = Http::new(args)?;
    let mut violations = Vec::new();
    let records = &run.records;

    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        *by_status.entry(r.status.to_string()).or_default() += 1;
        if r.status == 500 {
            violations.push(Violation {
                kind: "server_error",
                order_id: r.order.map(|i| run.orders[i].id.clone()),
                account_id: None,
                detail: format!("{} answered 500", r.kind.name()),
            });
        } else if !expected_status(r.kind, r.status) {
            violations.push(Violation {
                kind: "unexpected_status",
                order_id: r.order.map(|i| run.orders[i].id.clone()),
                account_id: None,
                detail: format!(
                    "{} answered {} {}",
                    r.kind.name(),
                    r.status,
                    r.code.as_deref().unwrap_or("")
                ),
            });
        }
    }

    // Per order: what the clients were told.
    let mut deducts: HashMap<usize, Vec<&Record>> = HashMap::new();
    let mut refunds: HashMap<usize, Vec<&Record>> = HashMap::new();
    for r in records {
        match (r.kind, r.order) {
            (OpKind::Deduct, Some(i)) => deducts.entry(i).or_default().push(r),
            (OpKind::Refund, Some(i)) => refunds.entry(i).or_default().push(r),
            _ => {}
        }
    }

    // The ledger of every order, through the API.
    let ledgers: Vec<(usize, Option<Ledger>)> = stream::iter(0..run.orders.len())
        .map(|i| {
            let http = &http;
            let path = format!("/v1/orders/{}/entries", run.orders[i].id);
            async move {
                let (status, body) = http.call(0, reqwest::Method::GET, &path, None).await;
                (
                    i,
                    if status == 200 {
                        ledger_of(&body)
                    } else {
                        None
                    },
                )
            }
        })
        .buffer_unordered(args.concurrency.clamp(1, 64))
        .collect()
        .await;

    let mut money_lost = 0_i64;
    let mut double_charged = 0;
    let mut debited_by_account = vec![0_i64; run.accounts.len()];
    let mut refunded_by_account = vec![0_i64; run.accounts.len()];
    let mut acked_by_account = vec![0_i64; run.accounts.len()];
    let mut unknown_account = vec![false; run.accounts.len()];
    let mut refunds_moved = 0;
    for (i, ledger) in &ledgers {
        let order = &run.orders[*i];
        let acct = order.account;
        let oid = Some(order.id.clone());
        let Some(ledger) = ledger else {
            violations.push(Violation {
                kind: "unexpected_status",
                order_id: oid,
                account_id: None,
                detail: "could not read the order's entries".into(),
            });
            unknown_account[acct] = true;
            continue;
        };
        let told = deducts.get(i).map(Vec::as_slice).unwrap_or_default();
        let acked: HashSet<&str> = told
            .iter()
            .filter(|r| r.status == 200)
            .filter_map(|r| r.entry_id.as_deref())
            .collect();
        if told.iter().any(|r| matches!(r.status, 0 | 503)) {
            unknown_account[acct] = true;
        }
        if ledger.debits.len() > 1 {
            double_charged += 1;
            let lost = (ledger.debits.len() as i64 - 1) * order.amount;
            money_lost += lost;
            violations.push(Violation {
                kind: "charged_more_than_once",
                order_id: oid.clone(),
                account_id: None,
                detail: format!(
                    "{} debits of {} (lost {lost})",
                    ledger.debits.len(),
                    order.amount
                ),
            });
        }
        if acked.len() > 1 {
            violations.push(Violation {
                kind: "entry_id_disagrees",
                order_id: oid.clone(),
                account_id: None,
                detail: format!("200 responses named {} different entries", acked.len()),
            });
        }
        for e in &acked {
            if !ledger.debits.iter().any(|(id, _)| id == e) {
                violations.push(Violation {
                    kind: "acknowledged_charge_missing",
                    order_id: oid.clone(),
                    account_id: None,
                    detail: format!("entry {e} was acknowledged but is not in the ledger"),
                });
            }
        }
        if !acked.is_empty() {
            acked_by_account[acct] -= order.amount;
        }
        debited_by_account[acct] += ledger.debits.iter().map(|(_, a)| a).sum::<i64>();
        let refunded: i64 = ledger.refunds.iter().map(|(_, _, a)| a).sum();
        refunds_moved += ledger.refunds.len();
        refunded_by_account[acct] += refunded;
        if refunded > order.amount {
            violations.push(Violation {
                kind: "refund_over_amount",
                order_id: oid.clone(),
                account_id: None,
                detail: format!("refunded {refunded} of {}", order.amount),
            });
        }
        let told_refunds = refunds.get(i).map(Vec::as_slice).unwrap_or_default();
        if told_refunds.iter().any(|r| matches!(r.status, 0 | 503)) {
            unknown_account[acct] = true;
        }
        let acked_refunds: HashMap<&str, i64> = told_refunds
            .iter()
            .filter(|r| r.status == 200)
            .filter_map(|r| r.refund_id.as_deref().map(|id| (id, r.amount)))
            .collect();
        for (rid, amount) in &acked_refunds {
            if !ledger.refunds.iter().any(|(_, id, _)| id == rid) {
                violations.push(Violation {
                    kind: "acknowledged_refund_missing",
                    order_id: oid.clone(),
                    account_id: None,
                    detail: format!("refund {rid} was acknowledged but is not in the ledger"),
                });
            }
            acked_by_account[acct] += amount;
        }
    }

    // Balances: against the ledger, and against what the clients were told.
    let balances: Vec<(usize, u16, Value)> = stream::iter(0..run.accounts.len())
        .map(|a| {
            let http = &http;
            let path = format!("/v1/accounts/{}", run.accounts[a].id);
            async move {
                let (s, b) = http.call(0, reqwest::Method::GET, &path, None).await;
                (a, s, b)
            }
        })
        .buffer_unordered(args.concurrency.clamp(1, 64))
        .collect()
        .await;
    for (a, status, body) in balances {
        let acct = &run.accounts[a];
        let Some(actual) = body["balance"].as_i64().filter(|_| status == 200) else {
            violations.push(Violation {
                kind: "unexpected_status",
                order_id: None,
                account_id: Some(acct.id.clone()),
                detail: format!("reading the account answered {status}"),
            });
            continue;
        };
        let from_ledger = acct.opening - debited_by_account[a] + refunded_by_account[a];
        if actual != from_ledger || actual < 0 {
            violations.push(Violation {
                kind: "balance_drift",
                order_id: None,
                account_id: Some(acct.id.clone()),
                detail: format!("balance {actual}, the ledger says {from_ledger}"),
            });
        }
        let from_acks = acct.opening + acked_by_account[a];
        if !unknown_account[a] && actual != from_acks {
            violations.push(Violation {
                kind: "balance_drift",
                order_id: None,
                account_id: Some(acct.id.clone()),
                detail: format!(
                    "balance {actual}, but the clients were told it would be {from_acks} (off by {})",
                    from_acks - actual
                ),
            });
        }
    }

    // The services' own audit, and the database's.
    let mut api_audit_ok = None;
    for t in 0..http.targets.len() {
        let (status, body) = http.call(t, reqwest::Method::GET, "/v1/audit", None).await;
        let ok = status == 200 && body["ok"] == Value::Bool(true);
        api_audit_ok = Some(api_audit_ok.unwrap_or(true) && ok);
        if !ok {
            violations.push(Violation {
                kind: "api_audit_failed",
                order_id: None,
                account_id: None,
                detail: format!("{} /v1/audit: {status} {body}", http.targets[t]),
            });
        }
    }
    let mut db_audit_ok = None;
    if let Some(url) = &args.db {
        let report = crate::audit::audit_url(url).await?;
        db_audit_ok = Some(report.ok);
        if !report.ok {
            violations.push(Violation {
                kind: "db_audit_failed",
                order_id: None,
                account_id: None,
                detail: serde_json::to_string(&report)?,
            });
        }
    }

    let by_kind = |k: OpKind| -> Vec<&Record> { records.iter().filter(|r| r.kind == k).collect() };
    let mut lat = BTreeMap::new();
    for k in [
        OpKind::CreateAccount,
        OpKind::CreateOrder,
        OpKind::Deduct,
        OpKind::Refund,
    ] {
        lat.insert(k.name(), latency(&by_kind(k)));
    }
    let deduct_records = by_kind(OpKind::Deduct);
    let replays = deduct_records
        .iter()
        .filter(|r| r.status == 200 && r.replayed == Some(true))
        .count();
    let originals = deduct_records
        .iter()
        .filter(|r| r.status == 200 && r.replayed == Some(false))
        .count();
    let paid_orders = deducts
        .values()
        .filter(|rs| rs.iter().any(|r| r.status == 200))
        .count();
    let refused_insufficient = deducts
        .values()
        .filter(|rs| rs.iter().any(|r| r.status == 402))
        .count();
    let storm_start_ms = records
        .iter()
        .filter(|r| r.kind == OpKind::Deduct)
        .map(|r| r.started_ms)
        .fold(f64::INFINITY, f64::min);
    let mut timeline = Vec::new();
    if storm_start_ms.is_finite() {
        for r in records
            .iter()
            .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Refund))
        {
            let done = r.started_ms + r.latency_us as f64 / 1e3 - storm_start_ms;
            let b = (done.max(0.0) / TIMELINE_BUCKET_MS) as usize;
            if timeline.len() <= b {
                timeline.resize(b + 1, 0);
            }
            timeline[b] += 1;
        }
    }
    let storm_requests = records
        .iter()
        .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Refund))
        .count();
    Ok(Report {
        ok: violations.is_empty(),
        targets: http.targets.clone(),
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
        deducts_per_sec: deduct_records.len() as f64 / run.deduct_secs.max(1e-9),
        requests_per_sec: storm_requests as f64 / run.storm_secs.max(1e-9),
        latency: lat,
        replays,
        originals,
        paid_orders,
        refused_insufficient,
        refunds_moved,
        double_charged_orders: double_charged,
        money_lost,
        unavailable_503: records.iter().filter(|r| r.status == 503).count(),
        no_answer: records.iter().filter(|r| r.status == 0).count(),
        server_errors_500: records.iter().filter(|r| r.status == 500).count(),
        api_audit_ok,
        db_audit_ok,
        violations,
        timeline,
    })
}

/// `1185000` → `¥11,850.00` (integer arithmetic only).
pub fn yuan(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let major = (abs / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in major.chars().enumerate() {
        if i > 0 && (major.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}¥{grouped}.{:02}", abs % 100)
}

impl Report {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
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
        let _ = writeln!(
            s,
            "  503 (nothing moved, retryable): {}   no answer: {}   500: {}",
            self.unavailable_503, self.no_answer, self.server_errors_500
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
        if self.violations.is_empty() {
            let _ = writeln!(s, "  violations: 0");
        } else {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for v in &self.violations {
                *kinds.entry(v.kind).or_default() += 1;
            }
            let _ = writeln!(s, "  VIOLATIONS: {} {:?}", self.violations.len(), kinds);
            for v in self.violations.iter().take(10) {
                let _ = writeln!(
                    s,
                    "    {} {}{}: {}",
                    v.kind,
                    v.order_id.as_deref().unwrap_or(""),
                    v.account_id.as_deref().unwrap_or(""),
                    v.detail
                );
            }
            if self.violations.len() > 10 {
                let _ = writeln!(s, "    … {} more (see --json)", self.violations.len() - 10);
            }
        }
        s
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
