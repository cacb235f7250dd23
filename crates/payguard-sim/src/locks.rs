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
//! Waiting for a release uses the real client's [`ReleaseBoard`], fed by
//! payguard's own release subscriber (`payguard::lock::release::subscriber`,
//! the loop `spawn_subscriber` runs in production, with its limits scaled by
//! [`subscriber_config`]) over a feed of this module, [`SimReleaseFeed`]: its
//! subscribe sends `SUBSCRIBE` over the simulated network and waits for the
//! answer, and its stream yields the releases the simulated Redis pushes and
//! ends when the subscription is lost. A real pub/sub connection drops when
//! Redis restarts or the link breaks; datagrams cannot tell, so the feed
//! probes its subscription (`SUBSCRIBE` again every
//! [`SUBSCRIPTION_CHECK_MS`]) and ends the stream when a probe goes
//! unanswered or another Redis run answers. That probe is the transport's
//! stand-in for TCP, not part of the subscriber: payguard's loop subscribes
//! again after its pause and wakes every waiter, as in production. The feed
//! counts the oracle's `notices` (releases it delivers) and `resubscriptions`
//! (subscriptions it opens; the loop wakes every waiter on each).
//!
//! [`JoinAll`] is the protocol before issue #12: each order of a batch is
//! acquired on its own, waiting (polling with back-off) while the others
//! already granted stay held, until the wait limit. Across instances that
//! deadlocks until the limit; the simulation must see it.

use crate::config::{
    ScriptSwap, LOCK_RETRY_US_MAX, LOCK_RETRY_US_MIN, LOCK_TTL_MS, LOCK_WAIT_MS_MAX,
    REDIS_COMMAND_TIMEOUT_MS, RELEASE_WAIT_MS_MAX, RESUBSCRIBE_PAUSE_MS, SETTLED_HINT_MS,
    SUBSCRIBE_TIMEOUT_MS, SUBSCRIPTION_CHECK_MS, WAITER_MARK_GRACE_MS,
};
use crate::oracle::OracleRef;
use crate::redis::{RedisReq, RedisResp, SharedRedis};
use crate::wire::{now_ms, Caller, Post, Subscription, REDIS_HOST, REDIS_PORT, SUBSCRIBER_PORT};
use futures::future::BoxFuture;
use futures::stream::{LocalBoxStream, StreamExt};
use payguard::lock::redis::{
    released_channel, EpochSource, Grant, LockTransport, OwnerIds, RedisLockConfig, RedisLockError,
    RedisLocks, RAISE_EPOCH,
};
use payguard::lock::release::{subscriber, ReleaseBoard, ReleaseFeed, SubscriberConfig};
use payguard::lock::{token, Lease, OrderLocks};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
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
    /// Dropping it stops the release subscriber.
    _stop_subscriber: oneshot::Sender<()>,
}

