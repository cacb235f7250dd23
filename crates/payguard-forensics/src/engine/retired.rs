//! The memory of retired single-debit orders, so a late second debit still joins its first.
//!
//! Why apart: it has its own bound (`retired_debits_max`), expiry (`retired_debit_memory_ms`)
//! and compact layout, independent of the open-order table.

use std::collections::{HashMap, VecDeque};

use crate::analyze::Ev;
use crate::clock::MS_US;
use crate::limits::{RETIRED_DEBITS_MAX, RETIRED_DEBIT_MEMORY_MS};
use crate::parse::EventKind;

use super::Counts;

/// Retired orders that had exactly one debit, remembered for `retired_debit_memory_ms` of merged
/// time so that a second debit long after the order was retired still joins it. Keyed by a
/// 64-bit hash of the order id and checked with a second, independent 32-bit hash (a false join
/// needs both to collide). Invariant: every key of `map` is in `queue` with its `at_us`.
#[derive(Default)]
pub(super) struct Retired {
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
    pub(super) fn take(&mut self, oid: &[u8]) -> Option<(Ev, Ev)> {
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

    pub(super) fn remember(
        &mut self,
        oid: &[u8],
        now_us: i64,
        entry: Ev,
        commit: Ev,
        counts: &mut Counts,
    ) {
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

    pub(super) fn expire(&mut self, now_us: i64) {
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
