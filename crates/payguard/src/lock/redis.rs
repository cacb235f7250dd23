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
//! The lock is an optimisation. If Redis cannot be reached, the engine writes
//! without a token and the database's constraints still make every order charge
//! at most once; a request then either succeeds correctly or fails with 503.

use super::release::{spawn_subscriber, ReleaseBoard};
use super::service::OrderLocks;
use super::token;
use super::Lease;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long one Redis command may take before the lock counts as unavailable.
pub const REDIS_COMMAND_TIMEOUT_MS: u64 = 500;
/// Longest a busy order waits for its holder's release notification before it
/// tries again anyway (a lost notification costs at most this). A holder that
/// died is waited for no longer than its lock's remaining TTL either.
pub const RELEASE_WAIT_MS_MAX: u64 = 250;
/// A waiter marker outlives the lock it waits on by this much, so the holder's
/// release still finds it.
const WAITER_MARK_GRACE_MS: u64 = 1_000;
/// How long a settled hint outlives the release that left it: duplicates and
/// client retries of a charge come within seconds.
pub const SETTLED_HINT_MS: u64 = 30_000;
/// Acquires redone in a row when a Redis flush re-creates the fence hash between
/// a grant and its epoch raise; past this the batch writes without tokens.
pub const EPOCH_RACE_RETRIES_MAX: usize = 3;

