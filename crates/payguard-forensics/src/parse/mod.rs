//! Line parsers for every log format forensics reads, auto-detected line by line.
//!
//! Why: production logs mix formats (the incident's plain text, payguard text and JSON,
//! tracing-subscriber JSON, logfmt) and junk. Each line is classified cheaply first: a line
//! without the bytes `oid` or `order_id` can carry no order event, so it is only checked for
//! its format (for the counts) and never decoded. Lines that carry an event are decoded without
//! allocating except for JSON strings with escapes.
//!
//! Guarantees: no input makes these functions panic (a proptest checks it); every line ends up
//! as exactly one of: an order event, another recognised line, or a skip with a reason.
//!
//! Layout: `kinds` (event names, sides, steps, skip reasons), `fields` (the fields gathered from
//! any format, and how an event is built from them), `kv` (`key=value` text), `json` (a minimal
//! JSON scanner), `text` (payguard and plain text lines); this file classifies a line and picks one.

mod fields;
mod json;
mod kinds;
mod kv;
mod text;

use std::borrow::Cow;

use memchr::memmem::Finder;

use crate::clock::RawTime;
use crate::limits::LOG_LINE_BYTES_MAX;

use fields::{split_event, Fields};
use json::{JErr, Json};
use kv::scan_kv;
use text::parse_text;

pub use kinds::{event_kind, EventKind, Side, SkipReason, Step};

/// An order event read from one line, borrowing the line where it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineEvent<'a> {
    pub time: RawTime,
    pub kind: EventKind,
    pub oid: Cow<'a, str>,
    pub req: Option<Cow<'a, str>>,
    pub host: Option<Cow<'a, str>>,
    pub amount: Option<i64>,
    pub entries: Option<u32>,
    /// The ledger entry id a commit wrote, when it reads as a place in a sequence.
    pub entry: Option<EntryId>,
}

/// A [`LineEvent`] as the merge takes it: `oid`, `req` and `host` are checked to be UTF-8 (a
/// line where they are not is skipped as binary) but stay bytes, since the merge keeps them as
/// ranges of the chunk and only a report makes text of them. Checking an id is ASCII is a few
/// word compares; a full UTF-8 validation of a short id costs a call and ~90 instructions, three
/// times per event line (a twentieth of the parse, measured; BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawEvent<'a> {
    pub time: RawTime,
    pub kind: EventKind,
    pub oid: Cow<'a, [u8]>,
    pub req: Option<Cow<'a, [u8]>>,
    pub host: Option<Cow<'a, [u8]>>,
    pub amount: Option<i64>,
    pub entries: Option<u32>,
    pub entry: Option<EntryId>,
}

impl<'a> RawEvent<'a> {
    /// The event with its ids as text (they were checked: this never fails in practice, and
    /// would say binary, as the check does, if it did).
    fn into_text(self) -> Parsed<'a> {
        fn text(b: Cow<'_, [u8]>) -> Option<Cow<'_, str>> {
            match b {
                Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
                Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
            }
        }
        let (Some(oid), Some(req), Some(host)) = (
            text(self.oid),
            self.req.map(text).map_or(Some(None), |r| r.map(Some)),
            self.host.map(text).map_or(Some(None), |h| h.map(Some)),
        ) else {
            return Parsed::Skip(SkipReason::Binary);
        };
        Parsed::Event(LineEvent {
            time: self.time,
            kind: self.kind,
            oid,
            req,
            host,
            amount: self.amount,
            entries: self.entries,
            entry: self.entry,
        })
    }
}

/// A ledger entry id read as a place in a sequence: a short prefix of letters naming the
/// sequence, then a number (`E1042`, `1042`). Ids one database hands out to every instance
/// interleave across hosts, and a higher id was taken later (clock alignment's evidence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// The prefix's bytes, packed (at most four).
    pub seq: u32,
    /// The number.
    pub n: u64,
}

impl EntryId {
    /// `None` unless `b` is at most four letters (or `_`, `-`) and then 1 to 18 digits.
    pub fn parse(b: &[u8]) -> Option<EntryId> {
        let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
        let (prefix, num) = b.split_at(b.len() - digits);
        let name = |c: &u8| c.is_ascii_alphabetic() || *c == b'_' || *c == b'-';
        if num.is_empty() || num.len() > 18 || prefix.len() > 4 || !prefix.iter().all(name) {
            return None;
        }
        Some(EntryId {
            seq: prefix.iter().fold(0u32, |s, &c| (s << 8) | c as u32),
            n: num.iter().fold(0u64, |n, &c| n * 10 + (c - b'0') as u64),
        })
    }
}

/// What one line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// An order event.
    Event(LineEvent<'a>),
    /// A line in a known format that carries no order event (or not the `--order` asked for).
    Other,
    /// Like `Other`, but with a date: it still anchors dateless lines of the same file.
    Time(RawTime),
    /// A skipped line and why.
    Skip(SkipReason),
}

