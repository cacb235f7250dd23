//! One batch as one READ COMMITTED transaction: read and lock, decide, write,
//! commit; the savepoint-per-command replay when a constraint fires; the retry
//! of a deadlock or serialisation failure.
//!
//! The time a batch decides at (a hold's expiry) is read from its clock only
//! once the batch holds its orders' row locks: a batch that read the clock
//! before waiting for another writer of the same order would decide at a time
//! earlier than that writer's, and could capture a hold the other had just
//! been told had expired (found by the deterministic simulation, issue #17).

use super::error::{pg_message, Fault};
use super::idempotency::write_idempotency;
use super::plan::Plan;
use super::reads::{read_batch, RowLocks};
use super::writes::{patch_ids, write_batch};
use super::{PgStats, BATCH_ATTEMPTS_MAX, RETRY_BACKOFF_MS};
use crate::failpoint::{self, Action};
use crate::store::{after_commit_failpoint_applies, Command, OpResult, Rejection, StoreError};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Tries of one op in the savepoint-per-op fallback before it is `Refused`: a
/// second try sees what a racing instance committed meanwhile.
pub(super) const CAREFUL_TRIES_MAX: u32 = 2;

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where a batch reads the time it decides at (ms since the epoch).
pub type Clock = dyn Fn() -> i64 + Send + Sync;

/// Applies `ops` in one transaction, one result per op (see the module docs).
/// `isolated` runs every op in its own savepoint from the start (`--guard seed`).
///
/// Public so that tests can drive two stores' connections against one database
/// with no lane or lock above them.
pub async fn apply_ops(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    now: i64,
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    apply_ops_on_clock(client, ops, &move || now, isolated).await
}

/// [`apply_ops`], reading the time from `clock` once the batch holds its
/// orders' row locks (each pass reads it again).
pub async fn apply_ops_on_clock(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    clock: &Clock,
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    apply_counted(client, ops, clock, isolated, &PgStats::default(), &mut None)
        .await
        .map_err(Fault::into_store_error)
}

pub(super) async fn apply_counted(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    clock: &Clock,
    isolated: bool,
    stats: &PgStats,
    sent: &mut Option<i64>,
) -> Result<Vec<OpResult>, Fault> {
    let mut careful = isolated;
    let mut attempt = 1;
    loop {
        match run_batch(client, ops, clock, careful, sent).await {
            Ok(results) => {
                debug_assert_eq!(results.len(), ops.len());
                return Ok(results);
            }
            Err(Fault::Constraint(msg)) if !careful => {
                tracing::warn!(event = "store_constraint", detail = %msg, "replaying batch with a savepoint per op");
                careful = true;
                stats.careful_batches.fetch_add(1, Ordering::Relaxed);
            }
            Err(Fault::Retry(msg)) if attempt < BATCH_ATTEMPTS_MAX => {
                tracing::warn!(event = "store_retry", attempt, detail = %msg, "retrying batch");
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| u64::from(d.subsec_nanos() % 3))
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(
                    RETRY_BACKOFF_MS * u64::from(attempt) + jitter,
                ))
                .await;
                attempt += 1;
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => return Err(f),
        }
    }
}

/// This transaction's id, to look its fate up if its COMMIT goes unanswered.
pub(super) async fn txid(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, Fault> {
    let stmt = tx.prepare_cached("SELECT txid_current()").await?;
    Ok(tx.query_one(&stmt, &[]).await?.try_get(0)?)
}

pub(super) async fn run_batch(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    clock: &Clock,
    careful: bool,
    sent: &mut Option<i64>,
) -> Result<Vec<OpResult>, Fault> {
    let mut tx = client.transaction().await?;
    let (xid, results) = if careful {
        let xid = txid(&tx).await?;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let mut tries = 0;
            loop {
                tries += 1;
                let sp = tx.savepoint("op").await?;
                match run_pass(&sp, std::slice::from_ref(op), clock).await {
                    Ok(mut r) => {
                        sp.commit().await?;
                        out.push(r.remove(0));
                        break;
                    }
                    Err(Fault::Constraint(msg)) => {
                        sp.rollback().await?;
                        if tries < CAREFUL_TRIES_MAX {
                            continue;
                        }
                        tracing::error!(event = "store_refused", op = ?op, detail = %msg, "the database refused a change");
                        out.push(Err(Rejection::Refused(msg)));
                        break;
                    }
                    Err(f) => return Err(f),
                }
            }
        }
        (xid, out)
    } else {
        // Pipelined: both go out before either answer is awaited.
        futures::try_join!(txid(&tx), run_pass(&tx, ops, clock))?
    };
    // A batch of two or more has done its writes and not committed: a crash here
    // must leave none of it, and none of it was acknowledged.
    if ops.len() >= 2 && failpoint::hit(failpoint::MID_BATCH).await == Some(Action::Error) {
        return Err(Fault::Store("failpoint store.mid_batch".into()));
    }
    *sent = Some(xid);
    match tx.commit().await {
        Ok(()) => *sent = None,
        // The server answered: it rolled back.
        Err(e) if e.code().is_some() => {
            *sent = None;
            return Err(e.into());
        }
        Err(e) => {
            return Err(Fault::Ambiguous {
                xid,
                detail: pg_message(&e),
            })
        }
    }
    if after_commit_failpoint_applies(&results) {
        if let Some(Action::Error) = failpoint::hit(failpoint::AFTER_COMMIT).await {
            return Err(Fault::Store(
                "failpoint store.after_commit: committed, reply lost".into(),
            ));
        }
    }
    Ok(results)
}

/// Runs one pass: read and lock, decide in Rust (at the time read once the
/// rows are locked), write set-based.
pub(super) async fn run_pass(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[Command],
    clock: &Clock,
) -> Result<Vec<OpResult>, Fault> {
    let mut plan = Plan::default();
    read_batch(tx, ops, &mut plan, RowLocks::ForUpdate).await?;
    let now = clock();
    let mut results: Vec<OpResult> = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(plan.decide(op, now)?);
    }
    let ids = write_batch(tx, &plan, now).await?;
    for out in results.iter_mut().flatten() {
        patch_ids(out, &ids)?;
    }
    write_idempotency(tx, ops, &results, now).await?;
    Ok(results)
}
