//! The simulated lock service: payguard's `OrderLocks` over the simulated
//! network to the simulated Redis ([`crate::redis`]), and the wrapper that
//! turns it back into the batch-locking protocol before issue #12.
//!
//! Why: the engine's batch path (`fenced_apply`, parking, release wake-ups)
//! must run unchanged, so it gets a lock service behind the same trait as
//! `RedisLocks`. The client half of `RedisLocks` is re-stated here step by step
//! (it is written against the `redis` crate's calls): one `ACQUIRE_MANY` round
//! trip per acquire with a unique owner, the counter checked against 2^32 with
//! `payguard::lock::token`, a missing epoch taken from the store's sequence (the
//! engine's own `fence_epochs`) and raised only on the incarnation the grants
//! saw, a refused raise giving every grant back and trying again (at most
//! `EPOCH_RACE_RETRIES_MAX` more times), lost grants given back in the
//! background. Waiting for a release uses payguard's own
//! [`ReleaseBoard`], fed by a subscriber task that re-subscribes when it
//! cannot tell whether its subscription lapsed (a real client sees its
//! connection drop) and then wakes every waiter, as `spawn_subscriber` does.
//!
//! [`JoinAll`] is the protocol before issue #12: each order of a batch is
//! acquired on its own, waiting (polling with back-off) while the others
//! already granted stay held, until the wait limit. Across instances that
//! deadlocks until the limit; the simulation must see it.

use crate::config::{
    LOCK_RETRY_US_MAX, LOCK_RETRY_US_MIN, LOCK_TTL_MS, LOCK_WAIT_MS_MAX, REDIS_COMMAND_TIMEOUT_MS,
    RELEASE_WAIT_MS_MAX, SETTLED_HINT_MS, SUBSCRIPTION_CHECK_MS, WAITER_MARK_GRACE_MS,
};
use crate::oracle::OracleRef;
use crate::redis::{AcquireAnswer, RedisReq, RedisResp, SharedRedis};
use crate::wire::{now_ms, Caller, Post, Subscription, REDIS_HOST, REDIS_PORT, SUBSCRIBER_PORT};
use futures::future::BoxFuture;
use payguard::lock::redis::{EpochSource, Grant, RedisLockError, EPOCH_RACE_RETRIES_MAX};
use payguard::lock::release::ReleaseBoard;
use payguard::lock::{token, Lease, OrderLocks};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One instance's lock service.
pub struct SimLocks {
    inst: usize,
    /// `inst{i}.{boot}`: with a counter, a value unique to each acquire.
    owner: String,
    next_owner: AtomicU64,
    net: Caller,
    epochs: EpochSource,
    releases: ReleaseBoard,
    /// [`crate::config::Protocol::reset_counter_on_new_epoch`].
    reset_counter_bug: bool,
    /// Redis as it is: only for telling the oracle whether a new holder is
    /// still the live one when its token is final (no decision reads it).
    truth: SharedRedis,
    oracle: OracleRef,
}

fn unavailable(e: impl std::fmt::Display) -> RedisLockError {
    RedisLockError::Unavailable(e.to_string())
}

/// The lease of `order`'s lock granted to `owner` (as `RedisLocks` encodes it).
fn lease(order: &str, owner: &str, token: i64) -> Lease {
    Lease {
        key: format!("lock:order:{order}\u{0}{owner}"),
        token,
    }
}

