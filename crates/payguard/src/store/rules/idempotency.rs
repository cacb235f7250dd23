//! The Idempotency-Key rules (API.md, "Idempotency-Key"), once for both stores.
//!
//! A key is claimed before its request runs, and its record completed in the
//! request's own transaction: the rendered response is stored when it is a
//! definite answer, and the claim is released when the request did nothing and
//! may be retried (the renderer, supplied by the HTTP layer, says which).
//!
//! Each claim is named by a [`ClaimToken`] the store makes unique. Freeing a
//! key (the keyed sequence's `idem_release`, or the op's own transaction)
//! touches only the in-flight claim that carries the freeing request's token
//! ([`releases`]): by the time a request that did nothing frees its key, its
//! lease may have lapsed and another request claimed the key, or its
//! transaction may have committed and freed the key already (its answer then
//! lost: the store unavailable, the outcome unknown) and another request
//! claimed it since. Freeing by key alone would free that other request's
//! claim, and a third request under the key could claim it and run (a reused
//! key's other body moving money, a repeat's answer going unstored).

use crate::store::{ClaimOutcome, ClaimToken, IdemClaim, IdemWrite, OpResult};

/// A stored Idempotency-Key record, as a store read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdemRecord {
    pub fingerprint: String,
    /// The stored response (status, body) once the first request finished.
    pub done: Option<(u16, Vec<u8>)>,
    /// While in flight: when the claim lapses if its instance died.
    pub lease_until: Option<i64>,
    /// While in flight: the claim that holds the key. `None` once done, and
    /// for a claim made before claims carried tokens (SQLite v8, PostgreSQL
    /// v6): no request holds its token, so it is never freed, only lapses.
    pub claim: Option<ClaimToken>,
    pub expires_at: i64,
}

/// What a claim finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// The key is held: answer this, write nothing.
    Answer(ClaimOutcome),
    /// The key is free (new, expired, or its claimer's lease lapsed): write a new
    /// in-flight record for this claim under a new [`ClaimToken`], replacing
    /// any old one.
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

/// Whether freeing the key by the request that holds claim `token` frees
/// `record`: only while the record is in flight under that very claim. A
/// stored answer is never freed; another claim (of this request's repeat or of
/// another request, taken after this one's lease lapsed or after its
/// transaction freed the key) is not this request's to free; a claim without a
/// token (made before tokens) lapses with its lease.
pub fn releases(record: &IdemRecord, token: ClaimToken) -> bool {
    record.done.is_none() && record.claim == Some(token)
}

/// Whether a command's definite answer is stored over `record`, in the
/// command's transaction: only over an in-flight record, never a stored answer
/// (the key's answer, once told, stays), and only of this request: its own
/// claim, or another claim of the same request (the same fingerprint: a repeat
/// that claimed the key after this one's lease lapsed). The latter is stored
/// over because the op committed and its client is told this answer: the
/// repeat's command then finds the key answered (`rules::answered`,
/// `KeyAnswered`) and answers the same, where leaving the key to it would let
/// it decide afresh, and the key could come to hold an answer other than the
/// one told (a refusal `order_not_paid` told, a refund made). An in-flight
/// record of another fingerprint is another request's key now: untouched (the
/// op itself is exactly once regardless; that request stores its own answer).
pub fn stores_over(record: &IdemRecord, idem: &IdemWrite) -> bool {
    record.done.is_none()
        && (record.claim == Some(idem.claim) || record.fingerprint == idem.fingerprint)
}

/// What becomes of a claimed key once its command has an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdemCompletion {
    /// Store the response, kept until `expires_at`, over the record
    /// [`stores_over`] accepts.
    Store {
        status: u16,
        body: Vec<u8>,
        expires_at: i64,
    },
    /// The answer did nothing and may be retried: free the in-flight claim,
    /// if it is still this command's ([`releases`]).
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
