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
//! The lock is an optimisation. If Redis cannot be reached, the engine writes
//! without a token and the database's constraints still make every order charge
//! at most once; a request then either succeeds correctly or fails with 503.

use super::token;
use super::Lease;
use crate::store::Store;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one Redis command may take before the lock counts as unavailable.
pub const REDIS_COMMAND_TIMEOUT_MS: u64 = 500;

/// The counter and the epoch live in one hash (`fence`), so a flush, a restart or
/// an eviction loses both together: a counter can never restart under an epoch
/// that already handed out higher numbers.
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
  if n == 1 then
    redis.call('HSET', KEYS[2], 'inc', ARGV[1])
  end
  local e = redis.call('HGET', KEYS[2], 'epoch')
  local inc = redis.call('HGET', KEYS[2], 'inc')
  return {n, e or false, inc or false}
end
return false
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

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisLockError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("lock {key} is held elsewhere (waited {waited_ms} ms)")]
    Busy { key: String, waited_ms: u64 },
    #[error("could not take a new fencing epoch from the store: {0}")]
    Epoch(String),
}

pub struct RedisLocks {
    conn: ConnectionManager,
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    prefix: String,
    owner: String,
    ttl: Duration,
    store: Arc<dyn Store>,
    acquire: redis::Script,
    raise_epoch: redis::Script,
    release: redis::Script,
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
        store: Arc<dyn Store>,
    ) -> Result<Self, RedisLockError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS)))
            .set_response_timeout(Some(Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS)))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            Duration::from_millis(REDIS_COMMAND_TIMEOUT_MS * 4),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| RedisLockError::Unavailable(format!("connecting to {url} timed out")))?
        .map_err(unavailable)?;
        Ok(RedisLocks {
            conn,
            prefix: prefix.to_owned(),
            owner: owner.to_owned(),
            ttl,
            store,
            acquire: redis::Script::new(ACQUIRE),
            raise_epoch: redis::Script::new(RAISE_EPOCH),
            release: redis::Script::new(RELEASE),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// One attempt at `lock:order:{order}`; `None` when another holder has it.
    pub async fn try_acquire(&self, order: &str) -> Result<Option<Lease>, RedisLockError> {
        let key = self.key(&format!("lock:order:{order}"));
        let mut conn = self.conn.clone();
        let owner = format!("{}:{}", self.owner, uuid_like());
        let got: Option<(i64, Option<i64>, Option<String>)> = self
            .acquire
            .key(&key)
            .key(self.key("fence"))
            .arg(&owner)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some((n, epoch, incarnation)) = got else {
            return Ok(None);
        };
        // 2^32 grants since the last reset: refuse rather than wrap the token.
        let n = token::check_counter(n).map_err(|e| {
            RedisLockError::Unavailable(format!(
                "{e}; delete the {} key to start a new epoch",
                self.key("fence")
            ))
        })?;
        let lease_key = format!("{key}\u{0}{owner}");
        let epoch = match epoch {
            Some(e) => e,
            // The fence hash is gone (flush, restart, eviction): take a new epoch
            // from the database, which only grows.
            None => match self.new_epoch(incarnation.as_deref().unwrap_or("")).await? {
                Some(e) => e,
                None => {
                    // Re-created again since this grant: give the lock back and
                    // let the caller's retry start on the new incarnation.
                    let lease = Lease {
                        key: lease_key,
                        token: 0,
                    };
                    self.release(&lease).await?;
                    return Ok(None);
                }
            },
        };
        Ok(Some(Lease {
            key: lease_key,
            token: token::pack(epoch, n),
        }))
    }

    /// A new epoch for the hash incarnation `incarnation`; `None` when the hash
    /// has been re-created since (the raise would regress the new incarnation).
    async fn new_epoch(&self, incarnation: &str) -> Result<Option<i64>, RedisLockError> {
        let fresh = self
            .store
            .next_fence_epoch()
            .await
            .map_err(|e| RedisLockError::Epoch(e.to_string()))?;
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

    /// Waits up to `wait` for the lock, backing off between attempts.
    pub async fn acquire(&self, order: &str, wait: Duration) -> Result<Lease, RedisLockError> {
        let started = Instant::now();
        let mut backoff_us = 200;
        loop {
            if let Some(lease) = self.try_acquire(order).await? {
                return Ok(lease);
            }
            if started.elapsed() >= wait {
                return Err(RedisLockError::Busy {
                    key: order.to_owned(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_micros(backoff_us)).await;
            backoff_us = (backoff_us * 2).min(10_000);
        }
    }

    /// Compare-and-delete: frees the lock only if this lease still holds it.
    pub async fn release(&self, lease: &Lease) -> Result<bool, RedisLockError> {
        let (key, owner) = lease
            .key
            .split_once('\u{0}')
            .ok_or_else(|| RedisLockError::Unavailable("malformed lease".into()))?;
        let mut conn = self.conn.clone();
        let n: i64 = self
            .release
            .key(key)
            .arg(owner)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
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
