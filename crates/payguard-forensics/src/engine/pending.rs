//! Dateless lines (a time of day only, as in the incident's plain text) waiting for a date.
//!
//! Why apart: LOGS.md's date rules: such a line takes the date of the nearest dated line of its
//! file, walking back from the next one; with none, `--date` (or 1970-01-01, with a note).

use crate::clock::{DateRef, RefTime};
use crate::limits::UNDATED_PENDING_LINES_MAX;
use crate::parse::EventKind;

use super::piece::{ParsedPiece, Rec};
use super::{push_event, Engine};

/// A dateless event waiting for a dated line in its file.
pub(super) struct Pending {
    tod_us: i64,
    kind: EventKind,
    oid: Vec<u8>,
    req: Option<Vec<u8>>,
    host: u16,
    amount: i64,
    entries: u16,
    line: u64,
}

impl Engine {
    /// Keeps a dateless event until its file gives a date; too many waiting: they take the
    /// fallback date now.
    pub(super) fn wait_for_date(
        &mut self,
        f: usize,
        p: &ParsedPiece,
        r: &Rec,
        tod_us: i64,
        host: u16,
        line: u64,
    ) {
        self.file_state[f].pending.push(Pending {
            tod_us,
            kind: r.kind,
            oid: p.bytes(r.oid).unwrap_or_default().to_vec(),
            req: p.bytes(r.req).map(<[u8]>::to_vec),
            host,
            amount: r.amount,
            entries: r.entries,
            line,
        });
        if self.file_state[f].pending.len() >= UNDATED_PENDING_LINES_MAX {
            self.flush_pending_fallback(f);
        }
    }

    /// A dated line arrived: dateless lines before it take its date, walking back.
    pub(super) fn flush_pending(&mut self, f: usize) {
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
    pub(super) fn flush_pending_fallback(&mut self, f: usize) {
        if self.file_state[f].pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.file_state[f].pending);
        let day = self.cfg.date_day.unwrap_or(0);
        if self.cfg.date_day.is_none() {
            self.file_state[f].undated_assumed += pending.len() as u64;
        }
        let mut r = DateRef {
            at: Some(RefTime::Placed {
                day,
                tod: pending[0].tod_us,
            }),
        };
        for p in pending {
            let l = r.place(p.tod_us).unwrap_or(p.tod_us);
            self.add_pending(f, l, p);
        }
        self.file_state[f].date = r;
    }

    fn add_pending(&mut self, f: usize, local: i64, p: Pending) {
        let ts = local - self.zone(f).us();
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
        amount: i64,
        entries: u16,
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
}
