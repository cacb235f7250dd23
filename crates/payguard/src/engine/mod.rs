//! The engine: every write goes through a lane, and every lane through the store.
//!
//! ```text
//! request ─► Engine::submit ─► lane_for(order id) ─► lane owner task ─► Store::apply
//!                                  (bounded queue)     (single flight,     (one txn per
//!                                                       group commit)       batch)
//! ```
//!
//! * Order ids are hashed onto `lanes` lanes; each has exactly one owner task, so
//!   all work on one order runs in arrival order, never two at once.
//! * A duplicate of an op already waiting or in flight shares its result instead
//!   of running again (single flight); the first caller sees `replayed: false`,
//!   the others `replayed: true` with the same entry.
//! * A lane commits what has queued up as one batch (group commit, bounded by
//!   `batch_max` and `batch_wait_us`); one rejected op never aborts its batch.
//! * Lane queues are bounded: when full, a request fails fast with
//!   [`EngineError::Overloaded`] (HTTP 503) and nothing moves.
//!
//! None of this is what prevents a double charge — the store's constraints are —
//! but it keeps duplicates from ever reaching the store at the same time, and it
//! turns many small transactions into few large ones.

mod fenced;
mod full;
pub mod keyed;
pub mod lane;
// The deliberate bugs live at the crate root ([`crate::mutants`]): the lock
// client and the store's commit-fate loop have some too, and a lower layer
// never imports a higher one; this path is the one the simulation has always armed.
pub use crate::mutants;
mod naive;
mod outcome;
pub mod router;
mod seed;
pub mod sweeper;

use crate::cache::OrderCache;
use crate::domain::{Account, AccountId, AuditReport, Entry, Order, OrderId, RequestId};
use crate::lock::redis::RedisLocks;
use crate::lock::{LocalLocks, OrderLocks};
use crate::store::sqlite::naive::NaiveSqlite;
use crate::store::{Command, Op, Output, Rejection, Store, StoreError, StoreFuture};
use full::{run_lane, Queued};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use router::lane_for;

/// How a money movement is protected (`payguard serve --guard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// payguard: lanes, single flight, group commit, database constraints.
    Full,
    /// The write-up's fix as written: a per-order lock (`lock:order:{id}`, 30 s TTL)
    /// and one transaction per request that re-reads the order under the write
    /// lock. Correct; one request at a time, no batching; the speed baseline.
    Seed,
    /// The incident, reproduced on a naive database: check in memory, pause, act.
    /// It double charges.
    Naive { gap_ms: u64 },
}

impl Guard {
    pub fn name(self) -> &'static str {
        match self {
            Guard::Full => "full",
            Guard::Seed => "seed",
            Guard::Naive { .. } => "naive",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub guard: Guard,
    /// Number of lanes (owner tasks).
    pub lanes: usize,
    /// Most distinct ops a lane puts in one batch.
    pub batch_max: usize,
    /// How long a lane waits for more work before committing a batch that is not
    /// full, counted from when it could send one (no batch of its own in
    /// flight): ops that queued behind a batch in flight wait this window again
    /// once it ends. Sending them at once instead was measured no faster
    /// (BENCHMARKS.md, http, "Fourth session").
    pub batch_wait_us: u64,
    /// Requests that may queue in one lane before new ones get 503.
    pub lane_queue_depth_max: usize,
    /// Orders kept in the read cache (0: no cache).
    pub order_cache_entries_max: usize,
    /// This instance's id, the `inst` of every log event.
    pub instance_id: String,
    /// Fault injection for tests: sleep this long after taking a batch's locks
    /// and before writing (a GC pause, a SIGSTOP). 0 in production.
    pub failpoint_pause_after_lock_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            guard: Guard::Full,
            lanes: 16,
            batch_max: 256,
            batch_wait_us: 100,
            lane_queue_depth_max: 4096,
            order_cache_entries_max: crate::cache::ORDER_CACHE_ENTRIES_MAX,
            instance_id: String::from("payguard"),
            failpoint_pause_after_lock_ms: 0,
        }
    }
}