impl SimLocks {
    /// The lock service of instance `inst`, started `boot` times: payguard's
    /// client over [`SimRedisCalls`], taking new epochs from `epochs` (the
    /// store's sequence); payguard's release subscriber runs on the current
    /// host over a [`SimReleaseFeed`].
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
        let (stop, stopped) = oneshot::channel();
        tokio::task::spawn_local(subscriber(
            SimReleaseFeed::new(inst, post, oracle.clone()),
            released_channel(KEY_PREFIX),
            &releases,
            subscriber_config(),
            stopped,
        ));
        Arc::new(SimLocks {
            inst,
            real,
            truth,
            oracle,
            _stop_subscriber: stop,
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

/// The release subscriber's limits, scaled to the simulation's clock
/// ([`crate::config`]); production passes `SubscriberConfig::default()`'s.
pub fn subscriber_config() -> SubscriberConfig {
    SubscriberConfig {
        resubscribe_pause_ms: RESUBSCRIBE_PAUSE_MS,
        subscribe_timeout_ms: SUBSCRIBE_TIMEOUT_MS,
    }
}

/// The simulation's release feed (see the module docs): `SUBSCRIBE` over the
/// simulated network from the instance's subscriber socket, answered once the
/// simulated Redis has registered it; the stream then yields the releases
/// Redis pushes to that socket and ends when the subscription is lost.
pub struct SimReleaseFeed {
    inst: usize,
    post: Post,
    /// Bound at the first subscribe on [`SUBSCRIBER_PORT`] (where Redis
    /// pushes) and kept: Redis knows a subscriber by its address.
    sock: Option<Rc<Subscription>>,
    oracle: OracleRef,
}

impl SimReleaseFeed {
    pub fn new(inst: usize, post: Post, oracle: OracleRef) -> Self {
        SimReleaseFeed {
            inst,
            post,
            sock: None,
            oracle,
        }
    }

    fn note(&self, line: String) {
        let inst = self.inst;
        self.oracle
            .borrow_mut()
            .note(now_ms(), || format!("inst{inst}: {line}"));
    }
}

impl ReleaseFeed for SimReleaseFeed {
    type Messages = LocalBoxStream<'static, String>;
    type Error = String;

    /// Sends `SUBSCRIBE` and waits for its answer (the subscriber's loop
    /// bounds the wait). Releases that arrive first are kept and yielded
    /// first: they may be on the new subscription.
    async fn subscribe(&mut self, channel: &str) -> Result<Self::Messages, String> {
        let sock = match &self.sock {
            Some(sock) => sock.clone(),
            None => {
                let sock = Subscription::bind(self.post.clone(), SUBSCRIBER_PORT)
                    .await
                    .map_err(|e| format!("cannot bind the subscriber's socket: {e}"))?;
                self.sock.insert(Rc::new(sock)).clone()
            }
        };
        let req = RedisReq::Subscribe {
            channel: channel.to_owned(),
        };
        let asked = sock
            .send(REDIS_HOST, REDIS_PORT, Box::new(req))
            .await
            .map_err(|e| e.to_string())?;
        let until = now_ms() + REDIS_COMMAND_TIMEOUT_MS;
        let mut early = VecDeque::new();
        let run = loop {
            let (id, body) = sock.recv().await.map_err(|e| e.to_string())?;
            match body.downcast_ref::<RedisResp>() {
                Some(RedisResp::Message {
                    channel: c,
                    payload,
                }) if c == channel => early.push_back(payload.clone()),
                Some(RedisResp::Subscribed { run }) if id == asked => break *run,
                _ => {}
            }
        };
        self.oracle.borrow_mut().stats.resubscriptions += 1;
        self.note(format!("subscribed (Redis run {run})"));
        let watch = Watch {
            inst: self.inst,
            sock,
            channel: channel.to_owned(),
            run,
            asked: Some(asked),
            answered: true,
            until,
            early,
            oracle: self.oracle.clone(),
        };
        Ok(futures::stream::unfold(watch, |mut w| async move {
            let payload = w.next().await?;
            Some((payload, w))
        })
        .boxed_local())
    }
}

/// One subscription's stream and its liveness probe. A real pub/sub
/// connection ends when Redis restarts or the link breaks; a datagram
/// subscription cannot tell, so the probe stands in for the TCP connection's
/// loss: `SUBSCRIBE` is sent again every [`SUBSCRIPTION_CHECK_MS`] (the first
/// time one command timeout after the subscribe), and a probe unanswered by
/// the next, or answered by another Redis run (a restart forgot every
/// subscription; the probe's own `SUBSCRIBE` is not counted as the new one),
/// ends the stream. Noticing the loss is this transport's job: payguard's
/// subscriber only subscribes again once the stream ends, as it does when a
/// connection drops.
struct Watch {
    inst: usize,
    sock: Rc<Subscription>,
    channel: String,
    /// The Redis process the subscription was made on.
    run: u64,
    /// The last probe's call id (`None`: it could not be sent).
    asked: Option<u64>,
    answered: bool,
    /// When the last probe's window closes (simulated ms).
    until: u64,
    /// Releases received before the subscription was confirmed.
    early: VecDeque<String>,
    oracle: OracleRef,
}

impl Watch {
    fn lost(&self, why: String) -> Option<String> {
        let inst = self.inst;
        self.oracle.borrow_mut().note(now_ms(), || {
            format!("inst{inst}: release subscription lost: {why}")
        });
        None
    }

    /// The next release, or `None` once the subscription is lost.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(payload) = self.early.pop_front() {
                self.oracle.borrow_mut().stats.notices += 1;
                return Some(payload);
            }
            if now_ms() >= self.until {
                if !self.answered {
                    return self.lost("a check went unanswered".into());
                }
                let req = RedisReq::Subscribe {
                    channel: self.channel.clone(),
                };
                self.asked = self
                    .sock
                    .send(REDIS_HOST, REDIS_PORT, Box::new(req))
                    .await
                    .ok();
                self.answered = false;
                self.until = now_ms() + SUBSCRIPTION_CHECK_MS;
                continue;
            }
            let left = Duration::from_millis(self.until - now_ms());
            let Ok(got) = tokio::time::timeout(left, self.sock.recv()).await else {
                continue;
            };
            let Ok((id, body)) = got else {
                tokio::time::sleep(left).await;
                continue;
            };
            match body.downcast_ref::<RedisResp>() {
                Some(RedisResp::Message { channel, payload }) if *channel == self.channel => {
                    self.oracle.borrow_mut().stats.notices += 1;
                    return Some(payload.clone());
                }
                Some(RedisResp::Subscribed { run }) if Some(id) == self.asked => {
                    self.answered = true;
                    if *run != self.run {
                        return self.lost(format!("Redis run {run} answered (a restart)"));
                    }
                }
                _ => {}
            }
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
