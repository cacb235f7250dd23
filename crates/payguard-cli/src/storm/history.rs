//! `storm --history FILE` and `payguard check-history FILE`: a Jepsen-style record
//! of every operation and an offline checker of what the history allows.
//!
//! The file is JSON lines: one `plan` (accounts with opening balances, orders with
//! their account and amount), an `invoke` and a completion per request (`ok` for a
//! 2xx, `fail` for an answer that promises nothing moved: 402/404/409/503, `unknown`
//! for no answer or a 500), then one `final` with every balance and ledger entry as
//! read after the storm. The checker verifies, per order and account:
//! * each order is charged at most once;
//! * an `ok` deduct means charged exactly once, with the entry every `ok` named;
//!   only `fail`s mean not charged; `unknown`s allow zero or one;
//! * every final balance equals opening − debits + refunds + reversals, and lies in
//!   the bounds the history allows (acknowledged movements certain, unknown ones maybe);
//! * no entry ever left a balance negative; refunds never exceed the amount.

use super::load::{Http, Run};
use super::Violation;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerLine {
    pub order: String,
    pub kind: String,
    pub entry: String,
    pub amount: i64,
    pub balance_after: i64,
    #[serde(default)]
    pub refund: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Plan {
        accounts: Vec<(String, i64)>,
        /// (order id, account id, amount)
        orders: Vec<(String, String, i64)>,
    },
    Invoke {
        id: usize,
        op: String,
        order: Option<String>,
        refund: Option<String>,
        amount: i64,
        t_ms: f64,
        target: usize,
    },
    Ok {
        id: usize,
        t_ms: f64,
        status: u16,
        entry: Option<String>,
        replayed: Option<bool>,
    },
    Fail {
        id: usize,
        t_ms: f64,
        status: u16,
        code: Option<String>,
    },
    Unknown {
        id: usize,
        t_ms: f64,
        status: u16,
    },
    Final {
        balances: Vec<(String, i64)>,
        ledger: Vec<LedgerLine>,
    },
}

/// Writes the history of `run`, reading the final state through the API.
pub async fn write(path: &Path, http: &Http, run: &Run) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut line = |l: &Line| -> anyhow::Result<()> {
        serde_json::to_writer(&mut out, l)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    line(&Line::Plan {
        accounts: run
            .accounts
            .iter()
            .map(|a| (a.id.clone(), a.opening))
            .collect(),
        orders: run
            .orders
            .iter()
            .map(|o| (o.id.clone(), run.accounts[o.account].id.clone(), o.amount))
            .collect(),
    })?;
    let mut records: Vec<_> = run.records.iter().enumerate().collect();
    records.sort_by(|a, b| a.1.started_ms.total_cmp(&b.1.started_ms));
    for (id, r) in &records {
        line(&Line::Invoke {
            id: *id,
            op: r.kind.name().to_owned(),
            order: r.order.map(|i| run.orders[i].id.clone()),
            refund: r.refund_id.clone(),
            amount: r.amount,
            t_ms: r.started_ms,
            target: r.target,
        })?;
    }
    for (id, r) in &records {
        let t_ms = r.started_ms + r.latency_us as f64 / 1e3;
        line(&match r.status {
            200..=299 => Line::Ok {
                id: *id,
                t_ms,
                status: r.status,
                entry: r.entry_id.clone(),
                replayed: r.replayed,
            },
            402 | 404 | 409 | 503 => Line::Fail {
                id: *id,
                t_ms,
                status: r.status,
                code: r.code.clone(),
            },
            _ => Line::Unknown {
                id: *id,
                t_ms,
                status: r.status,
            },
        })?;
    }
    let mut balances = Vec::new();
    for a in &run.accounts {
        let (status, body) = http
            .call(
                0,
                reqwest::Method::GET,
                &format!("/v1/accounts/{}", a.id),
                None,
            )
            .await;
        anyhow::ensure!(status == 200, "reading account {} answered {status}", a.id);
        balances.push((a.id.clone(), body["balance"].as_i64().unwrap_or(i64::MIN)));
    }
    let mut ledger = Vec::new();
    for o in &run.orders {
        let (status, body) = http
            .call(
                0,
                reqwest::Method::GET,
                &format!("/v1/orders/{}/entries", o.id),
                None,
            )
            .await;
        anyhow::ensure!(
            status == 200,
            "reading entries of {} answered {status}",
            o.id
        );
        for e in body["entries"].as_array().into_iter().flatten() {
            ledger.push(LedgerLine {
                order: o.id.clone(),
                kind: e["kind"].as_str().unwrap_or_default().to_owned(),
                entry: e["id"].as_str().unwrap_or_default().to_owned(),
                amount: e["amount"].as_i64().unwrap_or(0),
                balance_after: e["balance_after"].as_i64().unwrap_or(0),
                refund: e["refund_id"].as_str().map(str::to_owned),
            });
        }
    }
    line(&Line::Final { balances, ledger })?;
    out.flush()?;
    Ok(())
}

