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
//!
//! Layout: `piece` and `round` are the parallel stage (read and parse); this file is the merge
//! (the [`Engine`]); `pending` holds dateless lines until their date is known, `order_key` and
//! `retired` are the engine's two tables.

mod order_key;
mod pending;
mod piece;
mod retired;
mod round;

use std::collections::HashMap;
use std::sync::Arc;

use crate::analyze::{
    analyze_order, observe_order, rejoin, single_debit, Correction, Ev, OrderCtx, OrderState,
    Results, REQ_NONE,
};
use crate::clock::{DateRef, RawTime, TzOffset, MS_US};
use crate::input::FileInfo;
use crate::limits::{
    EVENTS_PER_ORDER_MAX, HOSTS_MAX, ORDER_RETIRE_AFTER_MS, RETIRED_DEBITS_MAX,
    RETIRE_SCAN_EVERY_MS,
};
use crate::parse::{EventKind, SkipReason};

use order_key::OrderKey;
use pending::Pending;
use retired::Retired;

pub use piece::{parse_piece, ParsedPiece, Rec, RecView, Span};
pub use round::{read_parse, read_round};

/// Events most orders have (start, cache, lock, commit, unlock, end): one allocation per order.
const ORDER_EVENTS_INITIAL: usize = 8;

/// Emptied order states kept for reuse (about 300 bytes each).
const ORDER_STATES_POOLED_MAX: usize = 16_384;

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
    amount: i64,
    entries: u16,
) {
    if st.evs.len() >= EVENTS_PER_ORDER_MAX {
        counts.events_dropped += 1;
        return;
    }
    let req = match req {
        None => REQ_NONE,
        Some(r) => st.reqs.find_or_push(r),
    };
    st.push(Ev {
        ts,
        amount,
        line: u32::try_from(line).unwrap_or(u32::MAX),
        file: f as u16,
        host,
        req,
        kind,
        entries,
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
    /// `--skew` and the inferred skews: host → microseconds (the last entry of a host wins).
    pub skew_us: Vec<(String, i64)>,
    /// Per file, the zone its zone-less times are read in when alignment inferred one
    /// (`None` or missing: `tz`).
    pub file_zone: Vec<Option<TzOffset>>,
    /// Keep timelines for `--trace-out`/`--html`.
    pub timelines: bool,
    /// Correct a host's times from a clock step on, once the step is known (not `--no-align`).
    pub follow_clock_steps: bool,
}

#[derive(Default)]
struct FileState {
    /// The zone this file's zone-less times are read in (see [`Engine::zone`]).
    zone: TzOffset,
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
    /// The orders one retirement scan takes out, between the scan and their analysis (empty
    /// outside `retire`; its capacity is kept, bounded by the open orders).
    batch: Vec<(OrderKey, OrderState)>,
    pub results: Results,
    pub counts: Counts,
    last_scan_us: i64,
    pub notes: Vec<String>,
}

impl Engine {
    pub fn new(cfg: Config, files: Vec<FileInfo>) -> Self {
        let zone = |f: usize| cfg.file_zone.get(f).copied().flatten().unwrap_or(cfg.tz);
        let mut e = Engine {
            file_state: (0..files.len())
                .map(|f| FileState {
                    zone: zone(f),
                    ..FileState::default()
                })
                .collect(),
            files: Vec::new(),
            hosts: Vec::new(),
            host_ix: HashMap::with_hasher(ahash::RandomState::new()),
            skew_us: Vec::new(),
            file_host: Vec::new(),
            orders: HashMap::with_hasher(ahash::RandomState::new()),
            spare: Vec::new(),
            retired: Retired::default(),
            batch: Vec::new(),
            results: Results::default(),
            counts: Counts::default(),
            last_scan_us: i64::MIN,
            notes: Vec::new(),
            cfg,
        };
        e.results.drift.follow = e.cfg.follow_clock_steps;
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
            .skew_us
            .iter()
            .rev()
            .find(|(h, _)| *h == name)
            .map_or(0, |(_, us)| *us);
        self.skew_us.push(skew);
        self.hosts.push(name);
        id
    }

    /// The zone file `f`'s zone-less times are read in: the inferred one, else `--tz`.
    fn zone(&self, f: usize) -> TzOffset {
        self.file_state[f].zone
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
            self.ingest_piece(p);
        }
        self.counts.peak_open_orders = self.counts.peak_open_orders.max(self.orders.len() as u64);
        self.retire();
    }

    /// One parsed piece: its counts, its events, and the end of its file when it is the last.
    fn ingest_piece(&mut self, p: ParsedPiece) {
        self.counts.lines_read += p.lines as u64;
        self.counts.lines_parsed += p.parsed as u64;
        for (i, n) in p.skipped.iter().enumerate() {
            self.counts.skipped[i] += *n as u64;
        }
        let f = p.file as usize;
        let lines_before = self.file_state[f].lines_before;
        let when = self.resolve_times(&p, f, lines_before);
        self.append_events(&p, &when, f, lines_before);
        self.file_state[f].lines_before += p.lines as u64;
        if p.last_of_file {
            self.flush_pending_fallback(f);
            self.file_state[f].finished = true;
        }
        if let Ok(buf) = Arc::try_unwrap(p.data) {
            crate::input::give_back(buf);
        }
    }

    /// Pass 1, in line order (the date rules need it): resolve each event's time and host;
    /// dateless events without a date yet wait in `pending`. Gives (time, host) per record,
    /// time `i64::MIN` for records that are not events to append now.
    fn resolve_times(&mut self, p: &ParsedPiece, f: usize, lines_before: u64) -> Vec<(i64, u16)> {
        let mut when: Vec<(i64, u16)> = vec![(i64::MIN, 0); p.recs.len()];
        // Hosts repeat line after line: remember the last one instead of hashing it again.
        let mut last_host: Option<(&[u8], u16)> = None;
        for (i, r) in p.recs.iter().enumerate() {
            let local = self.local_time(f, r.time);
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
                    if let Some(ts) = self.admit(f, l - self.zone(f).us(), host) {
                        when[i] = (ts, host);
                    }
                }
                None => {
                    let RawTime::TimeOfDay(tod_us) = r.time else {
                        continue;
                    };
                    let line = lines_before + r.line as u64 + 1;
                    self.wait_for_date(f, p, r, tod_us, host, line);
                }
            }
        }
        when
    }

    /// A record's local time. A dated time moves the file's date (and places the dateless lines
    /// waiting before it); a time of day takes the file's date, `None` while it has none.
    fn local_time(&mut self, f: usize, time: RawTime) -> Option<i64> {
        match time {
            RawTime::Utc(us) => {
                let tz = self.zone(f).us();
                self.file_state[f].date.see_local(us + tz);
                self.flush_pending(f);
                Some(us + tz)
            }
            RawTime::Local(naive) => {
                self.file_state[f].date.see_local(naive);
                self.flush_pending(f);
                Some(naive)
            }
            RawTime::TimeOfDay(tod) => self.file_state[f].date.place(tod),
        }
    }

    /// Pass 2: append the events to their orders; consecutive lines of one order (common:
    /// a request logs its steps together) share one lookup. (Sorting each piece by order
    /// to share more lookups was measured: 5 % more CPU in all, for a shorter merge
    /// thread that is not the bottleneck on 2 cores.)
    fn append_events(&mut self, p: &ParsedPiece, when: &[(i64, u16)], f: usize, lines_before: u64) {
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
        let mut fresh = || {
            counts.orders_seen += 1;
            spare.pop().unwrap_or_else(|| OrderState {
                evs: Vec::with_capacity(ORDER_EVENTS_INITIAL),
                ..OrderState::default()
            })
        };
        // Typical ids fit inline: one probe finds or opens the order.
        if let Some(key) = OrderKey::inline(oid) {
            return orders.entry(key).or_insert_with(fresh);
        }
        // A long id would be allocated for every lookup: look up by bytes, allocate if new.
        if !orders.contains_key(oid) {
            let st = fresh();
            orders.insert(OrderKey::new(oid), st);
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
        // One pass over the open orders takes the finished ones out, and gives the step tracker
        // those with a replay (the only ones it reads); the batch is analysed once the steps it
        // revealed are followed, so its own times are corrected first.
        let mut batch = std::mem::take(&mut self.batch);
        let drift = &mut self.results.drift;
        // (`retain`, not `extract_if`: the CLI's rust-version is 1.87. An inline key is a copy.)
        self.orders.retain(|oid, st| {
            if st.last_us >= cutoff {
                return true;
            }
            observe_order(st, drift);
            batch.push((oid.clone(), std::mem::take(st)));
            false
        });
        for c in self.results.drift.flush() {
            self.follow_step(c, &mut batch);
        }
        let ctx = OrderCtx {
            timelines: self.cfg.timelines,
        };
        self.retired.expire(now);
        self.counts.orders_retired_early += batch.len() as u64;
        for (oid, mut st) in batch.drain(..) {
            if let Some((entry, commit)) = self.retired.take(oid.as_bytes()) {
                rejoin(&mut st, entry, commit);
                self.counts.orders_seen -= 1;
                self.counts.orders_rejoined += 1;
            }
            analyze_order(oid.as_bytes(), &mut st, &ctx, &mut self.results);
            if let Some((entry, commit)) = single_debit(&st) {
                self.retired
                    .remember(oid.as_bytes(), now, entry, commit, &mut self.counts);
            }
            if self.spare.len() < ORDER_STATES_POOLED_MAX
                && st.evs.capacity() <= 4 * ORDER_EVENTS_INITIAL
            {
                st.clear();
                self.spare.push(st);
            }
        }
        self.batch = batch;
        if self.orders.capacity() > 4 * self.orders.len().max(1024) {
            self.orders.shrink_to_fit();
        }
    }

    /// A host's clock stepped: its times from the step on move back by the step, in the orders
    /// still open (and in `batch`, taken out to be analysed) and in every line read from now
    /// on. (Orders already analysed keep theirs; their broken orderings were listed.)
    fn follow_step(&mut self, c: Correction, batch: &mut [(OrderKey, OrderState)]) {
        if let Some(s) = self.skew_us.get_mut(c.host as usize) {
            *s = s.saturating_sub(c.by_us);
        }
        let open = self.orders.values_mut();
        for st in open.chain(batch.iter_mut().map(|(_, st)| st)) {
            let mut moved = false;
            for e in st.evs.iter_mut() {
                if e.host == c.host && e.ts >= c.from_us {
                    e.ts -= c.by_us;
                    moved = true;
                }
            }
            if moved {
                st.last_us = st.evs.iter().map(|e| e.ts).max().unwrap_or(st.last_us);
            }
        }
    }

    /// All input read: analyse every open order and finish the notes.
    pub fn finish(&mut self) {
        for f in 0..self.file_state.len() {
            self.flush_pending_fallback(f);
        }
        for st in self.orders.values_mut() {
            observe_order(st, &mut self.results.drift);
        }
        for c in self.results.drift.flush() {
            self.follow_step(c, &mut []);
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
