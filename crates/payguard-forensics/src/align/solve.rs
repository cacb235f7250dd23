//! From bounds on pairs of hosts to one offset per host: a pure function, tested on its own.
//!
//! Why this way: each pair of hosts with enough orderings both ways has an interval for the
//! difference of their offsets from one side; together they are a system of difference
//! constraints. Offsets are relative, so one host is the reference (a host the user gave
//! `--skew` for, else the zoned host with the most evidence); each other host's offset is
//! bracketed by shortest paths to and from it (Bellman-Ford), so one-sided evidence around a
//! cycle of hosts brackets too, and a negative cycle means contradicting evidence. The midpoint
//! is the estimate; a zone-less host's offset is split into the nearest quarter-hour zone and
//! the remainder, its skew. A host not reached is left alone.

use std::cmp::Reverse;
use std::collections::HashMap;

use crate::clock::{TzOffset, MS_US};
use crate::limits::{
    CLOCK_CONSTRAINTS_MIN, CLOCK_CONSTRAINTS_PER_SIDE_MIN, CLOCK_INTERVAL_MS_MAX,
    CLOCK_RATE_DISTINCT_S, CLOCK_RATE_EVENTS_MIN, CLOCK_RATE_PEAK_RATIO_MIN, CLOCK_RATE_ZONE_FIT_S,
};

use super::{Alignment, ClockEvidence, Evidence, HostClock, PairBounds, UserClock};

/// Zones are whole quarter hours (whole hours, :30 and :45 all are).
const ZONE_STEP_US: i64 = 15 * 60 * 1_000_000;
/// A second in microseconds.
const SEC_US: i64 = 1_000_000;

/// The event rate places a lag to the second: its bounds are this wide each way.
const CLOCK_RATE_LAG_SLACK_S: i64 = 2;

/// The widest zone in use (UTC+14).
const ZONE_US_MAX: i64 = 14 * 3600 * 1_000_000;

/// One usable bound: `d[to] - d[from] <= w` (a difference constraint).
struct Edge {
    to: usize,
    w: i64,
}

/// What one kind of evidence made of the hosts' offsets.
struct Tier {
    /// Bounds of each host's offset relative to the anchors.
    dist: Vec<Option<(i64, i64)>>,
    constraints: Vec<u64>,
    contradicted: Vec<bool>,
    anchors: Vec<usize>,
}

impl Tier {
    /// Whether host `h` is placed: reached within bounds by enough orderings, or an anchor.
    fn placed(&self, h: usize) -> Option<(i64, i64)> {
        let (lo, hi) = self.dist[h]?;
        (self.constraints[h] >= CLOCK_CONSTRAINTS_MIN || self.anchors.contains(&h))
            .then_some((lo, hi))
    }
}

/// Solves the difference constraints of `pairs` (see the module docs); `anchors`, when given,
/// are the reference hosts (so two tiers' offsets are relative to the same host).
fn tier(
    ev: &Evidence,
    pairs: &HashMap<(u32, u32), PairBounds>,
    major: &[Option<u32>],
    fixed: &[bool],
    anchors: Option<&[usize]>,
    notes: &mut Vec<String>,
) -> Tier {
    let nh = major.len();
    let (adj, constraints, contradicted) = edges(ev, pairs, major, notes);
    let anchors = match anchors {
        Some(a) if !a.is_empty() => a.to_vec(),
        _ => pick_anchors(major, &adj, &constraints, fixed),
    };
    let mut dist = bracket(&adj, &anchors, fixed, notes);
    // A reference with no host aligned to it is no reference.
    if (0..nh).all(|h| anchors.contains(&h) || dist[h].is_none()) {
        dist = vec![None; nh];
    }
    Tier {
        dist,
        constraints,
        contradicted,
        anchors,
    }
}