impl SimLocks {
    /// The lock service of instance `inst`, started `boot` times; its
    /// subscriber runs on the current host.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        inst: usize,
        boot: u64,
        post: Post,
        net: Caller,
        epochs: EpochSource,
        reset_counter_bug: bool,
        truth: SharedRedis,
        oracle: OracleRef,
    ) -> Arc<SimLocks> {
        let locks = Arc::new(SimLocks {
            inst,
            owner: format!("inst{inst}.{boot}"),
            next_owner: AtomicU64::new(0),
            net,
            epochs,
            releases: ReleaseBoard::default(),
            reset_counter_bug,
            truth,
            oracle,
        });
        tokio::task::spawn_local(subscribe(post, locks.clone()));
        locks
    }

    fn note(&self, line: impl FnOnce() -> String) {
        self.oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{}: {}", self.inst, line()));
    }

    async fn redis(&self, req: RedisReq) -> Result<RedisResp, RedisLockError> {
        self.net
            .call(
                REDIS_HOST,
                REDIS_PORT,
                req,
                Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS),
            )
            .await
            .map_err(unavailable)
    }

    async fn take(&self, orders: &[&str], hints: &[bool]) -> Result<Vec<Grant>, RedisLockError> {
        if hints.len() != orders.len() {
            return Err(unavailable(format!(
                "{} hint flags for {} orders",
                hints.len(),
                orders.len()
            )));
        }
        self.oracle
            .borrow_mut()
            .lock_round_started(self.inst, orders.len());
        let mut got = Err(unavailable(format!(
            "the fence hash was re-created {} times in a row during an acquire",
            EPOCH_RACE_RETRIES_MAX + 1
        )));
        for _ in 0..=EPOCH_RACE_RETRIES_MAX {
            match self.acquire_round(orders, hints).await {
                Ok(Some(grants)) => {
                    got = Ok(grants);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    got = Err(e);
                    break;
                }
            }
        }
        self.oracle
            .borrow_mut()
            .lock_round_ended(self.inst, orders.len());
        if let Ok(grants) = &got {
            let now = now_ms();
            let truth = crate::redis::lock(&self.truth);
            let mut o = self.oracle.borrow_mut();
            for (order, g) in orders.iter().zip(grants) {
                match g {
                    Grant::Busy { .. } => o.stats.parked += 1,
                    Grant::Settled => o.stats.settled_hints += 1,
                    Grant::Held(l) => {
                        let owner = l.key.split_once('\u{0}').map_or("", |(_, owner)| owner);
                        o.token_made(order, l.token, truth.holds(order, owner, now), now);
                    }
                }
            }
        }
        let shown: Vec<String> = match &got {
            Ok(grants) => orders
                .iter()
                .zip(grants)
                .map(|(o, g)| match g {
                    Grant::Held(l) => format!("{o}:{:?}", token::unpack(l.token)),
                    Grant::Busy { left } => format!("{o}:busy {} ms", left.as_millis()),
                    Grant::Settled => format!("{o}:settled"),
                })
                .collect(),
            Err(e) => vec![e.to_string()],
        };
        self.note(|| format!("acquire {shown:?}"));
        got
    }

    /// `RedisLocks::acquire_round`: `None` when the fence hash was re-created
    /// between the grants and their epoch raise (everything granted given back).
    async fn acquire_round(
        &self,
        orders: &[&str],
        hints: &[bool],
    ) -> Result<Option<Vec<Grant>>, RedisLockError> {
        let owner = format!(
            "{}-{}",
            self.owner,
            self.next_owner.fetch_add(1, Ordering::Relaxed)
        );
        let asked = RedisReq::AcquireMany {
            orders: orders.iter().map(|o| (*o).to_owned()).collect(),
            owner: owner.clone(),
            ttl_ms: LOCK_TTL_MS,
            grace_ms: WAITER_MARK_GRACE_MS,
            hints: hints.to_vec(),
        };
        let (epoch, incarnation, answers): AcquireAnswer = match self.redis(asked).await {
            Ok(RedisResp::Acquired(a)) => a,
            Ok(other) => return Err(unavailable(format!("acquire answered {other:?}"))),
            Err(e) => {
                self.give_back_lost_grants(orders, &owner);
                return Err(e);
            }
        };
        if answers.len() != orders.len() {
            return Err(unavailable(format!(
                "acquire answered {} locks for {}",
                answers.len(),
                orders.len()
            )));
        }
        let held: Vec<(&str, i64)> = orders
            .iter()
            .zip(&answers)
            .filter(|(_, n)| **n >= 1)
            .map(|(o, n)| (*o, *n))
            .collect();
        let leases = |epoch: i64| -> Vec<Lease> {
            held.iter()
                .map(|(o, n)| lease(o, &owner, token::pack(epoch, *n)))
                .collect()
        };
        if let Some(n) = answers.iter().find(|n| token::check_counter(**n).is_err()) {
            self.release_settled_inner(&leases(0), &vec![false; held.len()])
                .await?;
            return Err(unavailable(format!(
                "fencing counter {n} is past 2^{}",
                token::COUNTER_BITS
            )));
        }
        let epoch = match epoch {
            Some(e) => e,
            None if held.is_empty() => 0,
            None => match self.new_epoch(incarnation.as_deref().unwrap_or("")).await {
                Ok(Some(e)) => e,
                other => {
                    self.release_settled_inner(&leases(0), &vec![false; held.len()])
                        .await?;
                    return match other {
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
            },
        };
        let mut granted = leases(epoch).into_iter();
        Ok(Some(
            answers
                .iter()
                .map(|n| match *n {
                    n if n >= 1 => Grant::Held(granted.next().expect("one lease per grant")),
                    0 => Grant::Settled,
                    busy => Grant::Busy {
                        left: Duration::from_millis(busy.unsigned_abs() - 1),
                    },
                })
                .collect(),
        ))
    }

    /// `RedisLocks::give_back_lost_grants`: best effort, in the background.
    fn give_back_lost_grants(&self, orders: &[&str], owner: &str) {
        let items: Vec<(String, bool)> = orders.iter().map(|o| ((*o).to_owned(), false)).collect();
        let net = self.net.clone();
        let req = RedisReq::ReleaseMany {
            owner: owner.to_owned(),
            items,
            hint_ms: SETTLED_HINT_MS,
        };
        tokio::spawn(async move {
            let _ = net
                .call::<_, RedisResp>(
                    REDIS_HOST,
                    REDIS_PORT,
                    req,
                    Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS),
                )
                .await;
        });
    }

    /// `RedisLocks::new_epoch`.
    async fn new_epoch(&self, incarnation: &str) -> Result<Option<i64>, RedisLockError> {
        self.oracle.borrow_mut().stats.new_epochs += 1;
        let fresh = (self.epochs)().await.map_err(RedisLockError::Epoch)?;
        let raised = match self
            .redis(RedisReq::RaiseEpoch {
                fresh,
                inc: incarnation.to_owned(),
            })
            .await?
        {
            RedisResp::Raised(r) => r,
            other => return Err(unavailable(format!("raise answered {other:?}"))),
        };
        self.note(|| format!("new epoch: fresh {fresh}, raised {raised:?}"));
        if self.reset_counter_bug && raised.is_some_and(|r| r >= fresh) {
            // The code before e03f2f7: start the counter again under the new epoch.
            self.redis(RedisReq::ResetCounter).await?;
        }
        Ok(raised.map(|e| token::epoch_in_force(e, fresh)))
    }

    /// `release_leases`: every lease of one acquire in one round trip.
    async fn release_settled_inner(
        &self,
        leases: &[Lease],
        settled: &[bool],
    ) -> Result<Vec<bool>, RedisLockError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        if settled.len() != leases.len() {
            return Err(unavailable(format!(
                "{} settled flags for {} leases",
                settled.len(),
                leases.len()
            )));
        }
        let mut owner = None;
        let mut items = Vec::with_capacity(leases.len());
        for (l, s) in leases.iter().zip(settled) {
            let (key, held_by) = l
                .key
                .split_once('\u{0}')
                .ok_or_else(|| unavailable("malformed lease"))?;
            if owner.is_some_and(|o| o != held_by) {
                return Err(unavailable("release_many takes the leases of one acquire"));
            }
            owner = Some(held_by);
            let order = key.strip_prefix("lock:order:").unwrap_or(key);
            items.push((order.to_owned(), *s));
        }
        let req = RedisReq::ReleaseMany {
            owner: owner.unwrap_or_default().to_owned(),
            items,
            hint_ms: SETTLED_HINT_MS,
        };
        match self.redis(req).await? {
            RedisResp::Released(freed) => Ok(freed.into_iter().map(|n| n == 1).collect()),
            other => Err(unavailable(format!("release answered {other:?}"))),
        }
    }
}