/// Why a request did not get a result. Every variant means nothing moved, except
/// `Rejected`, which is the store's definite answer (and also moved nothing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("lane queue is full")]
    Overloaded,
    /// The request's deadline passed before its change reached the store.
    #[error("timed out before reaching the store")]
    TimedOut,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Bucket bounds of the lane batch-size histogram (ops per batch).
const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
/// Bucket bounds of the store commit latency histogram (seconds).
const COMMIT_SECONDS_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Counters and histograms since start: `/metrics` registers them, benchmarks and
/// tests read them. Each is lock-free (prometheus-client atomics).
#[derive(Debug)]
pub struct EngineStats {
    /// Ops that changed something (first executions).
    pub committed: Counter,
    /// Ops answered with an earlier result (duplicates, replays).
    pub replayed: Counter,
    /// Ops refused with a definite answer (402, 404, 409).
    pub rejected: Counter,
    /// Requests refused because a lane queue was full.
    pub overloaded: Counter,
    /// Requests that failed with nothing moved (store down, timeout, shutdown).
    pub store_failures: Counter,
    /// Race sentinel: a request for an order already in flight.
    pub collisions: Counter,
    /// Single flight: a duplicate that shared an in-flight op's result.
    pub joined: Counter,
    /// Ops answered from the committed state without taking their order's lock
    /// (`--redis`: the order was just released, or a recent holder left its
    /// settled hint; `Store::settled`).
    pub settled_without_lock: Counter,
    /// Duplicate deducts of paid orders answered from the order cache by the
    /// rules, without a lane or a transaction (see `Engine::paid_replay`).
    pub cached_replays: Counter,
    /// Two-phase steps this instance committed (first executions): holds made,
    /// captured, voided, expired by its sweeper.
    pub holds_authorized: Counter,
    pub holds_captured: Counter,
    pub holds_voided: Counter,
    pub holds_expired: Counter,
    pub batches: Counter,
    pub batched_ops: Counter,
    /// Ops per lane batch.
    pub batch_sizes: Histogram,
    /// Time from handing a batch to the store to its commit (or failure).
    pub commit_seconds: Histogram,
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            committed: Counter::default(),
            replayed: Counter::default(),
            rejected: Counter::default(),
            overloaded: Counter::default(),
            store_failures: Counter::default(),
            collisions: Counter::default(),
            joined: Counter::default(),
            settled_without_lock: Counter::default(),
            cached_replays: Counter::default(),
            holds_authorized: Counter::default(),
            holds_captured: Counter::default(),
            holds_voided: Counter::default(),
            holds_expired: Counter::default(),
            batches: Counter::default(),
            batched_ops: Counter::default(),
            batch_sizes: Histogram::new(BATCH_SIZE_BUCKETS),
            commit_seconds: Histogram::new(COMMIT_SECONDS_BUCKETS),
        }
    }
}

impl EngineStats {
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }
}

struct Shared {
    store: Arc<dyn Store>,
    /// Cross-instance per-order locks with fencing tokens (`--redis`; the
    /// simulation's lock service in `crates/payguard-sim`).
    redis: Option<Arc<dyn OrderLocks>>,
    /// The incident's code path (`--guard naive`): only on a naive SQLite file,
    /// only when started with [`Engine::start_naive`].
    naive: Option<NaiveSqlite>,
    cache: OrderCache,
    stats: EngineStats,
    cfg: EngineConfig,
    inst: Arc<str>,
}

pub struct Engine {
    shared: Arc<Shared>,
    /// One bounded queue per lane (`full` only); emptied by `shutdown`, which closes the lanes.
    lanes: RwLock<Vec<mpsc::Sender<Queued>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// False once `shutdown` began: new requests get 503.
    open: std::sync::atomic::AtomicBool,
    /// `seed`'s per-order locks.
    locks: LocalLocks,
    /// Race sentinel outside lanes (`seed`, `naive`): order → (first request, count).
    inflight: scc::HashMap<OrderId, (RequestId, usize)>,
}

