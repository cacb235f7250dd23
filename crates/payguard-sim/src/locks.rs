//! The simulated lock service: payguard's own Redis lock client
//! (`payguard::lock::redis::RedisLocks`, every step of it) over the simulated
//! network to the simulated Redis ([`crate::redis`], which runs the client's
//! Lua scripts), and the wrapper that turns it back into the batch-locking
//! protocol before issue #12.
//!
//! Why: the engine's batch path (`fenced_apply`, parking, release wake-ups)
//! and the lock client under it must run unchanged. The client is written over
//! a transport whose one call evaluates a lock script; [`SimRedisCalls`] is the
//! simulation's: it sends the script's text, keys and args to the Redis host
//! and waits at most the (scaled) command timeout, so a lost or late answer is
//! the client's to handle, as in production. Each instance boot's acquires get
//! owners from a counter of its own ([`owner_ids`]), so a seed replays exactly.
//! [`SimLocks`] adds nothing to the protocol: it passes each call to the real
//! client and tells the oracle what came back (grants, parked orders, tokens
//! and whether their holder is still the live one in Redis).
//!
//! Waiting for a release uses the real client's [`ReleaseBoard`], fed by this
//! module's subscriber task over the simulated pub/sub (payguard's own
//! subscriber, `spawn_subscriber`, is written against a real connection's
//! message stream, so it is not run here): it re-subscribes when it cannot
//! tell whether its subscription lapsed (a real client sees its connection
//! drop) and then wakes every waiter, as `spawn_subscriber` does.
//!
//! [`JoinAll`] is the protocol before issue #12: each order of a batch is
//! acquired on its own, waiting (polling with back-off) while the others
//! already granted stay held, until the wait limit. Across instances that
//! deadlocks until the limit; the simulation must see it.

use crate::config::{
    ScriptSwap, LOCK_RETRY_US_MAX, LOCK_RETRY_US_MIN, LOCK_TTL_MS, LOCK_WAIT_MS_MAX,
    REDIS_COMMAND_TIMEOUT_MS, RELEASE_WAIT_MS_MAX, SETTLED_HINT_MS, SUBSCRIPTION_CHECK_MS,
    WAITER_MARK_GRACE_MS,
};
use crate::oracle::OracleRef;
use crate::redis::{RedisReq, RedisResp, SharedRedis};
use crate::wire::{now_ms, Caller, Post, Subscription, REDIS_HOST, REDIS_PORT, SUBSCRIBER_PORT};
use futures::future::BoxFuture;
use payguard::lock::redis::{
    released_channel, EpochSource, Grant, LockTransport, OwnerIds, RedisLockConfig, RedisLockError,
    RedisLocks, RAISE_EPOCH,
};
use payguard::lock::release::ReleaseBoard;
use payguard::lock::{token, Lease, OrderLocks};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Prefix of every key the simulated instances use.
pub const KEY_PREFIX: &str = "sim";

fn unavailable(e: impl std::fmt::Display) -> RedisLockError {
    RedisLockError::Unavailable(e.to_string())
}

/// The lock client's limits, scaled to the simulation's clock
/// ([`crate::config`]); production passes `RedisLockConfig::new`'s.
pub fn lock_config(owner: &str) -> RedisLockConfig {
    RedisLockConfig {
        prefix: KEY_PREFIX.to_owned(),
        owner: owner.to_owned(),
        ttl: Duration::from_millis(LOCK_TTL_MS),
        command_timeout_ms: REDIS_COMMAND_TIMEOUT_MS,
        release_wait_ms_max: RELEASE_WAIT_MS_MAX,
        waiter_mark_grace_ms: WAITER_MARK_GRACE_MS,
        settled_hint_ms: SETTLED_HINT_MS,
        lock_wait_ms_max: LOCK_WAIT_MS_MAX,
    }
}

/// Owner values for one instance boot: 0, 1, 2, ... (after the client's
/// `inst{i}.{boot}:`), the same on every replay of a seed.
pub fn owner_ids() -> OwnerIds {
    let next = AtomicU64::new(0);
    Arc::new(move || next.fetch_add(1, Ordering::Relaxed).to_string())
}

/// The simulation's transport: one call over the simulated network to the
/// Redis host per script, timed out as a real command would be.
pub struct SimRedisCalls {
    inst: usize,
    net: Caller,
    timeout: Duration,
    /// A script text sent instead of a shipped one (a broken variant).
    swap: Option<ScriptSwap>,
    oracle: OracleRef,
}

impl SimRedisCalls {
    pub fn new(
        inst: usize,
        net: Caller,
        config: &RedisLockConfig,
        swap: Option<ScriptSwap>,
        oracle: OracleRef,
    ) -> Self {
        SimRedisCalls {
            inst,
            net,
            timeout: Duration::from_millis(config.command_timeout_ms),
            swap,
            oracle,
        }
    }
}

