//! Cross-instance per-order locks in Redis, with fencing tokens.
//!
//! `lock:order:{id}` is taken with `SET NX PX` and released with a compare-and-
//! delete script, and the same acquire script `INCR`s a fencing counter, so every
//! grant gets a number no earlier grant had. The store keeps, per order, the
//! highest token that wrote it and refuses lower ones: a holder that paused past
//! its TTL (GC, SIGSTOP) and lost the lock to another instance cannot write.
//!
//! A Redis flush or restart resets `INCR`. Tokens are therefore `(epoch, n)`
//! packed as `epoch << 32 | n`, with the epoch taken from a database sequence
//! (which only grows) whenever the acquire script finds the epoch key missing: the
//! first token after a reset is `(new epoch, 1)`, above every token before it, so
//! a reset never wedges an order.
//!
//! Raising the epoch is a second call, so it can be delayed across another flush
//! and land on a hash re-created since. Unchecked, that raise would put an old
//! epoch back under the new counter, below tokens already written, and every
//! later holder of such an order would be refused (found by the deterministic
//! simulation, `crates/payguard-sim`, seed 2424). So the hash remembers its
//! incarnation (the owner of its first grant), the acquire script returns it,
//! and the raise applies only to the same incarnation; a refused raise gives the
//! lock back and the acquire starts over on the new incarnation.
//!
//! A batch takes all its orders' locks in one round trip ([`RedisLocks::try_acquire_many`]):
//! the script grants the free ones and reports the busy ones with their holder's
//! remaining TTL, and marks that someone waits for them. Nobody ever holds a lock
//! while waiting for another, so instances cannot wait on each other in a cycle
//! (issue #12: `join_all` of waiting acquires did, and stalled 5 s). Busy orders
//! wait for the holder's release, which publishes their id ([`super::release`]),
//! then try again. Releases are one round trip too ([`RedisLocks::release_many`]).
//!
//! A release may also leave a *settled hint* (`lock:order:{id}:s`, for
//! [`SETTLED_HINT_MS`]): the holder's batch charged the order (or found it
//! charged or declined). An acquire that asks for hints
//! ([`RedisLocks::try_acquire_or_settled`]) answers [`Grant::Settled`] for such an
//! order instead of granting its lock, and the engine reads the committed state
//! first: a duplicate that arrives after the charge is answered by a read, with
//! no lock, no write and no release. The hint is never the truth: only the
//! database's answer is, and an op the committed state does not settle (a new
//! refund) takes the lock after all, in a second acquire that ignores hints.
//!
//! The client's steps are written once, over a [`LockTransport`] whose one call
//! evaluates a script ([`scripts`]): production's is a Redis connection
//! ([`RedisConnection`]), the deterministic simulation's its simulated network
//! to a Redis model running the same Lua, so the simulation runs this code and
//! these scripts, not a re-statement of them. Every time limit the simulation
//! scales down is a field of [`RedisLockConfig`].
//!
//! The lock is an optimisation. If Redis cannot be reached, the engine writes
//! without a token and the database's constraints still make every order charge
//! at most once; a request then either succeeds correctly or fails with 503.

pub mod scripts;
pub mod transport;

pub use scripts::{ACQUIRE_MANY, LOCK_SCRIPTS, RAISE_EPOCH, RELEASE_MANY};
pub use transport::{LockTransport, RedisConnection};

use super::release::{spawn_subscriber, ReleaseBoard};
use super::service::OrderLocks;
use super::token;
use super::Lease;
use crate::mutants::{armed, Mutant};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long one Redis command may take before the lock counts as unavailable.
pub const REDIS_COMMAND_TIMEOUT_MS: u64 = 500;
/// Connecting may take this many command timeouts.
const CONNECT_TIMEOUTS: u64 = 4;
/// Longest a busy order waits for its holder's release notification before it
/// tries again anyway (a lost notification costs at most this). A holder that
/// died is waited for no longer than its lock's remaining TTL either.
pub const RELEASE_WAIT_MS_MAX: u64 = 250;
/// A waiter marker outlives the lock it waits on by this much, so the holder's
/// release still finds it.
pub const WAITER_MARK_GRACE_MS: u64 = 1_000;
/// How long a settled hint outlives the release that left it: duplicates and
/// client retries of a charge come within seconds.
pub const SETTLED_HINT_MS: u64 = 30_000;
/// Acquires redone in a row when a Redis flush re-creates the fence hash between
/// a grant and its epoch raise; past this the batch writes without tokens.
pub const EPOCH_RACE_RETRIES_MAX: usize = 3;

