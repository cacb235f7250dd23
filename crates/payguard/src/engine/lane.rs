//! The state of one lane, without any I/O: admission, single flight, batching.
//!
//! A lane owns every order hashed to it. Its owner task is the only code that
//! touches a [`LaneCore`], so the core needs no locks; it is a plain state machine
//! that the owner drives with three calls:
//!
//! * [`LaneCore::submit`] admits a request. If an equal op is already waiting or in
//!   flight, the request joins it (single flight) instead of running again.
//! * [`LaneCore::take_batch`] hands the waiting ops to the store as one batch, but
//!   only when no batch is in flight: while one commits, the next one fills up
//!   (group commit), and one order's work stays in FIFO order.
//! * [`LaneCore::complete`] pairs the store's answers with every waiter.
//!
//! With cross-instance locks, a batch may leave behind the orders whose lock
//! another instance holds ([`LaneCore::complete_partial`]). Those are *parked*:
//! their waiters keep waiting, later requests for the same order queue behind
//! them (so one order's work stays in FIFO order), and nothing of them is batched
//! until the owner [`LaneCore::unpark`]s them (the holder released) or gives up
//! on them ([`LaneCore::give_up`]).
//!
//! Keeping the logic free of async and channels is what lets `tests/lane_model.rs`
//! drive it under many thread schedules with shuttle.

use crate::domain::{OrderId, RequestId};
use crate::store::{Command, OpResult, StoreError};
use std::collections::HashMap;

/// What a waiter receives: the op's result, or the batch's failure.
pub type LaneReply = Result<OpResult, StoreError>;

/// One request waiting on an op.
pub struct Waiter<W> {
    pub req: RequestId,
    pub reply: W,
}

struct Slot<W> {
    cmd: Command,
    /// The first waiter executed the op; the others share its result as replays.
    waiters: Vec<Waiter<W>>,
}

/// How a request was admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// It joined an equal op already waiting or in flight (single flight).
    pub joined: bool,
    /// Another request for the same order was already in this lane: the incident's
    /// pattern, reported by the race sentinel as `concurrent_inflight`.
    pub other_req: Option<RequestId>,
}

/// One answer to hand out after a batch finished.
pub struct Delivery<W> {
    pub cmd: Command,
    pub reply: LaneReply,
    /// `waiters[0]` executed the op; the rest get `reply` as a replay.
    pub waiters: Vec<Waiter<W>>,
}

pub struct LaneCore<W> {
    /// Ops sent to the store and not yet answered, in send order.
    inflight: Vec<Slot<W>>,
    inflight_index: HashMap<Command, usize>,
    /// Ops waiting for the next batch, in arrival order.
    pending: Vec<Slot<W>>,
    pending_index: HashMap<Command, usize>,
    /// Race sentinel: per order, the first request still in this lane and how many
    /// requests for that order are in the lane. Invariant: the count equals the
    /// number of waiters (pending or in flight) whose op names that order.
    busy_orders: HashMap<OrderId, (RequestId, usize)>,
    /// Orders left out of a batch because another instance holds their lock: their
    /// ops in arrival order. Invariant: an order parked here has no op pending or
    /// in flight.
    parked: HashMap<OrderId, Vec<Slot<W>>>,
}

impl<W> Default for LaneCore<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W> LaneCore<W> {
    pub fn new() -> Self {
        LaneCore {
            inflight: Vec::new(),
            inflight_index: HashMap::new(),
            pending: Vec::new(),
            pending_index: HashMap::new(),
            busy_orders: HashMap::new(),
            parked: HashMap::new(),
        }
    }

