//! The routing suite's report: the tables and charts of the setup, the spread over
//! lanes, the keys moved on growth and the hash throughput, one function a section,
//! built from measured results only (nothing is measured here).

use super::measure::{DistRow, MoveRow, RoutingResults};
use super::spread::verdict;
use super::writeup::writeup_section;
use super::SPEED_ROUNDS;
use crate::ids::IdFamily;
use crate::report::{Chart, Document, Section, Series, Table};

pub(super) fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

pub(super) fn p_fmt(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

pub fn routing_document(r: &RoutingResults) -> Document {
    let mut doc = Document {
        title: "payguard bench routing".into(),
        sections: Vec::new(),
    };
    doc.sections.push(setup_section(r));
    doc.sections.push(distribution_section(r));
    doc.sections.push(moves_section(r));
    doc.sections.push(speed_section(r));
    if !r.writeup_cells.is_empty() {
        doc.sections.push(writeup_section(r));
    }
    doc
}

/// The plan in words, and what a uniformly random assignment gives.
fn setup_section(r: &RoutingResults) -> Section {
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
    setup.tables.push(expectation_table(r));
    setup
}

fn expectation_table(r: &RoutingResults) -> Table {
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
    et
}

/// One table of lane spreads per id-set size, one chart per family at the largest size.
fn distribution_section(r: &RoutingResults) -> Section {
    let mut dist = Section {
        heading: "Distribution over lanes".into(),
        ..Default::default()
    };
    for &n in &r.plan.ids {
        dist.tables.push(distribution_table(r, n));
    }
    let big_n = r.plan.ids.iter().copied().max().unwrap_or(0);
    let big_l = r.plan.lanes.iter().copied().max().unwrap_or(0);
    for &fam in &r.plan.families {
        if let Some(chart) = spread_chart(r, fam, big_n, big_l) {
            dist.charts.push(chart);
        }
    }
    dist
}

fn distribution_table(r: &RoutingResults, n: u64) -> Table {
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
    t
}

/// `fam`'s lane sd over the binomial sd for every hash; `None` when no row matches.
fn spread_chart(r: &RoutingResults, fam: IdFamily, big_n: u64, big_l: u64) -> Option<Chart> {
    let rows: Vec<&DistRow> = r
        .distribution
        .iter()
        .filter(|d| d.family == fam && d.ids == big_n && d.lanes == big_l)
        .collect();
    if rows.is_empty() {
        return None;
    }
    let bsd = r
        .expectations
        .iter()
        .find(|e| e.ids == big_n && e.lanes == big_l)
        .map_or(f64::NAN, |e| e.binomial_sd);
    Some(Chart {
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
    })
}

fn moves_section(r: &RoutingResults) -> Section {
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
    mv
}

fn speed_section(r: &RoutingResults) -> Section {
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
    sp
}
