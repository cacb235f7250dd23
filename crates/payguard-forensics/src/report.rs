//! The findings as data (the `--json` shape of LOGS.md) and as a report a person reads.
//!
//! Why: one [`Report`] value feeds both outputs, so the text and the JSON can never disagree.
//! Money stays in integer minor units (fen) and is only formatted as yuan for display.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::analyze::{worse, EvidenceRec, IncidentRec, RaceRec};
use crate::clock::{format_rfc3339, TzOffset, MS_US};
use crate::engine::Engine;
use crate::limits::INCIDENTS_LISTED_MAX;
use crate::parse::{Side, SkipReason};

/// One line that supports an incident.
#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    pub file: String,
    pub line: u64,
    pub ts: String,
    pub event: String,
}

/// An order debited (or refunded) more than once.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub order_id: String,
    /// `duplicate_effect` (debits) or `duplicate_refund`.
    pub kind: String,
    pub effects: u32,
    /// Fen.
    pub amount_lost: i64,
    pub race_window_ms: Option<f64>,
    pub first_entry: String,
    pub second_entry: String,
    pub hosts: Vec<String>,
    pub evidence: Vec<Evidence>,
}

/// Requests of one order in flight at once that moved money at most once.
#[derive(Debug, Clone, Serialize)]
pub struct RaceWindow {
    pub order_id: String,
    pub width_ms: f64,
    pub requests: u32,
    pub hosts: Vec<String>,
    pub moved_money: u32,
    pub side: String,
    pub first_entry: String,
    pub second_entry: String,
}

/// An ordering that cannot happen under the applied clocks (a host's clock jumped, or the logs
/// are not what they claim).
#[derive(Debug, Clone, Serialize)]
pub struct ImpossibleOrdering {
    pub order_id: String,
    /// `replay_before_commit` or `two_lock_holders`.
    pub kind: String,
    /// By how much the ordering is broken.
    pub by_ms: f64,
    pub at: String,
    /// The host that should have come first, then the other.
    pub hosts: [String; 2],
}

/// Sums over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub orders_affected: u64,
    /// Every incident, listed or not.
    pub incidents: u64,
    /// Debits beyond the first, over all incidents.
    pub duplicate_effects: u64,
    pub amount_lost: i64,
    /// Healthy race windows (the `race_windows` list, including any past the listing limit).
    pub race_windows: u64,
    /// Race windows inside incident orders (not in `race_windows`).
    pub race_windows_in_incidents: u64,
    /// Every impossible ordering (the `impossible_orderings` list, including any past its limit).
    pub impossible_orderings: u64,
}

/// A file that could only be read in part.
#[derive(Debug, Clone, Serialize)]
pub struct InputError {
    pub file: String,
    pub error: String,
}

/// Everything forensics found. The first fields are exactly LOGS.md's `--json` example.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub files: usize,
    pub lines_read: u64,
    pub lines_parsed: u64,
    pub lines_skipped: u64,
    pub orders_seen: u64,
    pub incidents: Vec<Incident>,
    pub race_windows: Vec<RaceWindow>,
    pub impossible_orderings: Vec<ImpossibleOrdering>,
    pub skipped: BTreeMap<&'static str, u64>,
    pub totals: Totals,
    pub events: u64,
    pub events_filtered: u64,
    pub race_windows_listed: usize,
    pub input_errors: Vec<InputError>,
    pub notes: Vec<String>,
    pub peak_open_orders: u64,
    /// Orders retired with one debit whose id came back later (joined, not counted twice).
    pub orders_rejoined: u64,
    /// What clock alignment applied per host (absent with `--no-align`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockSection>,
}

/// The JSON `clock` section of LOGS.md.
#[derive(Debug, Clone, Serialize)]
pub struct ClockSection {
    pub hosts: BTreeMap<String, HostClockJson>,
    /// Clock steps found anywhere in the input under the applied clocks.
    pub steps: Vec<ClockStep>,
}

/// One pair of hosts' clocks stepping relative to each other (LOGS.md `clock.steps`).
#[derive(Debug, Clone, Serialize)]
pub struct ClockStep {
    /// The host that stepped, when steps against two or more others agree (else null).
    pub host: Option<String>,
    /// The pair: the second host's clock moved `by_ms` relative to the first's.
    pub hosts: [String; 2],
    pub by_ms: f64,
    /// The first ordering seen after the step.
    pub at: String,
    /// Orderings that bracket the new offset.
    pub orderings: u64,
    /// Whether the stepped host's later times were moved back by the step.
    pub followed: bool,
}