/// What a lock client is: whose keys, which instance, and every time limit it
/// keeps. [`RedisLockConfig::new`] has production's limits (the constants of
/// this module); the simulation scales them down to its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLockConfig {
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    pub prefix: String,
    /// This instance's name: every acquire's owner starts with it.
    pub owner: String,
    /// A grant's lease.
    pub ttl: Duration,
    /// One command's timeout (production: [`REDIS_COMMAND_TIMEOUT_MS`]; the
    /// transport applies it).
    pub command_timeout_ms: u64,
    /// [`RELEASE_WAIT_MS_MAX`].
    pub release_wait_ms_max: u64,
    /// [`WAITER_MARK_GRACE_MS`].
    pub waiter_mark_grace_ms: u64,
    /// [`SETTLED_HINT_MS`].
    pub settled_hint_ms: u64,
    /// How long a request waits in all for a lock held elsewhere
    /// ([`super::LOCK_WAIT_MS_MAX`]; [`OrderLocks::wait_max`]).
    pub lock_wait_ms_max: u64,
}

impl RedisLockConfig {
    /// Production's limits, with this prefix, owner and lease.
    pub fn new(prefix: &str, owner: &str, ttl: Duration) -> Self {
        RedisLockConfig {
            prefix: prefix.to_owned(),
            owner: owner.to_owned(),
            ttl,
            command_timeout_ms: REDIS_COMMAND_TIMEOUT_MS,
            release_wait_ms_max: RELEASE_WAIT_MS_MAX,
            waiter_mark_grace_ms: WAITER_MARK_GRACE_MS,
            settled_hint_ms: SETTLED_HINT_MS,
            lock_wait_ms_max: super::LOCK_WAIT_MS_MAX,
        }
    }
}

/// Where each acquire's owner value comes from: unique to the acquire (with
/// [`RedisLockConfig::owner`] before it), for compare-and-delete. Production:
/// the process id and a counter; the simulation: a counter per instance boot,
/// so a seed replays with the same values.
pub type OwnerIds = Arc<dyn Fn() -> String + Send + Sync>;

/// Where new fencing epochs come from: a sequence that only grows and outlives
/// Redis (payguard: the store's, handed over by the engine's composition,
/// [`crate::engine::fence_epochs`]). The lock needs this one call, not the store.
pub type EpochSource =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<i64, String>> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisLockError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("lock {key} is held elsewhere (waited {waited_ms} ms)")]
    Busy { key: String, waited_ms: u64 },
    #[error("could not take a new fencing epoch: {0}")]
    Epoch(String),
}

/// One order's answer from [`RedisLocks::try_acquire_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Held(Lease),
    /// Held elsewhere; its lease ends within `left` at the latest.
    Busy {
        left: Duration,
    },
    /// Not taken: a recent holder left the order's settled hint, so the
    /// committed state probably answers its ops without the lock (only from
    /// [`RedisLocks::try_acquire_or_settled`]).
    Settled,
}

pub struct RedisLocks {
    transport: Arc<dyn LockTransport>,
    config: RedisLockConfig,
    owner_ids: OwnerIds,
    epochs: EpochSource,
    releases: ReleaseBoard,
    /// Dropping it stops the release subscriber (production's; `None` when
    /// the caller feeds `releases` itself).
    _stop_subscriber: Option<oneshot::Sender<()>>,
}

fn unavailable(e: impl std::fmt::Display) -> RedisLockError {
    RedisLockError::Unavailable(e.to_string())
}

impl RedisLocks {
    /// Connects to the Redis at `url` with production's limits
    /// ([`RedisLockConfig::new`]) and starts the release subscriber.
    pub async fn connect(
        url: &str,
        prefix: &str,
        owner: &str,
        ttl: Duration,
        epochs: EpochSource,
    ) -> Result<Self, RedisLockError> {
        let config = RedisLockConfig::new(prefix, owner, ttl);
        let client = redis::Client::open(url).map_err(unavailable)?;
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let conn = tokio::time::timeout(
            timeout * CONNECT_TIMEOUTS as u32,
            RedisConnection::connect(client.clone(), timeout),
        )
        .await
        .map_err(|_| RedisLockError::Unavailable(format!("connecting to {url} timed out")))?
        .map_err(unavailable)?;
        let releases = ReleaseBoard::default();
        let (stop, stopped) = oneshot::channel();
        spawn_subscriber(client, released_channel(&config.prefix), &releases, stopped);
        let mut locks = RedisLocks::over(
            Arc::new(conn),
            config,
            Arc::new(uuid_like),
            epochs,
            releases,
        );
        locks._stop_subscriber = Some(stop);
        Ok(locks)
    }

