//! Batches under cross-instance locks (`--redis`): a batch takes the locks of
//! its orders in one round trip that waits for none of them, writes the ops of
//! the orders it got (each with its fencing token), leaves the busy ones to be
//! parked by the lane, and gives its leases back without delaying the answers.
//! Nothing here holds a lock while waiting for another, so instances cannot
//! deadlock (issue #12).
//!
//! Most ops that meet another instance's lock are duplicates of a charge that
//! instance is making. So an order is first *read* when there is reason to think
//! its charge is settled: its holder just released it (the lane woke it), or a
//! recent holder left its settled hint in Redis ([`Grant::Settled`]). The
//! committed state then answers the duplicate ([`Store::settled`]: a replay or a
//! definite refusal, decided by the same rules as a write) with no lock, no
//! write and no release. What the read does not settle takes the lock as usual.
//!
//! [`Store::settled`]: crate::store::Store::settled

use super::full::BatchDone;
use super::lane::LaneReply;
use super::Shared;
use crate::domain::{OrderId, RequestId};
use crate::lock::redis::{Grant, RedisLockError};
use crate::lock::{Lease, OrderLocks};
use crate::store::{Command, Op, OpResult, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Why an op was asked of the committed state before its lock (the `why` of a
/// `settled_without_lock` event).
#[derive(Clone, Copy)]
enum ReadFirst {
    /// Its order was parked, and its holder's release woke it.
    Released,
    /// A recent holder left the order's settled hint.
    Hint,
}

impl ReadFirst {
    fn as_str(self) -> &'static str {
        match self {
            ReadFirst::Released => "released",
            ReadFirst::Hint => "hint",
        }
    }
}

/// The locks a batch got, and the orders it must leave out.
#[derive(Default)]
struct Held {
    tokens: HashMap<OrderId, i64>,
    leases: Vec<(OrderId, RequestId, Lease)>,
    /// How many of `leases`, in order, each acquire granted: a release takes
    /// the leases of one acquire (one owner), so a batch that acquired twice
    /// (a settled hint whose read left ops to write) releases twice. Released
    /// as one, every lease of such a batch stayed held until its TTL.
    acquires: Vec<usize>,
    /// Held elsewhere: parked by the lane, with the holder's remaining lease.
    busy: Vec<(OrderId, Duration)>,
}

impl Held {
    /// Records one acquire's grants (logging each); returns the orders answered
    /// [`Grant::Settled`]. Redis unreachable: the orders are written without
    /// tokens (the database still charges once).
    fn take(
        &mut self,
        inst: &str,
        orders: &[(OrderId, RequestId)],
        grants: Result<Vec<Grant>, RedisLockError>,
    ) -> Vec<OrderId> {
        let mut hinted = Vec::new();
        let grants = match grants {
            Ok(grants) => grants,
            Err(e) => {
                for (order, req) in orders {
                    tracing::warn!(event = "lock_unavailable", oid = order.as_str(), detail = %e, req = req.as_str(), inst);
                }
                return hinted;
            }
        };
        let first = self.leases.len();
        for ((order, req), grant) in orders.iter().zip(grants) {
            match grant {
                Grant::Held(lease) => {
                    tracing::info!(
                        event = "lock_acquired",
                        oid = order.as_str(),
                        token = lease.token,
                        req = req.as_str(),
                        inst
                    );
                    self.tokens.insert(order.clone(), lease.token);
                    self.leases.push((order.clone(), req.clone(), lease));
                }
                Grant::Busy { left } => {
                    tracing::info!(
                        event = "lock_wait",
                        oid = order.as_str(),
                        holder_left_ms = left.as_millis() as u64,
                        req = req.as_str(),
                        inst
                    );
                    self.busy.push((order.clone(), left));
                }
                Grant::Settled => hinted.push(order.clone()),
            }
        }
        if self.leases.len() > first {
            self.acquires.push(self.leases.len() - first);
        }
        hinted
    }

    fn is_busy(&self, order: &OrderId) -> bool {
        self.busy.iter().any(|(b, _)| b == order)
    }
}

/// Applies a batch under the Redis locks of its orders (see the module docs).
/// `settle_first` marks the ops of orders another instance just released.
pub(super) async fn fenced_apply(
    shared: Arc<Shared>,
    locks: Arc<dyn OrderLocks>,
    ops: Vec<Command>,
    reqs: Vec<RequestId>,
    settle_first: Vec<bool>,
) -> BatchDone {
    let inst = &*shared.inst;
    let sent = Instant::now();
    let mut answers: Vec<Option<OpResult>> = vec![None; ops.len()];
    if settle_first.contains(&true) {
        read_first(
            &shared,
            &ops,
            &reqs,
            &settle_first,
            ReadFirst::Released,
            &mut answers,
        )
        .await;
    }
    let mut held = Held::default();
    let wanted = unanswered_orders(&ops, &reqs, &answers, |_| true);
    if !wanted.is_empty() {
        let names: Vec<&str> = wanted.iter().map(|(o, _)| o.as_str()).collect();
        // Only a deduct can be settled by a charge: creating the order (the
        // step before it) never asks for the hint.
        let hints: Vec<bool> = wanted
            .iter()
            .map(|(o, _)| {
                ops.iter().zip(&answers).any(|(op, a)| {
                    a.is_none() && matches!(&op.op, Op::Deduct { order_id } if order_id == o)
                })
            })
            .collect();
        let grants = locks.try_acquire_or_settled(&names, &hints).await;
        let hinted = held.take(inst, &wanted, grants);
        if !hinted.is_empty() {
            let marked: Vec<bool> = ops
                .iter()
                .map(|op| op.order_id().is_some_and(|o| hinted.contains(o)))
                .collect();
            read_first(&shared, &ops, &reqs, &marked, ReadFirst::Hint, &mut answers).await;
            // What the read did not settle takes the lock after all.
            let again = unanswered_orders(&ops, &reqs, &answers, |o| hinted.contains(o));
            if !again.is_empty() {
                let names: Vec<&str> = again.iter().map(|(o, _)| o.as_str()).collect();
                let grants = locks.try_acquire_many(&names).await;
                held.take(inst, &again, grants);
            }
        }
    }
    let results = apply_held(&shared, &locks, ops, &held, answers).await;
    BatchDone {
        results,
        busy: held.busy,
        sent,
    }
}

/// The distinct orders (with the request that first names each) of the ops not
/// answered yet, among those `include` accepts.
fn unanswered_orders(
    ops: &[Command],
    reqs: &[RequestId],
    answers: &[Option<OpResult>],
    include: impl Fn(&OrderId) -> bool,
) -> Vec<(OrderId, RequestId)> {
    let mut orders: Vec<(OrderId, RequestId)> = Vec::new();
    for ((op, req), answer) in ops.iter().zip(reqs).zip(answers) {
        if let (Some(o), None) = (op.order_id(), answer) {
            if include(o) && !orders.iter().any(|(seen, _)| seen == o) {
                orders.push((o.clone(), req.clone()));
            }
        }
    }
    orders
}

/// Asks the committed state for the marked ops not answered yet, and fills in
/// the answers it settles. A failed read settles nothing: those ops go on under
/// their locks, where a store that is down fails them properly.
async fn read_first(
    shared: &Shared,
    ops: &[Command],
    reqs: &[RequestId],
    marked: &[bool],
    why: ReadFirst,
    answers: &mut [Option<OpResult>],
) {
    let inst = &*shared.inst;
    let asked: Vec<usize> = (0..ops.len())
        .filter(|&i| marked[i] && answers[i].is_none() && ops[i].is_plain())
        .collect();
    if asked.is_empty() {
        return;
    }
    let cmds = asked.iter().map(|&i| ops[i].clone()).collect();
    match shared
        .store
        .settled(cmds, chrono::Utc::now().timestamp_millis())
        .await
    {
        Ok(settled) if settled.len() == asked.len() => {
            for (i, answer) in asked.into_iter().zip(settled) {
                if let Some(answer) = answer {
                    shared.stats.settled_without_lock.inc();
                    tracing::info!(
                        event = "settled_without_lock",
                        why = why.as_str(),
                        oid = ops[i].order_id().map(OrderId::as_str).unwrap_or(""),
                        req = reqs[i].as_str(),
                        inst
                    );
                    answers[i] = Some(answer);
                }
            }
        }
        Ok(settled) => tracing::warn!(
            event = "settled_read_failed",
            detail = %format!("store answered {} of {} ops", settled.len(), asked.len()),
            inst
        ),
        Err(e) => tracing::warn!(event = "settled_read_failed", detail = %e, inst),
    }
}

/// Whether a batch's results settle `order`'s charge, so its release may leave
/// the settled hint: one of its ops is a deduct, and every deduct of it got a
/// definite answer (charged, replayed, declined, refused for good).
fn settles_charge(order: &OrderId, ops: &[Command], out: &[Option<LaneReply>]) -> bool {
    let mut deducts = ops
        .iter()
        .zip(out)
        .filter(|(op, _)| matches!(&op.op, Op::Deduct { order_id } if order_id == order))
        .peekable();
    deducts.peek().is_some()
        && deducts.all(|(_, r)| match r {
            Some(Ok(Ok(_))) => true,
            Some(Ok(Err(rejection))) => rejection.is_definite(),
            _ => false,
        })
}

/// Gives every lease of a batch back, one round trip per acquire (`acquires`:
/// how many leases, in order, each acquire granted), the round trips at once,
/// logging each lease, leaving the settled hint of the orders whose charge the
/// batch settled.
fn release_in_background(
    inst: Arc<str>,
    locks: Arc<dyn OrderLocks>,
    leases: Vec<(OrderId, RequestId, Lease)>,
    acquires: Vec<usize>,
    settled: Vec<bool>,
) {
    if leases.is_empty() {
        return;
    }
    debug_assert_eq!(acquires.iter().sum::<usize>(), leases.len());
    tokio::spawn(async move {
        let held: Vec<Lease> = leases.iter().map(|(_, _, l)| l.clone()).collect();
        let mut rounds = Vec::with_capacity(acquires.len());
        let mut from = 0;
        for &n in &acquires {
            rounds.push(locks.release_settled(&held[from..from + n], &settled[from..from + n]));
            from += n;
        }
        let answers = futures::future::join_all(rounds).await;
        let mut leases = leases.iter();
        for (answer, n) in answers.iter().zip(acquires) {
            for (i, (order, req, lease)) in leases.by_ref().take(n).enumerate() {
                let inst = &*inst;
                match answer {
                    Ok(freed) if freed.get(i).copied().unwrap_or(false) => tracing::info!(
                        event = "lock_released",
                        oid = order.as_str(),
                        token = lease.token,
                        req = req.as_str(),
                        inst
                    ),
                    Ok(_) => tracing::warn!(
                        event = "lock_released",
                        oid = order.as_str(),
                        token = lease.token,
                        lost = true,
                        req = req.as_str(),
                        inst
                    ),
                    Err(e) => {
                        tracing::warn!(event = "lock_released", oid = order.as_str(), token = lease.token, detail = %e, req = req.as_str(), inst)
                    }
                }
            }
        }
    });
}

/// Writes the ops not answered yet whose orders are not busy (fenced where a
/// token was granted), then gives every lease back. One answer per op: the
/// read's, the write's, or `None` for an op of a busy order.
async fn apply_held(
    shared: &Shared,
    locks: &Arc<dyn OrderLocks>,
    ops: Vec<Command>,
    held: &Held,
    answers: Vec<Option<OpResult>>,
) -> Vec<Option<LaneReply>> {
    if held.leases.is_empty() && answers.iter().all(Option::is_some) {
        return answers.into_iter().map(|a| a.map(Ok)).collect();
    }
    if shared.cfg.failpoint_pause_after_lock_ms > 0 {
        tokio::time::sleep(Duration::from_millis(
            shared.cfg.failpoint_pause_after_lock_ms,
        ))
        .await;
    }
    // Locks held, nothing written (`exit` here strands the orders until the TTL).
    let injected = if held.leases.is_empty() {
        None
    } else {
        crate::failpoint::hit(crate::failpoint::AFTER_LOCK).await
    };
    let total = ops.len();
    let mut out: Vec<Option<LaneReply>> = answers.into_iter().map(|a| a.map(Ok)).collect();
    let mut positions = Vec::with_capacity(total);
    let mut to_apply = Vec::with_capacity(total);
    for (i, op) in ops.iter().enumerate() {
        let order = op.order_id();
        if out[i].is_some() || order.is_some_and(|o| held.is_busy(o)) {
            continue;
        }
        positions.push(i);
        to_apply.push(match order.and_then(|o| held.tokens.get(o).copied()) {
            Some(token) => op.clone().fenced(token),
            None => op.clone(),
        });
    }
    let applied = if injected == Some(crate::failpoint::Action::Error) {
        Err(StoreError::Unavailable(
            "failpoint engine.after_lock".into(),
        ))
    } else if to_apply.is_empty() {
        Ok(Vec::new())
    } else {
        shared.store.apply(to_apply).await
    };
    // Ops of busy orders stay `None` (they did not run, whatever the store said).
    match applied {
        Ok(results) if results.len() == positions.len() => {
            for (pos, result) in positions.into_iter().zip(results) {
                out[pos] = Some(Ok(result));
            }
        }
        Ok(results) => {
            let e = StoreError::Unavailable(format!(
                "store answered {} results for {} ops",
                results.len(),
                positions.len()
            ));
            for pos in positions {
                out[pos] = Some(Err(e.clone()));
            }
        }
        Err(e) => {
            for pos in positions {
                out[pos] = Some(Err(e.clone()));
            }
        }
    }
    // The answers go out without waiting for the release: it is one more round
    // trip, and a later request for one of these orders that finds its lock still
    // held waits for this very release's notification.
    let settled = held
        .leases
        .iter()
        .map(|(order, _, _)| settles_charge(order, &ops, &out))
        .collect();
    let acquires = if super::mutants::armed(super::mutants::Mutant::ReleaseAcquiresAsOne) {
        vec![held.leases.len()]
    } else {
        held.acquires.clone()
    };
    release_in_background(
        shared.inst.clone(),
        locks.clone(),
        held.leases.clone(),
        acquires,
        settled,
    );
    out
}
