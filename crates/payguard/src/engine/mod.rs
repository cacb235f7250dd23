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

pub mod lane;
pub mod router;

use crate::cache::OrderCache;
use crate::domain::{Account, AccountId, AuditReport, Entry, Order, OrderId, RequestId};
use crate::lock::redis::{Grant, RedisLockError, RedisLocks};
use crate::lock::LocalLocks;
use crate::store::sqlite::naive::{NaiveCtx, NaiveSqlite};
use crate::store::{Command, Op, Output, Rejection, Store, StoreError, StoreFuture};
use lane::{LaneCore, LaneReply};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
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
    /// full, when no batch is already in flight (then it commits at once after).
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

/// What a lane answers a command: the batch's reply for its op, or an engine
/// refusal decided before the op reached the store (its deadline passed while
/// it queued).
type Answer = Result<LaneReply, EngineError>;
type Reply = oneshot::Sender<Answer>;

/// A request waiting in a lane's queue.
struct Queued {
    cmd: Command,
    req: RequestId,
    reply: Reply,
    /// Past this, the lane answers `TimedOut` instead of admitting the command:
    /// a timeout may only fire before a change reaches the store.
    deadline: Option<Instant>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// Cross-instance per-order locks with fencing tokens (`--redis`).
    redis: Option<Arc<RedisLocks>>,
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
        Self::build(store, cfg, redis, None)
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
        Self::build(store, cfg, redis, Some(naive))
    }

    fn build(
        store: Arc<dyn Store>,
        cfg: EngineConfig,
        redis: Option<Arc<RedisLocks>>,
        naive: Option<NaiveSqlite>,
    ) -> Self {
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
                Guard::Full => self.dispatch(cmd.clone(), req.clone(), deadline).await,
                Guard::Seed => self.seed(cmd.clone(), req.clone(), deadline).await,
                Guard::Naive { gap_ms } => self.naive(cmd.clone(), req.clone(), gap_ms).await,
            }
        };
        let stats = &self.shared.stats;
        match &result {
            Ok(out) if out.is_replay() => {
                stats.replayed.inc();
            }
            Ok(_) => {
                stats.committed.inc();
            }
            Err(EngineError::Rejected(_)) => {
                stats.rejected.inc();
            }
            Err(EngineError::Overloaded) => {
                stats.overloaded.inc();
            }
            Err(EngineError::ShuttingDown | EngineError::Store(_) | EngineError::TimedOut) => {
                stats.store_failures.inc();
            }
        }
        if moves_money {
            let req = req.as_str();
            let outcome = match &result {
                Ok(Output::Movement {
                    entry,
                    replayed: false,
                    ..
                }) => {
                    tracing::info!(
                        event = event_name(family, "commit"),
                        oid,
                        entry = entry.id,
                        amount = entry.amount.minor(),
                        balance_after = entry.balance_after.minor(),
                        req,
                        inst
                    );
                    "committed"
                }
                Ok(Output::Movement {
                    entry,
                    replayed: true,
                    ..
                }) => {
                    tracing::info!(
                        event = event_name(family, "replay"),
                        oid,
                        entry = entry.id,
                        req,
                        inst
                    );
                    "replayed"
                }
                Ok(_) => "committed",
                Err(EngineError::Rejected(r)) => {
                    tracing::info!(
                        event = event_name(family, "rejected"),
                        oid,
                        reason = r.reason(),
                        req,
                        inst
                    );
                    r.reason()
                }
                Err(
                    e @ (EngineError::Overloaded
                    | EngineError::ShuttingDown
                    | EngineError::TimedOut),
                ) => {
                    let reason = match e {
                        EngineError::Overloaded => "overloaded",
                        EngineError::TimedOut => "timed_out",
                        _ => "shutting_down",
                    };
                    tracing::warn!(
                        event = event_name(family, "rejected"),
                        oid,
                        reason,
                        req,
                        inst
                    );
                    "unavailable"
                }
                Err(EngineError::Store(e)) => {
                    tracing::error!(event = event_name(family, "rejected"), oid, reason = "store_unavailable", detail = %e, req, inst);
                    "unavailable"
                }
            };
            let dur_ms = started.elapsed().as_secs_f64() * 1e3;
            tracing::info!(
                event = event_name(family, "end"),
                oid,
                outcome,
                dur_ms,
                req,
                inst
            );
        }
        result
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

    /// `--guard seed`: per-order lock, then one transaction for this request alone.
    async fn seed(
        &self,
        cmd: Command,
        req: RequestId,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        let inst = &*self.shared.inst;
        let oid = cmd.order_id().map(OrderId::as_str).unwrap_or("");
        let key = match &cmd.op {
            Op::CreateAccount { id, .. } => format!("lock:account:{id}"),
            other => format!("lock:order:{}", other.route_key()),
        };
        let _sentinel = self.enter(&cmd, &req);
        let lock_wait = Duration::from_millis(crate::lock::LOCK_WAIT_MS_MAX);
        let wait = deadline.map_or(lock_wait, |d| {
            d.saturating_duration_since(Instant::now()).min(lock_wait)
        });
        let timed_out = || deadline.is_some_and(|d| Instant::now() >= d);
        // The write-up's per-order lock: Redis (fenced) when configured, else local.
        let result = match &self.shared.redis {
            Some(redis) => {
                let lease = match redis.acquire(cmd.route_key(), wait).await {
                    Ok(lease) => Some(lease),
                    Err(RedisLockError::Busy { .. }) => {
                        tracing::warn!(event = "lock_busy", oid, req = req.as_str(), inst);
                        return Err(if timed_out() {
                            EngineError::TimedOut
                        } else {
                            EngineError::Overloaded
                        });
                    }
                    Err(e) => {
                        // The lock is an optimisation; the database still decides.
                        tracing::warn!(event = "lock_unavailable", oid, detail = %e, req = req.as_str(), inst);
                        None
                    }
                };
                let fenced = match &lease {
                    Some(l) => {
                        tracing::info!(
                            event = "lock_acquired",
                            oid,
                            token = l.token,
                            req = req.as_str(),
                            inst
                        );
                        cmd.clone().fenced(l.token)
                    }
                    None => cmd.clone(),
                };
                let result = self.shared.store.apply_isolated(fenced).await;
                self.seed_cache(&cmd, &result);
                if let Some(l) = &lease {
                    let _ = redis.release(l).await;
                    tracing::info!(
                        event = "lock_released",
                        oid,
                        token = l.token,
                        req = req.as_str(),
                        inst
                    );
                }
                result
            }
            None => {
                let lease = self.locks.acquire(&key, wait).await.map_err(|e| {
                    tracing::warn!(event = "lock_busy", oid, detail = %e, req = req.as_str(), inst);
                    if timed_out() {
                        EngineError::TimedOut
                    } else {
                        EngineError::Overloaded
                    }
                })?;
                tracing::info!(
                    event = "lock_acquired",
                    oid,
                    token = lease.token,
                    req = req.as_str(),
                    inst
                );
                let result = self.shared.store.apply_isolated(cmd.clone()).await;
                self.seed_cache(&cmd, &result);
                self.locks.release(&lease);
                tracing::info!(
                    event = "lock_released",
                    oid,
                    token = lease.token,
                    req = req.as_str(),
                    inst
                );
                result
            }
        };
        Ok(result??)
    }

    /// `seed`'s cache write, done while the order's lock is still held: written
    /// after the release, a later request's newer state could be overwritten by
    /// this older one.
    fn seed_cache(&self, cmd: &Command, result: &Result<crate::store::OpResult, StoreError>) {
        if let Ok(Ok(out)) = result {
            if let Some(order) = out.order() {
                self.shared.cache.committed(order);
            }
        } else if let Some(order_id) = cmd.order_id() {
            self.shared.cache.forget(order_id);
        }
    }

    /// `--guard naive`: no lane, no lock, no condition; see [`NaiveSqlite`].
    async fn naive(
        &self,
        cmd: Command,
        req: RequestId,
        gap_ms: u64,
    ) -> Result<Output, EngineError> {
        let _sentinel = self.enter(&cmd, &req);
        let Some(naive) = &self.shared.naive else {
            return Err(EngineError::Store(StoreError::Schema(
                "--guard naive runs on SQLite only, on a database it created (Engine::start_naive)"
                    .into(),
            )));
        };
        let ctx = NaiveCtx {
            gap: Duration::from_millis(gap_ms),
            req,
            inst: self.shared.inst.clone(),
        };
        Ok(naive.apply(cmd, ctx).await??)
    }

    /// The race sentinel outside lanes: records `req` as in flight for its order
    /// and logs `concurrent_inflight` if another request already is.
    fn enter(&self, cmd: &Command, req: &RequestId) -> Option<SentinelGuard<'_>> {
        let order = cmd.order_id()?.clone();
        let mut other = None;
        self.inflight
            .entry_sync(order.clone())
            .and_modify(|(first, n)| {
                other = Some(first.clone());
                *n += 1;
            })
            .or_insert_with(|| (req.clone(), 1));
        if let Some(other) = other {
            self.shared.stats.collisions.inc();
            tracing::warn!(
                event = "concurrent_inflight",
                oid = order.as_str(),
                req = req.as_str(),
                other_req = other.as_str(),
                inst = &*self.shared.inst
            );
        }
        Some(SentinelGuard {
            map: &self.inflight,
            order,
        })
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

