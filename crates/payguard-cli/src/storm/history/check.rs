//! The one storm checker: what a history (`mod.rs`) allows, decided in pure
//! code, whether the lines came from the storm's memory or from a file.
//!
//! Per order and account:
//! * every answer is one its operation may give (`status.rs`, `unexpected_status`);
//! * each order is charged at most once (`charged_more_than_once`);
//! * an `ok` deduct means charged exactly once, with the entry every `ok` named
//!   (`ok_not_charged_once`); every `ok` names the same entry (`replays_disagree`);
//!   only `fail`s mean not charged (`failed_but_charged`); `unknown`s allow zero or one;
//! * refunds never exceed the amount (`refund_over_amount`) and an `ok` refund is in
//!   the ledger (`ok_refund_missing`);
//! * every final balance equals opening − debits − captures + refunds +
//!   reversals (`balance_drift`), and lies in the bounds the history allows,
//!   acknowledged movements certain and unknown ones maybe
//!   (`balance_outside_history`); no entry ever left a balance negative
//!   (`negative_balance`);
//! * two-phase payments (`two_phase.rs`): one hold per order, exactly one of
//!   capture, void and expiry taking effect, every 200 naming the winner's entry
//!   and every 409 the winner, acknowledged captures and voids in the ledger and
//!   the order, no hold outliving its expiry past the grace, `held` adding up,
//!   refunds within the captured sum;
//! * every audit recorded in the `final` line passed (`api_audit_failed`,
//!   `db_audit_failed`);
//! * liveness (`liveness.rs`), under the rules the run recorded in its plan line
//!   (`faults`, `slow_ms`; a history without them is judged strictly): no 500,
//!   and without faults no 503, no request left without an answer, none slower
//!   than `slow_ms` (its invoke to its completion).

mod two_phase;

use super::{AuditLine, FinalState, LedgerLine, Line};
use crate::storm::liveness::{self, Example, Liveness, Rules};
use crate::storm::load::OpKind;
use crate::storm::status;
use crate::storm::Violation;
use std::collections::{HashMap, HashSet};

