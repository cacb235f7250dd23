//! The streaming pipeline: read chunks, parse them in parallel, resolve times, merge events per
//! order, and retire orders that are over.
//!
//! Why: input may be far larger than memory. Files are read in rounds that keep them close in
//! log time (`read_lead_ms`), so an order's events from every host arrive close together; an
//! order whose last event is `order_retire_after_ms` behind the slowest file is analysed and
//! dropped; if it had exactly one debit, that debit is remembered compactly for
//! `retired_debit_memory_ms` so a late second debit still joins it. Memory is bounded by the
//! orders of those two windows, not by input size.
//!
//! Ownership: parsing runs on rayon's pool and owns its chunk; the [`Engine`] (order table,
//! interners, per-file date state) is owned by one thread and only touched by `ingest`, which
//! runs alongside the parsing of the next round (`rayon::join`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rayon::prelude::*;

use crate::analyze::{
    analyze_order, rejoin, single_debit, Ev, OrderCtx, OrderState, Results, REQ_NONE,
};
use crate::clock::{DateRef, RawTime, TzOffset, MS_US};
use crate::input::{Chunk, FileInfo, Source};
use crate::limits::{
    EVENTS_PER_ORDER_MAX, HOSTS_MAX, ORDER_RETIRE_AFTER_MS, READ_LEAD_MS, RETIRED_DEBITS_MAX,
    RETIRED_DEBIT_MEMORY_MS, RETIRE_SCAN_EVERY_MS, UNDATED_PENDING_LINES_MAX,
};
use crate::parse::{EventKind, LineParser, Parsed, SkipReason};

/// A string found by the parser: a range of the chunk, or of the piece's side buffer when it
/// had to be unescaped.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    off: u32,
    len: u32,
}

/// Events most orders have (start, cache, lock, commit, unlock, end): one allocation per order.
const ORDER_EVENTS_INITIAL: usize = 8;

/// Retired orders that had exactly one debit, remembered for `retired_debit_memory_ms` of merged
/// time so that a second debit long after the order was retired still joins it. Keyed by a
/// 64-bit hash of the order id and checked with a second, independent 32-bit hash (a false join
/// needs both to collide). Invariant: every key of `map` is in `queue` with its `at_us`.
#[derive(Default)]
struct Retired {
    map: HashMap<u64, RetiredDebit, ahash::RandomState>,
    /// (merged time at retirement, key), oldest first, for expiry.
    queue: VecDeque<(i64, u64)>,
}

/// The debit line in full, and of its request's entry only what differs (64 bytes in all).
struct RetiredDebit {
    at_us: i64,
    commit: Ev,
    entry_ts: i64,
    entry_line: u32,
    check: u32,
    entry_kind: EventKind,
}

fn id_hashes(oid: &[u8]) -> (u64, u32) {
    let a = ahash::RandomState::with_seeds(0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344);
    let b = ahash::RandomState::with_seeds(0xa409_3822, 0x299f_31d0, 0x082e_fa98, 0xec4e_6c89);
    (a.hash_one(oid), b.hash_one(oid) as u32)
}

impl Retired {
    fn take(&mut self, oid: &[u8]) -> Option<(Ev, Ev)> {
        let (k, check) = id_hashes(oid);
        match self.map.get(&k) {
            Some(r) if r.check == check => self.map.remove(&k).map(|r| {
                let entry = Ev {
                    ts: r.entry_ts,
                    line: r.entry_line,
                    kind: r.entry_kind,
                    amount: i64::MIN,
                    ..r.commit
                };
                (entry, r.commit)
            }),
            _ => None,
        }
    }

    fn remember(&mut self, oid: &[u8], now_us: i64, entry: Ev, commit: Ev, counts: &mut Counts) {
        if self.map.len() >= RETIRED_DEBITS_MAX {
            counts.retired_debits_dropped += 1;
            return;
        }
        let (k, check) = id_hashes(oid);
        self.map.insert(
            k,
            RetiredDebit {
                at_us: now_us,
                commit,
                entry_ts: entry.ts,
                entry_line: entry.line,
                check,
                entry_kind: entry.kind,
            },
        );
        self.queue.push_back((now_us, k));
    }

