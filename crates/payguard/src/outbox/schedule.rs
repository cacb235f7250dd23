//! When a webhook delivery is tried next, or that it has failed for good.
//!
//! Why pure: the delivery loop stores `next_attempt_at` in the deliveries
//! table and claims rows whose time has come; deciding that time is a rule
//! (`shared/spec/API.md`: retried after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
//! 10 h, `--webhook-retry-max` attempts in all, default 8), so it is one
//! function of the attempts made and the clock, tested without a database.
//!
//! Guarantees: attempt 1 is due at once; after attempt k fails the next is due
//! [`RETRY_DELAYS_MS`]`[k-1]` later (the last delay repeats past the table);
//! no more than `retry_max` attempts are ever scheduled; times never overflow.
//!
//! Why in `payguard`: the delivery loop ([`super::delivery`]) runs here, in
//! `payguard-server` with [`RETRY_DELAYS_MS`] and in the deterministic
//! simulation with a table scaled to its simulated seconds
//! ([`next_attempt_at_on`]); `payguard-server` re-exports this module.

/// Wait after attempt 1, 2, ... fails, in milliseconds.
pub const RETRY_DELAYS_MS: [i64; 7] = [
    5_000,      // 5 s
    300_000,    // 5 min
    1_800_000,  // 30 min
    7_200_000,  // 2 h
    18_000_000, // 5 h
    36_000_000, // 10 h
    36_000_000, // 10 h
];

/// Attempts in all, the first included, unless `--webhook-retry-max` says otherwise.
pub const RETRY_MAX_DEFAULT: u32 = 8;

/// Largest `--webhook-retry-max` worth accepting: at 10 h a try past the
/// table, 100 attempts already span about 39 days.
pub const RETRY_MAX_LIMIT: u32 = 100;

/// When attempt `attempts_made + 1` is due, given `attempts_made` attempts
/// have been made and failed; `None` once `retry_max` attempts have been made
/// (the delivery is `failed`). With `retry_max` 0 nothing is ever sent.
pub fn next_attempt_at(attempts_made: u32, retry_max: u32, now_ms: i64) -> Option<i64> {
    next_attempt_at_on(&RETRY_DELAYS_MS, attempts_made, retry_max, now_ms)
}

/// [`next_attempt_at`] on another table of delays (`delays[k-1]` after attempt
/// k fails, the last one repeating); an empty table retries at once.
pub fn next_attempt_at_on(
    delays: &[i64],
    attempts_made: u32,
    retry_max: u32,
    now_ms: i64,
) -> Option<i64> {
    if attempts_made >= retry_max {
        return None;
    }
    let Some(failed) = attempts_made.checked_sub(1) else {
        return Some(now_ms);
    };
    let Some(last) = delays.len().checked_sub(1) else {
        return Some(now_ms);
    };
    let index = usize::try_from(failed).map_or(last, |i| i.min(last));
    Some(now_ms.saturating_add(delays[index]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_700_000_000_000;
    const S: i64 = 1_000;
    const MIN: i64 = 60 * S;
    const H: i64 = 60 * MIN;

    #[test]
    fn the_default_schedule_is_the_spec() {
        let delays: Vec<Option<i64>> = (0..=RETRY_MAX_DEFAULT)
            .map(|made| next_attempt_at(made, RETRY_MAX_DEFAULT, NOW_MS).map(|t| t - NOW_MS))
            .collect();
        let spec = [
            Some(0),
            Some(5 * S),
            Some(5 * MIN),
            Some(30 * MIN),
            Some(2 * H),
            Some(5 * H),
            Some(10 * H),
            Some(10 * H),
            None, // 8 attempts made: failed
        ];
        assert_eq!(delays, spec);
    }

    #[test]
    fn the_whole_default_schedule_spans_27_h_35_min_5_s() {
        let total: i64 = RETRY_DELAYS_MS.iter().sum();
        assert_eq!(total, 27 * H + 35 * MIN + 5 * S);
    }

    #[test]
    fn the_last_delay_repeats_past_the_table() {
        for made in 8..20 {
            assert_eq!(next_attempt_at(made, 20, NOW_MS), Some(NOW_MS + 10 * H));
        }
        assert_eq!(next_attempt_at(20, 20, NOW_MS), None);
        assert_eq!(
            next_attempt_at(u32::MAX - 1, u32::MAX, NOW_MS),
            Some(NOW_MS + 10 * H)
        );
    }

    #[test]
    fn fewer_attempts_stop_earlier() {
        assert_eq!(next_attempt_at(0, 1, NOW_MS), Some(NOW_MS));
        assert_eq!(next_attempt_at(1, 1, NOW_MS), None);
        assert_eq!(next_attempt_at(2, 3, NOW_MS), Some(NOW_MS + 5 * MIN));
        assert_eq!(next_attempt_at(3, 3, NOW_MS), None);
        assert_eq!(next_attempt_at(0, 0, NOW_MS), None);
        assert_eq!(next_attempt_at(9, 3, NOW_MS), None);
    }

    #[test]
    fn times_saturate_instead_of_overflowing() {
        assert_eq!(next_attempt_at(1, 8, i64::MAX - 1), Some(i64::MAX));
    }

    #[test]
    fn another_table_is_followed_and_its_last_delay_repeats() {
        let t = [5, 10];
        assert_eq!(next_attempt_at_on(&t, 0, 5, NOW_MS), Some(NOW_MS));
        assert_eq!(next_attempt_at_on(&t, 1, 5, NOW_MS), Some(NOW_MS + 5));
        assert_eq!(next_attempt_at_on(&t, 2, 5, NOW_MS), Some(NOW_MS + 10));
        assert_eq!(next_attempt_at_on(&t, 4, 5, NOW_MS), Some(NOW_MS + 10));
        assert_eq!(next_attempt_at_on(&t, 5, 5, NOW_MS), None);
        assert_eq!(next_attempt_at_on(&[], 3, 5, NOW_MS), Some(NOW_MS));
    }

    #[test]
    fn the_limit_admits_the_default() {
        const { assert!(RETRY_MAX_DEFAULT <= RETRY_MAX_LIMIT) };
        assert_eq!(RETRY_DELAYS_MS.len() + 1, RETRY_MAX_DEFAULT as usize);
    }
}
