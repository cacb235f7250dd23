//! Clock steps found anywhere in the input, and followed: the same cross-host orderings clock
//! alignment reads from each file's first bytes, followed through the whole merge under the
//! applied clocks.
//!
//! Why: alignment samples a bounded prefix of every file and applies one offset per host. A
//! clock that steps after the sample (NTP, a VM migration) makes every later time of that host
//! wrong by the step; the impossible orderings show it one order at a time. This finds it once
//! (which pair of hosts, when, by how much), names the host that moved, and gives the engine a
//! [`Correction`]: it moves that host's times from the step on back by the step, in the orders
//! still open and in every line read afterwards, before the batch that revealed it is analysed.
//!
//! How: each order with one commit of a side gives bounds on how much more one host's clock
//! must be moved relative to another's (a replay after its commit, a lock taken after its
//! release). Per pair of hosts, bounds that fit the current segment (an interval that holds a
//! correction) are folded into it; one that does not starts a candidate segment; a candidate
//! bracketed from both sides by enough orderings (`clock_constraints_min`,
//! `clock_constraints_per_side_min`) becomes the current segment, and the change is a step.
//! Bounds are taken in time order within each retirement batch. The host that moved is the one
//! two bracketing pairs agree on, or, when one pair brackets it, the one of its two hosts whose
//! other pairs' recent edges (the last `DRIFT_RECENT_MAX` bounds each way) moved by the step
//! while the other's stayed; steps within twice the slack need two pairs. Unnamed: reported only.
//!
//! Memory: one batch of bounds (the orders of one retirement scan: bounded by the retention
//! windows), two segments per pair of hosts, and at most `clock_steps_listed_max` steps.

use std::collections::{HashMap, VecDeque};

use crate::clock::MS_US;
use crate::limits::{
    CLOCK_CONSTRAINTS_MIN, CLOCK_CONSTRAINTS_PER_SIDE_MIN, CLOCK_STEPS_LISTED_MAX,
    IMPOSSIBLE_ORDERING_SLACK_MS,
};
use crate::parse::{Side, Step};

use super::{Ev, REQ_NONE};

/// `d[to] - d[from] >= v`: host `to`'s clock must be moved at least `v` microseconds more than
/// host `from`'s, as seen at `at_us`.
#[derive(Debug, Clone, Copy)]
struct Bound {
    at_us: i64,
    from: u16,
    to: u16,
    v: i64,
}

/// An interval holding the extra correction of a pair's second host relative to its first.
#[derive(Debug, Clone, Copy)]
struct Segment {
    lo: i64,
    n_lo: u64,
    hi: i64,
    n_hi: u64,
    since_us: i64,
}

impl Segment {
    fn new(since_us: i64) -> Self {
        Segment {
            lo: i64::MIN,
            n_lo: 0,
            hi: i64::MAX,
            n_hi: 0,
            since_us,
        }
    }

    /// Whether the bound (`x >= v` when `lower`, else `x <= v`) leaves the interval non-empty,
    /// within the slack ordering checks allow.
    fn fits(&self, lower: bool, v: i64) -> bool {
        let slack = IMPOSSIBLE_ORDERING_SLACK_MS * MS_US;
        if lower {
            v <= self.hi.saturating_add(slack)
        } else {
            self.lo <= v.saturating_add(slack)
        }
    }

    fn add(&mut self, lower: bool, v: i64) {
        if lower {
            self.lo = self.lo.max(v);
            self.n_lo += 1;
        } else {
            self.hi = self.hi.min(v);
            self.n_hi += 1;
        }
    }

    fn bracketed(&self) -> bool {
        self.n_lo >= CLOCK_CONSTRAINTS_PER_SIDE_MIN
            && self.n_hi >= CLOCK_CONSTRAINTS_PER_SIDE_MIN
            && self.n_lo + self.n_hi >= CLOCK_CONSTRAINTS_MIN
    }

    fn mid(&self) -> i64 {
        self.lo + (self.hi - self.lo) / 2
    }
}

#[derive(Debug, Clone)]
struct PairTrack {
    cur: Segment,
    cand: Option<Segment>,
    /// The last `DRIFT_RECENT_MAX` bounds of each side (lower, upper) as (time, value): a pair
    /// with evidence one way only never brackets a step, but its edge still moves with it.
    recent: [VecDeque<(i64, i64)>; 2],
}

/// Bounds kept per pair and side to see an edge move (see [`PairTrack::recent`]).
const DRIFT_RECENT_MAX: usize = 32;

