//! Ground truth kept beside the simulation, and the violations found in it.
//!
//! Why: some properties cannot be read off the final database. When each client
//! request was sent and answered (for the liveness check of a seed with no
//! fault) and what the clients were told (to hold against the ledger) is only
//! visible to the clients; what a seed exercised (batches, parked orders,
//! release notifications) is counted by the simulated services as it happens.
//! The oracle is test instrumentation: no decision of the engine, the store or
//! the lock service reads it. The engine's tasks must be `Send`, so it is shared
//! as `Arc<Mutex<_>>` ([`OracleRef`]), though every host of a seed runs on one
//! thread.

use crate::wire::{ApiResp, Ask};
use std::sync::{Arc, Mutex, MutexGuard};

/// One broken invariant, with enough detail to start reading a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViolationKind {
    /// An order has more than one debit.
    DoubleCharge,
    /// A client was told "charged" (200) but the ledger lacks that one debit.
    AcknowledgedChargeMissing,
    /// An account's balance is not its opening balance minus its debits, or
    /// not the `balance_after` of its last entry.
    BalanceDrift,
    /// An account's balance is below zero.
    NegativeBalance,
    /// A client was told 402 for an order that was nevertheless charged.
    DeclinedButCharged,
    /// A write carrying a token lower than one already applied to its order was
    /// applied (it should have been refused as `stale_fencing_token`).
    StaleTokenApplied,
    /// A live lock holder got a token no higher than an earlier live holder of
    /// the same order: its writes are refused although it holds the lock.
    LiveHolderStaleToken,
    /// In a seed with no fault (no crash, flush, restart, partition, slow link,
    /// message loss or stall), a request was not answered, was answered
    /// anything but 200, 402 or a definite 409, or took longer than the bound.
    Liveness,
    /// An order's refunds add up past its charge, or an order never charged
    /// has a refund.
    RefundsExceedCharge,
    /// A refund id has more than one refund entry.
    DoubleRefund,
    /// A client was told a refund was made (200) but the ledger lacks that
    /// entry under that refund id.
    AcknowledgedRefundMissing,
    /// A client was told `refund_exceeds_paid` for a refund id that has an entry.
    RefusedRefundApplied,
    /// An order has more than one hold, capture or release entry, or its
    /// capture and release add up past its hold.
    HoldEntries,
    /// A two-phase order's state is not what exactly one of capture, void or
    /// expiry leaves (its status, its entries and its sums disagree), or an
    /// ended hold was ended twice (a capture and a release, or two releases).
    HoldOutcome,
    /// A client's definite answer about a two-phase step disagrees with what
    /// won: a 200 capture not the order's capture, a void acknowledged on an
    /// order captured, a 409 naming what did not end the hold, an acknowledged
    /// hold not the order's hold, a 402 on an order held.
    TwoPhaseAnswer,
    /// An account's `held` is not the sum of its open holds, or is negative, or
    /// exceeds its balance (available below zero), after some commit.
    HeldMismatch,
    /// A capture committed at or after its hold's `hold_expires_at`.
    CaptureAfterExpiry,
    /// A short hold still AUTHORIZED long after its expiry, the clients and
    /// every fault: no sweeper released it.
    HoldOutlivedExpiry,
    /// The events feed does not have exactly one event per effect (each
    /// movement's entry, each decline), of the effect's kind.
    Events,
    /// Two definite answers under one Idempotency-Key to the same request
    /// disagree (another entry, or another refusal).
    KeyAnswerChanged,
    /// The answers under one Idempotency-Key name more than one entry.
    KeyTwoEffects,
    /// A request reusing a key for another body was answered anything but
    /// 422 `idempotency_key_reuse`.
    KeyReuseAnswered,
    /// A request reusing a key for another body moved money.
    KeyReuseMoved,
    /// The store answered a batch with an error other than `Unknown`, which
    /// promises that nothing of it moved (`payguard::store`; a 503 to the
    /// client), and one of the batch's transactions committed, before the
    /// answer or landing after it.
    NothingMovedButCommitted,
    /// Webhooks: an endpoint lacks a delivery for a committed event it
    /// matches, or has one for an event that did not commit (or does not match).
    WebhookFanOut,
    /// Webhooks: after the drain, a delivery is not `delivered` (or `failed`
    /// only after every attempt, on a seed with faults), or was never received.
    WebhookUndelivered,
    /// Webhooks: a delivery recorded `delivered` by an attempt the receiver
    /// did not answer 2xx.
    WebhookDeliveredWithoutAck,
    /// Webhooks: an attempt reached the receiver after its delivery's
    /// `delivered` record committed, while its own lease still ran.
    WebhookReceivedAfterDelivered,
    /// Webhooks: a delivery's claims are not numbered 1..n (n its
    /// `attempts`), an attempt received or logged that was not claimed, or a
    /// result kept that is not the latest claim's.
    WebhookAttempts,
    /// Webhooks: a delivery claimed while its previous attempt's lease still
    /// ran and that attempt's result was not kept (two attempts at once).
    WebhookOverlap,
    /// Webhooks, on a seed with no fault: a delivery not delivered within
    /// `WEBHOOK_LIVENESS_MS` of its event.
    WebhookLiveness,
    /// A request never left its instance: still in flight long after the
    /// clients finished and every fault healed.
    Hang,
    /// The simulation did not finish (a host hung, or panicked).
    SimulationError,
}

