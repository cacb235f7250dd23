//! The two-phase part of a storm (`--two-phase F`): which orders are paid by
//! authorize + capture/void instead of deduct, how each hold is raced, and the
//! wait for the holds left to expire.
//!
//! Every two-phase order is authorized `--dup` times at once, in the deduct
//! waves, its copies spread over the targets like a deduct's. Then it follows
//! one script, drawn from `--seed`:
//! * [`Script::Capture`]: `--dup` copies of one capture, of the whole hold or
//!   of a part of it fixed per order, so every copy is the same request and
//!   must replay the one capture;
//! * [`Script::Void`]: `--dup` copies of a void;
//! * [`Script::CaptureOrVoid`]: captures and voids of one hold at the same
//!   instant: one of them wins, the others are told which;
//! * [`Script::ExpiryRace`]: a short hold, and captures and voids sent
//!   together within a few milliseconds of a moment drawn from just before its
//!   `hold_expires_at` to just after it, against the expiry and each other;
//! * [`Script::Expire`]: a short hold and nothing else: the servers' sweepers
//!   must release it.
//!
//! Short holds (`hold_ttl_s` 1 or 2) expire mid-run; the run then waits until
//! every one of them is released, or `--hold-grace-ms` past its expiry has
//! passed ([`await_expiries`]), so the history's final reads can hold the
//! sweepers to their promise. The checks are `history/two_phase.rs`'s.

use super::load::{self, Http, OpKind, PlannedOrder, Record, Recorder, Request};
use super::StormArgs;
use futures::stream::{self, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// `hold_ttl_s` of a short hold: drawn from this range (seconds).
const SHORT_TTL_S: std::ops::RangeInclusive<u64> = 1..=2;
/// An expiry race is centred this long before or after the hold's expiry at
/// most (ms, drawn per order): some holds are taken before they expire, others
/// expire first and every capture and void is told `hold_expired`.
const RACE_CENTRE_MS: i64 = 150;
/// The copies of an expiry race are spread over this long around its centre (ms).
const RACE_SPREAD_MS: i64 = 10;
/// How often the wait for expiries reads the holds still open (ms).
const EXPIRY_POLL_MS: u64 = 100;
/// Past the last expiry plus the grace, the wait stops this much later (ms),
/// so the final reads come after every hold's deadline.
const EXPIRY_WAIT_SLACK_MS: i64 = 100;
/// Reads in flight at once while waiting for expiries.
const READS_MAX: usize = 32;

/// What happens to one order's hold after it is authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Capture,
    Void,
    CaptureOrVoid,
    ExpiryRace,
    Expire,
}

/// One two-phase order's part of the plan.
#[derive(Debug, Clone)]
pub struct TwoPhasePlan {
    pub script: Script,
    /// `hold_ttl_s` sent with every authorize (`None`: the servers' `--hold-ttl`).
    pub ttl_s: Option<u64>,
    /// The amount every capture of this order asks for (the order's amount: all
    /// of the hold).
    pub capture: i64,
    /// An expiry race's moment, relative to `hold_expires_at` (ms).
    pub race_offset_ms: i64,
}

/// Marks `--two-phase` of the orders as two-phase and gives each a script.
/// Its own generator, seeded from `--seed`: `--two-phase 0` draws nothing.
pub fn assign(args: &StormArgs, orders: &mut [PlannedOrder]) {
    if args.two_phase <= 0.0 {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x2fa5_e0d1);
    for o in orders.iter_mut() {
        if rng.random::<f64>() >= args.two_phase {
            continue;
        }
        let script = match rng.random_range(0..100) {
            0..30 => Script::Capture,
            30..45 => Script::Void,
            45..70 => Script::CaptureOrVoid,
            70..85 => Script::ExpiryRace,
            _ => Script::Expire,
        };
        let short = matches!(script, Script::ExpiryRace | Script::Expire) || rng.random_bool(0.2);
        let partial = script != Script::Void && rng.random_bool(0.5);
        o.two_phase = Some(TwoPhasePlan {
            script,
            ttl_s: short.then(|| rng.random_range(SHORT_TTL_S)),
            capture: if partial {
                rng.random_range(1..o.amount.max(2))
            } else {
                o.amount
            },
            race_offset_ms: rng.random_range(-RACE_CENTRE_MS..=RACE_CENTRE_MS),
        });
    }
}

/// `dup` copies of one order's authorize, each to another target.
pub fn authorize_requests(
    o: &PlannedOrder,
    tp: &TwoPhasePlan,
    idx: usize,
    dup: usize,
) -> Vec<Request> {
    let body = tp.ttl_s.map(|t| json!({ "hold_ttl_s": t }));
    (0..dup)
        .map(|d| {
            (
                load::record(OpKind::Authorize, Some(idx), o.amount, idx + d),
                format!("/v1/orders/{}/authorize", o.id),
                body.clone(),
            )
        })
        .collect()
}

/// Copy `d` of a capture: a capture of all of the hold alternates between no
/// body and `{"amount": <all>}`, which are the same request.
fn capture_request(o: &PlannedOrder, tp: &TwoPhasePlan, idx: usize, d: usize) -> Request {
    let body = (tp.capture != o.amount || d % 2 == 1).then(|| json!({ "amount": tp.capture }));
    (
        load::record(OpKind::Capture, Some(idx), tp.capture, idx + d),
        format!("/v1/orders/{}/capture", o.id),
        body,
    )
}

fn void_request(o: &PlannedOrder, idx: usize, d: usize) -> Request {
    (
        load::record(OpKind::Void, Some(idx), o.amount, idx + d),
        format!("/v1/orders/{}/void", o.id),
        None,
    )
}

