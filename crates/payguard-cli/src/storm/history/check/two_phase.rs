//! The checker's two-phase part (API.md "Two-phase payments"): what the answers
//! to authorize, capture and void, the ledger and the final reads of orders and
//! accounts allow. Pure code over the indexed history of `check.rs`.
//!
//! Per order:
//! * at most one hold entry (`held_more_than_once`); every 200 of an authorize
//!   names it (`hold_replays_disagree`, `ok_hold_missing`); only failures mean no
//!   hold (`failed_but_held`); one path per order (`paths_mixed`: a debit and a hold);
//! * exactly one of capture, void and expiry took effect: one capture at most
//!   (`captured_more_than_once`), one release at most without a capture
//!   (`released_more_than_once`), and with a capture no release but the rest of
//!   a partial capture (`captured_and_released`: a capture after a void or an
//!   expiry, or a void or expiry after a capture);
//! * the order as read agrees with its ledger (`order_off_ledger`: status,
//!   `captured`, `held`);
//! * every 200 of a capture or void names one entry, the winner's
//!   (`settle_replays_disagree`); an acknowledged capture is the capture in the
//!   ledger, for its amount, on a paid order (`ok_capture_not_captured`); an
//!   acknowledged void is the release of a `VOIDED` order (`ok_void_not_voided`);
//! * every 409 of a capture or void names the winner and never contradicts the
//!   final state (`refusal_names_wrong_winner`): `hold_already_captured` after a
//!   capture won (and never to the winning capture's own repeat), `hold_voided`
//!   after a void (never to a void), `hold_expired` after expiry,
//!   `order_not_authorized` with no hold;
//! * no hold still `AUTHORIZED` when the final reads began, past its
//!   `hold_expires_at` plus the grace the run recorded (`hold_outlived_expiry`:
//!   the sweepers' liveness);
//! * refunds never exceed what was captured (`refund_over_captured`).
//!
//! Per account: `held` equals the sum of its `AUTHORIZED` orders' amounts and
//! the open holds of its ledger, and `available` = balance − `held`
//! (`held_mismatch`). Balances (captures counted as debits) are `check.rs`'s.

use super::{v, History};
use crate::storm::history::{LedgerLine, Line, OrderLine};
use crate::storm::liveness::{Example, EXAMPLES_MAX};
use crate::storm::Violation;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One capture or void and its answer.
struct Step<'a> {
    id: usize,
    op: &'a str,
    amount: i64,
    answer: &'a Line,
}

/// What one order's authorize, capture and void requests were told.
#[derive(Default)]
struct Told<'a> {
    /// Entries the 200s of its authorizes named.
    auth_ok: Vec<(usize, Option<&'a str>)>,
    auth_fail: usize,
    auth_unknown: usize,
    settles: Vec<Step<'a>>,
}

/// The order's two-phase entries in the ledger.
#[derive(Default)]
struct Entries<'a> {
    holds: Vec<&'a LedgerLine>,
    captures: Vec<&'a LedgerLine>,
    releases: Vec<&'a LedgerLine>,
    debits: usize,
    refunded: i64,
}

/// What ended the hold, by the order as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Winner {
    Capture,
    Void,
    Expiry,
    /// Still `AUTHORIZED`.
    Open,
    /// `PREPARE` or `FAILED`: never held.
    NotHeld,
}

impl Winner {
    fn of(status: &str) -> Option<Self> {
        Some(match status {
            "PAID" | "PARTIALLY_REFUNDED" | "REFUNDED" => Winner::Capture,
            "VOIDED" => Winner::Void,
            "EXPIRED" => Winner::Expiry,
            "AUTHORIZED" => Winner::Open,
            "PREPARE" | "FAILED" => Winner::NotHeld,
            _ => return None,
        })
    }
}

