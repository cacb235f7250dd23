//! Idempotency-Key records on PostgreSQL: the claim before a request runs
//! (with its token, from the `idempotency_claims` sequence, unique across
//! instances), and the stored responses of a batch, written set-based in the
//! batch's own transaction. Which record a completion or a release may touch is
//! decided in [`rules`] and said here as WHERE clauses.

use super::error::{corrupt, Fault};
use crate::store::rules::{self, ClaimDecision, IdemCompletion, IdemRecord};
use crate::store::{ClaimOutcome, ClaimToken, Command, IdemClaim, IdemWrite, OpResult, Rejection};

/// Completes (or drops) the Idempotency-Key reservations of the batch's
/// idempotent ops, in the batch's own transaction, with two set-based statements:
/// the stored response is exactly the committed result (real entry ids included).
pub(super) async fn write_idempotency(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[Command],
    results: &[OpResult],
    now: i64,
) -> Result<(), Fault> {
    let mut done: Vec<(&IdemWrite, i32, Vec<u8>, i64)> = Vec::new();
    let mut dropped: Vec<&IdemWrite> = Vec::new();
    for (op, result) in ops.iter().zip(results) {
        if let Some(idem) = &op.idempotency {
            if *result == Err(Rejection::KeyAnswered) {
                // The key holds this request's answer: it stays as it is.
                continue;
            }
            match rules::completion(idem, result, now) {
                IdemCompletion::Store {
                    status,
                    body,
                    expires_at,
                } => done.push((idem, i32::from(status), body, expires_at)),
                IdemCompletion::Release => dropped.push(idem),
            }
        }
    }
    if !done.is_empty() {
        let scopes: Vec<&str> = done.iter().map(|d| d.0.scope.as_str()).collect();
        let keys: Vec<&str> = done.iter().map(|d| d.0.key.as_str()).collect();
        let prints: Vec<&str> = done.iter().map(|d| d.0.fingerprint.as_str()).collect();
        let statuses: Vec<i32> = done.iter().map(|d| d.1).collect();
        let bodies: Vec<&[u8]> = done.iter().map(|d| d.2.as_slice()).collect();
        let expires: Vec<i64> = done.iter().map(|d| d.3).collect();
        let claims: Vec<i64> = done.iter().map(|d| d.0.claim.0).collect();
        // `rules::stores_over`: an in-flight record of this claim or of this
        // request; never a stored answer.
        let stmt = tx
            .prepare_cached(
                "UPDATE idempotency AS i SET state = 'done', status = t.st, body = t.b,
                        lease_until = NULL, claim = NULL, expires_at = t.exp
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::bytea[], $6::int8[],
                             $7::int8[])
                      AS t (sc, k, f, st, b, exp, cl)
                 WHERE i.scope = t.sc AND i.key = t.k AND i.state = 'in_flight'
                   AND (i.claim = t.cl OR i.fingerprint = t.f)
                 RETURNING i.key",
            )
            .await?;
        let stored = tx
            .query(
                &stmt,
                &[
                    &scopes, &keys, &prints, &statuses, &bodies, &expires, &claims,
                ],
            )
            .await?;
        if stored.len() != done.len() {
            // A lease lapsed and another request took its key over; the op itself
            // is exactly once regardless, and that request stores its own answer.
            let stored: std::collections::HashSet<&str> =
                stored.iter().filter_map(|r| r.try_get(0).ok()).collect();
            for key in keys.iter().filter(|k| !stored.contains(*k)) {
                tracing::warn!(event = "idempotency_lease_lost", key = %key);
            }
        }
    }
    if !dropped.is_empty() {
        let scopes: Vec<&str> = dropped.iter().map(|d| d.scope.as_str()).collect();
        let keys: Vec<&str> = dropped.iter().map(|d| d.key.as_str()).collect();
        let claims: Vec<i64> = dropped.iter().map(|d| d.claim.0).collect();
        // `rules::releases`: only the in-flight claim each command holds.
        let stmt = tx
            .prepare_cached(
                "DELETE FROM idempotency AS i
                 USING unnest($1::text[], $2::text[], $3::int8[]) AS t (sc, k, cl)
                 WHERE i.scope = t.sc AND i.key = t.k AND i.state = 'in_flight' AND i.claim = t.cl",
            )
            .await?;
        tx.execute(&stmt, &[&scopes, &keys, &claims]).await?;
    }
    Ok(())
}

