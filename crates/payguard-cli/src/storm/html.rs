//! `storm --html FILE`: one self-contained page (inline SVG and CSS, no scripts,
//! no external assets) with the liveness verdict, every target on its own (its
//! statuses and latency over time, on scales shared by all targets so the one
//! that stalled stands out), latency histograms and throughput over time.

use super::report::{yuan, Latency, Report};
use super::targets::{Bucket, TargetStats};
use std::fmt::Write;

/// Per-target chart geometry (px): width, latency panel, status panel, padding.
const CHART_W: f64 = 720.0;
const LAT_H: f64 = 110.0;
const STATUS_H: f64 = 44.0;
const PAD: f64 = 40.0;
/// Colours of the status bars, bottom up: 2xx, 4xx, 503, 500, no answer.
const STATUS_COLOURS: [(&str, &str); 5] = [
    ("2xx", "#4a7bd0"),
    ("4xx", "#9aa5b1"),
    ("503", "#e8910c"),
    ("500", "#b00020"),
    ("no answer", "#222"),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn histogram_svg(name: &str, l: &Latency) -> String {
    let (w, h, pad) = (520.0, 180.0, 30.0);
    let max = l.buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let n = l.buckets.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut s = format!(
        "<figure><figcaption>{} latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)</figcaption>\
         <svg width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{} latency histogram\">",
        esc(name), l.p50_ms, l.p99_ms, l.max_ms, l.count, esc(name)
    );
    for (i, (upper, count)) in l.buckets.iter().enumerate() {
        let bh = (*count as f64 / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"bar\"><title>≤ {upper} ms: {count}</title></rect>",
            h - pad - bh,
            (bw - 2.0).max(1.0)
        );
        if i % 3 == 0 {
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{:.1}\" class=\"axis\">{upper}</text>",
                h - pad + 14.0
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">ms (log buckets)</text></svg></figure>",
        w - pad - 90.0,
        h - 4.0
    );
    s
}

fn timeline_svg(r: &Report) -> String {
    let (w, h, pad) = (720.0, 200.0, 34.0);
    let per_sec: Vec<f64> = r.timeline.iter().map(|c| *c as f64 * 10.0).collect();
    let max = per_sec.iter().cloned().fold(1.0, f64::max);
    let n = per_sec.len().max(2) as f64 - 1.0;
    let pts: Vec<String> = per_sec
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                pad + i as f64 / n * (w - 2.0 * pad),
                h - pad - v / max * (h - 2.0 * pad)
            )
        })
        .collect();
    format!(
        "<figure><figcaption>Throughput over time (requests/s, 100 ms buckets; peak {max:.0}/s)</figcaption>\
         <svg width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"throughput over time\">\
         <polyline points=\"{}\" class=\"line\"/>\
         <text x=\"{pad}\" y=\"{:.1}\" class=\"axis\">0 s</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{:.1} s</text>\
         <text x=\"2\" y=\"{:.1}\" class=\"axis\">{max:.0}</text></svg></figure>",
        pts.join(" "),
        h - pad + 14.0,
        w - pad - 30.0,
        h - pad + 14.0,
        r.timeline.len() as f64 / 10.0,
        pad
    )
}

fn status_counts(b: &Bucket) -> [usize; 5] {
    let s = &b.statuses;
    [
        s.ok_2xx + s.other,
        s.refused_4xx,
        s.unavailable_503,
        s.server_error_500,
        s.unanswered,
    ]
}

/// Scales shared by every target's chart.
struct Scales {
    buckets: usize,
    bucket_ms: u64,
    /// Top of the latency axis (ms): the slowest request, at least `--slow-ms`.
    latency_ms: f64,
    /// Top of the status axis: the busiest bucket.
    requests: usize,
    slow_ms: u64,
}

impl Scales {
    fn of(r: &Report) -> Self {
        let all = || r.per_target.iter().flat_map(|t| t.buckets.iter());
        Scales {
            buckets: r
                .per_target
                .iter()
                .map(|t| t.buckets.len())
                .max()
                .unwrap_or(0),
            bucket_ms: r.target_bucket_ms,
            latency_ms: all()
                .map(|b| b.max_ms)
                .fold(r.liveness.slow_ms as f64, f64::max),
            requests: all().map(|b| b.requests).max().unwrap_or(1).max(1),
            slow_ms: r.liveness.slow_ms,
        }
    }

