//! Unit tests of [`super::analyze_order`] on hand-made events.

use super::*;
use crate::parse::Step;

fn ev(ts_ms: i64, step: Step, side: Option<Side>, req: u16, host: u16, amount: Option<i64>) -> Ev {
    Ev {
        ts: ts_ms * 1000,
        amount: amount.unwrap_or(i64::MIN),
        line: ts_ms as u32,
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
        replays: true,
    };
    let mut r = Results::default();
    analyze_order(b"O", &mut st, &OrderCtx { timelines: true }, &mut r);
    r
}

const D: Option<Side> = Some(Side::Deduct);

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
