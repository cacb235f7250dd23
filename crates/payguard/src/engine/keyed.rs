//! One request under an Idempotency-Key (API.md, "Idempotency-Key"): the
//! sequence `payguard-server` runs for every POST that carries the header,
//! written once here, without HTTP, so the deterministic simulation
//! (`payguard-sim`) runs the same code the server ships.
//!
//! The sequence: claim the key with the request's fingerprint; a repeat of a
//! finished request gets its stored answer, a repeat of one still in flight
//! waits for it (up to [`KeyLimits::wait_ms`]), and another request under the
//! key is refused. Once claimed, the op runs as a [`Command`] carrying the
//! key's record, so the store writes the answer in the op's own transaction
//! (or frees the key if the answer may be retried). An answer that did
//! nothing and may be retried (the store unavailable, the lane full, a lock
//! wait given up) frees the key, so the caller can retry with it, unless the
//! store decided it in the op's transaction (a stale fencing token), which
//! freed the key already. Every free names the claim, not only the key: the
//! claim's [`ClaimToken`], carried by the op's record too, so after an answer
//! whose transaction may have committed and freed the key (the store
//! unavailable, the outcome unknown), or once this request's lease lapsed, a
//! claim another request took since is left alone (`rules::releases`;
//! RELIABILITY.md row 6g).
//!
//! A command the store finds already answered under its key
//! ([`Rejection::KeyAnswered`]: a committed transaction stored its answer, and
//! the command ran again, as a batch rerun after an unanswered COMMIT does) is
//! not an answer: the key is claimed again, and its stored answer is this
//! request's, exactly as a repeat of the request would be told.
//!
//! What stays in the HTTP layer: reading and validating the header, the
//! fingerprint (method, path, canonical body), rendering answers to bytes
//! ([`stored_answer`] decides which are stored) and mapping a
//! [`KeyedAnswer`] to a status.

use super::mutants::{armed, Mutant};
use super::{Engine, EngineError};
use crate::domain::RequestId;
use crate::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, IdemWrite, Op, OpResult, Output, Render,
};
use crate::store::{Rejection, StoreError};
use std::time::{Duration, Instant};

/// How many times one keyed request runs its op when the store answers
/// [`Rejection::KeyAnswered`] (the key is claimed again after each): the
/// second claim reads the stored answer, unless the key expired meanwhile.
const KEY_ANSWERED_RUNS_MAX: u32 = 3;

/// The limits of one keyed request.
#[derive(Clone, Copy, Debug)]
pub struct KeyLimits {
    /// How long an in-flight claim survives its instance's death (ms).
    pub lease_ms: i64,
    /// How long a finished request's answer is kept (ms).
    pub ttl_ms: i64,
    /// How long a repeat waits for the first request with its key (ms).
    pub wait_ms: u64,
    /// How often it looks meanwhile (ms).
    pub poll_ms: u64,
}

/// Who asked, under which key, for what.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// The caller's scope (the server: hex SHA-256 of its API key).
    pub scope: String,
    pub key: String,
    /// Identifies the request (the server: method, path and canonical body).
    pub fingerprint: String,
}

/// What a keyed request comes to.
#[derive(Debug)]
pub enum KeyedAnswer {
    /// A repeat of a finished request: its stored answer, byte for byte.
    Replay { status: u16, body: Vec<u8> },
    /// The key was used for another request (422 `idempotency_key_reuse`).
    Reused,
    /// The first request with the key is still in flight after the wait (409
    /// `idempotency_key_in_use`).
    InUse,
    /// The key could not be claimed: nothing ran.
    ClaimFailed(StoreError),
    /// The op ran under the key (boxed: an [`Output`] is large).
    Ran(Box<Result<Output, EngineError>>),
}

/// The answer stored under a key for `result`, rendered by `ok` or `err`, or
/// `None` when it must not be stored: a rejection that is not definite did
/// nothing and may be retried. Every renderer of stored answers goes through
/// this, so what is stored is decided in one place.
pub fn stored_answer(
    result: &OpResult,
    ok: impl FnOnce(&Output) -> (u16, Vec<u8>),
    err: impl FnOnce(&Rejection) -> (u16, Vec<u8>),
) -> Option<(u16, Vec<u8>)> {
    match result {
        Ok(out) => Some(ok(out)),
        Err(r) if !r.is_definite() => None,
        Err(r) => Some(err(r)),
    }
}

