//! A payguard instance: lanes that batch requests, and the lock protocol each
//! batch runs under.
//!
//! Requests are routed onto [`LANES`] lanes with payguard's own `lane_for`, and
//! each lane is driven by payguard's own `LaneCore` ([`lane`]): duplicates of an
//! op waiting or in flight join it (single flight), and a lane sends what has
//! queued up as one batch when none is in flight (group commit). What a batch
//! does is re-stated from the engine's `fenced_apply` ([`batch`]), under one of
//! two lock protocols ([`crate::config::LockProtocol`], [`locks`]):
//!
//! * `JoinAll`, payguard before issue #12: one waiting `acquire` per order, all
//!   at once, each holding its lock while the others wait; `LockBusy` (503) for an
//!   order whose lock stays held past the wait limit.
//! * `AcquireMany`, issue #12: one `ACQUIRE_MANY` round trip; busy orders park in
//!   their lane until the [`subscriber`] hears their release, or a fallback timer
//!   fires; `RELEASE_MANY` publishes releases that someone waits for.
//!
//! Either way: a missing epoch is taken from the database and raised in Redis;
//! if Redis cannot be reached the batch is written without tokens (the database
//! still charges once); a batch may stall past the TTL (the simulated GC pause)
//! before its fenced write. A crash of the host drops whatever was in flight,
//! parked or remembered; what survives is the instance's identity and RNG.

mod batch;
mod lane;
mod locks;
mod subscriber;

use crate::config::{
    LockProtocol, Protocol, DB_CALL_TIMEOUT_MS, LANES, LANE_QUEUE_DEPTH_MAX,
    REDIS_COMMAND_TIMEOUT_MS, RELEASE_NOTICES_MAX, RELEASE_NOTICE_KEEP_MS,
};
use crate::oracle::Oracle;
use crate::redis::RedisState;
use crate::wire::{
    call, now_ms, ApiReq, ApiResp, CallError, CallIds, DbReq, DbResp, RedisReq, RedisResp, Server,
    DB_HOST, DB_PORT, INSTANCE_PORT, REDIS_HOST, REDIS_PORT,
};
use payguard::domain::RequestId;
use payguard::engine::lane_for;
use rand::rngs::SmallRng;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Everything an instance keeps across restarts (its identity and its RNG stream)
/// plus the test's handles. A restart loses only what was in flight.
pub struct Instance {
    pub index: usize,
    pub protocol: Protocol,
    /// Percent of batches that stall before their write (0 in a calm seed).
    pub stall_percent: u32,
    /// Seeded from the run's seed: stalls are part of the replay.
    pub rng: RefCell<SmallRng>,
    /// Incremented at each (re)start, so owners stay unique across restarts.
    boots: Cell<u64>,
    /// Lock owners made (one per `ACQUIRE` or `ACQUIRE_MANY`).
    grants: Cell<u64>,
    /// Requests received, for their request ids.
    requests: Cell<u64>,
    ids: CallIds,
    /// Read only to tell the oracle whether a holder was live; never decides.
    pub redis_truth: Rc<RefCell<RedisState>>,
    pub oracle: Rc<RefCell<Oracle>>,
}

impl Instance {
    pub fn new(
        index: usize,
        protocol: Protocol,
        stall_percent: u32,
        rng: SmallRng,
        redis_truth: Rc<RefCell<RedisState>>,
        oracle: Rc<RefCell<Oracle>>,
    ) -> Self {
        Instance {
            index,
            protocol,
            stall_percent,
            rng: RefCell::new(rng),
            boots: Cell::new(0),
            grants: Cell::new(0),
            requests: Cell::new(0),
            ids: CallIds::default(),
            redis_truth,
            oracle,
        }
    }

    async fn redis(&self, req: RedisReq) -> Result<RedisResp, CallError> {
        let timeout = Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS);
        call(&self.ids, REDIS_HOST, REDIS_PORT, req, timeout).await
    }

    async fn db(&self, req: DbReq) -> Result<DbResp, CallError> {
        let timeout = Duration::from_millis(DB_CALL_TIMEOUT_MS);
        call(&self.ids, DB_HOST, DB_PORT, req, timeout).await
    }

    /// A lock owner no other grant has had (payguard: instance id + a counter).
    fn next_owner(&self) -> String {
        self.grants.set(self.grants.get() + 1);
        format!(
            "inst{}:{}-{}",
            self.index,
            self.boots.get(),
            self.grants.get()
        )
    }

    /// One line of the trace, prefixed with this instance.
    fn note(&self, line: impl FnOnce() -> String) {
        self.oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{}: {}", self.index, line()));
    }
}