impl OrderLocks for SimLocks {
    fn try_acquire_or_settled<'a>(
        &'a self,
        orders: &'a [&'a str],
        hints: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<Grant>, RedisLockError>> {
        Box::pin(self.take(orders, hints))
    }

    fn release_settled<'a>(
        &'a self,
        leases: &'a [Lease],
        settled: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<bool>, RedisLockError>> {
        Box::pin(self.release_settled_inner(leases, settled))
    }

    fn released<'a>(
        &'a self,
        order: &'a str,
        since: Instant,
        left: Duration,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let at_most = left
                .max(Duration::from_millis(1))
                .min(Duration::from_millis(RELEASE_WAIT_MS_MAX));
            let woken = self.releases.released(order, since, at_most).await;
            let mut o = self.oracle.borrow_mut();
            if woken {
                o.stats.woken += 1;
            } else {
                o.stats.fallback_retries += 1;
            }
            woken
        })
    }

    fn wait_max(&self) -> Duration {
        Duration::from_millis(LOCK_WAIT_MS_MAX)
    }
}

/// The instance's subscription to the `released` channel (see the module
/// docs): re-sends `SUBSCRIBE` every [`SUBSCRIPTION_CHECK_MS`] (every Redis
/// timeout while not subscribed) and takes an unanswered one, or an answer from
/// another Redis process, as a lapse.
async fn subscribe(post: Post, locks: Arc<SimLocks>) {
    let Ok(sub) = Subscription::bind(post, SUBSCRIBER_PORT).await else {
        locks.note(|| "cannot bind the subscriber's socket".into());
        return;
    };
    // The Redis process the subscription is known to be on; `None`: lapsed.
    let mut run: Option<u64> = None;
    loop {
        let asked = sub
            .send(REDIS_HOST, REDIS_PORT, Box::new(RedisReq::Subscribe))
            .await
            .ok();
        let window = match run {
            Some(_) => SUBSCRIPTION_CHECK_MS,
            None => REDIS_COMMAND_TIMEOUT_MS,
        };
        let until = now_ms() + window;
        let mut answered = false;
        while now_ms() < until {
            let left = Duration::from_millis(until - now_ms());
            let Ok(got) = tokio::time::timeout(left, sub.recv()).await else {
                break;
            };
            let Ok((id, body)) = got else {
                tokio::time::sleep(left).await;
                continue;
            };
            match body.downcast_ref::<RedisResp>() {
                Some(RedisResp::Message { order }) => {
                    locks.oracle.borrow_mut().stats.notices += 1;
                    locks.releases.notify(order);
                }
                Some(RedisResp::Subscribed { run: r }) if Some(id) == asked => {
                    answered = true;
                    if run != Some(*r) {
                        run = Some(*r);
                        locks.oracle.borrow_mut().stats.resubscriptions += 1;
                        locks.note(|| format!("subscribed (Redis run {r})"));
                        locks.releases.subscribed();
                    }
                }
                _ => {}
            }
        }
        if !answered {
            run = None;
        }
    }
}