/// A step of one pair of hosts' clocks relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairStep {
    /// The pair `(a, b)`, `a < b`.
    pub hosts: [u16; 2],
    /// How far host `b`'s clock moved relative to host `a`'s (microseconds; positive: ahead).
    pub by_us: i64,
    /// The first ordering after the step (aligned time).
    pub at_us: i64,
    /// The orderings that bracket the new offset.
    pub orderings: u64,
    /// Whether the merge corrected the stepped host's times from the step on.
    pub followed: bool,
    /// The host that moved and by how much, when this pair alone tells (see `one_moved`).
    pub moved: Option<(u16, i64)>,
}

/// A correction of one host's clock from a time on: its times from `from_us` (aligned) are
/// `by_us` too late (its clock moved ahead by that much), and are moved back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correction {
    pub host: u16,
    pub from_us: i64,
    pub by_us: i64,
}

/// The tracker (see the module docs).
#[derive(Debug, Default)]
pub struct Drift {
    batch: Vec<Bound>,
    pairs: HashMap<(u16, u16), PairTrack>,
    /// Steps found, in the order found (at most `clock_steps_listed_max`).
    pub steps: Vec<PairStep>,
    /// Correct the host behind a step (see [`Drift::flush`]); off with `--no-align`.
    pub follow: bool,
}

impl Drift {
    /// Collects one order's cross-host bounds (its events sorted by time) for the batch.
    pub fn observe(&mut self, evs: &[Ev]) {
        let host = |e: &Ev| e.host;
        for side in [Side::Deduct, Side::Refund] {
            let is = |e: &Ev, step| e.kind.step == step && e.kind.side == Some(side);
            let mut commits = evs.iter().filter(|e| is(e, Step::Commit));
            let (Some(c), None) = (commits.next(), commits.next()) else {
                continue;
            };
            let released = evs
                .iter()
                .filter(|e| e.kind.step == Step::LockReleased && c.req != REQ_NONE)
                .find(|e| e.req == c.req && host(e) == host(c) && e.ts >= c.ts);
            for r in evs
                .iter()
                .filter(|r| is(r, Step::Replay) && r.host != c.host)
            {
                self.batch.push(Bound {
                    at_us: r.ts,
                    from: c.host,
                    to: r.host,
                    v: c.ts - r.ts,
                });
                let acquired = evs
                    .iter()
                    .filter(|e| e.kind.step == Step::LockAcquired && r.req != REQ_NONE)
                    .filter(|e| e.req == r.req && host(e) == host(r) && e.ts <= r.ts)
                    .max_by_key(|e| e.ts);
                if let (Some(rel), Some(acq)) = (released, acquired) {
                    self.batch.push(Bound {
                        at_us: acq.ts,
                        from: c.host,
                        to: r.host,
                        v: rel.ts - acq.ts,
                    });
                }
            }
        }
    }