fn told<'a>(h: &History<'a>) -> HashMap<&'a str, Told<'a>> {
    let mut out: HashMap<&str, Told> = HashMap::new();
    let mut ids: Vec<&usize> = h.invokes.keys().collect();
    ids.sort_unstable();
    for id in ids {
        let Some(Line::Invoke {
            op,
            order: Some(order),
            amount,
            ..
        }) = h.invokes.get(id).copied()
        else {
            continue;
        };
        if !matches!(op.as_str(), "authorize" | "capture" | "void") {
            continue;
        }
        let t = out.entry(order.as_str()).or_default();
        match (op.as_str(), h.done.get(id).copied()) {
            ("authorize", Some(Line::Ok { entry, .. })) => {
                t.auth_ok.push((*id, entry.as_deref()));
            }
            ("authorize", Some(Line::Fail { .. })) => t.auth_fail += 1,
            ("authorize", _) => t.auth_unknown += 1,
            (_, Some(answer)) => t.settles.push(Step {
                id: *id,
                op,
                amount: *amount,
                answer,
            }),
            _ => {}
        }
    }
    out
}

fn entries<'a>(h: &History<'a>) -> HashMap<&'a str, Entries<'a>> {
    let mut out: HashMap<&str, Entries> = HashMap::new();
    for e in &h.fin.ledger {
        let o = out.entry(e.order.as_str()).or_default();
        match e.kind.as_str() {
            "hold" => o.holds.push(e),
            "capture" => o.captures.push(e),
            "release" => o.releases.push(e),
            "debit" => o.debits += 1,
            "refund" => o.refunded += e.amount,
            _ => {}
        }
    }
    out
}

/// One order's facts: plan, answers, ledger, final read.
struct Order<'a, 'h> {
    id: &'a str,
    amount: i64,
    told: &'h Told<'a>,
    led: &'h Entries<'a>,
    fin: Option<&'a OrderLine>,
}

impl Order<'_, '_> {
    /// The winner as read, else as the ledger says.
    fn winner(&self) -> Winner {
        if let Some(w) = self.fin.and_then(|f| Winner::of(&f.status)) {
            return w;
        }
        match (
            &self.led.holds[..],
            &self.led.captures[..],
            &self.led.releases[..],
        ) {
            ([], ..) => Winner::NotHeld,
            (_, [_, ..], _) => Winner::Capture,
            (_, [], [_, ..]) => Winner::Expiry,
            _ => Winner::Open,
        }
    }

    fn captured(&self) -> Option<i64> {
        self.led.captures.first().map(|e| e.amount)
    }
}

fn examples(h: &History<'_>, ids: impl IntoIterator<Item = usize>) -> Vec<Example> {
    let mut out: Vec<Example> = ids
        .into_iter()
        .filter_map(|id| h.example(id, h.invokes.get(&id)?))
        .collect();
    out.sort_by(|a, b| a.started_ms.total_cmp(&b.started_ms));
    out.truncate(EXAMPLES_MAX);
    out
}

fn with_examples(mut v: Violation, ex: Vec<Example>) -> Violation {
    v.examples = ex;
    v
}

