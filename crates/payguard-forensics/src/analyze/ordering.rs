//! Orderings that cannot happen, found under the applied clocks: a replay across hosts that
//! finished before the commit it replays, and two requests holding one order's lock at once.
//!
//! Why: after alignment, such an ordering means a host's clock jumped (a step mid-file that no
//! single offset fixes) or the logs are not what they claim; either way a person must look,
//! and every time in that order is suspect. Same-host pairs are left out: one host shares one
//! clock, and its async logger may write lines slightly out of order (LOGS.md).

use crate::clock::MS_US;
use crate::limits::{IMPOSSIBLE_ORDERINGS_LISTED_MAX, IMPOSSIBLE_ORDERING_SLACK_MS};
use crate::parse::{Side, Step};

use super::{Ev, Results, REQ_NONE};

/// What kind of ordering was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingKind {
    /// A replay on one host before the first commit of its side on another.
    ReplayBeforeCommit,
    /// Two requests (on different hosts) holding the order's lock at once.
    TwoLockHolders,
}

impl OrderingKind {
    /// The name in reports.
    pub fn key(self) -> &'static str {
        match self {
            OrderingKind::ReplayBeforeCommit => "replay_before_commit",
            OrderingKind::TwoLockHolders => "two_lock_holders",
        }
    }
}

/// One broken ordering of one order.
#[derive(Debug, Clone)]
pub struct ImpossibleRec {
    pub order_id: String,
    pub kind: OrderingKind,
    /// By how much it is broken (microseconds).
    pub by_us: i64,
    /// The earlier-logged event's time (the replay, or the second lock acquisition).
    pub at_us: i64,
    /// The host that should have come first, then the other.
    pub hosts: [u16; 2],
}

/// Checks one order's events (sorted by time) and adds what is broken to `out`.
pub fn check_orderings(oid: &str, evs: &[Ev], out: &mut Results) {
    let slack = IMPOSSIBLE_ORDERING_SLACK_MS * MS_US;
    for side in [Side::Deduct, Side::Refund] {
        let is = |e: &Ev, step| e.kind.step == step && e.kind.side == Some(side);
        let Some(c) = evs.iter().find(|e| is(e, Step::Commit)) else {
            continue;
        };
        let early = evs
            .iter()
            .find(|r| is(r, Step::Replay) && r.host != c.host && c.ts - r.ts > slack);
        if let Some(r) = early {
            out.add_impossible(ImpossibleRec {
                order_id: oid.to_string(),
                kind: OrderingKind::ReplayBeforeCommit,
                by_us: c.ts - r.ts,
                at_us: r.ts,
                hosts: [c.host, r.host],
            });
        }
    }
    if let Some(rec) = two_holders(oid, evs, slack) {
        out.add_impossible(rec);
    }
}

/// The first pair of lock holdings (acquired .. released, per request) on different hosts
/// that overlap by more than `slack`.
fn two_holders(oid: &str, evs: &[Ev], slack: i64) -> Option<ImpossibleRec> {
    // (req, host, acquired, released); few per order.
    let mut holds: Vec<(u16, u16, i64, i64)> = Vec::new();
    for e in evs.iter().filter(|e| e.req != REQ_NONE) {
        match e.kind.step {
            Step::LockAcquired => holds.push((e.req, e.host, e.ts, i64::MAX)),
            Step::LockReleased => {
                if let Some(h) = holds
                    .iter_mut()
                    .rev()
                    .find(|h| h.0 == e.req && h.3 == i64::MAX)
                {
                    h.3 = e.ts;
                }
            }
            _ => {}
        }
    }
    holds.retain(|h| h.3 != i64::MAX);
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            // Sorted by acquisition: `b` was acquired while `a` still held the lock.
            if a.1 != b.1 && a.0 != b.0 && a.3 - b.2 > slack {
                return Some(ImpossibleRec {
                    order_id: oid.to_string(),
                    kind: OrderingKind::TwoLockHolders,
                    by_us: a.3.min(b.3) - b.2,
                    at_us: b.2,
                    hosts: [a.1, b.1],
                });
            }
        }
    }
    None
}

impl Results {
    /// Counts a broken ordering and lists the first `impossible_orderings_listed_max`.
    pub(super) fn add_impossible(&mut self, r: ImpossibleRec) {
        self.impossible_total += 1;
        if self.impossible.len() < IMPOSSIBLE_ORDERINGS_LISTED_MAX {
            self.impossible.push(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::EventKind;

    fn ev(ts_ms: i64, step: Step, side: Option<Side>, req: u16, host: u16) -> Ev {
        Ev {
            ts: ts_ms * 1000,
            amount: i64::MIN,
            line: 0,
            file: 0,
            host,
            req,
            kind: EventKind {
                step,
                side,
                capture: false,
            },
            entries: 0,
        }
    }
    const D: Option<Side> = Some(Side::Deduct);

    #[test]
    fn a_replay_before_its_commit_on_another_host_is_impossible() {
        let mut r = Results::default();
        let evs = [ev(10, Step::Replay, D, 1, 1), ev(20, Step::Commit, D, 0, 0)];
        check_orderings("O", &evs, &mut r);
        assert_eq!(r.impossible_total, 1);
        assert_eq!(r.impossible[0].kind, OrderingKind::ReplayBeforeCommit);
        assert_eq!(
            (r.impossible[0].by_us, r.impossible[0].hosts),
            (10_000, [0, 1])
        );
        // Within the slack, on the same host, or after the commit: fine.
        let mut r = Results::default();
        check_orderings(
            "O",
            &[ev(19, Step::Replay, D, 1, 1), ev(20, Step::Commit, D, 0, 0)],
            &mut r,
        );
        check_orderings(
            "O",
            &[ev(10, Step::Replay, D, 1, 0), ev(20, Step::Commit, D, 0, 0)],
            &mut r,
        );
        check_orderings(
            "O",
            &[ev(20, Step::Commit, D, 0, 0), ev(21, Step::Replay, D, 1, 1)],
            &mut r,
        );
        assert_eq!(r.impossible_total, 0);
    }

    #[test]
    fn two_lock_holders_on_two_hosts_are_impossible() {
        let l = |ts, step, req, host| ev(ts, step, None, req, host);
        let overlap = [
            l(0, Step::LockAcquired, 0, 0),
            l(5, Step::LockAcquired, 1, 1),
            l(10, Step::LockReleased, 0, 0),
            l(12, Step::LockReleased, 1, 1),
        ];
        let mut r = Results::default();
        check_orderings("O", &overlap, &mut r);
        assert_eq!(r.impossible_total, 1);
        assert_eq!(r.impossible[0].kind, OrderingKind::TwoLockHolders);
        assert_eq!(r.impossible[0].by_us, 5_000);
        let handed_over = [
            l(0, Step::LockAcquired, 0, 0),
            l(10, Step::LockReleased, 0, 0),
            l(11, Step::LockAcquired, 1, 1),
            l(12, Step::LockReleased, 1, 1),
        ];
        let mut r = Results::default();
        check_orderings("O", &handed_over, &mut r);
        assert_eq!(r.impossible_total, 0);
    }
}