    fn expire(&mut self, now_us: i64) {
        let horizon = now_us - RETIRED_DEBIT_MEMORY_MS * MS_US;
        while let Some(&(at, k)) = self.queue.front() {
            if at >= horizon {
                break;
            }
            self.queue.pop_front();
            if self.map.get(&k).is_some_and(|r| r.at_us == at) {
                self.map.remove(&k);
            }
        }
    }
}

/// Emptied order states kept for reuse (about 300 bytes each).
const ORDER_STATES_POOLED_MAX: usize = 16_384;

/// Order ids at most this long are stored inline in the map's key (no allocation).
const ORDER_KEY_INLINE_BYTES: usize = 30;

/// An order id as a map key: inline when short (typical ids are 15-24 bytes), boxed otherwise.
/// Hashes and compares as its bytes, so the map can be searched with a `&[u8]`.
#[derive(Clone)]
enum OrderKey {
    Inline {
        len: u8,
        bytes: [u8; ORDER_KEY_INLINE_BYTES],
    },
    Heap(Box<[u8]>),
}

impl OrderKey {
    fn new(b: &[u8]) -> Self {
        if b.len() <= ORDER_KEY_INLINE_BYTES {
            let mut bytes = [0u8; ORDER_KEY_INLINE_BYTES];
            bytes[..b.len()].copy_from_slice(b);
            OrderKey::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            OrderKey::Heap(b.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            OrderKey::Inline { len, bytes } => &bytes[..*len as usize],
            OrderKey::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for OrderKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for OrderKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialEq for OrderKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for OrderKey {}

const SIDE_BIT: u32 = 1 << 31;
const SPAN_NONE: Span = Span {
    off: u32::MAX,
    len: 0,
};

/// One parsed event, owning nothing: strings are spans.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    line: u32,
    time: RawTime,
    kind: EventKind,
    oid: Span,
    req: Span,
    host: Span,
    amount: Option<i64>,
    entries: Option<u32>,
    /// Not an event: a dated line that only anchors dateless lines of its file.
    hint: bool,
}

/// The parse of one piece of a chunk.
pub struct ParsedPiece {
    file: u16,
    data: Arc<Vec<u8>>,
    side: Vec<u8>,
    recs: Vec<Rec>,
    lines: u32,
    parsed: u32,
    skipped: [u32; SkipReason::ALL.len()],
    /// The last piece of the file's last chunk.
    last_of_file: bool,
}

impl ParsedPiece {
    fn bytes(&self, s: Span) -> Option<&[u8]> {
        if s.off == u32::MAX {
            return None;
        }
        let (buf, off): (&[u8], usize) = if s.off & SIDE_BIT != 0 {
            (&self.side, (s.off & !SIDE_BIT) as usize)
        } else {
            (&self.data, s.off as usize)
        };
        // Spans were cut from valid UTF-8 by the parser; they stay bytes until a report needs text.
        buf.get(off..off + s.len as usize)
    }
}

fn span_of(piece_data: &[u8], side: &mut Vec<u8>, s: &str) -> Span {
    let len = s.len().min(u32::MAX as usize / 2) as u32;
    // Borrowed text points into the chunk: keep its offset. Unescaped text lives in `side`.
    let base = piece_data.as_ptr() as usize;
    let p = s.as_ptr() as usize;
    if p >= base && p + s.len() <= base + piece_data.len() {
        return Span {
            off: (p - base) as u32,
            len,
        };
    }
    let off = side.len() as u32 | SIDE_BIT;
    side.extend_from_slice(s.as_bytes());
    Span { off, len }
}

/// Parses one piece of a chunk.
pub fn parse_piece(
    parser: &LineParser,
    file: u16,
    data: &Arc<Vec<u8>>,
    range: (usize, usize),
    last_of_file: bool,
) -> ParsedPiece {
    let bytes = &data[range.0..range.1];
    let mut out = ParsedPiece {
        file,
        data: Arc::clone(data),
        side: Vec::new(),
        // About one event per 150 bytes in typical logs: one allocation instead of a dozen.
        recs: Vec::with_capacity((range.1 - range.0) / 150),
        lines: 0,
        parsed: 0,
        skipped: [0; SkipReason::ALL.len()],
        last_of_file,
    };
    let mut start = 0usize;
    let handle = |line: &[u8], idx: u32, out: &mut ParsedPiece| match parser.parse(line) {
        Parsed::Event(e) => {
            out.parsed += 1;
            let oid = span_of(data, &mut out.side, &e.oid);
            let req = e
                .req
                .as_ref()
                .map_or(SPAN_NONE, |r| span_of(data, &mut out.side, r));
            let host = e
                .host
                .as_ref()
                .map_or(SPAN_NONE, |h| span_of(data, &mut out.side, h));
            out.recs.push(Rec {
                line: idx,
                time: e.time,
                kind: e.kind,
                oid,
                req,
                host,
                amount: e.amount,
                entries: e.entries,
                hint: false,
            });
        }
        Parsed::Time(t) => {
            out.parsed += 1;
            out.recs.push(Rec {
                line: idx,
                time: t,
                kind: EventKind {
                    step: crate::parse::Step::Start,
                    side: None,
                },
                oid: SPAN_NONE,
                req: SPAN_NONE,
                host: SPAN_NONE,
                amount: None,
                entries: None,
                hint: true,
            });
        }
        Parsed::Other => out.parsed += 1,
        Parsed::Skip(r) => out.skipped[r.index()] += 1,
    };
    for nl in memchr::memchr_iter(b'\n', bytes) {
        let idx = out.lines;
        handle(&bytes[start..nl], idx, &mut out);
        out.lines += 1;
        start = nl + 1;
    }
    if start < bytes.len() {
        let idx = out.lines;
        handle(&bytes[start..], idx, &mut out);
        out.lines += 1;
    }
    out
}

/// Appends one event to its order.
#[allow(clippy::too_many_arguments)]
fn push_event(
    st: &mut OrderState,
    counts: &mut Counts,
    f: usize,
    ts: i64,
    line: u64,
    kind: EventKind,
    req: Option<&[u8]>,
    host: u16,
    amount: Option<i64>,
    entries: Option<u32>,
) {
    if st.evs.len() >= EVENTS_PER_ORDER_MAX {
        counts.events_dropped += 1;
        return;
    }
    let req = match req {
        None => REQ_NONE,
        Some(r) => st.reqs.find_or_push(r),
    };
    st.last_us = st.last_us.max(ts);
    st.evs.push(Ev {
        ts,
        amount: amount.unwrap_or(i64::MIN),
        line: u32::try_from(line).unwrap_or(u32::MAX),
        file: f as u16,
        host,
        req,
        kind,
        entries: entries.map_or(0, |e| e.min(u16::MAX as u32) as u16),
    });
}

/// Settings that shape how events are merged.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub tz: TzOffset,
    /// `--date` as a day number (days since epoch).
    pub date_day: Option<i64>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub order: Option<String>,
    /// `--skew`: host → milliseconds.
    pub skew_ms: Vec<(String, i64)>,
    /// Keep timelines for `--trace-out`/`--html`.
    pub timelines: bool,
}

/// A dateless event waiting for a dated line in its file.
struct Pending {
    tod_us: i64,
    kind: EventKind,
    oid: Vec<u8>,
    req: Option<Vec<u8>>,
    host: u16,
    amount: Option<i64>,
    entries: Option<u32>,
    line: u64,
}

#[derive(Default)]
struct FileState {
    date: DateRef,
    pending: Vec<Pending>,
    lines_before: u64,
    /// The latest event time seen in this file (after skew).
    watermark_us: Option<i64>,
    finished: bool,
    undated_assumed: u64,
}

/// Counts over the whole run.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub lines_read: u64,
    pub lines_parsed: u64,
    pub skipped: [u64; SkipReason::ALL.len()],
    pub events: u64,
    pub events_filtered: u64,
    pub events_dropped: u64,
    pub orders_seen: u64,
    pub orders_retired_early: u64,
    /// Retired orders whose id came back and were joined with their remembered debit.
    pub orders_rejoined: u64,
    /// Single-debit orders not remembered because `retired_debits_max` was reached.
    pub retired_debits_dropped: u64,
    pub peak_open_orders: u64,
}

/// The merge state. See the module docs for its ownership.
pub struct Engine {
    cfg: Config,
    pub files: Vec<FileInfo>,
    file_state: Vec<FileState>,
    /// Host names; index is the host id. Invariant: `host_ix[hosts[i]] == i`.
    pub hosts: Vec<String>,
    host_ix: HashMap<Vec<u8>, u16, ahash::RandomState>,
    /// Skew per host id in microseconds.
    skew_us: Vec<i64>,
    file_host: Vec<u16>,
    orders: HashMap<OrderKey, OrderState, ahash::RandomState>,
    /// Emptied order states kept for reuse (at most `order_states_pooled_max`), so that a new
    /// order costs no allocation: orders come and go by the million.
    spare: Vec<OrderState>,
    /// Retired orders with exactly one debit, by a 64-bit hash of their id; see [`Retired`].
    retired: Retired,
    pub results: Results,
    pub counts: Counts,
    last_scan_us: i64,
    pub notes: Vec<String>,
}

impl Engine {
    pub fn new(cfg: Config, files: Vec<FileInfo>) -> Self {
        let mut e = Engine {
            file_state: files.iter().map(|_| FileState::default()).collect(),
            files: Vec::new(),
            hosts: Vec::new(),
            host_ix: HashMap::with_hasher(ahash::RandomState::new()),
            skew_us: Vec::new(),
            file_host: Vec::new(),
            orders: HashMap::with_hasher(ahash::RandomState::new()),
            spare: Vec::new(),
            retired: Retired::default(),
            results: Results::default(),
            counts: Counts::default(),
            last_scan_us: i64::MIN,
            notes: Vec::new(),
            cfg,
        };
        for f in &files {
            let h = e.host_id(f.default_host.as_bytes());
            e.file_host.push(h);
        }
        e.files = files;
        e
    }