/// One hold at most, named by every acknowledged authorize; one path.
fn check_hold(h: &History<'_>, o: &Order<'_, '_>, out: &mut Vec<Violation>) {
    let (t, led) = (o.told, o.led);
    if led.holds.len() > 1 {
        out.push(v(
            "held_more_than_once",
            Some(o.id),
            None,
            format!("{} hold entries", led.holds.len()),
        ));
    }
    let named: HashSet<&str> = t.auth_ok.iter().filter_map(|(_, e)| *e).collect();
    let ids = || t.auth_ok.iter().map(|(id, _)| *id);
    if named.len() > 1 {
        out.push(with_examples(
            v(
                "hold_replays_disagree",
                Some(o.id),
                None,
                format!("authorize 200s named {} entries", named.len()),
            ),
            examples(h, ids()),
        ));
    }
    let hold_ids: HashSet<&str> = led.holds.iter().map(|e| e.entry.as_str()).collect();
    if !t.auth_ok.is_empty() && (led.holds.len() != 1 || !named.is_subset(&hold_ids)) {
        out.push(with_examples(
            v(
                "ok_hold_missing",
                Some(o.id),
                None,
                format!(
                    "{} authorize 200s naming {named:?}, hold entries {hold_ids:?}",
                    t.auth_ok.len()
                ),
            ),
            examples(h, ids()),
        ));
    } else if t.auth_ok.is_empty()
        && t.auth_unknown == 0
        && t.auth_fail > 0
        && !led.holds.is_empty()
    {
        out.push(v(
            "failed_but_held",
            Some(o.id),
            None,
            format!(
                "every authorize failed, yet {} hold entries",
                led.holds.len()
            ),
        ));
    }
    if led.debits > 0 && !led.holds.is_empty() {
        out.push(v(
            "paths_mixed",
            Some(o.id),
            None,
            format!("{} debits beside a hold", led.debits),
        ));
    }
}

/// Exactly one of capture, void and expiry in the ledger, and the order as read
/// agreeing with it.
fn check_effects(o: &Order<'_, '_>, out: &mut Vec<Violation>) {
    let led = o.led;
    let hold = led.holds.first().map_or(o.amount, |e| e.amount);
    let releases: Vec<i64> = led.releases.iter().map(|e| e.amount).collect();
    if led.captures.len() > 1 {
        let amounts: Vec<i64> = led.captures.iter().map(|e| e.amount).collect();
        out.push(v(
            "captured_more_than_once",
            Some(o.id),
            None,
            format!("{} capture entries {amounts:?}", amounts.len()),
        ));
    }
    if let Some(c) = o.captured() {
        let rest: Vec<i64> = (c < hold).then_some(hold - c).into_iter().collect();
        if releases != rest {
            out.push(v(
                "captured_and_released",
                Some(o.id),
                None,
                format!(
                    "captured {c} of a {hold} hold and released {releases:?} \
                     (a capture and a void or expiry both took effect)"
                ),
            ));
        }
    } else if releases.len() > 1 {
        out.push(v(
            "released_more_than_once",
            Some(o.id),
            None,
            format!("{} release entries {releases:?}", releases.len()),
        ));
    }
    if let Some(f) = o.fin {
        if let Some(why) = off_ledger(o, f, hold) {
            out.push(v(
                "order_off_ledger",
                Some(o.id),
                None,
                format!("{} as read: {why}", f.status),
            ));
        }
    }
}

/// Why the order as read disagrees with its ledger, if it does.
fn off_ledger(o: &Order<'_, '_>, f: &OrderLine, hold: i64) -> Option<String> {
    let led = o.led;
    let (caps, rels) = (led.captures.len(), led.releases.len());
    let Some(w) = Winner::of(&f.status) else {
        return Some("not a status an order may have".into());
    };
    if w != Winner::Open && f.held != 0 {
        return Some(format!("held {} on an order not AUTHORIZED", f.held));
    }
    match w {
        Winner::Capture if caps == 0 => Some("no capture entry".into()),
        Winner::Capture if f.captured != o.captured() => Some(format!(
            "captured {:?}, the capture entry says {:?}",
            f.captured,
            o.captured()
        )),
        Winner::Void | Winner::Expiry if caps > 0 || rels == 0 => {
            Some(format!("{caps} captures, {rels} releases"))
        }
        Winner::Open if caps + rels > 0 || led.holds.is_empty() || f.held != hold => {
            Some(format!("held {}, {caps} captures, {rels} releases", f.held))
        }
        Winner::NotHeld if !led.holds.is_empty() => Some("a hold entry".into()),
        _ => None,
    }
}

