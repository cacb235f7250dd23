//! The cross-instance lock service as the engine sees it: one trait, so the
//! engine runs the same code over Redis ([`super::redis::RedisLocks`]) in
//! production and, in the deterministic simulation (`crates/payguard-sim`,
//! issue #17), over that same client watched by the simulation's oracle, or
//! wrapped into the batch-locking protocol before issue #12.
//!
//! Why a trait and not the Redis type: the simulation runs the engine's own
//! batch path (`fenced_apply`, parking, the release wake-ups) over the Redis
//! client, whose every answer, delay and loss a seed decides at the client's
//! transport ([`super::redis::LockTransport`]), and it wraps that client to
//! tell its oracle what was granted, or to put the old batch-locking protocol
//! back around it. The trait is the calls
//! the engine makes: take many locks in one round trip, give them back, wait
//! for a release, and how long a busy order may wait in all. The waiting
//! acquire of `--guard seed` and the single release are built from those here,
//! once, for every implementation.
//!
//! What an implementation guarantees is [`super::redis`]'s contract: a grant's
//! token is higher than every earlier grant's of the same order (fencing), a
//! busy order is reported with its holder's remaining lease and never waited
//! for while other locks are held, and a release somebody waits for is
//! announced to [`OrderLocks::released`].

use super::redis::{Grant, RedisLockError};
use super::Lease;
use futures::future::BoxFuture;
use std::time::Duration;
use tokio::time::Instant;

/// Per-order locks with fencing tokens, shared by every instance.
pub trait OrderLocks: Send + Sync + 'static {
    /// One attempt at the lock of every order in `orders` (distinct ids), in
    /// one round trip: one [`Grant`] per order, in order. An order whose `hints`
    /// flag is set and whose settled hint is present is answered
    /// [`Grant::Settled`], its lock not taken.
    fn try_acquire_or_settled<'a>(
        &'a self,
        orders: &'a [&'a str],
        hints: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<Grant>, RedisLockError>>;

    /// Compare-and-delete of every lease (all of one acquire) in one round
    /// trip, waking whoever waits for them, leaving the settled hint of each
    /// lease whose `settled` flag is set. False for a lease that had expired.
    fn release_settled<'a>(
        &'a self,
        leases: &'a [Lease],
        settled: &'a [bool],
    ) -> BoxFuture<'a, Result<Vec<bool>, RedisLockError>>;

    /// Waits until `order`'s lock was released after `since` (when the acquire
    /// that found it busy was sent), or for about `left` (its holder's
    /// remaining lease, capped by the implementation). True when a release
    /// woke it.
    fn released<'a>(
        &'a self,
        order: &'a str,
        since: Instant,
        left: Duration,
    ) -> BoxFuture<'a, bool>;

    /// How long a request may wait in all for a lock held elsewhere before it
    /// is answered 503 ([`super::LOCK_WAIT_MS_MAX`] unless the service says
    /// otherwise: the simulation scales every limit down).
    fn wait_max(&self) -> Duration {
        Duration::from_millis(super::LOCK_WAIT_MS_MAX)
    }

    /// [`OrderLocks::try_acquire_or_settled`] asking for no hint: never `Settled`.
    fn try_acquire_many<'a>(
        &'a self,
        orders: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Grant>, RedisLockError>> {
        Box::pin(async move {
            let hints = vec![false; orders.len()];
            self.try_acquire_or_settled(orders, &hints).await
        })
    }

    /// [`OrderLocks::release_settled`] leaving no hint.
    fn release_many<'a>(
        &'a self,
        leases: &'a [Lease],
    ) -> BoxFuture<'a, Result<Vec<bool>, RedisLockError>> {
        Box::pin(async move {
            let settled = vec![false; leases.len()];
            self.release_settled(leases, &settled).await
        })
    }

    /// Waits up to `wait` for one lock, sleeping until its holder releases it
    /// between attempts (never polling on a timer).
    fn acquire<'a>(
        &'a self,
        order: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Lease, RedisLockError>> {
        Box::pin(async move {
            let started = Instant::now();
            loop {
                let since = Instant::now();
                let left = match self.try_acquire_many(&[order]).await?.pop() {
                    Some(Grant::Held(lease)) => return Ok(lease),
                    Some(Grant::Busy { left }) => left,
                    Some(Grant::Settled) | None => {
                        return Err(RedisLockError::Unavailable(
                            "acquire answered no lock".into(),
                        ))
                    }
                };
                let remaining = wait.saturating_sub(started.elapsed());
                if remaining.is_zero() {
                    return Err(RedisLockError::Busy {
                        key: order.to_owned(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                self.released(order, since, left.min(remaining)).await;
            }
        })
    }

    /// Compare-and-delete: frees the lock only if this lease still holds it.
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, RedisLockError>> {
        Box::pin(async move {
            Ok(self
                .release_many(std::slice::from_ref(lease))
                .await?
                .first()
                .copied()
                .unwrap_or(false))
        })
    }
}
