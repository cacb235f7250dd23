//! Reconstruction of one order: its requests, their in-flight intervals, its money effects,
//! and from those its incidents (more than one debit) and race windows (requests in flight at once).
//!
//! Why: this is the contract of LOGS.md "What forensics must find", kept apart from reading and
//! merging so it can be tested on hand-made events. It sees one order's events, unsorted, and
//! sorts them itself: input order is never trusted.
//!
//! Rules, in brief (README-forensics.md has the long form):
//! - a request is identified by `req`; lines without `req` are each their own request when they
//!   are an entry (`deduct_start`, or `order_cache_set` on a host whose req-less lines have no start);
//! - a request is in flight from its entry to its end event, else its last event (req-less: the
//!   host's last req-less event, at most `request_inflight_assumed_ms_max` after entry);
//! - debits are `deduct_commit`s, plus each `duplicate_deduct` whose `req` has no commit; a
//!   `duplicate_deduct` without `req` proves at least one more debit than the duplicates seen;
//!   `entries` on a duplicate proves that many.

use crate::limits::{
    EVIDENCE_LINES_MAX, INCIDENTS_LISTED_MAX, RACE_WINDOWS_LISTED_MAX, REQUESTS_PER_ORDER_MAX,
    REQUEST_INFLIGHT_ASSUMED_MS_MAX, TIMELINE_INCIDENT_ORDERS_MAX, TIMELINE_RACE_ORDERS_MAX,
};
use crate::parse::{EventKind, Side, Step};

/// No `req` on the line.
pub const REQ_NONE: u16 = u16::MAX;

/// One event kept for an order (32 bytes; strings are interned ids).
#[derive(Debug, Clone, Copy)]
pub struct Ev {
    /// UTC microseconds after skew.
    pub ts: i64,
    /// `i64::MIN` when the line had no amount.
    pub amount: i64,
    pub line: u32,
    pub file: u16,
    pub host: u16,
    /// Index into [`OrderState::reqs`], or [`REQ_NONE`].
    pub req: u16,
    pub kind: EventKind,
    /// `entries` of a duplicate (0: none).
    pub entries: u16,
}

/// The events of one open order. Invariant: `last_us` is the max `ts` of `evs`.
#[derive(Debug)]
pub struct OrderState {
    pub evs: Vec<Ev>,
    /// Request ids seen in this order; `Ev::req` indexes it.
    pub reqs: ReqNames,
    pub last_us: i64,
}

impl OrderState {
    /// Empties the state, keeping its buffers for the next order.
    pub fn clear(&mut self) {
        self.evs.clear();
        self.reqs.clear();
        self.last_us = i64::MIN;
    }
}

impl Default for OrderState {
    fn default() -> Self {
        OrderState {
            evs: Vec::new(),
            reqs: ReqNames::default(),
            last_us: i64::MIN,
        }
    }
}

/// Bytes of the first request id kept inline (most orders have one request, with a short id).
const REQ_FIRST_INLINE_BYTES: usize = 22;

/// The request ids of one order. The first id, when short, lives inline (no allocation, and in
/// the same cache line as the order); the others are packed in one buffer, each as its length
/// (two little-endian bytes) then its bytes. Invariant: `count == 0` or id 0 is inline
/// (`first_len > 0`) or it is the first one in `buf`.
#[derive(Debug, Default, Clone)]
pub struct ReqNames {
    count: u16,
    /// Length of the inline first id; 0 when the first id is in `buf` (or there is none).
    first_len: u8,
    first: [u8; REQ_FIRST_INLINE_BYTES],
    buf: Vec<u8>,
}

