//! The analysis of one finished order: its incidents, race windows and timeline.
//!
//! Why apart: this joins requests ([`super::requests`]) and debits ([`super::debits`]) into
//! findings and adds them to [`Results`]; the cheap check that most orders cannot matter lives
//! here too, as the first step.

use crate::limits::{EVIDENCE_LINES_MAX, RACE_WINDOWS_LISTED_MAX};
use crate::parse::{Side, Step};

use super::debits::{amount_of, debits, Debit};
use super::requests::{build_requests, clusters, Req};
use super::{
    Ev, EvidenceRec, IncidentRec, OrderCtx, OrderState, RaceRec, ReqNames, Results, Timeline,
    TlMark, TlReq, REQ_NONE,
};

fn push_host(hosts: &mut Vec<u16>, h: u16) {
    if !hosts.contains(&h) {
        hosts.push(h);
    }
}

/// Gives one finished order's cross-host orderings to the clock-step tracker, before its batch
/// is analysed (so a step found in the batch is corrected first). Every bound the tracker takes
/// is a replay's (see `Drift::observe`): an order without one is skipped on its flag alone,
/// without reading its events (most orders; their events are cold in the cache by now).
pub fn observe_order(st: &mut OrderState, drift: &mut super::Drift) {
    if !st.replays || cannot_matter(st) {
        return;
    }
    st.evs.sort_unstable_by_key(|e| (e.ts, e.file, e.line));
    drift.observe(&st.evs);
}

/// Analyses one finished order and adds its findings to `out`.
pub fn analyze_order(oid: &[u8], st: &mut OrderState, ctx: &OrderCtx, out: &mut Results) {
    if cannot_matter(st) {
        return;
    }
    let oid = String::from_utf8_lossy(oid);
    st.evs.sort_unstable_by_key(|e| (e.ts, e.file, e.line));
    let reqs = build_requests(&st.evs, st.reqs.len());
    super::ordering::check_orderings(&oid, &st.evs, out);
    let mut a = Analysis {
        oid: &oid,
        evs: &st.evs,
        reqs: &reqs,
        window: None,
        any_finding: false,
        incident: false,
        lost: 0,
    };
    for side in [Side::Deduct, Side::Refund] {
        let cl = clusters(&reqs, side);
        // LOGS.md: an incident is more than one *debit* for an order. An order may
        // rightly have several refunds (distinct refund ids, which the events do not
        // carry), so refund commits only ever form race windows here.
        let ds = match side {
            Side::Deduct => debits(&st.evs, side),
            Side::Refund => Vec::new(),
        };
        let effects = ds.len() as u32;
        if effects >= 2 {
            a.incident(side, &cl, &ds, out);
        } else {
            a.races(side, &cl, effects, out);
        }
    }
    if a.incident {
        out.incident_totals.orders_affected += 1;
    }
    if ctx.timelines && a.any_finding {
        if !out.timeline_has_room(a.incident) {
            out.timelines_dropped += 1;
        } else {
            out.push_timeline(a.timeline(&st.reqs));
        }
    }
}

/// One order under analysis: its events (sorted), its requests, and what its findings so far
/// add up to, for its timeline.
struct Analysis<'a> {
    oid: &'a str,
    evs: &'a [Ev],
    reqs: &'a [Req],
    /// The window drawn in the timeline: an incident's race window, else the first healthy one.
    window: Option<(i64, i64)>,
    any_finding: bool,
    incident: bool,
    /// Fen lost in this order, over both sides.
    lost: i64,
}