/// Every 200 of a capture or void names the winner's entry.
fn check_oks(h: &History<'_>, o: &Order<'_, '_>, out: &mut Vec<Violation>) {
    let oks: Vec<(&Step, Option<&str>)> = o
        .told
        .settles
        .iter()
        .filter_map(|s| match s.answer {
            Line::Ok { entry, .. } => Some((s, entry.as_deref())),
            _ => None,
        })
        .collect();
    let named: HashSet<Option<&str>> = oks.iter().map(|(_, e)| *e).collect();
    let ops: HashSet<&str> = oks.iter().map(|(s, _)| s.op).collect();
    if named.len() > 1 || ops.len() > 1 {
        out.push(with_examples(
            v(
                "settle_replays_disagree",
                Some(o.id),
                None,
                format!("200s of {ops:?} named {} entries", named.len()),
            ),
            examples(h, oks.iter().map(|(s, _)| s.id)),
        ));
    }
    let w = o.winner();
    let capture = o.led.captures.first().map(|e| e.entry.as_str());
    let release = o.led.releases.first().map(|e| e.entry.as_str());
    for (s, entry) in &oks {
        let (kind, why) = match s.op {
            "capture" if w != Winner::Capture || entry.is_none() || *entry != capture => (
                "ok_capture_not_captured",
                format!("named {entry:?}, the order is {w:?} with capture {capture:?}"),
            ),
            "capture" if o.captured() != Some(s.amount) => (
                "ok_capture_not_captured",
                format!("asked for {}, captured {:?}", s.amount, o.captured()),
            ),
            "void" if w != Winner::Void || entry.is_none() || *entry != release => (
                "ok_void_not_voided",
                format!("named {entry:?}, the order is {w:?} with release {release:?}"),
            ),
            _ => continue,
        };
        out.push(with_examples(
            v(kind, Some(o.id), None, why),
            examples(h, [s.id]),
        ));
    }
}

/// Why a 409 `code` to `s` contradicts the order's final state, if it does.
fn wrong_refusal(o: &Order<'_, '_>, s: &Step<'_>, code: &str) -> Option<String> {
    let w = o.winner();
    let same_capture = s.op == "capture" && o.captured() == Some(s.amount);
    match code {
        "hold_already_captured" if w != Winner::Capture => Some(format!("the order is {w:?}")),
        "hold_already_captured" if same_capture => {
            Some("the winning capture's own repeat was refused, not replayed".into())
        }
        "hold_voided" if w != Winner::Void => Some(format!("the order is {w:?}")),
        "hold_voided" if s.op == "void" => Some("the winning void's repeat was refused".into()),
        "hold_expired" if !matches!(w, Winner::Expiry | Winner::Open) => {
            Some(format!("the order is {w:?}"))
        }
        "order_not_authorized" if !o.led.holds.is_empty() => Some("the order has a hold".into()),
        "capture_exceeds_hold" if s.amount <= o.amount => {
            Some(format!("{} is within the {} hold", s.amount, o.amount))
        }
        "hold_already_captured"
        | "hold_voided"
        | "hold_expired"
        | "order_not_authorized"
        | "capture_exceeds_hold" => None,
        other => Some(format!("{other:?} names no winner")),
    }
}

/// Every 409 of a capture or void names the winner.
fn check_refusals(h: &History<'_>, o: &Order<'_, '_>, out: &mut Vec<Violation>) {
    let mut wrong: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in &o.told.settles {
        let Line::Fail {
            status: 409, code, ..
        } = s.answer
        else {
            continue;
        };
        let code = code.as_deref().unwrap_or("");
        if let Some(why) = wrong_refusal(o, s, code) {
            wrong
                .entry(format!("{} answered {code}: {why}", s.op))
                .or_default()
                .push(s.id);
        }
    }
    for (why, ids) in wrong {
        let n = ids.len();
        out.push(with_examples(
            v(
                "refusal_names_wrong_winner",
                Some(o.id),
                None,
                format!("{n}× {why}"),
            ),
            examples(h, ids),
        ));
    }
}

