//! `--guard naive`: the incident reproduced (check in memory, pause, act), only
//! on a naive SQLite file, and the race sentinel that the paths outside lanes
//! share: it logs `concurrent_inflight` when a second request for an order
//! arrives while one is in flight.

use super::{Engine, EngineError};
use crate::domain::{OrderId, RequestId};
use crate::store::sqlite::naive::NaiveCtx;
use crate::store::{Command, Output, StoreError};
use std::time::Duration;

impl Engine {
    /// `--guard naive`: no lane, no lock, no condition; see [`NaiveSqlite`].
    pub(super) async fn naive(
        &self,
        cmd: Command,
        req: RequestId,
        gap_ms: u64,
    ) -> Result<Output, EngineError> {
        let _sentinel = self.enter(&cmd, &req);
        let Some(naive) = &self.shared.naive else {
            return Err(EngineError::Store(StoreError::Schema(
                "--guard naive runs on SQLite only, on a database it created (Engine::start_naive)"
                    .into(),
            )));
        };
        let ctx = NaiveCtx {
            gap: Duration::from_millis(gap_ms),
            req,
            inst: self.shared.inst.clone(),
        };
        Ok(naive.apply(cmd, ctx).await??)
    }

    /// The race sentinel outside lanes: records `req` as in flight for its order
    /// and logs `concurrent_inflight` if another request already is.
    pub(super) fn enter(&self, cmd: &Command, req: &RequestId) -> Option<SentinelGuard<'_>> {
        let order = cmd.order_id()?.clone();
        let mut other = None;
        self.inflight
            .entry_sync(order.clone())
            .and_modify(|(first, n)| {
                other = Some(first.clone());
                *n += 1;
            })
            .or_insert_with(|| (req.clone(), 1));
        if let Some(other) = other {
            self.shared.stats.collisions.inc();
            tracing::warn!(
                event = "concurrent_inflight",
                oid = order.as_str(),
                req = req.as_str(),
                other_req = other.as_str(),
                inst = &*self.shared.inst
            );
        }
        Some(SentinelGuard {
            map: &self.inflight,
            order,
        })
    }
}

/// Leaves the sentinel's record when the request ends, however it ends.
pub(super) struct SentinelGuard<'a> {
    map: &'a scc::HashMap<OrderId, (RequestId, usize)>,
    order: OrderId,
}

impl Drop for SentinelGuard<'_> {
    fn drop(&mut self) {
        self.map.remove_if_sync(&self.order, |(_, n)| {
            *n -= 1;
            *n == 0
        });
    }
}
