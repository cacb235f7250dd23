//! Webhook secrets at rest: sealed with a key the operator gives, so a
//! database dump alone cannot forge signatures.
//!
//! Why: the server must sign with each endpoint's secret, so it stores it, not
//! a hash. With `--webhook-key-file PATH` (32 bytes as 64 hex characters or
//! standard base64) a secret is stored as `xc20p1:` + base64(nonce ‖ ciphertext),
//! XChaCha20-Poly1305 with a random 24-byte nonce (random nonces are safe at
//! this size) and the endpoint id as additional data: a sealed secret copied
//! onto another endpoint's row does not open. Without a key a secret is stored
//! as `plain:whsec_…` and [`SecretSealer::is_plaintext`] lets the server WARN.
//!
//! Guarantees: [`SecretSealer::open`] never panics; a wrong key, another
//! endpoint's row, altered bytes, or a sealed row with no key configured are
//! distinct errors. A `plain:` row still opens after a key is configured, on
//! purpose, so rows written before the key keep working;
//! [`SecretSealer::needs_reseal`] tells the caller to rewrite them sealed.
//! Neither the key nor a secret appears in `Debug` output or in an error.

use super::secret::{SecretError, WebhookSecret, SECRET_LEN_BYTES};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// The sealing key's length, in bytes.
pub const KEY_LEN_BYTES: usize = 32;
/// XChaCha20's nonce length, in bytes.
pub const NONCE_LEN_BYTES: usize = 24;
/// Poly1305's tag length, in bytes.
pub const TAG_LEN_BYTES: usize = 16;
/// Largest key file read, in bytes (the key itself is 44 to 64 characters).
pub const KEY_FILE_LEN_MAX_BYTES: u64 = 1024;
/// Longest stored text [`SecretSealer::open`] looks at, in bytes.
pub const STORED_LEN_MAX_BYTES: usize = 256;
/// Marks a sealed secret; the `1` is the format version.
pub const SEALED_PREFIX: &str = "xc20p1:";
/// Marks a secret stored without a key.
pub const PLAIN_PREFIX: &str = "plain:";
/// Context bound into every seal before the endpoint id, so the key's
/// ciphertexts cannot be taken for any other kind of payguard data.
const AAD_CONTEXT: &[u8] = b"payguard webhook secret v1\0";

/// Why the key file cannot be used. Never carries the file's content.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading the webhook key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the webhook key file {0} is larger than {KEY_FILE_LEN_MAX_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error(
        "the webhook key must be {KEY_LEN_BYTES} bytes written as 64 hex characters \
         or as standard base64 (for example the output of `openssl rand -hex 32`)"
    )]
    Format,
}

/// Why a stored secret does not open. Never carries the stored text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the webhook secret is sealed but the server has no --webhook-key-file")]
    SealedWithoutKey,
    #[error(
        "the webhook secret does not open: another key, another endpoint's row, \
         or altered bytes"
    )]
    DoesNotOpen,
    #[error(
        "the stored webhook secret starts with neither `{SEALED_PREFIX}` nor `{PLAIN_PREFIX}`"
    )]
    UnknownFormat,
    #[error("the stored webhook secret is damaged (bad base64 or length)")]
    Damaged,
    #[error("the stored webhook secret is not a valid secret: {0}")]
    Secret(#[from] SecretError),
}

/// Seals and opens endpoint secrets; `None` inside means no key (plaintext).
#[derive(Clone)]
pub struct SecretSealer {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.is_plaintext() {
            "plaintext"
        } else {
            "sealed"
        };
        f.debug_struct("SecretSealer").field("mode", &mode).finish()
    }
}

impl SecretSealer {
    /// No key: secrets are stored as `plain:whsec_…`.
    pub fn plaintext() -> Self {
        Self { cipher: None }
    }

    /// Secrets sealed with `key`.
    pub fn with_key(key: [u8; KEY_LEN_BYTES]) -> Self {
        Self {
            cipher: Some(XChaCha20Poly1305::new(&key.into())),
        }
    }