impl Engine {
    /// Runs `op` under `keyed` (see the module docs). `now_ms` is the caller's
    /// wall clock, which the claim's lease and expiry are read against;
    /// `render` renders the answer stored in the op's transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_keyed(
        &self,
        keyed: Keyed,
        op: Op,
        req: RequestId,
        deadline: Option<Instant>,
        render: Render,
        limits: KeyLimits,
        now_ms: impl Fn() -> i64,
    ) -> KeyedAnswer {
        let mut runs = 0;
        loop {
            let token = match self.claim_key(&keyed, limits, &now_ms).await {
                Ok(token) => token,
                Err(early) => return early,
            };
            runs += 1;
            let result = self
                .run_claimed(
                    &keyed,
                    token,
                    op.clone(),
                    req.clone(),
                    deadline,
                    render.clone(),
                    limits,
                )
                .await;
            match result {
                // A committed transaction answered this request already (a
                // batch rerun after its unanswered COMMIT had committed, or a
                // repeat that completed the key while this one's lease
                // lapsed): nothing was decided or written. Claim the key
                // again: it holds the stored answer, which this request
                // answers exactly as its repeat would.
                Err(EngineError::Rejected(Rejection::KeyAnswered)) if runs < KEY_ANSWERED_RUNS_MAX => {
                    tracing::info!(event = "idempotency_key_answered", key = %keyed.key, "answering the key's stored response");
                }
                // The key was answered each time it was run, and freed (it
                // expired) each time it was claimed again: never told as an
                // answer; a retry of the same request reads the outcome.
                Err(EngineError::Rejected(Rejection::KeyAnswered)) => {
                    return KeyedAnswer::Ran(Box::new(Err(EngineError::Store(StoreError::Unknown(
                        "the request's answer is stored under its Idempotency-Key but could not be read back; retry the same request".into(),
                    )))))
                }
                other => return KeyedAnswer::Ran(Box::new(other)),
            }
        }
    }

    /// Runs `op` under the key this request claimed, and frees the key when
    /// the answer did nothing and may be retried.
    #[allow(clippy::too_many_arguments)]
    async fn run_claimed(
        &self,
        keyed: &Keyed,
        token: ClaimToken,
        op: Op,
        req: RequestId,
        deadline: Option<Instant>,
        render: Render,
        limits: KeyLimits,
    ) -> Result<Output, EngineError> {
        let store = self.store().clone();
        let cmd = Command::new(op).with_idempotency(IdemWrite {
            scope: keyed.scope.clone(),
            key: keyed.key.clone(),
            fingerprint: keyed.fingerprint.clone(),
            ttl_ms: limits.ttl_ms,
            claim: token,
            render,
        });
        let result = self.submit_by(cmd, req, deadline).await;
        let released = match &result {
            // A definite answer was stored in the op's own transaction.
            Ok(_) => true,
            Err(EngineError::Rejected(r)) if r.is_definite() => true,
            // The key holds a stored answer, which must stay: nothing to free.
            Err(EngineError::Rejected(Rejection::KeyAnswered)) => true,
            // Decided by the store in the op's transaction, which freed the
            // key there (`rules::completion`): nothing left to free. (Before
            // claims had tokens, freeing it again freed another request's
            // claim taken since: the simulation saw that request's answer go
            // unstored, and a reuse of the key run; now it would be a no-op.)
            Err(EngineError::Rejected(Rejection::StaleFencingToken))
                if !armed(Mutant::ReleaseKeyAfterStaleToken) =>
            {
                true
            }
            // Nothing moved, or the answer was lost: free this claim (only
            // this one: `rules::releases`) so the caller can retry with it.
            Err(_) => store
                .idem_release(keyed.scope.clone(), keyed.key.clone(), token)
                .await
                .is_ok(),
        };
        if !released {
            tracing::warn!(event = "idempotency_release_failed", key = %keyed.key, "the key frees itself when its lease lapses");
        }
        result
    }

    /// Claims the key: its token once it is this request's, else the answer.
    async fn claim_key(
        &self,
        keyed: &Keyed,
        limits: KeyLimits,
        now_ms: &impl Fn() -> i64,
    ) -> Result<ClaimToken, KeyedAnswer> {
        // tokio's clock: the simulation's when it runs there, the wall's otherwise.
        let started = tokio::time::Instant::now();
        loop {
            let claim = IdemClaim {
                scope: keyed.scope.clone(),
                key: keyed.key.clone(),
                fingerprint: keyed.fingerprint.clone(),
                now_ms: now_ms(),
                lease_ms: limits.lease_ms,
                ttl_ms: limits.ttl_ms,
            };
            match self.store().idem_claim(claim).await {
                Err(e) => return Err(KeyedAnswer::ClaimFailed(e)),
                Ok(ClaimOutcome::Claimed { token }) => return Ok(token),
                Ok(ClaimOutcome::Done {
                    same_request: true,
                    status,
                    body,
                }) => return Err(KeyedAnswer::Replay { status, body }),
                Ok(
                    ClaimOutcome::Done {
                        same_request: false,
                        ..
                    }
                    | ClaimOutcome::InFlight {
                        same_request: false,
                    },
                ) => return Err(KeyedAnswer::Reused),
                Ok(ClaimOutcome::InFlight { same_request: true }) => {
                    if started.elapsed() >= Duration::from_millis(limits.wait_ms) {
                        return Err(KeyedAnswer::InUse);
                    }
                    tokio::time::sleep(Duration::from_millis(limits.poll_ms)).await;
                }
            }
        }
    }
}