/// One host's (or pair's) step as the notes tell it: (host, the pair's other host when the
/// host cannot be told), how far it moved, the earliest sighting, the hosts it was seen against.
type Sighting = ((u16, Option<u16>), i64, i64, Vec<String>);

/// The clock steps the merge found, and one note per host that stepped (the earliest sighting,
/// and the hosts it was seen against), or per pair when the host cannot be told.
pub fn clock_steps(e: &Engine, tz: TzOffset) -> (Vec<ClockStep>, Vec<String>) {
    let steps = &e.results.drift.steps;
    let name = |h: u16| hosts(e, &[h]).pop().unwrap_or_default();
    let mut seen: Vec<Sighting> = Vec::new();
    let mut out = Vec::new();
    for s in steps {
        let host = crate::analyze::stepped_host(steps, s).or(s.moved);
        let (key, by, other) = match host {
            Some((h, by)) => {
                let o = if s.hosts[0] == h {
                    s.hosts[1]
                } else {
                    s.hosts[0]
                };
                ((h, None), by, name(o))
            }
            None => ((s.hosts[0], Some(s.hosts[1])), s.by_us, String::new()),
        };
        match seen
            .iter_mut()
            .find(|x| x.0 == key && (x.1 - by).abs() <= 2 * MS_US)
        {
            Some(x) => {
                x.2 = x.2.min(s.at_us);
                x.3.push(other);
            }
            None => seen.push((key, by, s.at_us, vec![other])),
        }
        out.push(ClockStep {
            host: host.map(|(h, _)| name(h)),
            hosts: s.hosts.map(name),
            by_ms: ms(s.by_us),
            at: format_rfc3339(s.at_us, tz),
            orderings: s.orderings,
            followed: s.followed,
        });
    }
    let notes = seen
        .into_iter()
        .map(|((a, b), by, at, others)| {
            let at = format_rfc3339(at, tz);
            match b {
                None => format!(
                    "{}: its clock stepped by {:+.1} ms at about {at} (seen against {}); {}",
                    name(a),
                    ms(by),
                    others.join(", "),
                    if steps.iter().any(|p| p.followed && p.hosts.contains(&a)) {
                        "its times from there on were moved back by as much (orders analysed before the step was known keep theirs)"
                    } else {
                        "its times after that are off by as much"
                    }
                ),
                Some(b) => format!(
                    "{} / {}: their clocks stepped by {:+.1} ms relative to each other at about {at}; the times of one of them are off by as much after that",
                    name(a),
                    name(b),
                    ms(by)
                ),
            }
        })
        .collect();
    (out, notes)
}

/// One host's clock as LOGS.md writes it.
#[derive(Debug, Clone, Serialize)]
pub struct HostClockJson {
    /// The zone its zone-less times were read in (`None` when its times carry a zone).
    pub zone: Option<String>,
    pub skew_ms: Option<f64>,
    pub interval_ms: Option<[f64; 2]>,
    pub constraints: u64,
    pub applied: bool,
    /// The host the others were aligned to.
    pub reference: bool,
    /// What placed it (`orderings`, `ledger_ids`, `event_rate`); null when not applied.
    pub evidence: Option<&'static str>,
}

/// `+08:00`, `-05:00`, `+05:30`.
fn zone_name(tz: TzOffset) -> String {
    let sign = if tz.secs < 0 { '-' } else { '+' };
    let m = tz.secs.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

/// The `clock` section from what alignment decided.
pub fn clock_section(a: &crate::align::Alignment) -> ClockSection {
    ClockSection {
        hosts: a
            .hosts
            .iter()
            .map(|h| {
                let j = HostClockJson {
                    zone: h.zone.map(zone_name),
                    skew_ms: h.skew_us.map(ms),
                    interval_ms: h.interval_us.map(|(lo, hi)| [ms(lo), ms(hi)]),
                    constraints: h.constraints,
                    applied: h.applied,
                    reference: h.reference,
                    evidence: h.evidence.map(|e| e.key()),
                };
                (h.host.clone(), j)
            })
            .collect(),
        steps: Vec::new(),
    }
}

fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}

