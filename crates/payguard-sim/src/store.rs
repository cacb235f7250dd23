//! The simulated store: payguard's `Store` trait over the simulated network to
//! the simulated database ([`crate::db`]), as one instance's engine sees it.
//!
//! Why: the engine must run unchanged, so it gets a `Store` like any other. The
//! money path (`apply`, `settled`, `next_fence_epoch`) crosses the network,
//! where a seed decides whether a request or its answer is lost, delayed past
//! the deadline, or caught by a crash or restart of the database. `apply` then
//! runs payguard's own commit-fate loop, the code the PostgreSQL store ships
//! (`payguard::store::commit_fate::apply_resolved`, with the simulation's
//! scaled [`FateLimits`]), over `SimBatch`: one attempt is one request
//! carrying the whole transaction under a fresh id (its COMMIT is on the wire
//! from the send to the answer), and one look at a fate is one request the
//! database answers finally (its look-up ends a transaction that has not
//! arrived, as `pg_terminate_backend` does). So the loop never guesses: it
//! looks the fate up and runs the batch again, its commands being idempotent,
//! so a batch that did commit reads back as its replay (a keyed command from
//! its key's stored answer: `Rejection::KeyAnswered`, which the keyed sequence
//! answers with it); past [`AMBIGUOUS_RERUNS_MAX`] reruns after a commit, or
//! when the fate cannot be learned in time, the answer is "outcome unknown",
//! never "nothing moved". Every batch answered with another error is
//! recorded with its transaction ids, and the end of the seed checks that none
//! of them committed (`checks`, `ViolationKind::NothingMovedButCommitted`).
//! Why no re-statement: a loop written twice can drift, and only the shipped
//! one matters; the PostgreSQL specifics (`txid_status`, the pool) stay behind
//! the loop's trait. A writer may also stall past its lock's TTL between
//! taking its locks and writing (a GC pause, a SIGSTOP): the store is the
//! first thing a batch does after its locks.
//!
//! The expiry sweeper's read (`due_holds`) crosses the network too, so a
//! sweep can fail or see a state another sweeper has already changed. The
//! Idempotency-Key calls (`idem_claim`, `idem_release`, made by payguard's
//! keyed sequence, `Engine::submit_keyed`) cross the network when
//! `Protocol::keys_over_network` says so (a claim taken whose answer is lost,
//! a release lost or late); otherwise, like the reads off the money path
//! (`order`, `account`, `entries`), they read and write the database's state
//! directly, through the same rules ([`DbState::claim`],
//! [`DbState::release`]). The events feed is the one the database writes
//! in each movement's transaction. Webhooks: the delivery loop's calls
//! (`webhook_endpoints`, `webhook_fan_out`, `webhook_claim`,
//! `webhook_record`) cross the network to the database's outbox
//! ([`crate::outbox`]), so a claim's answer can be lost after its leases were
//! taken and a result can arrive after its lease ran out; `webhook_create`
//! (the seed's endpoints), the deliveries' listing and the backlog read and
//! write the state directly; deleting an endpoint and a manual retry are not
//! simulated (they answer `Unavailable`). `audit` is not simulated: the end-of-seed checks audit the state
//! ([`crate::run`]).

use crate::config::{
    BATCH_DEADLINE_MS, FATE_CALL_TIMEOUT_MS, FATE_POLL_MS, RERUN_BACKOFF_MS, RESOLVE_DEADLINE_MS,
    STALL_MS_MAX, STALL_MS_MIN,
};
use crate::db::{describe_claim, DbReq, DbResp, DbState};
use crate::oracle::OracleRef;
use crate::wire::{now_ms, CallError, Caller, DB_HOST, DB_PORT};
use payguard::domain::{
    Account, AccountId, AuditReport, Entry, Event, Order, OrderId, OrderStatus,
};
use payguard::store::commit_fate::{apply_resolved, Attempt, Fate, FateLimits, FateStore};
use payguard::store::outbox::{
    AttemptResult, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint, RetryOutcome,
};
use payguard::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, OpResult, Store, StoreError, StoreFuture,
};
use rand::rngs::SmallRng;
use rand::Rng;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// payguard's PostgreSQL store's limit on reruns after unanswered COMMITs.
pub const AMBIGUOUS_RERUNS_MAX: u32 = payguard::store::postgres::AMBIGUOUS_RERUNS_MAX;