    /// The client over any transport, waking its waiters from `releases`,
    /// which the caller feeds from the `{prefix}:released` channel
    /// ([`released_channel`]; production: [`RedisLocks::connect`]'s
    /// subscriber, the simulation: its simulated pub/sub).
    pub fn over(
        transport: Arc<dyn LockTransport>,
        config: RedisLockConfig,
        owner_ids: OwnerIds,
        epochs: EpochSource,
        releases: ReleaseBoard,
    ) -> Self {
        RedisLocks {
            transport,
            config,
            owner_ids,
            epochs,
            releases,
            _stop_subscriber: None,
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.config.prefix)
    }

    fn lock_key(&self, order: &str) -> String {
        self.key(&format!("lock:order:{order}"))
    }

    /// One attempt at the lock of every order in `orders` (distinct ids), in one
    /// round trip: the free ones are granted, the busy ones reported, none waited
    /// for. The answer has one [`Grant`] per order, in order (never `Settled`).
    pub async fn try_acquire_many(&self, orders: &[&str]) -> Result<Vec<Grant>, RedisLockError> {
        self.try_acquire_or_settled(orders, &vec![false; orders.len()])
            .await
    }

    /// Like [`RedisLocks::try_acquire_many`], but an order whose `hints` flag is
    /// set and whose settled hint is present is answered [`Grant::Settled`], and
    /// its lock is not taken (see the module docs).
    pub async fn try_acquire_or_settled(
        &self,
        orders: &[&str],
        hints: &[bool],
    ) -> Result<Vec<Grant>, RedisLockError> {
        if hints.len() != orders.len() {
            return Err(RedisLockError::Unavailable(format!(
                "{} hint flags for {} orders",
                hints.len(),
                orders.len()
            )));
        }
        for _ in 0..=EPOCH_RACE_RETRIES_MAX {
            if let Some(grants) = self.acquire_round(orders, hints).await? {
                return Ok(grants);
            }
        }
        Err(RedisLockError::Unavailable(format!(
            "the fence hash was re-created {} times in a row during an acquire",
            EPOCH_RACE_RETRIES_MAX + 1
        )))
    }

