//! The fields forensics reads from a line, gathered the same way from every format, and the
//! rules that turn them into an event (or say why the line is not one).
//!
//! Why apart: the formats differ only in how they find `key`/value pairs; what the keys mean,
//! which aliases count, and when a line is an event are decided once, here.

use std::borrow::Cow;

use crate::clock::{parse_time, RawTime};

use super::kv::scan_kv;
use super::{event_kind, EntryId, RawEvent, RawParsed, SkipReason};

/// The fields forensics reads, gathered from any format before the event is built.
#[derive(Default)]
pub(super) struct Fields<'a> {
    pub(super) ts: Option<RawTime>,
    pub(super) event: Option<Cow<'a, [u8]>>,
    pub(super) message: Option<Cow<'a, [u8]>>,
    pub(super) oid: Option<Cow<'a, [u8]>>,
    pub(super) req: Option<Cow<'a, [u8]>>,
    pub(super) host: Option<Cow<'a, [u8]>>,
    pub(super) amount: Option<i64>,
    pub(super) entries: Option<u32>,
    pub(super) entry: Option<EntryId>,
}

impl<'a> Fields<'a> {
    pub(super) fn set(&mut self, key: &[u8], val: Val<'a>) {
        match key {
            b"ts" | b"timestamp" | b"time" | b"@timestamp" if self.ts.is_none() => {
                self.ts = parse_time(&val.bytes());
            }
            b"event" => self.event = Some(val.into_bytes()),
            b"message" | b"msg" => self.message = Some(val.into_bytes()),
            b"oid" | b"order_id" => self.oid = Some(val.into_bytes()),
            b"req" | b"request_id" => self.req = Some(val.into_bytes()),
            b"inst" | b"host" | b"instance" | b"instance_id" => self.host = Some(val.into_bytes()),
            b"amount" => self.amount = int(&val.bytes()),
            b"entry" | b"entry_id" => self.entry = EntryId::parse(&val.bytes()),
            b"entries" => {
                self.entries = match &val {
                    Val::Count(n) => Some(*n),
                    other => {
                        let b = other.bytes();
                        int(&b).and_then(|n| u32::try_from(n).ok()).or_else(|| {
                            // `entries=[e1,e2]` in text: count the items.
                            if b.first() == Some(&b'[') {
                                Some(count_items(&b))
                            } else {
                                None
                            }
                        })
                    }
                }
            }
            _ => {}
        }
    }

    /// Builds the event, or says why the line is not one.
    pub(super) fn finish(mut self, want: Option<&[u8]>) -> RawParsed<'a> {
        let other = match self.ts {
            Some(t @ (RawTime::Utc(_) | RawTime::Local(_))) => RawParsed::Time(t),
            _ => RawParsed::Other,
        };
        if self.event.is_none() {
            // tracing-subscriber puts the name in `message`, possibly as "event: k=v, ...".
            if let Some(msg) = self.message.take() {
                match msg {
                    Cow::Borrowed(m) => {
                        let (name, rest) = split_event(m);
                        self.event = Some(Cow::Borrowed(name));
                        scan_kv(rest, &mut |k, v| self.set_missing(k, v));
                    }
                    Cow::Owned(m) => {
                        let (name, rest) = split_event(&m);
                        let name = name.to_vec();
                        let mut extra = Fields::default();
                        scan_kv(rest, &mut |k, v| {
                            extra.set(k, Val::Owned(v.bytes().into_owned()))
                        });
                        self.event = Some(Cow::Owned(name));
                        self.fill_from(extra);
                    }
                }
            }
        }
        let Some(event) = self.event else {
            return other;
        };
        let Some(kind) = event_kind(&event) else {
            return other;
        };
        let Some(oid) = self.oid else {
            return other;
        };
        if let Some(w) = want {
            if &*oid != w {
                return other;
            }
        }
        let Some(time) = self.ts else {
            return RawParsed::Skip(SkipReason::NoTime);
        };
        let Some(oid) = text(oid) else {
            return RawParsed::Skip(SkipReason::Binary);
        };
        if oid.is_empty() {
            return other;
        }
        let req = match self.req.map(text) {
            Some(None) => return RawParsed::Skip(SkipReason::Binary),
            Some(Some(r)) if !r.is_empty() => Some(r),
            _ => None,
        };
        let host = match self.host.map(text) {
            Some(None) => return RawParsed::Skip(SkipReason::Binary),
            Some(Some(h)) if !h.is_empty() => Some(h),
            _ => None,
        };
        RawParsed::Event(RawEvent {
            time,
            kind,
            oid,
            req,
            host,
            amount: self.amount,
            entries: self.entries,
            entry: self.entry,
        })
    }

    fn set_missing(&mut self, key: &[u8], val: Val<'a>) {
        let taken = match key {
            b"ts" | b"timestamp" | b"time" => self.ts.is_some(),
            b"oid" | b"order_id" => self.oid.is_some(),
            b"req" | b"request_id" => self.req.is_some(),
            b"inst" | b"host" | b"instance" => self.host.is_some(),
            b"amount" => self.amount.is_some(),
            b"entries" => self.entries.is_some(),
            b"entry" | b"entry_id" => self.entry.is_some(),
            _ => true,
        };
        if !taken {
            self.set(key, val);
        }
    }

    fn fill_from(&mut self, o: Fields<'a>) {
        self.ts = self.ts.or(o.ts);
        self.oid = self.oid.take().or(o.oid);
        self.req = self.req.take().or(o.req);
        self.host = self.host.take().or(o.host);
        self.amount = self.amount.or(o.amount);
        self.entries = self.entries.or(o.entries);
        self.entry = self.entry.or(o.entry);
    }
}

