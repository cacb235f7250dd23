//! Property tests: no input makes the line parsers panic, and each line gets exactly one class.

use payguard_forensics::parse::{LineParser, Parsed};
use proptest::prelude::*;

fn pieces() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "{",
        "}",
        "\"",
        ":",
        ",",
        "=",
        "[",
        "]",
        " ",
        "\\",
        "\\u00",
        "oid",
        "\"oid\"",
        "order_id",
        "ts",
        "\"ts\"",
        "\"timestamp\"",
        "2026-11-26T02:16:43.882Z",
        "02:16:43.882",
        "2026-11-26",
        "+08:00",
        "Z",
        "[INFO]",
        "WARN",
        "deduct_start",
        "duplicate_deduct",
        "deduct_commit",
        "fields",
        "\"fields\":{",
        "amount",
        "1185000",
        "-9223372036854775808",
        "99999999999999999999",
        "entries",
        "req",
        "inst",
        "host",
        "message",
        "\u{0}",
        "é",
        "\u{7f}",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_bytes(line in prop::collection::vec(any::<u8>(), 0..400)) {
        let p = LineParser::new(None);
        let _ = p.parse(&line);
        let _ = LineParser::new(Some("O1")).parse(&line);
    }

    #[test]
    fn never_panics_on_log_shaped_text(s in pieces()) {
        let p = LineParser::new(None);
        if let Parsed::Event(e) = p.parse(s.as_bytes()) {
            prop_assert!(!e.oid.is_empty());
        }
    }

    #[test]
    fn cutting_a_json_event_never_panics_and_never_yields_a_wrong_order(cut in 0usize..140) {
        let line = br#"{"ts":"2026-11-26T02:16:43.882Z","level":"INFO","event":"deduct_start","oid":"OD1","req":"r1","inst":"pay-1"}"#;
        let p = LineParser::new(None);
        if let Parsed::Event(e) = p.parse(&line[..cut.min(line.len())]) {
            prop_assert_eq!(&*e.oid, "OD1");
        }
    }
}
