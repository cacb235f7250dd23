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
//! * no entry ever left a balance negative; refunds never exceed the amount;
//! * liveness (`liveness.rs`), under the rules the run recorded in its plan line
//!   (`faults`, `slow_ms`; a history without them is judged strictly): no 500,
//!   and without faults no 503, no request left without an answer, none slower
//!   than `slow_ms` (its invoke to its completion).

use super::liveness::{self, Example, Rules};
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
        /// The base URLs an invoke's `target` indexes (wrapping around).
        #[serde(default)]
        targets: Vec<String>,
        /// The run injected faults (`storm --faults`).
        #[serde(default)]
        faults: bool,
        /// `storm --slow-ms`; absent: the default.
        #[serde(default)]
        slow_ms: Option<u64>,
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
        /// Why no answer came (`timeout`, `connect`, `reset`, `body`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Final {
        balances: Vec<(String, i64)>,
        ledger: Vec<LedgerLine>,
    },
}

/// Writes the history of `run` under `rules`, reading the final state through the API.
pub async fn write(path: &Path, http: &Http, run: &Run, rules: Rules) -> anyhow::Result<()> {
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
        targets: http.targets.clone(),
        faults: rules.faults,
        slow_ms: Some(rules.slow_ms),
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
                error: r.error.map(str::to_owned),
            },
        })?;
    }
    line(&read_final(http, run).await?)?;
    out.flush()?;
    Ok(())
}

/// The `final` line: every balance and ledger entry, read through the API.
async fn read_final(http: &Http, run: &Run) -> anyhow::Result<Line> {
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
    Ok(Line::Final { balances, ledger })
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
    Violation::new(
        kind,
        order.map(str::to_owned),
        account.map(str::to_owned),
        detail,
    )
}

/// The liveness rules the run recorded in its plan line (strict, with the
/// default threshold, when it recorded none).
pub fn recorded_rules(lines: &[Line]) -> Rules {
    lines
        .iter()
        .find_map(|l| match l {
            Line::Plan {
                faults, slow_ms, ..
            } => Some(Rules {
                faults: *faults,
                slow_ms: slow_ms.unwrap_or(liveness::SLOW_MS_DEFAULT),
            }),
            _ => None,
        })
        .unwrap_or(Rules {
            faults: false,
            slow_ms: liveness::SLOW_MS_DEFAULT,
        })
}

/// Every invariant the history allows to be checked, under the liveness rules
/// it recorded; empty means it holds.
pub fn check(lines: &[Line]) -> anyhow::Result<Vec<Violation>> {
    check_with(lines, recorded_rules(lines))
}

/// The lines of a history, indexed.
struct History<'a> {
    accounts: &'a [(String, i64)],
    orders: &'a [(String, String, i64)],
    targets: &'a [String],
    balances: &'a [(String, i64)],
    ledger: &'a [LedgerLine],
    invokes: HashMap<usize, &'a Line>,
    done: HashMap<usize, &'a Line>,
}

impl<'a> History<'a> {
    fn of(lines: &'a [Line]) -> anyhow::Result<Self> {
        let mut plan = None;
        let mut fin = None;
        let mut invokes = HashMap::new();
        let mut done = HashMap::new();
        for l in lines {
            match l {
                Line::Plan {
                    accounts,
                    orders,
                    targets,
                    ..
                } => plan = Some((accounts, orders, targets)),
                Line::Final { balances, ledger } => fin = Some((balances, ledger)),
                Line::Invoke { id, .. } => {
                    invokes.insert(*id, l);
                }
                Line::Ok { id, .. } | Line::Fail { id, .. } | Line::Unknown { id, .. } => {
                    done.insert(*id, l);
                }
            }
        }
        let (accounts, orders, targets) =
            plan.ok_or_else(|| anyhow::anyhow!("the history has no plan line"))?;
        let (balances, ledger) =
            fin.ok_or_else(|| anyhow::anyhow!("the history has no final line"))?;
        Ok(History {
            accounts,
            orders,
            targets,
            balances,
            ledger,
            invokes,
            done,
        })
    }

    /// Each request as liveness sees it; an invoke with no completion line got no answer.
    fn example(&self, id: usize, invoke: &Line) -> Option<Example> {
        let Line::Invoke {
            op,
            order,
            t_ms,
            target,
            ..
        } = invoke
        else {
            return None;
        };
        let (status, done_ms, error) = match self.done.get(&id) {
            Some(Line::Ok { t_ms, status, .. }) | Some(Line::Fail { t_ms, status, .. }) => {
                (*status, *t_ms, None)
            }
            Some(Line::Unknown {
                t_ms,
                status,
                error,
                ..
            }) => (*status, *t_ms, error.clone()),
            _ => (0, *t_ms, Some("no completion recorded".to_owned())),
        };
        let target = match self.targets.len() {
            0 => format!("target #{target}"),
            n => self.targets[target % n].clone(),
        };
        Some(Example {
            op: op.clone(),
            order_id: order.clone(),
            target,
            status,
            latency_ms: (done_ms - t_ms).max(0.0),
            started_ms: *t_ms,
            error,
        })
    }

