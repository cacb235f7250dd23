//! The findings over all orders analysed so far, and the bounds that keep them small.
//!
//! Why apart: which incidents, race windows and timelines are kept (the worst, the first) is a
//! policy of its own, independent of how one order is reconstructed.

use crate::limits::{INCIDENTS_LISTED_MAX, TIMELINE_INCIDENT_ORDERS_MAX, TIMELINE_RACE_ORDERS_MAX};

use super::{IncidentRec, RaceRec, Timeline};

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
    /// Broken orderings under the applied clocks (the first `impossible_orderings_listed_max`).
    pub impossible: Vec<super::ImpossibleRec>,
    /// Every broken ordering, listed or not.
    pub impossible_total: u64,
    /// Clock steps between pairs of hosts, found through the whole input.
    pub drift: super::Drift,
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
    pub(super) fn add_incident(&mut self, i: IncidentRec) {
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
    pub(super) fn timeline_has_room(&self, incident: bool) -> bool {
        incident || self.timelines_races < TIMELINE_RACE_ORDERS_MAX
    }

    pub(super) fn push_timeline(&mut self, t: Timeline) {
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

    /// Keeps every race timeline and the worst `timeline_incident_orders_max` incident timelines,
    /// race-only ones first, each group in time order (then order id): the order open orders are
    /// analysed in comes from a hash map, and `--trace-out` and `--html` must not change from one
    /// run to the next on the same input.
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
        rest.sort_by(in_time_order);
        inc.sort_by(in_time_order);
        rest.extend(inc);
        self.timelines = rest;
    }
}

/// Earliest request entry or mark first, then by order id.
fn in_time_order(a: &Timeline, b: &Timeline) -> std::cmp::Ordering {
    let start = |t: &Timeline| {
        t.reqs
            .iter()
            .map(|r| r.entry)
            .chain(t.marks.iter().map(|m| m.ts))
            .min()
            .unwrap_or(i64::MAX)
    };
    start(a)
        .cmp(&start(b))
        .then_with(|| a.order_id.cmp(&b.order_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::TlReq;
    use crate::parse::Side;

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

    fn timeline(order_id: &str, incident: bool, entry: i64) -> Timeline {
        Timeline {
            order_id: order_id.into(),
            incident,
            amount_lost: 0,
            reqs: vec![TlReq {
                host: 0,
                side: Side::Deduct,
                entry,
                end: entry + 1,
                label: String::new(),
            }],
            marks: Vec::new(),
            window: None,
        }
    }

    #[test]
    fn timelines_come_out_in_one_order_whatever_order_they_were_analysed_in() {
        let ids = |r: &Results| -> Vec<String> {
            r.timelines.iter().map(|t| t.order_id.clone()).collect()
        };
        let all = [
            ("c", false, 30),
            ("a", true, 10),
            ("b", false, 10),
            ("d", true, 5),
            ("e", false, 10),
        ];
        let mut first: Option<Vec<String>> = None;
        for rotation in 0..all.len() {
            let mut r = Results::default();
            for i in 0..all.len() {
                let (id, incident, entry) = all[(i + rotation) % all.len()];
                r.push_timeline(timeline(id, incident, entry));
            }
            r.trim_incident_timelines();
            let got = ids(&r);
            assert_eq!(got, ["b", "e", "c", "d", "a"], "rotation {rotation}");
            if let Some(f) = &first {
                assert_eq!(&got, f);
            }
            first = Some(got);
        }
    }
}