/// The columns [`record_from_row`] reads, in its order.
pub(super) const RECORD_COLS: &str =
    "fingerprint, state, lease_until, status, body, expires_at, claim";

/// A key's record from a row of [`RECORD_COLS`] (maybe followed by others).
pub(super) fn record_from_row(row: &tokio_postgres::Row) -> Result<IdemRecord, Fault> {
    let state: &str = row.try_get(1)?;
    let status: Option<i32> = row.try_get(3)?;
    let body: Option<Vec<u8>> = row.try_get(4)?;
    Ok(IdemRecord {
        fingerprint: row.try_get(0)?,
        done: match (state, status, body) {
            ("done", Some(status), Some(body)) => Some((
                u16::try_from(status).map_err(|_| corrupt(format!("stored status {status}")))?,
                body,
            )),
            _ => None,
        },
        lease_until: row.try_get(2)?,
        claim: row.try_get::<_, Option<i64>>(6)?.map(ClaimToken),
        expires_at: row.try_get(5)?,
    })
}

/// Reserves an Idempotency-Key (see [`Store::idem_claim`]). A new key is inserted
/// with `ON CONFLICT DO NOTHING`, which waits for a racing claimer's commit, so of
/// two instances claiming one key at once exactly one gets `Claimed`; an existing
/// key is read `FOR UPDATE` and taken over only when [`rules::claim`] says so
/// (expired, or its lease lapsed).
pub(super) async fn claim(
    client: &mut deadpool_postgres::ClientWrapper,
    c: &IdemClaim,
) -> Result<ClaimOutcome, Fault> {
    let tx = client.transaction().await?;
    let lease_until = c.now_ms.saturating_add(c.lease_ms);
    let expires_at = c.now_ms.saturating_add(c.ttl_ms);
    let insert = tx
        .prepare_cached(
            "INSERT INTO idempotency
                 (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at,
                  claim)
             VALUES ($1, $2, $3, 'in_flight', $4, NULL, NULL, $5, $6, nextval('idempotency_claims'))
             ON CONFLICT (scope, key) DO NOTHING
             RETURNING claim",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &c.scope,
        &c.key,
        &c.fingerprint,
        &lease_until,
        &c.now_ms,
        &expires_at,
    ];
    if let Some(row) = tx.query_opt(&insert, &params).await? {
        let token = ClaimToken(row.try_get(0)?);
        tx.commit().await?;
        return Ok(ClaimOutcome::Claimed { token });
    }
    let select = tx
        .prepare_cached(&format!(
            "SELECT {RECORD_COLS} FROM idempotency WHERE scope = $1 AND key = $2 FOR UPDATE"
        ))
        .await?;
    let row = tx
        .query_opt(&select, &[&c.scope, &c.key])
        .await?
        .ok_or_else(|| Fault::Retry("idempotency key vanished during its claim".into()))?;
    let record = record_from_row(&row)?;
    if let ClaimDecision::Answer(outcome) = rules::claim(Some(&record), c) {
        return Ok(outcome);
    }
    let take_over = tx
        .prepare_cached(
            "UPDATE idempotency SET fingerprint = $3, state = 'in_flight', lease_until = $4,
                    status = NULL, body = NULL, created_at = $5, expires_at = $6,
                    claim = nextval('idempotency_claims')
             WHERE scope = $1 AND key = $2
             RETURNING claim",
        )
        .await?;
    let token = ClaimToken(tx.query_one(&take_over, &params).await?.try_get(0)?);
    tx.commit().await?;
    Ok(ClaimOutcome::Claimed { token })
}