/// The bounds the ledger-id tier solves: per pair and direction, the orderings' bound when
/// there are `clock_constraints_per_side_min` of them, else theirs and the ids' together. So
/// ids never replace a direction orderings already bound, and a host placed by orderings keeps
/// that placement (see [`solve`]).
fn with_ids(ev: &Evidence) -> HashMap<(u32, u32), PairBounds> {
    let mut out = ev.pairs.clone();
    for (k, i) in &ev.id_pairs {
        let m = out.entry(*k).or_default();
        if m.n_lo < CLOCK_CONSTRAINTS_PER_SIDE_MIN && i.n_lo > 0 {
            m.lo = m.lo.max(i.lo);
            m.n_lo += i.n_lo;
        }
        if m.n_hi < CLOCK_CONSTRAINTS_PER_SIDE_MIN && i.n_hi > 0 {
            m.hi = m.hi.min(i.hi);
            m.n_hi += i.n_hi;
        }
    }
    out
}

/// Decides every host's clock from the evidence (see the module docs). Evidence comes in
/// tiers, strongest first: orderings of one order's requests, then ledger ids, then the event
/// rate (a zone only). A host is placed by the strongest tier that places it; a weaker tier
/// only places hosts the stronger ones left alone, relative to the same reference.
pub fn solve(ev: &Evidence, user: &UserClock) -> Alignment {
    let nh = ev.hosts.len();
    let major: Vec<Option<u32>> = (0..nh)
        .map(|h| {
            let (z, zl) = (ev.events[2 * h], ev.events[2 * h + 1]);
            (z + zl > 0).then_some(2 * h as u32 + u32::from(zl > z))
        })
        .collect();
    let mut notes = Vec::new();
    let fixed: Vec<bool> = ev.hosts.iter().map(|h| user.skew_of(h).is_some()).collect();
    let strong = tier(ev, &ev.pairs, &major, &fixed, None, &mut notes);
    let ids = (!ev.id_pairs.is_empty()).then(|| {
        let mut id_notes = Vec::new();
        let t = tier(
            ev,
            &with_ids(ev),
            &major,
            &fixed,
            Some(&strong.anchors),
            &mut id_notes,
        );
        for n in id_notes {
            if !notes.contains(&n) {
                notes.push(format!("with ledger ids: {n}"));
            }
        }
        t
    });
    let active = major.iter().filter(|m| m.is_some()).count();
    // The event rate is compared with the reference host's, whichever tier chose it.
    let by_rate = [
        &strong.anchors[..],
        ids.as_ref().map_or(&[][..], |t| &t.anchors[..]),
    ]
    .concat()
    .first()
    .and_then(|&a| major[a]);
    let mut hosts = Vec::new();
    for (h, m) in major.iter().enumerate() {
        let Some(dom) = *m else { continue };
        let zone_less = dom % 2 == 1;
        let mut hc = HostClock {
            host: ev.hosts[h].clone(),
            zone: zone_less.then(|| user.tz.unwrap_or_default()),
            skew_us: None,
            interval_us: None,
            constraints: strong.constraints[h],
            applied: false,
            reference: strong.anchors.contains(&h),
            evidence: None,
        };
        let infer_zone = zone_less && user.tz.is_none();
        let by_ids = ids.as_ref().and_then(|t| t.placed(h).map(|b| (t, b)));
        if let Some((lo, hi)) = strong.placed(h) {
            hc.evidence = Some(ClockEvidence::Orderings);
            place(&mut hc, lo, hi, infer_zone);
        } else if let Some((t, (lo, hi))) = by_ids {
            hc.constraints = t.constraints[h];
            hc.reference = t.anchors.contains(&h);
            hc.evidence = Some(ClockEvidence::LedgerIds);
            place(&mut hc, lo, hi, infer_zone);
        } else if let Some(lag) = by_rate
            .filter(|_| infer_zone)
            .and_then(|r| rate_lag(ev, dom, r))
        {
            hc.evidence = Some(ClockEvidence::EventRate);
            let slack = CLOCK_RATE_LAG_SLACK_S * SEC_US;
            place(&mut hc, -lag - slack, -lag + slack, true);
        } else if active > 1 && strong.contradicted[h] {
            notes.push(format!(
                "{}: its clock was left alone: its orderings with other hosts contradict each other",
                hc.host
            ));
        } else if active > 1 {
            notes.push(format!(
                "{}: too little evidence to align its clock ({} cross-host orderings; needs {} in all and {} each way within {} ms); its times are read as written",
                hc.host, hc.constraints, CLOCK_CONSTRAINTS_MIN, CLOCK_CONSTRAINTS_PER_SIDE_MIN, CLOCK_INTERVAL_MS_MAX
            ));
        }
        if !hc.applied {
            hc.evidence = None;
        }
        if let Some(s) = user.skew_of(&hc.host) {
            hc.skew_us = Some(s);
            hc.interval_us = Some((s, s));
        }
        hosts.push(hc);
    }
    let file_zone = file_zones(ev, &hosts, user);
    Alignment {
        hosts,
        file_zone,
        notes,
    }
}

