//! The storm's verdict: every invariant checked through the API (and, with
//! `--db`, in the database itself), against what the clients were told, and
//! liveness (`liveness.rs`) over every request that was sent.

use super::liveness::{self, Example, Liveness, Rules};
use super::load::{Http, OpKind, Record, Run};
use super::report::{latency, Report, Violation};
use super::targets;
use super::StormArgs;
use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Width of one bucket of the throughput-over-time series.
const TIMELINE_BUCKET_MS: f64 = 100.0;
/// Reads in flight at once while checking (entries, balances).
const CHECK_READS_MAX: usize = 64;

/// Statuses each operation may legitimately answer; anything else is a violation.
/// 503 and no answer are liveness's to judge (`liveness.rs`), 500 too.
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

/// What the clients were told, per order index.
struct Told<'a> {
    deducts: HashMap<usize, Vec<&'a Record>>,
    refunds: HashMap<usize, Vec<&'a Record>>,
}

impl<'a> Told<'a> {
    fn of(records: &'a [Record]) -> Self {
        let mut t = Told {
            deducts: HashMap::new(),
            refunds: HashMap::new(),
        };
        for r in records {
            match (r.kind, r.order) {
                (OpKind::Deduct, Some(i)) => t.deducts.entry(i).or_default().push(r),
                (OpKind::Refund, Some(i)) => t.refunds.entry(i).or_default().push(r),
                _ => {}
            }
        }
        t
    }
}

/// Per account index: what moved by the ledger, what the clients were told,
/// and whether some answer never came (then the told balance is not checked).
struct Accounts {
    debited: Vec<i64>,
    refunded: Vec<i64>,
    acked: Vec<i64>,
    unknown: Vec<bool>,
}

/// What the money checks counted.
#[derive(Default)]
struct Money {
    double_charged: usize,
    money_lost: i64,
    refunds_moved: usize,
}

/// The request as liveness reports it.
fn example(run: &Run, targets: &[String], r: &Record) -> Example {
    Example {
        op: r.kind.name().to_owned(),
        order_id: r.order.map(|i| run.orders[i].id.clone()),
        target: targets[r.target % targets.len().max(1)].clone(),
        status: r.status,
        latency_ms: r.latency_us as f64 / 1e3,
        started_ms: r.started_ms,
        error: r.error.map(str::to_owned),
    }
}

/// Liveness over every request sent (setup included).
fn assess_liveness(rules: Rules, run: &Run, targets: &[String]) -> Liveness {
    liveness::assess(
        rules,
        run.records
            .iter()
            .filter(|r| !liveness::kinds_of(rules, r.status, r.latency_us as f64 / 1e3).is_empty())
            .map(|r| example(run, targets, r)),
    )
}

/// Answers no operation may give (500, 503 and no answer are liveness's).
fn status_violations(run: &Run) -> Vec<Violation> {
    run.records
        .iter()
        .filter(|r| !matches!(r.status, 500) && !expected_status(r.kind, r.status))
        .map(|r| {
            Violation::new(
                "unexpected_status",
                r.order.map(|i| run.orders[i].id.clone()),
                None,
                format!(
                    "{} answered {} {}",
                    r.kind.name(),
                    r.status,
                    r.code.as_deref().unwrap_or("")
                ),
            )
        })
        .collect()
}

/// The ledger of every order, through the API (`None`: it could not be read).
async fn read_ledgers(http: &Http, run: &Run, concurrency: usize) -> Vec<(usize, Option<Ledger>)> {
    stream::iter(0..run.orders.len())
        .map(|i| {
            let path = format!("/v1/orders/{}/entries", run.orders[i].id);
            async move {
                let (status, body) = http.call(0, reqwest::Method::GET, &path, None).await;
                (
                    i,
                    Some(body)
                        .filter(|_| status == 200)
                        .and_then(|b| ledger_of(&b)),
                )
            }
        })
        .buffer_unordered(concurrency.clamp(1, CHECK_READS_MAX))
        .collect()
        .await
}

/// One order's debits against what its deducts were told.
fn check_debits(
    order: (&str, i64),
    ledger: &Ledger,
    told: &[&Record],
    money: &mut Money,
    out: &mut Vec<Violation>,
) -> bool {
    let (id, amount) = order;
    let oid = || Some(id.to_owned());
    let acked: HashSet<&str> = told
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.entry_id.as_deref())
        .collect();
    if ledger.debits.len() > 1 {
        money.double_charged += 1;
        let lost = (ledger.debits.len() as i64 - 1) * amount;
        money.money_lost += lost;
        out.push(Violation::new(
            "charged_more_than_once",
            oid(),
            None,
            format!("{} debits of {amount} (lost {lost})", ledger.debits.len()),
        ));
    }
    if acked.len() > 1 {
        out.push(Violation::new(
            "entry_id_disagrees",
            oid(),
            None,
            format!("200 responses named {} different entries", acked.len()),
        ));
    }
    for e in &acked {
        if !ledger.debits.iter().any(|(id, _)| id == e) {
            out.push(Violation::new(
                "acknowledged_charge_missing",
                oid(),
                None,
                format!("entry {e} was acknowledged but is not in the ledger"),
            ));
        }
    }
    !acked.is_empty()
}

