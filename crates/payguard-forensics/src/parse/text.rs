//! payguard text lines and the incident's plain text lines: a time, an optional level, then
//! `event: k=v, k=v`.
//!
//! Why apart: the only format whose time is not a field: it is read from the line's first words,
//! with the zone and date rules of LOGS.md.

use std::borrow::Cow;

use crate::clock::{parse_time, RawTime};

use super::fields::{split_event, Fields};
use super::kv::scan_kv;
use super::{bad_or_binary, RawParsed, SkipReason};

const LEVELS: [&[u8]; 9] = [
    b"INFO",
    b"WARN",
    b"WARNING",
    b"ERROR",
    b"DEBUG",
    b"TRACE",
    b"FATAL",
    b"NOTICE",
    b"CRITICAL",
];

/// payguard text and the incident's plain text: `TIME [LEVEL] event: k=v, k=v`.
pub(super) fn parse_text<'a>(line: &'a [u8], relevant: bool, want: Option<&[u8]>) -> RawParsed<'a> {
    let sp = memchr::memchr(b' ', line).unwrap_or(line.len());
    let mut end = sp;
    // "YYYY-MM-DD HH:MM:SS" spans two words.
    if sp == 10 && line.len() > 11 && line[11].is_ascii_digit() {
        end = 11 + memchr::memchr(b' ', &line[11..]).unwrap_or(line.len() - 11);
    }
    // A text line starts with a date and/or a time of day, never a bare number.
    if !line[..end].contains(&b':') && end != 10 {
        return bad_or_binary(line, SkipReason::NoFormat);
    }
    let Some(mut time) = parse_time(&line[..end]) else {
        return bad_or_binary(line, SkipReason::NoFormat);
    };
    let mut i = end;
    skip_spaces(line, &mut i);
    // A zone written as its own word after a zoneless time.
    if let RawTime::Local(naive) = time {
        let w = word(line, i);
        if w == b"UTC" || w == b"Z" {
            time = RawTime::Utc(naive);
            i += w.len();
        } else if (w.first() == Some(&b'+') || w.first() == Some(&b'-')) && w.len() >= 3 {
            if let Some(RawTime::Utc(t)) = parse_time(&[&line[..end], w].concat()) {
                time = RawTime::Utc(t);
                i += w.len();
            }
        }
        skip_spaces(line, &mut i);
    }
    if i < line.len() && line[i] == b'[' {
        match memchr::memchr(b']', &line[i..]) {
            Some(r) => i += r + 1,
            None => return bad_or_binary(line, SkipReason::NoFormat),
        }
    } else {
        let w = word(line, i);
        if LEVELS.iter().any(|l| l.eq_ignore_ascii_case(w)) {
            i += w.len();
        }
    }
    skip_spaces(line, &mut i);
    if !relevant {
        return match time {
            RawTime::TimeOfDay(_) => RawParsed::Other,
            t => RawParsed::Time(t),
        };
    }
    let rest = &line[i..];
    let (name, kv) = split_event(rest);
    let mut fields = Fields {
        ts: Some(time),
        event: Some(Cow::Borrowed(name)),
        ..Fields::default()
    };
    scan_kv(kv, &mut |k, v| {
        if k != b"ts" && k != b"time" && k != b"timestamp" {
            fields.set(k, v)
        }
    });
    fields.finish(want)
}

fn skip_spaces(b: &[u8], i: &mut usize) {
    while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
        *i += 1;
    }
}

fn word(b: &[u8], i: usize) -> &[u8] {
    let s = i.min(b.len());
    let e = b[s..]
        .iter()
        .position(|&c| c == b' ' || c == b'\t')
        .map_or(b.len(), |p| s + p);
    &b[s..e]
}
