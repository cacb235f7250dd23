//! One payguard instance: payguard's own [`Engine`] (`--guard full`, lanes,
//! single flight, group commit, the fenced batch path) over the simulated
//! store and lock service, behind a tiny API that answers deducts as the HTTP
//! layer would.
//!
//! Why this thin: everything that decides is the engine's. This host only
//! builds it the way `payguard-server`'s composition root does
//! (`Engine::start_with_order_locks`, with the store's fence epochs), maps an
//! engine result to the status a client would see, and starts the network
//! agent and the release subscriber. A crash drops the host's runtime and with
//! it the engine, its lanes and every request in flight; a restart builds a new
//! one (a new boot: new lock owners and transaction ids). With two-phase
//! payments, every instance also runs payguard's expiry sweeper
//! (`payguard::engine::sweeper::run_on_clock`, the loop `payguard-server`
//! spawns, on the simulated clock), so several sweep at once. With
//! `Protocol::webhooks`, every instance also runs payguard's webhook delivery
//! loop (`payguard::outbox::delivery`, what `payguard-server` starts), its
//! attempts sent to the simulated receiver ([`crate::hooks`]).

use crate::config::{BATCH_MAX, BATCH_WAIT_US, LANES, LANE_QUEUE_DEPTH_MAX, SWEEP_INTERVAL_MS};
use crate::db::DbState;
use crate::hooks;
use crate::keys;
use crate::locks::{JoinAll, SimLocks};
use crate::oracle::OracleRef;
use crate::redis::SharedRedis;
use crate::store::{Host, SimStore};
use crate::wire::{now_ms, Agent, ApiReq, ApiResp, Ask, Incoming, Post, Server, INSTANCE_PORT};
use crate::{LockProtocol, Protocol};
use payguard::domain::{Money, OrderId, RefundId, RequestId};
use payguard::engine::{Engine, EngineConfig, EngineError, Guard};
use payguard::lock::OrderLocks;
use payguard::outbox::delivery::Delivery;
use payguard::store::{Op, Output, Rejection, Store, StoreError};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// What an instance host is built from; survives its crashes.
pub struct Instance {
    pub index: usize,
    pub protocol: Protocol,
    pub stall_percent: u32,
    /// How far this instance's clock is off the simulated one (ms).
    pub clock_offset_ms: i64,
    /// Seeds the store's RNG at each boot.
    pub rng_seed: u64,
    pub post: Post,
    pub db: Arc<Mutex<DbState>>,
    /// Redis as it is, for the oracle's live-holder check only.
    pub redis_truth: SharedRedis,
    pub oracle: OracleRef,
    /// How many times the host's software started.
    pub boots: Cell<u64>,
}

/// The engine's answer as the HTTP layer would map it.
pub(crate) fn api_answer(result: &Result<Output, EngineError>) -> ApiResp {
    match result {
        Ok(Output::Movement {
            entry,
            replayed: false,
            ..
        }) => ApiResp::Charged { entry: entry.id },
        Ok(Output::Movement {
            entry,
            replayed: true,
            ..
        }) => ApiResp::Replayed { entry: entry.id },
        Ok(_) => ApiResp::Refused,
        Err(EngineError::Rejected(r)) => match r {
            Rejection::InsufficientFunds => ApiResp::InsufficientFunds,
            Rejection::LockBusy => ApiResp::LockBusy,
            Rejection::StaleFencingToken => ApiResp::StaleFencingToken,
            Rejection::OrderNotFound => ApiResp::NoSuchOrder,
            Rejection::OrderNotPaid
            | Rejection::RefundExceedsPaid
            | Rejection::OrderNotAuthorized
            | Rejection::OrderAuthorized
            | Rejection::CaptureExceedsHold
            | Rejection::HoldAlreadyCaptured
            | Rejection::HoldVoided
            | Rejection::HoldExpired
            | Rejection::HoldLapsed => ApiResp::Conflict { reason: r.reason() },
            // The keyed sequence answers the key's stored response instead:
            // reaching a client is a bug the oracle must see.
            Rejection::KeyAnswered => ApiResp::Refused,
            _ => ApiResp::Refused,
        },
        Err(EngineError::Store(StoreError::Unknown(_))) => ApiResp::Unknown,
        Err(
            EngineError::Store(_)
            | EngineError::Overloaded
            | EngineError::TimedOut
            | EngineError::ShuttingDown,
        ) => ApiResp::Unavailable,
    }
}

/// Counts a deduct as in flight until it is answered or its host crashes.
struct InFlight(OracleRef);

impl InFlight {
    fn new(oracle: OracleRef) -> Self {
        oracle.borrow_mut().in_flight += 1;
        InFlight(oracle)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.borrow_mut().in_flight -= 1;
    }
}

