//! Per-order locks with fencing tokens.
//!
//! A lock is a lease, not a promise: it expires after its TTL even if its holder
//! is still working (a GC pause, a stopped process). Each grant therefore carries
//! a fencing token that only ever grows, so a store can refuse a write from a
//! holder whose lease a newer holder has since taken. In payguard the lock is an
//! optimisation that keeps duplicates from reaching the database together; the
//! database's constraints remain the guarantee.
//!
//! [`LocalLocks`] is the in-process table used by `--guard seed` without Redis:
//! the write-up's `lock:order:{id}` with a 30 s TTL, taken with set-if-absent and
//! released with compare-and-delete, exactly as the Redis version will be.

pub mod redis;
pub mod release;
pub mod service;
pub mod token;

pub use service::OrderLocks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The write-up's lock TTL.
pub const LOCK_TTL_MS: u64 = 30_000;
/// How long a request waits for a held lock before giving up with 503.
pub const LOCK_WAIT_MS_MAX: u64 = 5_000;
/// Back-off between attempts on a held lock: from 100 µs doubling up to this.
const LOCK_RETRY_US_MAX: u64 = 5_000;

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    /// Strictly increasing across all grants of this table.
    pub token: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("lock {key} is held by another request (waited {waited_ms} ms)")]
    Busy { key: String, waited_ms: u64 },
}

pub struct LocalLocks {
    /// key → (token of the holder, when its lease ends). Invariant: an entry whose
    /// lease has ended is free and may be taken over by a new grant.
    held: Mutex<HashMap<String, (i64, Instant)>>,
    next_token: AtomicI64,
    ttl: Duration,
}

impl Default for LocalLocks {
    fn default() -> Self {
        Self::new(Duration::from_millis(LOCK_TTL_MS))
    }
}

impl LocalLocks {
    pub fn new(ttl: Duration) -> Self {
        LocalLocks {
            held: Mutex::new(HashMap::new()),
            next_token: AtomicI64::new(1),
            ttl,
        }
    }

    /// Set-if-absent (or expired): one attempt.
    pub fn try_acquire(&self, key: &str) -> Option<Lease> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, until)) = held.get(key) {
            if *until > now {
                return None;
            }
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        held.insert(key.to_owned(), (token, now + self.ttl));
        Some(Lease {
            key: key.to_owned(),
            token,
        })
    }

    /// Waits up to `wait` for the lock, backing off between attempts.
    pub async fn acquire(&self, key: &str, wait: Duration) -> Result<Lease, LockError> {
        let started = Instant::now();
        let mut backoff_us = 100;
        loop {
            if let Some(lease) = self.try_acquire(key) {
                return Ok(lease);
            }
            if started.elapsed() >= wait {
                return Err(LockError::Busy {
                    key: key.to_owned(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_micros(backoff_us)).await;
            backoff_us = (backoff_us * 2).min(LOCK_RETRY_US_MAX);
        }
    }

    /// Compare-and-delete: frees the lock only if `lease` still holds it. Returns
    /// false when the lease had expired and someone else took the lock.
    pub fn release(&self, lease: &Lease) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.get(&lease.key) {
            Some((token, _)) if *token == lease.token => {
                held.remove(&lease.key);
                true
            }
            _ => false,
        }
    }

    /// Locks currently recorded (held or expired but not yet taken over).
    pub fn len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_if_absent_and_compare_and_delete() {
        let locks = LocalLocks::new(Duration::from_secs(30));
        let a = locks.try_acquire("lock:order:1").unwrap();
        assert!(locks.try_acquire("lock:order:1").is_none());
        let b = locks.try_acquire("lock:order:2").unwrap();
        assert!(b.token > a.token);
        assert!(locks.release(&a));
        assert!(
            !locks.release(&a),
            "a second release must not free a newer holder"
        );
        let c = locks.try_acquire("lock:order:1").unwrap();
        assert!(c.token > b.token);
        assert!(locks.release(&b) && locks.release(&c));
        assert!(locks.is_empty());
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_a_higher_token() {
        let locks = LocalLocks::new(Duration::from_millis(0));
        let old = locks.try_acquire("k").unwrap();
        let new = locks.try_acquire("k").expect("expired lease is free");
        assert!(new.token > old.token);
        assert!(
            !locks.release(&old),
            "the stale holder cannot free the new lease"
        );
        assert!(locks.release(&new));
    }

    #[tokio::test]
    async fn acquire_waits_then_gives_up() {
        let locks = LocalLocks::new(Duration::from_secs(30));
        let _held = locks.try_acquire("k").unwrap();
        let err = locks
            .acquire("k", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }));
    }
}
