//! Batches under cross-instance locks (`--redis`): a batch takes the locks of
//! its orders in one round trip that waits for none of them, writes the ops of
//! the orders it got (each with its fencing token), leaves the busy ones to be
//! parked by the lane, and gives its leases back without delaying the answers.
//! Nothing here holds a lock while waiting for another, so instances cannot
//! deadlock (issue #12). An order woken by its holder's release is first read:
//! what the holder committed usually answers it, with no lock at all.

use super::full::BatchDone;
use super::lane::LaneReply;
use super::Shared;
use crate::domain::{OrderId, RequestId};
use crate::lock::redis::{Grant, RedisLocks};
use crate::store::{Command, OpResult, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Applies a batch under the Redis locks of its orders, each op carrying its
/// order's fencing token. The ops of orders another instance just released
/// (`settle_first`) are first asked of the committed state
/// ([`Store::settled`](crate::store::Store::settled)): a duplicate that waited
/// for the instance that charged its order is answered with the replay without
/// a lock, a write or a release. The rest run as [`locked_apply`] says.
pub(super) async fn fenced_apply(
    shared: Arc<Shared>,
    locks: Arc<RedisLocks>,
    ops: Vec<Command>,
    reqs: Vec<RequestId>,
    settle_first: Vec<bool>,
) -> BatchDone {
    if !settle_first.contains(&true) {
        return locked_apply(shared, locks, ops, reqs).await;
    }
    let answers = settle_released(&shared, &ops, &reqs, &settle_first).await;
    let (mut rest_pos, mut rest_ops, mut rest_reqs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (op, req)) in ops.into_iter().zip(reqs).enumerate() {
        if answers[i].is_none() {
            rest_pos.push(i);
            rest_ops.push(op);
            rest_reqs.push(req);
        }
    }
    let mut results: Vec<Option<LaneReply>> = answers.into_iter().map(|a| a.map(Ok)).collect();
    if rest_ops.is_empty() {
        return BatchDone {
            results,
            busy: Vec::new(),
            sent: Instant::now(),
        };
    }
    let done = locked_apply(shared, locks, rest_ops, rest_reqs).await;
    for (pos, result) in rest_pos.into_iter().zip(done.results) {
        results[pos] = result;
    }
    BatchDone {
        results,
        busy: done.busy,
        sent: done.sent,
    }
}

/// The committed state's answers for the marked ops (see [`fenced_apply`]);
/// `None` for every op it does not settle. A failed read settles nothing: those
/// ops go on under their locks, where a store that is down fails them properly.
async fn settle_released(
    shared: &Shared,
    ops: &[Command],
    reqs: &[RequestId],
    settle_first: &[bool],
) -> Vec<Option<OpResult>> {
    let inst = &*shared.inst;
    let mut out: Vec<Option<OpResult>> = vec![None; ops.len()];
    let asked: Vec<usize> = (0..ops.len())
        .filter(|&i| settle_first[i] && ops[i].fence.is_none() && ops[i].idempotency.is_none())
        .collect();
    if asked.is_empty() {
        return out;
    }
    let cmds = asked.iter().map(|&i| ops[i].clone()).collect();
    match shared.store.settled(cmds).await {
        Ok(answers) if answers.len() == asked.len() => {
            for (i, answer) in asked.into_iter().zip(answers) {
                if let Some(answer) = answer {
                    shared.stats.settled_after_wait.inc();
                    tracing::info!(
                        event = "settled_after_wait",
                        oid = ops[i].order_id().map(OrderId::as_str).unwrap_or(""),
                        req = reqs[i].as_str(),
                        inst
                    );
                    out[i] = Some(answer);
                }
            }
        }
        Ok(answers) => tracing::warn!(
            event = "settled_read_failed",
            detail = %format!("store answered {} of {} ops", answers.len(), asked.len()),
            inst
        ),
        Err(e) => tracing::warn!(event = "settled_read_failed", detail = %e, inst),
    }
    out
}

/// Applies a batch under the Redis locks of its orders, each op carrying its
/// order's fencing token. The locks are taken in one round trip that waits for
/// none of them: an order held by another instance is left out of this batch
/// (`None`) and the lane parks it until that holder releases it. Nothing here
/// holds a lock while waiting for another, so instances cannot deadlock. If
/// Redis cannot be reached, the batch is written without tokens: the database's
/// constraints still charge once.
async fn locked_apply(
    shared: Arc<Shared>,
    locks: Arc<RedisLocks>,
    ops: Vec<Command>,
    reqs: Vec<RequestId>,
) -> BatchDone {
    let inst = &*shared.inst;
    let mut orders: Vec<(OrderId, RequestId)> = Vec::new();
    for (op, req) in ops.iter().zip(&reqs) {
        if let Some(o) = op.order_id() {
            if !orders.iter().any(|(seen, _)| seen == o) {
                orders.push((o.clone(), req.clone()));
            }
        }
    }
    let sent = Instant::now();
    let names: Vec<&str> = orders.iter().map(|(o, _)| o.as_str()).collect();
    let grants = if names.is_empty() {
        Ok(Vec::new())
    } else {
        locks.try_acquire_many(&names).await
    };
    let mut tokens = std::collections::HashMap::new();
    let mut leases = Vec::new();
    let mut busy = Vec::new();
    match grants {
        Ok(grants) => {
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
                        tokens.insert(order.clone(), lease.token);
                        leases.push((order.clone(), req.clone(), lease));
                    }
                    Grant::Busy { left } => {
                        tracing::info!(
                            event = "lock_wait",
                            oid = order.as_str(),
                            holder_left_ms = left.as_millis() as u64,
                            req = req.as_str(),
                            inst
                        );
                        busy.push((order.clone(), left));
                    }
                }
            }
        }
        Err(e) => {
            for (order, req) in &orders {
                tracing::warn!(event = "lock_unavailable", oid = order.as_str(), detail = %e, req = req.as_str(), inst);
            }
        }
    }
    let results = apply_held(&shared, &locks, ops, &tokens, &leases, &busy).await;
    BatchDone {
        results,
        busy,
        sent,
    }
}