/// One order's refunds against its amount and what its refunds were told;
/// returns the acknowledged refunds' sum.
fn check_refunds(
    order: (&str, i64),
    ledger: &Ledger,
    told: &[&Record],
    out: &mut Vec<Violation>,
) -> i64 {
    let (id, amount) = order;
    let refunded: i64 = ledger.refunds.iter().map(|(_, _, a)| a).sum();
    if refunded > amount {
        out.push(Violation::new(
            "refund_over_amount",
            Some(id.to_owned()),
            None,
            format!("refunded {refunded} of {amount}"),
        ));
    }
    let acked: HashMap<&str, i64> = told
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.refund_id.as_deref().map(|rid| (rid, r.amount)))
        .collect();
    for rid in acked.keys() {
        if !ledger.refunds.iter().any(|(_, id, _)| id == rid) {
            out.push(Violation::new(
                "acknowledged_refund_missing",
                Some(id.to_owned()),
                None,
                format!("refund {rid} was acknowledged but is not in the ledger"),
            ));
        }
    }
    acked.values().sum()
}

/// Every order's ledger against its amount and what its clients were told.
fn check_orders(
    run: &Run,
    told: &Told,
    ledgers: &[(usize, Option<Ledger>)],
    out: &mut Vec<Violation>,
) -> (Money, Accounts) {
    let n = run.accounts.len();
    let mut acc = Accounts {
        debited: vec![0; n],
        refunded: vec![0; n],
        acked: vec![0; n],
        unknown: vec![false; n],
    };
    let mut money = Money::default();
    for (i, ledger) in ledgers {
        let order = &run.orders[*i];
        let a = order.account;
        let Some(ledger) = ledger else {
            out.push(Violation::new(
                "unexpected_status",
                Some(order.id.clone()),
                None,
                "could not read the order's entries".into(),
            ));
            acc.unknown[a] = true;
            continue;
        };
        let deducts = told.deducts.get(i).map(Vec::as_slice).unwrap_or_default();
        let refunds = told.refunds.get(i).map(Vec::as_slice).unwrap_or_default();
        if deducts
            .iter()
            .chain(refunds)
            .any(|r| matches!(r.status, 0 | 503))
        {
            acc.unknown[a] = true;
        }
        let key = (order.id.as_str(), order.amount);
        if check_debits(key, ledger, deducts, &mut money, out) {
            acc.acked[a] -= order.amount;
        }
        acc.acked[a] += check_refunds(key, ledger, refunds, out);
        acc.debited[a] += ledger.debits.iter().map(|(_, a)| a).sum::<i64>();
        acc.refunded[a] += ledger.refunds.iter().map(|(_, _, a)| a).sum::<i64>();
        money.refunds_moved += ledger.refunds.len();
    }
    (money, acc)
}

/// Balances: against the ledger, and against what the clients were told.
async fn check_balances(
    http: &Http,
    run: &Run,
    acc: &Accounts,
    concurrency: usize,
    out: &mut Vec<Violation>,
) {
    let balances: Vec<(usize, u16, Value)> = stream::iter(0..run.accounts.len())
        .map(|a| {
            let path = format!("/v1/accounts/{}", run.accounts[a].id);
            async move {
                let (s, b) = http.call(0, reqwest::Method::GET, &path, None).await;
                (a, s, b)
            }
        })
        .buffer_unordered(concurrency.clamp(1, CHECK_READS_MAX))
        .collect()
        .await;
    for (a, status, body) in balances {
        let acct = &run.accounts[a];
        let id = || Some(acct.id.clone());
        let Some(actual) = body["balance"].as_i64().filter(|_| status == 200) else {
            out.push(Violation::new(
                "unexpected_status",
                None,
                id(),
                format!("reading the account answered {status}"),
            ));
            continue;
        };
        let from_ledger = acct.opening - acc.debited[a] + acc.refunded[a];
        if actual != from_ledger || actual < 0 {
            out.push(Violation::new(
                "balance_drift",
                None,
                id(),
                format!("balance {actual}, the ledger says {from_ledger}"),
            ));
        }
        let from_acks = acct.opening + acc.acked[a];
        if !acc.unknown[a] && actual != from_acks {
            out.push(Violation::new(
                "balance_drift",
                None,
                id(),
                format!(
                    "balance {actual}, but the clients were told it would be {from_acks} (off by {})",
                    from_acks - actual
                ),
            ));
        }
    }
}