    /// Admits a request for `cmd`.
    pub fn submit(&mut self, cmd: Command, req: RequestId, reply: W) -> Admission {
        let other_req = cmd
            .order_id()
            .and_then(|order| match self.busy_orders.get_mut(order) {
                Some((first, count)) => {
                    *count += 1;
                    Some(first.clone())
                }
                None => {
                    self.busy_orders.insert(order.clone(), (req.clone(), 1));
                    None
                }
            });
        let waiter = Waiter { req, reply };
        // A parked order's ops wait behind it, joining an equal one.
        if let Some(slots) = cmd.order_id().and_then(|o| self.parked.get_mut(o)) {
            if let Some(slot) = slots.iter_mut().find(|s| s.cmd == cmd) {
                slot.waiters.push(waiter);
                return Admission {
                    joined: true,
                    other_req,
                };
            }
            slots.push(Slot {
                cmd,
                waiters: vec![waiter],
            });
            return Admission {
                joined: false,
                other_req,
            };
        }
        // Join an equal op in flight first: its result is the one that stands.
        if let Some(&i) = self.inflight_index.get(&cmd) {
            self.inflight[i].waiters.push(waiter);
            return Admission {
                joined: true,
                other_req,
            };
        }
        if let Some(&i) = self.pending_index.get(&cmd) {
            self.pending[i].waiters.push(waiter);
            return Admission {
                joined: true,
                other_req,
            };
        }
        self.pending_index.insert(cmd.clone(), self.pending.len());
        self.pending.push(Slot {
            cmd,
            waiters: vec![waiter],
        });
        Admission {
            joined: false,
            other_req,
        }
    }