/// One life of the process: its lanes' queues and wake-ups, and the release
/// notifications it heard. A crash loses all of it.
pub(crate) struct Node {
    inst: Rc<Instance>,
    /// Each lane's queue (bounded: a full one answers 503 `Overloaded`).
    lanes: Vec<mpsc::Sender<lane::Request>>,
    /// Each lane's wake-ups from the subscriber.
    wakes: Vec<lane::Wakes>,
    /// order → when its latest release notification arrived. Entries older than
    /// [`RELEASE_NOTICE_KEEP_MS`] are dropped, and never more than
    /// [`RELEASE_NOTICES_MAX`] are kept.
    notices: RefCell<BTreeMap<String, u64>>,
    /// When the subscription was last (re)made: any notification before it may
    /// have been lost.
    subscribed_ms: Cell<u64>,
}

impl Node {
    /// A release notification for `order` arrived: remember it and wake its lane.
    fn released(&self, order: &str) {
        let now = now_ms();
        let mut notices = self.notices.borrow_mut();
        notices.retain(|_, at| now - *at <= RELEASE_NOTICE_KEEP_MS);
        if notices.len() >= RELEASE_NOTICES_MAX {
            let oldest = notices
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(o, _)| o.clone());
            notices.remove(&oldest.expect("not empty"));
        }
        notices.insert(order.to_owned(), now);
        drop(notices);
        self.inst.oracle.borrow_mut().stats.notices += 1;
        self.inst.note(|| format!("hears {order} released"));
        self.wakes[lane_for(order, LANES)].wake(order);
    }

    /// Whether a release notification for `order` may have come at or after
    /// `since_ms`: one arrived, or the subscription was (re)made since (and one
    /// may have been lost before it).
    fn heard_since(&self, order: &str, since_ms: u64) -> bool {
        self.subscribed_ms.get() >= since_ms
            || self
                .notices
                .borrow()
                .get(order)
                .is_some_and(|&at| at >= since_ms)
    }

    /// The subscription was (re)made: notifications may have been lost before
    /// it, so every parked order is woken, and so is every order a batch in
    /// flight will park.
    fn subscribed(&self) {
        self.subscribed_ms.set(now_ms());
        for w in &self.wakes {
            w.wake_all();
        }
    }

    /// One deduct: queued in its order's lane, answered when its batch is done.
    async fn deduct(&self, order: &str) -> ApiResp {
        let inst = &self.inst;
        inst.requests.set(inst.requests.get() + 1);
        let req = RequestId::parse(&format!(
            "inst{}-{}-{}",
            inst.index,
            inst.boots.get(),
            inst.requests.get()
        ))
        .expect("request ids are well formed");
        let (reply, answer) = oneshot::channel();
        let request = lane::Request {
            order: order.to_owned(),
            req,
            reply,
        };
        if self.lanes[lane_for(order, LANES)]
            .try_send(request)
            .is_err()
        {
            return ApiResp::Overloaded;
        }
        // The lane answers every request it took, unless the host crashes.
        answer.await.unwrap_or(ApiResp::Unknown)
    }
}

/// Counts a deduct in flight until it ends, or until a crash drops it.
struct InFlight(Rc<RefCell<Oracle>>);

impl InFlight {
    fn new(oracle: Rc<RefCell<Oracle>>) -> Self {
        oracle.borrow_mut().in_flight += 1;
        InFlight(oracle)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.borrow_mut().in_flight -= 1;
    }
}

/// The instance host's software: its lanes, its subscriber (issue #12's
/// protocol), and one task per request.
pub async fn serve(inst: Rc<Instance>) -> turmoil::Result {
    inst.boots.set(inst.boots.get() + 1);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..LANES)
        .map(|_| mpsc::channel(LANE_QUEUE_DEPTH_MAX))
        .unzip();
    let node = Rc::new(Node {
        inst: inst.clone(),
        lanes: senders,
        wakes: (0..LANES).map(|_| lane::Wakes::default()).collect(),
        notices: RefCell::new(BTreeMap::new()),
        subscribed_ms: Cell::new(0),
    });
    for (index, rx) in receivers.into_iter().enumerate() {
        tokio::task::spawn_local(lane::run(node.clone(), index, rx));
    }
    if inst.protocol.lock == LockProtocol::AcquireMany {
        tokio::task::spawn_local(subscriber::run(node.clone()));
    }
    let server = Rc::new(Server::bind(INSTANCE_PORT).await?);
    loop {
        let req = server.recv::<ApiReq>().await?;
        let (node, server) = (node.clone(), server.clone());
        tokio::task::spawn_local(async move {
            let _counted = InFlight::new(node.inst.oracle.clone());
            let answer = node.deduct(&req.body.order).await;
            server.reply(&req, answer).await;
        });
    }
}
