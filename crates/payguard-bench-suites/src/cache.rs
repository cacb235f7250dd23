//! The cache suite: the write-up's map workloads over eight concurrent maps,
//! throughput and sampled per-operation latency, with every ratio taken against a
//! global `Mutex<HashMap>` measured in the same run.
//!
//! It exists to test two things: the write-up's claim (chapter 4.1: 16 threads,
//! 1,000,000 operations, global lock 84,200 QPS vs 32-shard RWMutex 312,600 QPS)
//! and payguard's choice of `scc::HashCache<OrderId, Order>` for its order cache
//! (written by one lane per order after commit, read by GETs: read-heavy).
//!
//! Method: keys are 10,000 order ids (`OD20240513A00000`, ...), all present before
//! timing. Each thread replays a precomputed op list (key index + read/write drawn
//! from a seeded rng), so the rng is not timed and every map sees the same ops.
//! Every `sample_every`-th op is timed with `Instant` into an HDR histogram
//! (timing every op would measure the clock). Threads start on a barrier; ops/s is
//! total ops over the span from the first start to the last finish. Each cell runs
//! `reps` times; the median ops/s is reported with the spread.

use crate::error::{check_list, check_range, ArgError};
use crate::ids::{generate, IdFamily};
use crate::machine::Machine;
use crate::maps::{
    CachedOrder, DashMapMap, MapKind, MutexMap, OrderMap, PapayaMap, RwLockMap,
    SccHashCacheInPlace, SccHashCachePayguard, SccHashMapMap, ShardedRwMap,
};
use crate::report::{emit, Chart, Document, Section, Series, Table};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