/// The lag (microseconds) by which domain `x`'s events per second best follow domain `r`'s:
/// how far `x`'s raw clock is ahead. `None` unless both have `clock_rate_events_min` events,
/// the best lag scores `clock_rate_peak_ratio_min` times any lag farther than
/// `clock_rate_distinct_s` from it, and it is within `clock_rate_zone_fit_s` of a quarter-hour
/// zone: weak evidence, so it only ever names a zone.
fn rate_lag(ev: &Evidence, x: u32, r: u32) -> Option<i64> {
    let (xs, rs) = (ev.rate.get(x as usize)?, ev.rate.get(r as usize)?);
    let total = |m: &HashMap<i64, u32>| m.values().map(|&c| c as u64).sum::<u64>();
    if x == r || total(xs) < CLOCK_RATE_EVENTS_MIN || total(rs) < CLOCK_RATE_EVENTS_MIN {
        return None;
    }
    let mut score: HashMap<i64, u64> = HashMap::new();
    for (&bx, &cx) in xs {
        for (&br, &cr) in rs {
            *score.entry(bx - br).or_default() += cx as u64 * cr as u64;
        }
    }
    let (&best, &top) = score.iter().max_by_key(|(l, s)| (**s, Reverse(**l)))?;
    let rival = score
        .iter()
        .filter(|(l, _)| (**l - best).abs() > CLOCK_RATE_DISTINCT_S)
        .map(|(_, s)| *s)
        .max()
        .unwrap_or(0);
    let zone_s = ZONE_STEP_US / SEC_US;
    let off_zone = best - (best + zone_s / 2).div_euclid(zone_s) * zone_s;
    (top >= rival.saturating_mul(CLOCK_RATE_PEAK_RATIO_MIN)
        && off_zone.abs() <= CLOCK_RATE_ZONE_FIT_S)
        .then_some(best * SEC_US)
}

/// Sets a reached host's zone and skew from its offset's bounds: the midpoint, unless the
/// host's own clock (skew 0 after its zone) already fits every ordering, when it is not moved.
fn place(hc: &mut HostClock, lo: i64, hi: i64, infer_zone: bool) {
    let mid = lo + (hi - lo) / 2;
    let zone_us = if infer_zone {
        (-mid + ZONE_STEP_US / 2).div_euclid(ZONE_STEP_US) * ZONE_STEP_US
    } else {
        0
    };
    let unmoved = -zone_us;
    let d = if (lo..=hi).contains(&unmoved) {
        unmoved
    } else {
        mid
    };
    if zone_us.abs() > ZONE_US_MAX {
        return;
    }
    if infer_zone {
        hc.zone = Some(TzOffset {
            secs: (zone_us / 1_000_000) as i32,
        });
    }
    hc.skew_us = Some(d + zone_us);
    hc.interval_us = Some((lo + zone_us, hi + zone_us));
    hc.applied = true;
}

/// The usable bounds between hosts' main domains as a graph of difference constraints (one
/// edge per direction backed by `clock_constraints_per_side_min` orderings), and the orderings
/// counted per host.
fn edges(
    ev: &Evidence,
    pairs: &HashMap<(u32, u32), PairBounds>,
    major: &[Option<u32>],
    notes: &mut Vec<String>,
) -> (Vec<Vec<Edge>>, Vec<u64>, Vec<bool>) {
    let nh = major.len();
    let mut contradicted = vec![false; nh];
    let mut adj: Vec<Vec<Edge>> = (0..nh).map(|_| Vec::new()).collect();
    let mut constraints = vec![0u64; nh];
    let mut pairs: Vec<_> = pairs.iter().collect();
    pairs.sort_by_key(|(k, _)| **k);
    for (&(a, b), p) in pairs {
        let (ha, hb) = ((a / 2) as usize, (b / 2) as usize);
        if major[ha] != Some(a) || major[hb] != Some(b) {
            continue;
        }
        let n = p.n_lo + p.n_hi;
        constraints[ha] += n;
        constraints[hb] += n;
        if p.n_lo > 0 && p.n_hi > 0 && p.lo > p.hi {
            notes.push(format!(
                "{} / {}: their orderings contradict each other by {:.1} ms (a clock step, or logs that are not what they claim); not used to align",
                ev.hosts[ha],
                ev.hosts[hb],
                (p.lo - p.hi) as f64 / MS_US as f64
            ));
            contradicted[ha] = true;
            contradicted[hb] = true;
            continue;
        }
        if p.n_hi >= CLOCK_CONSTRAINTS_PER_SIDE_MIN {
            adj[ha].push(Edge { to: hb, w: p.hi });
        }
        if p.n_lo >= CLOCK_CONSTRAINTS_PER_SIDE_MIN {
            adj[hb].push(Edge { to: ha, w: -p.lo });
        }
    }
    (adj, constraints, contradicted)
}