    /// One ACQUIRE_MANY; `None` when the fence hash was re-created between the
    /// grants and their epoch raise (everything granted is given back).
    async fn acquire_round(
        &self,
        orders: &[&str],
        hints: &[bool],
    ) -> Result<Option<Vec<Grant>>, RedisLockError> {
        let owner = format!("{}:{}", self.config.owner, (self.owner_ids)());
        let keys: Vec<String> = orders.iter().map(|o| self.lock_key(o)).collect();
        let mut script_keys = Vec::with_capacity(1 + 3 * keys.len());
        script_keys.push(self.key("fence"));
        for key in &keys {
            script_keys.extend([key.clone(), format!("{key}:w"), format!("{key}:s")]);
        }
        let mut args = vec![
            owner.clone(),
            (self.config.ttl.as_millis() as u64).to_string(),
            self.config.waiter_mark_grace_ms.to_string(),
        ];
        args.extend(hints.iter().map(|&h| if h { "1" } else { "0" }.to_owned()));
        let answer = self.transport.eval(ACQUIRE_MANY, script_keys, args).await;
        // An answer that is missing, unreadable or of the wrong length may
        // still hide grants the script made: give back whatever it took.
        let (epoch, incarnation, answers): AcquireAnswer = match answer
            .map_err(unavailable)
            .and_then(|v| parse_acquire(v).map_err(unavailable))
        {
            Ok(parsed) => parsed,
            Err(e) => {
                self.give_back_lost_grants(&keys, &owner);
                return Err(e);
            }
        };
        if answers.len() != orders.len() {
            self.give_back_lost_grants(&keys, &owner);
            return Err(RedisLockError::Unavailable(format!(
                "acquire answered {} locks for {}",
                answers.len(),
                orders.len()
            )));
        }
        let held: Vec<(&String, i64)> = keys
            .iter()
            .zip(&answers)
            .filter(|(_, n)| **n >= 1)
            .map(|(k, n)| (k, *n))
            .collect();
        let leases = |epoch: i64| -> Vec<Lease> {
            held.iter()
                .map(|(key, n)| Lease {
                    key: format!("{key}\u{0}{owner}"),
                    token: token::pack(epoch, *n),
                })
                .collect()
        };
        // 2^32 grants since the last reset: refuse rather than wrap the token.
        if let Some(n) = answers.iter().find(|n| token::check_counter(**n).is_err()) {
            self.release_many(&leases(0)).await?;
            return Err(RedisLockError::Unavailable(format!(
                "fencing counter {n} is past 2^{}; delete the {} key to start a new epoch",
                token::COUNTER_BITS,
                self.key("fence")
            )));
        }
        let epoch = match epoch {
            Some(e) => e,
            None if held.is_empty() => 0,
            // The fence hash is gone (flush, restart, eviction): take a new epoch
            // from the database, which only grows.
            None => match self.new_epoch(incarnation.as_deref().unwrap_or("")).await {
                Ok(Some(e)) => e,
                other => {
                    // Re-created again since these grants (or no epoch to be had):
                    // give the locks back before answering.
                    self.release_many(&leases(0)).await?;
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

    /// After an ACQUIRE_MANY whose answer was lost: the script may have run, and
    /// whatever it granted would stay held until the TTL. Gives it back in the
    /// background (best effort; `owner` is unique to that call), so the batch,
    /// which now writes without tokens, does not wait.
    fn give_back_lost_grants(&self, keys: &[String], owner: &str) {
        let leases: Vec<Lease> = keys
            .iter()
            .map(|key| Lease {
                key: format!("{key}\u{0}{owner}"),
                token: 0,
            })
            .collect();
        let unsettled = vec![false; leases.len()];
        let transport = self.transport.clone();
        let (prefix, hint_ms) = (self.config.prefix.clone(), self.config.settled_hint_ms);
        tokio::spawn(async move {
            let given_back =
                release_leases(&*transport, &prefix, hint_ms, &leases, &unsettled).await;
            if let Err(e) = given_back {
                tracing::warn!(
                    event = "lock_give_back_failed",
                    detail = %e,
                    "the grants of an unanswered acquire stay held until their TTL"
                );
            }
        });
    }

    /// A new epoch for the hash incarnation `incarnation`; `None` when the hash
    /// has been re-created since (the raise would regress the new incarnation).
    async fn new_epoch(&self, incarnation: &str) -> Result<Option<i64>, RedisLockError> {
        let fresh = (self.epochs)().await.map_err(RedisLockError::Epoch)?;
        let fence = self.key("fence");
        let raised = self
            .transport
            .eval(
                RAISE_EPOCH,
                vec![fence.clone()],
                vec![fresh.to_string(), incarnation.to_owned()],
            )
            .await
            .map_err(unavailable)?;
        let epoch: Option<i64> = redis::from_redis_value(raised).map_err(unavailable)?;
        let Some(epoch) = epoch else {
            tracing::warn!(
                event = "fence_epoch_refused",
                fresh,
                "the fence hash was re-created since this grant; acquiring again"
            );
            return Ok(None);
        };
        if epoch >= fresh && armed(Mutant::ResetCounterOnNewEpoch) {
            // The code before e03f2f7 (a deliberate bug, for the simulation).
            self.transport
                .eval(crate::mutants::RESET_COUNTER, vec![fence], Vec::new())
                .await
                .map_err(unavailable)?;
        }
        tracing::warn!(
            event = "fence_epoch",
            epoch,
            "the fencing counter was reset (flush or restart); new epoch"
        );
        // Another instance may have raised it further meanwhile: use the higher.
        Ok(Some(token::epoch_in_force(epoch, fresh)))
    }

    /// Waits until `order`'s lock was released after `since` (when the acquire
    /// that found it busy was sent), or for `left` (its holder's remaining lease)
    /// capped at [`RedisLockConfig::release_wait_ms_max`]. True when a release
    /// woke it.
    pub async fn released(&self, order: &str, since: Instant, left: Duration) -> bool {
        let at_most = left
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(self.config.release_wait_ms_max));
        self.releases.released(order, since, at_most).await
    }

    /// Compare-and-delete of every lease, in one round trip, waking the
    /// instances waiting for them. One answer per lease: false when it had
    /// expired (another holder may have it now).
    pub async fn release_many(&self, leases: &[Lease]) -> Result<Vec<bool>, RedisLockError> {
        self.release_settled(leases, &vec![false; leases.len()])
            .await
    }

    /// [`RedisLocks::release_many`], leaving the settled hint of each lease
    /// whose `settled` flag is set (its batch settled the order's charge).
    pub async fn release_settled(
        &self,
        leases: &[Lease],
        settled: &[bool],
    ) -> Result<Vec<bool>, RedisLockError> {
        release_leases(
            &*self.transport,
            &self.config.prefix,
            self.config.settled_hint_ms,
            leases,
            settled,
        )
        .await
    }
}

/// The engine's lock service over Redis: each call is the inherent method of
/// the same name (the waiting acquire and the single release are the trait's).
impl OrderLocks for RedisLocks {
    fn try_acquire_or_settled<'a>(
        &'a self,
        orders: &'a [&'a str],
        hints: &'a [bool],
    ) -> futures::future::BoxFuture<'a, Result<Vec<Grant>, RedisLockError>> {
        Box::pin(RedisLocks::try_acquire_or_settled(self, orders, hints))
    }

