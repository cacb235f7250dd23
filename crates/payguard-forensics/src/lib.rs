//! payguard-forensics: race reconstruction from payment logs.
//!
//! Reads logs of many hosts in many formats (LOGS.md), merges them by time per order, and finds
//! duplicate effects (an order debited more than once: an incident) and race windows (two
//! requests for one order in flight at once). It exists so that a double charge can be proved
//! from logs alone, after the fact, without the engine: this crate never imports it.
//!
//! Pipeline: [`align`] samples a bounded prefix of every file and infers each host's zone and
//! clock skew (the merge starts from the parsed sample) → [`input`] reads bounded chunks → [`parse`] classifies lines in parallel →
//! [`engine`] resolves times and merges events per order, retiring finished orders →
//! [`analyze`] reconstructs each order → [`report`], [`trace`] and [`html`] write the findings.
#![forbid(unsafe_code)]

pub mod align;
pub mod analyze;
pub mod args;
pub mod clock;
pub mod engine;
pub mod error;
pub mod html;
pub mod input;
pub mod limits;
pub mod parse;
pub mod report;
pub mod trace;

use std::io::Write;

pub use args::{ForensicsArgs, Skew};
pub use error::ForensicsError;

use crate::clock::{days_from_civil, parse_bound, MS_US};
use crate::engine::{read_round, Config, Engine};
use crate::input::{list_inputs, Source};
use crate::parse::LineParser;

/// Runs forensics and writes the report (or JSON) to `out`; returns the exit status:
/// 0 no incident, 1 incidents found, 2 bad usage or input that could not be read at all
/// (with a message on stderr saying which and why).
pub fn run(args: &ForensicsArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    match run_inner(args, out) {
        Ok(code) => Ok(code),
        Err(Fail::Usage(errs)) => {
            for e in errs {
                eprintln!("payguard forensics: {e}");
            }
            Ok(2)
        }
        Err(Fail::Other(e)) => Err(e),
    }
}

enum Fail {
    Usage(Vec<ForensicsError>),
    Other(anyhow::Error),
}

impl From<ForensicsError> for Fail {
    fn from(e: ForensicsError) -> Self {
        match e {
            ForensicsError::Output { .. } => Fail::Other(e.into()),
            _ => Fail::Usage(vec![e]),
        }
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Other(e.into())
    }
}

fn bound(
    flag: &'static str,
    v: &Option<String>,
    args: &ForensicsArgs,
) -> Result<Option<i64>, ForensicsError> {
    match v {
        None => Ok(None),
        Some(s) => parse_bound(s, args.tz())
            .map(Some)
            .ok_or_else(|| ForensicsError::BadFlag {
                flag,
                value: s.clone(),
                reason: "expected RFC 3339, \"YYYY-MM-DD HH:MM:SS\" or YYYY-MM-DD".into(),
            }),
    }
}

fn run_inner(args: &ForensicsArgs, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut cfg = config(args)?;
    let files = list_inputs(&args.paths).map_err(Fail::Usage)?;
    check_inputs(&files)?;
    let parser = LineParser::new(args.order.as_deref());
    let (alignment, sampled) = match args.no_align {
        true => (None, None),
        false => {
            let (a, s) = align_clocks(args, &files, &mut cfg);
            (Some(a), s)
        }
    };
    let (mut sources, rounds) = match sampled {
        Some(s) => (s.sources, s.rounds),
        None => (
            files
                .iter()
                .enumerate()
                .map(|(i, f)| Source::new(i as u16, f))
                .collect(),
            Vec::new(),
        ),
    };
    let mut engine = Engine::new(cfg, files);
    if let Some(a) = &alignment {
        engine.notes.extend(a.notes.iter().cloned());
    }
    merge_all(&mut sources, rounds, &parser, &mut engine);

    let input_errors: Vec<(String, String)> = sources
        .iter()
        .filter_map(|s| {
            s.error
                .as_ref()
                .map(|e| (engine.files[s.file as usize].name.clone(), e.clone()))
        })
        .collect();
    for (f, e) in &input_errors {
        eprintln!("payguard forensics: {f}: {e} (lines read before the damage were analysed)");
    }
    let mut rep = report::build(&engine, args.tz(), input_errors);
    rep.clock = alignment.as_ref().map(report::clock_section);
    let (steps, step_notes) = report::clock_steps(&engine, args.tz());
    rep.notes.extend(step_notes);
    if let Some(c) = &mut rep.clock {
        c.steps = steps;
    }
    write_outputs(args, &engine, &rep, out)?;
    Ok(if rep.totals.incidents == 0 { 0 } else { 1 })
}

/// The engine's settings from the flags.
fn config(args: &ForensicsArgs) -> Result<Config, Fail> {
    use chrono::Datelike;
    Ok(Config {
        tz: args.tz(),
        date_day: args
            .date
            .map(|d| days_from_civil(d.year() as i64, d.month() as i64, d.day() as i64)),
        since_us: bound("--since", &args.since, args)?,
        until_us: bound("--until", &args.until, args)?,
        order: args.order.clone(),
        skew_us: args
            .skew
            .iter()
            .map(|s| (s.host.clone(), s.ms.saturating_mul(MS_US)))
            .collect(),
        file_zone: Vec::new(),
        timelines: args.trace_out.is_some() || args.html.is_some(),
        follow_clock_steps: !args.no_align,
    })
}