    /// From `--webhook-key-file`: `None` is plaintext, a path must hold a key.
    pub fn from_key_file(path: Option<&Path>) -> Result<Self, KeyFileError> {
        let Some(path) = path else {
            return Ok(Self::plaintext());
        };
        let read_err = |source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        };
        let mut content = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(KEY_FILE_LEN_MAX_BYTES + 1).read_to_end(&mut content))
            .map_err(read_err)?;
        if content.len() as u64 > KEY_FILE_LEN_MAX_BYTES {
            return Err(KeyFileError::TooLarge(path.to_owned()));
        }
        let text = std::str::from_utf8(&content).map_err(|_| KeyFileError::Format)?;
        Ok(Self::with_key(parse_key(text)?))
    }

    /// True when secrets are stored readable: the server should WARN at startup.
    pub fn is_plaintext(&self) -> bool {
        self.cipher.is_none()
    }

    /// The text to store for `endpoint_id`'s secret.
    pub fn seal(&self, endpoint_id: &str, secret: &WebhookSecret) -> String {
        let Some(cipher) = &self.cipher else {
            return format!("{PLAIN_PREFIX}{}", secret.to_whsec());
        };
        let mut nonce = [0u8; NONCE_LEN_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = aad(endpoint_id);
        let payload = Payload {
            msg: secret.key_bytes(),
            aad: &aad,
        };
        // Encryption only fails past 256 GiB of plaintext; this is 32 bytes.
        let sealed = cipher
            .encrypt(&XNonce::from(nonce), payload)
            .expect("XChaCha20-Poly1305 seals 32 bytes");
        let mut raw = Vec::with_capacity(NONCE_LEN_BYTES + sealed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{}", STANDARD.encode(raw))
    }

    /// The secret stored as `stored` on `endpoint_id`'s row.
    pub fn open(&self, endpoint_id: &str, stored: &str) -> Result<WebhookSecret, OpenError> {
        if stored.len() > STORED_LEN_MAX_BYTES {
            return Err(OpenError::Damaged);
        }
        if let Some(whsec) = stored.strip_prefix(PLAIN_PREFIX) {
            // Allowed with a key too: rows written before the key was added.
            return Ok(WebhookSecret::parse_whsec(whsec)?);
        }
        let encoded = stored
            .strip_prefix(SEALED_PREFIX)
            .ok_or(OpenError::UnknownFormat)?;
        let cipher = self.cipher.as_ref().ok_or(OpenError::SealedWithoutKey)?;
        let raw = STANDARD.decode(encoded).map_err(|_| OpenError::Damaged)?;
        if raw.len() != NONCE_LEN_BYTES + SECRET_LEN_BYTES + TAG_LEN_BYTES {
            return Err(OpenError::Damaged);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN_BYTES);
        let nonce: [u8; NONCE_LEN_BYTES] = nonce.try_into().map_err(|_| OpenError::Damaged)?;
        let aad = aad(endpoint_id);
        let payload = Payload {
            msg: sealed,
            aad: &aad,
        };
        let plain = cipher
            .decrypt(&XNonce::from(nonce), payload)
            .map_err(|_| OpenError::DoesNotOpen)?;
        let bytes: [u8; SECRET_LEN_BYTES] = plain
            .as_slice()
            .try_into()
            .map_err(|_| OpenError::Damaged)?;
        Ok(WebhookSecret::from_bytes(bytes))
    }

    /// True for a `plain:` row when a key is configured: rewrite it with [`Self::seal`].
    pub fn needs_reseal(&self, stored: &str) -> bool {
        !self.is_plaintext() && stored.starts_with(PLAIN_PREFIX)
    }
}

fn aad(endpoint_id: &str) -> Vec<u8> {
    [AAD_CONTEXT, endpoint_id.as_bytes()].concat()
}

/// A key file's text: 64 hex characters or base64 of 32 bytes, whitespace trimmed.
pub fn parse_key(text: &str) -> Result<[u8; KEY_LEN_BYTES], KeyFileError> {
    let text = text.trim();
    let decoded = if text.len() == 2 * KEY_LEN_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        hex::decode(text).map_err(|_| KeyFileError::Format)?
    } else {
        STANDARD.decode(text).map_err(|_| KeyFileError::Format)?
    };
    decoded.try_into().map_err(|_| KeyFileError::Format)
}

#[cfg(test)]
#[path = "seal_tests.rs"]
mod tests;
