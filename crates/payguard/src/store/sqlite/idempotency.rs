//! Idempotency-Key records on SQLite: the claim before a request runs (with
//! its token, from the `idempotency_claims` counter), and the stored response
//! written in the request's own transaction. Which record a completion or a
//! release may touch is decided in [`rules`] and said here as WHERE clauses.

use super::error::Fault;
use crate::store::rules::{self, ClaimDecision, IdemCompletion, IdemRecord};
use crate::store::{ClaimOutcome, ClaimToken, IdemClaim, IdemWrite, OpResult};
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
            // `rules::stores_over`: an in-flight record of this claim or of
            // this request; never a stored answer.
            let changed = conn
                .prepare_cached(
                    "UPDATE idempotency SET state = 'done', status = ?1, body = ?2, lease_until = NULL,
                            claim = NULL, expires_at = ?3
                     WHERE scope = ?4 AND key = ?5 AND state = 'in_flight'
                       AND (claim = ?7 OR fingerprint = ?6)",
                )?
                .execute(params![
                    status,
                    body,
                    expires_at,
                    idem.scope,
                    idem.key,
                    idem.fingerprint,
                    idem.claim.0
                ])?;
            if changed != 1 {
                // Our lease lapsed and another request took the key over; the op
                // itself is exactly once regardless, and that request stores its own.
                tracing::warn!(event = "idempotency_lease_lost", key = %idem.key);
            }
        }
        IdemCompletion::Release => release(conn, &idem.scope, &idem.key, idem.claim)?,
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
        "SELECT fingerprint, state, lease_until, status, body, expires_at, claim
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
            claim: r.get::<_, Option<i64>>(6)?.map(ClaimToken),
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
    let token = ClaimToken(
        tx.prepare_cached(
            "UPDATE idempotency_claims SET last = last + 1 WHERE id = 1 RETURNING last",
        )?
        .query_row([], |r| r.get(0))?,
    );
    tx.prepare_cached(
        "INSERT OR REPLACE INTO idempotency
             (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at,
              claim)
         VALUES (?1, ?2, ?3, 'in_flight', ?4, NULL, NULL, ?5, ?6, ?7)",
    )?
    .execute(params![
        c.scope,
        c.key,
        c.fingerprint,
        c.now_ms.saturating_add(c.lease_ms),
        c.now_ms,
        c.now_ms.saturating_add(c.ttl_ms),
        token.0
    ])?;
    tx.commit()?;
    Ok(ClaimOutcome::Claimed { token })
}

/// Frees the in-flight reservation `token` made, whose request did nothing;
/// nothing else ([`rules::releases`]).
pub(super) fn release(
    conn: &Connection,
    scope: &str,
    key: &str,
    token: ClaimToken,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM idempotency
         WHERE scope = ?1 AND key = ?2 AND state = 'in_flight' AND claim = ?3",
    )?
    .execute(params![scope, key, token.0])?;
    Ok(())
}

/// Deletes the records that expired before `now_ms`; returns how many.
pub(super) fn prune(conn: &Connection, now_ms: i64) -> rusqlite::Result<u64> {
    conn.execute("DELETE FROM idempotency WHERE expires_at < ?1", [now_ms])
        .map(|n| n as u64)
}
