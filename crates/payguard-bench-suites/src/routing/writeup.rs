//! The write-up's "FNV max bucket 112": the search for a setup that reproduces it
//! and the section that reports what was found. Kept apart because it checks one
//! claim of the write-up, not payguard's own routing.

use super::document::p_fmt;
use super::measure::RoutingResults;
use super::spread::{lane_counts, spread};
use super::{RoutingPlan, WRITEUP_FNV_MAX, WRITEUP_IDS, WRITEUP_LANES, WRITEUP_NEAREST_ROWS};
use crate::hashes::{HashFn, Reduce};
use crate::ids::{generate, IdFamily};
use crate::report::{Section, Table};
use crate::stats;
use serde::Serialize;

/// One cell of the search for the write-up's numbers (always with `%`).
#[derive(Debug, Clone, Serialize)]
pub struct WriteupRow {
    pub family: IdFamily,
    pub ids: u64,
    pub lanes: u64,
    pub hash: HashFn,
    pub max: u64,
    pub stddev: f64,
    pub expected_max: f64,
    pub binomial_sd: f64,
    pub p_max_at_least: f64,
}

/// Looks for a setup under which FNV-1a-32 with `%` gives the write-up's max
/// bucket of 112: every family, 10k / 100k / 1M ids, 16..1024 lanes.
pub(super) fn search_writeup(plan: &RoutingPlan, res: &mut RoutingResults) {
    let sizes: Vec<u64> = if plan.quick {
        vec![10_000]
    } else {
        vec![10_000, WRITEUP_IDS, 1_000_000]
    };
    let lanes = [16_u64, 32, 64, 128, 256, 512, 1024];
    let largest = *sizes.iter().max().unwrap_or(&10_000);
    let mut expect_cache = std::collections::HashMap::new();
    for (fi, &fam) in IdFamily::ALL.iter().enumerate() {
        // Same seed offset as the main table, so the same ids.
        let seed = plan
            .families
            .iter()
            .position(|&f| f == fam)
            .unwrap_or(fi + 100) as u64;
        let all = generate(fam, largest as usize, plan.seed.wrapping_add(seed));
        for h in [HashFn::Fnv1a32, HashFn::Crc32] {
            let hashes: Vec<u64> = all.iter().map(|id| h.hash(id.as_bytes())).collect();
            for &n in &sizes {
                for &l in &lanes {
                    let counts = lane_counts(&hashes[..n as usize], 32, l, Reduce::Modulo);
                    let sp = spread(&counts);
                    let (emax, esd) = *expect_cache.entry((n, l)).or_insert_with(|| {
                        (stats::expected_max_bucket(n, l), stats::binomial_sd(n, l))
                    });
                    let row = WriteupRow {
                        family: fam,
                        ids: n,
                        lanes: l,
                        hash: h,
                        max: sp.max,
                        stddev: sp.stddev,
                        expected_max: emax,
                        binomial_sd: esd,
                        p_max_at_least: stats::p_max_at_least(n, l, sp.max),
                    };
                    if n == WRITEUP_IDS && l == WRITEUP_LANES {
                        res.writeup_setup.push(row.clone());
                    }
                    res.writeup_cells.push(row);
                }
            }
        }
    }
}

/// What the search found, beside what random hashing gives (only when it ran).
pub(super) fn writeup_section(r: &RoutingResults) -> Section {
    let mut w = Section {
        heading: "The write-up's \"FNV max bucket 112\"".into(),
        ..Default::default()
    };
    w.notes.push(format!(
        "The write-up (chapter 4.2) claims, for 100,000 order ids hashed with fnv32a and \
         `% 1024`: FNV-32a max bucket 112, sd 8.3; CRC32 max 137, sd 12.1. A random \
         assignment of 100,000 ids to 1024 lanes has mean {:.2}, sd {:.2} and an expected \
         max of {:.1}. Searched {} cells (4 families x ids x 16..1024 lanes x FNV/CRC32, `%`).",
        WRITEUP_IDS as f64 / WRITEUP_LANES as f64,
        stats::binomial_sd(WRITEUP_IDS, WRITEUP_LANES),
        stats::expected_max_bucket(WRITEUP_IDS, WRITEUP_LANES),
        r.writeup_cells.len()
    ));
    let sizes: Vec<String> = [128_u64, 256, 512, 1024]
        .iter()
        .map(|&l| {
            format!(
                "{} ids over {l} lanes",
                ids_for_expected_max(WRITEUP_FNV_MAX as f64, l)
            )
        })
        .collect();
    w.notes.push(format!(
        "A random hash has an expected max of {WRITEUP_FNV_MAX} for about: {}. A bucket sd \
         of 8.3 with mean 97.66 is below the binomial 9.88, and a max of 112 is {:.1} sd above \
         the mean where random hashing over 1024 lanes puts the max ~3.4 sd above: both say \
         'more even than random', which only structured ids through a structured hash give \
         (see the 'too even' cells: CRC32 on sequential ids).",
        sizes.join(", "),
        (WRITEUP_FNV_MAX as f64 - 97.66) / 8.3
    ));
    if !r.writeup_setup.is_empty() {
        w.tables.push(writeup_table(
            "The write-up's setup: 100,000 ids, 1024 lanes, %",
            &r.writeup_setup,
        ));
    }
    let mut near: Vec<WriteupRow> = r
        .writeup_cells
        .iter()
        .filter(|x| x.hash == HashFn::Fnv1a32)
        .cloned()
        .collect();
    near.sort_by_key(|x| (x.max.abs_diff(WRITEUP_FNV_MAX), x.ids, x.lanes));
    near.truncate(WRITEUP_NEAREST_ROWS);
    w.tables.push(writeup_table(
        &format!("The {WRITEUP_NEAREST_ROWS} searched FNV-1a-32 cells whose max is nearest {WRITEUP_FNV_MAX}"),
        &near,
    ));
    w
}

fn writeup_table(caption: &str, rows: &[WriteupRow]) -> Table {
    let mut t = Table::new(
        caption,
        &[
            "family",
            "ids",
            "lanes",
            "hash",
            "max",
            "E[max]",
            "P(max ≥ this)",
            "sd",
            "binomial sd",
        ],
    );
    for x in rows {
        t.push(vec![
            x.family.name().into(),
            x.ids.to_string(),
            x.lanes.to_string(),
            x.hash.name().into(),
            x.max.to_string(),
            format!("{:.1}", x.expected_max),
            p_fmt(x.p_max_at_least),
            format!("{:.2}", x.stddev),
            format!("{:.2}", x.binomial_sd),
        ]);
    }
    t
}

/// Smallest id count whose expected max bucket over `lanes` reaches `max`.
pub fn ids_for_expected_max(max: f64, lanes: u64) -> u64 {
    let (mut lo, mut hi) = (1_u64, 1_u64 << 24);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if stats::expected_max_bucket(mid, lanes) < max {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_for_an_expected_max_inverts_the_expectation() {
        let n = ids_for_expected_max(112.0, 1024);
        assert!(stats::expected_max_bucket(n, 1024) >= 112.0);
        assert!(stats::expected_max_bucket(n - 1, 1024) < 112.0);
        assert!((80_000..90_000).contains(&n), "{n}");
    }
}
