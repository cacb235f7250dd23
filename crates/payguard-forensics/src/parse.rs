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

use std::borrow::Cow;

use memchr::memmem::Finder;

use crate::clock::{parse_time, RawTime};
use crate::limits::LOG_LINE_BYTES_MAX;

/// Whether an event moves money out (deduct) or back (refund).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Deduct,
    Refund,
}

/// The step of a money-moving request an event reports (LOGS.md "Events the service writes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Start,
    CacheSet,
    Inflight,
    LockAcquired,
    LockReleased,
    Commit,
    Replay,
    Rejected,
    Duplicate,
    End,
}

/// One recognised event: its step, and its side when the name says it (`None` for shared names
/// like `order_cache_set`, `lock_acquired`, whose side is their request's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKind {
    pub step: Step,
    pub side: Option<Side>,
}

impl EventKind {
    /// The event's name as payguard writes it.
    pub fn name(self) -> &'static str {
        let refund = self.side == Some(Side::Refund);
        match (self.step, refund) {
            (Step::Start, false) => "deduct_start",
            (Step::Start, true) => "refund_start",
            (Step::CacheSet, _) => "order_cache_set",
            (Step::Inflight, _) => "concurrent_inflight",
            (Step::LockAcquired, _) => "lock_acquired",
            (Step::LockReleased, _) => "lock_released",
            (Step::Commit, false) => "deduct_commit",
            (Step::Commit, true) => "refund_commit",
            (Step::Replay, false) => "deduct_replay",
            (Step::Replay, true) => "refund_replay",
            (Step::Rejected, false) => "deduct_rejected",
            (Step::Rejected, true) => "refund_rejected",
            (Step::Duplicate, false) => "duplicate_deduct",
            (Step::Duplicate, true) => "duplicate_refund",
            (Step::End, false) => "deduct_end",
            (Step::End, true) => "refund_end",
        }
    }
}

/// Maps an event name to its kind; names forensics does not use give `None`.
pub fn event_kind(name: &[u8]) -> Option<EventKind> {
    use Side::*;
    use Step::*;
    let (step, side) = match name {
        b"deduct_start" => (Start, Some(Deduct)),
        b"refund_start" => (Start, Some(Refund)),
        b"order_cache_set" => (CacheSet, None),
        b"concurrent_inflight" => (Inflight, None),
        b"lock_acquired" => (LockAcquired, None),
        b"lock_released" => (LockReleased, None),
        b"deduct_commit" => (Commit, Some(Deduct)),
        b"refund_commit" => (Commit, Some(Refund)),
        b"deduct_replay" => (Replay, Some(Deduct)),
        b"refund_replay" => (Replay, Some(Refund)),
        b"deduct_rejected" => (Rejected, Some(Deduct)),
        b"refund_rejected" => (Rejected, Some(Refund)),
        b"duplicate_deduct" => (Duplicate, Some(Deduct)),
        b"duplicate_refund" => (Duplicate, Some(Refund)),
        b"deduct_end" => (End, Some(Deduct)),
        b"refund_end" => (End, Some(Refund)),
        _ => return None,
    };
    Some(EventKind { step, side })
}

/// Why a line was skipped. The names are the keys of `skipped` in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// Matches no known format (stack traces, banners, access logs of other tools).
    NoFormat,
    /// Starts as a JSON object but ends before it closes (a cut-off line).
    CutJson,
    /// Starts as a JSON object but is not valid JSON.
    BadJson,
    /// Contains control bytes or invalid UTF-8.
    Binary,
    /// Longer than `log_line_bytes_max`.
    TooLong,
    /// Empty or only whitespace.
    Blank,
    /// An order event whose time could not be read.
    NoTime,
}

impl SkipReason {
    /// Every reason, in report order.
    pub const ALL: [SkipReason; 7] = [
        SkipReason::NoFormat,
        SkipReason::CutJson,
        SkipReason::Binary,
        SkipReason::BadJson,
        SkipReason::TooLong,
        SkipReason::Blank,
        SkipReason::NoTime,
    ];

    /// The reason's key in reports.
    pub fn key(self) -> &'static str {
        match self {
            SkipReason::NoFormat => "no_format",
            SkipReason::CutJson => "cut_json",
            SkipReason::BadJson => "bad_json",
            SkipReason::Binary => "binary",
            SkipReason::TooLong => "too_long",
            SkipReason::Blank => "blank",
            SkipReason::NoTime => "no_time",
        }
    }

    /// Index into count arrays.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

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