    fn host_id(&mut self, name: &[u8]) -> u16 {
        if let Some(&h) = self.host_ix.get(name) {
            return h;
        }
        if self.hosts.len() >= HOSTS_MAX {
            return u16::MAX;
        }
        let id = self.hosts.len() as u16;
        let name = String::from_utf8_lossy(name).into_owned();
        self.host_ix.insert(name.as_bytes().to_vec(), id);
        let skew = self
            .cfg
            .skew_ms
            .iter()
            .rev()
            .find(|(h, _)| *h == name)
            .map_or(0, |(_, ms)| ms * MS_US);
        self.skew_us.push(skew);
        self.hosts.push(name);
        id
    }

    /// Per-file watermarks for choosing what to read next (`None`: unknown yet or finished).
    pub fn watermarks(&self) -> Vec<Option<i64>> {
        self.file_state
            .iter()
            .map(|f| if f.finished { None } else { f.watermark_us })
            .collect()
    }

    /// Takes one round of parsed pieces (in file order), then retires old orders.
    pub fn ingest(&mut self, pieces: Vec<ParsedPiece>, overlong: &[(u16, u64)]) {
        for &(_, n) in overlong {
            self.counts.lines_read += n;
            self.counts.skipped[SkipReason::TooLong.index()] += n;
        }
        for p in pieces {
            self.counts.lines_read += p.lines as u64;
            self.counts.lines_parsed += p.parsed as u64;
            for (i, n) in p.skipped.iter().enumerate() {
                self.counts.skipped[i] += *n as u64;
            }
            let f = p.file as usize;
            // Pass 1, in line order (the date rules need it): resolve each event's time and
            // host; dateless events without a date yet wait in `pending`.
            let lines_before = self.file_state[f].lines_before;
            let mut when: Vec<(i64, u16)> = vec![(i64::MIN, 0); p.recs.len()];
            // Hosts repeat line after line: remember the last one instead of hashing it again.
            let mut last_host: Option<(&[u8], u16)> = None;
            for (i, r) in p.recs.iter().enumerate() {
                let local = match r.time {
                    RawTime::Utc(us) => {
                        self.file_state[f].date.see_local(us + self.cfg.tz.us());
                        self.flush_pending(f);
                        Some(us + self.cfg.tz.us())
                    }
                    RawTime::Local(naive) => {
                        self.file_state[f].date.see_local(naive);
                        self.flush_pending(f);
                        Some(naive)
                    }
                    RawTime::TimeOfDay(tod) => self.file_state[f].date.place(tod),
                };
                if r.hint {
                    continue;
                }
                let host = match p.bytes(r.host) {
                    None => self.file_host[f],
                    Some(h) => match last_host {
                        Some((lh, id)) if lh == h => id,
                        _ => {
                            let id = self.host_id(h);
                            last_host = Some((h, id));
                            id
                        }
                    },
                };
                match local {
                    Some(l) => {
                        if let Some(ts) = self.admit(f, l - self.cfg.tz.us(), host) {
                            when[i] = (ts, host);
                        }
                    }
                    None => {
                        let RawTime::TimeOfDay(tod_us) = r.time else {
                            continue;
                        };
                        self.file_state[f].pending.push(Pending {
                            tod_us,
                            kind: r.kind,
                            oid: p.bytes(r.oid).unwrap_or_default().to_vec(),
                            req: p.bytes(r.req).map(<[u8]>::to_vec),
                            host,
                            amount: r.amount,
                            entries: r.entries,
                            line: lines_before + r.line as u64 + 1,
                        });
                        if self.file_state[f].pending.len() >= UNDATED_PENDING_LINES_MAX {
                            self.flush_pending_fallback(f);
                        }
                    }
                }
            }
            // Pass 2: append the events to their orders; consecutive lines of one order (common:
            // a request logs its steps together) share one lookup. (Sorting each piece by order
            // to share more lookups was measured: 5 % more CPU in all, for a shorter merge
            // thread that is not the bottleneck on 2 cores.)
            let mut a = 0;
            while a < p.recs.len() {
                let oid = p.bytes(p.recs[a].oid).unwrap_or_default();
                let mut b = a + 1;
                while b < p.recs.len() && p.bytes(p.recs[b].oid).unwrap_or_default() == oid {
                    b += 1;
                }
                let group = a..b;
                a = b;
                if group.clone().all(|i| when[i].0 == i64::MIN) {
                    continue;
                }
                let st = Self::order_mut(&mut self.orders, &mut self.spare, &mut self.counts, oid);
                for i in group {
                    let (ts, host) = when[i];
                    if ts == i64::MIN {
                        continue;
                    }
                    let r = &p.recs[i];
                    let line = lines_before + r.line as u64 + 1;
                    push_event(
                        st,
                        &mut self.counts,
                        f,
                        ts,
                        line,
                        r.kind,
                        p.bytes(r.req),
                        host,
                        r.amount,
                        r.entries,
                    );
                }
            }
            self.file_state[f].lines_before += p.lines as u64;
            if p.last_of_file {
                self.flush_pending_fallback(f);
                self.file_state[f].finished = true;
            }
            if let Ok(buf) = Arc::try_unwrap(p.data) {
                crate::input::give_back(buf);
            }
        }
        self.counts.peak_open_orders = self.counts.peak_open_orders.max(self.orders.len() as u64);
        self.retire();
    }