/// The services' own audit, and the database's: `(api ok, db ok)`.
async fn audits(
    http: &Http,
    db: Option<&str>,
    out: &mut Vec<Violation>,
) -> anyhow::Result<(Option<bool>, Option<bool>)> {
    let mut api_audit_ok = None;
    for t in 0..http.targets.len() {
        let (status, body) = http.call(t, reqwest::Method::GET, "/v1/audit", None).await;
        let ok = status == 200 && body["ok"] == Value::Bool(true);
        api_audit_ok = Some(api_audit_ok.unwrap_or(true) && ok);
        if !ok {
            out.push(Violation::new(
                "api_audit_failed",
                None,
                None,
                format!("{} /v1/audit: {status} {body}", http.targets[t]),
            ));
        }
    }
    let mut db_audit_ok = None;
    if let Some(url) = db {
        let report = crate::audit::audit_url(url).await?;
        db_audit_ok = Some(report.ok);
        if !report.ok {
            out.push(Violation::new(
                "db_audit_failed",
                None,
                None,
                serde_json::to_string(&report)?,
            ));
        }
    }
    Ok((api_audit_ok, db_audit_ok))
}

pub async fn check(args: &StormArgs, run: Run) -> anyhow::Result<Report> {
    let http = Http::new(args)?;
    let rules = Rules {
        faults: args.faults,
        slow_ms: args.slow_ms,
    };
    let liveness = assess_liveness(rules, &run, &http.targets);
    let mut violations = liveness.violations();
    violations.extend(status_violations(&run));
    let told = Told::of(&run.records);
    let ledgers = read_ledgers(&http, &run, args.concurrency).await;
    let (money, acc) = check_orders(&run, &told, &ledgers, &mut violations);
    check_balances(&http, &run, &acc, args.concurrency, &mut violations).await;
    let (api_audit_ok, db_audit_ok) = audits(&http, args.db.as_deref(), &mut violations).await?;
    let mut report = summary(args, &run, &told, http.targets.clone(), money, liveness);
    report.api_audit_ok = api_audit_ok;
    report.db_audit_ok = db_audit_ok;
    report.ok = violations.is_empty();
    report.violations = violations;
    Ok(report)
}

/// Completed storm requests (deducts, refunds) per 100 ms since the first deduct.
fn timeline(records: &[Record]) -> Vec<u64> {
    let storm = || {
        records
            .iter()
            .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Refund))
    };
    let start_ms = storm()
        .filter(|r| r.kind == OpKind::Deduct)
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

/// The report's counts and series; the caller adds audits and violations.
fn summary(
    args: &StormArgs,
    run: &Run,
    told: &Told,
    targets: Vec<String>,
    money: Money,
    liveness: Liveness,
) -> Report {
    let records = &run.records;
    let by_kind = |k: OpKind| -> Vec<&Record> { records.iter().filter(|r| r.kind == k).collect() };
    let kinds = [
        OpKind::CreateAccount,
        OpKind::CreateOrder,
        OpKind::Deduct,
        OpKind::Refund,
    ];
    let lat = kinds
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
    let orders_with = |status: u16| {
        told.deducts
            .values()
            .filter(|rs| rs.iter().any(|r| r.status == status))
            .count()
    };
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        *by_status.entry(r.status.to_string()).or_default() += 1;
    }
    let storm_requests = records
        .iter()
        .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Refund))
        .count();
    let span_ms = records.iter().map(|r| r.started_ms).fold(0.0, f64::max);
    let rules = Rules {
        faults: liveness.faults,
        slow_ms: liveness.slow_ms,
    };
    let bucket_ms = targets::bucket_ms(span_ms);
    Report {
        ok: true,
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
        paid_orders: orders_with(200),
        refused_insufficient: orders_with(402),
        refunds_moved: money.refunds_moved,
        double_charged_orders: money.double_charged,
        money_lost: money.money_lost,
        unavailable_503: liveness.count(liveness::UNAVAILABLE),
        no_answer: liveness.count(liveness::UNANSWERED),
        server_errors_500: liveness.count(liveness::SERVER_ERROR),
        slow_requests: liveness.count(liveness::SLOW_REQUEST),
        liveness,
        api_audit_ok: None,
        db_audit_ok: None,
        violations: Vec::new(),
        timeline: timeline(records),
    }
}