/// One instance's store.
pub struct SimStore {
    inner: Arc<Inner>,
}

struct Inner {
    inst: usize,
    net: Caller,
    /// The database's state, for the calls off the money path.
    db: Arc<Mutex<DbState>>,
    /// Transaction ids: the instance's index and boot in the high bits, so no
    /// two transactions of a seed share one.
    xid_base: u64,
    next_xid: AtomicU64,
    host: Host,
    rng: Mutex<SmallRng>,
    oracle: OracleRef,
}

/// How an instance's host differs from the ideal one, as its store sees it.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// Percent of fenced batches whose writer stalls past the TTL.
    pub stall_percent: u32,
    /// How far this instance's clock is off the simulated one (ms).
    pub clock_offset_ms: i64,
    /// The Idempotency-Key claims and releases cross the network (a claim's
    /// answer can be lost, a release can arrive late or not at all); off: they
    /// read and write the database's state directly.
    pub keys_over_network: bool,
}

impl SimStore {
    pub fn new(
        inst: usize,
        boot: u64,
        net: Caller,
        db: Arc<Mutex<DbState>>,
        host: Host,
        rng: SmallRng,
        oracle: OracleRef,
    ) -> Self {
        SimStore {
            inner: Arc::new(Inner {
                inst,
                net,
                db,
                xid_base: ((inst as u64 + 1) << 48) | (boot << 32),
                next_xid: AtomicU64::new(0),
                host,
                rng: Mutex::new(rng),
                oracle,
            }),
        }
    }
}

fn ok<T: Send + 'static>(v: T) -> StoreFuture<T> {
    Box::pin(async move { Ok(v) })
}

impl Inner {
    /// This instance's wall clock (ms).
    fn clock(&self) -> i64 {
        now_ms() as i64 + self.host.clock_offset_ms
    }

    fn db(&self) -> std::sync::MutexGuard<'_, DbState> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn call(&self, req: DbReq, timeout_ms: u64) -> Result<DbResp, CallError> {
        self.net
            .call(DB_HOST, DB_PORT, req, Duration::from_millis(timeout_ms))
            .await
    }

    fn note(&self, line: impl FnOnce() -> String) {
        self.oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{}: {}", self.inst, line()));
    }

    /// The failpoint of a paused writer, at random: after the locks (the batch
    /// carries tokens), before the write.
    async fn maybe_stall(&self, cmds: &[Command]) {
        if !cmds.iter().any(|c| c.fence.is_some()) {
            return;
        }
        let stall = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            rng.random_ratio(self.host.stall_percent, 100)
                .then(|| rng.random_range(STALL_MS_MIN..=STALL_MS_MAX))
        };
        if let Some(ms) = stall {
            self.oracle.borrow_mut().stats.stalls += 1;
            self.note(|| format!("writer stalls {ms} ms"));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// A batch, with unanswered commits resolved by payguard's own loop
    /// (`payguard::store::commit_fate`, see the module docs).
    async fn apply(&self, cmds: Vec<Command>) -> Result<Vec<OpResult>, StoreError> {
        {
            let mut o = self.oracle.borrow_mut();
            o.stats.batches += 1;
            o.stats.batched_ops += cmds.len() as u64;
            o.stats.multi_op_batches += u64::from(cmds.len() >= 2);
        }
        self.maybe_stall(&cmds).await;
        let batch = SimBatch {
            inner: self,
            cmds,
            xids: Mutex::new(Vec::new()),
        };
        let answer = apply_resolved(&batch, &FATE_LIMITS).await;
        if let Err(e) = &answer {
            if !matches!(e, StoreError::Unknown(_)) {
                // The store's promise, held against the database at the end
                // of the seed (`checks::nothing_moved`).
                let xids = batch.xids.into_inner().unwrap_or_else(|e| e.into_inner());
                let mut o = self.oracle.borrow_mut();
                o.stats.nothing_moved += 1;
                o.nothing_moved.push((self.inst, xids, e.to_string()));
            }
        }
        answer
    }
}