impl ReqNames {
    /// The index of `id`, added if new; [`REQ_NONE`] past `requests_per_order_max`.
    pub fn find_or_push(&mut self, id: &[u8]) -> u16 {
        let id = &id[..id.len().min(u16::MAX as usize)];
        let inline = self.first_len as usize;
        if inline > 0 && &self.first[..inline] == id {
            return 0;
        }
        let mut i = 0;
        let mut n = u16::from(inline > 0);
        while i + 2 <= self.buf.len() {
            let len = u16::from_le_bytes([self.buf[i], self.buf[i + 1]]) as usize;
            if &self.buf[i + 2..i + 2 + len] == id {
                return n;
            }
            i += 2 + len;
            n += 1;
        }
        if self.count as usize >= REQUESTS_PER_ORDER_MAX {
            return REQ_NONE;
        }
        if self.count == 0 && !id.is_empty() && id.len() <= REQ_FIRST_INLINE_BYTES {
            self.first[..id.len()].copy_from_slice(id);
            self.first_len = id.len() as u8;
        } else {
            self.buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(id);
        }
        self.count += 1;
        n
    }

    /// The id at `index`.
    pub fn get(&self, index: u16) -> &[u8] {
        let inline = self.first_len as usize;
        if inline > 0 && index == 0 {
            return &self.first[..inline];
        }
        let mut i = 0;
        let mut n = u16::from(inline > 0);
        while i + 2 <= self.buf.len() {
            let len = u16::from_le_bytes([self.buf[i], self.buf[i + 1]]) as usize;
            if n == index {
                return &self.buf[i + 2..i + 2 + len];
            }
            i += 2 + len;
            n += 1;
        }
        &[]
    }

    /// Forgets every id, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.first_len = 0;
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// No ids.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Settings for analysis.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderCtx {
    pub timelines: bool,
}

/// A line that supports a finding.
#[derive(Debug, Clone)]
pub struct EvidenceRec {
    pub file: u16,
    pub line: u32,
    pub ts: i64,
    pub kind: EventKind,
}

/// A duplicate effect.
#[derive(Debug, Clone)]
pub struct IncidentRec {
    pub order_id: String,
    pub side: Side,
    pub effects: u32,
    /// Minor units (fen).
    pub amount_lost: i64,
    pub race_window_us: Option<i64>,
    pub first_entry_us: i64,
    pub second_entry_us: i64,
    pub hosts: Vec<u16>,
    pub evidence: Vec<EvidenceRec>,
}

/// Requests of one order in flight at once.
#[derive(Debug, Clone)]
pub struct RaceRec {
    pub order_id: String,
    pub side: Side,
    pub width_us: i64,
    pub requests: u32,
    pub hosts: Vec<u16>,
    pub moved_money: u32,
    pub first_entry_us: i64,
    pub second_entry_us: i64,
}

/// A request drawn in a timeline.
#[derive(Debug, Clone)]
pub struct TlReq {
    pub host: u16,
    pub side: Side,
    pub entry: i64,
    pub end: i64,
    pub label: String,
}

/// An instant drawn in a timeline (money effects, duplicates, replays, rejections).
#[derive(Debug, Clone)]
pub struct TlMark {
    /// The request (index into [`Timeline::reqs`]) the event belongs to, when known.
    pub req: Option<usize>,
    pub host: u16,
    pub ts: i64,
    pub kind: EventKind,
    pub amount: Option<i64>,
}

/// One order's requests and effects, kept for `--trace-out`/`--html`.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub order_id: String,
    pub incident: bool,
    /// Fen lost in this order (0 without an incident): the worst timelines are kept.
    pub amount_lost: i64,
    pub reqs: Vec<TlReq>,
    pub marks: Vec<TlMark>,
    /// The race window (first entry, second entry) when there is one.
    pub window: Option<(i64, i64)>,
}

/// Findings over all orders analysed so far.
#[derive(Debug, Default)]
pub struct Results {
    /// The worst incidents (all while there are at most `incidents_listed_max`).
    pub incidents: Vec<IncidentRec>,
    /// Sums over every incident, listed or not.
    pub incident_totals: IncidentTotals,
    /// Healthy race windows (not part of an incident); at most `race_windows_listed_max`.
    pub races: Vec<RaceRec>,
    /// Every healthy race window, listed or not.
    pub races_total: u64,
    /// Race windows inside incident orders.
    pub races_in_incidents: u64,
    pub timelines: Vec<Timeline>,
    /// Timelines of orders without an incident in `timelines`.
    pub timelines_races: usize,
    pub timelines_dropped: u64,
}