/// The fencing epochs the Redis lock draws after a flush: the store's sequence,
/// which only grows. The engine composes the two layers; neither knows the other.
pub fn fence_epochs(store: Arc<dyn Store>) -> crate::lock::redis::EpochSource {
    Arc::new(move || {
        let next = store.next_fence_epoch();
        Box::pin(async move { next.await.map_err(|e| e.to_string()) })
    })
}

impl Engine {
    /// Starts the lane owner tasks on the current tokio runtime.
    pub fn start(store: Arc<dyn Store>, cfg: EngineConfig) -> Self {
        Self::start_with_locks(store, cfg, None)
    }

    /// Like [`Engine::start`], with Redis locks: each batch takes the lock of
    /// every order in it and writes with the fencing tokens.
    pub fn start_with_locks(
        store: Arc<dyn Store>,
        cfg: EngineConfig,
        redis: Option<Arc<RedisLocks>>,
    ) -> Self {
        Self::start_with_order_locks(store, cfg, redis.map(|r| r as Arc<dyn OrderLocks>))
    }

    /// Like [`Engine::start_with_locks`], over any lock service: the
    /// deterministic simulation runs the engine over its simulated one.
    pub fn start_with_order_locks(
        store: Arc<dyn Store>,
        cfg: EngineConfig,
        locks: Option<Arc<dyn OrderLocks>>,
    ) -> Self {
        Self::build(store, cfg, locks, None)
    }

    /// `--guard naive` (`cfg.guard` must say so): the incident reproduced on a
    /// naive SQLite database, for the demo. Every other way to start the engine
    /// answers a naive guard's requests with a schema error: the naive path exists
    /// only beside the SQLite store.
    pub fn start_naive(
        naive: NaiveSqlite,
        cfg: EngineConfig,
        redis: Option<Arc<RedisLocks>>,
    ) -> Self {
        assert!(
            matches!(cfg.guard, Guard::Naive { .. }),
            "Engine::start_naive needs cfg.guard = Guard::Naive"
        );
        let store: Arc<dyn Store> = Arc::new(naive.store().clone());
        let redis = redis.map(|r| r as Arc<dyn OrderLocks>);
        Self::build(store, cfg, redis, Some(naive))
    }

