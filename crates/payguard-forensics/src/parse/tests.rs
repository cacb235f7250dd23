//! Unit tests of the line parsers, one format (or one kind of junk) at a time.

use super::*;

fn ev(line: &str) -> LineEvent<'_> {
    match LineParser::new(None).parse(line.as_bytes()) {
        Parsed::Event(e) => e,
        other => panic!("{line}: {other:?}"),
    }
}

#[test]
fn incident_plain_text() {
    let e = ev("02:16:44.109 [WARN] duplicate_deduct: oid=OD20240517A1122, amount=1185000");
    assert_eq!(e.kind.step, Step::Duplicate);
    assert_eq!(e.oid, "OD20240517A1122");
    assert_eq!(e.amount, Some(1185000));
    assert!(matches!(e.time, RawTime::TimeOfDay(_)));
    let e = ev("02:16:43.882 [INFO] order_cache_set: oid=OD20240517A1122, status=PREPARE");
    assert_eq!(e.kind.step, Step::CacheSet);
    assert_eq!(e.req, None);
}

#[test]
fn payguard_text_and_json() {
    let e = ev("2026-11-26T02:16:43.882Z [INFO] deduct_commit: oid=O1, entry=E1, amount=5, balance_after=0, req=R1, inst=pay-2");
    assert_eq!(
        (e.kind.step, e.req.as_deref(), e.host.as_deref(), e.amount),
        (Step::Commit, Some("R1"), Some("pay-2"), Some(5))
    );
    assert!(matches!(e.time, RawTime::Utc(_)));
    let e = ev(
        r#"{"level":"WARN","amount":1185000,"entries":["E1","E2"],"event":"duplicate_deduct","oid":"O\u0031","req":"R2","inst":"pay-1","ts":"2026-11-26T02:16:44.109Z"}"#,
    );
    assert_eq!(
        (e.kind.step, &*e.oid, e.entries, e.amount),
        (Step::Duplicate, "O1", Some(2), Some(1185000))
    );
}

#[test]
fn tracing_and_logfmt() {
    let e = ev(
        r#"{"timestamp":"2026-11-26T02:16:43.882123Z","level":"INFO","fields":{"message":"deduct_start","oid":"O1","req":"R1"},"target":"payguard::engine"}"#,
    );
    assert_eq!((e.kind.step, &*e.oid), (Step::Start, "O1"));
    let e = ev(
        r#"{"timestamp":"2026-11-26T02:16:43.882Z","level":"INFO","fields":{"message":"refund_commit: oid=O9, amount=7"},"target":"x"}"#,
    );
    assert_eq!(
        (e.kind, &*e.oid, e.amount),
        (
            EventKind {
                step: Step::Commit,
                side: Some(Side::Refund),
                capture: false,
            },
            "O9",
            Some(7)
        )
    );
    let e = ev(
        r#"ts=2026-11-26T02:16:44.109Z level=warn event=duplicate_deduct oid="OD 1" amount=1185000 host=pay-3"#,
    );
    assert_eq!(
        (e.kind.step, &*e.oid, e.host.as_deref()),
        (Step::Duplicate, "OD 1", Some("pay-3"))
    );
}

#[test]
fn junk_is_classified() {
    let p = LineParser::new(None);
    assert_eq!(
        p.parse(b"    at com.pay.Foo(Foo.java:12)"),
        Parsed::Skip(SkipReason::NoFormat)
    );
    assert_eq!(
        p.parse(br#"{"ts":"2026-11-26T02:16:43.882Z","event":"deduct_start","oid":"O"#),
        Parsed::Skip(SkipReason::CutJson)
    );
    assert_eq!(
        p.parse(b"\x00\x01\x02oid"),
        Parsed::Skip(SkipReason::Binary)
    );
    assert_eq!(p.parse(b""), Parsed::Skip(SkipReason::Blank));
    assert_eq!(
        p.parse(b"127.0.0.1 - - [26/Nov/2026] GET /"),
        Parsed::Skip(SkipReason::NoFormat)
    );
    assert_eq!(
        p.parse(b"3.14 is not a time"),
        Parsed::Skip(SkipReason::NoFormat)
    );
    assert_eq!(p.parse(br#"{"ts":"x","event":"health"}"#), Parsed::Other);
    assert!(matches!(
        p.parse(b"2026-11-26T02:16:43.882Z [INFO] server started"),
        Parsed::Time(RawTime::Utc(_))
    ));
    let long = format!(
        "02:16:43.882 [INFO] deduct_start: oid={}",
        "x".repeat(LOG_LINE_BYTES_MAX)
    );
    assert_eq!(p.parse(long.as_bytes()), Parsed::Skip(SkipReason::TooLong));
    assert_eq!(
        p.parse(b"ts=oops event=deduct_start oid=O1"),
        Parsed::Skip(SkipReason::NoTime)
    );
}

#[test]
fn order_filter() {
    let p = LineParser::new(Some("O2"));
    assert_eq!(
        p.parse(b"02:16:43.882 [INFO] deduct_start: oid=O1"),
        Parsed::Other
    );
    assert!(matches!(
        p.parse(b"2026-11-26T02:16:43.882Z [INFO] deduct_start: oid=O1"),
        Parsed::Time(_)
    ));
    assert!(matches!(
        p.parse(b"02:16:43.882 [INFO] deduct_start: oid=O2"),
        Parsed::Event(_)
    ));
    assert_eq!(
        p.parse(b"02:16:43.882 [INFO] deduct_start: oid=O22"),
        Parsed::Other
    );
}

/// Found by the `log_line` fuzz target: `--order O1` hid the events of O1 whose id was
/// written with escapes, because the prefilter looked for the bytes `O1` in the raw line.
#[test]
fn order_filter_keeps_escaped_ids() {
    let p = LineParser::new(Some("O1"));
    let json = br#"{"ts":"2026-11-26T02:16:44.109Z","event":"duplicate_deduct","oid":"O\u0031"}"#;
    match p.parse(json) {
        Parsed::Event(e) => assert_eq!(e.oid, "O1"),
        other => panic!("{other:?}"),
    }
    let logfmt = br#"ts=2026-11-26T02:16:44.109Z event=deduct_start oid="O\1""#;
    assert!(matches!(p.parse(logfmt), Parsed::Event(e) if e.oid == "O1"));
    // Other orders' escaped ids are still filtered out, after decoding.
    assert!(matches!(
        p.parse(br#"{"ts":"2026-11-26T02:16:44.109Z","event":"deduct_start","oid":"O\u0032"}"#),
        Parsed::Time(_)
    ));
}