/// Takes every free lock of `KEYS` (after the fence hash, triples of an order's
/// lock key, its waiter marker and its settled hint) in one step. The counter and
/// the epoch live in one hash (`fence`), so a flush, a restart or an eviction
/// loses both together: a counter can never restart under an epoch that already
/// handed out higher numbers. Answers `{epoch, incarnation, r1, r2, ...}`:
/// `ri >= 1` is the grant counter of lock i; `ri = 0` means its settled hint is
/// set and `ARGV[3 + i]` asked for it (nothing was taken); `ri < 0` means it is
/// held elsewhere for `-ri - 1` more ms (its waiter marker is then set, so the
/// holder's release publishes).
const ACQUIRE_MANY: &str = r#"
local out = {false, false}
local k = 0
for i = 2, #KEYS, 3 do
  k = k + 1
  if ARGV[3 + k] == '1' and redis.call('EXISTS', KEYS[i + 2]) == 1 then
    out[#out + 1] = 0
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
    if n == 1 then
      redis.call('HSET', KEYS[1], 'inc', ARGV[1])
    end
    out[#out + 1] = n
  else
    local left = redis.call('PTTL', KEYS[i])
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[i + 1], '1', 'PX', left + tonumber(ARGV[3]))
    out[#out + 1] = -left - 1
  end
end
out[1] = redis.call('HGET', KEYS[1], 'epoch') or false
out[2] = redis.call('HGET', KEYS[1], 'inc') or false
return out
"#;

/// Sets the epoch only upward, never touching the counter (resetting it would
/// race with grants already made under the new epoch); returns the epoch in force,
/// or nothing when the hash is not the incarnation the caller's grant saw.
const RAISE_EPOCH: &str = r#"
if (redis.call('HGET', KEYS[1], 'inc') or '') ~= ARGV[2] then
  return false
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"#;

/// Compare-and-delete of every `(lock, waiter marker, settled hint)` triple of
/// `KEYS` held by `ARGV[1]`. Lease j's order id is `ARGV[4 + 2j]` and its
/// settled flag `ARGV[5 + 2j]`: a flagged lock leaves its settled hint for
/// `ARGV[3]` ms, set before the lock goes; a freed lock that somebody waits for
/// publishes its order id on channel `ARGV[2]`. Answers 1 per lock freed, 0 per
/// lock no longer ours (its lease expired; no hint is left then).
const RELEASE_MANY: &str = r#"
local out = {}
local j = 0
for i = 1, #KEYS, 3 do
  local order = ARGV[4 + 2 * j]
  local settled = ARGV[5 + 2 * j]
  j = j + 1
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if settled == '1' then
      redis.call('SET', KEYS[i + 2], '1', 'PX', ARGV[3])
    end
    redis.call('DEL', KEYS[i])
    if redis.call('DEL', KEYS[i + 1]) == 1 then
      redis.call('PUBLISH', ARGV[2], order)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

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
    conn: ConnectionManager,
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    prefix: String,
    owner: String,
    ttl: Duration,
    epochs: EpochSource,
    acquire_many: redis::Script,
    raise_epoch: redis::Script,
    release_many: redis::Script,
    releases: ReleaseBoard,
    /// Dropping it stops the release subscriber.
    _stop_subscriber: oneshot::Sender<()>,
}

fn unavailable(e: impl std::fmt::Display) -> RedisLockError {
    RedisLockError::Unavailable(e.to_string())
}

impl RedisLocks {
    pub async fn connect(
        url: &str,
        prefix: &str,
        owner: &str,
        ttl: Duration,
        epochs: EpochSource,
    ) -> Result<Self, RedisLockError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS)))
            .set_response_timeout(Some(Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS)))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS * 4),
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| RedisLockError::Unavailable(format!("connecting to {url} timed out")))?
        .map_err(unavailable)?;
        let releases = ReleaseBoard::default();
        let (stop, stopped) = oneshot::channel();
        spawn_subscriber(client, format!("{prefix}:released"), &releases, stopped);
        Ok(RedisLocks {
            conn,
            prefix: prefix.to_owned(),
            owner: owner.to_owned(),
            ttl,
            epochs,
            acquire_many: redis::Script::new(ACQUIRE_MANY),
            raise_epoch: redis::Script::new(RAISE_EPOCH),
            release_many: redis::Script::new(RELEASE_MANY),
            releases,
            _stop_subscriber: stop,
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
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
        let owner = format!("{}:{}", self.owner, uuid_like());
        let mut invocation = self.acquire_many.key(self.key("fence"));
        let keys: Vec<String> = orders.iter().map(|o| self.lock_key(o)).collect();
        for key in &keys {
            invocation
                .key(key)
                .key(format!("{key}:w"))
                .key(format!("{key}:s"));
        }
        invocation
            .arg(&owner)
            .arg(self.ttl.as_millis() as u64)
            .arg(WAITER_MARK_GRACE_MS);
        for &hint in hints {
            invocation.arg(if hint { "1" } else { "0" });
        }
        let mut conn = self.conn.clone();
        let answer = invocation
            .invoke_async::<Vec<redis::Value>>(&mut conn)
            .await;
        let (epoch, incarnation, answers): AcquireAnswer = match answer {
            Ok(v) => parse_acquire(v).map_err(unavailable)?,
            Err(e) => {
                self.give_back_lost_grants(&keys, &owner);
                return Err(unavailable(e));
            }
        };
        if answers.len() != orders.len() {
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
        tokio::spawn(release_leases(
            self.conn.clone(),
            self.release_many.clone(),
            self.prefix.clone(),
            leases,
            unsettled,
        ));
    }

    /// A new epoch for the hash incarnation `incarnation`; `None` when the hash
    /// has been re-created since (the raise would regress the new incarnation).
    async fn new_epoch(&self, incarnation: &str) -> Result<Option<i64>, RedisLockError> {
        let fresh = (self.epochs)().await.map_err(RedisLockError::Epoch)?;
        let mut conn = self.conn.clone();
        let epoch: Option<i64> = self
            .raise_epoch
            .key(self.key("fence"))
            .arg(fresh)
            .arg(incarnation)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(epoch) = epoch else {
            tracing::warn!(
                event = "fence_epoch_refused",
                fresh,
                "the fence hash was re-created since this grant; acquiring again"
            );
            return Ok(None);
        };
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
    /// capped at [`RELEASE_WAIT_MS_MAX`]. True when a release woke it.
    pub async fn released(&self, order: &str, since: Instant, left: Duration) -> bool {
        let at_most = left
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(RELEASE_WAIT_MS_MAX));
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
            self.conn.clone(),
            self.release_many.clone(),
            self.prefix.clone(),
            leases.to_vec(),
            settled.to_vec(),
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
}

/// RELEASE_MANY of `leases` (all of one acquire), owning everything it needs so
/// it can also run in the background.
async fn release_leases(
    mut conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    leases: Vec<Lease>,
    settled: Vec<bool>,
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
    let mut invocation = script.prepare_invoke();
    let mut orders = Vec::with_capacity(leases.len());
    let mut owner = None;
    for lease in &leases {
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
        invocation
            .key(key)
            .key(format!("{key}:w"))
            .key(format!("{key}:s"));
        orders.push(key.strip_prefix(&lock_prefix).unwrap_or(key));
    }
    invocation
        .arg(owner.unwrap_or_default())
        .arg(format!("{prefix}:released"))
        .arg(SETTLED_HINT_MS);
    for (order, settled) in orders.into_iter().zip(settled) {
        invocation.arg(order).arg(if settled { "1" } else { "0" });
    }
    let freed: Vec<i64> = invocation
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(freed.into_iter().map(|n| n == 1).collect())
}

/// ACQUIRE_MANY's answer: the epoch in force (none after a flush), the fence
/// hash's incarnation, one number per lock.
type AcquireAnswer = (Option<i64>, Option<String>, Vec<i64>);

/// Splits ACQUIRE_MANY's answer.
fn parse_acquire(v: Vec<redis::Value>) -> Result<AcquireAnswer, redis::ParsingError> {
    let mut it = v.into_iter();
    let epoch: Option<i64> = redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let inc: Option<String> = redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil))?;
    let answers = it
        .map(redis::from_redis_value)
        .collect::<Result<Vec<i64>, _>>()?;
    Ok((epoch, inc, answers))
}

/// A value unique to this grant (process start, pid, counter), for compare-and-delete.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
