//! What is remembered of an order after it is retired, and how it rejoins a reopened order.
//!
//! Why apart: the engine retires orders to bound memory; an order with exactly one debit may
//! still get a second one later, so its debit is kept compactly and put back when it returns.

use crate::parse::{Side, Step};

use super::{Ev, OrderState, REQ_NONE};

/// The order's only debit and the entry of the request that made it, when it has exactly one
/// debit and no duplicate line: what must be remembered of it after retirement.
pub fn single_debit(st: &OrderState) -> Option<(Ev, Ev)> {
    let mut commit: Option<Ev> = None;
    for e in &st.evs {
        match (e.kind.step, e.kind.side) {
            (Step::Commit, Some(Side::Deduct)) if commit.is_some() => return None,
            (Step::Commit, Some(Side::Deduct)) => commit = Some(*e),
            (Step::Duplicate, Some(Side::Deduct)) => return None,
            _ => {}
        }
    }
    let c = commit?;
    let entry = st
        .evs
        .iter()
        .filter(|e| {
            matches!(e.kind.step, Step::Start | Step::CacheSet)
                && e.req == c.req
                && (c.req != REQ_NONE || e.host == c.host)
                && e.ts <= c.ts
        })
        .min_by_key(|e| (e.kind.step != Step::Start, e.ts))
        .copied()
        .unwrap_or(c);
    Some((entry, c))
}

/// Puts a remembered debit (and its entry) back into a reopened order, as one request.
pub fn rejoin(st: &mut OrderState, entry: Ev, commit: Ev) {
    let r = st.reqs.find_or_push(b"earlier request (retired)");
    let same = entry.file == commit.file && entry.line == commit.line;
    if !same {
        st.evs.push(Ev { req: r, ..entry });
    }
    st.evs.push(Ev { req: r, ..commit });
}
