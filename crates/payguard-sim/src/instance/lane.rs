//! A lane's owner task: payguard's own `LaneCore` (single flight, group
//! commit), driven the way the engine's `run_lane` drives it, plus issue #12's
//! parking of orders whose lock is held elsewhere.
//!
//! A parked order's requests keep waiting, and later requests for it join them.
//! It goes back into the lane's next batch when its release notification comes
//! (remembered by the [`Node`] if it came while the batch was still in flight),
//! when its retry time passes (min(holder's PTTL, [`RELEASE_WAIT_MS_MAX`]): a
//! lost notification, a dead holder), or when the instance re-subscribes. Parked
//! for [`LOCK_WAIT_MS_MAX`] in all, its requests get `LockBusy`.

use super::batch::{self, BatchOutcome, Park};
use super::Node;
use crate::config::{BATCH_ORDERS_MAX, BATCH_WAIT_MS, LOCK_WAIT_MS_MAX, RELEASE_WAIT_MS_MAX};
use crate::wire::{now_ms, ApiResp};
use payguard::domain::{OrderId, RequestId};
use payguard::engine::lane::{Delivery, LaneCore, LaneReply, Waiter};
use payguard::store::{Command, Op, Output, Rejection};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// Where a request's answer goes.
type Reply = oneshot::Sender<ApiResp>;

/// A deduct handed to its lane.
pub(super) struct Request {
    pub order: String,
    pub req: RequestId,
    pub reply: Reply,
}

/// Wake-ups for one lane's parked orders, set by the subscriber. Invariant:
/// `orders` only names orders of this lane; the lane empties it on every turn.
#[derive(Default)]
pub(super) struct Wakes {
    orders: RefCell<BTreeSet<String>>,
    all: Cell<bool>,
    notify: Notify,
}

impl Wakes {
    pub fn wake(&self, order: &str) {
        self.orders.borrow_mut().insert(order.to_owned());
        self.notify.notify_one();
    }

    pub fn wake_all(&self) {
        self.all.set(true);
        self.notify.notify_one();
    }
}

/// An order waiting for a lock held elsewhere, with every request for it.
struct Parked {
    cmd: Command,
    waiters: Vec<Waiter<Reply>>,
    /// When it first parked: its requests get `LockBusy` [`LOCK_WAIT_MS_MAX`] later.
    since_ms: u64,
    /// When it is retried without a notification.
    retry_ms: u64,
    /// A release notification (or a re-subscription) came: retry in the next batch.
    woken: bool,
}

struct Lane {
    node: Rc<Node>,
    index: usize,
    core: LaneCore<Reply>,
    parked: BTreeMap<String, Parked>,
    /// Orders back in the core after parking, and when they first parked (a
    /// re-park keeps that time). Emptied when their batch answers them.
    unparked: BTreeMap<String, u64>,
    /// When a batch that is not full goes out at the latest.
    due_ms: Option<u64>,
}

type InFlight = Pin<Box<dyn Future<Output = BatchOutcome>>>;

/// The lane owner: the only code that touches this lane's `LaneCore`.
pub(super) async fn run(node: Rc<Node>, index: usize, mut rx: mpsc::Receiver<Request>) {
    let mut lane = Lane {
        node,
        index,
        core: LaneCore::new(),
        parked: BTreeMap::new(),
        unparked: BTreeMap::new(),
        due_ms: None,
    };
    let mut inflight: Option<InFlight> = None;
    loop {
        lane.take_wakes();
        lane.expire();
        if inflight.is_none() {
            lane.unpark();
            inflight = lane.next_batch();
        }
        let timer = lane.next_timer(inflight.is_none());
        let node = lane.node.clone();
        tokio::select! {
            biased;
            outcome = async { inflight.as_mut().expect("guarded by if").await }, if inflight.is_some() => {
                inflight = None;
                lane.finish(outcome);
            }
            Some(req) = rx.recv() => lane.admit(req),
            () = node.wakes[index].notify.notified() => {}
            () = sleep_until_ms(timer.unwrap_or(0)), if timer.is_some() => {}
        }
    }
}