/// Leaves the sentinel's record when the request ends, however it ends.
struct SentinelGuard<'a> {
    map: &'a scc::HashMap<OrderId, (RequestId, usize)>,
    order: OrderId,
}

impl Drop for SentinelGuard<'_> {
    fn drop(&mut self) {
        self.map.remove_if_sync(&self.order, |(_, n)| {
            *n -= 1;
            *n == 0
        });
    }
}

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
        _ => "engine",
    }
}

/// A batch's answer as the lane sees it: `None` for an op that did not run
/// because another instance holds its order's lock (`busy` says which orders and
/// how long their holders' leases still run; `sent` is when the acquire that
/// found them busy was sent).
struct BatchDone {
    results: Vec<Option<LaneReply>>,
    busy: Vec<(OrderId, Duration)>,
    sent: Instant,
}

type BatchFuture = futures::future::BoxFuture<'static, BatchDone>;
/// Resolves to a parked order once its lock may be free.
type WakeFuture = futures::future::BoxFuture<'static, OrderId>;

/// The lane owner: the only code that touches this lane's [`LaneCore`].
async fn run_lane(mut rx: mpsc::Receiver<Queued>, shared: Arc<Shared>) {
    use futures::StreamExt;
    let cfg = &shared.cfg;
    let batch_wait = Duration::from_micros(cfg.batch_wait_us);
    let mut core: LaneCore<Reply> = LaneCore::new();
    let mut inflight: Option<BatchFuture> = None;
    // Parked orders: woken by their holder's release (or its lease's end), and
    // when each was first found busy (to give up after `LOCK_WAIT_MS_MAX`).
    let mut wakes: futures::stream::FuturesUnordered<WakeFuture> = Default::default();
    let mut first_busy: std::collections::HashMap<OrderId, Instant> = Default::default();
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
                    inflight = Some(start_batch(&shared, ops, core.inflight_reqs()));
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
                core.unpark(&order);
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

/// Hands a batch to the store: straight, or under the Redis locks of its orders.
fn start_batch(shared: &Arc<Shared>, ops: Vec<Command>, reqs: Vec<RequestId>) -> BatchFuture {
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
                    sent: Instant::now(),
                }
            })
        }
        Some(locks) => Box::pin(fenced_apply(shared.clone(), locks.clone(), ops, reqs)),
    }
}