/// The reference hosts: those the user gave `--skew` for, else the one connected host with the
/// most evidence, zoned hosts first (a zone in the log is the best clue to true time).
fn pick_anchors(
    major: &[Option<u32>],
    adj: &[Vec<Edge>],
    constraints: &[u64],
    fixed: &[bool],
) -> Vec<usize> {
    let user: Vec<usize> = (0..major.len())
        .filter(|&h| fixed[h] && major[h].is_some())
        .collect();
    if !user.is_empty() {
        return user;
    }
    (0..major.len())
        .filter(|&h| !adj[h].is_empty())
        .max_by_key(|&h| {
            let zoned = major[h].is_some_and(|d| d % 2 == 0);
            (zoned, constraints[h], Reverse(h))
        })
        .into_iter()
        .collect()
}

/// Bounds of each host's offset relative to the anchors: the upper bound is the shortest path
/// from an anchor in the constraint graph, the lower bound minus the shortest path back (the
/// tightest bounds all the orderings together allow, through any chain of hosts). `None` where
/// either is missing, too wide, or the constraints contradict each other (a negative cycle).
fn bracket(
    adj: &[Vec<Edge>],
    anchors: &[usize],
    fixed: &[bool],
    notes: &mut Vec<String>,
) -> Vec<Option<(i64, i64)>> {
    let n = adj.len();
    let mut rev: Vec<Vec<Edge>> = (0..n).map(|_| Vec::new()).collect();
    for (from, es) in adj.iter().enumerate() {
        for e in es {
            rev[e.to].push(Edge { to: from, w: e.w });
        }
    }
    let (up, up_ok) = shortest(adj, anchors, fixed);
    let (down, down_ok) = shortest(&rev, anchors, fixed);
    if !(up_ok && down_ok) {
        notes.push(
            "the cross-host orderings contradict each other around a cycle of hosts (a clock step, or logs that are not what they claim); no clock was aligned".into(),
        );
        return vec![None; n];
    }
    (0..n)
        .map(|h| {
            let (hi, lo) = (up[h]?, -down[h]?);
            (lo <= hi && hi - lo <= CLOCK_INTERVAL_MS_MAX * MS_US).then_some((lo, hi))
        })
        .collect()
}

/// Bellman-Ford from the anchors (hosts the user fixed are not moved through); `false` when a
/// negative cycle remains after `n` rounds.
fn shortest(adj: &[Vec<Edge>], anchors: &[usize], fixed: &[bool]) -> (Vec<Option<i64>>, bool) {
    let n = adj.len();
    let mut dist: Vec<Option<i64>> = vec![None; n];
    for &a in anchors {
        dist[a] = Some(0);
    }
    for _ in 0..=n {
        let mut changed = false;
        for h in 0..n {
            let Some(dh) = dist[h] else { continue };
            for e in &adj[h] {
                if fixed[e.to] {
                    continue;
                }
                let c = dh.saturating_add(e.w);
                if dist[e.to].is_none_or(|d| c < d) {
                    dist[e.to] = Some(c);
                    changed = true;
                }
            }
        }
        if !changed {
            return (dist, true);
        }
    }
    (dist, false)
}

