//! The `payguard forensics` flags (CLI.md), as a `clap::Args` the `payguard` binary can flatten.
//!
//! Why: one definition serves both the standalone `payguard-forensics` binary and the
//! `forensics` subcommand, so names, defaults and `PAYGUARD_<FLAG>` variables cannot drift.

use std::path::PathBuf;

use clap::Args;

use crate::clock::TzOffset;

/// `HOST=N`: add N milliseconds (may be negative) to every time of HOST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skew {
    pub host: String,
    pub ms: i64,
}

impl std::str::FromStr for Skew {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, ms) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("expected HOST=MILLISECONDS, got {s:?}"))?;
        let ms = ms
            .trim()
            .trim_end_matches("ms")
            .parse::<i64>()
            .map_err(|e| format!("milliseconds in {s:?}: {e}"))?;
        if host.is_empty() {
            return Err(format!("empty host in {s:?}"));
        }
        Ok(Skew {
            host: host.to_string(),
            ms,
        })
    }
}

fn parse_date(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|e| format!("expected YYYY-MM-DD: {e}"))
}

/// Race reconstruction from logs: finds duplicate debits (incidents) and race windows.
///
/// Exit status: 0 no incident, 1 incidents found, 2 bad usage or input that could not be read.
#[derive(Debug, Clone, Args)]
pub struct ForensicsArgs {
    /// Log files, folders (read recursively), .gz and .zst files, or - for standard input.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,

    /// Print the findings as JSON instead of a report for a person
    /// (PAYGUARD_JSON accepts 1/0, true/false, yes/no, on/off).
    #[arg(long, env = "PAYGUARD_JSON", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,

    /// Write a Chrome trace (open it in Perfetto): one track per host, one slice per request.
    #[arg(long, value_name = "FILE", env = "PAYGUARD_TRACE_OUT")]
    pub trace_out: Option<PathBuf>,

    /// Write a self-contained HTML page with timelines of the worst incidents.
    #[arg(long, value_name = "FILE", env = "PAYGUARD_HTML")]
    pub html: Option<PathBuf>,

    /// Add N milliseconds (may be negative) to every time of HOST before merging; repeatable
    /// (in the environment: comma-separated).
    #[arg(
        long,
        value_name = "HOST=N",
        env = "PAYGUARD_SKEW",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub skew: Vec<Skew>,

    /// Zone of times written without one: UTC or a fixed offset like +08:00 [default: UTC,
    /// or the zone inferred per host unless --no-align].
    #[arg(long, value_name = "ZONE", env = "PAYGUARD_TZ")]
    pub tz: Option<TzOffset>,

    /// Date of times written without one when no dated line is in the same file.
    #[arg(long, value_name = "YYYY-MM-DD", env = "PAYGUARD_DATE", value_parser = parse_date)]
    pub date: Option<chrono::NaiveDate>,

    /// Ignore events before this time (RFC 3339, or "YYYY-MM-DD HH:MM:SS" in --tz, or a date).
    #[arg(long, value_name = "TIME", env = "PAYGUARD_SINCE")]
    pub since: Option<String>,

    /// Ignore events after this time (same forms as --since).
    #[arg(long, value_name = "TIME", env = "PAYGUARD_UNTIL")]
    pub until: Option<String>,

    /// Do not infer host clock offsets (zones of zone-less times, skews) from the logs.
    #[arg(long, env = "PAYGUARD_NO_ALIGN", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_align: bool,

    /// Look at this order only.
    #[arg(long, value_name = "ID", env = "PAYGUARD_ORDER")]
    pub order: Option<String>,

    /// Bytes clock alignment reads from the start of each file to infer the clocks (default
    /// 8 MiB); a clock step after them is still found by the merge, which reads everything.
    #[arg(long, value_name = "BYTES", env = "PAYGUARD_ALIGN_SAMPLE_BYTES",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub align_sample_bytes: Option<u64>,
}

impl ForensicsArgs {
    /// The zone of times written without one, as given (UTC when not).
    pub fn tz(&self) -> TzOffset {
        self.tz.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: ForensicsArgs,
    }

    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from([
            "x",
            "a.log",
            "-",
            "--skew",
            "pay-2=-5",
            "--skew",
            "pay-3=7",
            "--tz",
            "+08:00",
            "--date",
            "2024-05-17",
            "--order",
            "O1",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.a.paths, vec!["a.log", "-"]);
        assert_eq!(
            c.a.skew[0],
            Skew {
                host: "pay-2".into(),
                ms: -5
            }
        );
        assert_eq!(c.a.tz().secs, 8 * 3600);
        assert!(!c.a.no_align);
        assert!(c.a.json);
        assert!(Cli::try_parse_from(["x", "a.log", "--tz", "Mars/Base"]).is_err());
        assert!(Cli::try_parse_from(["x", "a.log", "--skew", "nohost"]).is_err());
        assert!(Cli::try_parse_from(["x"]).is_err());
    }
}
