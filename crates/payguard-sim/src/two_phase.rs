//! Two-phase payments in the simulation: what the clients send (authorize,
//! then capture, void, both, or nothing, some refunds) and what must hold of
//! them at the end of a seed.
//!
//! Why one module: the workload and its verdict are one contract. The clients
//! race a hold's capture (whole or in part) against its void, two captures of
//! different amounts against each other, and captures and voids against the
//! hold's expiry, which payguard's own sweepers (one per instance, on the
//! simulated clock) write; each request is duplicated across the instances
//! like the deducts. The check then holds the database and every definite
//! answer a client got against what exactly one of capture, void and expiry
//! leaves behind. The workload is drawn from its own random stream
//! (`TWO_PHASE_RNG_SALT`), so the deducts, refunds and faults a seed draws are
//! the same with or without it; the two-phase orders share the deducts'
//! accounts (whose openings grow by what the holds need), so deducts and holds
//! compete for `available`.
//!
//! What it guarantees, per seed: each order at most one hold, one capture and
//! one release (a partial capture's release of the rest counts as its one),
//! capture + release ≤ hold; the order's status, sums and entries are those of
//! exactly one outcome; no capture committed at or after `hold_expires_at`
//! (simulated clock); every short hold released within `SWEEP_GRACE_MS` of
//! its expiry, the clients' end and the last fault; every definite answer
//! (200, 402, 409) agrees with what won; and the events feed has exactly one
//! event per effect. The accounts' `held` invariants are
//! checked by the database at every commit ([`crate::db`]); refunds of a
//! captured order within the captured sum by [`crate::checks`].

use crate::client::{Flow, Send};
use crate::config::*;
use crate::db::DbState;
use crate::oracle::{Oracle, ViolationKind};
use crate::wire::{ApiResp, Ask};
use payguard::domain::{Entry, EntryKind, EventType, Order, OrderId, OrderStatus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// The two-phase orders a seed adds: (id, account index, amount), and their flows.
pub struct Drawn {
    pub orders: Vec<(String, usize, i64)>,
    pub flows: Vec<Flow>,
}

/// What the clients do with one hold once it is acknowledged.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Capture (whole, or a part), soon.
    Capture {
        partial: bool,
    },
    Void,
    /// A capture and a void at once.
    CaptureAndVoid {
        partial: bool,
    },
    /// Two captures of different amounts at once (the whole and a part).
    TwoCaptures,
    /// A capture and/or a void aimed at the hold's expiry.
    AtExpiry {
        capture: bool,
        void: bool,
    },
    /// Nothing: the hold is left to the sweepers (or, if long, open at the end).
    Nothing,
}

/// Each copy of one request: `DUPLICATES` of them, spread over the instances.
fn copies(rng: &mut SmallRng, order: &str, ask: Ask, at_ms: u64, first: usize) -> Vec<Send> {
    (0..DUPLICATES)
        .map(|d| Send {
            order: order.to_owned(),
            ask: ask.clone(),
            at_ms: at_ms + rng.random_range(0..=DUPLICATE_SPREAD_MS),
            first_instance: (first + d) % INSTANCES,
            key: None,
            reuses_key: false,
            id: 0,
        })
        .collect()
}

fn draw_plan(rng: &mut SmallRng, long: bool) -> Plan {
    let partial = rng.random_bool(0.5);
    match rng.random_range(0..7) {
        0 | 1 => Plan::Capture { partial },
        2 => Plan::Void,
        3 => Plan::CaptureAndVoid { partial },
        4 => Plan::TwoCaptures,
        5 if !long => {
            let capture = rng.random_bool(0.7);
            Plan::AtExpiry {
                capture,
                void: !capture || rng.random_bool(0.5),
            }
        }
        _ => Plan::Nothing,
    }
}