    /// Distinct ops waiting for the next batch.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn has_inflight(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// Orders parked until another instance releases their lock.
    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// True when nothing is waiting, parked, in flight or tracked by the sentinel.
    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
            && self.pending.is_empty()
            && self.parked.is_empty()
            && self.inflight_index.is_empty()
            && self.pending_index.is_empty()
            && self.busy_orders.is_empty()
    }

    /// Moves up to `batch_max` waiting ops in flight and returns them, or `None`
    /// when a batch is already in flight or nothing waits.
    pub fn take_batch(&mut self, batch_max: usize) -> Option<Vec<Command>> {
        if self.has_inflight() || self.pending.is_empty() {
            return None;
        }
        let n = self.pending.len().min(batch_max.max(1));
        let rest = self.pending.split_off(n);
        self.inflight = std::mem::replace(&mut self.pending, rest);
        self.reindex_pending();
        self.inflight_index.clear();
        for (i, slot) in self.inflight.iter().enumerate() {
            self.inflight_index.insert(slot.cmd.clone(), i);
        }
        Some(self.inflight.iter().map(|s| s.cmd.clone()).collect())
    }

    /// The request that executes each op of the batch in flight (its first waiter).
    pub fn inflight_reqs(&self) -> Vec<RequestId> {
        self.inflight
            .iter()
            .map(|s| s.waiters[0].req.clone())
            .collect()
    }

    /// Pairs the store's answer for the batch in flight with its waiters.
    ///
    /// A store answer of the wrong length is a broken store: every waiter then gets
    /// an error rather than somebody else's result.
    pub fn complete(&mut self, results: Result<Vec<OpResult>, StoreError>) -> Vec<Delivery<W>> {
        let slots = std::mem::take(&mut self.inflight);
        self.inflight_index.clear();
        let results: Vec<LaneReply> = match results {
            Ok(r) if r.len() == slots.len() => r.into_iter().map(Ok).collect(),
            Ok(r) => {
                let e = StoreError::Unavailable(format!(
                    "store answered {} results for {} ops",
                    r.len(),
                    slots.len()
                ));
                slots.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => slots.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out = Vec::with_capacity(slots.len());
        for (slot, reply) in slots.into_iter().zip(results) {
            if let Some(order) = slot.cmd.order_id() {
                self.release_order(order, slot.waiters.len());
            }
            out.push(Delivery {
                cmd: slot.cmd,
                reply,
                waiters: slot.waiters,
            });
        }
        out
    }

    /// Like [`LaneCore::complete`], for a batch that may have left orders out:
    /// one answer per op, `None` for an op that did not run. Every op of such an
    /// order is parked (with the ops of that order that arrived since), in order;
    /// the answer lists the orders newly parked, once each. An answer of the wrong
    /// length fails every op, as in `complete`.
    pub fn complete_partial(
        &mut self,
        results: Vec<Option<LaneReply>>,
    ) -> (Vec<Delivery<W>>, Vec<OrderId>) {
        if results.len() != self.inflight.len() {
            let e = StoreError::Unavailable(format!(
                "store answered {} results for {} ops",
                results.len(),
                self.inflight.len()
            ));
            return (self.complete(Err(e)), Vec::new());
        }
        let slots = std::mem::take(&mut self.inflight);
        self.inflight_index.clear();
        let mut out = Vec::with_capacity(slots.len());
        let mut newly_parked: Vec<OrderId> = Vec::new();
        for (slot, result) in slots.into_iter().zip(results) {
            match (result, slot.cmd.order_id().cloned()) {
                (None, Some(order)) => {
                    if !self.parked.contains_key(&order) {
                        newly_parked.push(order.clone());
                    }
                    self.parked.entry(order).or_default().push(slot);
                }
                (result, _) => {
                    let reply = result.unwrap_or(Ok(Err(crate::store::Rejection::LockBusy)));
                    if let Some(order) = slot.cmd.order_id() {
                        self.release_order(order, slot.waiters.len());
                    }
                    out.push(Delivery {
                        cmd: slot.cmd,
                        reply,
                        waiters: slot.waiters,
                    });
                }
            }
        }
        if !newly_parked.is_empty() {
            // Ops of a parked order that queued meanwhile go behind it.
            let pending = std::mem::take(&mut self.pending);
            for slot in pending {
                match slot.cmd.order_id().and_then(|o| self.parked.get_mut(o)) {
                    Some(parked) => parked.push(slot),
                    None => self.pending.push(slot),
                }
            }
            self.reindex_pending();
        }
        (out, newly_parked)
    }

    /// The order's lock may be free again: its parked ops go back to the queue,
    /// in order. False when it was not parked.
    pub fn unpark(&mut self, order: &OrderId) -> bool {
        let Some(slots) = self.parked.remove(order) else {
            return false;
        };
        for slot in slots {
            self.pending_index
                .insert(slot.cmd.clone(), self.pending.len());
            self.pending.push(slot);
        }
        true
    }

    /// Answers every parked op of `order` with `reply` and forgets them (nothing
    /// of them reached the store).
    pub fn give_up(&mut self, order: &OrderId, reply: LaneReply) -> Vec<Delivery<W>> {
        let slots = self.parked.remove(order).unwrap_or_default();
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            self.release_order(order, slot.waiters.len());
            out.push(Delivery {
                cmd: slot.cmd,
                reply: reply.clone(),
                waiters: slot.waiters,
            });
        }
        out
    }

    fn reindex_pending(&mut self) {
        self.pending_index.clear();
        for (i, slot) in self.pending.iter().enumerate() {
            self.pending_index.insert(slot.cmd.clone(), i);
        }
    }

    fn release_order(&mut self, order: &OrderId, n: usize) {
        if let Some((_, count)) = self.busy_orders.get_mut(order) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.busy_orders.remove(order);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Money;
    use crate::store::{Op, Output, Rejection};

    fn deduct(o: &str) -> Command {
        Op::Deduct {
            order_id: OrderId::parse(o).unwrap(),
        }
        .into()
    }

    fn req(r: &str) -> RequestId {
        RequestId::parse(r).unwrap()
    }

    #[test]
    fn duplicates_join_and_collisions_are_reported() {
        let mut core: LaneCore<u32> = LaneCore::new();
        assert_eq!(
            core.submit(deduct("o1"), req("r1"), 1),
            Admission {
                joined: false,
                other_req: None
            }
        );
        assert_eq!(
            core.submit(deduct("o1"), req("r2"), 2),
            Admission {
                joined: true,
                other_req: Some(req("r1"))
            }
        );
        let refund: Command = Op::Refund {
            order_id: OrderId::parse("o1").unwrap(),
            refund_id: crate::domain::RefundId::parse("f1").unwrap(),
            amount: Money::amount(5).unwrap(),
        }
        .into();
        assert_eq!(
            core.submit(refund, req("r3"), 3),
            Admission {
                joined: false,
                other_req: Some(req("r1"))
            }
        );
        let batch = core.take_batch(1).unwrap();
        assert_eq!(batch, vec![deduct("o1")]);
        assert!(
            core.take_batch(10).is_none(),
            "one batch in flight at a time"
        );
        // A duplicate arriving while its op is in flight joins it.
        assert!(core.submit(deduct("o1"), req("r4"), 4).joined);
        let d = core.complete(Ok(vec![Err(Rejection::OrderNotFound)]));
        assert_eq!(d.len(), 1);
        let got: Vec<u32> = d[0].waiters.iter().map(|w| w.reply).collect();
        assert_eq!(got, vec![1, 2, 4]);
        assert!(!core.is_idle(), "the refund is still pending");
        let batch = core.take_batch(10).unwrap();
        assert_eq!(batch.len(), 1);
        let d = core.complete(Err(StoreError::Closed));
        assert!(matches!(d[0].reply, Err(StoreError::Closed)));
        assert!(core.is_idle());
    }

    #[test]
    fn short_store_answers_fail_every_waiter() {
        let mut core: LaneCore<()> = LaneCore::new();
        core.submit(deduct("a"), req("r1"), ());
        core.submit(deduct("b"), req("r2"), ());
        core.take_batch(10).unwrap();
        let d = core.complete(Ok(vec![Ok(Output::Account {
            account: crate::domain::Account {
                id: crate::domain::AccountId::parse("x").unwrap(),
                balance: Money::ZERO,
                held: Money::ZERO,
                currency: crate::domain::Currency::CNY,
                opening_balance: Money::ZERO,
                created_at: 0,
                updated_at: 0,
            },
            created: true,
        })]));
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.reply.is_err()));
        assert!(core.is_idle());
    }

    #[test]
    fn a_busy_order_parks_with_what_came_after_it_and_returns_in_order() {
        let mut core: LaneCore<u32> = LaneCore::new();
        core.submit(deduct("a"), req("r1"), 1);
        core.submit(deduct("b"), req("r2"), 2);
        assert_eq!(core.take_batch(10).unwrap().len(), 2);
        // While the batch is out: a refund of b, and a duplicate of b's deduct.
        let refund: Command = Op::Refund {
            order_id: OrderId::parse("b").unwrap(),
            refund_id: crate::domain::RefundId::parse("f1").unwrap(),
            amount: Money::amount(5).unwrap(),
        }
        .into();
        core.submit(refund.clone(), req("r3"), 3);
        assert!(core.submit(deduct("b"), req("r4"), 4).joined);
        // b's lock was held elsewhere: it did not run.
        let (done, parked) =
            core.complete_partial(vec![Some(Ok(Err(Rejection::OrderNotFound))), None]);
        assert_eq!(done.len(), 1);
        assert_eq!(parked, vec![OrderId::parse("b").unwrap()]);
        assert_eq!(core.pending_len(), 0, "b's refund waits behind b's deduct");
        assert_eq!(core.parked_len(), 1);
        assert!(
            core.take_batch(10).is_none(),
            "nothing of a parked order is batched"
        );
        // A duplicate arriving while parked joins the parked op.
        assert!(core.submit(deduct("b"), req("r5"), 5).joined);
        assert!(core.unpark(&OrderId::parse("b").unwrap()));
        assert_eq!(core.take_batch(10).unwrap(), vec![deduct("b"), refund]);
        let d = core.complete(Ok(vec![
            Err(Rejection::OrderNotFound),
            Err(Rejection::OrderNotFound),
        ]));
        let got: Vec<Vec<u32>> = d
            .iter()
            .map(|d| d.waiters.iter().map(|w| w.reply).collect())
            .collect();
        assert_eq!(got, vec![vec![2, 4, 5], vec![3]]);
        assert!(core.is_idle());
    }

    #[test]
    fn giving_up_on_a_parked_order_answers_all_its_waiters() {
        let mut core: LaneCore<u32> = LaneCore::new();
        core.submit(deduct("a"), req("r1"), 1);
        core.take_batch(10).unwrap();
        core.submit(deduct("a"), req("r2"), 2);
        let (done, parked) = core.complete_partial(vec![None]);
        assert!(done.is_empty());
        assert_eq!(parked.len(), 1);
        let d = core.give_up(&parked[0], Ok(Err(Rejection::LockBusy)));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].waiters.len(), 2);
        assert!(matches!(d[0].reply, Ok(Err(Rejection::LockBusy))));
        assert!(core.is_idle());
    }
}
