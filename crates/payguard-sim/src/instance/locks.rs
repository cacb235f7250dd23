//! The lock calls of `payguard::lock::redis`, step by step, and issue #12's
//! `ACQUIRE_MANY` / `RELEASE_MANY` pair.
//!
//! `try_acquire`, `new_epoch`, `acquire` and `release` follow `RedisLocks` line
//! by line: the token is made from the counter and the epoch with
//! [`payguard::lock::token`], a missing epoch is taken from the database and
//! raised in Redis (checking the hash's incarnation), and a refused raise gives
//! the lock back and acquires again. `acquire_many` does the same once per batch:
//! every free lock in one round trip, one epoch for all of them, and, when the
//! raise is refused, every granted lock given back and the round trip redone at
//! once (at most [`ACQUIRE_MANY_ATTEMPTS_MAX`] times). It never waits for a held
//! lock: it reports it busy with the holder's PTTL.

use super::Instance;
use crate::config::{
    ACQUIRE_MANY_ATTEMPTS_MAX, LOCK_RETRY_US_MAX, LOCK_RETRY_US_MIN, LOCK_TTL_MS, LOCK_WAIT_MS_MAX,
};
use crate::wire::{lock_key, now_ms, DbReq, DbResp, RedisReq, RedisResp, Slot};
use payguard::lock::token;
use std::time::Duration;

/// A granted lock.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub key: String,
    pub owner: String,
    pub token: i64,
}

/// Why no lease: the engine's `RedisLockError`.
#[derive(Debug)]
pub(super) enum LockError {
    Busy,
    Unavailable,
    Epoch,
}

/// What one `ACQUIRE_MANY` got for a batch.
#[derive(Debug)]
pub(super) struct Grants {
    /// The owner of every granted lock (one per round trip).
    pub owner: String,
    /// (order, token) per granted lock.
    pub granted: Vec<(String, i64)>,
    /// (order, the holder's PTTL) per lock held elsewhere.
    pub busy: Vec<(String, u64)>,
    /// When the round trip that got these was sent: a release notification
    /// heard since then may be for a holder this one found busy.
    pub sent_ms: u64,
}

impl Instance {
    /// `RedisLocks::try_acquire`: one attempt; `None` when another holder has it.
    async fn try_acquire(&self, order: &str) -> Result<Option<Lease>, LockError> {
        let key = lock_key(order);
        let owner = self.next_owner();
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
        self.token_made(order, &owner, tok);
        Ok(Some(Lease {
            key,
            owner,
            token: tok,
        }))
    }

    /// Tells the oracle a holder's token is final, and whether its lock was
    /// still its own in Redis then.
    fn token_made(&self, order: &str, owner: &str, tok: i64) {
        let now = now_ms();
        let key = lock_key(order);
        let live = self.redis_truth.borrow().holds(&key, owner, now);
        let mut oracle = self.oracle.borrow_mut();
        oracle.note(now, || {
            format!(
                "inst{}: {owner} holds {key} with token {:?} (live {live})",
                self.index,
                token::unpack(tok)
            )
        });
        oracle.token_made(order, tok, live, now);
    }

    /// `RedisLocks::new_epoch`: a fresh epoch from the database, raised in Redis;
    /// `None` when the raise was refused (the hash was re-created since).
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
        self.note(|| format!("new epoch: fresh {fresh}, in force {raised}"));
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
    pub(super) async fn acquire(&self, order: &str) -> Result<Lease, LockError> {
        let started = now_ms();
        let mut backoff_us = LOCK_RETRY_US_MIN;
        loop {
            if let Some(lease) = self.try_acquire(order).await? {
                return Ok(lease);
            }
            if now_ms() - started >= LOCK_WAIT_MS_MAX {
                return Err(LockError::Busy);
            }
            if backoff_us == LOCK_RETRY_US_MIN {
                self.note(|| {
                    format!("{order}: held elsewhere, polling up to {LOCK_WAIT_MS_MAX} ms")
                });
            }
            tokio::time::sleep(Duration::from_micros(backoff_us)).await;
            backoff_us = (backoff_us * 2).min(LOCK_RETRY_US_MAX);
        }
    }

    /// `RedisLocks::release`: compare-and-delete. A lost lease (or an unreachable
    /// Redis) is logged, nothing more.
    pub(super) async fn release(&self, lease: Lease) {
        let released = self
            .redis(RedisReq::Release {
                key: lease.key,
                owner: lease.owner.clone(),
            })
            .await;
        self.note(|| format!("{} releases: {released:?}", lease.owner));
    }

    /// Issue #12's `acquire_many`: every free lock of `orders` in one round trip,
    /// never waiting for a held one.
    pub(super) async fn acquire_many(&self, orders: &[String]) -> Result<Grants, LockError> {
        for _ in 0..ACQUIRE_MANY_ATTEMPTS_MAX {
            let owner = self.next_owner();
            let sent_ms = now_ms();
            let got = self
                .redis(RedisReq::AcquireMany {
                    orders: orders.to_vec(),
                    owner: owner.clone(),
                    ttl_ms: LOCK_TTL_MS,
                })
                .await;
            let Ok(RedisResp::AcquiredMany {
                slots,
                epoch,
                incarnation,
            }) = got
            else {
                return Err(LockError::Unavailable);
            };
            if slots.len() != orders.len() {
                return Err(LockError::Unavailable);
            }
            let mut granted = Vec::new();
            let mut busy = Vec::new();
            for (order, slot) in orders.iter().zip(slots) {
                match slot {
                    Slot::Granted(n) => {
                        let n = token::check_counter(n).map_err(|_| LockError::Unavailable)?;
                        granted.push((order.clone(), n));
                    }
                    Slot::Busy { pttl_ms } => busy.push((order.clone(), pttl_ms)),
                }
            }
            self.note(|| format!("{owner} ACQUIRE_MANY: granted {granted:?}, busy {busy:?}"));
            let epoch = match epoch {
                Some(e) => e,
                None if granted.is_empty() => 0,
                None => match self.new_epoch(incarnation).await? {
                    Some(e) => e,
                    None => {
                        // Re-created again since these grants: give them all back
                        // and start over on the new incarnation.
                        let mine: Vec<String> = granted.into_iter().map(|(o, _)| o).collect();
                        self.release_many(&owner, mine).await;
                        continue;
                    }
                },
            };
            let granted: Vec<(String, i64)> = granted
                .into_iter()
                .map(|(order, n)| {
                    let tok = token::pack(epoch, n);
                    self.token_made(&order, &owner, tok);
                    (order, tok)
                })
                .collect();
            return Ok(Grants {
                owner,
                granted,
                busy,
                sent_ms,
            });
        }
        self.note(|| "ACQUIRE_MANY: the epoch raise was refused every time".into());
        Err(LockError::Unavailable)
    }

    /// `RELEASE_MANY`: compare-and-delete each lock, publishing the releases
    /// someone waits for. Unreachable Redis: logged (the locks expire).
    pub(super) async fn release_many(&self, owner: &str, orders: Vec<String>) {
        if orders.is_empty() {
            return;
        }
        let released = self
            .redis(RedisReq::ReleaseMany {
                orders,
                owner: owner.to_owned(),
            })
            .await;
        self.note(|| format!("{owner} RELEASE_MANY: {released:?}"));
    }
}
