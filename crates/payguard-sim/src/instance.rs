//! A payguard instance: the engine's lock-then-write sequence for one deduct.
//!
//! This follows `RedisLocks::{acquire, try_acquire, new_epoch, release}` and the
//! engine's `fenced_apply` step by step: take `lock:order:{id}` (waiting with
//! back-off up to the limit, 503 `LockBusy` past it); make the token from the
//! counter and the epoch with [`payguard::lock::token`], taking a new epoch from
//! the database and raising it in Redis when the epoch is missing; if Redis
//! cannot be reached, write without a token (the database still charges once);
//! then maybe stall past the TTL (the simulated GC pause); then the fenced write;
//! then the compare-and-delete release. Requests run concurrently, as a server's
//! do, and a crash of the host drops whatever was in flight.

use crate::config::{
    Protocol, DB_CALL_TIMEOUT_MS, LOCK_RETRY_US_MAX, LOCK_RETRY_US_MIN, LOCK_TTL_MS,
    LOCK_WAIT_MS_MAX, REDIS_COMMAND_TIMEOUT_MS, STALL_MS_MAX, STALL_MS_MIN, STALL_PERCENT,
};
use crate::oracle::Oracle;
use crate::redis::RedisState;
use crate::wire::{
    call, now_ms, ApiReq, ApiResp, CallError, CallIds, DbReq, DbResp, RedisReq, RedisResp, Server,
    DB_HOST, DB_PORT, INSTANCE_PORT, REDIS_HOST, REDIS_PORT,
};
use payguard::lock::token;
use rand::rngs::SmallRng;
use rand::Rng;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// Everything an instance keeps across restarts (its identity and its RNG stream)
/// plus the test's handles. A restart loses only what was in flight.
pub struct Instance {
    pub index: usize,
    pub protocol: Protocol,
    /// Seeded from the run's seed: stalls are part of the replay.
    pub rng: RefCell<SmallRng>,
    /// Incremented at each (re)start, so owners stay unique across restarts.
    boots: Cell<u64>,
    grants: Cell<u64>,
    ids: CallIds,
    /// Read only to tell the oracle whether a holder was live; never decides.
    pub redis_truth: Rc<RefCell<RedisState>>,
    pub oracle: Rc<RefCell<Oracle>>,
}

/// A granted lock.
#[derive(Debug, Clone)]
struct Lease {
    key: String,
    owner: String,
    token: i64,
}

/// Why no lease: the engine's `RedisLockError`.
#[derive(Debug)]
enum LockError {
    Busy,
    Unavailable,
    Epoch,
}

