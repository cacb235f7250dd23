//! Tests of secrets at rest: what opens, what must not, and the key file.

use super::*;

const KEY: [u8; KEY_LEN_BYTES] = [0x42; KEY_LEN_BYTES];

fn sealer() -> SecretSealer {
    SecretSealer::with_key(KEY)
}

#[test]
fn sealed_round_trip() {
    let secret = WebhookSecret::generate();
    let stored = sealer().seal("we_1", &secret);
    assert!(stored.starts_with(SEALED_PREFIX), "{stored}");
    assert_eq!(sealer().open("we_1", &stored), Ok(secret));
    assert!(!sealer().needs_reseal(&stored));
}

#[test]
fn plaintext_round_trip_is_marked() {
    let secret = WebhookSecret::generate();
    let plain = SecretSealer::plaintext();
    assert!(plain.is_plaintext());
    let stored = plain.seal("we_1", &secret);
    assert_eq!(stored, format!("plain:{}", secret.to_whsec()));
    assert_eq!(plain.open("we_1", &stored), Ok(secret));
}

#[test]
fn the_stored_text_does_not_contain_the_secret() {
    let secret = WebhookSecret::generate();
    let stored = sealer().seal("we_1", &secret);
    let whsec = secret.to_whsec();
    assert!(!stored.contains(&whsec[WHSEC_B64_START..]), "{stored}");
    let raw = STANDARD.decode(&stored[SEALED_PREFIX.len()..]).unwrap();
    assert!(!raw
        .windows(8)
        .any(|w| secret.key_bytes().windows(8).any(|k| k == w)));
}

const WHSEC_B64_START: usize = "whsec_".len();

#[test]
fn each_seal_uses_a_fresh_nonce() {
    let secret = WebhookSecret::generate();
    assert_ne!(
        sealer().seal("we_1", &secret),
        sealer().seal("we_1", &secret)
    );
}

#[test]
fn a_wrong_key_does_not_open() {
    let stored = sealer().seal("we_1", &WebhookSecret::generate());
    let other = SecretSealer::with_key([0x43; KEY_LEN_BYTES]);
    assert_eq!(other.open("we_1", &stored), Err(OpenError::DoesNotOpen));
}

#[test]
fn a_row_moved_to_another_endpoint_does_not_open() {
    let stored = sealer().seal("we_1", &WebhookSecret::generate());
    assert_eq!(sealer().open("we_2", &stored), Err(OpenError::DoesNotOpen));
    assert_eq!(sealer().open("we_1x", &stored), Err(OpenError::DoesNotOpen));
}

#[test]
fn every_altered_byte_is_detected() {
    let stored = sealer().seal("we_1", &WebhookSecret::generate());
    let raw = STANDARD.decode(&stored[SEALED_PREFIX.len()..]).unwrap();
    for i in 0..raw.len() {
        let mut bad = raw.clone();
        bad[i] ^= 0x01;
        let text = format!("{SEALED_PREFIX}{}", STANDARD.encode(&bad));
        assert_eq!(
            sealer().open("we_1", &text),
            Err(OpenError::DoesNotOpen),
            "byte {i}"
        );
    }
}

#[test]
fn damaged_or_unknown_rows_are_errors_not_panics() {
    let s = sealer();
    assert_eq!(s.open("we_1", "xc20p1:!!!"), Err(OpenError::Damaged));
    assert_eq!(s.open("we_1", "xc20p1:AAAA"), Err(OpenError::Damaged));
    assert_eq!(s.open("we_1", "xc20p1:"), Err(OpenError::Damaged));
    assert_eq!(s.open("we_1", "whsec_AAAA"), Err(OpenError::UnknownFormat));
    assert_eq!(s.open("we_1", ""), Err(OpenError::UnknownFormat));
    assert!(matches!(
        s.open("we_1", "plain:whsec_xx"),
        Err(OpenError::Secret(_))
    ));
    let long = "x".repeat(STORED_LEN_MAX_BYTES + 1);
    assert_eq!(s.open("we_1", &long), Err(OpenError::Damaged));
}

#[test]
fn a_sealed_row_without_a_key_says_so() {
    let stored = sealer().seal("we_1", &WebhookSecret::generate());
    let err = SecretSealer::plaintext().open("we_1", &stored).unwrap_err();
    assert_eq!(err, OpenError::SealedWithoutKey);
    assert!(err.to_string().contains("--webhook-key-file"));
}

#[test]
fn a_plain_row_still_opens_once_a_key_is_added_and_asks_for_a_reseal() {
    let secret = WebhookSecret::generate();
    let old = SecretSealer::plaintext().seal("we_1", &secret);
    assert_eq!(sealer().open("we_1", &old), Ok(secret));
    assert!(sealer().needs_reseal(&old));
    assert!(!SecretSealer::plaintext().needs_reseal(&old));
}

#[test]
fn debug_shows_no_key() {
    let shown = format!("{:?}", sealer());
    assert_eq!(shown, r#"SecretSealer { mode: "sealed" }"#);
}

#[test]
fn key_text_is_hex_or_base64_trimmed() {
    let hex_text = format!("  {}\n", hex::encode(KEY));
    assert_eq!(parse_key(&hex_text).unwrap(), KEY);
    let upper = hex::encode_upper(KEY);
    assert_eq!(parse_key(&upper).unwrap(), KEY);
    let b64 = format!("{}\n", STANDARD.encode(KEY));
    assert_eq!(parse_key(&b64).unwrap(), KEY);
}

#[test]
fn other_key_text_is_refused_naming_the_format() {
    for bad in [
        "",
        "secret",
        &hex::encode([1u8; 31]),
        &hex::encode([1u8; 33]),
        &STANDARD.encode([1u8; 16]),
        &format!("{}zz", &hex::encode(KEY)[2..]),
    ] {
        let err = parse_key(bad).unwrap_err();
        assert!(matches!(err, KeyFileError::Format), "{bad}");
        assert!(err
            .to_string()
            .contains("64 hex characters or as standard base64"));
    }
}

#[test]
fn key_files_are_read_bounded_and_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("webhook.key");
    std::fs::write(&path, format!("{}\n", hex::encode(KEY))).unwrap();
    let from_file = SecretSealer::from_key_file(Some(&path)).unwrap();
    let stored = from_file.seal("we_1", &WebhookSecret::from_bytes([5; 32]));
    assert!(sealer().open("we_1", &stored).is_ok(), "same key as KEY");

    assert!(SecretSealer::from_key_file(None).unwrap().is_plaintext());

    let missing = dir.path().join("missing.key");
    let err = SecretSealer::from_key_file(Some(&missing)).unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");

    let big = dir.path().join("big.key");
    std::fs::write(&big, "a".repeat(2 * KEY_FILE_LEN_MAX_BYTES as usize)).unwrap();
    let err = SecretSealer::from_key_file(Some(&big)).unwrap_err();
    assert!(matches!(err, KeyFileError::TooLarge(_)), "{err}");

    let binary = dir.path().join("binary.key");
    std::fs::write(&binary, [0xffu8; KEY_LEN_BYTES]).unwrap();
    let err = SecretSealer::from_key_file(Some(&binary)).unwrap_err();
    assert!(
        matches!(err, KeyFileError::Format),
        "raw bytes are not accepted: {err}"
    );
}