/// The fields forensics reads, gathered from any format before the event is built.
#[derive(Default)]
struct Fields<'a> {
    ts: Option<RawTime>,
    event: Option<Cow<'a, [u8]>>,
    message: Option<Cow<'a, [u8]>>,
    oid: Option<Cow<'a, [u8]>>,
    req: Option<Cow<'a, [u8]>>,
    host: Option<Cow<'a, [u8]>>,
    amount: Option<i64>,
    entries: Option<u32>,
}

impl<'a> Fields<'a> {
    fn set(&mut self, key: &[u8], val: Val<'a>) {
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
    fn finish(mut self, want: Option<&[u8]>) -> Parsed<'a> {
        let other = match self.ts {
            Some(t @ (RawTime::Utc(_) | RawTime::Local(_))) => Parsed::Time(t),
            _ => Parsed::Other,
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
            return Parsed::Skip(SkipReason::NoTime);
        };
        let Some(oid) = text(oid) else {
            return Parsed::Skip(SkipReason::Binary);
        };
        if oid.is_empty() {
            return other;
        }
        let req = match self.req.map(text) {
            Some(None) => return Parsed::Skip(SkipReason::Binary),
            Some(Some(r)) if !r.is_empty() => Some(r),
            _ => None,
        };
        let host = match self.host.map(text) {
            Some(None) => return Parsed::Skip(SkipReason::Binary),
            Some(Some(h)) if !h.is_empty() => Some(h),
            _ => None,
        };
        Parsed::Event(LineEvent {
            time,
            kind,
            oid,
            req,
            host,
            amount: self.amount,
            entries: self.entries,
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
    }
}

fn text(b: Cow<'_, [u8]>) -> Option<Cow<'_, str>> {
    match b {
        Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
        Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
    }
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
fn split_event(m: &[u8]) -> (&[u8], &[u8]) {
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
enum Val<'a> {
    Raw(&'a [u8]),
    Owned(Vec<u8>),
    Count(u32),
}

impl<'a> Val<'a> {
    fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Val::Raw(b) => Cow::Borrowed(b),
            Val::Owned(v) => Cow::Borrowed(v),
            Val::Count(n) => Cow::Owned(n.to_string().into_bytes()),
        }
    }
    fn into_bytes(self) -> Cow<'a, [u8]> {
        match self {
            Val::Raw(b) => Cow::Borrowed(b),
            Val::Owned(v) => Cow::Owned(v),
            Val::Count(n) => Cow::Owned(n.to_string().into_bytes()),
        }
    }
}

/// Scans `key=value` pairs separated by spaces and/or commas; values may be quoted ("...",
/// with backslash escapes) or bracketed ([a,b]). Words without `=` are skipped.
fn scan_kv<'a>(b: &'a [u8], f: &mut dyn FnMut(&'a [u8], Val<'a>)) {
    let mut i = 0;
    let n = b.len();
    while i < n {
        while i < n && matches!(b[i], b' ' | b',' | b'\t' | b';') {
            i += 1;
        }
        let ks = i;
        while i < n && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'@' | b'-')) {
            i += 1;
        }
        if i == ks || i >= n || b[i] != b'=' {
            // Not a pair: skip the word.
            while i < n && !matches!(b[i], b' ' | b',' | b'\t') {
                i += 1;
            }
            continue;
        }
        let key = &b[ks..i];
        i += 1;
        if i < n && b[i] == b'"' {
            i += 1;
            let vs = i;
            let mut esc = false;
            while i < n && b[i] != b'"' {
                if b[i] == b'\\' {
                    esc = true;
                    i += 1;
                }
                i += 1;
            }
            let ve = i.min(n);
            i = (i + 1).min(n);
            let raw = &b[vs..ve];
            if esc {
                f(key, Val::Owned(unescape_simple(raw)));
            } else {
                f(key, Val::Raw(raw));
            }
        } else if i < n && b[i] == b'[' {
            let vs = i;
            while i < n && b[i] != b']' {
                i += 1;
            }
            i = (i + 1).min(n);
            f(key, Val::Raw(&b[vs..i]));
        } else {
            let vs = i;
            while i < n && !matches!(b[i], b' ' | b',' | b'\t') {
                i += 1;
            }
            f(key, Val::Raw(&b[vs..i]));
        }
    }
}

fn unescape_simple(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            out.push(match raw[i + 1] {
                b'n' => b'\n',
                b't' => b'\t',
                c => c,
            });
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// Why a JSON scan stopped.
enum JErr {
    /// The line ended inside the object.
    Eof,
    /// Not JSON.
    Bad,
}

/// A minimal JSON object scanner: flattens nested objects (tracing's `fields`, `span`) into one
/// callback, skips arrays except to count them, and never allocates unless a string has escapes.
struct Json<'a> {
    b: &'a [u8],
    i: usize,
}

const JSON_DEPTH_MAX: u32 = 8;

