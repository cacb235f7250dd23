//! `Idempotency-Key` (IETF draft "The Idempotency-Key HTTP Header Field"), as
//! API.md specifies it.
//!
//! A key is scoped to the caller's API key (by its SHA-256, never the key). The
//! request's fingerprint is method + path + the body as canonical JSON (sorted
//! keys, no whitespace). The first request with a key reserves it in the database
//! (an in-flight record with a 30 s lease); its op then runs as a [`Command`]
//! carrying the key's record, so the store writes the full response in the same
//! transaction as the money movement. Later requests with the key:
//! * same fingerprint, first done: the stored status and body, byte for byte,
//!   with `Idempotent-Replayed: true`;
//! * same fingerprint, first in flight: wait up to 5 s, then 409 `idempotency_key_in_use`;
//! * another fingerprint: 422 `idempotency_key_reuse`.
//!
//! Responses that did nothing and may be retried (400, 401, 413, 415, 422, 500,
//! 503) are not stored: validation happens before the reservation, and a 500 or
//! 503 releases it.

use crate::error::ApiError;
use crate::render::{json_response, storable};
use crate::AppState;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use payguard::domain::RequestId;
use payguard::engine::keyed::{KeyLimits, KeyedAnswer};
use payguard::store::Op;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;

pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest Idempotency-Key (API.md).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// How long a request waits for the first one with its key.
pub const IDEMPOTENCY_WAIT_MS: u64 = 5_000;
/// How long an in-flight reservation survives its instance's death.
pub const IDEMPOTENCY_LEASE_MS: i64 = 30_000;
/// Poll interval while waiting for the first request.
const IDEMPOTENCY_POLL_MS: u64 = 20;

/// The header's value, if any: 1..=255 printable ASCII characters, else 422.
pub fn key_from(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let bytes = v.as_bytes();
    if bytes.is_empty()
        || bytes.len() > IDEMPOTENCY_KEY_BYTES_MAX
        || !bytes.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters"
        )));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// The body as canonical JSON: sorted keys, no whitespace. A body that is not
/// JSON never gets this far (it is rejected first), so bytes are used as they are.
pub fn canonical_body(body: &[u8]) -> Vec<u8> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        // serde_json's map is a BTreeMap here: keys serialise sorted.
        Ok(v) => serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec()),
        Err(_) => body.to_vec(),
    }
}

pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(canonical_body(body));
    hex::encode(h.finalize())
}

fn replay(status: u16, body: Vec<u8>) -> Response {
    let mut resp = json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    );
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    resp
}

pub struct Keyed<'a> {
    pub scope: &'a str,
    pub key: String,
    pub fingerprint: String,
}

/// Runs `op` under an Idempotency-Key: payguard's keyed sequence
/// ([`Engine::submit_keyed`](payguard::Engine::submit_keyed), which the
/// deterministic simulation runs too), its answer as HTTP.
pub async fn run(
    state: &AppState,
    req: RequestId,
    keyed: Keyed<'_>,
    op: Op,
    deadline: Option<Instant>,
) -> Response {
    let limits = KeyLimits {
        lease_ms: IDEMPOTENCY_LEASE_MS,
        ttl_ms: state.limits.idempotency_ttl_ms,
        wait_ms: IDEMPOTENCY_WAIT_MS,
        poll_ms: IDEMPOTENCY_POLL_MS,
    };
    let keyed = payguard::engine::keyed::Keyed {
        scope: keyed.scope.to_owned(),
        key: keyed.key,
        fingerprint: keyed.fingerprint,
    };
    let answer = state
        .engine
        .submit_keyed(
            keyed,
            op,
            req,
            deadline,
            Arc::new(storable),
            limits,
            chrono_now_ms,
        )
        .await;
    match answer {
        KeyedAnswer::Replay { status, body } => replay(status, body),
        KeyedAnswer::Reused => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reuse",
            "this Idempotency-Key was used with another method, path or body",
        )
        .into_response(),
        KeyedAnswer::InUse => ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "the first request with this Idempotency-Key is still in flight; retry later",
        )
        .into_response(),
        KeyedAnswer::ClaimFailed(e) => ApiError::from(e).into_response(),
        KeyedAnswer::Ran(result) => crate::render::respond(*result),
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_spacing() {
        let a = fingerprint(
            "POST",
            "/v1/orders",
            br#"{"id":"o1","amount":5,"account_id":"a"}"#,
        );
        let b = fingerprint(
            "POST",
            "/v1/orders",
            b"{ \"account_id\" : \"a\",\n \"amount\": 5, \"id\": \"o1\" }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            fingerprint(
                "POST",
                "/v1/orders",
                br#"{"id":"o1","amount":6,"account_id":"a"}"#
            )
        );
        assert_ne!(
            a,
            fingerprint(
                "POST",
                "/v1/accounts",
                br#"{"id":"o1","amount":5,"account_id":"a"}"#
            )
        );
        assert_eq!(
            fingerprint("POST", "/x", b""),
            fingerprint("POST", "/x", b"  ")
        );
    }

    #[test]
    fn keys_are_validated() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from(&h).unwrap(), None);
        h.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(key_from(&h).unwrap().as_deref(), Some("abc-123"));
        h.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static(""));
        assert!(key_from(&h).is_err());
        h.insert(
            IDEMPOTENCY_KEY_HEADER,
            HeaderValue::from_str(&"k".repeat(256)).unwrap(),
        );
        assert!(key_from(&h).is_err());
    }
}