/// Per file, the zone for its zone-less times: that of the host most of them belong to, when
/// its zone was inferred and applied.
fn file_zones(
    ev: &Evidence,
    hosts: &[HostClock],
    user: &UserClock,
) -> Vec<Option<crate::clock::TzOffset>> {
    if user.tz.is_some() {
        return vec![None; ev.file_zoneless.len()];
    }
    let by_name: HashMap<&str, &HostClock> = hosts.iter().map(|h| (h.host.as_str(), h)).collect();
    ev.file_zoneless
        .iter()
        .map(|counts| {
            let (&h, _) = counts.iter().max_by_key(|(h, n)| (**n, Reverse(**h)))?;
            let hc = by_name.get(ev.hosts.get(h as usize)?.as_str())?;
            if hc.applied {
                hc.zone
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::PairBounds;

    fn ev(hosts: &[&str], events: &[u64], pairs: &[((u32, u32), PairBounds)]) -> Evidence {
        Evidence {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            events: events.to_vec(),
            pairs: pairs.iter().copied().collect(),
            id_pairs: HashMap::new(),
            rate: vec![HashMap::new(); events.len()],
            file_zoneless: vec![[(0u16, 10u64)].into_iter().collect()],
            ..Evidence::default()
        }
    }

    fn pb(lo: i64, hi: i64, n: u64) -> PairBounds {
        PairBounds {
            lo,
            n_lo: n,
            hi,
            n_hi: n,
        }
    }

    #[test]
    fn a_zone_less_host_gets_a_zone_and_a_skew() {
        // Host 0 zone-less (domain 1), host 1 zoned (domain 2): d1 - d2 = -8 h - 287 ms ± 1 ms.
        let d = -8 * 3_600_000_000 - 287_000;
        let e = ev(
            &["pay-1", "pay-2"],
            &[0, 10, 10, 0],
            &[((1, 2), pb(-d - 1000, -d + 1000, 5))],
        );
        let a = solve(&e, &UserClock::default());
        let h0 = &a.hosts[0];
        assert!(h0.applied && !h0.reference);
        assert_eq!(h0.zone, Some(TzOffset { secs: 8 * 3600 }));
        assert_eq!(h0.skew_us, Some(-287_000));
        assert_eq!(h0.interval_us, Some((-288_000, -286_000)));
        assert!(a.hosts[1].reference);
        assert_eq!(a.file_zone, vec![Some(TzOffset { secs: 8 * 3600 })]);
        // With --tz given, the zone is the user's and the whole offset is skew.
        let u = UserClock {
            tz: Some(TzOffset { secs: 8 * 3600 }),
            skew_us: vec![],
        };
        let e = ev(
            &["pay-1", "pay-2"],
            &[0, 10, 10, 0],
            &[((1, 2), pb(286_000, 288_000, 5))],
        );
        let a = solve(&e, &u);
        assert_eq!(a.hosts[0].skew_us, Some(-287_000));
        assert_eq!(a.file_zone, vec![None]);
    }

    #[test]
    fn a_clock_that_fits_every_ordering_is_not_moved() {
        let e = ev(
            &["a", "b"],
            &[10, 0, 10, 0],
            &[((0, 2), pb(-1_000, 2_000, 5))],
        );
        let a = solve(&e, &UserClock::default());
        assert!(a.hosts[1].applied);
        assert_eq!(a.hosts[1].skew_us, Some(0));
        assert_eq!(a.hosts[1].interval_us, Some((-1_000, 2_000)));
        let e = ev(
            &["a", "b"],
            &[10, 0, 10, 0],
            &[((0, 2), pb(1_000, 4_000, 5))],
        );
        assert_eq!(
            solve(&e, &UserClock::default()).hosts[1].skew_us,
            Some(2_500)
        );
    }

    #[test]
    fn thin_or_one_sided_or_contradicting_evidence_is_not_applied() {
        let one_sided = PairBounds {
            lo: 0,
            n_lo: 50,
            hi: i64::MAX,
            n_hi: 0,
        };
        let e = ev(&["a", "b"], &[10, 0, 10, 0], &[((0, 2), one_sided)]);
        let a = solve(&e, &UserClock::default());
        assert!(a.hosts.iter().all(|h| !h.applied));
        assert!(a
            .notes
            .iter()
            .any(|n| n.starts_with("a: too little evidence")));
        let e = ev(
            &["a", "b"],
            &[10, 0, 10, 0],
            &[((0, 2), pb(5_000, 1_000, 5))],
        );
        let a = solve(&e, &UserClock::default());
        assert!(a.hosts.iter().all(|h| !h.applied));
        assert!(a.notes.iter().any(|n| n.contains("contradict")));
    }

    #[test]
    fn offsets_chain_through_the_narrowest_path() {
        // a-b [10, 12] ms, b-c [20, 22] ms, a-c [0, 100] ms (too wide to use directly).
        let e = ev(
            &["a", "b", "c"],
            &[30, 0, 10, 0, 10, 0],
            &[
                ((0, 2), pb(10_000, 12_000, 5)),
                ((2, 4), pb(20_000, 22_000, 5)),
                ((0, 4), pb(0, 100_000, 5)),
            ],
        );
        let a = solve(&e, &UserClock::default());
        assert!(a.hosts[0].reference);
        assert_eq!(a.hosts[1].skew_us, Some(11_000));
        assert_eq!(a.hosts[2].skew_us, Some(32_000));
        assert_eq!(a.hosts[2].interval_us, Some((30_000, 34_000)));
        // A user skew on c makes c the reference and fixes its skew.
        let u = UserClock {
            tz: None,
            skew_us: vec![("c".into(), 5_000)],
        };
        let a = solve(&e, &u);
        assert!(a.hosts[2].reference);
        assert_eq!(a.hosts[2].skew_us, Some(5_000));
        assert_eq!(a.hosts[1].skew_us, Some(-21_000));
    }

    #[test]
    fn ledger_ids_place_only_hosts_the_orderings_leave_alone() {
        // Orderings: b - a in [10, 12] ms. Ids: b - a in [40, 60] ms (contradicting them) and
        // c - a in [-22, -18] ms (c has no orderings at all).
        let mut e = ev(
            &["a", "b", "c"],
            &[30, 0, 10, 0, 10, 0],
            &[((0, 2), pb(10_000, 12_000, 5))],
        );
        e.id_pairs = [
            ((0, 2), pb(40_000, 60_000, 50)),
            ((0, 4), pb(-22_000, -18_000, 50)),
        ]
        .into_iter()
        .collect();
        let a = solve(&e, &UserClock::default());
        assert!(a.hosts[0].reference);
        assert_eq!(a.hosts[1].skew_us, Some(11_000));
        assert_eq!(a.hosts[1].evidence, Some(ClockEvidence::Orderings));
        assert_eq!(a.hosts[2].skew_us, Some(-20_000));
        assert_eq!(a.hosts[2].evidence, Some(ClockEvidence::LedgerIds));
        assert_eq!(a.hosts[2].constraints, 100);
    }

    #[test]
    fn the_event_rate_names_a_zone_only_when_its_peak_is_clear() {
        let series = |shift: i64, burst_at: &[i64]| -> HashMap<i64, u32> {
            (0..120)
                .map(|t| (t + shift, 40 + if burst_at.contains(&t) { 400 } else { 0 }))
                .collect()
        };
        let mut e = ev(&["a", "b"], &[5_000, 0, 0, 5_000], &[]);
        e.rate[0] = series(0, &[10, 70]);
        // b's clock is 8 h ahead (zone +08:00, zone-less): its bursts come 28,800 s later.
        e.rate[3] = series(8 * 3600, &[10, 70]);
        assert_eq!(rate_lag(&e, 3, 0), Some(8 * 3600 * SEC_US));
        // Off a quarter-hour zone by more than `clock_rate_zone_fit_s`: says nothing.
        e.rate[3] = series(8 * 3600 + 300, &[10, 70]);
        assert_eq!(rate_lag(&e, 3, 0), None);
        // Two equal peaks far apart (the same load an hour later): says nothing.
        let mut twice = series(8 * 3600, &[10, 70]);
        twice.extend(series(9 * 3600, &[10, 70]));
        e.rate[3] = twice;
        assert_eq!(rate_lag(&e, 3, 0), None);
        // Too few events: says nothing.
        e.rate[3] = series(8 * 3600, &[10, 70]);
        e.rate[0] = [(5, 10u32)].into_iter().collect();
        assert_eq!(rate_lag(&e, 3, 0), None);
    }
}