/// What one line is, as the merge takes it: [`Parsed`] with the event's ids as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawParsed<'a> {
    Event(RawEvent<'a>),
    Other,
    Time(RawTime),
    Skip(SkipReason),
}

/// Parses lines; holds the byte searchers so they are built once per run.
pub struct LineParser {
    oid: Finder<'static>,
    order_id: Finder<'static>,
    want: Option<Vec<u8>>,
    want_finder: Option<Finder<'static>>,
}

impl LineParser {
    /// A parser; with `want`, events of other orders are reported as [`Parsed::Other`].
    pub fn new(want: Option<&str>) -> Self {
        LineParser {
            oid: Finder::new(b"oid"),
            order_id: Finder::new(b"order_id"),
            want: want.map(|w| w.as_bytes().to_vec()),
            want_finder: want.map(|w| Finder::new(w.as_bytes()).into_owned()),
        }
    }

    /// Classifies and parses one line (without its newline).
    pub fn parse<'a>(&self, line: &'a [u8]) -> Parsed<'a> {
        match self.parse_raw(line) {
            RawParsed::Event(e) => e.into_text(),
            RawParsed::Other => Parsed::Other,
            RawParsed::Time(t) => Parsed::Time(t),
            RawParsed::Skip(r) => Parsed::Skip(r),
        }
    }

    /// [`Self::parse`] with the event's ids left as bytes (the merge's way in).
    pub(crate) fn parse_raw<'a>(&self, line: &'a [u8]) -> RawParsed<'a> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > LOG_LINE_BYTES_MAX {
            return RawParsed::Skip(SkipReason::TooLong);
        }
        let start = line.iter().position(|c| !matches!(c, b' ' | b'\t'));
        let Some(start) = start else {
            return RawParsed::Skip(SkipReason::Blank);
        };
        let line = &line[start..];
        // With `--order`, a line that does not hold the order's bytes is not its event, unless
        // the id is written with escapes (`"O\u0031"`, `oid="O\1"`): those are decoded first.
        let relevant = (self.oid.find(line).is_some() || self.order_id.find(line).is_some())
            && self
                .want_finder
                .as_ref()
                .is_none_or(|w| w.find(line).is_some() || memchr::memchr(b'\\', line).is_some());
        let want = self.want.as_deref();
        match line[0] {
            b'{' => {
                if !relevant {
                    return json_shape(line);
                }
                let mut fields = Fields::default();
                let mut j = Json { b: line, i: 1 };
                let res = j.object(0, &mut |k, v| fields.set(k, v));
                match res {
                    Ok(()) => {
                        j.ws();
                        if j.i != line.len() {
                            return bad_or_binary(line, SkipReason::BadJson);
                        }
                    }
                    Err(JErr::Eof) => return bad_or_binary(line, SkipReason::CutJson),
                    Err(JErr::Bad) => return bad_or_binary(line, SkipReason::BadJson),
                }
                fields.finish(want)
            }
            c if c.is_ascii_digit() => parse_text(line, relevant, want),
            c if c.is_ascii_alphabetic() && is_logfmt(line) => {
                if !relevant {
                    return RawParsed::Other;
                }
                let mut fields = Fields::default();
                scan_kv(line, &mut |k, v| fields.set(k, v));
                if fields.event.is_none() {
                    if let Some(m) = fields.message.take() {
                        let (name, _) = split_event(&m);
                        fields.event = Some(Cow::Owned(name.to_vec()));
                    }
                }
                fields.finish(want)
            }
            _ => bad_or_binary(line, SkipReason::NoFormat),
        }
    }
}

/// A JSON line that carries no order: only its shape is checked, for the counts.
fn json_shape(line: &[u8]) -> RawParsed<'static> {
    let last = line.iter().rposition(|c| !c.is_ascii_whitespace());
    match last.map(|i| line[i]) {
        Some(b'}') => RawParsed::Other,
        _ => bad_or_binary(line, SkipReason::CutJson),
    }
}

fn is_logfmt(line: &[u8]) -> bool {
    let mut i = 0;
    while i < line.len()
        && (line[i].is_ascii_alphanumeric() || matches!(line[i], b'_' | b'.' | b'@'))
    {
        i += 1;
    }
    i > 0 && i < line.len() && line[i] == b'='
}

fn is_binary(line: &[u8]) -> bool {
    line.iter()
        .any(|&c| c < 0x09 || (0x0e..0x1b).contains(&c) || (0x1c..0x20).contains(&c) || c == 0x7f)
        || std::str::from_utf8(line).is_err()
}

fn bad_or_binary(line: &[u8], otherwise: SkipReason) -> RawParsed<'static> {
    if is_binary(line) {
        RawParsed::Skip(SkipReason::Binary)
    } else {
        RawParsed::Skip(otherwise)
    }
}

#[cfg(test)]
mod tests;
