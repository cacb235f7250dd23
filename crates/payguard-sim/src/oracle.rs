//! Ground truth kept beside the simulation, and the violations found in it.
//!
//! Why: some properties cannot be read off the final database. Whether a lock
//! holder was still the live holder when its token was made, or whether a write
//! with a lower token than one already applied got through, is only visible at
//! the moment it happens; the simulated hosts report those moments here (the
//! oracle is test instrumentation: no protocol decision reads it). It also keeps
//! every client request's send and answer times, for the liveness check of a
//! seed with no fault, and counts what a seed exercised (batches, parked orders,
//! release notifications). All hosts of a seed run on one thread, so it is
//! shared as `Rc<RefCell<_>>`.

use payguard::lock::token;
use std::collections::BTreeMap;

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
    /// A client was told "charged" (200) but the database lacks that one debit.
    AcknowledgedChargeMissing,
    /// An account's balance is not its opening balance minus its debits.
    BalanceDrift,
    /// An account's balance is below zero.
    NegativeBalance,
    /// A client was told 402 for an order that was nevertheless charged.
    DeclinedButCharged,
    /// A write carrying a token lower than one already applied to its order was
    /// applied (it should have been refused as `stale_fencing_token`).
    StaleTokenApplied,
    /// A live lock holder got a token no higher than an earlier live holder of the
    /// same order: its writes are refused although it holds the lock.
    LiveHolderStaleToken,
    /// In a seed with no fault (no crash, flush, restart, partition, slow link,
    /// message loss or stall), a request was not answered, was answered
    /// `LockBusy`, or took longer than one lock TTL.
    Liveness,
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
    pub answer: Option<(u64, crate::wire::ApiResp)>,
}

/// Counts that show what a seed exercised (and make two replays comparable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub grants: u64,
    pub grants_after_expiry: u64,
    pub new_epochs: u64,
    pub stalls: u64,
    pub stale_refused: u64,
    pub unfenced_writes: u64,
    pub acks: u64,
    pub declined: u64,
    pub unanswered: u64,
    pub faults: u64,
    /// Lane batches that took locks (or tried to), and the orders in them.
    pub batches: u64,
    pub batched_orders: u64,
    /// Batches of two orders or more.
    pub multi_order_batches: u64,
    /// Multi-order batches that started while another instance had one in
    /// flight: what the old deadlock needs.
    pub overlapping_multi_batches: u64,
    /// Orders an `ACQUIRE_MANY` found held elsewhere (each one parked).
    pub parked: u64,
    /// Release notifications received, and parked orders they woke.
    pub notices: u64,
    pub woken: u64,
    /// Parked orders retried by the fallback timer, not by a notification.
    pub fallback_retries: u64,
    /// Re-subscriptions that woke every parked order of an instance.
    pub resubscriptions: u64,
    /// Requests answered 503 `LockBusy`.
    pub lock_busy: u64,
    /// The longest time from a client's send to its answer (a max, not a sum).
    pub answer_ms_max: u64,
}

#[derive(Debug, Default)]
pub struct Oracle {
    /// order → highest token made for a holder that was live when it got it.
    live_tokens: BTreeMap<String, i64>,
    /// order → highest token of a write the database applied.
    applied_tokens: BTreeMap<String, i64>,
    /// (order, entry) per answer that told a client it was charged.
    pub acks: Vec<(String, u64)>,
    /// Orders a client was told 402 for.
    pub declined: Vec<String>,
    pub violations: Vec<Violation>,
    pub stats: Stats,
    /// Deducts an instance is working on (a crash drops them, and counts them out).
    pub in_flight: u64,
    /// What happened, in order, when a replay asked for it (`None`: not kept).
    pub trace: Option<Vec<String>>,
    /// Events noted, kept or not: the length of the schedule.
    pub events: u64,
    /// Every client request, for the liveness check.
    pub attempts: Vec<Attempt>,
    /// Per instance, its multi-order batches in flight.
    multi_batches_in_flight: BTreeMap<usize, u64>,
}

