//! Fencing tokens as numbers: the pure part of the Redis lock protocol.
//!
//! A token is `(epoch, n)` packed as `epoch << 32 | n`: `n` is the per-epoch grant
//! counter kept in Redis, the epoch a value from the database's fence-epoch
//! sequence, taken whenever a Redis flush or restart has lost the counter. This
//! module holds the arithmetic only, so that [`super::redis`] and the deterministic
//! simulation (`crates/payguard-sim`) run the very same code and cannot drift
//! apart. It guarantees: a token never wraps (a counter at or past 2^32 is
//! refused, not masked), and a higher epoch always packs to a higher token.

/// Bits of a token that hold the per-epoch counter.
pub const COUNTER_BITS: u32 = 32;
/// The first counter value that no longer fits: a grant must be refused here.
pub const COUNTER_LIMIT: i64 = 1 << COUNTER_BITS;

/// The Redis counter ran out: 2^32 grants since the last reset of the fence hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fencing counter {n} is past 2^{COUNTER_BITS}")]
pub struct CounterExhausted {
    pub n: i64,
}

/// Accepts a counter value handed out by the acquire script, or refuses one that
/// would not fit in the low 32 bits (wrapping would hand out a lower token).
pub fn check_counter(n: i64) -> Result<i64, CounterExhausted> {
    if n >= COUNTER_LIMIT {
        return Err(CounterExhausted { n });
    }
    Ok(n)
}

/// Packs `(epoch, n)` into one token. `n` must have passed [`check_counter`].
pub fn pack(epoch: i64, n: i64) -> i64 {
    (epoch << COUNTER_BITS) | (n & (COUNTER_LIMIT - 1))
}

/// Splits a token back into `(epoch, n)`, for logs and checkers.
pub fn unpack(token: i64) -> (i64, i64) {
    (token >> COUNTER_BITS, token & (COUNTER_LIMIT - 1))
}

/// The epoch to use after taking `fresh` from the database and raising the Redis
/// epoch with it: the raise answers the epoch in force (`raised`), which another
/// instance may have set higher meanwhile; the higher of the two is used.
pub fn epoch_in_force(raised: i64, fresh: i64) -> i64 {
    raised.max(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip() {
        for (epoch, n) in [(0, 1), (1, 1), (7, 42), (123_456, COUNTER_LIMIT - 1)] {
            assert_eq!(unpack(pack(epoch, n)), (epoch, n));
        }
        assert_eq!(pack(1, 1), (1 << 32) | 1);
    }

    #[test]
    fn a_higher_epoch_beats_any_counter_of_a_lower_one() {
        assert!(pack(2, 1) > pack(1, COUNTER_LIMIT - 1));
        assert!(pack(1, 2) > pack(1, 1));
    }

    #[test]
    fn a_counter_that_would_wrap_is_refused() {
        assert_eq!(check_counter(1), Ok(1));
        assert_eq!(check_counter(COUNTER_LIMIT - 1), Ok(COUNTER_LIMIT - 1));
        assert_eq!(
            check_counter(COUNTER_LIMIT),
            Err(CounterExhausted { n: COUNTER_LIMIT })
        );
        assert!(check_counter(i64::MAX).is_err());
    }

    #[test]
    fn the_higher_epoch_is_in_force() {
        assert_eq!(epoch_in_force(5, 3), 5);
        assert_eq!(epoch_in_force(3, 5), 5);
        assert_eq!(epoch_in_force(4, 4), 4);
    }
}
