//! Rendering a suite's results: a markdown table on stdout, JSON for machines, and a
//! self-contained HTML page with inline SVG bar charts.
//!
//! The HTML has no scripts and no external assets, so it can be attached to an
//! issue or opened from CI artifacts as is. Each suite builds one [`Document`] and
//! one serializable result; [`emit`] decides what goes where: `--json` replaces the
//! markdown on stdout (so stdout stays parseable), `--html FILE` writes the page.

use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;

/// A plain table; cells are preformatted strings.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub caption: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(caption: impl Into<String>, headers: &[&str]) -> Self {
        Table {
            caption: caption.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len(), "row width != header width");
        self.rows.push(row);
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        if !self.caption.is_empty() {
            let _ = writeln!(s, "**{}**\n", self.caption);
        }
        let _ = writeln!(s, "| {} |", self.headers.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.headers
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        s
    }

    pub fn to_html(&self) -> String {
        let mut s = String::from("<table>");
        if !self.caption.is_empty() {
            let _ = write!(s, "<caption>{}</caption>", esc(&self.caption));
        }
        s.push_str("<tr>");
        for h in &self.headers {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s.push_str("</tr>");
        for r in &self.rows {
            s.push_str("<tr>");
            for c in r {
                let _ = write!(s, "<td>{}</td>", esc(c));
            }
            s.push_str("</tr>");
        }
        s.push_str("</table>\n");
        s
    }
}

/// One bar per category per series.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// A horizontal grouped bar chart: categories down the side, one bar per series.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

/// Colours for up to eight series; more series cycle.
const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];
const CHART_WIDTH_PX: f64 = 820.0;
const CHART_LABEL_PX: f64 = 210.0;
const CHART_VALUE_PX: f64 = 90.0;
const BAR_HEIGHT_PX: f64 = 13.0;
const GROUP_GAP_PX: f64 = 8.0;
const LEGEND_HEIGHT_PX: f64 = 22.0;
const TITLE_HEIGHT_PX: f64 = 24.0;

impl Chart {
    /// Inline SVG; values <= 0 or non-finite draw as empty bars.
    pub fn to_svg(&self) -> String {
        let n_series = self.series.len().max(1) as f64;
        let group_h = n_series * BAR_HEIGHT_PX + GROUP_GAP_PX;
        let height =
            TITLE_HEIGHT_PX + LEGEND_HEIGHT_PX + group_h * self.categories.len() as f64 + 10.0;
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let plot_w = CHART_WIDTH_PX - CHART_LABEL_PX - CHART_VALUE_PX;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#,
            w = CHART_WIDTH_PX,
            h = height
        );
        let _ = write!(
            s,
            r#"<text x="0" y="16" font-size="14" font-weight="bold">{} ({})</text>"#,
            esc(&self.title),
            esc(&self.unit)
        );
        let mut lx = CHART_LABEL_PX;
        for (i, se) in self.series.iter().enumerate() {
            let y = TITLE_HEIGHT_PX + 4.0;
            let _ = write!(
                s,
                r#"<rect x="{lx}" y="{y}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                PALETTE[i % PALETTE.len()],
                lx + 14.0,
                y + 9.0,
                esc(&se.name)
            );
            lx += 24.0 + 7.0 * se.name.chars().count() as f64;
        }
        for (ci, cat) in self.categories.iter().enumerate() {
            let gy = TITLE_HEIGHT_PX + LEGEND_HEIGHT_PX + ci as f64 * group_h;
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                CHART_LABEL_PX - 6.0,
                gy + group_h / 2.0,
                esc(cat)
            );
            for (si, se) in self.series.iter().enumerate() {
                let v = se.values.get(ci).copied().unwrap_or(f64::NAN);
                let w = if v.is_finite() && v > 0.0 && max > 0.0 {
                    v / max * plot_w
                } else {
                    0.0
                };
                let y = gy + si as f64 * BAR_HEIGHT_PX;
                let _ = write!(
                    s,
                    r#"<rect x="{CHART_LABEL_PX}" y="{y}" width="{w:.1}" height="{}" fill="{}"><title>{}: {}</title></rect><text x="{:.1}" y="{}">{}</text>"#,
                    BAR_HEIGHT_PX - 2.0,
                    PALETTE[si % PALETTE.len()],
                    esc(&se.name),
                    fmt_num(v),
                    CHART_LABEL_PX + w + 4.0,
                    y + BAR_HEIGHT_PX - 3.0,
                    fmt_num(v)
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A heading with its notes, tables and charts.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub heading: String,
    pub notes: Vec<String>,
    pub tables: Vec<Table>,
    pub charts: Vec<Chart>,
}

/// Everything a suite prints.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub title: String,
    pub sections: Vec<Section>,
}

impl Document {
    pub fn to_markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for sec in &self.sections {
            let _ = writeln!(s, "## {}\n", sec.heading);
            for n in &sec.notes {
                let _ = writeln!(s, "{n}\n");
            }
            for t in &sec.tables {
                let _ = writeln!(s, "{}", t.to_markdown());
            }
        }
        s
    }