    /// A dated line arrived: dateless lines before it take its date, walking back.
    fn flush_pending(&mut self, f: usize) {
        if self.file_state[f].pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.file_state[f].pending);
        let mut r = self.file_state[f].date;
        let mut placed: Vec<(i64, Pending)> = Vec::with_capacity(pending.len());
        for p in pending.into_iter().rev() {
            let l = r.place(p.tod_us).unwrap_or(p.tod_us);
            placed.push((l, p));
        }
        for (l, p) in placed {
            self.add_pending(f, l, p);
        }
    }

    /// No dated line came: dateless lines take `--date` (or 1970-01-01, with a note).
    fn flush_pending_fallback(&mut self, f: usize) {
        if self.file_state[f].pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.file_state[f].pending);
        let day = self.cfg.date_day.unwrap_or(0);
        if self.cfg.date_day.is_none() {
            self.file_state[f].undated_assumed += pending.len() as u64;
        }
        let mut r = DateRef {
            at: Some((day, pending[0].tod_us)),
        };
        for p in pending {
            let l = r.place(p.tod_us).unwrap_or(p.tod_us);
            self.add_pending(f, l, p);
        }
        self.file_state[f].date = r;
    }

    fn add_pending(&mut self, f: usize, local: i64, p: Pending) {
        let ts = local - self.cfg.tz.us();
        self.add_event(
            f,
            ts,
            p.line,
            p.kind,
            &p.oid,
            p.req.as_deref(),
            p.host,
            p.amount,
            p.entries,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn add_event(
        &mut self,
        f: usize,
        ts_us: i64,
        line: u64,
        kind: EventKind,
        oid: &[u8],
        req: Option<&[u8]>,
        host: u16,
        amount: Option<i64>,
        entries: Option<u32>,
    ) {
        let Some(ts) = self.admit(f, ts_us, host) else {
            return;
        };
        let st = Self::order_mut(&mut self.orders, &mut self.spare, &mut self.counts, oid);
        push_event(
            st,
            &mut self.counts,
            f,
            ts,
            line,
            kind,
            req,
            host,
            amount,
            entries,
        );
    }

    /// Applies the host's skew and `--since`/`--until`; counts the event and moves the file's
    /// watermark. `None`: filtered out.
    fn admit(&mut self, f: usize, ts_us: i64, host: u16) -> Option<i64> {
        let ts = ts_us.saturating_add(self.skew_us.get(host as usize).copied().unwrap_or(0));
        self.counts.events += 1;
        if self.cfg.since_us.is_some_and(|s| ts < s) || self.cfg.until_us.is_some_and(|u| ts > u) {
            self.counts.events_filtered += 1;
            return None;
        }
        let fs = &mut self.file_state[f];
        fs.watermark_us = Some(fs.watermark_us.map_or(ts, |w| w.max(ts)));
        Some(ts)
    }

    /// The open order `oid`, opened (from a reused state when there is one) if new.
    fn order_mut<'m>(
        orders: &'m mut HashMap<OrderKey, OrderState, ahash::RandomState>,
        spare: &mut Vec<OrderState>,
        counts: &mut Counts,
        oid: &[u8],
    ) -> &'m mut OrderState {
        if !orders.contains_key(oid) {
            counts.orders_seen += 1;
            let fresh = spare.pop().unwrap_or_else(|| OrderState {
                evs: Vec::with_capacity(ORDER_EVENTS_INITIAL),
                ..OrderState::default()
            });
            orders.insert(OrderKey::new(oid), fresh);
        }
        orders.get_mut(oid).expect("inserted above")
    }

    /// The merged time: no file still being read is behind it (`None` while any file's is unknown
    /// because it still holds dateless lines).
    fn merged_time(&self) -> Option<i64> {
        let mut min: Option<i64> = None;
        for f in &self.file_state {
            if f.finished {
                continue;
            }
            if !f.pending.is_empty() {
                return None;
            }
            if let Some(w) = f.watermark_us {
                min = Some(min.map_or(w, |m: i64| m.min(w)));
            }
        }
        min
    }

    fn retire(&mut self) {
        let Some(now) = self.merged_time() else {
            return;
        };
        if self.last_scan_us != i64::MIN && now - self.last_scan_us < RETIRE_SCAN_EVERY_MS * MS_US {
            return;
        }
        self.last_scan_us = now;
        let cutoff = now - ORDER_RETIRE_AFTER_MS * MS_US;
        let ctx = OrderCtx {
            timelines: self.cfg.timelines,
        };
        let results = &mut self.results;
        let spare = &mut self.spare;
        let memory = &mut self.retired;
        let counts = &mut self.counts;
        memory.expire(now);
        let mut retired = 0u64;
        self.orders.retain(|oid, st| {
            if st.last_us < cutoff {
                if let Some((entry, commit)) = memory.take(oid.as_bytes()) {
                    rejoin(st, entry, commit);
                    counts.orders_seen -= 1;
                    counts.orders_rejoined += 1;
                }
                analyze_order(oid.as_bytes(), st, &ctx, results);
                if let Some((entry, commit)) = single_debit(st) {
                    memory.remember(oid.as_bytes(), now, entry, commit, counts);
                }
                retired += 1;
                if spare.len() < ORDER_STATES_POOLED_MAX
                    && st.evs.capacity() <= 4 * ORDER_EVENTS_INITIAL
                {
                    let mut s = std::mem::take(st);
                    s.clear();
                    spare.push(s);
                }
                false
            } else {
                true
            }
        });
        self.counts.orders_retired_early += retired;
        if self.orders.capacity() > 4 * self.orders.len().max(1024) {
            self.orders.shrink_to_fit();
        }
    }

    /// All input read: analyse every open order and finish the notes.
    pub fn finish(&mut self) {
        for f in 0..self.file_state.len() {
            self.flush_pending_fallback(f);
        }
        let ctx = OrderCtx {
            timelines: self.cfg.timelines,
        };
        let results = &mut self.results;
        for (oid, mut st) in self.orders.drain() {
            if let Some((entry, commit)) = self.retired.take(oid.as_bytes()) {
                rejoin(&mut st, entry, commit);
                self.counts.orders_seen -= 1;
                self.counts.orders_rejoined += 1;
            }
            analyze_order(oid.as_bytes(), &mut st, &ctx, results);
        }
        self.spare = Vec::new();
        self.retired = Retired::default();
        results.trim_incident_timelines();
        for (i, fs) in self.file_state.iter().enumerate() {
            if fs.undated_assumed > 0 {
                self.notes.push(format!(
                    "{}: {} lines have a time but no date and no dated line nearby; read as 1970-01-01 (pass --date)",
                    self.files[i].name, fs.undated_assumed
                ));
            }
        }
        if self.counts.retired_debits_dropped > 0 {
            self.notes.push(format!(
                "{} retired single-debit orders were not remembered (limit {RETIRED_DEBITS_MAX}): a second debit of theirs more than {} min after the first may be missed",
                self.counts.retired_debits_dropped,
                ORDER_RETIRE_AFTER_MS / 60_000
            ));
        }
        if self.counts.events_dropped > 0 {
            self.notes.push(format!(
                "{} events dropped: an order had more than {EVENTS_PER_ORDER_MAX} events",
                self.counts.events_dropped
            ));
        }
    }
}

