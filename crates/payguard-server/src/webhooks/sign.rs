//! Standard Webhooks 1.0 signatures: `v1,<base64 HMAC-SHA256>` over
//! `"{id}.{timestamp}.{body}"`, keyed with the secret's 32 bytes.
//!
//! Why a module of its own: the signature is the one thing a customer's
//! verifier checks byte for byte, so it is computed in one place, from the
//! exact bytes that go on the wire, and its tests run it through the outside
//! `standardwebhooks` crate (the reference verifier), not only through itself.
//!
//! Guarantees: [`sign`] is pure and deterministic; [`headers`] gives the three
//! headers of one attempt, and the signature inside covers the same id and
//! timestamp as the `webhook-id` and `webhook-timestamp` values beside it.

use super::secret::WebhookSecret;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The event id, the same on every attempt of a delivery.
pub const HEADER_ID: &str = "webhook-id";
/// Unix seconds of this attempt.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// `v1,<base64>`.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The version tag Standard Webhooks gives symmetric (HMAC) signatures.
pub const SIGNATURE_VERSION: &str = "v1";

/// `v1,<base64 HMAC-SHA256(key, "{msg_id}.{timestamp_s}.{body}")>`.
pub fn sign(secret: &WebhookSecret, msg_id: &str, timestamp_s: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail for a 32-byte key.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.key_bytes())
        .expect("HMAC-SHA256 accepts a key of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!("{SIGNATURE_VERSION},{}", STANDARD.encode(tag))
}

/// The three headers of one attempt, as (name, value) pairs.
pub fn headers(
    secret: &WebhookSecret,
    msg_id: &str,
    timestamp_s: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        (HEADER_ID, msg_id.to_owned()),
        (HEADER_TIMESTAMP, timestamp_s.to_string()),
        (HEADER_SIGNATURE, sign(secret, msg_id, timestamp_s, body)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderName, HeaderValue};
    use standardwebhooks::Webhook;

    const BODY: &[u8] = br#"{"id":"evt_1","type":"order.paid","data":{"order":{"id":"o1"}}}"#;

    fn header_map(pairs: &[(&'static str, String); 3]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn now_s() -> i64 {
        let since = std::time::UNIX_EPOCH.elapsed().unwrap();
        i64::try_from(since.as_secs()).unwrap()
    }

    /// Hand-computed once with openssl, independent of the hmac crate:
    /// key = bytes 0x00..=0x1f (`whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=`),
    /// `echo -n 'evt_test.1700000000.{"type":"order.paid"}' | openssl dgst -sha256 -mac HMAC
    ///  -macopt hexkey:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f -binary | base64`
    #[test]
    fn known_vector_matches_openssl() {
        let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        let secret = WebhookSecret::from_bytes(key);
        assert_eq!(
            secret.to_whsec(),
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        );
        let got = sign(
            &secret,
            "evt_test",
            1_700_000_000,
            br#"{"type":"order.paid"}"#,
        );
        assert_eq!(got, "v1,jr1YEZ8IgibX5Wa2BuaR6UTaQILn/5HtVqmFZ3n2m2w=");
    }

    #[test]
    fn the_reference_verifier_accepts_our_headers() {
        let secret = WebhookSecret::generate();
        let hook = Webhook::new(&secret.to_whsec()).unwrap();
        let map = header_map(&headers(&secret, "evt_1", now_s(), BODY));
        hook.verify(BODY, &map).unwrap();
    }

    #[test]
    fn the_reference_verifier_refuses_a_tampered_body() {
        let secret = WebhookSecret::generate();
        let hook = Webhook::new(&secret.to_whsec()).unwrap();
        let map = header_map(&headers(&secret, "evt_1", now_s(), BODY));
        let tampered = BODY
            .to_vec()
            .into_iter()
            .map(|b| if b == b'1' { b'2' } else { b });
        assert!(hook.verify(&tampered.collect::<Vec<_>>(), &map).is_err());
    }

    #[test]
    fn the_reference_verifier_refuses_another_secret_or_id() {
        let secret = WebhookSecret::generate();
        let other = Webhook::new(&WebhookSecret::generate().to_whsec()).unwrap();
        let map = header_map(&headers(&secret, "evt_1", now_s(), BODY));
        assert!(other.verify(BODY, &map).is_err());

        let hook = Webhook::new(&secret.to_whsec()).unwrap();
        let mut moved = map.clone();
        moved.insert(HEADER_ID, HeaderValue::from_static("evt_2"));
        assert!(hook.verify(BODY, &moved).is_err());
    }

    #[test]
    fn the_reference_verifier_refuses_a_stale_timestamp() {
        let secret = WebhookSecret::generate();
        let hook = Webhook::new(&secret.to_whsec()).unwrap();
        // Its tolerance is 5 minutes; a correctly signed old attempt is refused...
        let stale = header_map(&headers(&secret, "evt_1", now_s() - 6 * 60, BODY));
        assert!(hook.verify(BODY, &stale).is_err());
        // ...and one well inside it is accepted, so the refusal is about time.
        let recent = header_map(&headers(&secret, "evt_1", now_s() - 60, BODY));
        hook.verify(BODY, &recent).unwrap();
    }

    #[test]
    fn headers_carry_the_id_and_timestamp_they_sign() {
        let secret = WebhookSecret::from_bytes([9; 32]);
        let [(n1, id), (n2, ts), (n3, sig)] = headers(&secret, "evt_9", 42, b"{}");
        assert_eq!(
            (n1, n2, n3),
            (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE)
        );
        assert_eq!((id.as_str(), ts.as_str()), ("evt_9", "42"));
        assert_eq!(sig, sign(&secret, "evt_9", 42, b"{}"));
        assert_ne!(sig, sign(&secret, "evt_9", 43, b"{}"));
    }
}