    fn release_settled<'a>(
        &'a self,
        leases: &'a [Lease],
        settled: &'a [bool],
    ) -> futures::future::BoxFuture<'a, Result<Vec<bool>, RedisLockError>> {
        Box::pin(RedisLocks::release_settled(self, leases, settled))
    }

    fn released<'a>(
        &'a self,
        order: &'a str,
        since: Instant,
        left: Duration,
    ) -> futures::future::BoxFuture<'a, bool> {
        Box::pin(RedisLocks::released(self, order, since, left))
    }

    fn wait_max(&self) -> Duration {
        Duration::from_millis(self.config.lock_wait_ms_max)
    }
}

/// The channel a release somebody waits for is published on.
pub fn released_channel(prefix: &str) -> String {
    format!("{prefix}:released")
}

/// RELEASE_MANY of `leases` (all of one acquire), leaving the settled hint of
/// each flagged lease for `hint_ms`; it borrows only what a background
/// give-back can own.
async fn release_leases(
    transport: &dyn LockTransport,
    prefix: &str,
    hint_ms: u64,
    leases: &[Lease],
    settled: &[bool],
) -> Result<Vec<bool>, RedisLockError> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    if settled.len() != leases.len() {
        return Err(RedisLockError::Unavailable(format!(
            "{} settled flags for {} leases",
            settled.len(),
            leases.len()
        )));
    }
    let lock_prefix = format!("{prefix}:lock:order:");
    let mut keys = Vec::with_capacity(3 * leases.len());
    let mut orders = Vec::with_capacity(leases.len());
    let mut owner = None;
    for lease in leases {
        let (key, held_by) = lease
            .key
            .split_once('\u{0}')
            .ok_or_else(|| RedisLockError::Unavailable("malformed lease".into()))?;
        if owner.is_some_and(|o| o != held_by) {
            return Err(RedisLockError::Unavailable(
                "release_many takes the leases of one acquire".into(),
            ));
        }
        owner = Some(held_by);
        keys.extend([key.to_owned(), format!("{key}:w"), format!("{key}:s")]);
        orders.push(key.strip_prefix(&lock_prefix).unwrap_or(key));
    }
    let mut args = vec![
        owner.unwrap_or_default().to_owned(),
        released_channel(prefix),
        hint_ms.to_string(),
    ];
    for (order, &settled) in orders.into_iter().zip(settled) {
        args.extend([order.to_owned(), if settled { "1" } else { "0" }.to_owned()]);
    }
    let answer = transport
        .eval(RELEASE_MANY, keys, args)
        .await
        .map_err(unavailable)?;
    let freed: Vec<i64> = redis::from_redis_value(answer).map_err(unavailable)?;
    if freed.len() != leases.len() {
        return Err(RedisLockError::Unavailable(format!(
            "release answered {} locks for {}",
            freed.len(),
            leases.len()
        )));
    }
    Ok(freed.into_iter().map(|n| n == 1).collect())
}

/// ACQUIRE_MANY's answer: the epoch in force (none after a flush), the fence
/// hash's incarnation, one number per lock.
type AcquireAnswer = (Option<i64>, Option<String>, Vec<i64>);

/// Splits ACQUIRE_MANY's answer.
fn parse_acquire(v: redis::Value) -> Result<AcquireAnswer, redis::ParsingError> {
    let v: Vec<redis::Value> = redis::from_redis_value(v)?;
    let mut it = v.into_iter();
    let epoch: Option<i64> = redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let inc: Option<String> = redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let answers = it
        .map(redis::from_redis_value)
        .collect::<Result<Vec<i64>, _>>()?;
    Ok((epoch, inc, answers))
}

/// A value unique to this grant (process id, a counter shared by every client
/// of the process), for compare-and-delete.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