/// Gives every lease of a batch back in one round trip, logging each.
fn release_in_background(
    inst: Arc<str>,
    locks: Arc<RedisLocks>,
    leases: Vec<(OrderId, RequestId, crate::lock::Lease)>,
) {
    if leases.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let inst = &*inst;
        let held: Vec<crate::lock::Lease> = leases.iter().map(|(_, _, l)| l.clone()).collect();
        let released = locks.release_many(&held).await;
        for (i, (order, req, lease)) in leases.iter().enumerate() {
            match &released {
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
    });
}

/// Writes the ops whose orders are not busy (fenced where a token was granted),
/// then gives every lease back.
async fn apply_held(
    shared: &Shared,
    locks: &Arc<RedisLocks>,
    ops: Vec<Command>,
    tokens: &std::collections::HashMap<OrderId, i64>,
    leases: &[(OrderId, RequestId, crate::lock::Lease)],
    busy: &[(OrderId, Duration)],
) -> Vec<Option<LaneReply>> {
    if shared.cfg.failpoint_pause_after_lock_ms > 0 {
        tokio::time::sleep(Duration::from_millis(
            shared.cfg.failpoint_pause_after_lock_ms,
        ))
        .await;
    }
    // Locks held, nothing written (`exit` here strands the orders until the TTL).
    let injected = if leases.is_empty() {
        None
    } else {
        crate::failpoint::hit(crate::failpoint::AFTER_LOCK).await
    };
    let total = ops.len();
    let mut positions = Vec::with_capacity(total);
    let mut to_apply = Vec::with_capacity(total);
    for (i, op) in ops.into_iter().enumerate() {
        let order = op.order_id().cloned();
        if order
            .as_ref()
            .is_some_and(|o| busy.iter().any(|(b, _)| b == o))
        {
            continue;
        }
        positions.push(i);
        to_apply.push(match order.and_then(|o| tokens.get(&o).copied()) {
            Some(token) => op.fenced(token),
            None => op,
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
    // The answers go out without waiting for the release: it is one more round
    // trip, and a later request for one of these orders that finds its lock still
    // held waits for this very release's notification.
    release_in_background(shared.inst.clone(), locks.clone(), leases.to_vec());
    // Ops of busy orders stay `None` (they did not run, whatever the store said).
    let mut out: Vec<Option<LaneReply>> = (0..total).map(|_| None).collect();
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
    out
}
