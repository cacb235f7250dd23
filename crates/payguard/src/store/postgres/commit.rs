//! Ambiguous commits: a batch whose COMMIT went unanswered is never guessed
//! about. Its fate is looked up (`txid_status`, ending the old backend if it is
//! still in progress so the answer cannot change), and the batch runs again: its
//! commands are idempotent, so a batch that did commit reads back as its replay.
//! A refusal writes nothing to read back and would be decided afresh: a keyed
//! command reads back from its key instead (`rules::answered`: its record holds
//! the answer the committed transaction stored, so it is `KeyAnswered`, and
//! the keyed sequence answers that stored response). An unkeyed refusal is
//! decided again against the state at the rerun: the first decision wrote
//! nothing and was told to no one.
//!
//! The loop that decides all this is the store's, shared with the
//! deterministic simulation ([`crate::store::commit_fate`], issue #17); this
//! file is PostgreSQL's side of it ([`Pooled`]): an attempt on a pooled
//! connection, `txid_status` and `pg_terminate_backend`, the connection
//! taken out of the pool when its COMMIT went unanswered, and the store's
//! counters (`ambiguous_commits`, `ambiguous_committed`).

use super::batch::{apply_counted, now_ms};
use super::connection::Inner;
use super::error::{pg_unavailable, pool_unavailable, Fault};
use super::{AMBIGUOUS_RERUNS_MAX, RESOLVE_DEADLINE_MS};
use crate::store::commit_fate::{apply_resolved, Attempt, Fate, FateLimits, FateStore};
use crate::store::{Command, OpResult, StoreError};
use deadpool_postgres::Object;
use std::sync::atomic::Ordering;

/// Pause before re-running a batch after an unanswered COMMIT, times the rerun.
pub(super) const RERUN_BACKOFF_MS: u64 = 50;
/// Pause between looks while a terminated backend finishes, or after a failure.
pub(super) const FATE_POLL_MS: u64 = 10;

/// A batch on a pooled connection, under the batch deadline, with unanswered
/// COMMITs resolved (see the module docs): the only way the store runs ops.
pub(super) async fn apply_pooled(
    inner: &Inner,
    ops: &[Command],
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    let limits = FateLimits {
        batch_deadline: inner.batch_deadline,
        resolve_deadline_ms: RESOLVE_DEADLINE_MS,
        rerun_backoff_ms: RERUN_BACKOFF_MS,
        fate_poll_ms: FATE_POLL_MS,
        reruns_max: AMBIGUOUS_RERUNS_MAX,
    };
    apply_resolved(
        &Pooled {
            inner,
            ops,
            isolated,
        },
        &limits,
    )
    .await
}

/// One batch of the PostgreSQL store, as the shared loop runs it.
struct Pooled<'a> {
    inner: &'a Inner,
    ops: &'a [Command],
    isolated: bool,
}

/// An attempt's connection, and the guard that keeps the store from closing
/// while it is used. `client` is `None` once discarded. Fields drop in
/// declaration order: the connection goes back to the pool before the guard
/// lets a closing store go on (as before the loop was shared).
struct Conn {
    client: Option<Object>,
    _open: tokio::sync::OwnedRwLockReadGuard<bool>,
}

impl FateStore for Pooled<'_> {
    type Xid = i64;
    type Conn = Conn;

    async fn connect(&self) -> Result<Conn, StoreError> {
        let (open, client) = self.inner.enter().await?;
        Ok(Conn {
            client: Some(client),
            _open: open,
        })
    }

    async fn attempt(&self, conn: &mut Conn, sent: &mut Option<i64>) -> Attempt<i64> {
        let Some(client) = conn.client.as_mut() else {
            return Attempt::Failed(StoreError::Unavailable(
                "the attempt's connection was discarded".into(),
            ));
        };
        let ops = self.ops;
        match apply_counted(client, ops, &now_ms, self.isolated, &self.inner.stats, sent).await {
            Ok(results) => Attempt::Done(results),
            Err(Fault::Ambiguous { xid, detail }) => Attempt::Unanswered { xid, detail },
            Err(f) => Attempt::Failed(f.into_store_error()),
        }
    }

    fn discard(&self, conn: &mut Conn) {
        if let Some(client) = conn.client.take() {
            drop(Object::take(client));
        }
    }

    async fn fate_once(&self, xid: i64) -> Result<Fate, StoreError> {
        commit_fate_once(self.inner, xid).await
    }

    fn unanswered(&self, _xid: i64, _detail: &str) {
        self.inner
            .stats
            .ambiguous_commits
            .fetch_add(1, Ordering::Relaxed);
    }

    fn resolved(&self, _xid: i64, committed: bool) {
        if committed {
            self.inner
                .stats
                .ambiguous_committed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One look at transaction `xid`: final when committed or aborted; still in
/// progress (its COMMIT may yet arrive from a connection the network is
/// holding), its backend is ended first, so the next look is final.
async fn commit_fate_once(inner: &Inner, xid: i64) -> Result<Fate, StoreError> {
    let client = inner.pool.get().await.map_err(pool_unavailable)?;
    let status: Option<String> = client
        .query_one("SELECT txid_status($1)::text", &[&xid])
        .await
        .map_err(pg_unavailable)?
        .get(0);
    match status.as_deref() {
        Some("committed") => Ok(Fate::Committed),
        Some("aborted") => Ok(Fate::Aborted),
        Some("in progress") => {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE backend_xid = ($1::bigint % 4294967296)::text::xid",
                    &[&xid],
                )
                .await
                .map_err(pg_unavailable)?;
            Ok(Fate::InProgress)
        }
        other => Err(StoreError::Unavailable(format!(
            "txid_status({xid}) is {other:?}"
        ))),
    }
}
