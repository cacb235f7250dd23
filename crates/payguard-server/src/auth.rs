//! Bearer API keys.
//!
//! Keys come from `PAYGUARD_API_KEYS` (comma separated) or `--api-keys-file`
//! (one a line, `#` comments). Only their SHA-256 digests are kept in memory; a
//! presented key is hashed and compared with every digest in constant time
//! (`subtle`), with no early exit, so timing tells nothing about which key or how
//! much of it matched. The digest (hex) is the caller's identity, e.g. the scope of
//! its Idempotency-Keys: the key itself is never stored.
//!
//! With no key configured the server only binds loopback (checked at start) and
//! serves everyone as the `anonymous` principal.

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Longest accepted API key, in bytes.
pub const API_KEY_BYTES_MAX: usize = 256;
/// Shortest accepted API key: shorter keys are guessable.
pub const API_KEY_BYTES_MIN: usize = 16;

/// Who is calling: the hex SHA-256 of their API key, or `anonymous`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal(pub Arc<str>);

#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("API key #{index} is {len} bytes; keys must be {API_KEY_BYTES_MIN}..={API_KEY_BYTES_MAX} printable ASCII bytes")]
    BadLength { index: usize, len: usize },
    #[error("API key #{index} contains a character that is not printable ASCII")]
    BadChar { index: usize },
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    pub fn new<I, S>(keys: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut digests = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            let key = key.as_ref().trim();
            if key.is_empty() {
                continue;
            }
            if !(API_KEY_BYTES_MIN..=API_KEY_BYTES_MAX).contains(&key.len()) {
                return Err(KeyError::BadLength {
                    index: index + 1,
                    len: key.len(),
                });
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(KeyError::BadChar { index: index + 1 });
            }
            digests.push(digest(key.as_bytes()));
        }
        Ok(ApiKeys {
            digests: Arc::new(digests),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// The principal of a presented key, compared in constant time against all.
    pub fn verify(&self, presented: &str) -> Option<Principal> {
        let d = digest(presented.as_bytes());
        let mut found: Option<&[u8; 32]> = None;
        for k in self.digests.iter() {
            // No early exit: every digest is compared.
            if bool::from(k.ct_eq(&d)) {
                found = Some(k);
            }
        }
        found.map(|k| Principal(Arc::from(hex::encode(k))))
    }
}

/// The keys of an `--api-keys-file`: one a line; blank lines and `#` comments skipped.
pub fn key_file_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Routes that never need a key (API.md).
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/openapi.json")
}

pub async fn require_key(State(keys): State<ApiKeys>, mut req: Request, next: Next) -> Response {
    if keys.is_empty() {
        req.extensions_mut()
            .insert(Principal(Arc::from("anonymous")));
        return next.run(req).await;
    }
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented.and_then(|k| keys.verify(k)) {
        Some(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        None => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key: send Authorization: Bearer <key>",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_by_digest_only() {
        let keys = ApiKeys::new(["k1-0123456789abcdef", "k2-0123456789abcdef"]).unwrap();
        assert_eq!(keys.len(), 2);
        let p1 = keys.verify("k1-0123456789abcdef").unwrap();
        let p2 = keys.verify("k2-0123456789abcdef").unwrap();
        assert_ne!(p1, p2);
        assert_eq!(p1.0.len(), 64);
        assert!(!p1.0.contains("k1"));
        assert!(keys.verify("k1-0123456789abcdeF").is_none());
        assert!(keys.verify("").is_none());
    }

    #[test]
    fn bad_keys_are_refused_at_start() {
        assert!(matches!(
            ApiKeys::new(["short"]),
            Err(KeyError::BadLength { .. })
        ));
        assert!(matches!(
            ApiKeys::new(["has a space in it 123"]),
            Err(KeyError::BadChar { .. })
        ));
        let file = "# ops keys\n\nk1-0123456789abcdef\n  k2-0123456789abcdef  \n";
        assert_eq!(ApiKeys::new(key_file_lines(file)).unwrap().len(), 2);
    }
}