    fn x(&self, i: usize) -> f64 {
        PAD + i as f64 * (CHART_W - 2.0 * PAD) / self.buckets.max(1) as f64
    }

    fn y_latency(&self, ms: f64) -> f64 {
        PAD / 2.0 + LAT_H - (ms / self.latency_ms).min(1.0) * LAT_H
    }
}

/// One target over time: max and median latency per bucket above (with the
/// `--slow-ms` line), stacked statuses per bucket below.
fn target_svg(t: &TargetStats, sc: &Scales) -> String {
    let h = PAD / 2.0 + LAT_H + 8.0 + STATUS_H + 18.0;
    let bw = (CHART_W - 2.0 * PAD) / sc.buckets.max(1) as f64;
    // A path that lifts the pen over buckets where no request started, so a
    // gap is drawn as a gap, not as a slope.
    let line = |f: fn(&Bucket) -> f64| -> String {
        let mut d = String::new();
        let mut pen_down = false;
        for (i, b) in t.buckets.iter().enumerate() {
            if b.requests == 0 {
                pen_down = false;
                continue;
            }
            let op = if pen_down { 'L' } else { 'M' };
            let _ = write!(
                d,
                "{op}{:.1},{:.1} ",
                sc.x(i) + bw / 2.0,
                sc.y_latency(f(b))
            );
            pen_down = true;
        }
        d
    };
    let mut s = format!(
        "<svg width=\"{CHART_W}\" height=\"{h:.0}\" role=\"img\" aria-label=\"{} over time\">\
         <line x1=\"{PAD}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"slow\"/>\
         <text x=\"2\" y=\"{y:.1}\" class=\"axis\">{} ms</text>\
         <text x=\"2\" y=\"{:.1}\" class=\"axis\">{:.0} ms</text>\
         <path d=\"{}\" class=\"max\"/><path d=\"{}\" class=\"p50\"/>",
        esc(&t.target),
        CHART_W - PAD,
        sc.slow_ms,
        PAD / 2.0 + 8.0,
        sc.latency_ms,
        line(|b| b.max_ms),
        line(|b| b.p50_ms),
        y = sc.y_latency(sc.slow_ms as f64),
    );
    let base = PAD / 2.0 + LAT_H + 8.0 + STATUS_H;
    for (i, b) in t.buckets.iter().enumerate() {
        let mut y = base;
        for (n, (label, colour)) in status_counts(b).iter().zip(STATUS_COLOURS) {
            if *n == 0 {
                continue;
            }
            let bh = *n as f64 / sc.requests as f64 * STATUS_H;
            y -= bh;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{colour}\">\
                 <title>+{:.1} s: {n} {label}, max {:.1} ms</title></rect>",
                sc.x(i),
                (bw - 0.5).max(0.5),
                (i as u64 * sc.bucket_ms) as f64 / 1e3,
                b.max_ms
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{PAD}\" y=\"{:.1}\" class=\"axis\">0 s</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{:.1} s</text></svg>",
        h - 4.0,
        CHART_W - PAD - 30.0,
        h - 4.0,
        (sc.buckets as u64 * sc.bucket_ms) as f64 / 1e3
    );
    s
}

/// The per-target table and one chart per target.
fn targets_section(r: &Report) -> String {
    let sc = Scales::of(r);
    let mut s = String::from(
        "<h2>Per target</h2><table><tr><th>target</th><th>requests</th><th>2xx</th><th>4xx</th>\
         <th>503</th><th>500</th><th>no answer</th><th>slow</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th></tr>",
    );
    for t in &r.per_target {
        let st = &t.statuses;
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(&t.target),
            t.requests,
            st.ok_2xx,
            st.refused_4xx,
            st.unavailable_503,
            st.server_error_500,
            st.unanswered,
            t.slow,
            t.p50_ms,
            t.p99_ms,
            t.max_ms
        );
    }
    let legend: Vec<String> = STATUS_COLOURS
        .iter()
        .map(|(l, c)| format!("<span style=\"color:{c}\">■</span> {l}"))
        .collect();
    let _ = write!(
        s,
        "</table><p>Over time, by request start ({} ms buckets), on scales shared by every target: \
         max latency (line), median (light line), --slow-ms (dashed); statuses per bucket: {}.</p>",
        r.target_bucket_ms,
        legend.join(" ")
    );
    for t in &r.per_target {
        let _ = write!(
            s,
            "<figure><figcaption>{}</figcaption>{}</figure>",
            esc(&t.target),
            target_svg(t, &sc)
        );
    }
    s
}

