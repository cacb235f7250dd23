//! `--guard seed`: the write-up's fix as written, the correct-but-slow baseline:
//! a per-order lock (Redis with a fencing token, or in-process), then one
//! transaction for this request alone, re-reading the order under the lock.

use super::{Engine, EngineError};
use crate::domain::{OrderId, RequestId};
use crate::lock::redis::RedisLockError;
use crate::store::{Command, Op, Output, StoreError};
use std::time::{Duration, Instant};

impl Engine {
    /// `--guard seed`: per-order lock, then one transaction for this request alone.
    pub(super) async fn seed(
        &self,
        cmd: Command,
        req: RequestId,
        deadline: Option<Instant>,
    ) -> Result<Output, EngineError> {
        let inst = &*self.shared.inst;
        let oid = cmd.order_id().map(OrderId::as_str).unwrap_or("");
        let key = match &cmd.op {
            Op::CreateAccount { id, .. } => format!("lock:account:{id}"),
            other => format!("lock:order:{}", other.route_key()),
        };
        let _sentinel = self.enter(&cmd, &req);
        let lock_wait = Duration::from_millis(crate::lock::LOCK_WAIT_MS_MAX);
        let wait = deadline.map_or(lock_wait, |d| {
            d.saturating_duration_since(Instant::now()).min(lock_wait)
        });
        let timed_out = || deadline.is_some_and(|d| Instant::now() >= d);
        // The write-up's per-order lock: Redis (fenced) when configured, else local.
        let result = match &self.shared.redis {
            Some(redis) => {
                let lease = match redis.acquire(cmd.route_key(), wait).await {
                    Ok(lease) => Some(lease),
                    Err(RedisLockError::Busy { .. }) => {
                        tracing::warn!(event = "lock_busy", oid, req = req.as_str(), inst);
                        return Err(if timed_out() {
                            EngineError::TimedOut
                        } else {
                            EngineError::Overloaded
                        });
                    }
                    Err(e) => {
                        // The lock is an optimisation; the database still decides.
                        tracing::warn!(event = "lock_unavailable", oid, detail = %e, req = req.as_str(), inst);
                        None
                    }
                };
                let fenced = match &lease {
                    Some(l) => {
                        tracing::info!(
                            event = "lock_acquired",
                            oid,
                            token = l.token,
                            req = req.as_str(),
                            inst
                        );
                        cmd.clone().fenced(l.token)
                    }
                    None => cmd.clone(),
                };
                let result = self.shared.store.apply_isolated(fenced).await;
                self.seed_cache(&cmd, &result);
                if let Some(l) = &lease {
                    let _ = redis.release(l).await;
                    tracing::info!(
                        event = "lock_released",
                        oid,
                        token = l.token,
                        req = req.as_str(),
                        inst
                    );
                }
                result
            }
            None => {
                let lease = self.locks.acquire(&key, wait).await.map_err(|e| {
                    tracing::warn!(event = "lock_busy", oid, detail = %e, req = req.as_str(), inst);
                    if timed_out() {
                        EngineError::TimedOut
                    } else {
                        EngineError::Overloaded
                    }
                })?;
                tracing::info!(
                    event = "lock_acquired",
                    oid,
                    token = lease.token,
                    req = req.as_str(),
                    inst
                );
                let result = self.shared.store.apply_isolated(cmd.clone()).await;
                self.seed_cache(&cmd, &result);
                self.locks.release(&lease);
                tracing::info!(
                    event = "lock_released",
                    oid,
                    token = lease.token,
                    req = req.as_str(),
                    inst
                );
                result
            }
        };
        Ok(result??)
    }

    /// `seed`'s cache write, done while the order's lock is still held: written
    /// after the release, a later request's newer state could be overwritten by
    /// this older one.
    fn seed_cache(&self, cmd: &Command, result: &Result<crate::store::OpResult, StoreError>) {
        if let Ok(Ok(out)) = result {
            if let Some(order) = out.order() {
                self.shared.cache.committed(order, out.entry());
            }
        } else if let Some(order_id) = cmd.order_id() {
            self.shared.cache.forget(order_id);
        }
    }
}