/// The simulation's [`FateLimits`]: payguard's loop at the scaled times.
const FATE_LIMITS: FateLimits = FateLimits {
    batch_deadline: Duration::from_millis(BATCH_DEADLINE_MS),
    resolve_deadline_ms: RESOLVE_DEADLINE_MS,
    rerun_backoff_ms: RERUN_BACKOFF_MS,
    fate_poll_ms: FATE_POLL_MS,
    reruns_max: AMBIGUOUS_RERUNS_MAX,
};

/// One batch as payguard's commit-fate loop runs it over the simulated
/// network: an attempt is one request carrying the whole transaction, COMMIT
/// included, under a fresh transaction id.
struct SimBatch<'a> {
    inner: &'a Inner,
    cmds: Vec<Command>,
    /// Every transaction id its attempts used, for the end-of-seed check that
    /// an answer "nothing moved" was true.
    xids: Mutex<Vec<u64>>,
}

impl FateStore for SimBatch<'_> {
    type Xid = u64;
    /// Every attempt is a call of its own: no connection to keep or discard.
    type Conn = ();

    fn connect(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    async fn attempt(&self, _conn: &mut (), sent: &mut Option<u64>) -> Attempt<u64> {
        let inner = self.inner;
        let xid = inner.xid_base | inner.next_xid.fetch_add(1, Ordering::Relaxed);
        self.xids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(xid);
        // The PostgreSQL store's clock when the attempt starts; the
        // database decides at it or at its own (`clock_after_locks`).
        let req = DbReq::Apply {
            now: inner.clock(),
            clock_offset_ms: inner.host.clock_offset_ms,
            xid,
            cmds: self.cmds.clone(),
        };
        // The request is the whole transaction: its COMMIT is on the wire
        // from now until its answer.
        *sent = Some(xid);
        match inner.call(req, BATCH_DEADLINE_MS).await {
            Ok(DbResp::Applied(Ok(results))) => Attempt::Done(results),
            Ok(DbResp::Applied(Err(e))) => Attempt::Failed(e),
            Ok(other) => Attempt::Failed(StoreError::Unavailable(format!("answered {other:?}"))),
            Err(e) => Attempt::Unanswered {
                xid,
                detail: format!("transaction {xid}: {e}"),
            },
        }
    }

    fn discard(&self, _conn: &mut ()) {}

    async fn fate_once(&self, xid: u64) -> Result<Fate, StoreError> {
        // The database's look-up also ends a transaction that has not
        // arrived (`DbState::exec`), so its answer is always final.
        match self
            .inner
            .call(DbReq::Fate { xid }, FATE_CALL_TIMEOUT_MS)
            .await
        {
            Ok(DbResp::Fate(true)) => Ok(Fate::Committed),
            Ok(DbResp::Fate(false)) => Ok(Fate::Aborted),
            Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    fn unanswered(&self, _xid: u64, detail: &str) {
        self.inner.oracle.borrow_mut().stats.fate_lookups += 1;
        self.inner
            .note(|| format!("commit unanswered ({detail}); looking up its fate"));
    }

    fn resolved(&self, xid: u64, committed: bool) {
        self.inner
            .note(|| format!("transaction {xid} committed: {committed}; running the batch again"));
    }
}

impl Store for SimStore {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn apply(&self, cmds: Vec<Command>) -> StoreFuture<Vec<OpResult>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.apply(cmds).await })
    }

    fn apply_isolated(&self, cmd: Command) -> StoreFuture<OpResult> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut r = inner.apply(vec![cmd]).await?;
            r.pop()
                .ok_or_else(|| StoreError::Unavailable("no answer for the command".into()))
        })
    }

    /// Decided at the instance's simulated clock when it asks (as the
    /// PostgreSQL store decides a snapshot read at its caller's time), not at
    /// `_now_ms`: the engine passes the wall clock, which no seed could
    /// replay. Deducts do not read the time; a capture or a void near its
    /// hold's expiry does.
    fn settled(&self, cmds: Vec<Command>, _now_ms: i64) -> StoreFuture<Vec<Option<OpResult>>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let now = inner.clock();
            match inner
                .call(DbReq::Settled { cmds, now }, BATCH_DEADLINE_MS)
                .await
            {
                Ok(DbResp::Settled(answers)) => Ok(answers),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        ok(self.inner.db().tables.accounts.get(&id).cloned())
    }

    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>> {
        ok(self
            .inner
            .db()
            .tables
            .orders
            .get(&id)
            .map(|(o, _)| o.clone()))
    }

    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        let db = self.inner.db();
        let found = db.tables.orders.contains_key(&order_id).then(|| {
            db.tables
                .entries
                .iter()
                .filter(|e| e.order_id == order_id)
                .cloned()
                .collect()
        });
        ok(found)
    }

    fn audit(&self) -> StoreFuture<AuditReport> {
        Box::pin(async {
            Err(StoreError::Unavailable(
                "audit is not simulated: the end-of-seed checks audit the state".into(),
            ))
        })
    }

    /// Over the network, as the sweeper's read of the real stores: a partition
    /// or a database down fails the sweep's tick (`sweep_failed`).
    fn due_holds(&self, now_ms: i64, limit: usize) -> StoreFuture<Vec<OrderId>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let req = DbReq::DueHolds { now_ms, limit };
            match inner.call(req, BATCH_DEADLINE_MS).await {
                Ok(DbResp::Due(ids)) => Ok(ids),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    fn open_holds(&self) -> StoreFuture<u64> {
        let db = self.inner.db();
        ok(db
            .tables
            .orders
            .values()
            .filter(|(o, _)| o.status == OrderStatus::Authorized)
            .count() as u64)
    }

    fn idem_claim(&self, claim: IdemClaim) -> StoreFuture<ClaimOutcome> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let outcome = if inner.host.keys_over_network {
                match inner
                    .call(DbReq::Claim(claim.clone()), BATCH_DEADLINE_MS)
                    .await
                {
                    Ok(DbResp::Claimed(outcome)) => outcome,
                    Ok(other) => {
                        return Err(StoreError::Unavailable(format!("answered {other:?}")))
                    }
                    Err(e) => return Err(StoreError::Unavailable(e.to_string())),
                }
            } else {
                inner.db().claim(&claim)
            };
            if outcome != (ClaimOutcome::InFlight { same_request: true }) {
                // A repeat waiting for the first request is polled, not noted.
                inner.note(|| format!("claim of key {}: {}", claim.key, describe_claim(&outcome)));
            }
            Ok(outcome)
        })
    }

    fn idem_release(&self, scope: String, key: String, token: ClaimToken) -> StoreFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let freed = if inner.host.keys_over_network {
                let req = DbReq::Release {
                    scope,
                    key: key.clone(),
                    token,
                };
                match inner.call(req, BATCH_DEADLINE_MS).await {
                    Ok(DbResp::Released(freed)) => freed,
                    Ok(other) => {
                        return Err(StoreError::Unavailable(format!("answered {other:?}")))
                    }
                    Err(e) => return Err(StoreError::Unavailable(e.to_string())),
                }
            } else {
                inner.db().release(&scope, &key, token)
            };
            inner.note(|| format!("release of key {key} (claim {}): freed {freed}", token.0));
            Ok(())
        })
    }

    fn idem_prune(&self, now_ms: i64) -> StoreFuture<u64> {
        let mut db = self.inner.db();
        let before = db.tables.idem.len();
        db.tables.idem.retain(|_, r| r.expires_at >= now_ms);
        ok((before - db.tables.idem.len()) as u64)
    }

    fn next_fence_epoch(&self) -> StoreFuture<i64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.call(DbReq::NextFenceEpoch, BATCH_DEADLINE_MS).await {
                Ok(DbResp::Epoch(e)) => Ok(e),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    fn close(&self) -> StoreFuture<()> {
        ok(())
    }

    fn events(&self, after: i64, limit: usize) -> StoreFuture<Vec<Event>> {
        let db = self.inner.db();
        ok(db
            .tables
            .events
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect())
    }

    fn sequence_events(&self, _wait: bool) -> StoreFuture<u64> {
        // Numbered as they commit, as SQLite does.
        ok(0)
    }

    fn last_event_seq(&self) -> StoreFuture<i64> {
        ok(self.inner.db().tables.events.last().map_or(0, |e| e.seq))
    }

    /// Written directly, like the other calls off the loop's path (its
    /// cursor at the feed's end, `crate::outbox::Outbox::create`).
    fn webhook_create(&self, endpoint: Endpoint) -> StoreFuture<bool> {
        let mut db = self.inner.db();
        let db = &mut *db;
        ok(db.outbox.create(endpoint, &db.tables.events))
    }

    /// Over the network: the delivery loop reads them every pass.
    fn webhook_endpoints(&self, id: Option<String>) -> StoreFuture<Vec<Endpoint>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner
                .call(DbReq::HookEndpoints { id }, BATCH_DEADLINE_MS)
                .await
            {
                Ok(DbResp::HookEndpoints(e)) => Ok(e),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    fn webhook_delete(&self, _id: String, _now_ms: i64) -> StoreFuture<bool> {
        Box::pin(async {
            Err(StoreError::Unavailable(
                "deleting a webhook endpoint is not simulated".into(),
            ))
        })
    }

    /// Over the network: a fan-out can be lost, or land after its caller
    /// gave up.
    fn webhook_fan_out(&self, now_ms: i64) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner
                .call(DbReq::HookFanOut { now_ms }, BATCH_DEADLINE_MS)
                .await
            {
                Ok(DbResp::FannedOut(n)) => Ok(n),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    /// Over the network: a claim's answer can be lost after its leases were
    /// taken (they run out, and the attempts are made again).
    fn webhook_claim(&self, req: ClaimRequest) -> StoreFuture<Vec<Claimed>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.call(DbReq::HookClaim(req), BATCH_DEADLINE_MS).await {
                Ok(DbResp::HookClaimed(c)) => Ok(c),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    /// Over the network: results can be lost, or arrive after their lease
    /// ran out (then they are kept only if nobody claimed the delivery since).
    fn webhook_record(&self, results: Vec<AttemptResult>) -> StoreFuture<Vec<bool>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner
                .call(DbReq::HookRecord(results), BATCH_DEADLINE_MS)
                .await
            {
                Ok(DbResp::Recorded(kept)) => Ok(kept),
                Ok(other) => Err(StoreError::Unavailable(format!("answered {other:?}"))),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            }
        })
    }

    /// Read directly (the API's listing; the loop does not call it).
    fn webhook_deliveries(
        &self,
        endpoint_id: String,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreFuture<Vec<Delivery>> {
        let db = self.inner.db();
        let o = &db.outbox;
        let mut out: Vec<Delivery> = o
            .deliveries
            .iter()
            .filter(|((ep, _), d)| ep == &endpoint_id && status.is_none_or(|s| s == d.status))
            .map(|((ep, ev), d)| Delivery {
                endpoint_id: ep.clone(),
                event_id: ev.clone(),
                event_seq: d.event_seq,
                event_type: d.event_type,
                status: d.status,
                attempts: d.attempts,
                next_attempt_at: (d.status == DeliveryStatus::Pending).then_some(d.next_attempt_at),
                attempt_log: o
                    .attempts
                    .range((ep.clone(), ev.clone(), 0)..=(ep.clone(), ev.clone(), u32::MAX))
                    .map(|(_, row)| row.clone())
                    .collect(),
            })
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.event_seq));
        out.truncate(limit);
        ok(out)
    }

    fn webhook_retry(
        &self,
        _endpoint_id: String,
        _event_id: String,
        _now_ms: i64,
    ) -> StoreFuture<RetryOutcome> {
        Box::pin(async {
            Err(StoreError::Unavailable(
                "a manual webhook retry is not simulated".into(),
            ))
        })
    }

    /// Read directly (the metrics' scrape; the loop does not call it).
    fn webhook_backlog(&self) -> StoreFuture<Vec<Backlog>> {
        let db = self.inner.db();
        let o = &db.outbox;
        let backlog = o
            .endpoints
            .keys()
            .map(|id| {
                let pending: Vec<i64> = o
                    .deliveries
                    .iter()
                    .filter(|((ep, _), d)| ep == id && d.status == DeliveryStatus::Pending)
                    .filter_map(|((_, ev), _)| {
                        db.tables
                            .events
                            .iter()
                            .find(|e| &e.id == ev)
                            .map(|e| e.created_at)
                    })
                    .collect();
                Backlog {
                    endpoint_id: id.clone(),
                    pending: pending.len() as u64,
                    oldest_created_at: pending.iter().min().copied(),
                }
            })
            .collect();
        ok(backlog)
    }
}