/// An order another instance holds waits for its release, or is answered 503
/// once it has waited `LOCK_WAIT_MS_MAX` in all (nothing of it moved).
fn park(
    shared: &Arc<Shared>,
    core: &mut LaneCore<Reply>,
    wakes: &mut futures::stream::FuturesUnordered<WakeFuture>,
    first_busy: &mut std::collections::HashMap<OrderId, Instant>,
    order: OrderId,
    busy: &[(OrderId, Duration)],
    sent: Instant,
) {
    let since = *first_busy.entry(order.clone()).or_insert(sent);
    let waited = since.elapsed();
    let wait_max = Duration::from_millis(crate::lock::LOCK_WAIT_MS_MAX);
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

/// Applies a batch under the Redis locks of its orders, each op carrying its
/// order's fencing token. The locks are taken in one round trip that waits for
/// none of them: an order held by another instance is left out of this batch
/// (`None`) and the lane parks it until that holder releases it. Nothing here
/// holds a lock while waiting for another, so instances cannot deadlock. If
/// Redis cannot be reached, the batch is written without tokens: the database's
/// constraints still charge once.
async fn fenced_apply(
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
            shared.cache.committed(order);
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
        let replay = match &delivery.reply {
            Ok(Ok(out)) => Ok(Ok(out.as_replay())),
            other => other.clone(),
        };
        let _ = w.reply.send(Ok(replay));
    }
}
