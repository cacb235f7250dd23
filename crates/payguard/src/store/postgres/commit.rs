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

use super::batch::{apply_counted, now_ms};
use super::connection::Inner;
use super::error::{pg_unavailable, pool_unavailable, Fault};
use super::{AMBIGUOUS_RERUNS_MAX, RESOLVE_DEADLINE_MS};
use crate::store::{Command, OpResult, StoreError};
use deadpool_postgres::Object;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A batch on a pooled connection, under the batch deadline, with unanswered
/// COMMITs resolved (see the module docs): the only way the store runs ops.
pub(super) async fn apply_pooled(
    inner: &Inner,
    ops: &[Command],
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    let mut reruns = 0;
    // Once an earlier attempt is known to have committed, no error may be
    // reported as "nothing moved": the batch is re-run (it replays) until it reads
    // its result back, or the caller gets `Unknown`.
    let mut committed_before = false;
    loop {
        let (_open, mut client) = inner.enter().await?;
        // The xid whose COMMIT is on the wire, while it is.
        let mut sent = None;
        let attempt = tokio::time::timeout(
            inner.batch_deadline,
            apply_counted(&mut client, ops, &now_ms, isolated, &inner.stats, &mut sent),
        )
        .await;
        // Why the batch runs again, for the error if it gives up.
        let why: String = match attempt {
            Ok(Ok(results)) => return Ok(results),
            Ok(Err(Fault::Ambiguous { xid, detail })) => {
                drop(Object::take(client));
                resolve(inner, xid, &detail, &mut committed_before).await?;
                detail
            }
            Ok(Err(f)) => {
                let e = f.into_store_error();
                if !committed_before {
                    return Err(e);
                }
                e.to_string()
            }
            Err(_) => {
                let detail = format!(
                    "no answer within the {:?} batch deadline",
                    inner.batch_deadline
                );
                // The connection is lost to us: never hand it back to the pool.
                drop(Object::take(client));
                match sent {
                    Some(xid) => {
                        resolve(inner, xid, &detail, &mut committed_before).await?;
                        detail
                    }
                    // COMMIT was never sent: the server rolls back when the
                    // connection goes, and nothing of this attempt can commit.
                    None if !committed_before => {
                        return Err(StoreError::Unavailable(format!(
                            "{detail}; nothing was committed"
                        )))
                    }
                    None => detail,
                }
            }
        };
        reruns += 1;
        if reruns > AMBIGUOUS_RERUNS_MAX {
            return Err(if committed_before {
                StoreError::Unknown(format!(
                    "an earlier attempt committed, and reading its result back failed: {why}"
                ))
            } else {
                StoreError::Unavailable(format!(
                    "{reruns} COMMITs in a row went unanswered, none of them committed: {why}"
                ))
            });
        }
        tokio::time::sleep(Duration::from_millis(RERUN_BACKOFF_MS * u64::from(reruns))).await;
    }
}

/// Pause before re-running a batch after an unanswered COMMIT, times the rerun.
pub(super) const RERUN_BACKOFF_MS: u64 = 50;

/// Looks up an unanswered COMMIT's fate (bounded by [`RESOLVE_DEADLINE_MS`]),
/// so the batch can run again; `Unknown` when the fate cannot be learned.
pub(super) async fn resolve(
    inner: &Inner,
    xid: i64,
    detail: &str,
    committed_before: &mut bool,
) -> Result<(), StoreError> {
    inner
        .stats
        .ambiguous_commits
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(event = "store_commit_unanswered", xid, detail = %detail, "looking up the transaction's fate");
    let committed = tokio::time::timeout(
        Duration::from_millis(RESOLVE_DEADLINE_MS),
        commit_fate(inner, xid),
    )
    .await
    .map_err(|_| {
        StoreError::Unknown(format!(
            "COMMIT of transaction {xid} was not answered ({detail}) and its fate could not be learned within {RESOLVE_DEADLINE_MS} ms"
        ))
    })?;
    tracing::warn!(
        event = "store_commit_resolved",
        xid,
        committed,
        "running the batch again (it replays if it committed)"
    );
    if committed {
        *committed_before = true;
        inner
            .stats
            .ambiguous_committed
            .fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether transaction `xid` committed. A transaction still in progress (its
/// COMMIT may yet arrive from a connection the network is holding) has its
/// backend ended first, so the answer is final. Connection failures on the way
/// are retried (the caller bounds the whole look-up).
pub(super) async fn commit_fate(inner: &Inner, xid: i64) -> bool {
    /// Pause between looks while a terminated backend finishes, or after a failure.
    const FATE_POLL_MS: u64 = 10;
    loop {
        match commit_fate_once(inner, xid).await {
            Ok(Some(committed)) => return committed,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "store_commit_lookup_failed", xid, detail = %e, "retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(FATE_POLL_MS)).await;
    }
}

/// One look: `Some(committed)` when final, `None` while still in progress (its
/// backend is then ended).
pub(super) async fn commit_fate_once(inner: &Inner, xid: i64) -> Result<Option<bool>, StoreError> {
    let client = inner.pool.get().await.map_err(pool_unavailable)?;
    let status: Option<String> = client
        .query_one("SELECT txid_status($1)::text", &[&xid])
        .await
        .map_err(pg_unavailable)?
        .get(0);
    match status.as_deref() {
        Some("committed") => Ok(Some(true)),
        Some("aborted") => Ok(Some(false)),
        Some("in progress") => {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE backend_xid = ($1::bigint % 4294967296)::text::xid",
                    &[&xid],
                )
                .await
                .map_err(pg_unavailable)?;
            Ok(None)
        }
        other => Err(StoreError::Unavailable(format!(
            "txid_status({xid}) is {other:?}"
        ))),
    }
}