impl LockTransport for SimRedisCalls {
    fn eval<'a>(
        &'a self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'a, Result<redis::Value, String>> {
        Box::pin(async move {
            let sent = match self.swap {
                Some(swap) if swap.shipped == script => swap.runs,
                _ => script,
            };
            let raise = (script == RAISE_EPOCH).then(|| args.first().cloned());
            let req = RedisReq::Eval {
                script: sent,
                keys,
                args,
            };
            let answer = match self
                .net
                .call::<_, RedisResp>(REDIS_HOST, REDIS_PORT, req, self.timeout)
                .await
            {
                Ok(RedisResp::Reply(r)) => r,
                Ok(other) => Err(format!("a script answered {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            if let (Some(fresh), Ok(raised)) = (raise, &answer) {
                let fresh = fresh.unwrap_or_default();
                self.oracle.borrow_mut().note(now_ms(), || {
                    format!(
                        "inst{}: new epoch: fresh {fresh}, raised {raised:?}",
                        self.inst
                    )
                });
            }
            answer
        })
    }
}

/// One instance's lock service: payguard's client, watched.
pub struct SimLocks {
    inst: usize,
    real: RedisLocks,
    /// Redis as it is: only for telling the oracle whether a new holder is
    /// still the live one when its token is final (no decision reads it).
    truth: SharedRedis,
    oracle: OracleRef,
}

impl SimLocks {
    /// The lock service of instance `inst`, started `boot` times: payguard's
    /// client over [`SimRedisCalls`], taking new epochs from `epochs` (the
    /// store's sequence); its subscriber runs on the current host.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        inst: usize,
        boot: u64,
        post: Post,
        net: Caller,
        epochs: EpochSource,
        swap: Option<ScriptSwap>,
        truth: SharedRedis,
        oracle: OracleRef,
    ) -> Arc<SimLocks> {
        let config = lock_config(&format!("inst{inst}.{boot}"));
        let transport = SimRedisCalls::new(inst, net, &config, swap, oracle.clone());
        let counted = {
            let oracle = oracle.clone();
            let epochs = epochs.clone();
            let counted: EpochSource = Arc::new(move || {
                oracle.borrow_mut().stats.new_epochs += 1;
                epochs()
            });
            counted
        };
        let releases = ReleaseBoard::default();
        let real = RedisLocks::over(
            Arc::new(transport),
            config,
            owner_ids(),
            counted,
            releases.clone(),
        );
        tokio::task::spawn_local(subscribe(post, inst, releases, oracle.clone()));
        Arc::new(SimLocks {
            inst,
            real,
            truth,
            oracle,
        })
    }

    fn note(&self, line: impl FnOnce() -> String) {
        self.oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{}: {}", self.inst, line()));
    }

    /// The real acquire, and what the oracle learns from it.
    async fn take(&self, orders: &[&str], hints: &[bool]) -> Result<Vec<Grant>, RedisLockError> {
        self.oracle
            .borrow_mut()
            .lock_round_started(self.inst, orders.len());
        let got = self.real.try_acquire_or_settled(orders, hints).await;
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
                        let (key, owner) = l.key.split_once('\u{0}').unwrap_or((&l.key, ""));
                        o.token_made(order, l.token, truth.holds(key, owner, now), now);
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
        Box::pin(self.real.release_settled(leases, settled))
    }

    fn released<'a>(
        &'a self,
        order: &'a str,
        since: Instant,
        left: Duration,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let woken = self.real.released(order, since, left).await;
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
        OrderLocks::wait_max(&self.real)
    }
}

/// The instance's subscription to the `released` channel (see the module
/// docs): re-sends `SUBSCRIBE` every [`SUBSCRIPTION_CHECK_MS`] (every Redis
/// timeout while not subscribed) and takes an unanswered one, or an answer from
/// another Redis process, as a lapse.
async fn subscribe(post: Post, inst: usize, releases: ReleaseBoard, oracle: OracleRef) {
    let note = |line: String| {
        oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{inst}: {line}"))
    };
    let Ok(sub) = Subscription::bind(post, SUBSCRIBER_PORT).await else {
        note("cannot bind the subscriber's socket".into());
        return;
    };
    let channel = released_channel(KEY_PREFIX);
    // The Redis process the subscription is known to be on; `None`: lapsed.
    let mut run: Option<u64> = None;
    loop {
        let asked = sub
            .send(
                REDIS_HOST,
                REDIS_PORT,
                Box::new(RedisReq::Subscribe {
                    channel: channel.clone(),
                }),
            )
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
                Some(RedisResp::Message {
                    channel: c,
                    payload,
                }) if *c == channel => {
                    oracle.borrow_mut().stats.notices += 1;
                    releases.notify(payload);
                }
                Some(RedisResp::Subscribed { run: r }) if Some(id) == asked => {
                    answered = true;
                    if run != Some(*r) {
                        run = Some(*r);
                        oracle.borrow_mut().stats.resubscriptions += 1;
                        note(format!("subscribed (Redis run {r})"));
                        releases.subscribed();
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
                        .release_settled(std::slice::from_ref(l), &[*s])
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
