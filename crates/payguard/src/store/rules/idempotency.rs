//! The Idempotency-Key rules (API.md, "Idempotency-Key"), once for both stores.
//!
//! A key is claimed before its request runs, and its record completed in the
//! request's own transaction: the rendered response is stored when it is a
//! definite answer, and the claim is released when the request did nothing and
//! may be retried (the renderer, supplied by the HTTP layer, says which).

use crate::store::{ClaimOutcome, IdemClaim, IdemWrite, OpResult};

/// A stored Idempotency-Key record, as a store read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdemRecord {
    pub fingerprint: String,
    /// The stored response (status, body) once the first request finished.
    pub done: Option<(u16, Vec<u8>)>,
    /// While in flight: when the claim lapses if its instance died.
    pub lease_until: Option<i64>,
    pub expires_at: i64,
}

/// What a claim finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// The key is held: answer this, write nothing.
    Answer(ClaimOutcome),
    /// The key is free (new, expired, or its claimer's lease lapsed): write a new
    /// in-flight record for this claim, replacing any old one.
    Take,
}

/// Decides a claim against the record stored under its key, if any.
pub fn claim(existing: Option<&IdemRecord>, c: &IdemClaim) -> ClaimDecision {
    let Some(row) = existing.filter(|r| r.expires_at >= c.now_ms) else {
        return ClaimDecision::Take;
    };
    let same_request = row.fingerprint == c.fingerprint;
    match &row.done {
        Some((status, body)) => ClaimDecision::Answer(ClaimOutcome::Done {
            same_request,
            status: *status,
            body: body.clone(),
        }),
        None if row.lease_until.is_some_and(|l| l >= c.now_ms) => {
            ClaimDecision::Answer(ClaimOutcome::InFlight { same_request })
        }
        // An in-flight claim whose lease lapsed: its instance died.
        None => ClaimDecision::Take,
    }
}

/// What becomes of a claimed key once its command has an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdemCompletion {
    /// Store the response, kept until `expires_at`; only an in-flight record of
    /// the same fingerprint is completed (another one means the lease lapsed and
    /// another request took the key: the op itself is exactly once regardless).
    Store {
        status: u16,
        body: Vec<u8>,
        expires_at: i64,
    },
    /// The answer did nothing and may be retried: free the in-flight claim.
    Release,
}

/// Completes `idem` with `answer`, committed at `now` (ms).
pub fn completion(idem: &IdemWrite, answer: &OpResult, now: i64) -> IdemCompletion {
    match (idem.render)(answer) {
        Some((status, body)) => IdemCompletion::Store {
            status,
            body,
            expires_at: now.saturating_add(idem.ttl_ms),
        },
        None => IdemCompletion::Release,
    }
}