/// One authorized order's captures and voids, by its script (none to expire).
fn settle_requests(o: &PlannedOrder, tp: &TwoPhasePlan, idx: usize, dup: usize) -> Vec<Request> {
    match tp.script {
        Script::Capture => (0..dup).map(|d| capture_request(o, tp, idx, d)).collect(),
        Script::Void => (0..dup).map(|d| void_request(o, idx, d)).collect(),
        Script::CaptureOrVoid | Script::ExpiryRace => (0..dup.max(2))
            .map(|d| match d % 2 {
                0 => capture_request(o, tp, idx, d),
                _ => void_request(o, idx, d),
            })
            .collect(),
        Script::Expire => Vec::new(),
    }
}

/// The settle phase's waves, and the expiry races still under way.
#[derive(Default)]
pub struct Settle {
    pub waves: usize,
    /// One task per request of an expiry race, each sleeping until its moment.
    pub races: JoinSet<()>,
}

/// Orders whose authorize was answered 200, with the expiry it named.
fn authorized(records: &[Record]) -> HashMap<usize, Option<i64>> {
    let mut out: HashMap<usize, Option<i64>> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.kind == OpKind::Authorize && r.status == 200)
    {
        if let Some(idx) = r.order {
            let at = out.entry(idx).or_default();
            *at = at.or(r.expires_at_ms);
        }
    }
    out
}

/// Captures and voids of every authorized order: the expiry races scheduled
/// around each hold's expiry, the rest at once, in barrier waves. Returns the
/// waves and whether the deadline cut them short.
pub async fn settle(
    args: &StormArgs,
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    orders: &[PlannedOrder],
    deadline: Instant,
) -> (Settle, bool) {
    let mut out = Settle::default();
    let mut held: Vec<(usize, Option<i64>)> = authorized(&rec.snapshot()).into_iter().collect();
    held.sort_unstable();
    let mut now_waves = Vec::new();
    for (idx, expires_at) in held {
        let o = &orders[idx];
        let Some(tp) = &o.two_phase else { continue };
        let reqs = settle_requests(o, tp, idx, args.dup);
        match (tp.script, expires_at) {
            (Script::ExpiryRace, Some(at)) => {
                schedule_race(&mut out.races, http, rec, reqs, at + tp.race_offset_ms)
            }
            _ if reqs.is_empty() => {}
            _ => now_waves.push(reqs),
        }
    }
    let per_wave = (args.concurrency / args.dup.max(2)).max(1);
    for chunk in now_waves.chunks(per_wave) {
        if Instant::now() >= deadline {
            return (out, true);
        }
        load::wave(http, rec, chunk.concat()).await;
        out.waves += 1;
    }
    (out, false)
}

/// Sends `reqs` one by one from `RACE_SPREAD_MS` before `centre_ms` (Unix ms)
/// to as long after it, each from its own task.
fn schedule_race(
    races: &mut JoinSet<()>,
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    reqs: Vec<Request>,
    centre_ms: i64,
) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let now = Instant::now();
    let steps = reqs.len().saturating_sub(1).max(1) as i64;
    for (i, req) in reqs.into_iter().enumerate() {
        let offset = -RACE_SPREAD_MS + 2 * RACE_SPREAD_MS * i as i64 / steps;
        let wait_ms = (centre_ms + offset - now_ms).max(0) as u64;
        let at = now + Duration::from_millis(wait_ms);
        let (http, rec) = (http.clone(), rec.clone());
        races.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            load::wave(&http, &rec, vec![req]).await;
        });
    }
}

/// Waits for the short holds to end: until the last of them has expired, then
/// until none of them is still AUTHORIZED or `--hold-grace-ms` (plus a little)
/// has passed since the last expiry. Holds of the servers' default TTL are not
/// waited for. Bounded by the last short expiry plus the grace.
pub async fn await_expiries(
    args: &StormArgs,
    http: &Http,
    records: &[Record],
    orders: &[PlannedOrder],
) {
    let mut open: Vec<(String, i64)> = authorized(records)
        .into_iter()
        .filter(|(idx, _)| {
            orders[*idx]
                .two_phase
                .as_ref()
                .is_some_and(|t| t.ttl_s.is_some())
        })
        .filter_map(|(idx, at)| Some((orders[idx].id.clone(), at?)))
        .collect();
    let Some(last) = open.iter().map(|(_, at)| *at).max() else {
        return;
    };
    let stop_ms = last + args.hold_grace_ms as i64 + EXPIRY_WAIT_SLACK_MS;
    sleep_until_ms(last).await;
    while !open.is_empty() && chrono::Utc::now().timestamp_millis() < stop_ms {
        // Owned ids into the stream (see `observe.rs`: storms are spawned).
        let ids: Vec<String> = open.iter().map(|(id, _)| id.clone()).collect();
        let still: Vec<bool> = stream::iter(ids)
            .map(|id| async move {
                let (status, body) = http
                    .call(0, reqwest::Method::GET, &format!("/v1/orders/{id}"), None)
                    .await;
                status != 200 || body["status"] == "AUTHORIZED"
            })
            .buffered(READS_MAX)
            .collect()
            .await;
        let mut still = still.into_iter();
        open.retain(|_| still.next().unwrap_or(true));
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(EXPIRY_POLL_MS)).await;
        }
    }
    if !open.is_empty() {
        sleep_until_ms(stop_ms).await;
    }
}

/// Sleeps until the wall clock reads `at_ms` (Unix ms).
async fn sleep_until_ms(at_ms: i64) {
    let wait = at_ms - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}
