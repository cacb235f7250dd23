//! An order's requests and their in-flight intervals, and the clusters of requests in flight at once.
//!
//! Why apart: this is the first half of the rules in the module docs (what a request is, when it
//! is in flight); the money side ([`super::debits`]) and the findings build on it.

use crate::limits::REQUEST_INFLIGHT_ASSUMED_MS_MAX;
use crate::parse::{Side, Step};

use super::{Ev, REQ_NONE};

#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) side: Side,
    pub(super) host: u16,
    pub(super) entry: i64,
    pub(super) end: i64,
    /// The `req` id, or `REQ_NONE` for a request identified by its line.
    pub(super) req: u16,
    pub(super) entry_line: u32,
}

#[derive(Default, Clone)]
struct ReqBuild {
    seen: bool,
    start: Option<(i64, u16, u32)>,
    cache: Option<(i64, u16, u32)>,
    first: (i64, u16, u32),
    last: i64,
    end: Option<i64>,
    side: Option<Side>,
}

pub(super) fn build_requests(evs: &[Ev], nreqs: usize) -> Vec<Req> {
    let mut out = Vec::new();
    let mut b = vec![ReqBuild::default(); nreqs];
    let mut reqless_hosts: Vec<u16> = Vec::new();
    for e in evs {
        if e.req == REQ_NONE {
            if !reqless_hosts.contains(&e.host) {
                reqless_hosts.push(e.host);
            }
            continue;
        }
        let Some(r) = b.get_mut(e.req as usize) else {
            continue;
        };
        let at = (e.ts, e.host, e.line);
        if !r.seen {
            r.seen = true;
            r.first = at;
        }
        r.last = r.last.max(e.ts);
        if r.side.is_none() {
            r.side = e.kind.side;
        }
        match e.kind.step {
            Step::Start if r.start.is_none() => r.start = Some(at),
            Step::CacheSet if r.cache.is_none() => r.cache = Some(at),
            Step::End if r.end.is_none() => r.end = Some(e.ts),
            _ => {}
        }
    }
    for (i, r) in b.iter().enumerate() {
        if !r.seen {
            continue;
        }
        let (entry, host, line) = r.start.or(r.cache).unwrap_or(r.first);
        out.push(Req {
            side: r.side.unwrap_or(Side::Deduct),
            host,
            entry,
            end: r.end.unwrap_or(r.last).max(entry),
            req: i as u16,
            entry_line: line,
        });
    }
    // Requests identified by line, per host.
    for h in reqless_hosts {
        push_reqless_requests(evs, h, &mut out);
    }
    out.sort_by_key(|r| (r.entry, r.host, r.entry_line));
    out
}

/// The requests of host `h` identified by their line (events without `req`): each entry starts
/// one, which ends at the first unused end event of its side after it, else at its side's last
/// event on the host, at most `request_inflight_assumed_ms_max` after entry.
fn push_reqless_requests(evs: &[Ev], h: u16, out: &mut Vec<Req>) {
    let cap = REQUEST_INFLIGHT_ASSUMED_MS_MAX * 1000;
    let on_host: Vec<&Ev> = evs
        .iter()
        .filter(|e| e.req == REQ_NONE && e.host == h)
        .collect();
    let has_start = on_host.iter().any(|e| e.kind.step == Step::Start);
    let mut used_end = vec![false; on_host.len()];
    for e in &on_host {
        let is_entry = match e.kind.step {
            Step::Start => true,
            Step::CacheSet => !has_start,
            _ => false,
        };
        if !is_entry {
            continue;
        }
        let side = e.kind.side.unwrap_or(Side::Deduct);
        let same_side = |x: &Ev| x.kind.side.is_none_or(|s| s == side);
        let end = on_host
            .iter()
            .enumerate()
            .find(|(j, x)| {
                !used_end[*j] && x.kind.step == Step::End && x.ts >= e.ts && same_side(x)
            })
            .map(|(j, x)| (j, x.ts));
        let end = match end {
            Some((j, t)) => {
                used_end[j] = true;
                t
            }
            None => on_host
                .iter()
                .filter(|x| x.ts >= e.ts && same_side(x))
                .map(|x| x.ts)
                .max()
                .unwrap_or(e.ts)
                .min(e.ts + cap),
        };
        out.push(Req {
            side,
            host: h,
            entry: e.ts,
            end,
            req: REQ_NONE,
            entry_line: e.line,
        });
    }
}

/// Groups of ≥ 2 requests (indices into `reqs`, by entry) of one side that were in flight at once.
pub(super) fn clusters(reqs: &[Req], side: Side) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut max_end = i64::MIN;
    for (i, r) in reqs.iter().enumerate().filter(|(_, r)| r.side == side) {
        let joins = match cur.last() {
            Some(&l) => r.entry < max_end || r.entry == reqs[l].entry,
            None => false,
        };
        if joins {
            cur.push(i);
            max_end = max_end.max(r.end);
        } else {
            if cur.len() >= 2 {
                out.push(std::mem::take(&mut cur));
            }
            cur = vec![i];
            max_end = r.end;
        }
    }
    if cur.len() >= 2 {
        out.push(cur);
    }
    out
}
