//! Idempotency-Key records on SQLite: the claim before a request runs, and the
//! stored response written in the request's own transaction.

use super::error::Fault;
use crate::store::rules::{self, ClaimDecision, IdemCompletion, IdemRecord};
use crate::store::{ClaimOutcome, IdemClaim, IdemWrite, OpResult};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Completes (or drops) the Idempotency-Key reservation of a command with its
/// answer, inside the command's own transaction (see [`rules::completion`]).
pub(super) fn write_idem(
    conn: &Connection,
    idem: &IdemWrite,
    answer: &OpResult,
    now: i64,
) -> Result<(), Fault> {
    match rules::completion(idem, answer, now) {
        IdemCompletion::Store {
            status,
            body,
            expires_at,
        } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE idempotency SET state = 'done', status = ?1, body = ?2, lease_until = NULL,
                            expires_at = ?3
                     WHERE scope = ?4 AND key = ?5 AND fingerprint = ?6 AND state = 'in_flight'",
                )?
                .execute(params![
                    status,
                    body,
                    expires_at,
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
        IdemCompletion::Release => release(conn, &idem.scope, &idem.key)?,
    }
    Ok(())
}

/// The record stored under a key, if any.
pub(super) fn record(
    conn: &Connection,
    scope: &str,
    key: &str,
) -> rusqlite::Result<Option<IdemRecord>> {
    conn.prepare_cached(
        "SELECT fingerprint, state, lease_until, status, body, expires_at
         FROM idempotency WHERE scope = ?1 AND key = ?2",
    )?
    .query_row(params![scope, key], |r| {
        let state: String = r.get(1)?;
        let status: Option<u16> = r.get(3)?;
        let body: Option<Vec<u8>> = r.get(4)?;
        Ok(IdemRecord {
            fingerprint: r.get(0)?,
            done: match (state.as_str(), status, body) {
                ("done", Some(status), Some(body)) => Some((status, body)),
                _ => None,
            },
            lease_until: r.get(2)?,
            expires_at: r.get(5)?,
        })
    })
    .optional()
}

/// Reserves an Idempotency-Key, or reports what holds it (see
/// `Store::idem_claim` and [`rules::claim`]).
pub(super) fn claim(conn: &mut Connection, c: &IdemClaim) -> rusqlite::Result<ClaimOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = record(&tx, &c.scope, &c.key)?;
    if let ClaimDecision::Answer(outcome) = rules::claim(existing.as_ref(), c) {
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
