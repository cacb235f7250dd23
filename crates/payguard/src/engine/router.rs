//! Hash routing of order ids onto lanes.
//!
//! xxh3 (not FNV: the write-up's FNV-1a-32 clusters date-prefixed ids such as
//! `OD20240517A1122`), reduced to a lane with Lemire's multiply-shift rather than
//! `%`, which avoids modulo bias and a division on the hot path.

use xxhash_rust::xxh3::xxh3_64;

/// The lane (0..lanes) that owns `key`.
pub fn lane_for(key: &str, lanes: usize) -> usize {
    debug_assert!(lanes > 0);
    ((u128::from(xxh3_64(key.as_bytes())) * lanes as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_in_range() {
        for lanes in [1, 2, 16, 1024] {
            for i in 0..1000 {
                let key = format!("OD20240517A{i:04}");
                let l = lane_for(&key, lanes);
                assert!(l < lanes);
                assert_eq!(l, lane_for(&key, lanes));
            }
        }
    }

    #[test]
    fn date_prefixed_ids_spread_evenly() {
        let lanes = 16;
        let mut counts = vec![0usize; lanes];
        for i in 0..16_000 {
            counts[lane_for(&format!("OD20240517A{i:05}"), lanes)] += 1;
        }
        let max = *counts.iter().max().unwrap();
        let min = *counts.iter().min().unwrap();
        // Expectation 1000 per lane, binomial sd ≈ 31; ±15% is ~5 sd.
        assert!(max < 1150 && min > 850, "uneven lanes: {counts:?}");
    }
}