impl Instance {
    pub fn new(
        index: usize,
        protocol: Protocol,
        rng: SmallRng,
        redis_truth: Rc<RefCell<RedisState>>,
        oracle: Rc<RefCell<Oracle>>,
    ) -> Self {
        Instance {
            index,
            protocol,
            rng: RefCell::new(rng),
            boots: Cell::new(0),
            grants: Cell::new(0),
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

    /// `RedisLocks::try_acquire`: one attempt; `None` when another holder has it.
    async fn try_acquire(&self, order: &str) -> Result<Option<Lease>, LockError> {
        let key = format!("lock:order:{order}");
        self.grants.set(self.grants.get() + 1);
        let owner = format!(
            "inst{}:{}-{}",
            self.index,
            self.boots.get(),
            self.grants.get()
        );
        let got = self
            .redis(RedisReq::Acquire {
                key: key.clone(),
                owner: owner.clone(),
                ttl_ms: LOCK_TTL_MS,
            })
            .await;
        let Ok(RedisResp::Acquired(got)) = got else {
            return Err(LockError::Unavailable);
        };
        let Some((n, epoch, incarnation)) = got else {
            return Ok(None);
        };
        let n = token::check_counter(n).map_err(|_| LockError::Unavailable)?;
        let epoch = match epoch {
            Some(e) => e,
            None => match self.new_epoch(incarnation).await? {
                Some(e) => e,
                None => {
                    // `RedisLocks::try_acquire`: the hash was re-created since
                    // this grant; give the lock back, the caller acquires again.
                    let _ = self
                        .redis(RedisReq::Release {
                            key: key.clone(),
                            owner: owner.clone(),
                        })
                        .await;
                    return Ok(None);
                }
            },
        };
        let tok = token::pack(epoch, n);
        let now = now_ms();
        let live = self.redis_truth.borrow().holds(&key, &owner, now);
        let mut oracle = self.oracle.borrow_mut();
        oracle.note(now, || {
            format!(
                "inst{}: {owner} holds {key} with token {:?} (n {n}, live {live})",
                self.index,
                token::unpack(tok)
            )
        });
        oracle.token_made(order, tok, live, now);
        drop(oracle);
        Ok(Some(Lease {
            key,
            owner,
            token: tok,
        }))
    }

    /// `RedisLocks::new_epoch`: a fresh epoch from the database, raised in Redis.
    async fn new_epoch(&self, incarnation: Option<String>) -> Result<Option<i64>, LockError> {
        self.oracle.borrow_mut().stats.new_epochs += 1;
        let Ok(DbResp::Epoch(fresh)) = self.db(DbReq::NextFenceEpoch).await else {
            return Err(LockError::Epoch);
        };
        let raise = match incarnation {
            Some(incarnation) if self.protocol.raise_epoch_checks_incarnation => {
                RedisReq::RaiseEpochIfSame { fresh, incarnation }
            }
            _ => RedisReq::RaiseEpoch { fresh },
        };
        let raised = match self.redis(raise).await {
            Ok(RedisResp::Epoch(raised)) => raised,
            // The hash was re-created since this grant's ACQUIRE.
            Ok(RedisResp::Refused) => return Ok(None),
            _ => return Err(LockError::Unavailable),
        };
        self.oracle.borrow_mut().note(now_ms(), || {
            format!(
                "inst{}: new epoch: fresh {fresh}, in force {raised}",
                self.index
            )
        });
        if self.protocol.reset_counter_on_new_epoch && raised >= fresh {
            // The code before e03f2f7: start the counter again under the new epoch.
            if !matches!(
                self.redis(RedisReq::ResetCounter).await,
                Ok(RedisResp::Done)
            ) {
                return Err(LockError::Unavailable);
            }
        }
        Ok(Some(token::epoch_in_force(raised, fresh)))
    }

    /// `RedisLocks::acquire`: waits up to the limit, backing off between attempts.
    async fn acquire(&self, order: &str) -> Result<Lease, LockError> {
        let started = now_ms();
        let mut backoff_us = LOCK_RETRY_US_MIN;
        loop {
            if let Some(lease) = self.try_acquire(order).await? {
                return Ok(lease);
            }
            if now_ms() - started >= LOCK_WAIT_MS_MAX {
                return Err(LockError::Busy);
            }
            tokio::time::sleep(Duration::from_micros(backoff_us)).await;
            backoff_us = (backoff_us * 2).min(LOCK_RETRY_US_MAX);
        }
    }

    /// The failpoint of scenario 3, at random: a stall longer than the TTL.
    async fn maybe_stall(&self) {
        let stall = {
            let mut rng = self.rng.borrow_mut();
            rng.random_ratio(STALL_PERCENT, 100)
                .then(|| rng.random_range(STALL_MS_MIN..=STALL_MS_MAX))
        };
        if let Some(ms) = stall {
            {
                let mut oracle = self.oracle.borrow_mut();
                oracle.stats.stalls += 1;
                oracle.note(now_ms(), || format!("inst{}: stalls {ms} ms", self.index));
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// The write under the lock: payguard's one fenced transaction, or (without
    /// the database's unique debit) a fenced read, then an unconditional debit.
    async fn write(&self, order: &str, token: Option<i64>) -> ApiResp {
        let order = order.to_owned();
        let answer = if self.protocol.db_unique_debit {
            self.maybe_stall().await;
            self.db(DbReq::Deduct { order, token }).await
        } else {
            match self
                .db(DbReq::Read {
                    order: order.clone(),
                    token,
                })
                .await
            {
                Ok(DbResp::Prepare) => {
                    self.maybe_stall().await;
                    self.db(DbReq::Debit { order, token }).await
                }
                other => other,
            }
        };
        match answer {
            Ok(DbResp::Charged { entry }) => ApiResp::Charged { entry },
            Ok(DbResp::Replayed { entry }) => ApiResp::Replayed { entry },
            Ok(DbResp::InsufficientFunds) => ApiResp::InsufficientFunds,
            Ok(DbResp::StaleFencingToken) => ApiResp::StaleFencingToken,
            Ok(DbResp::NoSuchOrder) => ApiResp::NoSuchOrder,
            Ok(DbResp::Epoch(_) | DbResp::Prepare) | Err(_) => ApiResp::Unknown,
        }
    }

    /// One deduct, as `fenced_apply` runs it for one order.
    pub async fn deduct(&self, order: &str) -> ApiResp {
        let lease = match self.acquire(order).await {
            Ok(lease) => Some(lease),
            Err(LockError::Busy) => return ApiResp::LockBusy,
            // Redis unreachable or no epoch: written without a token.
            Err(e @ (LockError::Unavailable | LockError::Epoch)) => {
                self.oracle.borrow_mut().note(now_ms(), || {
                    format!(
                        "inst{}: {order}: lock {e:?}, writing without a token",
                        self.index
                    )
                });
                None
            }
        };
        let answer = self.write(order, lease.as_ref().map(|l| l.token)).await;
        if let Some(lease) = lease {
            // A lost lease (or an unreachable Redis) is logged by the engine, nothing more.
            let released = self
                .redis(RedisReq::Release {
                    key: lease.key,
                    owner: lease.owner.clone(),
                })
                .await;
            self.oracle.borrow_mut().note(now_ms(), || {
                format!("inst{}: {} releases: {released:?}", self.index, lease.owner)
            });
        }
        answer
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

/// The instance host's software: one task per request.
pub async fn serve(inst: Rc<Instance>) -> turmoil::Result {
    inst.boots.set(inst.boots.get() + 1);
    let server = Rc::new(Server::bind(INSTANCE_PORT).await?);
    loop {
        let req = server.recv::<ApiReq>().await?;
        let (inst, server) = (inst.clone(), server.clone());
        tokio::task::spawn_local(async move {
            let _counted = InFlight::new(inst.oracle.clone());
            let answer = inst.deduct(&req.body.order).await;
            server.reply(&req, answer).await;
        });
    }
}
