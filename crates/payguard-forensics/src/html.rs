//! `--html`: one self-contained page (inline CSS and SVG, no scripts, no external assets) with a
//! timeline for each of the worst incidents: hosts as rows, requests as bars, money effects as
//! markers, and the race window's width labelled.
//!
//! Why: the page is what gets pasted into an incident review; it must open anywhere, offline.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::analyze::Timeline;
use crate::clock::{format_rfc3339, TzOffset};
use crate::engine::Engine;
use crate::error::ForensicsError;
use crate::limits::HTML_INCIDENTS_MAX;
use crate::parse::Step;
use crate::report::{yuan, Report};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const SVG_WIDTH_PX: f64 = 960.0;
const LABEL_WIDTH_PX: f64 = 110.0;
const ROW_HEIGHT_PX: f64 = 34.0;

/// Writes the page to `path`.
pub fn write(path: &Path, e: &Engine, r: &Report, tz: TzOffset) -> Result<(), ForensicsError> {
    let page = render(e, r, tz);
    std::fs::write(path, page).map_err(|x| ForensicsError::Output {
        path: path.to_path_buf(),
        reason: x.to_string(),
    })
}

/// Renders the page.
pub fn render(e: &Engine, r: &Report, tz: TzOffset) -> String {
    let by_order: HashMap<&str, &Timeline> = e
        .results
        .timelines
        .iter()
        .filter(|t| t.incident)
        .map(|t| (t.order_id.as_str(), t))
        .collect();
    let mut h = String::new();
    h.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>payguard forensics</title><style>\n");
    h.push_str(
        "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1a1a1a;background:#fafafa}\n",
    );
    h.push_str(
        "h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse}\n",
    );
    h.push_str("td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}\n");
    h.push_str(".lost{color:#b00020;font-weight:600}.muted{color:#666}svg{background:#fff;border:1px solid #ddd}\n");
    h.push_str(
        ".req{fill:#4a7bd0;opacity:.75}.win{fill:#f2b705;opacity:.35}.lbl{font:12px monospace}\n",
    );
    h.push_str("</style></head><body>\n<h1>payguard forensics</h1>\n");
    let _ = writeln!(
        h,
        "<p>{} files, {} lines read ({} skipped), {} orders seen. <b>{} incidents</b>, {} orders affected, \
         <span class=\"lost\">{} lost ({} fen)</span>, {} healthy race windows.</p>",
        r.files,
        r.lines_read,
        r.lines_skipped,
        r.orders_seen,
        r.totals.incidents,
        r.totals.orders_affected,
        yuan(r.totals.amount_lost),
        r.totals.amount_lost,
        r.totals.race_windows
    );
    if r.incidents.is_empty() {
        h.push_str("<p>No order was debited more than once.</p>\n");
    } else {
        h.push_str("<table><tr><th>#</th><th>order</th><th>kind</th><th>effects</th><th>lost</th><th>race window</th><th>hosts</th></tr>\n");
        for (n, i) in r.incidents.iter().take(HTML_INCIDENTS_MAX).enumerate() {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td><a href=\"#i{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"lost\">{}</td><td>{}</td><td>{}</td></tr>",
                n + 1,
                n + 1,
                esc(&i.order_id),
                esc(&i.kind),
                i.effects,
                yuan(i.amount_lost),
                i.race_window_ms.map_or("no overlap".into(), |w| format!("{w:.1} ms")),
                esc(&i.hosts.join(", "))
            );
        }
        h.push_str("</table>\n");
    }
    for (n, i) in r.incidents.iter().take(HTML_INCIDENTS_MAX).enumerate() {
        let _ = writeln!(
            h,
            "<h2 id=\"i{}\">{}. {} — {} effects, <span class=\"lost\">{} lost</span></h2>",
            n + 1,
            n + 1,
            esc(&i.order_id),
            i.effects,
            yuan(i.amount_lost)
        );
        let _ = writeln!(
            h,
            "<p class=\"muted\">entries {} and {}; {}</p>",
            esc(&i.first_entry),
            esc(&i.second_entry),
            i.race_window_ms
                .map_or("the requests did not overlap".into(), |w| format!(
                    "race window {w:.1} ms"
                ))
        );
        if let Some(t) = by_order.get(i.order_id.as_str()) {
            svg(&mut h, e, t, tz);
        }
    }
    h.push_str("</body></html>\n");
    h
}

fn svg(h: &mut String, e: &Engine, t: &Timeline, tz: TzOffset) {
    let p = Plot::new(e, t, tz);
    let height = p.height;
    let _ = writeln!(
        h,
        "<svg width=\"{SVG_WIDTH_PX}\" height=\"{height}\" viewBox=\"0 0 {SVG_WIDTH_PX} {height}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    p.window(h);
    p.requests(h);
    p.marks(h);
    let _ = writeln!(
        h,
        "<text class=\"lbl\" x=\"{LABEL_WIDTH_PX}\" y=\"{:.1}\">{}</text><text class=\"lbl\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">+{:.1} ms</text></svg>",
        height - 6.0,
        esc(&format_rfc3339(p.lo, tz)),
        SVG_WIDTH_PX - 10.0,
        height - 6.0,
        p.span / 1000.0
    );
    h.push_str("<p class=\"muted\">bars: requests in flight (one row each, grouped by host); red: debit committed; orange: duplicate_deduct; green: replay; yellow band: race window</p>\n");
}

/// The geometry of one timeline's SVG: its rows and its time axis.
struct Plot<'a> {
    e: &'a Engine,
    t: &'a Timeline,
    tz: TzOffset,
    /// Request indices, one row each, grouped by host, so requests of one host never hide each other.
    rows: Vec<usize>,
    /// The earliest time drawn.
    lo: i64,
    /// Microseconds from `lo` to the latest time drawn (at least 1 ms).
    span: f64,
    /// Width of the plotting area.
    plot: f64,
    nrows: usize,
    height: f64,
}

