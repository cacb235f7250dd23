//! The routing suite's runs: every (family, hash, ids, lanes) cell's lane spread,
//! the keys moved when lanes grow, and each hash's cost per id. Only measuring
//! here; the tables are built in `document`, the write-up search in `writeup`.

use super::spread::{expectation, lane_counts, spread, Expectation, Spread};
use super::writeup::{search_writeup, WriteupRow};
use super::{RoutingPlan, IDS_MIN, SPEED_ROUNDS};
use crate::hashes::{jump_consistent_hash, reduce, HashFn, Reduce};
use crate::ids::{generate, IdFamily};
use crate::machine::Machine;
use serde::Serialize;
use std::hint::black_box;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct DistRow {
    pub family: IdFamily,
    pub ids: u64,
    pub lanes: u64,
    pub hash: HashFn,
    pub modulo: Spread,
    pub mul_shift: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoveRow {
    pub family: IdFamily,
    pub ids: u64,
    pub hash: HashFn,
    pub from: u64,
    pub to: u64,
    pub modulo_moved: f64,
    pub mul_shift_moved: f64,
    pub jump_moved: f64,
    pub ideal: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    pub family: IdFamily,
    pub mean_id_bytes: f64,
    pub hash: HashFn,
    pub ns_per_id: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutingResults {
    pub suite: &'static str,
    pub machine: Machine,
    pub plan: RoutingPlan,
    pub expectations: Vec<Expectation>,
    pub distribution: Vec<DistRow>,
    pub moves: Vec<MoveRow>,
    pub speed: Vec<SpeedRow>,
    /// The write-up's stated setup (100k ids, 1024 lanes, `%`) for FNV and CRC32.
    pub writeup_setup: Vec<WriteupRow>,
    /// Every searched cell (FNV-1a-32 and CRC32, `%`).
    pub writeup_cells: Vec<WriteupRow>,
}

/// Moved fraction when `from` lanes become `to`.
fn moved(hashes: &[u64], bits: u32, from: u64, to: u64) -> (f64, f64, f64) {
    let n = hashes.len().max(1) as f64;
    let (mut m, mut s, mut j) = (0_u64, 0_u64, 0_u64);
    for &h in hashes {
        m += u64::from(h % from != h % to);
        s += u64::from(
            reduce(h, bits, from, Reduce::MulShift) != reduce(h, bits, to, Reduce::MulShift),
        );
        j += u64::from(jump_consistent_hash(h, from as u32) != jump_consistent_hash(h, to as u32));
    }
    (m as f64 / n, s as f64 / n, j as f64 / n)
}

/// Best-of-[`SPEED_ROUNDS`] ns per id of `f` over `ids`.
fn ns_per_id(ids: &[String], f: impl Fn(&[u8]) -> u64) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..SPEED_ROUNDS {
        let t = Instant::now();
        let mut acc = 0_u64;
        for id in ids {
            acc = acc.wrapping_add(f(black_box(id.as_bytes())));
        }
        black_box(acc);
        best = best.min(t.elapsed().as_nanos() as f64 / ids.len().max(1) as f64);
    }
    best
}

fn speed_of(h: HashFn, ids: &[String]) -> f64 {
    use crate::hashes as hs;
    // Monomorphic closures so the loop measures the hash, not a `match`.
    match h {
        HashFn::Fnv1a32 => ns_per_id(ids, |b| u64::from(hs::fnv1a32(b))),
        HashFn::Crc32 => ns_per_id(ids, |b| u64::from(hs::crc32(b))),
        HashFn::Sip => ns_per_id(ids, hs::siphash),
        HashFn::Xxh3 => ns_per_id(ids, hs::xxh3),
        HashFn::Ahash => ns_per_id(ids, hs::ahash_fixed),
    }
}

/// Runs the routing suite and returns its results (no printing).
pub fn measure_routing(plan: &RoutingPlan) -> RoutingResults {
    let mut res = RoutingResults {
        suite: "routing",
        machine: Machine::detect(),
        plan: plan.clone(),
        expectations: Vec::new(),
        distribution: Vec::new(),
        moves: Vec::new(),
        speed: Vec::new(),
        writeup_setup: Vec::new(),
        writeup_cells: Vec::new(),
    };
    for &n in &plan.ids {
        for &l in &plan.lanes {
            res.expectations.push(expectation(n, l));
        }
    }
    let largest = plan.ids.iter().copied().max().unwrap_or(IDS_MIN);
    for (fi, &fam) in plan.families.iter().enumerate() {
        eprintln!("routing: {} ids ...", fam.name());
        let all = generate(fam, largest as usize, plan.seed.wrapping_add(fi as u64));
        for &h in &plan.hashes {
            let hashes: Vec<u64> = all.iter().map(|id| h.hash(id.as_bytes())).collect();
            for &n in &plan.ids {
                let hs = &hashes[..n as usize];
                for &l in &plan.lanes {
                    res.distribution.push(DistRow {
                        family: fam,
                        ids: n,
                        lanes: l,
                        hash: h,
                        modulo: spread(&lane_counts(hs, h.bits(), l, Reduce::Modulo)),
                        mul_shift: spread(&lane_counts(hs, h.bits(), l, Reduce::MulShift)),
                    });
                }
            }
            let (m, s, j) = moved(&hashes, h.bits(), plan.grow_from, plan.grow_from + 1);
            res.moves.push(MoveRow {
                family: fam,
                ids: largest,
                hash: h,
                from: plan.grow_from,
                to: plan.grow_from + 1,
                modulo_moved: m,
                mul_shift_moved: s,
                jump_moved: j,
                ideal: 1.0 / (plan.grow_from + 1) as f64,
            });
            let speed_ids = &all[..all.len().min(200_000)];
            res.speed.push(SpeedRow {
                family: fam,
                mean_id_bytes: speed_ids.iter().map(|s| s.len()).sum::<usize>() as f64
                    / speed_ids.len().max(1) as f64,
                hash: h,
                ns_per_id: speed_of(h, speed_ids),
            });
        }
    }
    if plan.writeup {
        search_writeup(plan, &mut res);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{routing_document, RoutingArgs};

    #[test]
    fn quick_run_produces_every_table() {
        let plan = RoutingArgs {
            quick: true,
            ids: Some(vec![2_000]),
            no_writeup: true,
            ..Default::default()
        }
        .plan()
        .unwrap();
        let r = measure_routing(&plan);
        assert_eq!(r.distribution.len(), 4 * 5 * 2);
        assert_eq!(r.moves.len(), 4 * 5);
        // xxh3 + jump on uuids moves close to 1/17 even at 2k ids (sd ~0.5%).
        let m = r
            .moves
            .iter()
            .find(|m| m.hash == HashFn::Xxh3 && m.family == IdFamily::Uuid)
            .unwrap();
        assert!(
            (m.jump_moved - 1.0 / 17.0).abs() < 0.025,
            "{}",
            m.jump_moved
        );
        assert!(m.modulo_moved > 0.85);
        let md = routing_document(&r).to_markdown();
        assert!(md.contains("Keys moved when lanes grow 16 → 17"));
    }
}