/// One client request to one instance, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub order: String,
    pub host: String,
    pub sent_ms: u64,
    /// When the answer came, and what it was; `None`: none before the client's timeout.
    pub answer: Option<(u64, ApiResp)>,
}

/// One definite answer to a request that carried an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub key: String,
    pub order: String,
    pub ask: Ask,
    /// The request reused a key answered for another one.
    pub reuses_key: bool,
    pub answer: ApiResp,
}

/// Counts that show what a seed exercised (and make two replays comparable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Locks granted by the simulated Redis.
    pub grants: u64,
    /// New fencing epochs taken (the fence hash was lost).
    pub new_epochs: u64,
    /// Writers stalled past the lock TTL between their locks and their write.
    pub stalls: u64,
    /// Stale writes the fence check refused.
    pub stale_refused: u64,
    pub acks: u64,
    pub declined: u64,
    /// Refund answers: made (200) and refused (409).
    pub refund_acks: u64,
    pub refunds_refused: u64,
    /// Two-phase answers: holds acknowledged (200), captures and voids
    /// acknowledged, and their definite refusals (402, 409).
    pub hold_acks: u64,
    pub capture_acks: u64,
    pub void_acks: u64,
    pub two_phase_refused: u64,
    /// Two-phase orders at the end: captured (in part), voided, expired by a
    /// sweeper, still held (long holds).
    pub captured: u64,
    pub captured_in_part: u64,
    pub voided: u64,
    pub expired: u64,
    pub held_open: u64,
    /// Events in the feed.
    pub feed_events: u64,
    /// Expiries answered as replays (another sweeper had released the
    /// hold); captures refused `hold_expired` (see `db::Races`).
    pub expiry_replays: u64,
    pub captures_too_late: u64,
    /// Definite answers to keyed requests; answers an instance sent from the
    /// answer stored under the key; 422 `idempotency_key_reuse`; 409
    /// `idempotency_key_in_use`.
    pub keyed_answers: u64,
    pub key_replays: u64,
    pub key_reuses_refused: u64,
    pub key_in_use: u64,
    /// Requests that got no definite answer in all their attempts.
    pub unanswered: u64,
    pub faults: u64,
    /// Lane batches that reached the store, their ops, and those of two ops or more.
    pub batches: u64,
    pub batched_ops: u64,
    pub multi_op_batches: u64,
    /// `ACQUIRE_MANY` round trips, those for two orders or more, and those of
    /// two orders or more made while another instance had one in flight.
    pub lock_rounds: u64,
    pub multi_order_lock_rounds: u64,
    pub overlapping_lock_rounds: u64,
    /// Orders an acquire found held elsewhere (each one parked by its lane).
    pub parked: u64,
    /// Orders an acquire answered from their settled hint.
    pub settled_hints: u64,
    /// Release notifications the release feed handed to payguard's
    /// subscriber; parked orders a release woke, and those retried without one
    /// (the wait ran out).
    pub notices: u64,
    pub woken: u64,
    pub fallback_retries: u64,
    /// Subscriptions the release feed opened; payguard's subscriber woke every
    /// parked order of its instance on each.
    pub resubscriptions: u64,
    /// Batches whose answer was lost and whose fate was looked up.
    pub fate_lookups: u64,
    /// Batches the store answered with an error that says nothing moved
    /// (each held against the database's transactions at the end).
    pub nothing_moved: u64,
    /// Requests answered 503 `LockBusy`, and "outcome unknown".
    pub lock_busy: u64,
    pub unknown: u64,
    /// The longest time from a client's send to its answer (a max, not a sum).
    pub answer_ms_max: u64,
    /// Webhooks (`Protocol::webhooks`; all 0 without): deliveries at the
    /// end, of them delivered, and failed after every attempt; attempts the
    /// loop made (ended, counted by the loop), of them to be retried;
    /// attempts the receiver got; deliveries it answered 2xx more than once.
    pub hook_deliveries: u64,
    pub hook_delivered: u64,
    pub hook_failed: u64,
    pub hook_attempts: u64,
    pub hook_retries: u64,
    pub hook_receipts: u64,
    pub hook_duplicates: u64,
}