/// Draws the seed's two-phase orders and flows from their own stream; `bursts`
/// are the instants the deducts go out at (holds go out with them).
pub fn draw(seed: u64, bursts: &[u64]) -> Drawn {
    let mut rng = SmallRng::seed_from_u64(seed ^ TWO_PHASE_RNG_SALT);
    let mut drawn = Drawn {
        orders: Vec::new(),
        flows: Vec::new(),
    };
    for k in 0..TWO_PHASE_ORDERS {
        let order = format!("tp{k}");
        let amount = rng.random_range(ORDER_AMOUNT_MIN..=ORDER_AMOUNT_MAX);
        drawn.orders.push((order.clone(), k % ACCOUNTS, amount));
        let base = bursts[rng.random_range(0..bursts.len())];
        let long = rng.random_ratio(1, LONG_HOLD_ONE_IN);
        let hold_ttl_ms = if long {
            HOLD_TTL_MS_LONG
        } else {
            rng.random_range(HOLD_TTL_MS_SHORT)
        };
        let authorize = copies(&mut rng, &order, Ask::Authorize { hold_ttl_ms }, base, k);
        let soon = base + rng.random_range(CAPTURE_DELAY_MS);
        let part = rng.random_range((amount / 4).max(1)..=(amount * 3 / 4).max(1));
        let capture = |partial: bool| Ask::Capture {
            amount: partial.then_some(part),
        };
        let mut steps: Vec<(Ask, u64)> = Vec::new();
        match draw_plan(&mut rng, long) {
            Plan::Capture { partial } => steps.push((capture(partial), soon)),
            Plan::Void => steps.push((Ask::Void, soon)),
            Plan::CaptureAndVoid { partial } => {
                steps.push((capture(partial), soon));
                steps.push((Ask::Void, soon));
            }
            Plan::TwoCaptures => {
                steps.push((capture(false), soon));
                steps.push((capture(true), soon));
            }
            Plan::AtExpiry { capture: c, void } => {
                let race = rng.random_range(-EXPIRY_RACE_MS..=EXPIRY_RACE_MS);
                let at = (base as i64 + hold_ttl_ms + race).max(base as i64) as u64;
                if c {
                    steps.push((capture(rng.random_bool(0.5)), at));
                }
                if void {
                    steps.push((Ask::Void, at));
                }
            }
            Plan::Nothing => {}
        }
        let mut then = Vec::new();
        let mut first_capture = None;
        for (i, (ask, at)) in steps.into_iter().enumerate() {
            if matches!(ask, Ask::Capture { .. }) {
                first_capture.get_or_insert(at);
            }
            then.extend(copies(&mut rng, &order, ask, at, k + i + 1));
        }
        if let Some(at) = first_capture.filter(|_| rng.random_ratio(1, REFUND_ORDER_ONE_IN)) {
            for r in 0..REFUNDS_PER_ORDER {
                let amount = rng.random_range((amount / 4).max(1)..=(amount * 3 / 4).max(1));
                let ask = Ask::Refund {
                    id: format!("{order}-refund{r}"),
                    amount,
                };
                let at = at + rng.random_range(TWO_PHASE_REFUND_DELAY_MS);
                then.extend(copies(&mut rng, &order, ask, at, k + r));
            }
        }
        drawn.flows.push(Flow {
            authorize,
            then,
            follow_ups: Default::default(),
        });
    }
    drawn
}

/// One order's two-phase entries, in ledger order.
#[derive(Default)]
struct Entries<'a> {
    holds: Vec<&'a Entry>,
    captures: Vec<&'a Entry>,
    releases: Vec<&'a Entry>,
}

impl Entries<'_> {
    fn ids(es: &[&Entry]) -> Vec<i64> {
        es.iter().map(|e| e.id).collect()
    }

    fn sum(es: &[&Entry]) -> i64 {
        es.iter().map(|e| e.amount.minor()).sum()
    }
}

