//! Clock alignment: each host's zone and clock error, inferred from the logs before the merge.
//!
//! Why: a race is only seen when every host's times are on one clock. In the field nobody knows
//! a host's zone or skew: the incident's lines carry no zone, hosts drift, one machine logs local
//! time. The logs themselves order some events across hosts: a replay cannot finish before the
//! commit it replays. Each such pair bounds the difference of two hosts' offsets from one side;
//! pairs in both directions bracket it. Weaker evidence places hosts those orderings leave alone:
//! ledger ids of one sequence (a higher id was committed later) and, for a zone-less host's zone
//! only, how its events per second follow the reference host's. [`sample`] reads a bounded
//! prefix of every file and collects that evidence; [`solve`] turns it into one offset per host,
//! split into a zone (whole hours, :30 or :45, for zone-less times) and a millisecond skew. A
//! clock that steps later is found and followed by the merge (`analyze::drift`).
//!
//! Guarantees: an offset is applied only when it is bracketed from both sides by enough
//! orderings or ledger-id steps (`clock_constraints_min`, `clock_constraints_per_side_min`)
//! within `clock_interval_ms_max`, or, for a zone-less host nothing else places, when its event
//! rate names a zone clearly (then its skew stays 0 within ±2 s); weaker evidence never replaces
//! stronger; otherwise the host is left alone and a note says so. The user's
//! `--tz` and `--skew` win over inference; `--no-align` turns it off. Memory is bounded by
//! `clock_sample_bytes_per_file` per file (kept for the merge only while all samples fit in
//! `clock_sample_kept_bytes_max`), `clock_evidence_orders_max`, `clock_evidence_ids_max` and
//! `clock_rate_seconds_max`.

mod sample;
mod solve;

pub use sample::{sample, Evidence, PairBounds, Round, SampleLimits, Sampled};
pub use solve::solve;

use crate::clock::TzOffset;

/// What alignment decided for one host (the JSON `clock.hosts` entry of LOGS.md).
#[derive(Debug, Clone, PartialEq)]
pub struct HostClock {
    pub host: String,
    /// The zone its zone-less times are read in; `None` when its times carry a zone.
    pub zone: Option<TzOffset>,
    /// Added to its times after the zone (microseconds); `None` when nothing could be estimated.
    pub skew_us: Option<i64>,
    /// Bounds of `skew_us`.
    pub interval_us: Option<(i64, i64)>,
    /// Cross-host orderings the estimate rests on.
    pub constraints: u64,
    /// Whether the zone and skew were applied to the merge.
    pub applied: bool,
    /// The host others are aligned to (its offset is zero by definition).
    pub reference: bool,
    /// What placed it, when applied.
    pub evidence: Option<ClockEvidence>,
}

/// The kinds of evidence alignment uses, strongest first (see [`solve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockEvidence {
    /// A replay after its commit, a lock taken after its release, across hosts.
    Orderings,
    /// Commits' ledger ids from one sequence, interleaved across hosts.
    LedgerIds,
    /// How the events per second rise and fall together across hosts (a zone only).
    EventRate,
}

impl ClockEvidence {
    /// The name in reports.
    pub fn key(self) -> &'static str {
        match self {
            ClockEvidence::Orderings => "orderings",
            ClockEvidence::LedgerIds => "ledger_ids",
            ClockEvidence::EventRate => "event_rate",
        }
    }
}

/// The result of alignment: per host, and per file the zone its zone-less times are read in.
#[derive(Debug, Clone, Default)]
pub struct Alignment {
    pub hosts: Vec<HostClock>,
    /// Per input file: the zone for its zone-less times (`None`: `--tz`).
    pub file_zone: Vec<Option<TzOffset>>,
    /// Sentences for the report (hosts left alone, contradicting evidence, unsampled input).
    pub notes: Vec<String>,
}

impl Alignment {
    /// The skews to apply (host, microseconds), for hosts whose estimate was applied.
    pub fn applied_skews(&self) -> impl Iterator<Item = (&str, i64)> + '_ {
        self.hosts
            .iter()
            .filter(|h| h.applied)
            .filter_map(|h| h.skew_us.map(|s| (h.host.as_str(), s)))
    }
}

/// What the user fixed: `--tz` (when given) and `--skew` per host, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct UserClock {
    pub tz: Option<TzOffset>,
    pub skew_us: Vec<(String, i64)>,
}

impl UserClock {
    fn skew_of(&self, host: &str) -> Option<i64> {
        self.skew_us
            .iter()
            .rev()
            .find(|(h, _)| h == host)
            .map(|(_, s)| *s)
    }
}