fn hosts(e: &Engine, ids: &[u16]) -> Vec<String> {
    let mut v: Vec<String> = ids
        .iter()
        .map(|&h| {
            e.hosts
                .get(h as usize)
                .cloned()
                .unwrap_or_else(|| "?".into())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn evidence(e: &Engine, ev: &[EvidenceRec], tz: TzOffset) -> Vec<Evidence> {
    ev.iter()
        .map(|x| Evidence {
            file: e
                .files
                .get(x.file as usize)
                .map_or_else(|| "?".into(), |f| f.name.clone()),
            line: x.line as u64,
            ts: format_rfc3339(x.ts, tz),
            event: x.kind.name().into(),
        })
        .collect()
}

fn incident(e: &Engine, i: &IncidentRec, tz: TzOffset) -> Incident {
    Incident {
        order_id: i.order_id.clone(),
        kind: match i.side {
            Side::Deduct => "duplicate_effect".into(),
            Side::Refund => "duplicate_refund".into(),
        },
        effects: i.effects,
        amount_lost: i.amount_lost,
        race_window_ms: i.race_window_us.map(ms),
        first_entry: format_rfc3339(i.first_entry_us, tz),
        second_entry: format_rfc3339(i.second_entry_us, tz),
        hosts: hosts(e, &i.hosts),
        evidence: evidence(e, &i.evidence, tz),
    }
}

fn race(e: &Engine, r: &RaceRec, tz: TzOffset) -> RaceWindow {
    RaceWindow {
        order_id: r.order_id.clone(),
        width_ms: ms(r.width_us),
        requests: r.requests,
        hosts: hosts(e, &r.hosts),
        moved_money: r.moved_money,
        side: match r.side {
            Side::Deduct => "deduct".into(),
            Side::Refund => "refund".into(),
        },
        first_entry: format_rfc3339(r.first_entry_us, tz),
        second_entry: format_rfc3339(r.second_entry_us, tz),
    }
}

/// Builds the report from a finished engine; incidents worst first.
pub fn build(e: &Engine, tz: TzOffset, input_errors: Vec<(String, String)>) -> Report {
    let mut inc: Vec<&IncidentRec> = e.results.incidents.iter().collect();
    inc.sort_by(|a, b| worse(a, b));
    inc.truncate(INCIDENTS_LISTED_MAX);
    let mut races: Vec<&RaceRec> = e.results.races.iter().collect();
    races.sort_by(|a, b| {
        a.first_entry_us
            .cmp(&b.first_entry_us)
            .then(a.order_id.cmp(&b.order_id))
    });
    let skipped: BTreeMap<&'static str, u64> = SkipReason::ALL
        .iter()
        .map(|r| (r.key(), e.counts.skipped[r.index()]))
        .collect();
    let t = e.results.incident_totals;
    let mut notes = e.notes.clone();
    if t.incidents as usize > inc.len() {
        notes.push(format!(
            "{} incidents found; the worst {} are listed",
            t.incidents,
            inc.len()
        ));
    }
    if e.results.races_total as usize > e.results.races.len() {
        notes.push(format!(
            "{} race windows found; the first {} are listed",
            e.results.races_total,
            e.results.races.len()
        ));
    }
    if e.results.timelines_dropped > 0 {
        notes.push(format!(
            "{} orders left out of --trace-out/--html (limit reached)",
            e.results.timelines_dropped
        ));
    }
    let lines_skipped: u64 = e.counts.skipped.iter().sum();
    // Every line is parsed or skipped, exactly once.
    debug_assert_eq!(e.counts.lines_read, e.counts.lines_parsed + lines_skipped);
    Report {
        files: e.files.len(),
        lines_read: e.counts.lines_read,
        lines_parsed: e.counts.lines_parsed,
        lines_skipped,
        orders_seen: e.counts.orders_seen,
        incidents: inc.iter().map(|i| incident(e, i, tz)).collect(),
        race_windows: races.iter().map(|r| race(e, r, tz)).collect(),
        impossible_orderings: e
            .results
            .impossible
            .iter()
            .map(|i| ImpossibleOrdering {
                order_id: i.order_id.clone(),
                kind: i.kind.key().into(),
                by_ms: ms(i.by_us),
                at: format_rfc3339(i.at_us, tz),
                hosts: i.hosts.map(|h| hosts(e, &[h]).pop().unwrap_or_default()),
            })
            .collect(),
        skipped,
        totals: Totals {
            orders_affected: t.orders_affected,
            incidents: t.incidents,
            duplicate_effects: t.duplicate_effects,
            amount_lost: t.amount_lost,
            race_windows: e.results.races_total,
            race_windows_in_incidents: e.results.races_in_incidents,
            impossible_orderings: e.results.impossible_total,
        },
        events: e.counts.events,
        events_filtered: e.counts.events_filtered,
        race_windows_listed: e.results.races.len(),
        input_errors: input_errors
            .into_iter()
            .map(|(file, error)| InputError { file, error })
            .collect(),
        notes,
        peak_open_orders: e.counts.peak_open_orders,
        orders_rejoined: e.counts.orders_rejoined,
        clock: None,
    }
}

/// 1185000 fen → "¥11,850.00".
pub fn yuan(fen: i64) -> String {
    let neg = fen < 0;
    let abs = fen.unsigned_abs();
    let (y, f) = (abs / 100, abs % 100);
    let digits = y.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{}¥{grouped}.{f:02}", if neg { "-" } else { "" })
}

fn window(w: Option<f64>) -> String {
    match w {
        Some(w) => format!("race window {w:.1} ms"),
        None => "no overlap".into(),
    }
}

/// Rows of incidents shown one by one in the text report.
const TEXT_INCIDENTS_MAX: usize = 200;
/// Incidents whose evidence lines are printed.
const TEXT_EVIDENCE_INCIDENTS_MAX: usize = 5;
/// Widest race windows printed.
const TEXT_RACES_MAX: usize = 10;

/// Writes the report a person reads.
pub fn write_text(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "payguard forensics: {} files, {} lines read, {} parsed, {} skipped, {} order events, {} orders seen",
        r.files, r.lines_read, r.lines_parsed, r.lines_skipped, r.events, r.orders_seen
    )?;
    write_clock(r, out)?;
    writeln!(out)?;
    write_incidents(r, out)?;
    writeln!(out)?;
    write_race_windows(r, out)?;
    writeln!(out)?;
    write_impossible(r, out)?;
    write_totals(r, out)
}

/// One line per host whose clock alignment applied something or could not.
fn write_clock(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let Some(c) = &r.clock else { return Ok(()) };
    if c.hosts.len() < 2 {
        return Ok(());
    }
    for (host, h) in &c.hosts {
        let zone = h
            .zone
            .as_deref()
            .map_or(String::new(), |z| format!("zone {z}, "));
        let line = match (h.applied, h.reference, h.skew_ms, h.interval_ms) {
            (true, true, _, _) => format!("{zone}reference clock"),
            (true, false, _, Some([lo, hi])) if h.evidence == Some("event_rate") => format!(
                "{zone}from the event rate alone (weak: its skew is only known within [{lo:+.0}, {hi:+.0}] ms) (applied)"
            ),
            (true, false, Some(s), Some([lo, hi])) => format!(
                "{zone}skew {s:+.1} ms [{lo:+.1}, {hi:+.1}] from {} cross-host {} (applied)",
                h.constraints,
                match h.evidence {
                    Some("ledger_ids") => "orderings and ledger-id steps (ledger ids: no ordering of its own)",
                    _ => "orderings",
                }
            ),
            _ => format!(
                "{zone}left alone: evidence too thin or contradicting ({} cross-host orderings; see notes)",
                h.constraints
            ),
        };
        writeln!(out, "clock {host}: {line}")?;
    }
    Ok(())
}

/// The incidents, worst first, and the evidence lines of the worst.
fn write_incidents(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    if r.incidents.is_empty() {
        writeln!(out, "INCIDENTS: none (no order was debited more than once)")?;
    } else {
        writeln!(out, "INCIDENTS: {} (worst first)", r.totals.incidents)?;
        for (n, i) in r.incidents.iter().take(TEXT_INCIDENTS_MAX).enumerate() {
            writeln!(
                out,
                "  {:>3}. {}  {}  {} effects  lost {} ({} fen)  {}  entries {} / {}  hosts {}",
                n + 1,
                i.order_id,
                i.kind,
                i.effects,
                yuan(i.amount_lost),
                i.amount_lost,
                window(i.race_window_ms),
                i.first_entry,
                i.second_entry,
                i.hosts.join(",")
            )?;
        }
        if r.incidents.len() > TEXT_INCIDENTS_MAX {
            writeln!(
                out,
                "  … {} more (use --json)",
                r.incidents.len() - TEXT_INCIDENTS_MAX
            )?;
        }
        writeln!(out)?;
        for i in r.incidents.iter().take(TEXT_EVIDENCE_INCIDENTS_MAX) {
            writeln!(out, "  evidence for {}:", i.order_id)?;
            for e in &i.evidence {
                writeln!(out, "    {}:{}  {}  {}", e.file, e.line, e.ts, e.event)?;
            }
        }
    }
    Ok(())
}

/// Impossible orderings printed one by one.
const TEXT_IMPOSSIBLE_MAX: usize = 10;

/// Broken orderings under the applied clocks, when there are any.
fn write_impossible(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    if r.totals.impossible_orderings == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "IMPOSSIBLE ORDERINGS (under the applied clocks: a host's clock jumped, or the logs are not what they claim): {}",
        r.totals.impossible_orderings
    )?;
    for i in r.impossible_orderings.iter().take(TEXT_IMPOSSIBLE_MAX) {
        let what = match i.kind.as_str() {
            "replay_before_commit" => format!(
                "replay on {} {:.1} ms before the commit on {}",
                i.hosts[1], i.by_ms, i.hosts[0]
            ),
            _ => format!(
                "lock held on {} and {} at once for {:.1} ms",
                i.hosts[0], i.hosts[1], i.by_ms
            ),
        };
        writeln!(out, "  {}  {}  at {}", i.order_id, what, i.at)?;
    }
    writeln!(out)
}

/// The count of healthy race windows, their widths, and the widest.
fn write_race_windows(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "RACE WINDOWS (requests in flight at once that moved money at most once): {}",
        r.totals.race_windows
    )?;
    if !r.race_windows.is_empty() {
        let mut widest: Vec<&RaceWindow> = r.race_windows.iter().collect();
        widest.sort_by(|a, b| b.width_ms.total_cmp(&a.width_ms));
        let widths: Vec<f64> = {
            let mut w: Vec<f64> = r.race_windows.iter().map(|x| x.width_ms).collect();
            w.sort_by(f64::total_cmp);
            w
        };
        let median = widths[widths.len() / 2];
        writeln!(
            out,
            "  width: median {median:.1} ms, max {:.1} ms; moved money once: {}, never: {}",
            widths[widths.len() - 1],
            r.race_windows.iter().filter(|x| x.moved_money == 1).count(),
            r.race_windows.iter().filter(|x| x.moved_money == 0).count()
        )?;
        for w in widest.iter().take(TEXT_RACES_MAX) {
            writeln!(
                out,
                "    {}  {:.1} ms  {} requests  moved money {}  hosts {}  at {}",
                w.order_id,
                w.width_ms,
                w.requests,
                w.moved_money,
                w.hosts.join(","),
                w.first_entry
            )?;
        }
    }
    if r.totals.race_windows_in_incidents > 0 {
        writeln!(
            out,
            "  plus {} race windows inside incidents (shown above)",
            r.totals.race_windows_in_incidents
        )?;
    }
    Ok(())
}

/// Totals, skipped lines, filtered events, damaged inputs and notes.
fn write_totals(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "TOTALS: orders affected {}, duplicate effects {}, amount lost {} ({} fen), race windows {}",
        r.totals.orders_affected,
        r.totals.duplicate_effects,
        yuan(r.totals.amount_lost),
        r.totals.amount_lost,
        r.totals.race_windows
    )?;
    let sk: Vec<String> = r.skipped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(out, "SKIPPED LINES: {}", sk.join(", "))?;
    if r.events_filtered > 0 {
        writeln!(
            out,
            "FILTERED (--since/--until): {} events",
            r.events_filtered
        )?;
    }
    for e in &r.input_errors {
        writeln!(
            out,
            "DAMAGED INPUT: {}: {} (lines before the damage were analysed)",
            e.file, e.error
        )?;
    }
    for n in &r.notes {
        writeln!(out, "NOTE: {n}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::yuan;

    #[test]
    fn money_in_yuan() {
        assert_eq!(yuan(1_185_000), "¥11,850.00");
        assert_eq!(yuan(5), "¥0.05");
        assert_eq!(yuan(123_456_789), "¥1,234,567.89");
        assert_eq!(yuan(-100), "-¥1.00");
    }
}