/// Infers the hosts' clocks from a bounded sample of the inputs (see [`align`]) and puts the
/// applied zones and skews into the merge's settings; the user's `--skew` stay (they win).
/// Gives back what was sampled when the merge can take it as it is.
fn align_clocks(
    args: &ForensicsArgs,
    files: &[input::FileInfo],
    cfg: &mut Config,
) -> (align::Alignment, Option<align::Sampled>) {
    let user = align::UserClock {
        tz: args.tz,
        skew_us: cfg.skew_us.clone(),
    };
    let bytes_per_file = args
        .align_sample_bytes
        .unwrap_or(limits::CLOCK_SAMPLE_BYTES_PER_FILE);
    let limits = align::SampleLimits {
        bytes_per_file,
        // `--order` narrows the merge's parse to one order, so its pieces are not the sample's.
        keep: args.order.is_none()
            && (files.len() as u64).saturating_mul(bytes_per_file)
                <= limits::CLOCK_SAMPLE_KEPT_BYTES_MAX,
    };
    // Alignment needs every order's evidence, whatever `--order` says.
    let (ev, sampled) = align::sample(files, &LineParser::new(None), &user, limits);
    let t = std::time::Instant::now();
    let mut a = align::solve(&ev, &user);
    if std::env::var_os("PAYGUARD_FORENSICS_TIMING").is_some() {
        let (read, evidence) = ev.timing;
        eprintln!(
            "timing: align: sample read+parse {read:?}, evidence {evidence:?}, solve {:?}",
            t.elapsed()
        );
    }
    // With standard input the only input there is nothing to align it with.
    for f in ev.unsampled.iter().filter(|_| files.len() > 1) {
        a.notes.push(format!(
            "{f}: standard input is read once, so it was not sampled for clock alignment"
        ));
    }
    let inferred: Vec<(String, i64)> = a
        .applied_skews()
        .filter(|(h, _)| user.skew_us.iter().all(|(u, _)| u != h))
        .map(|(h, s)| (h.to_string(), s))
        .collect();
    // User skews last: the last entry of a host wins.
    let mut skews = inferred;
    skews.append(&mut cfg.skew_us);
    cfg.skew_us = skews;
    cfg.file_zone = a.file_zone.clone();
    (a, sampled)
}

/// At most `files_max` inputs, and standard input at most once.
fn check_inputs(files: &[input::FileInfo]) -> Result<(), Fail> {
    if files.len() > limits::FILES_MAX {
        return Err(ForensicsError::TooMany {
            what: "input files",
            limit: limits::FILES_MAX,
        }
        .into());
    }
    if files
        .iter()
        .filter(|f| matches!(f.origin, input::Origin::Stdin))
        .count()
        > 1
    {
        return Err(ForensicsError::BadFlag {
            flag: "PATH",
            value: "-".into(),
            reason: "standard input can be read once".into(),
        }
        .into());
    }
    Ok(())
}

/// Reads, parses and merges every input, then finishes the engine. `sampled` are rounds the
/// clock alignment already read and parsed (the sources go on after them): merged first.
fn merge_all(
    sources: &mut [Source],
    sampled: Vec<align::Round>,
    parser: &LineParser,
    engine: &mut Engine,
) {
    let (mut t_ingest, mut t_read, mut rounds) =
        (std::time::Duration::ZERO, std::time::Duration::ZERO, 0u64);
    let mut sampled = sampled.into_iter();
    let mut read_round = |sources: &mut [Source], marks: &[Option<i64>]| match sampled.next() {
        Some((p, o)) => (p, o, true),
        None => read_round(sources, parser, marks),
    };
    // Two stages overlap: while one thread merges round k (the engine has one owner), the pool
    // reads and parses round k+1, choosing files by the watermarks of round k-1.
    let (mut pieces, mut overlong, mut more) = read_round(sources, &engine.watermarks());
    while more {
        let marks = engine.watermarks();
        let cur = std::mem::take(&mut pieces);
        let cur_over = std::mem::take(&mut overlong);
        let ((ti, ()), (tr, next)) = rayon::join(
            || {
                let t = std::time::Instant::now();
                engine.ingest(cur, &cur_over);
                (t.elapsed(), ())
            },
            || {
                let t = std::time::Instant::now();
                let r = read_round(sources, &marks);
                (t.elapsed(), r)
            },
        );
        t_ingest += ti;
        t_read += tr;
        rounds += 1;
        (pieces, overlong, more) = next;
    }
    engine.ingest(pieces, &overlong);
    engine.finish();
    if std::env::var_os("PAYGUARD_FORENSICS_TIMING").is_some() {
        eprintln!("timing: rounds {rounds}, ingest {t_ingest:?}, read+parse {t_read:?}");
    }
}

/// The report (text or JSON) to `out`, and the trace and page when asked for.
fn write_outputs(
    args: &ForensicsArgs,
    engine: &Engine,
    rep: &report::Report,
    out: &mut dyn Write,
) -> Result<(), Fail> {
    if args.json {
        serde_json::to_writer_pretty(&mut *out, rep).map_err(|e| Fail::Other(e.into()))?;
        writeln!(out)?;
    } else {
        report::write_text(rep, out)?;
    }
    if let Some(p) = &args.trace_out {
        trace::write(p, engine, args.tz())?;
    }
    if let Some(p) = &args.html {
        html::write(p, engine, rep, args.tz())?;
    }
    out.flush()?;
    Ok(())
}