/// The batch-locking protocol before issue #12, around the real service.
pub struct JoinAll {
    pub inner: Arc<SimLocks>,
}

impl JoinAll {
    /// One order's waiting acquire: polls with back-off until granted or
    /// [`LOCK_WAIT_MS_MAX`] has passed (then reported busy).
    async fn acquire_one(&self, order: &str) -> Result<Grant, RedisLockError> {
        let started = Instant::now();
        let mut backoff_us = LOCK_RETRY_US_MIN;
        loop {
            let grant = self.inner.take(&[order], &[false]).await?.pop();
            match grant {
                Some(Grant::Held(lease)) => return Ok(Grant::Held(lease)),
                Some(Grant::Busy { left }) if started.elapsed() >= self.inner.wait_max() => {
                    return Ok(Grant::Busy { left })
                }
                Some(Grant::Busy { .. }) => {}
                other => return Err(unavailable(format!("acquire answered {other:?}"))),
            }
            tokio::time::sleep(Duration::from_micros(backoff_us)).await;
            backoff_us = (backoff_us * 2).min(LOCK_RETRY_US_MAX);
        }
    }
}

impl OrderLocks for JoinAll {
    /// `join_all` of one waiting acquire per order, hints ignored (there were
    /// none). One order's lock unavailable gives every grant back and fails the
    /// batch's locks (it is written without tokens).
    fn try_acquire_or_settled<'a>(
        &'a self,
        orders: &'a [&'a str],
        _hints: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<Grant>, RedisLockError>> {
        Box::pin(async move {
            let got = futures::future::join_all(orders.iter().map(|o| self.acquire_one(o))).await;
            if let Some(Err(e)) = got.iter().find(|g| g.is_err()) {
                let e = e.clone();
                for g in got.into_iter().flatten() {
                    if let Grant::Held(l) = g {
                        let _ = self.inner.release(&l).await;
                    }
                }
                return Err(e);
            }
            Ok(got.into_iter().flatten().collect())
        })
    }

    /// The leases of a batch came from separate acquires (one owner each): one
    /// release each.
    fn release_settled<'a>(
        &'a self,
        leases: &'a [Lease],
        settled: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<bool>, RedisLockError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(leases.len());
            for (l, s) in leases.iter().zip(settled) {
                out.push(
                    self.inner
                        .release_settled_inner(std::slice::from_ref(l), &[*s])
                        .await?
                        .first()
                        .copied()
                        .unwrap_or(false),
                );
            }
            Ok(out)
        })
    }

    fn released<'a>(
        &'a self,
        order: &'a str,
        since: Instant,
        left: Duration,
    ) -> BoxFuture<'a, bool> {
        self.inner.released(order, since, left)
    }

    fn wait_max(&self) -> Duration {
        self.inner.wait_max()
    }
}