impl<'a> Json<'a> {
    fn peek(&self) -> Result<u8, JErr> {
        self.b.get(self.i).copied().ok_or(JErr::Eof)
    }
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    /// After the opening quote: returns the raw contents and whether it has escapes.
    fn string(&mut self) -> Result<(&'a [u8], bool), JErr> {
        let s = self.i;
        let mut esc = false;
        loop {
            let rel = memchr::memchr2(b'"', b'\\', &self.b[self.i..]).ok_or(JErr::Eof)?;
            self.i += rel;
            if self.b[self.i] == b'\\' {
                esc = true;
                self.i += 2;
                if self.i > self.b.len() {
                    return Err(JErr::Eof);
                }
            } else {
                let raw = &self.b[s..self.i];
                self.i += 1;
                return Ok((raw, esc));
            }
        }
    }
    fn literal(&mut self) -> Result<&'a [u8], JErr> {
        let s = self.i;
        while self.i < self.b.len()
            && (self.b[self.i].is_ascii_alphanumeric()
                || matches!(self.b[self.i], b'-' | b'+' | b'.'))
        {
            self.i += 1;
        }
        if self.i == self.b.len() {
            return Err(JErr::Eof);
        }
        if self.i == s {
            return Err(JErr::Bad);
        }
        Ok(&self.b[s..self.i])
    }
    /// Skips any value; returns the item count when it was an array.
    fn skip(&mut self, depth: u32) -> Result<u32, JErr> {
        if depth > JSON_DEPTH_MAX {
            return Err(JErr::Bad);
        }
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string()?;
                Ok(0)
            }
            b'{' => {
                self.i += 1;
                self.object(depth + 1, &mut |_, _| {})?;
                Ok(0)
            }
            b'[' => {
                self.i += 1;
                let mut n = 0;
                loop {
                    self.ws();
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Ok(n);
                    }
                    self.skip(depth + 1)?;
                    n += 1;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Ok(n);
                        }
                        _ => return Err(JErr::Bad),
                    }
                }
            }
            _ => {
                self.literal()?;
                Ok(0)
            }
        }
    }
    /// After the opening brace.
    fn object(&mut self, depth: u32, f: &mut dyn FnMut(&'a [u8], Val<'a>)) -> Result<(), JErr> {
        if depth > JSON_DEPTH_MAX {
            return Err(JErr::Bad);
        }
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return Err(JErr::Bad);
            }
            self.i += 1;
            let (key, _) = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return Err(JErr::Bad);
            }
            self.i += 1;
            self.ws();
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    let start = self.i - 1;
                    let (raw, esc) = self.string()?;
                    if esc {
                        let quoted = &self.b[start..self.i];
                        match serde_json::from_slice::<String>(quoted) {
                            Ok(s) => f(key, Val::Owned(s.into_bytes())),
                            Err(_) => return Err(JErr::Bad),
                        }
                    } else {
                        f(key, Val::Raw(raw));
                    }
                }
                b'{' => {
                    self.i += 1;
                    self.object(depth + 1, f)?;
                }
                b'[' => {
                    let n = self.skip(depth + 1)?;
                    f(key, Val::Count(n));
                }
                _ => {
                    let lit = self.literal()?;
                    if lit != b"null" {
                        f(key, Val::Raw(lit));
                    }
                }
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(JErr::Bad),
            }
        }
    }
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
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > LOG_LINE_BYTES_MAX {
            return Parsed::Skip(SkipReason::TooLong);
        }
        let start = line.iter().position(|c| !matches!(c, b' ' | b'\t'));
        let Some(start) = start else {
            return Parsed::Skip(SkipReason::Blank);
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
                    return Parsed::Other;
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
fn json_shape(line: &[u8]) -> Parsed<'static> {
    let last = line.iter().rposition(|c| !c.is_ascii_whitespace());
    match last.map(|i| line[i]) {
        Some(b'}') => Parsed::Other,
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

fn bad_or_binary(line: &[u8], otherwise: SkipReason) -> Parsed<'static> {
    if is_binary(line) {
        Parsed::Skip(SkipReason::Binary)
    } else {
        Parsed::Skip(otherwise)
    }
}

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
fn parse_text<'a>(line: &'a [u8], relevant: bool, want: Option<&[u8]>) -> Parsed<'a> {
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
            RawTime::TimeOfDay(_) => Parsed::Other,
            t => Parsed::Time(t),
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

#[cfg(test)]
mod tests {
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
                    side: Some(Side::Refund)
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
        let json =
            br#"{"ts":"2026-11-26T02:16:44.109Z","event":"duplicate_deduct","oid":"O\u0031"}"#;
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
}