async fn sleep_until_ms(at_ms: u64) {
    // At least one tick, so a timer due now cannot spin the loop.
    let ms = at_ms.saturating_sub(now_ms()).max(1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Lane {
    fn admit(&mut self, r: Request) {
        if let Some(p) = self.parked.get_mut(&r.order) {
            // Later work on a parked order queues behind it (the simulation has
            // only deducts, so it joins it).
            p.waiters.push(Waiter {
                req: r.req,
                reply: r.reply,
            });
            return;
        }
        let order = OrderId::parse(&r.order).expect("order ids are well formed");
        self.core.submit(
            Command::from(Op::Deduct { order_id: order }),
            r.req,
            r.reply,
        );
    }

    fn take_wakes(&mut self) {
        let wakes = &self.node.wakes[self.index];
        let all = wakes.all.replace(false);
        let orders = std::mem::take(&mut *wakes.orders.borrow_mut());
        let mut woken = 0;
        for (order, p) in self.parked.iter_mut() {
            if !p.woken && (all || orders.contains(order)) {
                p.woken = true;
                woken += 1;
            }
        }
        if woken > 0 {
            let mut oracle = self.node.inst.oracle.borrow_mut();
            oracle.stats.woken += woken;
            if all {
                oracle.stats.resubscriptions += 1;
            }
        }
    }

    /// Answers `LockBusy` to every order parked for the wait limit.
    fn expire(&mut self) {
        let now = now_ms();
        let expired: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| now >= p.since_ms + LOCK_WAIT_MS_MAX)
            .map(|(o, _)| o.clone())
            .collect();
        for order in expired {
            let p = self.parked.remove(&order).expect("listed above");
            self.node
                .inst
                .note(|| format!("{order}: parked {} ms, LockBusy", now - p.since_ms));
            deliver(Delivery {
                cmd: p.cmd,
                reply: Ok(Err(Rejection::LockBusy)),
                waiters: p.waiters,
            });
        }
    }

    /// Puts every parked order that was woken, or whose retry time came, back
    /// into the core for the next batch.
    fn unpark(&mut self) {
        let now = now_ms();
        let ready: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| p.woken || now >= p.retry_ms)
            .map(|(o, _)| o.clone())
            .collect();
        for order in ready {
            let p = self.parked.remove(&order).expect("listed above");
            if !p.woken {
                self.node.inst.oracle.borrow_mut().stats.fallback_retries += 1;
            }
            self.unparked.insert(order, p.since_ms);
            for w in p.waiters {
                self.core.submit(p.cmd.clone(), w.req, w.reply);
            }
        }
    }

    /// The next batch, when one is due (group commit: it fills while the
    /// previous one is in flight, or for [`BATCH_WAIT_MS`] when idle).
    fn next_batch(&mut self) -> Option<InFlight> {
        if self.core.pending_len() == 0 {
            self.due_ms = None;
            return None;
        }
        let now = now_ms();
        let due = *self.due_ms.get_or_insert(now + BATCH_WAIT_MS);
        if self.core.pending_len() < BATCH_ORDERS_MAX && now < due {
            return None;
        }
        self.due_ms = None;
        let ops = self.core.take_batch(BATCH_ORDERS_MAX)?;
        Some(Box::pin(batch::run(self.node.clone(), ops)))
    }

    /// The earliest time the loop must look again without a message.
    fn next_timer(&self, idle: bool) -> Option<u64> {
        let expiries = self.parked.values().map(|p| p.since_ms + LOCK_WAIT_MS_MAX);
        let retries = self.parked.values().filter(|_| idle).map(|p| p.retry_ms);
        let due = self.due_ms.filter(|_| idle);
        expiries.chain(retries).chain(due).min()
    }

    /// Answers the batch's requests, except those of orders to park.
    fn finish(&mut self, outcome: BatchOutcome) {
        let mut parks: BTreeMap<String, Park> = outcome
            .parked
            .into_iter()
            .map(|p| (p.order.clone(), p))
            .collect();
        for d in self.core.complete(outcome.results) {
            let order = d
                .cmd
                .order_id()
                .expect("the simulation only deducts")
                .as_str()
                .to_owned();
            let since = self.unparked.remove(&order);
            match parks.remove(&order) {
                Some(park) => self.park(d, park, since),
                None => deliver(d),
            }
        }
    }

    fn park(&mut self, d: Delivery<Reply>, park: Park, since: Option<u64>) {
        let now = now_ms();
        let woken = self.node.heard_since(&park.order, park.acquire_sent_ms);
        let retry_ms = now + park.pttl_ms.min(RELEASE_WAIT_MS_MAX);
        self.node.inst.note(|| {
            format!(
                "{}: parked (holder's PTTL {} ms{})",
                park.order,
                park.pttl_ms,
                if woken { ", released meanwhile" } else { "" }
            )
        });
        self.parked.insert(
            park.order,
            Parked {
                cmd: d.cmd,
                waiters: d.waiters,
                since_ms: since.unwrap_or(now),
                retry_ms,
                woken,
            },
        );
    }
}

/// The engine's `deliver`: the first waiter gets the result, the others the
/// same result as a replay.
fn deliver(d: Delivery<Reply>) {
    let mut waiters = d.waiters.into_iter();
    if let Some(first) = waiters.next() {
        // The requester may be gone (its host answered nobody); the result stands.
        let _ = first.reply.send(answer(&d.reply));
    }
    for w in waiters {
        let replay = match &d.reply {
            Ok(Ok(out)) => Ok(Ok(out.as_replay())),
            other => other.clone(),
        };
        let _ = w.reply.send(answer(&replay));
    }
}

/// What payguard's HTTP API would answer for a lane's result.
fn answer(reply: &LaneReply) -> ApiResp {
    match reply {
        Ok(Ok(Output::Movement {
            entry, replayed, ..
        })) => {
            let entry = entry.id as u64;
            if *replayed {
                ApiResp::Replayed { entry }
            } else {
                ApiResp::Charged { entry }
            }
        }
        Ok(Err(Rejection::InsufficientFunds)) => ApiResp::InsufficientFunds,
        Ok(Err(Rejection::LockBusy)) => ApiResp::LockBusy,
        Ok(Err(Rejection::StaleFencingToken)) => ApiResp::StaleFencingToken,
        Ok(Err(Rejection::OrderNotFound)) => ApiResp::NoSuchOrder,
        Ok(other) => panic!("a deduct cannot end as {other:?}"),
        Err(_) => ApiResp::Unknown,
    }
}
