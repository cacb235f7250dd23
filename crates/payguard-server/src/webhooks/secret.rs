//! Webhook signing secrets: 32 random bytes, shown to the customer once as
//! `whsec_` + standard base64 (Standard Webhooks 1.0, `shared/spec/API.md`).
//!
//! Why a type: the bytes must never reach a log line or an error message, so
//! `Debug` prints no bytes and there is no `Display`; the only way to get the
//! text out is the explicit [`WebhookSecret::to_whsec`]. Equality is constant
//! time (`subtle`), so comparing secrets leaks nothing through timing.
//!
//! Guarantees: [`WebhookSecret::generate`] draws from the operating system's
//! CSPRNG (through `rand`'s thread RNG, reseeded from the OS);
//! [`WebhookSecret::parse_whsec`] accepts exactly what `to_whsec` writes
//! (the prefix, canonical padded base64, exactly [`SECRET_LEN_BYTES`] bytes).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;

/// Length of a secret's key material, in bytes.
pub const SECRET_LEN_BYTES: usize = 32;

/// The prefix Standard Webhooks puts before the base64 of the key.
pub const WHSEC_PREFIX: &str = "whsec_";

/// Longest text [`WebhookSecret::parse_whsec`] looks at, in bytes: a 32-byte
/// key is 6 + 44; anything much longer is refused before decoding.
pub const WHSEC_LEN_MAX_BYTES: usize = 128;

/// A webhook endpoint's signing key.
#[derive(Clone)]
pub struct WebhookSecret([u8; SECRET_LEN_BYTES]);

/// Why a text is not a webhook secret. No variant carries the text itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret starts with `{WHSEC_PREFIX}`")]
    MissingPrefix,
    #[error("a webhook secret is at most {WHSEC_LEN_MAX_BYTES} bytes long")]
    TooLong,
    #[error("a webhook secret is `{WHSEC_PREFIX}` followed by standard base64")]
    NotBase64,
    #[error("a webhook secret holds {SECRET_LEN_BYTES} bytes, this one holds {0}")]
    WrongLength(usize),
}

impl WebhookSecret {
    /// A fresh secret from the CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; SECRET_LEN_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// A secret with the given key bytes (known test vectors, a decoded row).
    pub fn from_bytes(bytes: [u8; SECRET_LEN_BYTES]) -> Self {
        Self(bytes)
    }

    /// The text shown to the customer once: `whsec_` + standard base64.
    pub fn to_whsec(&self) -> String {
        format!("{WHSEC_PREFIX}{}", STANDARD.encode(self.0))
    }

    /// Reads back what [`Self::to_whsec`] wrote.
    pub fn parse_whsec(text: &str) -> Result<Self, SecretError> {
        if text.len() > WHSEC_LEN_MAX_BYTES {
            return Err(SecretError::TooLong);
        }
        let encoded = text
            .strip_prefix(WHSEC_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let decoded = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        let bytes: [u8; SECRET_LEN_BYTES] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::WrongLength(decoded.len()))?;
        Ok(Self(bytes))
    }

    /// The key bytes, for the HMAC only: kept inside the crate.
    pub(crate) fn key_bytes(&self) -> &[u8; SECRET_LEN_BYTES] {
        &self.0
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl PartialEq for WebhookSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for WebhookSecret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whsec_round_trips_and_has_the_documented_shape() {
        let secret = WebhookSecret::generate();
        let text = secret.to_whsec();
        assert!(text.starts_with("whsec_"));
        assert_eq!(
            text.len(),
            WHSEC_PREFIX.len() + 44,
            "32 bytes are 44 base64 chars"
        );
        assert_eq!(WebhookSecret::parse_whsec(&text), Ok(secret));
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(WebhookSecret::generate(), WebhookSecret::generate());
    }

    #[test]
    fn debug_prints_no_key_material() {
        let secret = WebhookSecret::from_bytes([0xab; SECRET_LEN_BYTES]);
        let shown = format!("{secret:?}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.contains(&secret.to_whsec()[WHSEC_PREFIX.len()..]));
    }

    #[test]
    fn parse_refuses_everything_else() {
        let good = WebhookSecret::from_bytes([7; SECRET_LEN_BYTES]).to_whsec();
        let body = &good[WHSEC_PREFIX.len()..];
        assert_eq!(
            WebhookSecret::parse_whsec(body),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            WebhookSecret::parse_whsec("whsec_not base64!"),
            Err(SecretError::NotBase64)
        );
        let short = format!("whsec_{}", STANDARD.encode([1u8; 24]));
        assert_eq!(
            WebhookSecret::parse_whsec(&short),
            Err(SecretError::WrongLength(24))
        );
        let long = format!("whsec_{}", "A".repeat(WHSEC_LEN_MAX_BYTES));
        assert_eq!(WebhookSecret::parse_whsec(&long), Err(SecretError::TooLong));
        // Errors never echo the input.
        let err = WebhookSecret::parse_whsec(&format!("{good}x")).unwrap_err();
        assert!(!err.to_string().contains(body));
    }
}