#[derive(Debug, Default)]
pub struct Oracle {
    /// (order, entry) per answer that told a client it was charged.
    pub acks: Vec<(String, i64)>,
    /// Orders a client was told 402 for.
    pub declined: Vec<String>,
    /// (order, refund id, entry) per answer that told a client it was refunded.
    pub refund_acks: Vec<(String, String, i64)>,
    /// (order, refund id) per answer `refund_exceeds_paid`.
    pub refunds_refused: Vec<(String, String)>,
    /// Every definite answer to a keyed request, in the order received.
    pub keyed: Vec<Keyed>,
    /// (order, step, definite answer) per two-phase answer a client got.
    pub two_phase: Vec<(String, Ask, ApiResp)>,
    /// (instance, its transaction ids, the error) per batch the store
    /// answered with an error that says nothing moved.
    pub nothing_moved: Vec<(usize, Vec<u64>, String)>,
    pub violations: Vec<Violation>,
    pub stats: Stats,
    /// What happened, in order, when a replay asked for it (`None`: not kept).
    pub trace: Option<Vec<String>>,
    /// Events noted, kept or not: the length of the schedule.
    pub events: u64,
    /// Every client request, for the liveness check.
    pub attempts: Vec<Attempt>,
    /// Requests being worked on by an instance (a crash drops them).
    pub in_flight: u64,
    /// order → highest token made for a holder that was live when it got it.
    live_tokens: std::collections::BTreeMap<String, i64>,
    /// Per instance, its multi-order lock rounds in flight.
    multi_rounds_in_flight: [u64; crate::config::INSTANCES],
}

/// The seed's oracle, shared by every host.
#[derive(Clone, Default)]
pub struct OracleRef(Arc<Mutex<Oracle>>);

impl OracleRef {
    pub fn new(oracle: Oracle) -> Self {
        OracleRef(Arc::new(Mutex::new(oracle)))
    }

    pub fn borrow_mut(&self) -> MutexGuard<'_, Oracle> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn borrow(&self) -> MutexGuard<'_, Oracle> {
        self.borrow_mut()
    }
}

