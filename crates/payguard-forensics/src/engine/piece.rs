//! The parallel stage: one piece of a chunk parsed into records that own nothing but spans.
//!
//! Why apart: this runs on rayon's pool while the [`super::Engine`] merges the previous round, so
//! it must not touch the engine; a [`ParsedPiece`] carries its chunk (shared) and only the bytes
//! that had to be unescaped.

use std::sync::Arc;

use crate::clock::RawTime;
use crate::parse::{EntryId, EventKind, LineParser, RawParsed, SkipReason};

/// A string found by the parser: a range of the chunk, or of the piece's side buffer when it
/// had to be unescaped.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    off: u32,
    len: u32,
}

const SIDE_BIT: u32 = 1 << 31;
const SPAN_NONE: Span = Span {
    off: u32::MAX,
    len: 0,
};

/// One parsed event, owning nothing: strings are spans. 64 bytes: a chunk's records are
/// written by the parser and read by the merge once each, so their size is memory traffic.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    pub(super) line: u32,
    pub(super) time: RawTime,
    pub(super) kind: EventKind,
    pub(super) oid: Span,
    pub(super) req: Span,
    pub(super) host: Span,
    /// As [`crate::analyze::Ev::amount`]: `i64::MIN` when the line had none (a parsed amount
    /// never is: at most 18 digits).
    pub(super) amount: i64,
    /// As [`crate::analyze::Ev::entries`]: 0 when none, at most `u16::MAX`.
    pub(super) entries: u16,
    /// Not an event: a dated line that only anchors dateless lines of its file.
    pub(super) hint: bool,
}

const _: () = assert!(std::mem::size_of::<Rec>() <= 64);

/// `amount` and `entries` as a [`Rec`] (and the merge) keep them.
fn compact(amount: Option<i64>, entries: Option<u32>) -> (i64, u16) {
    (
        amount.unwrap_or(i64::MIN),
        entries.map_or(0, |e| e.min(u16::MAX as u32) as u16),
    )
}

/// The parse of one piece of a chunk.
pub struct ParsedPiece {
    pub(super) file: u16,
    pub(super) data: Arc<Vec<u8>>,
    pub(super) side: Vec<u8>,
    pub(super) recs: Vec<Rec>,
    /// The ledger entry ids of the records that carry one (index into `recs`, ascending): only
    /// commits do, and only clock alignment reads them, so they stay out of every `Rec`.
    pub(super) entry_ids: Vec<(u32, EntryId)>,
    pub(super) lines: u32,
    pub(super) parsed: u32,
    pub(super) skipped: [u32; SkipReason::ALL.len()],
    /// The last piece of the file's last chunk.
    pub(super) last_of_file: bool,
}

impl ParsedPiece {
    pub(super) fn bytes(&self, s: Span) -> Option<&[u8]> {
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

/// One record as clock alignment reads it (it needs no spans of its own).
pub struct RecView<'a> {
    pub time: RawTime,
    pub kind: EventKind,
    pub oid: &'a [u8],
    pub req: Option<&'a [u8]>,
    pub host: Option<&'a [u8]>,
    /// The ledger entry id a commit wrote.
    pub entry: Option<EntryId>,
    /// A dated line that only anchors dateless lines (not an event).
    pub hint: bool,
}

impl ParsedPiece {
    /// The file this piece was cut from.
    pub fn file(&self) -> u16 {
        self.file
    }

    /// The chunk this piece was cut from (shared with the chunk's other pieces).
    pub fn into_data(self) -> Arc<Vec<u8>> {
        self.data
    }

    /// The records in line order, borrowed.
    pub fn views(&self) -> impl Iterator<Item = RecView<'_>> + '_ {
        let mut ids = self.entry_ids.iter().peekable();
        self.recs.iter().enumerate().map(move |(i, r)| RecView {
            time: r.time,
            kind: r.kind,
            oid: self.bytes(r.oid).unwrap_or_default(),
            req: self.bytes(r.req),
            host: self.bytes(r.host),
            entry: ids.next_if(|(at, _)| *at as usize == i).map(|(_, id)| *id),
            hint: r.hint,
        })
    }
}

fn span_of(piece_data: &[u8], side: &mut Vec<u8>, s: &[u8]) -> Span {
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
    side.extend_from_slice(s);
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
        entry_ids: Vec::new(),
        lines: 0,
        parsed: 0,
        skipped: [0; SkipReason::ALL.len()],
        last_of_file,
    };
    let mut start = 0usize;
    let handle = |line: &[u8], idx: u32, out: &mut ParsedPiece| match parser.parse_raw(line) {
        RawParsed::Event(e) => {
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
            if let Some(id) = e.entry {
                out.entry_ids.push((out.recs.len() as u32, id));
            }
            let (amount, entries) = compact(e.amount, e.entries);
            out.recs.push(Rec {
                line: idx,
                time: e.time,
                kind: e.kind,
                oid,
                req,
                host,
                amount,
                entries,
                hint: false,
            });
        }
        RawParsed::Time(t) => {
            out.parsed += 1;
            out.recs.push(Rec {
                line: idx,
                time: t,
                kind: EventKind {
                    step: crate::parse::Step::Start,
                    side: None,
                    capture: false,
                },
                oid: SPAN_NONE,
                req: SPAN_NONE,
                host: SPAN_NONE,
                amount: i64::MIN,
                entries: 0,
                hint: true,
            });
        }
        RawParsed::Other => out.parsed += 1,
        RawParsed::Skip(r) => out.skipped[r.index()] += 1,
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