fn entries_by_order(db: &DbState) -> BTreeMap<&OrderId, Entries<'_>> {
    let mut out: BTreeMap<&OrderId, Entries<'_>> = BTreeMap::new();
    for e in &db.tables.entries {
        let mine = out.entry(&e.order_id).or_default();
        match e.kind {
            EntryKind::Hold => mine.holds.push(e),
            EntryKind::Capture => mine.captures.push(e),
            EntryKind::Release => mine.releases.push(e),
            EntryKind::Debit | EntryKind::Refund | EntryKind::Reversal => {}
        }
    }
    out
}

/// Whether `order`'s status, sums and entries are those of exactly one outcome
/// (still held, captured, voided, expired, or never held); `Err` says why not.
fn one_outcome(order: &Order, es: &Entries<'_>) -> Result<(), String> {
    let (holds, captures, releases) = (&es.holds, &es.captures, &es.releases);
    let hold = holds.first().map(|h| h.amount);
    let shape = (holds.len(), captures.len(), releases.len());
    let ok = match order.status {
        OrderStatus::Prepare | OrderStatus::Failed => shape == (0, 0, 0),
        OrderStatus::Authorized => {
            shape == (1, 0, 0) && Some(order.held) == hold && order.hold_expires_at.is_some()
        }
        OrderStatus::Voided | OrderStatus::Expired => {
            shape == (1, 0, 1) && Some(releases[0].amount) == hold && order.held.minor() == 0
        }
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            let captured = captures.first().map(|c| c.amount);
            // A partial capture's release of the rest follows it in the ledger.
            let rest_ok = match (captures.first(), releases.first()) {
                (Some(c), Some(r)) => releases.len() == 1 && r.id == c.id + 1,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            let whole = Entries::sum(captures) + Entries::sum(releases);
            shape.0 == 1
                && shape.1 == 1
                && rest_ok
                && order.captured == captured
                && Some(whole) == hold.map(|h| h.minor())
                && order.held.minor() == 0
        }
    };
    if ok {
        return Ok(());
    }
    Err(format!(
        "order {} is {} (held {}, captured {:?}) with holds {:?}, captures {:?}, releases {:?}",
        order.id,
        order.status.as_str(),
        order.held.minor(),
        order.captured.map(|c| c.minor()),
        Entries::ids(holds),
        Entries::ids(captures),
        Entries::ids(releases)
    ))
}

/// Each order's two-phase ledger and outcome (see the module docs).
fn check_orders(db: &DbState, oracle: &mut Oracle, end_ms: u64) {
    let by_order = entries_by_order(db);
    let empty = Entries::default();
    for (id, (order, _)) in &db.tables.orders {
        let es = by_order.get(id).unwrap_or(&empty);
        if !order.is_two_phase() && es.holds.is_empty() {
            continue;
        }
        let held = Entries::sum(&es.holds);
        let ended = Entries::sum(&es.captures) + Entries::sum(&es.releases);
        oracle.check(
            ViolationKind::HoldEntries,
            es.holds.len() <= 1 && es.captures.len() <= 1 && es.releases.len() <= 1 && ended <= held,
            || {
                format!(
                    "order {id}: holds {:?}, captures {:?}, releases {:?} (captured + released {ended} of a hold of {held})",
                    Entries::ids(&es.holds),
                    Entries::ids(&es.captures),
                    Entries::ids(&es.releases)
                )
            },
        );
        if let Err(why) = one_outcome(order, es) {
            oracle.violate(ViolationKind::HoldOutcome, why);
        }
        for c in &es.captures {
            let at = order.hold_expires_at.unwrap_or(i64::MAX);
            oracle.check(ViolationKind::CaptureAfterExpiry, c.created_at < at, || {
                format!(
                    "order {id}: capture entry {} committed at {} ms, the hold expired at {at} ms",
                    c.id, c.created_at
                )
            });
        }
        let swept_by = order
            .hold_expires_at
            .filter(|at| *at < HOLD_TTL_MS_LONG)
            .map(|at| at + SWEEP_GRACE_MS as i64);
        if order.status == OrderStatus::Authorized {
            oracle.check(
                ViolationKind::HoldOutlivedExpiry,
                swept_by.is_none_or(|by| by > end_ms as i64),
                || {
                    format!(
                        "order {id}: still AUTHORIZED at {end_ms} ms, its hold expired at {:?} ms",
                        order.hold_expires_at
                    )
                },
            );
        }
        let s = &mut oracle.stats;
        match order.status {
            OrderStatus::Authorized => s.held_open += 1,
            OrderStatus::Voided => s.voided += 1,
            OrderStatus::Expired => s.expired += 1,
            _ if !es.captures.is_empty() => {
                s.captured += 1;
                s.captured_in_part += u64::from(!es.releases.is_empty());
            }
            _ => {}
        }
    }
}