impl Oracle {
    /// Keeps one line of the trace at simulated `at_ms`, if a trace is kept.
    pub fn note(&mut self, at_ms: u64, line: impl FnOnce() -> String) {
        self.events += 1;
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{at_ms:>5} ms  {}", line()));
        }
    }

    fn violate(&mut self, kind: ViolationKind, detail: String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("          VIOLATION {kind:?}: {detail}"));
        }
        self.violations.push(Violation { kind, detail });
    }

    /// A holder's token is final. `live`: its lock was still its own in Redis then.
    pub fn token_made(&mut self, order: &str, tok: i64, live: bool, at_ms: u64) {
        self.stats.grants += 1;
        if !live {
            // Its lease ended (TTL, flush) before it had a token; fencing must
            // refuse its writes if a later holder wrote first, nothing more.
            self.stats.grants_after_expiry += 1;
            return;
        }
        let prev = self.live_tokens.get(order).copied();
        if let Some(prev) = prev.filter(|&p| tok <= p) {
            self.violate(
                ViolationKind::LiveHolderStaleToken,
                format!(
                    "order {order} at {at_ms} ms: live holder got token {:?}, an earlier live holder had {:?}",
                    token::unpack(tok),
                    token::unpack(prev)
                ),
            );
        }
        self.live_tokens
            .insert(order.to_owned(), prev.map_or(tok, |p| p.max(tok)));
    }

    /// The database applied a write for `order` with `tok` (None: unfenced).
    pub fn write_applied(&mut self, order: &str, tok: Option<i64>, at_ms: u64) {
        let Some(tok) = tok else {
            self.stats.unfenced_writes += 1;
            return;
        };
        let prev = self.applied_tokens.get(order).copied();
        if let Some(prev) = prev.filter(|&p| tok < p) {
            self.violate(
                ViolationKind::StaleTokenApplied,
                format!(
                    "order {order} at {at_ms} ms: write with token {:?} applied after one with {:?}",
                    token::unpack(tok),
                    token::unpack(prev)
                ),
            );
        }
        self.applied_tokens
            .insert(order.to_owned(), prev.map_or(tok, |p| p.max(tok)));
    }

    /// A batch of `orders` orders starts taking locks on instance `inst`.
    pub fn batch_started(&mut self, inst: usize, orders: usize) {
        self.stats.batches += 1;
        self.stats.batched_orders += orders as u64;
        if orders < 2 {
            return;
        }
        self.stats.multi_order_batches += 1;
        if self
            .multi_batches_in_flight
            .iter()
            .any(|(&i, &n)| i != inst && n > 0)
        {
            self.stats.overlapping_multi_batches += 1;
        }
        *self.multi_batches_in_flight.entry(inst).or_default() += 1;
    }

    /// The batch [`Oracle::batch_started`] announced ended (or its host crashed).
    pub fn batch_ended(&mut self, inst: usize, orders: usize) {
        if orders >= 2 {
            let n = self.multi_batches_in_flight.entry(inst).or_default();
            *n = n.saturating_sub(1);
        }
    }

    /// A client's request ended (answered, or given up on).
    pub fn attempt(&mut self, a: Attempt) {
        if let Some((at, answer)) = &a.answer {
            self.stats.answer_ms_max = self.stats.answer_ms_max.max(at - a.sent_ms);
            if *answer == crate::wire::ApiResp::LockBusy {
                self.stats.lock_busy += 1;
            }
        }
        self.attempts.push(a);
    }

    /// Liveness, for a seed with no fault: every request answered, none
    /// `LockBusy`, each within `bound_ms`. One violation per broken request.
    pub fn check_liveness(&mut self, bound_ms: u64) {
        for a in self.attempts.clone() {
            let (order, host, sent) = (&a.order, &a.host, a.sent_ms);
            match a.answer {
                None => self.violate(
                    ViolationKind::Liveness,
                    format!("{order} sent to {host} at {sent} ms: never answered"),
                ),
                Some((at, crate::wire::ApiResp::LockBusy)) => self.violate(
                    ViolationKind::Liveness,
                    format!(
                        "{order} sent to {host} at {sent} ms: LockBusy after {} ms with no fault",
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
