//! The debits of an order: its commits, and those its duplicate lines prove.
//!
//! Why apart: this is the money half of the rules in the module docs (what counts as a debit),
//! tested through [`super::analyze_order`] but readable on its own.

use crate::parse::{Side, Step};

use super::{Ev, REQ_NONE};

#[derive(Debug, Clone, Copy)]
pub(super) struct Debit {
    pub(super) ts: Option<i64>,
    pub(super) amount: Option<i64>,
    pub(super) req: u16,
    pub(super) host: Option<u16>,
}

pub(super) fn amount_of(e: &Ev) -> Option<i64> {
    (e.amount != i64::MIN).then_some(e.amount)
}

/// The debits (or, for refunds, credits) of one side, first one first, and the order's known amount.
pub(super) fn debits(evs: &[Ev], side: Side) -> Vec<Debit> {
    let is = |e: &Ev, step| e.kind.step == step && e.kind.side == Some(side);
    let commits: Vec<&Ev> = evs.iter().filter(|e| is(e, Step::Commit)).collect();
    let committed: Vec<u16> = commits
        .iter()
        .map(|e| e.req)
        .filter(|r| *r != REQ_NONE)
        .collect();
    let dups: Vec<&Ev> = evs.iter().filter(|e| is(e, Step::Duplicate)).collect();
    let known = commits.iter().chain(dups.iter()).find_map(|e| amount_of(e));
    let timed = |e: &Ev| Debit {
        ts: Some(e.ts),
        amount: amount_of(e),
        req: e.req,
        host: Some(e.host),
    };
    let mut out: Vec<Debit> = commits.iter().map(|e| timed(e)).collect();
    out.extend(
        dups.iter()
            .filter(|e| e.req != REQ_NONE && !committed.contains(&e.req))
            .map(|e| timed(e)),
    );
    let reqless_dups: Vec<&Ev> = dups.iter().copied().filter(|e| e.req == REQ_NONE).collect();
    let max_entries = dups.iter().map(|e| e.entries as usize).max().unwrap_or(0);
    let effects = out
        .len()
        .max(if reqless_dups.is_empty() {
            0
        } else {
            reqless_dups.len() + 1
        })
        .max(max_entries);
    out.sort_by_key(|d| d.ts);
    // Missing debits: first the req-less duplicates themselves (timed), then unlogged ones,
    // taken to be the first debit.
    let mut extra = reqless_dups.iter();
    while out.len() < effects {
        match extra.next() {
            Some(e) => out.push(timed(e)),
            None => break,
        }
    }
    out.sort_by_key(|d| d.ts);
    while out.len() < effects {
        out.insert(
            0,
            Debit {
                ts: None,
                amount: None,
                req: REQ_NONE,
                host: None,
            },
        );
    }
    for d in &mut out {
        if d.amount.is_none() {
            d.amount = known;
        }
    }
    out
}