    pub fn to_html(&self) -> String {
        let mut s = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
             body{{font-family:sans-serif;margin:2em;max-width:1100px}}\
             table{{border-collapse:collapse;margin:1em 0;font-size:13px}}\
             td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}\
             th{{background:#f3f3f3}} caption{{text-align:left;font-weight:bold;padding:4px 0}}\
             td:first-child,th:first-child{{text-align:left}} svg{{display:block;margin:1em 0}}\
             </style></head><body><h1>{t}</h1>\n",
            t = esc(&self.title)
        );
        for sec in &self.sections {
            let _ = writeln!(s, "<h2>{}</h2>", esc(&sec.heading));
            for n in &sec.notes {
                let _ = writeln!(s, "<p>{}</p>", esc(n));
            }
            for c in &sec.charts {
                s.push_str(&c.to_svg());
            }
            for t in &sec.tables {
                s.push_str(&t.to_html());
            }
        }
        s.push_str("</body></html>\n");
        s
    }
}

/// The output flags every suite takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutputArgs {
    /// Print JSON on stdout instead of the markdown tables.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report with SVG charts to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<std::path::PathBuf>,
    /// Also write the JSON results to FILE (stdout keeps the markdown).
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<std::path::PathBuf>,
}

/// Prints the markdown (or, with `--json`, the JSON of `data`) to stdout, writes the
/// HTML page with `--html` and the JSON with `--json-out`.
pub fn emit(doc: &Document, data: &impl Serialize, out: &OutputArgs) -> anyhow::Result<()> {
    let (json, html, json_out) = (out.json, out.html.as_deref(), out.json_out.as_deref());
    let text = serde_json::to_string_pretty(data).context("serializing results")?;
    if let Some(path) = json_out {
        std::fs::write(path, &text)
            .with_context(|| format!("writing JSON to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // A write error (a closed pipe included) goes back to the caller, which
    // decides how to end: `payguard` ends quietly when its reader went away.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if json {
            writeln!(stdout, "{text}")?;
        } else {
            write!(stdout, "{}", doc.to_markdown())?;
        }
        stdout.flush()?;
    }
    if let Some(path) = html {
        std::fs::write(path, doc.to_html())
            .with_context(|| format!("writing HTML report to {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// HTML/XML text escaping.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Compact number: 1.23M, 45.6k, 7.89, 0.0123.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_html_render_and_escape() {
        let mut t = Table::new("cap", &["a", "b"]);
        t.push(vec!["x|y".into(), "<1>".into()]);
        let md = t.to_markdown();
        assert!(md.contains("| a | b |") && md.contains("x\\|y"));
        let doc = Document {
            title: "T".into(),
            sections: vec![Section {
                heading: "S".into(),
                notes: vec!["n & m".into()],
                tables: vec![t],
                charts: vec![Chart {
                    title: "c".into(),
                    unit: "ops/s".into(),
                    categories: vec!["m<1>".into()],
                    series: vec![Series {
                        name: "1".into(),
                        values: vec![3.0],
                    }],
                }],
            }],
        };
        let html = doc.to_html();
        assert!(html.contains("<svg") && html.contains("&lt;1&gt;") && html.contains("n &amp; m"));
        assert!(
            !html.contains("src=") && !html.contains("href="),
            "no external assets"
        );
        assert!(!html.contains("<script"));
        assert_eq!(fmt_num(1_234_567.0), "1.23M");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }
}