/// The engine op a client's request becomes (as payguard's routes build it).
fn op_of(order: &str, ask: &Ask) -> Op {
    let order_id = OrderId::parse(order).expect("order ids are well formed");
    let money = |m: i64| Money::amount(m).expect("amounts are positive");
    match ask {
        Ask::Deduct => Op::Deduct { order_id },
        Ask::Refund { id, amount } => Op::Refund {
            order_id,
            refund_id: RefundId::parse(id).expect("refund ids are well formed"),
            amount: money(*amount),
        },
        Ask::Authorize { hold_ttl_ms } => Op::Authorize {
            order_id,
            hold_ttl_ms: *hold_ttl_ms,
        },
        Ask::Capture { amount } => Op::Capture {
            order_id,
            amount: amount.map(money),
        },
        Ask::Void => Op::Void { order_id },
    }
}

async fn handle(
    inst: usize,
    clock_offset_ms: i64,
    engine: Arc<Engine>,
    server: Rc<Server>,
    req: Incoming,
    n: u64,
    oracle: OracleRef,
) {
    let Some(ApiReq { order, ask, key }) = req.body.downcast_ref::<ApiReq>().cloned() else {
        return;
    };
    let _in_flight = InFlight::new(oracle.clone());
    let rid = RequestId::parse(&format!("inst{inst}-{n}")).expect("well formed");
    let op = op_of(&order, &ask);
    let answer = match key {
        // As payguard-server's routes: under the key when one is sent.
        Some(key) => keys::submit(&engine, key, op, rid, clock_offset_ms, &oracle).await,
        None => api_answer(&engine.submit(op, rid).await),
    };
    oracle.borrow_mut().note(now_ms(), || {
        format!("inst{inst}: {ask} {order} -> {answer:?}")
    });
    server.reply(&req, Box::new(answer)).await;
}

/// The instance host's software.
pub async fn serve(me: Rc<Instance>) -> turmoil::Result {
    let boot = me.boots.get();
    me.boots.set(boot + 1);
    let net = Agent::start(me.post.clone());
    let rng = SmallRng::seed_from_u64(me.rng_seed ^ boot);
    let store: Arc<dyn Store> = Arc::new(SimStore::new(
        me.index,
        boot,
        net.clone(),
        me.db.clone(),
        Host {
            stall_percent: me.stall_percent,
            clock_offset_ms: me.clock_offset_ms,
            keys_over_network: me.protocol.keys_over_network,
        },
        rng,
        me.oracle.clone(),
    ));
    let hooks_net = net.clone();
    let real = SimLocks::start(
        me.index,
        boot,
        me.post.clone(),
        net,
        payguard::engine::fence_epochs(store.clone()),
        me.protocol.script_swap,
        me.redis_truth.clone(),
        me.oracle.clone(),
    );
    let locks: Arc<dyn OrderLocks> = match me.protocol.lock {
        LockProtocol::AcquireMany => real,
        LockProtocol::JoinAll => Arc::new(JoinAll { inner: real }),
    };
    let cfg = EngineConfig {
        guard: Guard::Full,
        lanes: LANES,
        batch_max: BATCH_MAX,
        batch_wait_us: BATCH_WAIT_US,
        lane_queue_depth_max: LANE_QUEUE_DEPTH_MAX,
        // Several instances write the same orders (as on PostgreSQL).
        order_cache_entries_max: 0,
        instance_id: format!("inst{}", me.index),
        failpoint_pause_after_lock_ms: 0,
    };
    let engine = Arc::new(Engine::start_with_order_locks(
        store.clone(),
        cfg,
        Some(locks),
    ));
    // payguard's webhook delivery loop, as `payguard-server` starts it, with
    // the simulation's attempt and scaled settings; it dies with the host.
    let _delivery = me.protocol.webhooks.then(|| {
        let owner = format!("inst{}", me.index);
        let deliver = hooks::SimDeliver {
            net: hooks_net,
            owner: owner.clone(),
            oracle: me.oracle.clone(),
        };
        Delivery::start(
            store,
            hooks::settings(me.clock_offset_ms),
            owner,
            std::future::ready(Some(deliver)),
        )
    });
    if me.protocol.two_phase {
        // payguard's own sweeper loop, as `payguard-server` spawns it, on the
        // instance's simulated clock; dropped with the host when it crashes.
        let offset = me.clock_offset_ms;
        tokio::spawn(payguard::engine::sweeper::run_on_clock(
            engine.clone(),
            std::time::Duration::from_millis(SWEEP_INTERVAL_MS),
            move || now_ms() as i64 + offset,
        ));
    }
    let server = Rc::new(Server::bind(me.post.clone(), INSTANCE_PORT).await?);
    let mut n = 0;
    loop {
        let req = server.recv().await?;
        n += 1;
        tokio::task::spawn_local(handle(
            me.index,
            me.clock_offset_ms,
            engine.clone(),
            server.clone(),
            req,
            n,
            me.oracle.clone(),
        ));
    }
}
