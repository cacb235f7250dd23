//! The routing suite: how evenly each hash spreads order ids over lanes, how many
//! orders change lane when lanes grow, and how fast each hash is.
//!
//! payguard's correctness rests on one lane owning each order; its throughput rests
//! on lanes filling evenly. The write-up routes with `fnv32a(id) % 1024` and claims
//! a max bucket of 112 for FNV-1a against 137 for CRC32 (100,000 ids); payguard
//! routes with xxh3_64 and multiply-shift. This suite puts every such number beside
//! what a uniformly random assignment would give (binomial sd, expected max,
//! chi-square with df = lanes - 1) so "uneven" and "too even" can be told apart.

use crate::error::{check_list, check_range, ArgError};
use crate::hashes::{jump_consistent_hash, reduce, HashFn, Reduce};
use crate::ids::{generate, IdFamily, FAMILY_IDS_MAX};
use crate::machine::Machine;
use crate::report::{emit, Chart, Document, Section, Series, Table};
use crate::stats;
use serde::Serialize;
use std::hint::black_box;
use std::time::Instant;

/// Most lanes a distribution is computed for.
pub const LANES_MAX: u64 = 65_536;
/// Smallest id set worth a distribution.
pub const IDS_MIN: u64 = 100;
/// Rounds of the throughput loop; the best is kept (least disturbed by neighbours).
pub const SPEED_ROUNDS: u32 = 5;
/// The write-up's own setup: `fnv32a(id) % 1024` over 100,000 ids.
pub const WRITEUP_IDS: u64 = 100_000;
pub const WRITEUP_LANES: u64 = 1024;
/// Claimed in the write-up's table (chapter 4.2).
pub const WRITEUP_FNV_MAX: u64 = 112;
pub const WRITEUP_CRC_MAX: u64 = 137;
/// Rows of the "nearest to 112" table.
pub const WRITEUP_NEAREST_ROWS: usize = 10;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct RoutingArgs {
    /// Tiny sizes (10k ids; 16 and 64 lanes): a smoke run in well under 10 s.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub output: crate::report::OutputArgs,
    /// Id-set sizes [default: 100000,1000000; quick: 10000].
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u64>>,
    /// Lane counts [default: 16,64,1024; quick: 16,64].
    #[arg(long, value_delimiter = ',')]
    pub lanes: Option<Vec<u64>>,
    /// Id families [default: all].
    #[arg(long, value_delimiter = ',')]
    pub families: Option<Vec<IdFamily>>,
    /// Hash functions [default: all].
    #[arg(long, value_delimiter = ',')]
    pub hashes: Option<Vec<HashFn>>,
    /// Lane count before growth for the rebalance table (grows to N+1) [default: 16].
    #[arg(long)]
    pub grow_from: Option<u64>,
    /// Seed for the random id families.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the search for the write-up's "FNV max bucket 112".
    #[arg(long)]
    pub no_writeup: bool,
}

/// The resolved plan: flags with `--quick` and defaults applied, all checked.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingPlan {
    pub quick: bool,
    pub ids: Vec<u64>,
    pub lanes: Vec<u64>,
    pub families: Vec<IdFamily>,
    pub hashes: Vec<HashFn>,
    pub grow_from: u64,
    pub seed: u64,
    pub writeup: bool,
}

impl RoutingArgs {
    pub fn plan(&self) -> Result<RoutingPlan, ArgError> {
        let q = self.quick;
        let ids = self.ids.clone().unwrap_or_else(|| {
            if q {
                vec![10_000]
            } else {
                vec![100_000, 1_000_000]
            }
        });
        let lanes =
            self.lanes
                .clone()
                .unwrap_or_else(|| if q { vec![16, 64] } else { vec![16, 64, 1024] });
        check_list("ids", &ids, IDS_MIN, FAMILY_IDS_MAX)?;
        check_list("lanes", &lanes, 1, LANES_MAX)?;
        let grow_from = self.grow_from.unwrap_or(16);
        check_range("grow-from", grow_from, 1, LANES_MAX - 1)?;
        let families = self
            .families
            .clone()
            .unwrap_or_else(|| IdFamily::ALL.to_vec());
        let hashes = self.hashes.clone().unwrap_or_else(|| HashFn::ALL.to_vec());
        if families.is_empty() {
            return Err(ArgError::Empty { flag: "families" });
        }
        if hashes.is_empty() {
            return Err(ArgError::Empty { flag: "hashes" });
        }
        Ok(RoutingPlan {
            quick: q,
            ids,
            lanes,
            families,
            hashes,
            grow_from,
            seed: self.seed,
            writeup: !self.no_writeup,
        })
    }
}

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

