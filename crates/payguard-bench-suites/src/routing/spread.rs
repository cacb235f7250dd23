//! How one hash filled its lanes, and what a uniformly random assignment would
//! give: every measured number of the suite is read against these expectations,
//! so they live on their own, apart from the runs that produce the counts.

use crate::hashes::{reduce, Reduce};
use crate::stats;
use serde::Serialize;

/// How one (ids, lanes, hash, reduction) filled its lanes.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub max: u64,
    pub min: u64,
    pub mean: f64,
    pub max_over_mean: f64,
    pub stddev: f64,
    pub chi2: f64,
    pub p_value: f64,
}

/// Lane counts of `hashes` over `lanes` lanes.
pub fn lane_counts(hashes: &[u64], bits: u32, lanes: u64, how: Reduce) -> Vec<u64> {
    let mut counts = vec![0_u64; lanes as usize];
    for &h in hashes {
        counts[reduce(h, bits, lanes, how) as usize] += 1;
    }
    counts
}

pub fn spread(counts: &[u64]) -> Spread {
    let xs: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let mean = stats::mean(&xs);
    let max = counts.iter().copied().max().unwrap_or(0);
    let chi2 = stats::chi_square_uniform(counts);
    Spread {
        max,
        min: counts.iter().copied().min().unwrap_or(0),
        mean,
        max_over_mean: if mean > 0.0 { max as f64 / mean } else { 0.0 },
        stddev: stats::stddev(&xs),
        chi2,
        p_value: stats::chi_square_p_value(chi2, counts.len().saturating_sub(1) as u64),
    }
}

/// What a uniformly random assignment of `ids` to `lanes` gives.
#[derive(Debug, Clone, Serialize)]
pub struct Expectation {
    pub ids: u64,
    pub lanes: u64,
    pub mean: f64,
    pub binomial_sd: f64,
    pub expected_max: f64,
    pub expected_max_over_mean: f64,
    pub df: u64,
    pub chi2_critical_99: f64,
}

pub fn expectation(ids: u64, lanes: u64) -> Expectation {
    let mean = ids as f64 / lanes as f64;
    let expected_max = stats::expected_max_bucket(ids, lanes);
    let df = lanes.saturating_sub(1).max(1);
    Expectation {
        ids,
        lanes,
        mean,
        binomial_sd: stats::binomial_sd(ids, lanes),
        expected_max,
        expected_max_over_mean: expected_max / mean,
        df,
        chi2_critical_99: stats::chi_square_critical(df, 0.01),
    }
}

/// "ok", "UNEVEN" (p < 0.01) or "too even" (p > 0.99: the ids' structure shows).
pub(super) fn verdict(p: f64) -> &'static str {
    if p < 0.01 {
        "UNEVEN"
    } else if p > 0.99 {
        "too even"
    } else {
        "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_a_known_distribution() {
        let s = spread(&[30, 20, 25, 25]);
        assert_eq!((s.max, s.min), (30, 20));
        assert_eq!(s.mean, 25.0);
        assert!((s.max_over_mean - 1.2).abs() < 1e-12);
        assert!((s.chi2 - 2.0).abs() < 1e-12);
        // sqrt((25 + 25 + 0 + 0) / 4)
        assert!((s.stddev - 12.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn a_constant_hash_is_flagged_uneven() {
        let hashes = vec![7_u64; 1000];
        let s = spread(&lane_counts(&hashes, 64, 16, Reduce::Modulo));
        assert_eq!(s.max, 1000);
        assert_eq!(verdict(s.p_value), "UNEVEN");
    }
}