pub const OPS_MAX: u64 = 100_000_000;
pub const THREADS_MAX: u64 = 256;
pub const KEYS_MAX: u64 = 5_000_000;
pub const REPS_MAX: u64 = 20;
pub const SAMPLE_EVERY_MAX: u64 = 1 << 20;
/// Histogram range: 1 ns .. 10 s, 3 significant digits.
const HIST_NS_MAX: u64 = 10_000_000_000;
/// The top bit of an encoded op marks a write; the rest is the key index.
const WRITE_BIT: u32 = 1 << 31;
/// Claimed in the write-up (chapter 4.1), 16 threads, 1M ops.
pub const WRITEUP_MUTEX_QPS: f64 = 84_200.0;
pub const WRITEUP_SHARDED_QPS: f64 = 312_600.0;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct CacheArgs {
    /// Tiny sizes (20k ops, 1000 keys, threads 1,2, one rep): a smoke run.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub output: crate::report::OutputArgs,
    /// Operations per cell, split across the threads [default: 1000000; quick: 20000].
    #[arg(long)]
    pub ops: Option<u64>,
    /// Thread counts [default: 1,2,4,16; quick: 1,2].
    #[arg(long, value_delimiter = ',')]
    pub threads: Option<Vec<u64>>,
    /// Distinct keys, all present before timing [default: 10000; quick: 1000].
    #[arg(long)]
    pub keys: Option<u64>,
    /// Read percentages, one workload each [default: 98,50,10].
    #[arg(long, value_delimiter = ',')]
    pub read_pct: Option<Vec<u64>>,
    /// Maps to run [default: all]; the Mutex baseline is always added.
    #[arg(long, value_delimiter = ',')]
    pub maps: Option<Vec<MapKind>>,
    /// Time every Nth op [default: 64].
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Repetitions per cell; the median is reported [default: 5; quick: 1].
    #[arg(long)]
    pub reps: Option<u64>,
    /// payguard's ownership rule: thread t writes only keys with index % threads
    /// == t (a lane writes only its own orders); reads still go to any key.
    #[arg(long)]
    pub owner_writes: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CachePlan {
    pub owner_writes: bool,
    pub quick: bool,
    pub ops: u64,
    pub threads: Vec<u64>,
    pub keys: u64,
    pub read_pct: Vec<u64>,
    pub maps: Vec<MapKind>,
    pub sample_every: u64,
    pub reps: u64,
    pub seed: u64,
}

impl CacheArgs {
    pub fn plan(&self) -> Result<CachePlan, ArgError> {
        let q = self.quick;
        let ops = self.ops.unwrap_or(if q { 20_000 } else { 1_000_000 });
        let threads =
            self.threads
                .clone()
                .unwrap_or_else(|| if q { vec![1, 2] } else { vec![1, 2, 4, 16] });
        let keys = self.keys.unwrap_or(if q { 1_000 } else { 10_000 });
        let read_pct = self.read_pct.clone().unwrap_or_else(|| vec![98, 50, 10]);
        let sample_every = self.sample_every.unwrap_or(64);
        let reps = self.reps.unwrap_or(if q { 1 } else { 5 });
        check_range("ops", ops, 1, OPS_MAX)?;
        check_list("threads", &threads, 1, THREADS_MAX)?;
        check_range("keys", keys, 1, KEYS_MAX)?;
        check_list("read-pct", &read_pct, 0, 100)?;
        check_range("sample-every", sample_every, 1, SAMPLE_EVERY_MAX)?;
        check_range("reps", reps, 1, REPS_MAX)?;
        let mut maps = vec![MapKind::Mutex];
        for m in self.maps.clone().unwrap_or_else(|| MapKind::ALL.to_vec()) {
            if !maps.contains(&m) {
                maps.push(m);
            }
        }
        Ok(CachePlan {
            owner_writes: self.owner_writes,
            quick: q,
            ops,
            threads,
            keys,
            read_pct,
            maps,
            sample_every,
            reps,
            seed: self.seed,
        })
    }
}

/// One (workload, threads, map) cell.
#[derive(Debug, Clone, Serialize)]
pub struct CacheRow {
    pub read_pct: u64,
    pub threads: u64,
    pub map: MapKind,
    pub map_name: &'static str,
    pub ops: u64,
    /// Median over reps.
    pub ops_per_sec: f64,
    pub ops_per_sec_min: f64,
    pub ops_per_sec_max: f64,
    pub ratio_to_mutex: f64,
    /// Sampled latency over all reps, ns (includes ~one clock read).
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub latency_samples: u64,
    /// Reads that found their key (1.0 unless a bounded map evicted).
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheResults {
    pub suite: &'static str,
    pub machine: Machine,
    pub plan: CachePlan,
    /// p50 of an empty `Instant::now()` pair: the floor under every latency.
    pub timer_overhead_p50_ns: u64,
    pub rows: Vec<CacheRow>,
}

/// One rep of one cell.
struct RunSample {
    wall: Duration,
    hist: Histogram<u64>,
    hits: u64,
    reads: u64,
}

fn new_hist() -> Histogram<u64> {
    // Bounds are constants within hdrhistogram's limits; this cannot fail.
    Histogram::new_with_bounds(1, HIST_NS_MAX, 3).expect("valid histogram bounds")
}

/// Per-thread op lists for one workload.
fn make_ops(plan: &CachePlan, threads: u64, read_pct: u64) -> Vec<Vec<u32>> {
    (0..threads)
        .map(|t| {
            let mut rng =
                SmallRng::seed_from_u64(plan.seed ^ (t << 32) ^ (read_pct << 8) ^ threads);
            let n = plan.ops / threads + u64::from(t < plan.ops % threads);
            (0..n)
                .map(|_| {
                    let k = rng.random_range(0..plan.keys);
                    if rng.random_range(0..100) < read_pct {
                        return k as u32;
                    }
                    if !plan.owner_writes {
                        return k as u32 | WRITE_BIT;
                    }
                    // The nearest key this thread owns; a read if there is none.
                    let owned = k - k % threads + t;
                    match owned {
                        o if o < plan.keys => o as u32 | WRITE_BIT,
                        o if o >= threads => (o - threads) as u32 | WRITE_BIT,
                        _ => k as u32,
                    }
                })
                .collect()
        })
        .collect()
}

fn run_once<M: OrderMap>(
    map: &M,
    keys: &[String],
    ops: &[Vec<u32>],
    sample_every: u64,
) -> RunSample {
    let barrier = Barrier::new(ops.len());
    let per_thread: Vec<(Instant, Instant, Histogram<u64>, u64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = ops
            .iter()
            .enumerate()
            .map(|(t, my_ops)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut hist = new_hist();
                    let (mut hits, mut reads, mut acc) = (0_u64, 0_u64, 0_u64);
                    let mut countdown = sample_every;
                    barrier.wait();
                    let start = Instant::now();
                    for (seq, &op) in my_ops.iter().enumerate() {
                        countdown -= 1;
                        let t0 = (countdown == 0).then(Instant::now);
                        let idx = op & !WRITE_BIT;
                        let key = &keys[idx as usize];
                        if op & WRITE_BIT != 0 {
                            map.upsert(key, CachedOrder::new(idx, t as u32, seq as u64 + 2));
                        } else {
                            reads += 1;
                            if let Some(v) = map.get(key) {
                                hits += 1;
                                acc ^= v.version;
                            }
                        }
                        if let Some(t0) = t0 {
                            hist.saturating_record(t0.elapsed().as_nanos() as u64);
                            countdown = sample_every;
                        }
                    }
                    let end = Instant::now();
                    black_box(acc);
                    (start, end, hist, hits, reads)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("cache worker panicked"))
            .collect()
    });
    let start = per_thread
        .iter()
        .map(|p| p.0)
        .min()
        .expect("at least one thread");
    let end = per_thread
        .iter()
        .map(|p| p.1)
        .max()
        .expect("at least one thread");
    let mut hist = new_hist();
    let (mut hits, mut reads) = (0, 0);
    for p in &per_thread {
        hist.add(&p.2).expect("same-bounds histograms add");
        hits += p.3;
        reads += p.4;
    }
    RunSample {
        wall: end - start,
        hist,
        hits,
        reads,
    }
}

/// Builds a fresh map of kind `M`, fills every key, then runs the ops.
fn fresh_run<M: OrderMap>(map: M, keys: &[String], ops: &[Vec<u32>], every: u64) -> RunSample {
    for (i, k) in keys.iter().enumerate() {
        map.upsert(k, CachedOrder::new(i as u32, 0, 1));
    }
    run_once(&map, keys, ops, every)
}

fn run_kind(kind: MapKind, keys: &[String], ops: &[Vec<u32>], every: u64) -> RunSample {
    let n = keys.len();
    match kind {
        MapKind::Mutex => fresh_run(MutexMap::with_capacity(n), keys, ops, every),
        MapKind::Rwlock => fresh_run(RwLockMap::with_capacity(n), keys, ops, every),
        MapKind::Sharded32 => fresh_run(ShardedRwMap::with_capacity(n), keys, ops, every),
        MapKind::Dashmap => fresh_run(DashMapMap::with_capacity(n), keys, ops, every),
        MapKind::SccHashmap => fresh_run(SccHashMapMap::with_capacity(n), keys, ops, every),
        MapKind::SccHashcache => fresh_run(SccHashCachePayguard::new(), keys, ops, every),
        MapKind::SccHashcacheEntry => fresh_run(SccHashCacheInPlace::new(), keys, ops, every),
        MapKind::Papaya => fresh_run(PapayaMap::with_capacity(n), keys, ops, every),
    }
}

/// p50 of back-to-back `Instant::now()` pairs.
pub fn timer_overhead_ns() -> u64 {
    let mut h = new_hist();
    for _ in 0..20_000 {
        let t = Instant::now();
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    h.value_at_quantile(0.5)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs every cell of the plan (no printing besides progress on stderr).
pub fn measure_cache(plan: &CachePlan) -> CacheResults {
    let keys = generate(IdFamily::DateSeq, plan.keys as usize, plan.seed);
    let mut rows = Vec::new();
    for &read_pct in &plan.read_pct {
        for &threads in &plan.threads {
            let ops = make_ops(plan, threads, read_pct);
            // Reps interleave the maps (rep 1 of every map, then rep 2, ...) so a
            // neighbour's burst of load on this shared machine hits all maps alike.
            let mut acc: Vec<(Vec<f64>, Histogram<u64>, u64, u64)> = plan
                .maps
                .iter()
                .map(|_| (Vec::new(), new_hist(), 0, 0))
                .collect();
            for _ in 0..plan.reps {
                for (i, &kind) in plan.maps.iter().enumerate() {
                    let s = run_kind(kind, &keys, &ops, plan.sample_every);
                    let a = &mut acc[i];
                    a.0.push(plan.ops as f64 / s.wall.as_secs_f64().max(1e-9));
                    a.1.add(&s.hist).expect("same-bounds histograms add");
                    a.2 += s.hits;
                    a.3 += s.reads;
                }
            }
            let mut cell_rows: Vec<CacheRow> = Vec::new();
            for (&kind, (mut rates, hist, hits, reads)) in plan.maps.iter().zip(acc) {
                let (lo, hi) = (
                    rates.iter().copied().fold(f64::INFINITY, f64::min),
                    rates.iter().copied().fold(0.0, f64::max),
                );
                cell_rows.push(CacheRow {
                    read_pct,
                    threads,
                    map: kind,
                    map_name: kind.name(),
                    ops: plan.ops,
                    ops_per_sec: median(&mut rates),
                    ops_per_sec_min: lo,
                    ops_per_sec_max: hi,
                    ratio_to_mutex: f64::NAN,
                    p50_ns: hist.value_at_quantile(0.5),
                    p99_ns: hist.value_at_quantile(0.99),
                    p999_ns: hist.value_at_quantile(0.999),
                    latency_samples: hist.len(),
                    hit_rate: if reads == 0 {
                        1.0
                    } else {
                        hits as f64 / reads as f64
                    },
                });
            }
            let base = cell_rows
                .iter()
                .find(|r| r.map == MapKind::Mutex)
                .map_or(f64::NAN, |r| r.ops_per_sec);
            for r in &mut cell_rows {
                r.ratio_to_mutex = r.ops_per_sec / base;
            }
            eprintln!(
                "cache: {read_pct}% reads, {threads} threads: {}",
                cell_rows
                    .iter()
                    .map(|r| format!("{} {:.2}M", r.map_name, r.ops_per_sec / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            rows.extend(cell_rows);
        }
    }
    CacheResults {
        suite: "cache",
        machine: Machine::detect(),
        plan: plan.clone(),
        timer_overhead_p50_ns: timer_overhead_ns(),
        rows,
    }
}

fn find(r: &CacheResults, pct: u64, threads: u64, map: MapKind) -> Option<&CacheRow> {
    r.rows
        .iter()
        .find(|x| x.read_pct == pct && x.threads == threads && x.map == map)
}

/// Sentences computed from the numbers: the write-up comparison and the
/// HashCache question.
pub fn findings(r: &CacheResults) -> Vec<String> {
    let mut out = Vec::new();
    let top = r.plan.threads.iter().copied().max().unwrap_or(1);
    for &pct in &r.plan.read_pct {
        if let (Some(m), Some(s)) = (
            find(r, pct, top, MapKind::Mutex),
            find(r, pct, top, MapKind::Sharded32),
        ) {
            out.push(format!(
                "{pct}% reads, {top} threads: Mutex<HashMap> {:.2}M ops/s, 32-shard RwLock {:.2}M \
                 ops/s, ratio {:.2}x (write-up: 84,200 vs 312,600 QPS, 3.71x).",
                m.ops_per_sec / 1e6,
                s.ops_per_sec / 1e6,
                s.ops_per_sec / m.ops_per_sec
            ));
        }
    }
    for &pct in &r.plan.read_pct {
        let cells: Vec<&CacheRow> = r
            .rows
            .iter()
            .filter(|x| x.read_pct == pct && x.threads == top)
            .collect();
        if let (Some(best), Some(hc)) = (
            cells
                .iter()
                .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec)),
            cells.iter().find(|x| x.map == MapKind::SccHashcache),
        ) {
            out.push(format!(
                "{pct}% reads, {top} threads: scc::HashCache as payguard writes it runs at {:.2}M \
                 ops/s ({:.2}x mutex, p99 {} ns, hit rate {:.3}); fastest here is {} at {:.2}M.",
                hc.ops_per_sec / 1e6,
                hc.ratio_to_mutex,
                hc.p99_ns,
                hc.hit_rate,
                best.map_name,
                best.ops_per_sec / 1e6
            ));
        }
    }
    let low = r.plan.threads.iter().copied().min().unwrap_or(1);
    for &pct in &r.plan.read_pct {
        if let (Some(pg), Some(ip)) = (
            find(r, pct, low, MapKind::SccHashcache),
            find(r, pct, low, MapKind::SccHashcacheEntry),
        ) {
            out.push(format!(
                "{pct}% reads, {low} thread(s): HashCache written as payguard does (remove + put) \
                 {:.2}M ops/s vs updated in place {:.2}M ops/s ({:.2}x); hit rates {:.4} vs {:.4}.",
                pg.ops_per_sec / 1e6,
                ip.ops_per_sec / 1e6,
                pg.ops_per_sec / ip.ops_per_sec,
                pg.hit_rate,
                ip.hit_rate
            ));
        }
    }
    out
}

pub fn cache_document(r: &CacheResults) -> Document {
    let mut doc = Document {
        title: "payguard bench cache".into(),
        sections: Vec::new(),
    };
    doc.sections.push(setup_section(r));
    for &pct in &r.plan.read_pct {
        doc.sections.push(mix_section(r, pct));
    }
    doc.sections.push(findings_section(r));
    doc
}

/// The plan in words, and why thread counts above the CPUs measure preemption.
fn setup_section(r: &CacheResults) -> Section {
    let p = &r.plan;
    Section {
        heading: "Setup".into(),
        notes: vec![
            format!("Machine: {}.", r.machine.summary()),
            format!(
                "{} ops per cell split over the threads, {} keys (all present), every {}th op \
                 timed, median of {} interleaved reps, seed {}, writers: {}. Ratios are to \
                 Mutex<HashMap> in the same cell. Latency includes one clock read: timer \
                 overhead p50 = {} ns.",
                p.ops,
                p.keys,
                p.sample_every,
                p.reps,
                p.seed,
                if p.owner_writes {
                    "each key written only by its owner thread (payguard's lane rule)"
                } else {
                    "any thread writes any key (the write-up's workload)"
                },
                r.timer_overhead_p50_ns
            ),
            format!(
                "With {} CPUs, more than {} threads only adds preemption: a 16-thread cell \
                 measures oversubscription, not 16-way scaling.",
                r.machine.cpus, r.machine.cpus
            ),
        ],
        ..Default::default()
    }
}

/// One read/write mix: throughput and latency tables, throughput and p99 charts.
fn mix_section(r: &CacheResults, pct: u64) -> Section {
    let mut sec = Section {
        heading: format!("{pct}% reads / {}% writes", 100 - pct),
        ..Default::default()
    };
    let (tt, lt) = mix_tables(r, pct);
    sec.tables.push(tt);
    sec.tables.push(lt);
    sec.charts.push(mix_chart(
        r,
        pct,
        format!("{pct}% reads: throughput"),
        "M ops/s",
        |c| c.ops_per_sec / 1e6,
    ));
    sec.charts.push(mix_chart(
        r,
        pct,
        format!("{pct}% reads: p99 latency"),
        "ns, lower is better",
        |c| c.p99_ns as f64,
    ));
    sec
}

/// Throughput (× mutex) and sampled latency, one row a map, one column a thread count.
fn mix_tables(r: &CacheResults, pct: u64) -> (Table, Table) {
    let p = &r.plan;
    let mut hdr: Vec<String> = vec!["map".into()];
    hdr.extend(
        p.threads
            .iter()
            .map(|t| format!("{t} thr Mops/s (× mutex)")),
    );
    let hdr_refs: Vec<&str> = hdr.iter().map(|s| s.as_str()).collect();
    let mut tt = Table::new("Throughput", &hdr_refs);
    let mut lhdr: Vec<String> = vec!["map".into()];
    lhdr.extend(
        p.threads
            .iter()
            .map(|t| format!("{t} thr p50/p99/p99.9 ns")),
    );
    lhdr.push("min hit rate".into());
    let lhdr_refs: Vec<&str> = lhdr.iter().map(|s| s.as_str()).collect();
    let mut lt = Table::new("Sampled latency per op", &lhdr_refs);
    for &m in &p.maps {
        let mut row = vec![m.name().to_string()];
        let mut lrow = vec![m.name().to_string()];
        let mut min_hit: f64 = 1.0;
        for &t in &p.threads {
            match find(r, pct, t, m) {
                Some(c) => {
                    row.push(format!(
                        "{:.2} ({:.2}×)",
                        c.ops_per_sec / 1e6,
                        c.ratio_to_mutex
                    ));
                    lrow.push(format!("{} / {} / {}", c.p50_ns, c.p99_ns, c.p999_ns));
                    min_hit = min_hit.min(c.hit_rate);
                }
                None => {
                    row.push("-".into());
                    lrow.push("-".into());
                }
            }
        }
        lrow.push(format!("{min_hit:.3}"));
        tt.push(row);
        lt.push(lrow);
    }
    (tt, lt)
}

/// One series a thread count, one bar a map; `value` picks what is drawn.
fn mix_chart(
    r: &CacheResults,
    pct: u64,
    title: String,
    unit: &str,
    value: impl Fn(&CacheRow) -> f64,
) -> Chart {
    let p = &r.plan;
    Chart {
        title,
        unit: unit.into(),
        categories: p.maps.iter().map(|m| m.name().to_string()).collect(),
        series: p
            .threads
            .iter()
            .map(|&t| Series {
                name: format!("{t} threads"),
                values: p
                    .maps
                    .iter()
                    .map(|&m| find(r, pct, t, m).map_or(f64::NAN, &value))
                    .collect(),
            })
            .collect(),
    }
}

/// The computed findings, and how noisy the reps were.
fn findings_section(r: &CacheResults) -> Section {
    let spread = r
        .rows
        .iter()
        .map(|x| (x.ops_per_sec_max - x.ops_per_sec_min) / x.ops_per_sec)
        .fold(0.0, f64::max);
    let mut notes = findings(r);
    notes.push(format!(
        "Noise: the widest rep-to-rep spread of any cell was {:.0}% of its median.",
        spread * 100.0
    ));
    Section {
        heading: "Findings (computed)".into(),
        notes,
        ..Default::default()
    }
}

/// `payguard bench cache`.
pub fn run_cache(args: &CacheArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let res = measure_cache(&plan);
    emit(&cache_document(&res), &res, &args.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_lists_have_the_asked_mix_and_size() {
        let plan = CacheArgs {
            quick: true,
            ops: Some(10_001),
            ..Default::default()
        }
        .plan()
        .unwrap();
        let ops = make_ops(&plan, 4, 90);
        assert_eq!(ops.iter().map(Vec::len).sum::<usize>(), 10_001);
        let writes = ops
            .iter()
            .flatten()
            .filter(|&&o| o & WRITE_BIT != 0)
            .count();
        // 10% writes of 10,001: sd ~30, allow ~5 sd.
        assert!((850..1150).contains(&writes), "writes {writes}");
        assert!(ops
            .iter()
            .flatten()
            .all(|&o| u64::from(o & !WRITE_BIT) < plan.keys));
    }

    #[test]
    fn a_tiny_run_counts_every_op_and_hits_every_read() {
        let plan = CacheArgs {
            quick: true,
            ops: Some(4_000),
            keys: Some(100),
            threads: Some(vec![2]),
            read_pct: Some(vec![50]),
            maps: Some(vec![MapKind::Sharded32, MapKind::SccHashcache]),
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(plan.maps[0], MapKind::Mutex, "baseline always first");
        let r = measure_cache(&plan);
        assert_eq!(r.rows.len(), 3);
        for row in &r.rows {
            // payguard's remove-then-put leaves a window in which a reader misses;
            // every other map must answer every read of a prefilled key.
            let hit_min = if row.map == MapKind::SccHashcache {
                0.5
            } else {
                1.0
            };
            assert!(row.ops_per_sec > 0.0 && row.hit_rate >= hit_min, "{row:?}");
            assert!(row.latency_samples >= 4_000 / 64 - 2);
        }
        assert_eq!(r.rows[0].ratio_to_mutex, 1.0);
        let md = cache_document(&r).to_markdown();
        assert!(md.contains("32-shard RwLock (write-up)"));
    }

    #[test]
    fn owner_writes_touch_only_owned_keys() {
        let plan = CacheArgs {
            quick: true,
            owner_writes: true,
            keys: Some(1_001),
            ..Default::default()
        }
        .plan()
        .unwrap();
        let ops = make_ops(&plan, 4, 50);
        for (t, list) in ops.iter().enumerate() {
            let writes: Vec<u32> = list
                .iter()
                .filter(|&&o| o & WRITE_BIT != 0)
                .map(|o| o & !WRITE_BIT)
                .collect();
            assert!(writes.len() > list.len() / 3, "thread {t} barely writes");
            assert!(writes
                .iter()
                .all(|&k| k as usize % 4 == t && u64::from(k) < plan.keys));
        }
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let e = CacheArgs {
            threads: Some(vec![]),
            ..Default::default()
        }
        .plan();
        assert_eq!(e.unwrap_err(), ArgError::Empty { flag: "threads" });
        let e = CacheArgs {
            read_pct: Some(vec![101]),
            ..Default::default()
        }
        .plan();
        assert!(matches!(
            e,
            Err(ArgError::OutOfRange {
                flag: "read-pct",
                ..
            })
        ));
    }
}