pub fn read(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut lines = Vec::new();
    for (n, l) in std::io::BufReader::new(file).lines().enumerate() {
        let l = l?;
        if l.trim().is_empty() {
            continue;
        }
        lines.push(
            serde_json::from_str(&l)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    Ok(lines)
}

fn v(kind: &'static str, order: Option<&str>, account: Option<&str>, detail: String) -> Violation {
    Violation {
        kind,
        order_id: order.map(str::to_owned),
        account_id: account.map(str::to_owned),
        detail,
    }
}

/// Every invariant the history allows to be checked; empty means it holds.
pub fn check(lines: &[Line]) -> anyhow::Result<Vec<Violation>> {
    let mut plan = None;
    let mut fin = None;
    let mut invokes = HashMap::new();
    let mut done: HashMap<usize, &Line> = HashMap::new();
    for l in lines {
        match l {
            Line::Plan { accounts, orders } => plan = Some((accounts, orders)),
            Line::Final { balances, ledger } => fin = Some((balances, ledger)),
            Line::Invoke { id, .. } => {
                invokes.insert(*id, l);
            }
            Line::Ok { id, .. } | Line::Fail { id, .. } | Line::Unknown { id, .. } => {
                done.insert(*id, l);
            }
        }
    }
    let (accounts, orders) = plan.ok_or_else(|| anyhow::anyhow!("the history has no plan line"))?;
    let (balances, ledger) = fin.ok_or_else(|| anyhow::anyhow!("the history has no final line"))?;
    let mut out = Vec::new();
    let account_of: HashMap<&str, &str> = orders
        .iter()
        .map(|(o, a, _)| (o.as_str(), a.as_str()))
        .collect();

    // What the clients were told, per order.
    #[derive(Default)]
    struct Told<'a> {
        ok_entries: HashSet<&'a str>,
        ok: usize,
        fail: usize,
        unknown: usize,
        refunds_ok: HashMap<&'a str, i64>,
        refunds_unknown: HashMap<&'a str, i64>,
    }
    let mut told: HashMap<&str, Told> = HashMap::new();
    for (id, inv) in &invokes {
        let Line::Invoke {
            op,
            order,
            refund,
            amount,
            ..
        } = inv
        else {
            continue;
        };
        let Some(order) = order.as_deref() else {
            continue;
        };
        let t = told.entry(order).or_default();
        let outcome = done.get(id).copied();
        match (op.as_str(), outcome) {
            ("deduct", Some(Line::Ok { entry, .. })) => {
                t.ok += 1;
                if let Some(e) = entry {
                    t.ok_entries.insert(e.as_str());
                }
            }
            ("deduct", Some(Line::Fail { .. })) => t.fail += 1,
            ("deduct", _) => t.unknown += 1,
            ("refund", Some(Line::Ok { .. })) => {
                if let Some(r) = refund {
                    t.refunds_ok.insert(r.as_str(), *amount);
                }
            }
            ("refund", Some(Line::Fail { .. })) => {}
            ("refund", _) => {
                if let Some(r) = refund {
                    t.refunds_unknown.insert(r.as_str(), *amount);
                }
            }
            _ => {}
        }
    }

    let mut debits: HashMap<&str, Vec<&LedgerLine>> = HashMap::new();
    let mut refunded: HashMap<&str, i64> = HashMap::new();
    let mut moved: HashMap<&str, i64> = HashMap::new();
    for e in ledger.iter() {
        let acct = account_of.get(e.order.as_str()).copied().unwrap_or("");
        if e.balance_after < 0 {
            out.push(v(
                "negative_balance",
                Some(&e.order),
                Some(acct),
                format!("entry {} left {}", e.entry, e.balance_after),
            ));
        }
        match e.kind.as_str() {
            "debit" => {
                debits.entry(e.order.as_str()).or_default().push(e);
                *moved.entry(acct).or_default() -= e.amount;
            }
            "refund" => {
                *refunded.entry(e.order.as_str()).or_default() += e.amount;
                *moved.entry(acct).or_default() += e.amount;
            }
            "reversal" => *moved.entry(acct).or_default() += e.amount,
            _ => {}
        }
    }
    let mut bounds: HashMap<&str, (i64, i64)> = HashMap::new();
    for (order, _, amount) in orders.iter() {
        let order = order.as_str();
        let acct = account_of[order];
        let d = debits.get(order).map_or(0, Vec::len);
        let t = told.remove(order).unwrap_or_default();
        if d > 1 {
            out.push(v(
                "charged_more_than_once",
                Some(order),
                None,
                format!("{d} debits"),
            ));
        }
        if t.ok_entries.len() > 1 {
            out.push(v(
                "replays_disagree",
                Some(order),
                None,
                format!("ok answers named {} entries", t.ok_entries.len()),
            ));
        }
        if t.ok > 0 {
            let ids: HashSet<&str> = debits
                .get(order)
                .into_iter()
                .flatten()
                .map(|e| e.entry.as_str())
                .collect();
            if d != 1 || !t.ok_entries.iter().all(|e| ids.contains(e)) {
                out.push(v(
                    "ok_not_charged_once",
                    Some(order),
                    None,
                    format!("{} ok answers, {d} debits", t.ok),
                ));
            }
        } else if t.unknown == 0 && t.fail > 0 && d != 0 {
            out.push(v(
                "failed_but_charged",
                Some(order),
                None,
                format!("every answer was a failure, yet {d} debits"),
            ));
        }
        let r = refunded.get(order).copied().unwrap_or(0);
        if r > *amount {
            out.push(v(
                "refund_over_amount",
                Some(order),
                None,
                format!("refunded {r} of {amount}"),
            ));
        }
        for (rid, _) in t.refunds_ok.iter() {
            if !ledger.iter().any(|e| e.refund.as_deref() == Some(rid)) {
                out.push(v(
                    "ok_refund_missing",
                    Some(order),
                    None,
                    format!("refund {rid} acknowledged, not in the ledger"),
                ));
            }
        }
        // Balance bounds from the history: certain and possible movements.
        let b = bounds.entry(acct).or_insert((0, 0));
        let charged_for_sure = t.ok > 0;
        let maybe_charged = t.unknown > 0 && t.ok == 0;
        if charged_for_sure {
            b.0 -= amount;
            b.1 -= amount;
        } else if maybe_charged {
            b.0 -= amount;
        }
        let sure: i64 = t.refunds_ok.values().sum();
        let maybe: i64 = t.refunds_unknown.values().sum();
        b.0 += sure;
        b.1 += sure + maybe;
    }
    let finals: HashMap<&str, i64> = balances.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    for (acct, opening) in accounts.iter() {
        let acct = acct.as_str();
        let Some(&actual) = finals.get(acct) else {
            out.push(v(
                "account_missing",
                None,
                Some(acct),
                "no final balance".into(),
            ));
            continue;
        };
        let from_ledger = opening + moved.get(acct).copied().unwrap_or(0);
        if actual != from_ledger {
            out.push(v(
                "balance_drift",
                None,
                Some(acct),
                format!("balance {actual}, ledger says {from_ledger}"),
            ));
        }
        let (lo, hi) = bounds.get(acct).copied().unwrap_or((0, 0));
        if actual < opening + lo || actual > opening + hi {
            out.push(v(
                "balance_outside_history",
                None,
                Some(acct),
                format!(
                    "balance {actual} outside [{}, {}]",
                    opening + lo,
                    opening + hi
                ),
            ));
        }
        if actual < 0 {
            out.push(v(
                "negative_balance",
                None,
                Some(acct),
                format!("balance {actual}"),
            ));
        }
    }
    Ok(out)
}