/// The sweepers' liveness, and refunds bounded by the captured sum.
fn check_expiry_and_refunds(h: &History<'_>, o: &Order<'_, '_>, out: &mut Vec<Violation>) {
    if let (Some(f), Some(read_at)) = (o.fin, h.fin.read_at_ms) {
        if let (Winner::Open, Some(exp)) = (o.winner(), f.hold_expires_ms) {
            let late = read_at - exp;
            if late > h.hold_grace_ms as i64 {
                out.push(v(
                    "hold_outlived_expiry",
                    Some(o.id),
                    None,
                    format!(
                        "still AUTHORIZED {late} ms past hold_expires_at (grace {} ms)",
                        h.hold_grace_ms
                    ),
                ));
            }
        }
    }
    let captured = o.captured().unwrap_or(0);
    if o.led.refunded > captured {
        out.push(v(
            "refund_over_captured",
            Some(o.id),
            None,
            format!("refunded {} of {captured} captured", o.led.refunded),
        ));
    }
}

/// Each account's `held` against its open holds, and `available`.
fn check_held(
    h: &History<'_>,
    account_of: &HashMap<&str, &str>,
    led: &HashMap<&str, Entries<'_>>,
    out: &mut Vec<Violation>,
) {
    let amount_of: HashMap<&str, i64> = h.orders.iter().map(|(o, _, a)| (o.as_str(), *a)).collect();
    let mut by_status: HashMap<&str, i64> = HashMap::new();
    for f in &h.fin.orders {
        if f.status == "AUTHORIZED" {
            let amount = amount_of.get(f.id.as_str()).copied().unwrap_or(f.held);
            *by_status
                .entry(account_of.get(f.id.as_str()).copied().unwrap_or(""))
                .or_default() += amount;
        }
    }
    let mut by_ledger: HashMap<&str, i64> = HashMap::new();
    for (order, e) in led {
        if let ([hold], [], []) = (&e.holds[..], &e.captures[..], &e.releases[..]) {
            *by_ledger
                .entry(account_of.get(order).copied().unwrap_or(""))
                .or_default() += hold.amount;
        }
    }
    let balances: HashMap<&str, i64> = h
        .fin
        .balances
        .iter()
        .map(|(a, b)| (a.as_str(), *b))
        .collect();
    for (acct, held, available) in &h.fin.held {
        let acct = acct.as_str();
        let open = by_status.get(acct).copied().unwrap_or(0);
        let ledger = by_ledger.get(acct).copied().unwrap_or(0);
        let balance = balances.get(acct).copied().unwrap_or(0);
        let mut why = Vec::new();
        if !h.fin.orders.is_empty() && *held != open {
            why.push(format!("AUTHORIZED orders hold {open}"));
        }
        if *held != ledger {
            why.push(format!("the ledger's open holds are {ledger}"));
        }
        if *available != balance - held {
            why.push(format!(
                "available {available}, balance − held {}",
                balance - held
            ));
        }
        if !why.is_empty() {
            out.push(v(
                "held_mismatch",
                None,
                Some(acct),
                format!("held {held}; {}", why.join("; ")),
            ));
        }
    }
}

/// Every two-phase invariant of the history (see the module docs).
pub(super) fn check(h: &History<'_>, account_of: &HashMap<&str, &str>, out: &mut Vec<Violation>) {
    let told = told(h);
    let led = entries(h);
    let fin: HashMap<&str, &OrderLine> = h.fin.orders.iter().map(|f| (f.id.as_str(), f)).collect();
    let (none_told, none_led) = (Told::default(), Entries::default());
    for (id, _, amount) in h.orders {
        let id = id.as_str();
        let (t, l) = (told.get(id), led.get(id));
        let two_phase = t.is_some()
            || fin.contains_key(id)
            || l.is_some_and(|l| {
                !(l.holds.is_empty() && l.captures.is_empty() && l.releases.is_empty())
            });
        if !two_phase {
            continue;
        }
        let o = Order {
            id,
            amount: *amount,
            told: t.unwrap_or(&none_told),
            led: l.unwrap_or(&none_led),
            fin: fin.get(id).copied(),
        };
        check_hold(h, &o, out);
        check_effects(&o, out);
        check_oks(h, &o, out);
        check_refusals(h, &o, out);
        check_expiry_and_refunds(h, &o, out);
    }
    check_held(h, account_of, &led, out);
}