    fn build(
        store: Arc<dyn Store>,
        mut cfg: EngineConfig,
        redis: Option<Arc<dyn OrderLocks>>,
        naive: Option<NaiveSqlite>,
    ) -> Self {
        if store.kind() == "postgres" && cfg.order_cache_entries_max > 0 {
            // Other instances write the same orders: a per-instance read cache
            // would serve their changes late. Reads go to PostgreSQL instead. Here,
            // so that every assembly of an engine (serve, tests, benches) obeys it.
            cfg.order_cache_entries_max = 0;
            tracing::info!(
                event = "order_cache_disabled",
                reason = "shared PostgreSQL store",
                inst = cfg.instance_id.as_str()
            );
        }
        assert!(cfg.lanes > 0, "lanes must be > 0");
        assert!(cfg.batch_max > 0, "batch_max must be > 0");
        assert!(
            cfg.lane_queue_depth_max > 0,
            "lane_queue_depth_max must be > 0"
        );
        let shared = Arc::new(Shared {
            store,
            redis,
            naive,
            cache: OrderCache::new(cfg.order_cache_entries_max),
            stats: EngineStats::default(),
            cfg: cfg.clone(),
            inst: Arc::from(cfg.instance_id.as_str()),
        });
        let lanes = if cfg.guard == Guard::Full {
            cfg.lanes
        } else {
            0
        };
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = mpsc::channel(cfg.lane_queue_depth_max);
            senders.push(tx);
            tasks.push(tokio::spawn(run_lane(rx, shared.clone())));
        }
        Engine {
            shared,
            lanes: RwLock::new(senders),
            tasks: std::sync::Mutex::new(tasks),
            open: std::sync::atomic::AtomicBool::new(true),
            locks: LocalLocks::default(),
            inflight: scc::HashMap::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// `redis` when batches take cross-instance locks, else `local`.
    pub fn lock_kind(&self) -> &'static str {
        if self.shared.redis.is_some() {
            "redis"
        } else {
            "local"
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Requests waiting in each lane's queue (`full` only).
    pub fn lane_depths(&self) -> Vec<usize> {
        self.lanes
            .read()
            .map(|lanes| {
                lanes
                    .iter()
                    .map(|l| l.max_capacity() - l.capacity())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Runs `cmd` (an [`Op`], or a [`Command`] with an Idempotency-Key record)
    /// exactly once per distinct request, logging the events of LOGS.md for money
    /// movements.
    pub async fn submit(
        &self,
        cmd: impl Into<Command>,
        req: RequestId,
    ) -> Result<Output, EngineError> {
        self.submit_by(cmd, req, None).await
    }

    /// Like [`Engine::submit`], but gives up with [`EngineError::TimedOut`] if the
    /// op has not been handed to the store by `deadline`. Once it has, the request
    /// waits for the outcome, however long: an answer after the change is the only
    /// honest one.
    pub async fn submit_by(
        &self,
        cmd: impl Into<Command>,
        req: RequestId,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        let cmd: Command = cmd.into();
        let started = Instant::now();
        let family = cmd.family();
        let inst = self.shared.cfg.instance_id.as_str();
        let oid = cmd.order_id().map(OrderId::as_str).unwrap_or("");
        let moves_money = family != "create";
        if moves_money {
            tracing::info!(
                event = event_name(family, "start"),
                oid,
                req = req.as_str(),
                inst
            );
        }
        let result = if !self.open.load(Ordering::Acquire) {
            Err(EngineError::ShuttingDown)
        } else {
            match self.shared.cfg.guard {
                Guard::Full => match self.paid_replay(&cmd) {
                    Some(out) => Ok(out),
                    None => self.dispatch(cmd.clone(), req.clone(), deadline).await,
                },
                Guard::Seed => self.seed(cmd.clone(), req.clone(), deadline).await,
                Guard::Naive { gap_ms } => self.naive(cmd.clone(), req.clone(), gap_ms).await,
            }
        };
        outcome::count(&self.shared.stats, family, &result);
        if moves_money {
            outcome::log(family, oid, req.as_str(), inst, &result, started);
        }
        result
    }

    /// A duplicate deduct of an order this process saw paid, answered by the
    /// rules from the cached order and its debit entry: no lane, transaction or
    /// lock (issue #16: a replay cost as much as a first charge). Nothing moves
    /// on it, and what it says cannot change: a paid order's debit link and the
    /// entry itself are immutable in the schema, and the order's status never
    /// leaves the paid states. The order's refund columns are this process's
    /// last commit of them, as a GET's are. Anything the rules would not answer
    /// as a replay from this state (a fenced or keyed command, any other op) goes
    /// to its lane as before.
    fn paid_replay(&self, cmd: &Command) -> Option<Output> {
        let Op::Deduct { order_id } = &cmd.op else {
            return None;
        };
        if !cmd.is_plain() {
            return None;
        }
        let (order, debit) = self.shared.cache.paid(order_id)?;
        let rows = crate::store::rules::Rows {
            order: Some(order),
            debit: Some(debit),
            ..Default::default()
        };
        let now = chrono::Utc::now().timestamp_millis();
        match crate::store::rules::settled(cmd, &rows.seen(), now) {
            Ok(Some(Ok(out))) if out.is_replay() => {
                self.shared.stats.cached_replays.inc();
                Some(out)
            }
            _ => None,
        }
    }

    async fn dispatch(
        &self,
        cmd: Command,
        req: RequestId,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        let (reply, rx) = oneshot::channel();
        {
            let lanes = self.lanes.read().map_err(|_| EngineError::ShuttingDown)?;
            if lanes.is_empty() {
                return Err(EngineError::ShuttingDown);
            }
            let lane = lane_for(cmd.route_key(), lanes.len());
            lanes[lane]
                .try_send(Queued {
                    cmd,
                    req,
                    reply,
                    deadline,
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => EngineError::Overloaded,
                    mpsc::error::TrySendError::Closed(_) => EngineError::ShuttingDown,
                })?;
        }
        // Once queued, the request waits for its outcome: the lane answers every
        // command it accepted, even while shutting down. A lane that stopped
        // without answering (it panicked) may have had the op's batch committed:
        // the outcome is unknown (500), never "nothing moved" (503).
        let answer = rx.await.map_err(|_| {
            EngineError::Store(StoreError::Unknown(
                "the lane stopped without answering; the op may have been committed".into(),
            ))
        })?;
        Ok(answer???)
    }

    /// The order as last committed: from the cache if this instance wrote it since
    /// start, else from the store.
    pub async fn order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        if let Some(order) = self.shared.cache.get(&id) {
            return Ok(Some(order));
        }
        self.shared.store.order(id).await
    }

    pub fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        self.shared.store.account(id)
    }

    pub fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        self.shared.store.entries(order_id)
    }

    pub fn audit(&self) -> StoreFuture<AuditReport> {
        self.shared.store.audit()
    }

    /// Stops taking requests, lets every lane finish (commit or fail) all it
    /// accepted, then closes the store. Safe to call more than once.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.open.store(false, Ordering::Release);
        if let Ok(mut lanes) = self.lanes.write() {
            lanes.clear();
        }
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(event = "lane_panicked", detail = %e);
            }
        }
        self.shared.store.close().await
    }
}

