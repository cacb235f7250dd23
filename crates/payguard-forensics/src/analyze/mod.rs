//! Reconstruction of one order: its requests, their in-flight intervals, its money effects,
//! and from those its incidents (more than one debit) and race windows (requests in flight at once).
//!
//! Why: this is the contract of LOGS.md "What forensics must find", kept apart from reading and
//! merging so it can be tested on hand-made events. It sees one order's events, unsorted, and
//! sorts them itself: input order is never trusted.
//!
//! Rules, in brief (README-forensics.md has the long form):
//! - a request is identified by `req`; lines without `req` are each their own request when they
//!   are an entry (`deduct_start`, or `order_cache_set` on a host whose req-less lines have no start);
//! - a request is in flight from its entry to its end event, else its last event (req-less: the
//!   host's last req-less event, at most `request_inflight_assumed_ms_max` after entry);
//! - debits are `deduct_commit`s, plus each `duplicate_deduct` whose `req` has no commit; a
//!   `duplicate_deduct` without `req` proves at least one more debit than the duplicates seen;
//!   `entries` on a duplicate proves that many.
//!
//! Layout: `requests` (who was in flight when), `debits` (what moved money), `order` (the
//! findings of one order), `results` (what is kept over all orders), `req_names` and `rejoin`
//! (what the engine keeps per open order, and of an order after retirement).

mod debits;
mod drift;
mod order;
mod ordering;
mod rejoin;
mod req_names;
mod requests;
mod results;

pub use drift::{stepped_host, Correction, Drift, PairStep};
pub use order::{analyze_order, observe_order};
pub use ordering::{ImpossibleRec, OrderingKind};
pub use rejoin::{rejoin, single_debit};
pub use req_names::ReqNames;
pub use results::{worse, IncidentTotals, Results};

use crate::parse::{EventKind, Side};

/// No `req` on the line.
pub const REQ_NONE: u16 = u16::MAX;

/// One event kept for an order (32 bytes; strings are interned ids).
#[derive(Debug, Clone, Copy)]
pub struct Ev {
    /// UTC microseconds after skew.
    pub ts: i64,
    /// `i64::MIN` when the line had no amount.
    pub amount: i64,
    pub line: u32,
    pub file: u16,
    pub host: u16,
    /// Index into [`OrderState::reqs`], or [`REQ_NONE`].
    pub req: u16,
    pub kind: EventKind,
    /// `entries` of a duplicate (0: none).
    pub entries: u16,
}

/// The events of one open order. Invariants: `last_us` is the max `ts` of `evs` pushed with
/// [`OrderState::push`]; `replays` is whether any of them is a replay.
#[derive(Debug)]
pub struct OrderState {
    pub evs: Vec<Ev>,
    /// Request ids seen in this order; `Ev::req` indexes it.
    pub reqs: ReqNames,
    pub last_us: i64,
    /// Some event is a replay: only such an order gives the clock-step tracker a bound (a
    /// replay after its commit), so [`observe_order`] reads no other order's events.
    pub replays: bool,
}

impl OrderState {
    /// Empties the state, keeping its buffers for the next order.
    pub fn clear(&mut self) {
        self.evs.clear();
        self.reqs.clear();
        self.last_us = i64::MIN;
        self.replays = false;
    }

    /// Appends an event, keeping `last_us` and `replays` (the merge's only way in).
    pub fn push(&mut self, e: Ev) {
        self.last_us = self.last_us.max(e.ts);
        self.replays |= e.kind.step == crate::parse::Step::Replay;
        self.evs.push(e);
    }
}

impl Default for OrderState {
    fn default() -> Self {
        OrderState {
            evs: Vec::new(),
            reqs: ReqNames::default(),
            last_us: i64::MIN,
            replays: false,
        }
    }
}

/// Settings for analysis.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderCtx {
    pub timelines: bool,
}

/// A line that supports a finding.
#[derive(Debug, Clone)]
pub struct EvidenceRec {
    pub file: u16,
    pub line: u32,
    pub ts: i64,
    pub kind: EventKind,
}

/// A duplicate effect.
#[derive(Debug, Clone)]
pub struct IncidentRec {
    pub order_id: String,
    pub side: Side,
    pub effects: u32,
    /// Minor units (fen).
    pub amount_lost: i64,
    pub race_window_us: Option<i64>,
    pub first_entry_us: i64,
    pub second_entry_us: i64,
    pub hosts: Vec<u16>,
    pub evidence: Vec<EvidenceRec>,
}

/// Requests of one order in flight at once.
#[derive(Debug, Clone)]
pub struct RaceRec {
    pub order_id: String,
    pub side: Side,
    pub width_us: i64,
    pub requests: u32,
    pub hosts: Vec<u16>,
    pub moved_money: u32,
    pub first_entry_us: i64,
    pub second_entry_us: i64,
}

/// A request drawn in a timeline.
#[derive(Debug, Clone)]
pub struct TlReq {
    pub host: u16,
    pub side: Side,
    pub entry: i64,
    pub end: i64,
    pub label: String,
}

/// An instant drawn in a timeline (money effects, duplicates, replays, rejections).
#[derive(Debug, Clone)]
pub struct TlMark {
    /// The request (index into [`Timeline::reqs`]) the event belongs to, when known.
    pub req: Option<usize>,
    pub host: u16,
    pub ts: i64,
    pub kind: EventKind,
    pub amount: Option<i64>,
}

/// One order's requests and effects, kept for `--trace-out`/`--html`.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub order_id: String,
    pub incident: bool,
    /// Fen lost in this order (0 without an incident): the worst timelines are kept.
    pub amount_lost: i64,
    pub reqs: Vec<TlReq>,
    pub marks: Vec<TlMark>,
    /// The race window (first entry, second entry) when there is one.
    pub window: Option<(i64, i64)>,
}

#[cfg(test)]
mod tests;
