//! `--guard full`: the lane owner tasks. Each lane admits requests (single
//! flight), hands its waiting ops to the store as one batch when none is in
//! flight (group commit), parks the orders another instance holds until their
//! release, and answers every waiter. The state machine itself is
//! [`super::lane::LaneCore`]; this is its I/O.

use super::fenced::fenced_apply;
use super::lane::{self, LaneCore, LaneReply};
use super::{EngineError, Shared};
use crate::domain::{OrderId, RequestId};
use crate::store::{Command, Rejection};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What a lane answers a command: the batch's reply for its op, or an engine
/// refusal decided before the op reached the store (its deadline passed while
/// it queued).
pub(super) type Answer = Result<LaneReply, EngineError>;
pub(super) type Reply = oneshot::Sender<Answer>;

/// A request waiting in a lane's queue.
pub(super) struct Queued {
    pub(super) cmd: Command,
    pub(super) req: RequestId,
    pub(super) reply: Reply,
    /// Past this, the lane answers `TimedOut` instead of admitting the command:
    /// a timeout may only fire before a change reaches the store.
    pub(super) deadline: Option<Instant>,
}

/// A batch's answer as the lane sees it: `None` for an op that did not run
/// because another instance holds its order's lock (`busy` says which orders and
/// how long their holders' leases still run; `sent` is when the acquire that
/// found them busy was sent, on tokio's clock, which the simulation drives).
pub(super) struct BatchDone {
    pub(super) results: Vec<Option<LaneReply>>,
    pub(super) busy: Vec<(OrderId, Duration)>,
    pub(super) sent: tokio::time::Instant,
}

type BatchFuture = futures::future::BoxFuture<'static, BatchDone>;
/// Resolves to a parked order once its lock may be free.
type WakeFuture = futures::future::BoxFuture<'static, OrderId>;