/// Whether a client's definite answer `answer` to `ask` agrees with what won.
fn agrees(order: &Order, es: &Entries<'_>, ask: &Ask, answer: ApiResp) -> bool {
    let captured = !es.captures.is_empty();
    let only = |es: &[&Entry], entry: i64| es.len() == 1 && es[0].id == entry;
    let ended_by = |status: OrderStatus| order.status == status && !captured;
    // Expired, or past its expiry and not (yet) swept: nothing else ended it.
    let expired = ended_by(OrderStatus::Expired) || ended_by(OrderStatus::Authorized);
    match (ask, answer) {
        (_, ApiResp::Charged { entry } | ApiResp::Replayed { entry }) => match ask {
            Ask::Authorize { .. } => only(&es.holds, entry),
            Ask::Capture { amount } => {
                only(&es.captures, entry) && order.captured == Some(amount_of(order, *amount))
            }
            Ask::Void => ended_by(OrderStatus::Voided) && only(&es.releases, entry),
            Ask::Deduct | Ask::Refund { .. } => true,
        },
        (Ask::Authorize { .. }, ApiResp::InsufficientFunds) => {
            order.status == OrderStatus::Failed && es.holds.is_empty()
        }
        // Sent before the hold was made (its authorize unanswered), or declined.
        (
            _,
            ApiResp::Conflict {
                reason: "order_not_authorized",
            },
        ) => true,
        (Ask::Capture { amount }, ApiResp::Conflict { reason }) => match reason {
            "hold_already_captured" => {
                captured && order.captured != Some(amount_of(order, *amount))
            }
            "hold_voided" => ended_by(OrderStatus::Voided),
            "hold_expired" => expired,
            _ => false,
        },
        (Ask::Void, ApiResp::Conflict { reason }) => match reason {
            "hold_already_captured" => captured,
            "hold_expired" => expired,
            _ => false,
        },
        _ => false,
    }
}

/// What a capture of `amount` (`None`: the whole hold) takes.
fn amount_of(order: &Order, amount: Option<i64>) -> payguard::domain::Money {
    amount.map_or(order.amount, payguard::domain::Money::from_stored)
}

/// Every definite two-phase answer a client got, against the order at the end.
fn check_answers(db: &DbState, oracle: &mut Oracle) {
    let by_order = entries_by_order(db);
    let empty = Entries::default();
    for (order_id, ask, answer) in oracle.two_phase.clone() {
        let found = db
            .tables
            .orders
            .iter()
            .find(|(id, _)| id.as_str() == order_id);
        let Some((id, (order, _))) = found else {
            oracle.violate(
                ViolationKind::TwoPhaseAnswer,
                format!("order {order_id}: answered {answer:?} to {ask}, and does not exist"),
            );
            continue;
        };
        let es = by_order.get(id).unwrap_or(&empty);
        oracle.check(
            ViolationKind::TwoPhaseAnswer,
            agrees(order, es, &ask, answer),
            || {
                format!(
                    "order {order_id}: a client was told {answer:?} to its {ask}; the order is {} (captured {:?}) with holds {:?}, captures {:?}, releases {:?}",
                    order.status.as_str(),
                    order.captured.map(|c| c.minor()),
                    Entries::ids(&es.holds),
                    Entries::ids(&es.captures),
                    Entries::ids(&es.releases)
                )
            },
        );
    }
}