/// The LOGS.md event of `family`'s `step` (`<family>_<step>`; an expiry's commit
/// is `hold_expired`).
fn event_name(family: &'static str, step: &'static str) -> &'static str {
    match (family, step) {
        ("deduct", "start") => "deduct_start",
        ("deduct", "commit") => "deduct_commit",
        ("deduct", "replay") => "deduct_replay",
        ("deduct", "rejected") => "deduct_rejected",
        ("deduct", "end") => "deduct_end",
        ("refund", "start") => "refund_start",
        ("refund", "commit") => "refund_commit",
        ("refund", "replay") => "refund_replay",
        ("refund", "rejected") => "refund_rejected",
        ("refund", "end") => "refund_end",
        ("authorize", "start") => "authorize_start",
        ("authorize", "commit") => "authorize_commit",
        ("authorize", "replay") => "authorize_replay",
        ("authorize", "rejected") => "authorize_rejected",
        ("authorize", "end") => "authorize_end",
        ("capture", "start") => "capture_start",
        ("capture", "commit") => "capture_commit",
        ("capture", "replay") => "capture_replay",
        ("capture", "rejected") => "capture_rejected",
        ("capture", "end") => "capture_end",
        ("void", "start") => "void_start",
        ("void", "commit") => "void_commit",
        ("void", "replay") => "void_replay",
        ("void", "rejected") => "void_rejected",
        ("void", "end") => "void_end",
        ("expire", "start") => "expire_start",
        ("expire", "commit") => "hold_expired",
        ("expire", "replay") => "expire_replay",
        ("expire", "rejected") => "expire_rejected",
        ("expire", "end") => "expire_end",
        _ => "engine",
    }
}

#[cfg(test)]
mod event_name_tests {
    use super::event_name;

    #[test]
    fn every_movement_family_has_every_step_named() {
        for family in ["deduct", "refund", "authorize", "capture", "void", "expire"] {
            for step in ["start", "commit", "replay", "rejected", "end"] {
                let name = event_name(family, step);
                assert_ne!(name, "engine", "{family} {step}");
                if (family, step) != ("expire", "commit") {
                    assert_eq!(name, format!("{family}_{step}"));
                }
            }
        }
        assert_eq!(event_name("expire", "commit"), "hold_expired");
    }
}