/// Each liveness kind: its count, whether this run counts it, a few examples.
fn liveness_section(r: &Report) -> String {
    let l = &r.liveness;
    let mut s = format!(
        "<h2>Liveness</h2><p>{}; slow means over {} ms.</p><table>\
         <tr><th>kind</th><th>requests</th><th>verdict</th><th>examples</th></tr>",
        if l.faults {
            "This run injects faults (--faults): only a 500 is a violation"
        } else {
            "No faults injected: every request must be answered, quickly, never with 503 or 500"
        },
        l.slow_ms
    );
    for (kind, k) in &l.kinds {
        let verdict = match (k.count, k.violation) {
            (0, _) => "<span class=\"ok\">none</span>",
            (_, true) => "<span class=\"bad\">VIOLATION</span>",
            (_, false) => "allowed (--faults)",
        };
        let examples: Vec<String> = k.examples.iter().map(|e| esc(&e.describe())).collect();
        let _ = write!(
            s,
            "<tr><td>{kind}</td><td>{}</td><td>{verdict}</td><td>{}</td></tr>",
            k.count,
            examples.join("<br>")
        );
    }
    s.push_str("</table>");
    s
}

pub fn render(r: &Report) -> String {
    let verdict = if r.ok {
        "<p class=\"ok\">0 violations</p>".to_owned()
    } else {
        format!("<p class=\"bad\">{} VIOLATIONS</p>", r.violation_count())
    };
    let mut rows = String::new();
    for v in r.violations.iter().take(200) {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(v.kind),
            esc(v
                .order_id
                .as_deref()
                .or(v.account_id.as_deref())
                .unwrap_or("")),
            esc(&v.detail)
        );
        for e in &v.examples {
            let _ = write!(
                rows,
                "<tr><td></td><td></td><td>e.g. {}</td></tr>",
                esc(&e.describe())
            );
        }
    }
    let mut charts = String::new();
    for (name, l) in &r.latency {
        if l.count > 0 {
            charts.push_str(&histogram_svg(name, l));
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>payguard storm {tag}</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}\
         .bar{{fill:#4a7bd0}}.line{{fill:none;stroke:#4a7bd0;stroke-width:2}}\
         .max{{fill:none;stroke:#b00020;stroke-width:1.5}}.p50{{fill:none;stroke:#4a7bd0;stroke-width:1}}\
         .slow{{stroke:#e8910c;stroke-dasharray:4 3}}\
         .axis{{font-size:10px;fill:#555}}.ok{{color:#17803d;font-weight:bold}}.bad{{color:#b00020;font-weight:bold}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}\
         figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>\
         <h1>payguard storm {tag}</h1>{verdict}\
         <p>{orders} orders × {dup} duplicates against {targets}; {dps:.0} deducts/s; \
         double-charged orders {dc}; money lost {lost}; 503 {u}; 500 {e}; no answer {na}; slow {slow}.</p>\
         {liveness}{targets_html}{timeline}{charts}\
         <h2>Violations</h2><table><tr><th>kind</th><th>id</th><th>detail</th></tr>{rows}</table>\
         </body></html>",
        tag = esc(&r.run_tag),
        orders = r.orders,
        dup = r.dup,
        targets = esc(&r.targets.join(", ")),
        dps = r.deducts_per_sec,
        dc = r.double_charged_orders,
        lost = esc(&yuan(r.money_lost)),
        u = r.unavailable_503,
        e = r.server_errors_500,
        na = r.no_answer,
        slow = r.slow_requests,
        liveness = liveness_section(r),
        targets_html = targets_section(r),
        timeline = timeline_svg(r),
    )
}
