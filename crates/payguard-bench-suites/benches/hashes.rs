//! Criterion micro-benchmark of the routing hashes on payguard-shaped order ids:
//! the per-id cost behind `payguard bench routing`'s throughput table, measured
//! with criterion's statistics instead of a best-of-N loop.

#![forbid(unsafe_code)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use payguard_bench_suites::hashes::{reduce, HashFn, Reduce};
use payguard_bench_suites::ids::{generate, IdFamily};
use std::hint::black_box;

/// Ids per iteration: enough to amortize loop overhead, small enough for L1/L2.
const IDS_PER_ITER: usize = 1_000;

fn hashes(c: &mut Criterion) {
    for fam in [IdFamily::DateRandom, IdFamily::Uuid] {
        let ids = generate(fam, IDS_PER_ITER, 1);
        let mut g = c.benchmark_group(format!("hash/{}", fam.name()));
        g.throughput(Throughput::Elements(IDS_PER_ITER as u64));
        for h in HashFn::ALL {
            g.bench_function(h.name(), |b| {
                b.iter(|| {
                    ids.iter()
                        .map(|id| {
                            reduce(
                                h.hash(black_box(id.as_bytes())),
                                h.bits(),
                                1024,
                                Reduce::MulShift,
                            )
                        })
                        .fold(0_u64, u64::wrapping_add)
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = hashes
}
criterion_main!(benches);
