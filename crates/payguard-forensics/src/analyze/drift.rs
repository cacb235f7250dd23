//! Clock steps found anywhere in the input: the same cross-host orderings clock alignment reads
//! from each file's first bytes, followed through the whole merge under the applied clocks.
//!
//! Why: alignment samples a bounded prefix of every file and applies one offset per host. A
//! clock that steps after the sample (NTP, a VM migration) makes every later time of that host
//! wrong by the step; the impossible orderings show it one order at a time, this says it once:
//! which pair of hosts, when, and by how much.
//!
//! How: each order with one commit of a side gives bounds on how much more one host's clock
//! must be moved relative to another's (a replay after its commit, a lock taken after its
//! release). Per pair of hosts, bounds that fit the current segment (an interval that holds a
//! correction) are folded into it; one that does not starts a candidate segment; a candidate
//! bracketed from both sides by enough orderings (`clock_constraints_min`,
//! `clock_constraints_per_side_min`) becomes the current segment, and the change is a step.
//! Bounds are taken in time order within each retirement batch.
//!
//! Memory: one batch of bounds (the orders of one retirement scan: bounded by the retention
//! windows), two segments per pair of hosts, and at most `clock_steps_listed_max` steps.

use std::collections::HashMap;

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

#[derive(Debug, Clone, Copy)]
struct PairTrack {
    cur: Segment,
    cand: Option<Segment>,
}

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
}

/// The tracker (see the module docs).
#[derive(Debug, Default)]
pub struct Drift {
    batch: Vec<Bound>,
    pairs: HashMap<(u16, u16), PairTrack>,
    /// Steps found, in the order found (at most `clock_steps_listed_max`).
    pub steps: Vec<PairStep>,
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

    /// Follows the batch's bounds in time order (call after each retirement scan).
    pub fn flush(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        batch.sort_unstable_by_key(|b| (b.at_us, b.from, b.to, b.v));
        for b in &batch {
            self.follow(b);
        }
        batch.clear();
        self.batch = batch;
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
        let t = self.pairs.entry(key).or_insert(PairTrack {
            cur: Segment::new(b.at_us),
            cand: None,
        });
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
        if self.steps.len() < CLOCK_STEPS_LISTED_MAX {
            self.steps.push(PairStep {
                hosts: [key.0, key.1],
                // The correction grew by (after - before): the clock moved back by as much.
                by_us: before - c.mid(),
                at_us: c.since_us,
                orderings: c.n_lo + c.n_hi,
            });
        }
        t.cur = c;
        t.cand = None;
    }
}

/// The host behind steps of several pairs: one in two or more pair steps that agree on how far
/// it moved (within twice the ordering slack), else `None` (two hosts: either could have).
pub fn stepped_host(steps: &[PairStep], s: &PairStep) -> Option<(u16, i64)> {
    let slack = 2 * IMPOSSIBLE_ORDERING_SLACK_MS * MS_US;
    // How far host `h` moved relative to the other host of step `p`.
    let moved = |p: &PairStep, h: u16| {
        if p.hosts[1] == h {
            Some(p.by_us)
        } else if p.hosts[0] == h {
            Some(-p.by_us)
        } else {
            None
        }
    };
    s.hosts.iter().find_map(|&h| {
        let m = moved(s, h)?;
        let agree = steps
            .iter()
            .filter(|p| moved(p, h).is_some_and(|o| (o - m).abs() <= slack))
            .count();
        (agree >= 2).then_some((h, m))
    })
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
        };
        // Host 1 moved +600 ms against host 0 and (seen from it) against host 2.
        let steps = [s([0, 1], 600_000), s([1, 2], -600_500)];
        assert_eq!(stepped_host(&steps, &steps[0]), Some((1, 600_000)));
        assert_eq!(stepped_host(&steps[..1], &steps[0]), None);
    }
}