#[cfg(test)]
mod tests {
    use super::super::judge;
    use crate::storm::history::{FinalState, HeldLine, LedgerLine, Line, OrderLine};
    use crate::storm::liveness::Rules;

    const AMOUNT: i64 = 100;

    fn entry(kind: &str, id: &str, amount: i64) -> LedgerLine {
        LedgerLine {
            order: "o".into(),
            kind: kind.into(),
            entry: id.into(),
            amount,
            balance_after: 1_000,
            refund: None,
        }
    }

    /// Order `o` (100 on account `a`, opening 1,000), authorized once (entry
    /// `h`), then `steps` (op, amount, status, entry or code), ending in
    /// `ledger` (after the hold), the order read as `status` with `captured`,
    /// and account `a` at `balance` with `held`.
    struct Case<'a> {
        steps: &'a [(&'a str, i64, u16, &'a str)],
        ledger: Vec<LedgerLine>,
        status: &'a str,
        captured: Option<i64>,
        balance: i64,
        held: i64,
    }

    fn lines(c: Case) -> Vec<Line> {
        let mut out = vec![Line::Plan {
            accounts: vec![("a".into(), 1_000)],
            orders: vec![("o".into(), "a".into(), AMOUNT)],
            targets: vec!["http://t".into()],
            faults: false,
            slow_ms: None,
            hold_grace_ms: Some(1_000),
        }];
        let steps = [("authorize", AMOUNT, 200, "h")].iter().chain(c.steps);
        for (id, (op, amount, status, named)) in steps.enumerate() {
            out.push(Line::Invoke {
                id,
                op: (*op).into(),
                order: Some("o".into()),
                refund: None,
                amount: *amount,
                t_ms: id as f64,
                target: 0,
            });
            out.push(match status {
                200 => Line::Ok {
                    id,
                    t_ms: id as f64 + 1.0,
                    status: 200,
                    entry: Some((*named).into()),
                    replayed: Some(false),
                },
                _ => Line::Fail {
                    id,
                    t_ms: id as f64 + 1.0,
                    status: *status,
                    code: Some((*named).into()),
                },
            });
        }
        let mut ledger = vec![entry("hold", "h", AMOUNT)];
        ledger.extend(c.ledger);
        let held: HeldLine = ("a".into(), c.held, c.balance - c.held);
        out.push(Line::Final(FinalState {
            balances: vec![("a".into(), c.balance)],
            ledger,
            orders: vec![OrderLine {
                id: "o".into(),
                status: c.status.into(),
                captured: c.captured,
                held: if c.status == "AUTHORIZED" { AMOUNT } else { 0 },
                refunded: 0,
                hold_expires_ms: Some(10_000),
            }],
            held: vec![held],
            read_at_ms: Some(10_500),
            ..FinalState::default()
        }));
        out
    }

    fn kinds(c: Case) -> Vec<&'static str> {
        let rules = Rules {
            faults: false,
            slow_ms: 1_000,
        };
        let mut k: Vec<_> = judge(&lines(c), rules)
            .unwrap()
            .violations
            .iter()
            .map(|v| v.kind)
            .collect();
        k.sort_unstable();
        k.dedup();
        k
    }

    #[test]
    fn a_capture_raced_by_a_void_with_every_loser_told_holds() {
        let c = Case {
            steps: &[
                ("capture", 60, 200, "c"),
                ("void", AMOUNT, 409, "hold_already_captured"),
                ("capture", 60, 200, "c"),
                ("capture", 60, 200, "c"),
            ],
            ledger: vec![entry("capture", "c", 60), entry("release", "r", 40)],
            status: "PAID",
            captured: Some(60),
            balance: 940,
            held: 0,
        };
        assert!(kinds(c).is_empty());
    }

    #[test]
    fn a_hold_captured_twice_is_named() {
        let c = Case {
            steps: &[
                ("capture", AMOUNT, 200, "c1"),
                ("capture", AMOUNT, 200, "c2"),
            ],
            ledger: vec![
                entry("capture", "c1", AMOUNT),
                entry("capture", "c2", AMOUNT),
            ],
            status: "PAID",
            captured: Some(AMOUNT),
            balance: 800,
            held: 0,
        };
        assert_eq!(
            kinds(c),
            [
                "balance_outside_history",
                "captured_more_than_once",
                "ok_capture_not_captured",
                "settle_replays_disagree",
            ]
        );
    }

    #[test]
    fn a_capture_after_a_void_is_named() {
        let c = Case {
            steps: &[("void", AMOUNT, 200, "r"), ("capture", AMOUNT, 200, "c")],
            ledger: vec![entry("release", "r", AMOUNT), entry("capture", "c", AMOUNT)],
            status: "PAID",
            captured: Some(AMOUNT),
            balance: 900,
            held: 0,
        };
        assert_eq!(
            kinds(c),
            [
                "captured_and_released",
                "ok_void_not_voided",
                "settle_replays_disagree",
            ]
        );
    }

    #[test]
    fn a_refusal_that_names_the_wrong_winner_is_named() {
        // A void won, yet a capture was told the hold was captured, and the
        // void's own repeat was refused instead of replayed.
        let c = Case {
            steps: &[
                ("void", AMOUNT, 200, "r"),
                ("capture", AMOUNT, 409, "hold_already_captured"),
                ("void", AMOUNT, 409, "hold_voided"),
            ],
            ledger: vec![entry("release", "r", AMOUNT)],
            status: "VOIDED",
            captured: None,
            balance: 1_000,
            held: 0,
        };
        assert_eq!(kinds(c), ["refusal_names_wrong_winner"]);
    }

    #[test]
    fn a_hold_the_sweepers_left_past_its_expiry_is_named() {
        // Read 500 ms past its expiry with a 1 s grace: still fine.
        let ok = Case {
            steps: &[],
            ledger: vec![],
            status: "AUTHORIZED",
            captured: None,
            balance: 1_000,
            held: AMOUNT,
        };
        assert!(kinds(ok).is_empty());
        let mut late = lines(Case {
            steps: &[],
            ledger: vec![],
            status: "AUTHORIZED",
            captured: None,
            balance: 1_000,
            held: 0,
        });
        if let Some(Line::Final(f)) = late.last_mut() {
            f.read_at_ms = Some(12_000);
        }
        let rules = Rules {
            faults: false,
            slow_ms: 1_000,
        };
        let mut k: Vec<_> = judge(&late, rules)
            .unwrap()
            .violations
            .iter()
            .map(|v| v.kind)
            .collect();
        k.sort_unstable();
        assert_eq!(k, ["held_mismatch", "hold_outlived_expiry"]);
    }

    #[test]
    fn refunds_past_the_captured_sum_are_named() {
        let mut refund = entry("refund", "f", 80);
        refund.refund = Some("rf".into());
        let c = Case {
            steps: &[("capture", 60, 200, "c")],
            ledger: vec![entry("capture", "c", 60), entry("release", "r", 40), refund],
            status: "REFUNDED",
            captured: Some(60),
            balance: 1_020,
            held: 0,
        };
        assert_eq!(
            kinds(c),
            ["balance_outside_history", "refund_over_captured"]
        );
    }
}