/// Sums over every incident, kept apart from the (bounded) list.
#[derive(Debug, Default, Clone, Copy)]
pub struct IncidentTotals {
    pub incidents: u64,
    pub orders_affected: u64,
    pub duplicate_effects: u64,
    pub amount_lost: i64,
}

/// Worst first: most money lost, then most effects, then order id.
pub fn worse(a: &IncidentRec, b: &IncidentRec) -> std::cmp::Ordering {
    b.amount_lost
        .cmp(&a.amount_lost)
        .then(b.effects.cmp(&a.effects))
        .then(a.order_id.cmp(&b.order_id))
}

impl Results {
    fn add_incident(&mut self, i: IncidentRec) {
        let t = &mut self.incident_totals;
        t.incidents += 1;
        t.duplicate_effects += i.effects.saturating_sub(1) as u64;
        t.amount_lost = t.amount_lost.saturating_add(i.amount_lost);
        self.incidents.push(i);
        // Keep the worst: sort and cut once the list is 1.5 times the limit (amortised O(log n)).
        if self.incidents.len() >= INCIDENTS_LISTED_MAX + INCIDENTS_LISTED_MAX / 2 {
            self.trim_incidents();
        }
    }

    /// Sorts incidents worst first and keeps at most `incidents_listed_max`.
    pub fn trim_incidents(&mut self) {
        self.incidents.sort_by(worse);
        self.incidents.truncate(INCIDENTS_LISTED_MAX);
    }

    /// Race-only timelines: the first `timeline_race_orders_max`. Incident timelines: all,
    /// trimmed to the worst `timeline_incident_orders_max` whenever they reach twice that.
    fn timeline_has_room(&self, incident: bool) -> bool {
        incident || self.timelines_races < TIMELINE_RACE_ORDERS_MAX
    }

    fn push_timeline(&mut self, t: Timeline) {
        if t.incident {
            let incidents = self.timelines.len() - self.timelines_races;
            if incidents + 1 >= 2 * TIMELINE_INCIDENT_ORDERS_MAX {
                self.trim_incident_timelines();
            }
        } else {
            self.timelines_races += 1;
        }
        self.timelines.push(t);
    }

    /// Keeps every race timeline and the worst `timeline_incident_orders_max` incident timelines.
    pub fn trim_incident_timelines(&mut self) {
        let mut inc: Vec<Timeline> = Vec::new();
        let mut rest: Vec<Timeline> = Vec::new();
        for t in self.timelines.drain(..) {
            if t.incident {
                inc.push(t);
            } else {
                rest.push(t);
            }
        }
        if inc.len() > TIMELINE_INCIDENT_ORDERS_MAX {
            inc.sort_by(|a, b| {
                b.amount_lost
                    .cmp(&a.amount_lost)
                    .then(a.order_id.cmp(&b.order_id))
            });
            self.timelines_dropped += (inc.len() - TIMELINE_INCIDENT_ORDERS_MAX) as u64;
            inc.truncate(TIMELINE_INCIDENT_ORDERS_MAX);
        }
        rest.extend(inc);
        self.timelines = rest;
    }
}

