//! `storm --html FILE`: one self-contained page (inline SVG and CSS, no scripts,
//! no external assets) with latency histograms and throughput over time.

use super::check::{yuan, Latency, Report};
use std::fmt::Write;

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

pub fn render(r: &Report) -> String {
    let verdict = if r.ok {
        "<p class=\"ok\">0 violations</p>".to_owned()
    } else {
        format!("<p class=\"bad\">{} VIOLATIONS</p>", r.violations.len())
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
         .axis{{font-size:10px;fill:#555}}.ok{{color:#17803d;font-weight:bold}}.bad{{color:#b00020;font-weight:bold}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}\
         figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>\
         <h1>payguard storm {tag}</h1>{verdict}\
         <p>{orders} orders × {dup} duplicates against {targets}; {dps:.0} deducts/s; \
         double-charged orders {dc}; money lost {lost}; 503 {u}; 500 {e}.</p>\
         {timeline}{charts}\
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
        timeline = timeline_svg(r),
    )
}