    /// Follows the batch's bounds in time order (call before each retirement batch is
    /// analysed). With `follow`, gives the corrections of hosts whose step is now known (named
    /// by two or more pairs, see [`stepped_host`]), after moving the pairs' intervals to match:
    /// the caller moves the host's times, so later bounds fit the old offsets again.
    pub fn flush(&mut self) -> Vec<Correction> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.sort_unstable_by_key(|b| (b.at_us, b.from, b.to, b.v));
        for b in &batch {
            self.follow(b);
        }
        batch.clear();
        self.batch = batch;
        if !self.follow {
            return Vec::new();
        }
        let mut out: Vec<Correction> = Vec::new();
        for i in 0..self.steps.len() {
            let open: Vec<PairStep> = self.steps.iter().filter(|s| !s.followed).copied().collect();
            let s = self.steps[i];
            if s.followed {
                continue;
            }
            let Some((host, by_us)) = stepped_host(&open, &s).or(s.moved) else {
                continue;
            };
            let mut from_us = i64::MAX;
            for p in self.steps.iter_mut().filter(|p| !p.followed) {
                if moved(p, host).is_some_and(|m| (m - by_us).abs() <= agree_slack()) {
                    p.followed = true;
                    from_us = from_us.min(p.at_us);
                }
            }
            self.shift(host, by_us, from_us);
            out.push(Correction {
                host,
                from_us,
                by_us,
            });
        }
        out
    }

    /// The host behind a pair's step when only one pair brackets it: the one of the two whose
    /// other pairs' edges moved by the step around its time while the other's did not.
    fn one_moved(&self, s: &PairStep) -> Option<(u16, i64)> {
        let [a, b] = s.hosts;
        let (ma, mb) = (-s.by_us, s.by_us);
        let (sa, sb) = (
            self.edges_moved(a, b, ma, s.at_us),
            self.edges_moved(b, a, mb, s.at_us),
        );
        // A step this small is within the edges' own spread: two bracketing pairs must agree.
        if s.by_us.abs() <= 2 * agree_slack() {
            return None;
        }
        match (sa == Some(true), sb == Some(true)) {
            (true, false) => Some((a, ma)),
            (false, true) => Some((b, mb)),
            _ => None,
        }
    }

    /// Whether host `h`'s pairs other than with `other` show their edges moved as if `h`'s
    /// clock moved by `m` at `at_us` (`Some(true)`), stayed (`Some(false)`), or cannot tell.
    fn edges_moved(&self, h: u16, other: u16, m: i64, at_us: i64) -> Option<bool> {
        let slack = agree_slack();
        let mut seen = None;
        for ((a, b), t) in &self.pairs {
            let change = match (*a == h, *b == h) {
                (true, _) if *b != other => m,
                (_, true) if *a != other => -m,
                _ => continue,
            };
            for (side, r) in t.recent.iter().enumerate() {
                let edge = |after: bool| {
                    let vs = r.iter().filter(|e| (e.0 >= at_us) == after).map(|e| e.1);
                    if side == 0 {
                        vs.max()
                    } else {
                        vs.min()
                    }
                };
                let (Some(before), Some(after)) = (edge(false), edge(true)) else {
                    continue;
                };
                let shift = after - before;
                if (shift - change).abs() <= slack {
                    return Some(true);
                }
                if shift.abs() <= slack {
                    seen = Some(false);
                }
            }
        }
        seen
    }

    /// Host `h`'s times move back by `by_us`: every pair of `h` needs that much less (or more).
    fn shift(&mut self, h: u16, by_us: i64, from_us: i64) {
        for ((a, b), t) in self.pairs.iter_mut() {
            let d = if *b == h {
                by_us
            } else if *a == h {
                -by_us
            } else {
                continue;
            };
            for r in t.recent.iter_mut() {
                for e in r.iter_mut().filter(|e| e.0 >= from_us) {
                    e.1 = e.1.saturating_add(d);
                }
            }
            for s in std::iter::once(&mut t.cur).chain(t.cand.as_mut()) {
                if s.n_lo > 0 {
                    s.lo = s.lo.saturating_add(d);
                }
                if s.n_hi > 0 {
                    s.hi = s.hi.saturating_add(d);
                }
            }
        }
    }

    fn follow(&mut self, b: &Bound) {
        if b.from == b.to {
            return;
        }
        // As a bound on x = d[hi host] - d[lo host].
        let (key, lower, v) = if b.from < b.to {
            ((b.from, b.to), true, b.v)
        } else {
            ((b.to, b.from), false, -b.v)
        };
        let t = self.pairs.entry(key).or_insert_with(|| PairTrack {
            cur: Segment::new(b.at_us),
            cand: None,
            recent: [VecDeque::new(), VecDeque::new()],
        });
        let r = &mut t.recent[usize::from(!lower)];
        if r.len() >= DRIFT_RECENT_MAX {
            r.pop_front();
        }
        r.push_back((b.at_us, v));
        let fits_cur = t.cur.fits(lower, v);
        if fits_cur {
            t.cur.add(lower, v);
        }
        t.cand = match t.cand {
            Some(mut c) if c.fits(lower, v) => {
                c.add(lower, v);
                Some(c)
            }
            // Back to the current offset: the candidate was an outlier.
            Some(_) if fits_cur => None,
            _ if !fits_cur => {
                let mut c = Segment::new(b.at_us);
                c.add(lower, v);
                Some(c)
            }
            c => c,
        };
        let Some(c) = t.cand.filter(Segment::bracketed) else {
            return;
        };
        let before = if t.cur.bracketed() { t.cur.mid() } else { 0 };
        t.cur = c;
        t.cand = None;
        if self.steps.len() >= CLOCK_STEPS_LISTED_MAX {
            return;
        }
        let mut step = PairStep {
            hosts: [key.0, key.1],
            // The correction grew by (after - before): the clock moved back by as much.
            by_us: before - c.mid(),
            at_us: c.since_us,
            orderings: c.n_lo + c.n_hi,
            followed: false,
            moved: None,
        };
        // Now, while the pairs' recent bounds still reach back before the step.
        step.moved = self.one_moved(&step);
        self.steps.push(step);
    }
}

/// The host behind steps of several pairs: one in two or more pair steps that agree on how far
/// it moved (within twice the ordering slack), else `None` (two hosts: either could have).
pub fn stepped_host(steps: &[PairStep], s: &PairStep) -> Option<(u16, i64)> {
    let slack = agree_slack();
    s.hosts.iter().find_map(|&h| {
        let m = moved(s, h)?;
        let agree = steps
            .iter()
            .filter(|p| moved(p, h).is_some_and(|o| (o - m).abs() <= slack))
            .count();
        (agree >= 2).then_some((h, m))
    })
}