/// One piece to parse: file, chunk, byte range, and whether it ends the file.
struct Job(u16, Arc<Vec<u8>>, (usize, usize), bool);

/// Reads one round: every unfinished source that is not ahead of the slowest by more than
/// `read_lead_ms` gives one chunk; all chunks are parsed in parallel.
pub fn read_round(
    sources: &mut [Source],
    parser: &LineParser,
    watermarks: &[Option<i64>],
) -> (Vec<ParsedPiece>, Vec<(u16, u64)>, bool) {
    let min = sources
        .iter()
        .filter(|s| !s.done)
        .filter_map(|s| watermarks.get(s.file as usize).copied().flatten())
        .min();
    let lead = READ_LEAD_MS * MS_US;
    let mut chosen: Vec<&mut Source> = sources
        .iter_mut()
        .filter(|s| !s.done)
        .filter(
            |s| match (watermarks.get(s.file as usize).copied().flatten(), min) {
                (Some(w), Some(m)) => w <= m + lead,
                _ => true,
            },
        )
        .collect();
    if chosen.is_empty() {
        return (Vec::new(), Vec::new(), false);
    }
    let chunks: Vec<Chunk> = chosen
        .par_iter_mut()
        .with_max_len(1)
        .filter_map(|s| s.read_chunk())
        .collect();
    let overlong: Vec<(u16, u64)> = chunks
        .iter()
        .filter(|c| c.overlong_lines > 0)
        .map(|c| (c.file, c.overlong_lines))
        .collect();
    let mut jobs: Vec<Job> = Vec::new();
    for c in &chunks {
        let n = c.pieces.len();
        if n == 0 && c.last {
            jobs.push(Job(c.file, Arc::clone(&c.data), (0, 0), true));
        }
        for (i, r) in c.pieces.iter().enumerate() {
            jobs.push(Job(c.file, Arc::clone(&c.data), *r, c.last && i + 1 == n));
        }
    }
    let parsed = jobs
        .par_iter()
        .with_max_len(1)
        .map(|Job(f, d, r, last)| parse_piece(parser, *f, d, *r, *last))
        .collect();
    (parsed, overlong, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_find_by_bytes_inline_or_boxed() {
        let mut m: HashMap<OrderKey, u32, ahash::RandomState> = HashMap::default();
        let short = b"OD20240517A1122".as_slice();
        let long = b"ORDER-with-a-very-long-id-0123456789-abcdefghijklmnop".as_slice();
        m.insert(OrderKey::new(short), 1);
        m.insert(OrderKey::new(long), 2);
        assert!(matches!(OrderKey::new(short), OrderKey::Inline { .. }));
        assert!(matches!(OrderKey::new(long), OrderKey::Heap(_)));
        assert_eq!(m.get(short), Some(&1));
        assert_eq!(m.get(long), Some(&2));
        assert_eq!(m.get(&long[..30]), None);
        assert_eq!(OrderKey::new(long).as_bytes(), long);
    }
}
