//! Log lines: arbitrary bytes through forensics' line parser (`payguard_forensics::parse`),
//! every format it auto-detects (JSON, tracing JSON, payguard and incident text, logfmt).
//!
//! Why: forensics reads whatever a disk holds after an incident (cut lines, binary junk,
//! hostile ids), and its verdict (an order charged twice or not) rests on this parser. The
//! checks here hold for every line:
//! - no panic;
//! - a `too_long` skip only for lines over `LOG_LINE_BYTES_MAX`, a `blank` skip only for
//!   blank lines;
//! - an event has a non-empty order id, and non-empty `req`/`host` when present;
//! - `--order <that id>` keeps the event, unchanged (the filter never hides its own order);
//! - the event, written back out as a JSON line (and, when its ids are plain, as a payguard
//!   text line) and parsed again, gives the same event: kind, order, request, host, amount,
//!   entries and time.
//!
//! The input is split on `\n`, as the readers do, and every line is checked.

use crate::show;
use payguard_forensics::clock::RawTime;
use payguard_forensics::limits::LOG_LINE_BYTES_MAX;
use payguard_forensics::parse::{LineEvent, LineParser, Parsed, SkipReason};
use serde_json::{json, Map, Value};

/// Checks every line of one fuzz input.
pub fn check(data: &[u8]) {
    let all = LineParser::new(None);
    for line in data.split(|&b| b == b'\n') {
        check_line(&all, line);
    }
}

fn check_line(all: &LineParser, line: &[u8]) {
    let parsed = all.parse(line);
    let content = line.strip_suffix(b"\r").unwrap_or(line);
    match &parsed {
        Parsed::Skip(SkipReason::TooLong) => {
            assert!(
                content.len() > LOG_LINE_BYTES_MAX,
                "too_long: {}",
                show(line)
            )
        }
        Parsed::Skip(SkipReason::Blank) => assert!(
            content.iter().all(|c| matches!(c, b' ' | b'\t')),
            "blank: {}",
            show(line)
        ),
        _ => {}
    }
    let Parsed::Event(e) = parsed else {
        return;
    };
    assert!(!e.oid.is_empty(), "event without an order: {}", show(line));
    assert!(e.req.as_deref() != Some(""), "empty req: {}", show(line));
    assert!(e.host.as_deref() != Some(""), "empty host: {}", show(line));

    let only = LineParser::new(Some(&e.oid));
    assert_eq!(
        only.parse(line),
        Parsed::Event(e.clone()),
        "--order {:?} hides its own event: {}",
        e.oid,
        show(line)
    );

    if let Some(json_line) = to_json_line(&e) {
        assert_eq!(
            all.parse(json_line.as_bytes()),
            Parsed::Event(e.clone()),
            "the event written as JSON {json_line:?} reads back differently; from {}",
            show(line)
        );
    }
    if let Some(text_line) = to_text_line(&e) {
        assert_eq!(
            all.parse(text_line.as_bytes()),
            Parsed::Event(e.clone()),
            "the event written as text {text_line:?} reads back differently; from {}",
            show(line)
        );
    }
}