/// How far host `h` moved relative to the other host of step `p` (`None`: not its step).
fn moved(p: &PairStep, h: u16) -> Option<i64> {
    if p.hosts[1] == h {
        Some(p.by_us)
    } else if p.hosts[0] == h {
        Some(-p.by_us)
    } else {
        None
    }
}

/// Steps of one host seen against two others agree within this (each is bracketed within the
/// ordering slack).
fn agree_slack() -> i64 {
    2 * IMPOSSIBLE_ORDERING_SLACK_MS * MS_US
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::EventKind;

    fn ev(ts_ms: i64, step: Step, host: u16) -> Ev {
        Ev {
            ts: ts_ms * 1000,
            amount: i64::MIN,
            line: 0,
            file: 0,
            host,
            req: REQ_NONE,
            kind: EventKind {
                step,
                side: Some(Side::Deduct),
                capture: false,
            },
            entries: 0,
        }
    }

    /// Orders every 100 ms alternating which host commits; replays 1 ms after the commit on
    /// the other host, whose clock is `step_ms` further ahead from `step_at_ms` on.
    fn run(step_at_ms: i64, step_ms: i64) -> Drift {
        let mut d = Drift::default();
        for i in 0..100i64 {
            let t = i * 100;
            let (ch, rh) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
            let shift = |h: u16, ts: i64| {
                if h == 1 && ts >= step_at_ms {
                    ts + step_ms
                } else {
                    ts
                }
            };
            d.observe(&[
                ev(shift(ch, t), Step::Commit, ch),
                ev(shift(rh, t + 1), Step::Replay, rh),
            ]);
            if i % 30 == 29 {
                d.flush();
            }
        }
        d.flush();
        d
    }

    #[test]
    fn a_step_mid_run_is_found_once_with_its_size_and_time() {
        let d = run(5_000, 600);
        assert_eq!(d.steps.len(), 1, "{:?}", d.steps);
        let s = d.steps[0];
        assert_eq!(s.hosts, [0, 1]);
        assert!((s.by_us - 600_000).abs() <= 1_000, "{s:?}");
        assert!((5_000_000..5_700_000).contains(&s.at_us), "{s:?}");
        // No step, or one within the slack: nothing.
        assert!(run(5_000, 0).steps.is_empty());
        assert!(run(5_000, 1).steps.is_empty());
    }

    #[test]
    fn a_host_stepping_against_two_others_is_named() {
        let s = |hosts, by_us| PairStep {
            hosts,
            by_us,
            at_us: 0,
            orderings: 10,
            followed: false,
            moved: None,
        };
        // Host 1 moved +600 ms against host 0 and (seen from it) against host 2.
        let steps = [s([0, 1], 600_000), s([1, 2], -600_500)];
        assert_eq!(stepped_host(&steps, &steps[0]), Some((1, 600_000)));
        assert_eq!(stepped_host(&steps[..1], &steps[0]), None);
    }

    #[test]
    fn one_bracketing_pair_and_a_moved_edge_name_the_host_and_follow_it() {
        // Host 1's clock jumps 600 ms ahead at 5 s. Pair (0, 1) has orderings both ways; pair
        // (1, 2) one way only (2 commits, 1 replays), so it never brackets a step itself.
        let mut d = Drift {
            follow: true,
            ..Drift::default()
        };
        let mut corrections: Vec<Correction> = Vec::new();
        for i in 0..120i64 {
            let t = i * 100;
            let (ch, rh) = match i % 3 {
                0 => (0, 1),
                1 => (1, 0),
                _ => (2, 1),
            };
            // As the engine does: lines read after a correction are read corrected.
            let back: i64 = corrections.iter().map(|c| c.by_us / 1000).sum();
            let shift = |h: u16, ts: i64| {
                if h == 1 && ts >= 5_000 {
                    ts + 600 - back
                } else {
                    ts
                }
            };
            d.observe(&[
                ev(shift(ch, t), Step::Commit, ch),
                ev(shift(rh, t + 1), Step::Replay, rh),
            ]);
            if i % 40 == 39 {
                corrections.extend(d.flush());
            }
        }
        assert_eq!(d.steps.len(), 1, "{:?}", d.steps);
        assert_eq!(d.steps[0].moved, Some((1, 600_000)));
        assert!(d.steps[0].followed);
        assert_eq!(corrections.len(), 1);
        let c = corrections[0];
        assert_eq!((c.host, c.by_us), (1, 600_000));
        assert!((5_000_000..5_700_000).contains(&c.from_us), "{c:?}");
    }
}
