//! Idempotency-Key records on SQLite: the claim before a request runs, and the
//! stored response written in the request's own transaction.

use super::error::Fault;
use crate::store::{ClaimOutcome, IdemClaim, IdemWrite, OpResult};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Completes (or drops) the Idempotency-Key reservation of an op, inside the
/// op's own transaction.
pub(super) fn write_idem(
    conn: &Connection,
    idem: &IdemWrite,
    result: &OpResult,
    now: i64,
) -> Result<(), Fault> {
    match (idem.render)(result) {
        Some((status, body)) => {
            let changed = conn
                .prepare_cached(
                    "UPDATE idempotency SET state = 'done', status = ?1, body = ?2, lease_until = NULL,
                            expires_at = ?3
                     WHERE scope = ?4 AND key = ?5 AND fingerprint = ?6 AND state = 'in_flight'",
                )?
                .execute(params![
                    status,
                    body,
                    now.saturating_add(idem.ttl_ms),
                    idem.scope,
                    idem.key,
                    idem.fingerprint
                ])?;
            if changed != 1 {
                // Our lease lapsed and another request took the key over; the op
                // itself is exactly once regardless, and that request stores its own.
                tracing::warn!(event = "idempotency_lease_lost", key = %idem.key);
            }
        }
        None => {
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE scope = ?1 AND key = ?2 AND state = 'in_flight'",
            )?
            .execute(params![idem.scope, idem.key])?;
        }
    }
    Ok(())
}

/// A stored Idempotency-Key row, as `claim` reads it.
struct IdemRow {
    fingerprint: String,
    state: String,
    lease_until: Option<i64>,
    status: Option<u16>,
    body: Option<Vec<u8>>,
    expires_at: i64,
}

/// Reserves an Idempotency-Key, or reports what holds it (see `Store::idem_claim`).
pub(super) fn claim(conn: &mut Connection, c: &IdemClaim) -> rusqlite::Result<ClaimOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .prepare_cached(
            "SELECT fingerprint, state, lease_until, status, body, expires_at
             FROM idempotency WHERE scope = ?1 AND key = ?2",
        )?
        .query_row(params![c.scope, c.key], |r| {
            Ok(IdemRow {
                fingerprint: r.get(0)?,
                state: r.get(1)?,
                lease_until: r.get(2)?,
                status: r.get(3)?,
                body: r.get(4)?,
                expires_at: r.get(5)?,
            })
        })
        .optional()?;
    let outcome = match existing {
        Some(row) if row.expires_at >= c.now_ms => {
            let same_request = row.fingerprint == c.fingerprint;
            let lease = row.lease_until;
            match (row.state.as_str(), row.status, row.body) {
                ("done", Some(status), Some(body)) => Some(ClaimOutcome::Done {
                    same_request,
                    status,
                    body,
                }),
                _ if lease.is_some_and(|l| l >= c.now_ms) => {
                    Some(ClaimOutcome::InFlight { same_request })
                }
                // An in-flight claim whose lease lapsed: its instance died.
                _ => None,
            }
        }
        _ => None,
    };
    if let Some(outcome) = outcome {
        return Ok(outcome);
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO idempotency
             (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at)
         VALUES (?1, ?2, ?3, 'in_flight', ?4, NULL, NULL, ?5, ?6)",
    )?
    .execute(params![
        c.scope,
        c.key,
        c.fingerprint,
        c.now_ms.saturating_add(c.lease_ms),
        c.now_ms,
        c.now_ms.saturating_add(c.ttl_ms)
    ])?;
    tx.commit()?;
    Ok(ClaimOutcome::Claimed)
}

/// Frees an in-flight reservation whose request did nothing.
pub(super) fn release(conn: &Connection, scope: &str, key: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM idempotency WHERE scope = ?1 AND key = ?2 AND state = 'in_flight'",
    )?
    .execute(params![scope, key])?;
    Ok(())
}

/// Deletes the records that expired before `now_ms`; returns how many.
pub(super) fn prune(conn: &Connection, now_ms: i64) -> rusqlite::Result<u64> {
    conn.execute("DELETE FROM idempotency WHERE expires_at < ?1", [now_ms])
        .map(|n| n as u64)
}
