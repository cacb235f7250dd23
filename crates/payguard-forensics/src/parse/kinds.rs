//! The vocabulary of parsed lines: the events forensics uses (their steps, sides and names as
//! payguard writes them) and the reasons a line is skipped.
//!
//! Why apart: every other module of the crate speaks these types; they hold no parsing logic.

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
///
/// A two-phase capture (`capture_*`) is the deduct side: `capture_commit` is the order's debit,
/// so a second one, or one beside a `deduct_commit`, is a duplicate effect (LOGS.md). `capture`
/// keeps its own names in reports. Holds and their release (`authorize_*`, `void_*`,
/// `hold_expired`) move no money out of the balance and are not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKind {
    pub step: Step,
    pub side: Option<Side>,
    /// A `capture_*` event (the deduct side, named as written).
    pub capture: bool,
}

impl EventKind {
    /// The event's name as payguard writes it.
    pub fn name(self) -> &'static str {
        if self.capture {
            match self.step {
                Step::Start => return "capture_start",
                Step::Commit => return "capture_commit",
                Step::Replay => return "capture_replay",
                Step::Rejected => return "capture_rejected",
                Step::End => return "capture_end",
                _ => {}
            }
        }
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
        b"capture_start" | b"capture_commit" | b"capture_replay" | b"capture_rejected"
        | b"capture_end" => {
            let step = match name {
                b"capture_start" => Start,
                b"capture_commit" => Commit,
                b"capture_replay" => Replay,
                b"capture_rejected" => Rejected,
                _ => End,
            };
            return Some(EventKind {
                step,
                side: Some(Deduct),
                capture: true,
            });
        }
        _ => return None,
    };
    Some(EventKind {
        step,
        side,
        capture: false,
    })
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