#[derive(Debug, Clone)]
struct Req {
    side: Side,
    host: u16,
    entry: i64,
    end: i64,
    /// The `req` id, or `REQ_NONE` for a request identified by its line.
    req: u16,
    entry_line: u32,
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

fn build_requests(evs: &[Ev], nreqs: usize) -> Vec<Req> {
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
    let cap = REQUEST_INFLIGHT_ASSUMED_MS_MAX * 1000;
    for h in reqless_hosts {
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
    out.sort_by_key(|r| (r.entry, r.host, r.entry_line));
    out
}

/// Groups of ≥ 2 requests (indices into `reqs`, by entry) of one side that were in flight at once.
fn clusters(reqs: &[Req], side: Side) -> Vec<Vec<usize>> {
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

#[derive(Debug, Clone, Copy)]
struct Debit {
    ts: Option<i64>,
    amount: Option<i64>,
    req: u16,
    host: Option<u16>,
}

fn amount_of(e: &Ev) -> Option<i64> {
    (e.amount != i64::MIN).then_some(e.amount)
}

/// The debits (or, for refunds, credits) of one side, first one first, and the order's known amount.
fn debits(evs: &[Ev], side: Side) -> Vec<Debit> {
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

fn push_host(hosts: &mut Vec<u16>, h: u16) {
    if !hosts.contains(&h) {
        hosts.push(h);
    }
}

/// Analyses one finished order and adds its findings to `out`.
pub fn analyze_order(oid: &[u8], st: &mut OrderState, ctx: &OrderCtx, out: &mut Results) {
    if cannot_matter(st) {
        return;
    }
    let oid = String::from_utf8_lossy(oid);
    let oid: &str = &oid;
    let evs = &mut st.evs;
    evs.sort_unstable_by_key(|e| (e.ts, e.file, e.line));
    let reqs = build_requests(evs, st.reqs.len());
    let mut window_for_timeline = None;
    let mut any_finding = false;
    let mut incident_here = false;
    let mut lost_here = 0i64;
    for side in [Side::Deduct, Side::Refund] {
        let cl = clusters(&reqs, side);
        // LOGS.md: an incident is more than one *debit* for an order. An order may
        // rightly have several refunds (distinct refund ids, which the events do not
        // carry), so refund commits only ever form race windows here.
        let ds = match side {
            Side::Deduct => debits(evs, side),
            Side::Refund => Vec::new(),
        };
        let effects = ds.len() as u32;
        if effects >= 2 {
            incident_here = true;
            any_finding = true;
            out.races_in_incidents += cl.len() as u64;
            let lost = ds[1..]
                .iter()
                .fold(0i64, |a, d| a.saturating_add(d.amount.unwrap_or(0)));
            lost_here = lost_here.saturating_add(lost);
            let req_ix = |d: &Debit| {
                (d.req != REQ_NONE)
                    .then(|| reqs.iter().position(|r| r.req == d.req))
                    .flatten()
            };
            let (a, b) = (req_ix(&ds[0]), req_ix(&ds[1]));
            let cluster_of = |i: usize| cl.iter().position(|c| c.contains(&i));
            let mut hosts = Vec::new();
            let (window, first, second) = match (a, b) {
                (Some(a), Some(b)) => {
                    let (x, y) = (
                        reqs[a].entry.min(reqs[b].entry),
                        reqs[a].entry.max(reqs[b].entry),
                    );
                    let same = cluster_of(a).is_some() && cluster_of(a) == cluster_of(b);
                    push_host(&mut hosts, reqs[a].host);
                    push_host(&mut hosts, reqs[b].host);
                    (same.then_some(y - x), x, y)
                }
                _ => {
                    let c =
                        a.or(b)
                            .and_then(cluster_of)
                            .or(if cl.is_empty() { None } else { Some(0) });
                    match c {
                        Some(c) => {
                            let (x, y) = (reqs[cl[c][0]].entry, reqs[cl[c][1]].entry);
                            for &i in &cl[c] {
                                push_host(&mut hosts, reqs[i].host);
                            }
                            (Some(y - x), x, y)
                        }
                        None => {
                            let first_req = reqs.iter().find(|r| r.side == side).map(|r| r.entry);
                            let x = a
                                .map(|i| reqs[i].entry)
                                .or(ds[0].ts)
                                .or(first_req)
                                .unwrap_or(evs[0].ts);
                            let y = b.map(|i| reqs[i].entry).or(ds[1].ts).unwrap_or(x);
                            for i in [a, b].into_iter().flatten() {
                                push_host(&mut hosts, reqs[i].host);
                            }
                            (None, x, y)
                        }
                    }
                }
            };
            for d in &ds {
                if let Some(h) = d.host {
                    push_host(&mut hosts, h);
                }
            }
            if window.is_some() {
                window_for_timeline = Some((first, second));
            }
            out.add_incident(IncidentRec {
                order_id: oid.to_string(),
                side,
                effects,
                amount_lost: lost,
                race_window_us: window,
                first_entry_us: first,
                second_entry_us: second,
                hosts,
                evidence: evidence(evs, side),
            });
        } else {
            for c in &cl {
                any_finding = true;
                out.races_total += 1;
                let (x, y) = (reqs[c[0]].entry, reqs[c[1]].entry);
                if window_for_timeline.is_none() {
                    window_for_timeline = Some((x, y));
                }
                if out.races.len() >= RACE_WINDOWS_LISTED_MAX {
                    continue;
                }
                let mut hosts = Vec::new();
                for &i in c {
                    push_host(&mut hosts, reqs[i].host);
                }
                out.races.push(RaceRec {
                    order_id: oid.to_string(),
                    side,
                    width_us: y - x,
                    requests: c.len() as u32,
                    hosts,
                    moved_money: effects,
                    first_entry_us: x,
                    second_entry_us: y,
                });
            }
        }
    }
    if incident_here {
        out.incident_totals.orders_affected += 1;
    }
    if ctx.timelines && any_finding {
        if !out.timeline_has_room(incident_here) {
            out.timelines_dropped += 1;
        } else {
            out.push_timeline(Timeline {
                order_id: oid.to_string(),
                incident: incident_here,
                amount_lost: lost_here,
                reqs: reqs
                    .iter()
                    .map(|r| TlReq {
                        host: r.host,
                        side: r.side,
                        entry: r.entry,
                        end: r.end,
                        label: if r.req == REQ_NONE {
                            format!("line {}", r.entry_line)
                        } else {
                            String::from_utf8_lossy(st.reqs.get(r.req)).into_owned()
                        },
                    })
                    .collect(),
                marks: evs
                    .iter()
                    .filter(|e| {
                        matches!(
                            e.kind.step,
                            Step::Commit | Step::Duplicate | Step::Replay | Step::Rejected
                        )
                    })
                    .map(|e| TlMark {
                        req: if e.req != REQ_NONE {
                            reqs.iter().position(|r| r.req == e.req)
                        } else {
                            // A req-less event belongs to the latest req-less request on its host.
                            reqs.iter().rposition(|r| {
                                r.req == REQ_NONE && r.host == e.host && r.entry <= e.ts
                            })
                        },
                        host: e.host,
                        ts: e.ts,
                        kind: e.kind,
                        amount: amount_of(e),
                    })
                    .collect(),
                window: window_for_timeline,
            });
        }
    }
}

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

/// The common case, decided without sorting or allocating: one request (so no race) with at
/// most one debit per side and no duplicate line (so no incident).
fn cannot_matter(st: &OrderState) -> bool {
    let mut req = None;
    let mut reqless_entries = 0u32;
    let mut commits = [0u32; 2];
    for e in &st.evs {
        match e.kind.step {
            Step::Duplicate => return false,
            Step::Commit => {
                let i = (e.kind.side == Some(Side::Refund)) as usize;
                commits[i] += 1;
                if commits[i] > 1 {
                    return false;
                }
            }
            Step::Start | Step::CacheSet if e.req == REQ_NONE => {
                reqless_entries += 1;
                if reqless_entries > 1 {
                    return false;
                }
            }
            _ => {}
        }
        if e.req != REQ_NONE {
            match req {
                None => req = Some(e.req),
                Some(r) if r != e.req => return false,
                _ => {}
            }
        }
    }
    // One req-ful request and one req-less entry could still overlap.
    !(req.is_some() && reqless_entries > 0)
}

fn evidence(evs: &[Ev], side: Side) -> Vec<EvidenceRec> {
    let on_side = |e: &Ev| e.kind.side.is_none_or(|s| s == side);
    let money = |e: &Ev| matches!(e.kind.step, Step::Commit | Step::Duplicate);
    let entry = |e: &Ev| matches!(e.kind.step, Step::Start | Step::CacheSet | Step::Inflight);
    let mut picked: Vec<&Ev> = evs
        .iter()
        .filter(|e| on_side(e) && money(e))
        .take(EVIDENCE_LINES_MAX)
        .collect();
    let room = EVIDENCE_LINES_MAX - picked.len();
    picked.extend(evs.iter().filter(|e| on_side(e) && entry(e)).take(room));
    picked.sort_by_key(|e| (e.ts, e.file, e.line));
    picked
        .into_iter()
        .map(|e| EvidenceRec {
            file: e.file,
            line: e.line,
            ts: e.ts,
            kind: e.kind,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        ts_ms: i64,
        step: Step,
        side: Option<Side>,
        req: u16,
        host: u16,
        amount: Option<i64>,
    ) -> Ev {
        Ev {
            ts: ts_ms * 1000,
            amount: amount.unwrap_or(i64::MIN),
            line: ts_ms as u32,
            file: 0,
            host,
            req,
            kind: EventKind { step, side },
            entries: 0,
        }
    }

    fn run(evs: Vec<Ev>, nreqs: usize) -> Results {
        let mut st = OrderState {
            evs,
            reqs: {
                let mut r = ReqNames::default();
                for i in 0..nreqs {
                    r.find_or_push(format!("r{i}").as_bytes());
                }
                r
            },
            last_us: 0,
        };
        let mut r = Results::default();
        analyze_order(b"O", &mut st, &OrderCtx { timelines: true }, &mut r);
        r
    }

    const D: Option<Side> = Some(Side::Deduct);

    #[test]
    fn the_worst_incidents_are_kept_and_all_are_counted() {
        let mut r = Results::default();
        let n = INCIDENTS_LISTED_MAX + INCIDENTS_LISTED_MAX / 2 + 7;
        for i in 0..n {
            r.add_incident(IncidentRec {
                order_id: format!("O{i}"),
                side: Side::Deduct,
                effects: 2,
                amount_lost: i as i64,
                race_window_us: None,
                first_entry_us: 0,
                second_entry_us: 0,
                hosts: Vec::new(),
                evidence: Vec::new(),
            });
        }
        r.trim_incidents();
        assert_eq!(r.incidents.len(), INCIDENTS_LISTED_MAX);
        assert_eq!(r.incidents[0].amount_lost, n as i64 - 1);
        assert_eq!(
            r.incidents.last().unwrap().amount_lost,
            (n - INCIDENTS_LISTED_MAX) as i64
        );
        assert_eq!(r.incident_totals.incidents, n as u64);
        assert_eq!(r.incident_totals.amount_lost, (n as i64 - 1) * n as i64 / 2);
    }

    #[test]
    fn req_names_intern() {
        let mut r = ReqNames::default();
        assert_eq!(r.find_or_push(b"a"), 0);
        assert_eq!(r.find_or_push(b"bb"), 1);
        assert_eq!(r.find_or_push(b"a"), 0);
        assert_eq!((r.get(1), r.len()), (&b"bb"[..], 2));
        let long = [b'x'; 40];
        assert_eq!(r.find_or_push(&long), 2);
        assert_eq!(
            (r.get(0), r.get(2), r.get(3)),
            (&b"a"[..], &long[..], &b""[..])
        );
        // A long first id goes to the buffer.
        let mut r = ReqNames::default();
        assert_eq!(r.find_or_push(&long), 0);
        assert_eq!(r.find_or_push(b"a"), 1);
        assert_eq!((r.get(0), r.get(1)), (&long[..], &b"a"[..]));
        r.clear();
        assert_eq!((r.find_or_push(b"z"), r.len()), (0, 1));
    }

    #[test]
    fn incident_lines() {
        let r = run(
            vec![
                ev(44_109, Step::Duplicate, D, REQ_NONE, 0, Some(1_185_000)),
                ev(43_883, Step::CacheSet, None, REQ_NONE, 0, None),
                ev(43_882, Step::CacheSet, None, REQ_NONE, 0, None),
            ],
            0,
        );
        assert_eq!(r.incidents.len(), 1);
        let i = &r.incidents[0];
        assert_eq!(
            (i.effects, i.amount_lost, i.race_window_us),
            (2, 1_185_000, Some(1000))
        );
        assert_eq!(
            (i.first_entry_us, i.second_entry_us),
            (43_882_000, 43_883_000)
        );
        assert_eq!(i.evidence.len(), 3);
        assert!(r.races.is_empty());
    }

    #[test]
    fn healthy_replay_is_a_race_not_an_incident() {
        let r = run(
            vec![
                ev(0, Step::Start, D, 0, 0, None),
                ev(1, Step::Start, D, 1, 1, None),
                ev(5, Step::Commit, D, 0, 0, Some(100)),
                ev(6, Step::Replay, D, 1, 1, None),
                ev(7, Step::End, D, 0, 0, None),
                ev(8, Step::End, D, 1, 1, None),
            ],
            2,
        );
        assert!(r.incidents.is_empty());
        assert_eq!(r.races.len(), 1);
        assert_eq!(
            (
                r.races[0].width_us,
                r.races[0].moved_money,
                r.races[0].requests
            ),
            (1000, 1, 2)
        );
    }

    #[test]
    fn naive_double_commit_with_duplicate_line_counts_two() {
        let r = run(
            vec![
                ev(0, Step::Start, D, 0, 0, None),
                ev(2, Step::Start, D, 1, 1, None),
                ev(5, Step::Commit, D, 0, 0, Some(100)),
                ev(6, Step::Commit, D, 1, 1, Some(100)),
                ev(6, Step::Duplicate, D, 1, 1, Some(100)),
                ev(7, Step::End, D, 0, 0, None),
                ev(8, Step::End, D, 1, 1, None),
            ],
            2,
        );
        assert_eq!(r.incidents.len(), 1);
        let i = &r.incidents[0];
        assert_eq!(
            (i.effects, i.amount_lost, i.race_window_us),
            (2, 100, Some(2000))
        );
        assert_eq!(i.hosts.len(), 2);
    }

    #[test]
    fn late_second_debit_has_no_window() {
        let r = run(
            vec![
                ev(0, Step::Start, D, 0, 0, None),
                ev(5, Step::Commit, D, 0, 0, Some(100)),
                ev(7, Step::End, D, 0, 0, None),
                ev(300_000, Step::Start, D, 1, 0, None),
                ev(300_005, Step::Commit, D, 1, 0, Some(100)),
                ev(300_007, Step::End, D, 1, 0, None),
            ],
            2,
        );
        assert_eq!(r.incidents.len(), 1);
        assert_eq!(r.incidents[0].race_window_us, None);
        assert_eq!(r.incidents[0].second_entry_us, 300_000_000);
        assert_eq!(r.races_total, 0);
    }

    #[test]
    fn sequential_requests_do_not_race() {
        let r = run(
            vec![
                ev(0, Step::Start, D, 0, 0, None),
                ev(7, Step::End, D, 0, 0, None),
                ev(8, Step::Start, D, 1, 0, None),
                ev(9, Step::Replay, D, 1, 0, None),
                ev(10, Step::End, D, 1, 0, None),
            ],
            2,
        );
        assert!(r.incidents.is_empty());
        assert_eq!(r.races_total, 0);
    }
}