impl Oracle {
    /// Keeps one line of the trace at simulated `at_ms`, if a trace is kept.
    pub fn note(&mut self, at_ms: u64, line: impl FnOnce() -> String) {
        self.events += 1;
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{at_ms:>5} ms  {}", line()));
        }
    }

    pub fn violate(&mut self, kind: ViolationKind, detail: String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("          VIOLATION {kind:?}: {detail}"));
        }
        self.violations.push(Violation { kind, detail });
    }

    /// A holder's token is final. `live`: its lock was still its own in Redis
    /// then (a lease that ended first proves nothing: fencing refuses it).
    pub fn token_made(&mut self, order: &str, tok: i64, live: bool, at_ms: u64) {
        if !live {
            return;
        }
        let prev = self.live_tokens.get(order).copied();
        if let Some(prev) = prev.filter(|&p| tok <= p) {
            self.violate(
                ViolationKind::LiveHolderStaleToken,
                format!(
                    "order {order} at {at_ms} ms: live holder got token {:?}, an earlier live holder had {:?}",
                    payguard::lock::token::unpack(tok),
                    payguard::lock::token::unpack(prev)
                ),
            );
        }
        self.live_tokens
            .insert(order.to_owned(), prev.map_or(tok, |p| p.max(tok)));
    }

    /// A lock round of `orders` orders starts on instance `inst`.
    pub fn lock_round_started(&mut self, inst: usize, orders: usize) {
        self.stats.lock_rounds += 1;
        if orders < 2 {
            return;
        }
        self.stats.multi_order_lock_rounds += 1;
        let others = (0..self.multi_rounds_in_flight.len())
            .any(|i| i != inst && self.multi_rounds_in_flight[i] > 0);
        if others {
            self.stats.overlapping_lock_rounds += 1;
        }
        self.multi_rounds_in_flight[inst] += 1;
    }

    /// The round [`Oracle::lock_round_started`] announced ended.
    pub fn lock_round_ended(&mut self, inst: usize, orders: usize) {
        if orders >= 2 {
            let n = &mut self.multi_rounds_in_flight[inst];
            *n = n.saturating_sub(1);
        }
    }

    /// A client got a definite answer (200, 402, 409) to `ask` on `order`.
    pub fn answered(&mut self, order: &str, ask: &Ask, answer: ApiResp) {
        let order = order.to_owned();
        let acked = |a: ApiResp| match a {
            ApiResp::Charged { entry } | ApiResp::Replayed { entry } => Some(entry),
            _ => None,
        };
        match ask {
            Ask::Deduct => match acked(answer) {
                Some(entry) => {
                    self.stats.acks += 1;
                    self.acks.push((order, entry));
                }
                None => {
                    self.stats.declined += 1;
                    self.declined.push(order);
                }
            },
            Ask::Refund { id, .. } => match (acked(answer), answer) {
                (Some(entry), _) => {
                    self.stats.refund_acks += 1;
                    self.refund_acks.push((order, id.clone(), entry));
                }
                (None, ApiResp::Conflict { reason }) => {
                    self.stats.refunds_refused += 1;
                    if reason == "refund_exceeds_paid" {
                        self.refunds_refused.push((order, id.clone()));
                    }
                }
                (None, _) => {}
            },
            Ask::Authorize { .. } | Ask::Capture { .. } | Ask::Void => {
                let counter = match (ask, acked(answer)) {
                    (_, None) => &mut self.stats.two_phase_refused,
                    (Ask::Authorize { .. }, Some(_)) => &mut self.stats.hold_acks,
                    (Ask::Capture { .. }, Some(_)) => &mut self.stats.capture_acks,
                    (_, Some(_)) => &mut self.stats.void_acks,
                };
                *counter += 1;
                self.two_phase.push((order, ask.clone(), answer));
            }
        }
    }

    /// A client got a definite answer to a keyed request.
    pub fn keyed(&mut self, k: Keyed) {
        self.stats.keyed_answers += 1;
        self.stats.key_reuses_refused += u64::from(k.answer == ApiResp::KeyReused);
        self.keyed.push(k);
    }

    /// A client's request ended (answered, or given up on).
    pub fn attempt(&mut self, a: Attempt) {
        if let Some((at, answer)) = &a.answer {
            self.stats.answer_ms_max = self.stats.answer_ms_max.max(at - a.sent_ms);
            match answer {
                ApiResp::LockBusy => self.stats.lock_busy += 1,
                ApiResp::Unknown => self.stats.unknown += 1,
                ApiResp::KeyInUse => self.stats.key_in_use += 1,
                _ => {}
            }
        }
        self.attempts.push(a);
    }

    /// Liveness, for a seed with no fault: every request answered 200 or 402,
    /// each within `bound_ms`. One violation per broken request.
    pub fn check_liveness(&mut self, bound_ms: u64) {
        for a in self.attempts.clone() {
            let (order, host, sent) = (&a.order, &a.host, a.sent_ms);
            match a.answer {
                None => self.violate(
                    ViolationKind::Liveness,
                    format!("{order} sent to {host} at {sent} ms: never answered"),
                ),
                Some((at, answer)) if !answer.is_definite() => self.violate(
                    ViolationKind::Liveness,
                    format!(
                        "{order} sent to {host} at {sent} ms: {answer:?} after {} ms with no fault",
                        at - sent
                    ),
                ),
                Some((at, answer)) if at - sent > bound_ms => self.violate(
                    ViolationKind::Liveness,
                    format!(
                        "{order} sent to {host} at {sent} ms: {answer:?} after {} ms, over {bound_ms} ms",
                        at - sent
                    ),
                ),
                Some(_) => {}
            }
        }
    }

    pub fn check(&mut self, kind: ViolationKind, ok: bool, detail: impl FnOnce() -> String) {
        if !ok {
            self.violate(kind, detail());
        }
    }
}