/// The lane owner: the only code that touches this lane's [`LaneCore`].
pub(super) async fn run_lane(mut rx: mpsc::Receiver<Queued>, shared: Arc<Shared>) {
    use futures::StreamExt;
    let cfg = &shared.cfg;
    let batch_wait = Duration::from_micros(cfg.batch_wait_us);
    let mut core: LaneCore<Reply> = LaneCore::new();
    let mut inflight: Option<BatchFuture> = None;
    // Parked orders: woken by their holder's release (or its lease's end), and
    // when each was first found busy (to give up after the lock service's
    // `wait_max`: `LOCK_WAIT_MS_MAX` for Redis).
    let mut wakes: futures::stream::FuturesUnordered<WakeFuture> = Default::default();
    let mut first_busy: std::collections::HashMap<OrderId, tokio::time::Instant> =
        Default::default();
    // Unparked orders whose ops have not gone out in a batch since: their holder
    // just released them, so their ops are first asked of the committed state.
    let mut woken: std::collections::HashSet<OrderId> = Default::default();
    let mut open = true;
    let mut inflight_since = Instant::now();
    // When a non-full batch may go out at the latest.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if inflight.is_none() && core.pending_len() > 0 {
            let now = tokio::time::Instant::now();
            let due = *deadline.get_or_insert(now + batch_wait);
            if !open || core.pending_len() >= cfg.batch_max || now >= due {
                if let Some(ops) = core.take_batch(cfg.batch_max) {
                    shared.stats.batches.inc();
                    shared.stats.batched_ops.inc_by(ops.len() as u64);
                    shared.stats.batch_sizes.observe(ops.len() as f64);
                    inflight_since = Instant::now();
                    let settle_first: Vec<bool> = ops
                        .iter()
                        .map(|op| op.order_id().is_some_and(|o| woken.contains(o)))
                        .collect();
                    if settle_first.contains(&true) {
                        for op in &ops {
                            if let Some(o) = op.order_id() {
                                woken.remove(o);
                            }
                        }
                    }
                    inflight = Some(start_batch(
                        &shared,
                        ops,
                        core.inflight_reqs(),
                        settle_first,
                    ));
                }
                deadline = None;
            }
        }
        if !open && inflight.is_none() && core.pending_len() == 0 && core.parked_len() == 0 {
            debug_assert!(core.is_idle(), "a closed lane must end idle");
            return;
        }
        let can_take = open && core.pending_len() < cfg.batch_max;
        let wait_for = deadline.filter(|_| inflight.is_none());
        tokio::select! {
            biased;
            done = async { inflight.as_mut().expect("guarded by if").await }, if inflight.is_some() => {
                inflight = None;
                shared.stats.commit_seconds.observe(inflight_since.elapsed().as_secs_f64());
                let (deliveries, parked) = core.complete_partial(done.results);
                for delivery in deliveries {
                    if let Some(order) = delivery.cmd.order_id() {
                        first_busy.remove(order);
                    }
                    deliver(&shared, delivery);
                }
                for order in parked {
                    park(&shared, &mut core, &mut wakes, &mut first_busy, order, &done.busy, done.sent);
                }
            }
            Some(order) = wakes.next(), if !wakes.is_empty() => {
                if core.unpark(&order) {
                    woken.insert(order);
                }
            }
            queued = rx.recv(), if can_take => match queued {
                Some(queued) => {
                    admit(&shared, &mut core, queued);
                    // Take whatever else is already queued without another wake-up.
                    while core.pending_len() < cfg.batch_max {
                        match rx.try_recv() {
                            Ok(queued) => admit(&shared, &mut core, queued),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(wait_for.unwrap_or_else(tokio::time::Instant::now)), if wait_for.is_some() => {}
        }
    }
}

/// Hands a batch to the store: straight, or under the Redis locks of its orders
/// (`settle_first` marks the ops of orders just released by another instance).
fn start_batch(
    shared: &Arc<Shared>,
    ops: Vec<Command>,
    reqs: Vec<RequestId>,
    settle_first: Vec<bool>,
) -> BatchFuture {
    match &shared.redis {
        None => {
            let n = ops.len();
            let applying = shared.store.apply(ops);
            Box::pin(async move {
                BatchDone {
                    results: match applying.await {
                        Ok(r) => r.into_iter().map(|r| Some(Ok(r))).collect(),
                        Err(e) => (0..n).map(|_| Some(Err(e.clone()))).collect(),
                    },
                    busy: Vec::new(),
                    sent: tokio::time::Instant::now(),
                }
            })
        }
        Some(locks) => Box::pin(fenced_apply(
            shared.clone(),
            locks.clone(),
            ops,
            reqs,
            settle_first,
        )),
    }
}

/// An order another instance holds waits for its release, or is answered 503
/// once it has waited the lock service's `wait_max` in all (nothing of it moved).
fn park(
    shared: &Arc<Shared>,
    core: &mut LaneCore<Reply>,
    wakes: &mut futures::stream::FuturesUnordered<WakeFuture>,
    first_busy: &mut std::collections::HashMap<OrderId, tokio::time::Instant>,
    order: OrderId,
    busy: &[(OrderId, Duration)],
    sent: tokio::time::Instant,
) {
    let since = *first_busy.entry(order.clone()).or_insert(sent);
    let waited = since.elapsed();
    let wait_max = shared.redis.as_ref().map_or(
        Duration::from_millis(crate::lock::LOCK_WAIT_MS_MAX),
        |locks| locks.wait_max(),
    );
    let locks = match &shared.redis {
        Some(locks) if waited < wait_max => locks.clone(),
        _ => {
            tracing::warn!(
                event = "lock_busy",
                oid = order.as_str(),
                waited_ms = waited.as_millis() as u64,
                inst = &*shared.inst
            );
            first_busy.remove(&order);
            for delivery in core.give_up(&order, Ok(Err(Rejection::LockBusy))) {
                deliver(shared, delivery);
            }
            return;
        }
    };
    let left = busy
        .iter()
        .find(|(o, _)| *o == order)
        .map_or(Duration::ZERO, |(_, left)| *left)
        .min(wait_max - waited);
    wakes.push(Box::pin(async move {
        locks.released(order.as_str(), sent, left).await;
        order
    }));
}

fn admit(shared: &Shared, core: &mut LaneCore<Reply>, queued: Queued) {
    if queued.deadline.is_some_and(|d| Instant::now() >= d) {
        // Nothing of it reached the store: the caller may retry safely. A
        // timeout, not a store failure (the store was never asked).
        let _ = queued.reply.send(Err(EngineError::TimedOut));
        return;
    }
    let oid = queued.cmd.order_id().cloned();
    let req = queued.req.clone();
    let admission = core.submit(queued.cmd, queued.req, queued.reply);
    if admission.joined {
        shared.stats.joined.inc();
    }
    if let (Some(other), Some(oid)) = (admission.other_req, oid) {
        shared.stats.collisions.inc();
        tracing::warn!(
            event = "concurrent_inflight",
            oid = oid.as_str(),
            req = req.as_str(),
            other_req = other.as_str(),
            inst = shared.cfg.instance_id.as_str()
        );
    }
}

fn deliver(shared: &Shared, delivery: lane::Delivery<Reply>) {
    match (&delivery.reply, delivery.waiters.first()) {
        (Ok(Ok(out)), Some(first)) if out.order().is_some() => {
            let order = out.order().expect("checked by the guard");
            shared.cache.committed(order, out.entry());
            tracing::info!(
                event = "order_cache_set",
                oid = order.id.as_str(),
                status = order.status.as_str(),
                req = first.req.as_str(),
                inst = shared.cfg.instance_id.as_str()
            );
        }
        _ => {
            if let Some(oid) = delivery.cmd.order_id() {
                shared.cache.forget(oid);
            }
        }
    }
    let mut waiters = delivery.waiters.into_iter();
    if let Some(first) = waiters.next() {
        // The receiver may have gone (client disconnected); the result stands anyway.
        let _ = first.reply.send(Ok(delivery.reply.clone()));
    }
    for w in waiters {
        if super::mutants::armed(super::mutants::Mutant::LaneForgetsWaiter) {
            // The deliberate bug: this duplicate is never answered.
            std::mem::forget(w);
            continue;
        }
        let replay = match &delivery.reply {
            Ok(Ok(out)) => Ok(Ok(out.as_replay())),
            other => other.clone(),
        };
        let _ = w.reply.send(Ok(replay));
    }
}