    fn liveness_violations(&self, rules: Rules) -> Vec<Violation> {
        let examples = self
            .invokes
            .iter()
            .filter_map(|(id, inv)| self.example(*id, inv))
            .filter(|e| !liveness::kinds_of(rules, e.status, e.latency_ms).is_empty());
        liveness::assess(rules, examples).violations()
    }
}

/// What the clients were told, per order.
#[derive(Default)]
struct Told<'a> {
    ok_entries: HashSet<&'a str>,
    ok: usize,
    fail: usize,
    unknown: usize,
    refunds_ok: HashMap<&'a str, i64>,
    refunds_unknown: HashMap<&'a str, i64>,
}

fn told_per_order<'a>(h: &History<'a>) -> HashMap<&'a str, Told<'a>> {
    let mut told: HashMap<&str, Told> = HashMap::new();
    for (id, inv) in &h.invokes {
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
        match (op.as_str(), h.done.get(id).copied()) {
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
    told
}

/// The ledger by order and account: debits, refunded sums, net movement.
#[derive(Default)]
struct Moves<'a> {
    debits: HashMap<&'a str, Vec<&'a LedgerLine>>,
    refunded: HashMap<&'a str, i64>,
    moved: HashMap<&'a str, i64>,
}

fn ledger_moves<'a>(
    h: &History<'a>,
    account_of: &HashMap<&str, &'a str>,
    out: &mut Vec<Violation>,
) -> Moves<'a> {
    let mut m = Moves::default();
    for e in h.ledger {
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
                m.debits.entry(e.order.as_str()).or_default().push(e);
                *m.moved.entry(acct).or_default() -= e.amount;
            }
            "refund" => {
                *m.refunded.entry(e.order.as_str()).or_default() += e.amount;
                *m.moved.entry(acct).or_default() += e.amount;
            }
            "reversal" => *m.moved.entry(acct).or_default() += e.amount,
            _ => {}
        }
    }
    m
}

/// One order's debits and refunds against what it was told.
fn check_order(
    (order, amount): (&str, i64),
    t: &Told,
    m: &Moves,
    ledger: &[LedgerLine],
    out: &mut Vec<Violation>,
) {
    let d = m.debits.get(order).map_or(0, Vec::len);
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
        let ids: HashSet<&str> = m
            .debits
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
    let r = m.refunded.get(order).copied().unwrap_or(0);
    if r > amount {
        out.push(v(
            "refund_over_amount",
            Some(order),
            None,
            format!("refunded {r} of {amount}"),
        ));
    }
    for rid in t.refunds_ok.keys() {
        if !ledger.iter().any(|e| e.refund.as_deref() == Some(rid)) {
            out.push(v(
                "ok_refund_missing",
                Some(order),
                None,
                format!("refund {rid} acknowledged, not in the ledger"),
            ));
        }
    }
}

/// How far an account's balance may have moved, given what its orders were
/// told: `(lowest, highest)`, acknowledged movements certain, unknown ones maybe.
fn widen_bounds(b: &mut (i64, i64), amount: i64, t: &Told) {
    if t.ok > 0 {
        b.0 -= amount;
        b.1 -= amount;
    } else if t.unknown > 0 {
        b.0 -= amount;
    }
    let sure: i64 = t.refunds_ok.values().sum();
    let maybe: i64 = t.refunds_unknown.values().sum();
    b.0 += sure;
    b.1 += sure + maybe;
}

/// Every final balance against its ledger and the bounds the history allows.
fn check_accounts(
    h: &History,
    m: &Moves,
    bounds: &HashMap<&str, (i64, i64)>,
    out: &mut Vec<Violation>,
) {
    let finals: HashMap<&str, i64> = h.balances.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    for (acct, opening) in h.accounts {
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
        let from_ledger = opening + m.moved.get(acct).copied().unwrap_or(0);
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
}

/// Every invariant the history allows to be checked, liveness judged under
/// `rules`; empty means it holds.
pub fn check_with(lines: &[Line], rules: Rules) -> anyhow::Result<Vec<Violation>> {
    let h = History::of(lines)?;
    let mut out = h.liveness_violations(rules);
    let account_of: HashMap<&str, &str> = h
        .orders
        .iter()
        .map(|(o, a, _)| (o.as_str(), a.as_str()))
        .collect();
    let mut told = told_per_order(&h);
    let moves = ledger_moves(&h, &account_of, &mut out);
    let mut bounds: HashMap<&str, (i64, i64)> = HashMap::new();
    for (order, _, amount) in h.orders {
        let order = order.as_str();
        let t = told.remove(order).unwrap_or_default();
        check_order((order, *amount), &t, &moves, h.ledger, &mut out);
        widen_bounds(
            bounds.entry(account_of[order]).or_insert((0, 0)),
            *amount,
            &t,
        );
    }
    check_accounts(&h, &moves, &bounds, &mut out);
    Ok(out)
}