/// A time as the parser reads it back, or `None` when no format it reads can say it (a
/// year outside 0000–9999 that is not an epoch in microseconds).
fn time_text(t: RawTime) -> Option<(String, bool)> {
    fn civil(us: i64) -> Option<String> {
        let dt = chrono::DateTime::from_timestamp_micros(us)?.naive_utc();
        use chrono::Datelike;
        if !(0..=9999).contains(&dt.year()) {
            return None;
        }
        Some(dt.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
    }
    match t {
        RawTime::Utc(us) => match civil(us) {
            Some(s) => Some((s + "Z", true)),
            // Epoch numbers of 15 digits or more are read as microseconds.
            None if us >= 100_000_000_000_000 => Some((us.to_string(), false)),
            None => None,
        },
        RawTime::Local(us) => civil(us).map(|s| (s, true)),
        RawTime::TimeOfDay(us) => {
            // 23:59:60.x, a leap second, is past 86 400 s.
            let (secs, frac) = (us / 1_000_000, us % 1_000_000);
            let (h, m, s) = if secs >= 86_400 {
                (23, 59, secs - 86_340)
            } else {
                (secs / 3600, secs / 60 % 60, secs % 60)
            };
            Some((format!("{h:02}:{m:02}:{s:02}.{frac:06}"), true))
        }
    }
}

/// The event as one JSON log line, every field escaped by serde_json.
fn to_json_line(e: &LineEvent<'_>) -> Option<String> {
    let (t, quoted) = time_text(e.time)?;
    let mut m = Map::new();
    m.insert(
        "ts".into(),
        if quoted {
            Value::String(t)
        } else {
            Value::Number(t.parse::<i64>().ok()?.into())
        },
    );
    m.insert("event".into(), json!(e.kind.name()));
    m.insert("oid".into(), json!(e.oid));
    if let Some(r) = &e.req {
        m.insert("req".into(), json!(r));
    }
    if let Some(h) = &e.host {
        m.insert("inst".into(), json!(h));
    }
    if let Some(a) = e.amount {
        m.insert("amount".into(), json!(a));
    }
    if let Some(n) = e.entries {
        m.insert("entries".into(), json!(n));
    }
    if let Some(id) = e.entry {
        m.insert("entry".into(), json!(entry_text(id)));
    }
    Some(Value::Object(m).to_string())
}

/// A ledger entry id as written: its prefix's letters (unpacked), then its number.
fn entry_text(id: payguard_forensics::parse::EntryId) -> String {
    let prefix: String = id
        .seq
        .to_be_bytes()
        .iter()
        .filter(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    format!("{prefix}{}", id.n)
}

/// The event as a payguard text line, when every string in it is a plain id (what payguard
/// writes) and its time has a text form.
fn to_text_line(e: &LineEvent<'_>) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
    };
    if !plain(&e.oid) || !e.req.as_deref().is_none_or(plain) || !e.host.as_deref().is_none_or(plain)
    {
        return None;
    }
    let (t, quoted) = time_text(e.time)?;
    if !quoted {
        return None;
    }
    let mut line = format!("{t} [INFO] {}: oid={}", e.kind.name(), e.oid);
    if let Some(r) = &e.req {
        line += &format!(", req={r}");
    }
    if let Some(h) = &e.host {
        line += &format!(", inst={h}");
    }
    if let Some(a) = e.amount {
        line += &format!(", amount={a}");
    }
    if let Some(n) = e.entries {
        line += &format!(", entries={n}");
    }
    if let Some(id) = e.entry {
        line += &format!(", entry={}", entry_text(id));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formats_of_logs_md_pass() {
        check(b"02:16:44.109 [WARN] duplicate_deduct: oid=OD20240517A1122, amount=1185000");
        check(br#"{"ts":"2026-11-26T02:16:43.882Z","level":"INFO","event":"deduct_start","oid":"OD1","req":"r1","inst":"pay-1"}"#);
        check(b"ts=2026-11-26T02:16:44.109Z level=warn event=duplicate_deduct oid=\"OD 1\" amount=1185000 host=pay-3");
        check(b"\n\n   \t\n\x00\x01oid\n{\"oid\":");
    }

    #[test]
    fn times_are_written_so_they_read_back() {
        for t in [
            RawTime::TimeOfDay(86_400_999_999),
            RawTime::TimeOfDay(0),
            RawTime::Utc(1_700_000_000_123_456),
            RawTime::Local(-62_167_219_200_000_000),
        ] {
            let (s, _) = time_text(t).unwrap();
            assert_eq!(
                payguard_forensics::clock::parse_time(s.as_bytes()),
                Some(t),
                "{s}"
            );
        }
    }
}