/// Looks for a setup under which FNV-1a-32 with `%` gives the write-up's max
/// bucket of 112: every family, 10k / 100k / 1M ids, 16..1024 lanes.
fn search_writeup(plan: &RoutingPlan, res: &mut RoutingResults) {
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

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn p_fmt(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// "ok", "UNEVEN" (p < 0.01) or "too even" (p > 0.99: the ids' structure shows).
fn verdict(p: f64) -> &'static str {
    if p < 0.01 {
        "UNEVEN"
    } else if p > 0.99 {
        "too even"
    } else {
        "ok"
    }
}

pub fn routing_document(r: &RoutingResults) -> Document {
    let mut doc = Document {
        title: "payguard bench routing".into(),
        sections: Vec::new(),
    };
    let mut setup = Section {
        heading: "Setup".into(),
        ..Default::default()
    };
    setup
        .notes
        .push(format!("Machine: {}.", r.machine.summary()));
    setup.notes.push(format!(
        "Ids: {:?} per family ({}); lanes {:?}; hashes {}; seed {}. Each cell is the lane \
         counts' max/mean, population sd and chi-square p-value (df = lanes - 1), for `%` \
         and for multiply-shift. p < 0.01 is UNEVEN; p > 0.99 is 'too even' (the ids are \
         structured and the hash kept some of it: harmless for load, a sign the hash is weak).",
        r.plan.ids,
        r.plan
            .families
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", "),
        r.plan.lanes,
        r.plan
            .hashes
            .iter()
            .map(|h| h.name())
            .collect::<Vec<_>>()
            .join(", "),
        r.plan.seed
    ));
    let mut et = Table::new(
        "What a uniformly random assignment gives",
        &[
            "ids",
            "lanes",
            "mean",
            "binomial sd",
            "E[max]",
            "E[max]/mean",
            "χ² 99% critical (df)",
        ],
    );
    for e in &r.expectations {
        et.push(vec![
            e.ids.to_string(),
            e.lanes.to_string(),
            format!("{:.1}", e.mean),
            format!("{:.2}", e.binomial_sd),
            format!("{:.1}", e.expected_max),
            format!("{:.3}", e.expected_max_over_mean),
            format!("{:.1} ({})", e.chi2_critical_99, e.df),
        ]);
    }
    setup.tables.push(et);
    doc.sections.push(setup);

    let mut dist = Section {
        heading: "Distribution over lanes".into(),
        ..Default::default()
    };
    for &n in &r.plan.ids {
        let mut t = Table::new(
            format!("{n} ids"),
            &[
                "family",
                "lanes",
                "hash",
                "% max/mean",
                "% sd",
                "% χ² p",
                "% verdict",
                "mul-shift max/mean",
                "mul-shift sd",
                "mul-shift χ² p",
                "mul-shift verdict",
            ],
        );
        for d in r.distribution.iter().filter(|d| d.ids == n) {
            t.push(vec![
                d.family.name().into(),
                d.lanes.to_string(),
                d.hash.name().into(),
                format!("{:.3}", d.modulo.max_over_mean),
                format!("{:.2}", d.modulo.stddev),
                p_fmt(d.modulo.p_value),
                verdict(d.modulo.p_value).into(),
                format!("{:.3}", d.mul_shift.max_over_mean),
                format!("{:.2}", d.mul_shift.stddev),
                p_fmt(d.mul_shift.p_value),
                verdict(d.mul_shift.p_value).into(),
            ]);
        }
        dist.tables.push(t);
    }
    let big_n = r.plan.ids.iter().copied().max().unwrap_or(0);
    let big_l = r.plan.lanes.iter().copied().max().unwrap_or(0);
    for &fam in &r.plan.families {
        let rows: Vec<&DistRow> = r
            .distribution
            .iter()
            .filter(|d| d.family == fam && d.ids == big_n && d.lanes == big_l)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let bsd = r
            .expectations
            .iter()
            .find(|e| e.ids == big_n && e.lanes == big_l)
            .map_or(f64::NAN, |e| e.binomial_sd);
        dist.charts.push(Chart {
            title: format!(
                "{}: lane sd ÷ binomial sd, {big_n} ids over {big_l} lanes",
                fam.name()
            ),
            unit: "1.0 = random; above is lumpier, below is 'too even'".into(),
            categories: rows.iter().map(|d| d.hash.name().to_string()).collect(),
            series: vec![
                Series {
                    name: "%".into(),
                    values: rows.iter().map(|d| d.modulo.stddev / bsd).collect(),
                },
                Series {
                    name: "mul-shift".into(),
                    values: rows.iter().map(|d| d.mul_shift.stddev / bsd).collect(),
                },
            ],
        });
    }
    doc.sections.push(dist);

    let mut mv = Section {
        heading: format!(
            "Keys moved when lanes grow {} → {}",
            r.plan.grow_from,
            r.plan.grow_from + 1
        ),
        ..Default::default()
    };
    mv.notes.push(format!(
        "Ideal is 1/{} = {}. Every moved order changes owner lane, so a resize must drain \
         those orders' queues first.",
        r.plan.grow_from + 1,
        pct(1.0 / (r.plan.grow_from + 1) as f64)
    ));
    let mut t = Table::new(
        "",
        &[
            "family",
            "ids",
            "hash",
            "%",
            "mul-shift",
            "jump hash",
            "ideal",
        ],
    );
    for m in &r.moves {
        t.push(vec![
            m.family.name().into(),
            m.ids.to_string(),
            m.hash.name().into(),
            pct(m.modulo_moved),
            pct(m.mul_shift_moved),
            pct(m.jump_moved),
            pct(m.ideal),
        ]);
    }
    mv.tables.push(t);
    if let Some(fam) = r.plan.families.last() {
        let rows: Vec<&MoveRow> = r.moves.iter().filter(|m| m.family == *fam).collect();
        mv.charts.push(Chart {
            title: format!("moved on growth, {} ids", fam.name()),
            unit: "% of ids".into(),
            categories: rows.iter().map(|m| m.hash.name().to_string()).collect(),
            series: vec![
                Series {
                    name: "%".into(),
                    values: rows.iter().map(|m| m.modulo_moved * 100.0).collect(),
                },
                Series {
                    name: "mul-shift".into(),
                    values: rows.iter().map(|m| m.mul_shift_moved * 100.0).collect(),
                },
                Series {
                    name: "jump".into(),
                    values: rows.iter().map(|m| m.jump_moved * 100.0).collect(),
                },
            ],
        });
    }
    doc.sections.push(mv);

    let mut sp = Section {
        heading: "Hash throughput".into(),
        ..Default::default()
    };
    sp.notes.push(format!(
        "ns per id, best of {SPEED_ROUNDS} passes over up to 200,000 ids (hash only, no reduction)."
    ));
    let mut t = Table::new("", &["family", "mean id bytes", "hash", "ns/id", "Mids/s"]);
    for s in &r.speed {
        t.push(vec![
            s.family.name().into(),
            format!("{:.1}", s.mean_id_bytes),
            s.hash.name().into(),
            format!("{:.2}", s.ns_per_id),
            format!("{:.1}", 1e3 / s.ns_per_id),
        ]);
    }
    sp.tables.push(t);
    let hashes = &r.plan.hashes;
    sp.charts.push(Chart {
        title: "hash cost per id".into(),
        unit: "ns, lower is better".into(),
        categories: hashes.iter().map(|h| h.name().to_string()).collect(),
        series: r
            .plan
            .families
            .iter()
            .map(|&f| Series {
                name: f.name().into(),
                values: hashes
                    .iter()
                    .map(|&h| {
                        r.speed
                            .iter()
                            .find(|s| s.family == f && s.hash == h)
                            .map_or(f64::NAN, |s| s.ns_per_id)
                    })
                    .collect(),
            })
            .collect(),
    });
    doc.sections.push(sp);

    if !r.writeup_cells.is_empty() {
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
        let mk = |caption: &str, rows: &[WriteupRow]| {
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
        };
        if !r.writeup_setup.is_empty() {
            w.tables.push(mk(
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
        w.tables.push(mk(
            &format!("The {WRITEUP_NEAREST_ROWS} searched FNV-1a-32 cells whose max is nearest {WRITEUP_FNV_MAX}"),
            &near,
        ));
        doc.sections.push(w);
    }
    doc
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

/// `payguard bench routing`.
pub fn run_routing(args: &RoutingArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let res = measure_routing(&plan);
    emit(&routing_document(&res), &res, &args.output)
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

    #[test]
    fn quick_plan_is_small_and_limits_are_enforced() {
        let p = RoutingArgs {
            quick: true,
            ..Default::default()
        }
        .plan()
        .unwrap();
        assert_eq!(p.ids, vec![10_000]);
        let bad = RoutingArgs {
            lanes: Some(vec![0]),
            ..Default::default()
        }
        .plan();
        assert!(matches!(
            bad,
            Err(ArgError::OutOfRange { flag: "lanes", .. })
        ));
    }

    #[test]
    fn ids_for_an_expected_max_inverts_the_expectation() {
        let n = ids_for_expected_max(112.0, 1024);
        assert!(stats::expected_max_bucket(n, 1024) >= 112.0);
        assert!(stats::expected_max_bucket(n - 1, 1024) < 112.0);
        assert!((80_000..90_000).contains(&n), "{n}");
    }

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