/// `b` when it is UTF-8 text. Ids are ASCII nearly always: that check is a few word
/// compares, where a full UTF-8 validation of a short id costs a call and ~90 instructions
/// (three per event line: a twentieth of the parse, measured; BENCHMARKS.md).
fn text(b: Cow<'_, [u8]>) -> Option<Cow<'_, [u8]>> {
    (b.is_ascii() || std::str::from_utf8(&b).is_ok()).then_some(b)
}

fn int(b: &[u8]) -> Option<i64> {
    let (neg, d) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    if d.is_empty() || d.len() > 18 || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = d.iter().fold(0i64, |a, c| a * 10 + (c - b'0') as i64);
    Some(if neg { -v } else { v })
}

fn count_items(b: &[u8]) -> u32 {
    let inner = b.strip_prefix(b"[").unwrap_or(b);
    let inner = inner.strip_suffix(b"]").unwrap_or(inner);
    if inner.iter().all(|c| c.is_ascii_whitespace()) {
        return 0;
    }
    1 + inner.iter().filter(|&&c| c == b',').count() as u32
}

/// Splits "event: rest" or "event rest" into the event word and the rest.
pub(super) fn split_event(m: &[u8]) -> (&[u8], &[u8]) {
    let end = m
        .iter()
        .position(|&c| c == b':' || c == b' ' || c == b',')
        .unwrap_or(m.len());
    let rest = if end < m.len() {
        &m[end + 1..]
    } else {
        &[][..]
    };
    (&m[..end], rest)
}

/// A value as found in a line.
pub(super) enum Val<'a> {
    Raw(&'a [u8]),
    Owned(Vec<u8>),
    Count(u32),
}

impl<'a> Val<'a> {
    fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Val::Raw(b) => Cow::Borrowed(b),
            Val::Owned(v) => Cow::Borrowed(v),
            Val::Count(n) => Cow::Owned(count_text(*n)),
        }
    }
    fn into_bytes(self) -> Cow<'a, [u8]> {
        match self {
            Val::Raw(b) => Cow::Borrowed(b),
            Val::Owned(v) => Cow::Owned(v),
            Val::Count(n) => Cow::Owned(count_text(n)),
        }
    }
}

/// A JSON array's item count as text (rare: only a field that wants text gets one). Out of
/// line, so that the formatting code does not keep `Val`'s two small conversions, called for
/// every field of every line, from being inlined (measured: ~25 instructions a call).
#[cold]
#[inline(never)]
fn count_text(n: u32) -> Vec<u8> {
    n.to_string().into_bytes()
}