/// The event each ledger entry's effect writes, if it is an effect's own entry
/// (not a partial capture's release of the rest, written beside its capture).
fn event_of(e: &Entry, prev: Option<&Entry>, order: Option<&Order>) -> Option<EventType> {
    Some(match e.kind {
        EntryKind::Debit | EntryKind::Capture => EventType::OrderPaid,
        EntryKind::Refund => EventType::OrderRefunded,
        EntryKind::Hold => EventType::OrderAuthorized,
        EntryKind::Release
            if prev.is_some_and(|p| p.kind == EntryKind::Capture && p.order_id == e.order_id) =>
        {
            return None
        }
        EntryKind::Release if order.is_some_and(|o| o.status == OrderStatus::Voided) => {
            EventType::OrderVoided
        }
        EntryKind::Release => EventType::OrderHoldExpired,
        EntryKind::Reversal => return None,
    })
}

/// The events feed: one event per effect (each movement's own entry, each
/// decline), of the effect's kind, and no other. (Its numbers are gap-free by
/// construction here: the database numbers an event as it commits, as SQLite
/// does; PostgreSQL's numbering after commit, `sequence_events`, is not
/// simulated, so it is not checked.)
fn check_events(db: &DbState, oracle: &mut Oracle) {
    let events = &db.tables.events;
    oracle.stats.feed_events += events.len() as u64;
    let mut expected: Vec<(Option<i64>, EventType, String)> = Vec::new();
    let entries = &db.tables.entries;
    for (i, e) in entries.iter().enumerate() {
        let order = db.tables.orders.get(&e.order_id).map(|(o, _)| o);
        if let Some(kind) = event_of(e, i.checked_sub(1).map(|p| &entries[p]), order) {
            expected.push((Some(e.id), kind, e.order_id.as_str().to_owned()));
        }
    }
    for (id, (order, _)) in &db.tables.orders {
        if order.status == OrderStatus::Failed {
            expected.push((None, EventType::OrderPaymentFailed, id.as_str().to_owned()));
        }
    }
    let mut got: Vec<(Option<i64>, EventType, String)> = events
        .iter()
        .map(|e| {
            (
                e.entry.as_ref().map(|en| en.id),
                e.kind,
                e.order.id.as_str().to_owned(),
            )
        })
        .collect();
    let key = |x: &(Option<i64>, EventType, String)| (x.0, x.2.clone(), format!("{:?}", x.1));
    expected.sort_by_key(key);
    got.sort_by_key(key);
    oracle.check(ViolationKind::Events, got == expected, || {
        let missing: Vec<_> = expected.iter().filter(|x| !got.contains(x)).collect();
        let extra: Vec<_> = got
            .iter()
            .enumerate()
            .filter(|(i, x)| {
                got.iter().filter(|y| y == x).count() > expected.iter().filter(|y| y == x).count()
                    && got[..*i].iter().all(|y| &y != x)
            })
            .map(|(_, x)| x)
            .collect();
        format!(
            "{} events for {} effects; missing {missing:?}; more than once or unexpected {extra:?}",
            got.len(),
            expected.len()
        )
    });
}

/// The two-phase checks and the events feed, at the end of a seed that ended
/// at `end_ms`.
pub fn check(db: &DbState, oracle: &mut Oracle, end_ms: u64) {
    check_orders(db, oracle, end_ms);
    check_answers(db, oracle);
    for b in &db.held_broken {
        oracle.violate(ViolationKind::HeldMismatch, b.clone());
    }
    check_events(db, oracle);
}