/// What the checker found: liveness's counts (for the report) and every violation.
pub struct Verdict {
    pub liveness: Liveness,
    pub violations: Vec<Violation>,
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
    /// How long past its expiry a hold may stay AUTHORIZED (`--hold-grace-ms`).
    hold_grace_ms: u64,
    fin: &'a FinalState,
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
                    hold_grace_ms,
                    ..
                } => plan = Some((accounts, orders, targets, *hold_grace_ms)),
                Line::Final(f) => fin = Some(f),
                Line::Invoke { id, .. } => {
                    invokes.insert(*id, l);
                }
                Line::Ok { id, .. } | Line::Fail { id, .. } | Line::Unknown { id, .. } => {
                    done.insert(*id, l);
                }
            }
        }
        let (accounts, orders, targets, hold_grace_ms) =
            plan.ok_or_else(|| anyhow::anyhow!("the history has no plan line"))?;
        let fin = fin.ok_or_else(|| anyhow::anyhow!("the history has no final line"))?;
        Ok(History {
            accounts,
            orders,
            targets,
            hold_grace_ms: hold_grace_ms.unwrap_or(crate::storm::HOLD_GRACE_MS_DEFAULT),
            fin,
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

    /// Liveness over every request (setup included).
    fn liveness(&self, rules: Rules) -> Liveness {
        let examples = self
            .invokes
            .iter()
            .filter_map(|(id, inv)| self.example(*id, inv))
            .filter(|e| !liveness::kinds_of(rules, e.status, e.latency_ms).is_empty());
        liveness::assess(rules, examples)
    }

    /// Answers no operation may give, by the one status table (`status.rs`).
    fn status_violations(&self) -> Vec<Violation> {
        let mut ids: Vec<&usize> = self.done.keys().collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            let (status, code) = match self.done[id] {
                Line::Ok { status, .. } | Line::Unknown { status, .. } => (*status, None),
                Line::Fail { status, code, .. } => (*status, code.as_deref()),
                _ => continue,
            };
            let Some(Line::Invoke { op, order, .. }) = self.invokes.get(id) else {
                continue;
            };
            if OpKind::parse(op).is_some_and(|k| status::expected(k, status)) {
                continue;
            }
            out.push(v(
                "unexpected_status",
                order.as_deref(),
                None,
                format!("{op} answered {status} {}", code.unwrap_or("")),
            ));
        }
        out
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
    /// The amount an acknowledged capture took (every capture of an order asks
    /// for the same amount).
    capture_ok: Option<i64>,
    /// The largest amount a capture without an answer may have taken.
    capture_unknown: Option<i64>,
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
            ("capture", Some(Line::Ok { .. })) => t.capture_ok = Some(*amount),
            ("capture", Some(Line::Fail { .. })) => {}
            ("capture", _) => t.capture_unknown = t.capture_unknown.max(Some(*amount)),
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
    for e in h.fin.ledger.iter() {
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
            // A capture is the order's debit (API.md); holds and releases move
            // `held`, not the balance.
            "capture" => *m.moved.entry(acct).or_default() -= e.amount,
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
    if let Some(c) = t.capture_ok {
        b.0 -= c;
        b.1 -= c;
    } else if let Some(c) = t.capture_unknown {
        b.0 -= c;
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
    let finals: HashMap<&str, i64> = h
        .fin
        .balances
        .iter()
        .map(|(a, b)| (a.as_str(), *b))
        .collect();
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

/// Every audit the `final` line recorded must have passed.
fn audit_violations(audits: &[AuditLine]) -> Vec<Violation> {
    audits
        .iter()
        .filter(|a| !a.ok)
        .map(|a| {
            let kind = if a.source == "db" {
                "db_audit_failed"
            } else {
                "api_audit_failed"
            };
            v(kind, None, None, format!("{}: {}", a.at, a.detail))
        })
        .collect()
}

/// Every invariant the history allows to be checked, liveness judged under
/// `rules`; empty means it holds.
pub fn check_with(lines: &[Line], rules: Rules) -> anyhow::Result<Vec<Violation>> {
    Ok(judge(lines, rules)?.violations)
}

/// The verdict on a history, liveness judged under `rules`: liveness first,
/// then statuses, then the money, then the audits.
pub fn judge(lines: &[Line], rules: Rules) -> anyhow::Result<Verdict> {
    let h = History::of(lines)?;
    let liveness = h.liveness(rules);
    let mut out = liveness.violations();
    out.extend(h.status_violations());
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
        check_order((order, *amount), &t, &moves, &h.fin.ledger, &mut out);
        widen_bounds(
            bounds.entry(account_of[order]).or_insert((0, 0)),
            *amount,
            &t,
        );
    }
    check_accounts(&h, &moves, &bounds, &mut out);
    two_phase::check(&h, &account_of, &mut out);
    out.extend(audit_violations(&h.fin.audits));
    Ok(Verdict {
        liveness,
        violations: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            faults: false,
            slow_ms: 1_000,
        }
    }

    fn debit(entry: &str, balance_after: i64) -> LedgerLine {
        LedgerLine {
            order: "o".into(),
            kind: "debit".into(),
            entry: entry.into(),
            amount: 100,
            balance_after,
            refund: None,
        }
    }

    /// Two deducts of one order (100 from an account of 1000), each answered
    /// `status` naming `entries`, then `fin`.
    fn history(answers: [(u16, &str); 2], fin: FinalState) -> Vec<Line> {
        let mut lines = vec![Line::Plan {
            accounts: vec![("a".into(), 1_000)],
            orders: vec![("o".into(), "a".into(), 100)],
            targets: vec!["http://t".into()],
            faults: false,
            slow_ms: None,
            hold_grace_ms: None,
        }];
        for (id, (status, entry)) in answers.into_iter().enumerate() {
            lines.push(Line::Invoke {
                id,
                op: "deduct".into(),
                order: Some("o".into()),
                refund: None,
                amount: 100,
                t_ms: 1.0,
                target: id,
            });
            lines.push(match status {
                200 => Line::Ok {
                    id,
                    t_ms: 2.0,
                    status,
                    entry: Some(entry.into()),
                    replayed: Some(id > 0),
                },
                _ => Line::Fail {
                    id,
                    t_ms: 2.0,
                    status,
                    code: None,
                },
            });
        }
        lines.push(Line::Final(fin));
        lines
    }

    fn api_audit(ok: bool) -> Vec<AuditLine> {
        vec![AuditLine {
            source: "api".into(),
            at: "http://t".into(),
            ok,
            detail: String::new(),
        }]
    }

    fn kinds(lines: &[Line]) -> Vec<&'static str> {
        let mut k: Vec<_> = judge(lines, rules())
            .unwrap()
            .violations
            .iter()
            .map(|v| v.kind)
            .collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn one_charge_named_by_every_ok_holds() {
        let fin = FinalState {
            balances: vec![("a".into(), 900)],
            ledger: vec![debit("e1", 900)],
            audits: api_audit(true),
            ..FinalState::default()
        };
        assert!(kinds(&history([(200, "e1"), (200, "e1")], fin)).is_empty());
    }

    #[test]
    fn a_double_charge_fails_every_money_check_it_touches() {
        let fin = FinalState {
            balances: vec![("a".into(), 800)],
            ledger: vec![debit("e1", 900), debit("e2", 800)],
            audits: api_audit(false),
            ..FinalState::default()
        };
        assert_eq!(
            kinds(&history([(200, "e1"), (200, "e2")], fin)),
            [
                "api_audit_failed",
                "balance_outside_history",
                "charged_more_than_once",
                "ok_not_charged_once",
                "replays_disagree",
            ]
        );
    }

    #[test]
    fn a_status_its_operation_may_not_answer_is_a_violation() {
        let fin = FinalState {
            balances: vec![("a".into(), 1_000)],
            ledger: vec![],
            audits: vec![],
            ..FinalState::default()
        };
        assert_eq!(
            kinds(&history([(404, ""), (402, "")], fin)),
            ["unexpected_status"]
        );
    }

    #[test]
    fn a_final_line_without_audits_still_reads() {
        let l: Line =
            serde_json::from_str(r#"{"type":"final","balances":[["a",5]],"ledger":[]}"#).unwrap();
        let Line::Final(f) = l else {
            panic!("not a final line")
        };
        assert_eq!(f.balances, [("a".to_owned(), 5)]);
        assert!(f.audits.is_empty());
    }
}
