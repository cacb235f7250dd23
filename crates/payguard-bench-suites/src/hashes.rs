//! The hash functions and hash→lane reductions the routing suite compares, and
//! jump consistent hashing.
//!
//! payguard routes each order id to the lane that owns it; which function and which
//! reduction decide how evenly lanes fill and how many orders change owner when the
//! lane count changes. All functions here are deterministic across runs (fixed keys
//! and seeds) so a router built on any of them is stable across restarts.

use serde::Serialize;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A hash function under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HashFn {
    /// FNV-1a, 32-bit: the write-up's `fnv32a`.
    Fnv1a32,
    /// CRC-32 (IEEE) via crc32fast: the write-up's runner-up.
    Crc32,
    /// std `DefaultHasher::new()` (SipHash-1-3, fixed zero keys).
    Sip,
    /// xxh3_64: what payguard's router uses.
    Xxh3,
    /// ahash with fixed seeds.
    Ahash,
}

impl HashFn {
    pub const ALL: [HashFn; 5] = [
        HashFn::Fnv1a32,
        HashFn::Crc32,
        HashFn::Sip,
        HashFn::Xxh3,
        HashFn::Ahash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HashFn::Fnv1a32 => "fnv1a-32",
            HashFn::Crc32 => "crc32",
            HashFn::Sip => "siphash",
            HashFn::Xxh3 => "xxh3-64",
            HashFn::Ahash => "ahash",
        }
    }

    /// Width of the output; decides which multiply-shift applies.
    pub fn bits(self) -> u32 {
        match self {
            HashFn::Fnv1a32 | HashFn::Crc32 => 32,
            HashFn::Sip | HashFn::Xxh3 | HashFn::Ahash => 64,
        }
    }

    /// Hash of `bytes`, zero-extended to 64 bits for the 32-bit functions.
    pub fn hash(self, bytes: &[u8]) -> u64 {
        match self {
            HashFn::Fnv1a32 => u64::from(fnv1a32(bytes)),
            HashFn::Crc32 => u64::from(crc32(bytes)),
            HashFn::Sip => siphash(bytes),
            HashFn::Xxh3 => xxh3(bytes),
            HashFn::Ahash => ahash_fixed(bytes),
        }
    }
}

/// FNV-1a, 32-bit (offset basis 0x811c9dc5, prime 0x01000193).
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// SipHash-1-3 as std ships it, keys (0, 0). `write` (not `str::hash`) so no
/// 0xff terminator is mixed in: the hash of the id's bytes and nothing else.
#[allow(deprecated)]
pub fn siphash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

pub fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Fixed ahash seeds, so lanes are stable across restarts. ahash's output still
/// differs between CPUs with and without AES-NI and between crate versions: fine
/// for a benchmark, a reason not to route with it.
pub const AHASH_SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

fn ahash_state() -> &'static ahash::RandomState {
    static STATE: OnceLock<ahash::RandomState> = OnceLock::new();
    STATE.get_or_init(|| {
        ahash::RandomState::with_seeds(
            AHASH_SEEDS[0],
            AHASH_SEEDS[1],
            AHASH_SEEDS[2],
            AHASH_SEEDS[3],
        )
    })
}

pub fn ahash_fixed(bytes: &[u8]) -> u64 {
    let mut h = ahash_state().build_hasher();
    h.write(bytes);
    h.finish()
}

/// How a hash becomes a lane index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reduce {
    /// `h % n`: a division, and biased when `n` does not divide 2^bits.
    Modulo,
    /// Lemire's multiply-shift: the high bits of `h * n`.
    MulShift,
}

impl Reduce {
    pub fn name(self) -> &'static str {
        match self {
            Reduce::Modulo => "%",
            Reduce::MulShift => "mul-shift",
        }
    }
}

/// Lane of hash `h` (of width `bits`) among `n` lanes.
pub fn reduce(h: u64, bits: u32, n: u64, how: Reduce) -> u64 {
    debug_assert!(n > 0);
    match how {
        Reduce::Modulo => h % n,
        Reduce::MulShift if bits == 32 => ((h & 0xffff_ffff) * n) >> 32,
        Reduce::MulShift => ((u128::from(h) * u128::from(n)) >> 64) as u64,
    }
}

/// Jump consistent hash (Lamping & Veach 2014): maps `key` to one of `buckets`
/// so that growing from n to n+1 buckets moves only ~1/(n+1) of keys, all of them
/// into the new bucket.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump hash needs at least one bucket");
    let (mut b, mut j) = (-1_i64, 0_i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1_u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_matches_reference_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn reductions_stay_in_range() {
        for f in HashFn::ALL {
            for n in [1, 16, 17, 1024] {
                for i in 0..1000 {
                    let h = f.hash(format!("OD20240517A{i:04}").as_bytes());
                    assert!(reduce(h, f.bits(), n, Reduce::Modulo) < n);
                    assert!(reduce(h, f.bits(), n, Reduce::MulShift) < n);
                }
            }
        }
        // Multiply-shift uses the high bits: the top of the range maps to the last lane.
        assert_eq!(reduce(u64::MAX, 64, 16, Reduce::MulShift), 15);
        assert_eq!(reduce(0xffff_ffff, 32, 16, Reduce::MulShift), 15);
        assert_eq!(reduce(0x7fff_ffff, 32, 2, Reduce::MulShift), 0);
    }

    #[test]
    fn jump_hash_moves_about_one_seventeenth_into_the_new_lane() {
        let n = 100_000_u64;
        let mut moved = 0_u64;
        for i in 0..n {
            let key = xxh3(&i.to_le_bytes());
            let (a, b) = (jump_consistent_hash(key, 16), jump_consistent_hash(key, 17));
            assert!(a < 16 && b < 17);
            if a != b {
                // Monotone: a key only ever moves into the newly added bucket.
                assert_eq!(b, 16, "key {i} moved {a} -> {b}");
                moved += 1;
            }
        }
        let frac = moved as f64 / n as f64;
        // Ideal 1/17 = 0.0588; binomial sd at 100k is ~0.00074.
        assert!((frac - 1.0 / 17.0).abs() < 0.004, "moved {frac}");
    }

    #[test]
    fn jump_hash_is_stable_and_matches_the_paper() {
        for key in [0_u64, 1, 42, u64::MAX] {
            assert_eq!(jump_consistent_hash(key, 1), 0);
            for n in [2, 16, 1000] {
                assert_eq!(jump_consistent_hash(key, n), jump_consistent_hash(key, n));
            }
        }
        // Values from the reference implementation in the paper (and Guava's
        // consistentHash, which uses the same LCG).
        assert_eq!(jump_consistent_hash(0, 10), 0);
        assert_eq!(jump_consistent_hash(1, 10), 6);
        assert_eq!(
            jump_consistent_hash(0xdead_beef, 100),
            jump_consistent_hash(0xdead_beef, 100)
        );
    }

    #[test]
    fn modulo_moves_most_keys_when_lanes_grow() {
        let n = 10_000_u64;
        let moved = (0..n)
            .filter(|i| {
                let h = xxh3(&i.to_le_bytes());
                h % 16 != h % 17
            })
            .count() as f64
            / n as f64;
        // Only keys with h mod 272 in 0..16 keep their lane: 16/17 move.
        assert!(moved > 0.9, "moved {moved}");
    }
}
