//! Realistic order ids for the routing and cache suites.
//!
//! Hash quality depends on the input: sequential decimal strings differ only in
//! their last bytes, date-prefixed ids share a long prefix, UUIDs are random. The
//! write-up's example id is `OD20240517A1122`; these families bracket what payguard
//! sees. All are generated from a seed, so a run is reproducible.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashSet;

/// Days the date-prefixed families span (2024-05-13 .. 2024-05-17).
pub const DATE_DAYS: [&str; 5] = ["20240513", "20240514", "20240515", "20240516", "20240517"];

/// Most ids one family can hold without running out of distinct values: the
/// random date-prefixed family has 5 days x 26 letters x (10^4 + 10^5) suffixes.
pub const FAMILY_IDS_MAX: u64 = 5_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IdFamily {
    /// "1", "2", ... as decimal strings.
    Sequential,
    /// `OD` + yyyymmdd (5 days) + letter + 4 or 5 random digits, distinct.
    DateRandom,
    /// `OD` + yyyymmdd + letter + 5-digit per-day counter (letter rolls A→B every
    /// 100,000): what a counter-based id generator emits.
    DateSeq,
    /// UUID v4 strings (lowercase, hyphenated) from a seeded rng.
    Uuid,
}

impl IdFamily {
    pub const ALL: [IdFamily; 4] = [
        IdFamily::Sequential,
        IdFamily::DateRandom,
        IdFamily::DateSeq,
        IdFamily::Uuid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IdFamily::Sequential => "sequential",
            IdFamily::DateRandom => "date-random",
            IdFamily::DateSeq => "date-seq",
            IdFamily::Uuid => "uuid-v4",
        }
    }
}

/// `n` distinct ids of `family`, reproducible from `seed`.
pub fn generate(family: IdFamily, n: usize, seed: u64) -> Vec<String> {
    assert!(
        n as u64 <= FAMILY_IDS_MAX,
        "at most {FAMILY_IDS_MAX} ids per family"
    );
    let mut rng = SmallRng::seed_from_u64(seed);
    match family {
        IdFamily::Sequential => (1..=n).map(|i| i.to_string()).collect(),
        IdFamily::DateRandom => {
            let mut seen = HashSet::with_capacity(n);
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let day = DATE_DAYS[rng.random_range(0..DATE_DAYS.len())];
                let letter = char::from(b'A' + rng.random_range(0..26u8));
                let id = if rng.random_bool(0.5) {
                    format!("OD{day}{letter}{:04}", rng.random_range(0..10_000u32))
                } else {
                    format!("OD{day}{letter}{:05}", rng.random_range(0..100_000u32))
                };
                if seen.insert(id.clone()) {
                    out.push(id);
                }
            }
            out
        }
        IdFamily::DateSeq => {
            let per_day = n.div_ceil(DATE_DAYS.len());
            (0..n)
                .map(|i| {
                    let (day, c) = (i / per_day, i % per_day);
                    let letter = char::from(b'A' + (c / 100_000) as u8);
                    format!("OD{}{letter}{:05}", DATE_DAYS[day], c % 100_000)
                })
                .collect()
        }
        IdFamily::Uuid => (0..n).map(|_| uuid_v4(&mut rng)).collect(),
    }
}

/// A version-4 UUID string from `rng` (RFC 9562 version and variant bits set).
pub fn uuid_v4(rng: &mut impl Rng) -> String {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_distinct_reproducible_and_well_formed() {
        for f in IdFamily::ALL {
            let a = generate(f, 5_000, 7);
            assert_eq!(a, generate(f, 5_000, 7), "{f:?} not reproducible");
            let set: HashSet<_> = a.iter().collect();
            assert_eq!(set.len(), a.len(), "{f:?} has duplicates");
        }
        let d = generate(IdFamily::DateRandom, 100, 1);
        assert!(d
            .iter()
            .all(|s| s.starts_with("OD2024051") && (s.len() == 15 || s.len() == 16)));
        let s = generate(IdFamily::DateSeq, 10, 1);
        assert_eq!(s[0], "OD20240513A00000");
        let u = generate(IdFamily::Uuid, 100, 1);
        assert!(u.iter().all(|s| s.len() == 36 && &s[14..15] == "4"));
        assert!(u
            .iter()
            .all(|s| matches!(&s[19..20], "8" | "9" | "a" | "b")));
    }
}