impl<'a> Plot<'a> {
    fn new(e: &'a Engine, t: &'a Timeline, tz: TzOffset) -> Self {
        let host_name = |x: u16| e.hosts.get(x as usize).map_or("?", String::as_str);
        // One row per request, grouped by host, so requests of one host never hide each other.
        let mut rows: Vec<usize> = (0..t.reqs.len()).collect();
        rows.sort_by(|&a, &b| {
            host_name(t.reqs[a].host)
                .cmp(host_name(t.reqs[b].host))
                .then(t.reqs[a].entry.cmp(&t.reqs[b].entry))
        });
        // Marks of no known request get a row of their own host, or a row at the bottom.
        let lo = t
            .reqs
            .iter()
            .map(|r| r.entry)
            .chain(t.marks.iter().map(|m| m.ts))
            .min()
            .unwrap_or(0);
        let hi = t
            .reqs
            .iter()
            .map(|r| r.end)
            .chain(t.marks.iter().map(|m| m.ts))
            .max()
            .unwrap_or(lo)
            .max(lo + 1000);
        let span = (hi - lo) as f64;
        let plot = SVG_WIDTH_PX - LABEL_WIDTH_PX - 20.0;
        let nrows = rows.len().max(1);
        let height = 40.0 + nrows as f64 * ROW_HEIGHT_PX + 20.0;
        Plot {
            e,
            t,
            tz,
            rows,
            lo,
            span,
            plot,
            nrows,
            height,
        }
    }

    fn host_name(&self, x: u16) -> &'a str {
        self.e.hosts.get(x as usize).map_or("?", String::as_str)
    }

    fn x(&self, ts: i64) -> f64 {
        LABEL_WIDTH_PX + (ts - self.lo) as f64 / self.span * self.plot
    }

    fn row_y(&self, row: usize) -> f64 {
        30.0 + row as f64 * ROW_HEIGHT_PX
    }

    fn row_of_req(&self, i: usize) -> usize {
        self.rows.iter().position(|&r| r == i).unwrap_or(0)
    }

    /// The race window as a band across every row, labelled with its width.
    fn window(&self, h: &mut String) {
        if let Some((a, b)) = self.t.window {
            let (xa, xb) = (self.x(a), self.x(b));
            let _ = writeln!(
                h,
                "<rect class=\"win\" x=\"{xa:.1}\" y=\"22\" width=\"{:.1}\" height=\"{:.1}\"/><text class=\"lbl\" x=\"{xa:.1}\" y=\"16\">race window {:.1} ms</text>",
                (xb - xa).max(2.0),
                self.nrows as f64 * ROW_HEIGHT_PX + 4.0,
                (b - a) as f64 / 1000.0
            );
        }
    }

    /// One row per request: the host's name on its first row, the request's label, its bar.
    fn requests(&self, h: &mut String) {
        let (t, tz, rows) = (self.t, self.tz, &self.rows);
        for (row, &i) in rows.iter().enumerate() {
            let r = &t.reqs[i];
            let y = self.row_y(row);
            let first_of_host = row == 0 || t.reqs[rows[row - 1]].host != r.host;
            if first_of_host {
                let _ = writeln!(
                    h,
                    "<text class=\"lbl\" x=\"6\" y=\"{:.1}\">{}</text>",
                    y + 12.0,
                    esc(self.host_name(r.host))
                );
            }
            let _ = writeln!(
                h,
                "<text class=\"lbl muted\" x=\"6\" y=\"{:.1}\" font-size=\"10\">{}</text><line x1=\"{LABEL_WIDTH_PX}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
                y + 25.0,
                esc(&r.label.chars().take(14).collect::<String>()),
                SVG_WIDTH_PX - 10.0,
                y + 30.0,
                y + 30.0
            );
            let (xa, xb) = (self.x(r.entry), self.x(r.end));
            let _ = writeln!(
                h,
                "<rect class=\"req\" x=\"{xa:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" rx=\"3\"><title>{} on {}: {} → {}</title></rect>",
                y + 6.0,
                (xb - xa).max(3.0),
                esc(&r.label),
                esc(self.host_name(r.host)),
                esc(&format_rfc3339(r.entry, tz)),
                esc(&format_rfc3339(r.end, tz))
            );
        }
    }

    /// Money effects, duplicates, replays and rejections as dots on their request's row.
    fn marks(&self, h: &mut String) {
        let (t, tz) = (self.t, self.tz);
        for m in &t.marks {
            let row = match m.req {
                Some(i) => self.row_of_req(i),
                None => self
                    .rows
                    .iter()
                    .position(|&i| t.reqs[i].host == m.host)
                    .unwrap_or(0),
            };
            let (cx, cy) = (self.x(m.ts), self.row_y(row) + 14.0);
            let color = match m.kind.step {
                Step::Commit => "#b00020",
                Step::Duplicate => "#ff6d00",
                Step::Replay => "#2e7d32",
                _ => "#555",
            };
            let _ = writeln!(
                h,
                "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"6\" fill=\"{color}\" stroke=\"#fff\"><title>{} on {} at {} {}</title></circle>",
                m.kind.name(),
                esc(self.host_name(m.host)),
                esc(&format_rfc3339(m.ts, tz)),
                m.amount.map(yuan).unwrap_or_default()
            );
        }
    }
}