impl Analysis<'_> {
    /// More than one debit on `side`: an incident; race windows of that side are part of it.
    fn incident(&mut self, side: Side, cl: &[Vec<usize>], ds: &[Debit], out: &mut Results) {
        self.incident = true;
        self.any_finding = true;
        out.races_in_incidents += cl.len() as u64;
        let lost = ds[1..]
            .iter()
            .fold(0i64, |a, d| a.saturating_add(d.amount.unwrap_or(0)));
        self.lost = self.lost.saturating_add(lost);
        let mut hosts = Vec::new();
        let (window, first, second) = self.incident_window(side, cl, ds, &mut hosts);
        for d in ds {
            if let Some(h) = d.host {
                push_host(&mut hosts, h);
            }
        }
        if window.is_some() {
            self.window = Some((first, second));
        }
        out.add_incident(IncidentRec {
            order_id: self.oid.to_string(),
            side,
            effects: ds.len() as u32,
            amount_lost: lost,
            race_window_us: window,
            first_entry_us: first,
            second_entry_us: second,
            hosts,
            evidence: evidence(self.evs, side),
        });
    }

    /// The race window of an incident and the entries of its first two debits' requests:
    /// (window width when they were in flight at once, first entry, second entry). Adds the
    /// hosts of the requests involved to `hosts`.
    fn incident_window(
        &self,
        side: Side,
        cl: &[Vec<usize>],
        ds: &[Debit],
        hosts: &mut Vec<u16>,
    ) -> (Option<i64>, i64, i64) {
        let reqs = self.reqs;
        let req_ix = |d: &Debit| {
            (d.req != REQ_NONE)
                .then(|| reqs.iter().position(|r| r.req == d.req))
                .flatten()
        };
        let (a, b) = (req_ix(&ds[0]), req_ix(&ds[1]));
        let cluster_of = |i: usize| cl.iter().position(|c| c.contains(&i));
        match (a, b) {
            (Some(a), Some(b)) => {
                let (x, y) = (
                    reqs[a].entry.min(reqs[b].entry),
                    reqs[a].entry.max(reqs[b].entry),
                );
                let same = cluster_of(a).is_some() && cluster_of(a) == cluster_of(b);
                push_host(hosts, reqs[a].host);
                push_host(hosts, reqs[b].host);
                (same.then_some(y - x), x, y)
            }
            _ => {
                let c = a
                    .or(b)
                    .and_then(cluster_of)
                    .or(if cl.is_empty() { None } else { Some(0) });
                match c {
                    Some(c) => {
                        let (x, y) = (reqs[cl[c][0]].entry, reqs[cl[c][1]].entry);
                        for &i in &cl[c] {
                            push_host(hosts, reqs[i].host);
                        }
                        (Some(y - x), x, y)
                    }
                    None => {
                        let first_req = reqs.iter().find(|r| r.side == side).map(|r| r.entry);
                        let x = a
                            .map(|i| reqs[i].entry)
                            .or(ds[0].ts)
                            .or(first_req)
                            .unwrap_or(self.evs[0].ts);
                        let y = b.map(|i| reqs[i].entry).or(ds[1].ts).unwrap_or(x);
                        for i in [a, b].into_iter().flatten() {
                            push_host(hosts, reqs[i].host);
                        }
                        (None, x, y)
                    }
                }
            }
        }
    }

    /// At most one debit on `side`: each cluster is a healthy race window.
    fn races(&mut self, side: Side, cl: &[Vec<usize>], effects: u32, out: &mut Results) {
        let reqs = self.reqs;
        for c in cl {
            self.any_finding = true;
            out.races_total += 1;
            let (x, y) = (reqs[c[0]].entry, reqs[c[1]].entry);
            if self.window.is_none() {
                self.window = Some((x, y));
            }
            if out.races.len() >= RACE_WINDOWS_LISTED_MAX {
                continue;
            }
            let mut hosts = Vec::new();
            for &i in c {
                push_host(&mut hosts, reqs[i].host);
            }
            out.races.push(RaceRec {
                order_id: self.oid.to_string(),
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

    /// The order's timeline: every request, and its money effects, duplicates, replays and
    /// rejections as marks.
    fn timeline(&self, names: &ReqNames) -> Timeline {
        let reqs = self.reqs;
        Timeline {
            order_id: self.oid.to_string(),
            incident: self.incident,
            amount_lost: self.lost,
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
                        String::from_utf8_lossy(names.get(r.req)).into_owned()
                    },
                })
                .collect(),
            marks: self
                .evs
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
                        reqs.iter()
                            .rposition(|r| r.req == REQ_NONE && r.host == e.host && r.entry <= e.ts)
                    },
                    host: e.host,
                    ts: e.ts,
                    kind: e.kind,
                    amount: amount_of(e),
                })
                .collect(),
            window: self.window,
        }
    }
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
