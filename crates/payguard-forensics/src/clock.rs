//! Log timestamps: fast parsing on the hot path, zone and date rules, and RFC 3339 output.
//!
//! Why: every line's time is read, so parsing is hand-written over bytes (no allocation); the
//! rules for lines without a zone or without a date (LOGS.md) live here so they are tested once.
//! All times are microseconds since the Unix epoch, UTC, in an `i64`.

use crate::limits::MIDNIGHT_ROLLOVER_JUMP_MS;

/// Microseconds in a day.
pub const DAY_US: i64 = 86_400_000_000;
/// Microseconds in a millisecond.
pub const MS_US: i64 = 1_000;

/// A time as written on a line, before zone and date rules are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTime {
    /// Absolute: the line had a date and a zone.
    Utc(i64),
    /// A date and time without a zone: microseconds since epoch as if it were UTC; read in `--tz`.
    Local(i64),
    /// Only a time of day (microseconds since midnight), read in `--tz` on an inferred date.
    TimeOfDay(i64),
}

/// A fixed UTC offset, parsed from `--tz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TzOffset {
    /// Seconds east of UTC.
    pub secs: i32,
}

impl std::str::FromStr for TzOffset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let u = t.to_ascii_uppercase();
        if u == "UTC" || u == "Z" || u == "GMT" || u == "ETC/UTC" {
            return Ok(TzOffset { secs: 0 });
        }
        let rest = u
            .strip_prefix("UTC")
            .or_else(|| u.strip_prefix("GMT"))
            .unwrap_or(&u);
        parse_offset(rest.as_bytes())
            .map(|secs| TzOffset { secs })
            .ok_or_else(|| {
                "expected UTC or a fixed offset like +08:00, -0530 or UTC+8 (named zones are not supported)"
                    .to_string()
            })
    }
}

impl TzOffset {
    /// The offset in microseconds.
    pub fn us(self) -> i64 {
        self.secs as i64 * 1_000_000
    }
}

fn parse_offset(b: &[u8]) -> Option<i32> {
    let (sign, rest) = match b.first()? {
        b'+' => (1, &b[1..]),
        b'-' => (-1, &b[1..]),
        _ => return None,
    };
    let (h, m) = match rest.len() {
        1 | 2 => (num(rest)?, 0),
        4 => (num(&rest[..2])?, num(&rest[2..])?),
        5 if rest[2] == b':' => (num(&rest[..2])?, num(&rest[3..])?),
        _ => return None,
    };
    if h > 18 || m > 59 {
        return None;
    }
    Some(sign * (h as i32 * 3600 + m as i32 * 60))
}

fn num(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `HH:MM:SS[.frac]` at the start of `b`; returns microseconds since midnight and bytes used.
fn parse_tod(b: &[u8]) -> Option<(i64, usize)> {
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h = num(&b[0..2])?;
    let m = num(&b[3..5])?;
    let s = num(&b[6..8])?;
    if h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut us = ((h * 60 + m) * 60 + s) * 1_000_000;
    let mut i = 8;
    if i < b.len() && (b[i] == b'.' || b[i] == b',') {
        i += 1;
        let start = i;
        let mut frac: i64 = 0;
        let mut digits = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            if digits < 6 {
                frac = frac * 10 + (b[i] - b'0') as i64;
                digits += 1;
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        while digits < 6 {
            frac *= 10;
            digits += 1;
        }
        us += frac;
    }
    Some((us, i))
}

/// Parses a whole timestamp token: `YYYY-MM-DD[T ]HH:MM:SS[.frac][Z|±HH:MM]`, `HH:MM:SS[.frac]`,
/// or (for JSON numbers) epoch seconds/milliseconds/microseconds. Anything else is `None`.
pub fn parse_time(b: &[u8]) -> Option<RawTime> {
    if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
        let y = num(&b[0..4])?;
        let mo = num(&b[5..7])?;
        let d = num(&b[8..10])?;
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
            return None;
        }
        let day = days_from_civil(y, mo, d);
        if b.len() == 10 {
            return Some(RawTime::Local(day * DAY_US));
        }
        if b[10] != b'T' && b[10] != b't' && b[10] != b' ' {
            return None;
        }
        let (tod, used) = parse_tod(&b[11..])?;
        let rest = &b[11 + used..];
        let naive = day * DAY_US + tod;
        return match rest {
            [] => Some(RawTime::Local(naive)),
            [b'Z'] | [b'z'] => Some(RawTime::Utc(naive)),
            _ => {
                let rest = if rest[0] == b' ' { &rest[1..] } else { rest };
                if rest == b"UTC" {
                    return Some(RawTime::Utc(naive));
                }
                let off = parse_offset(rest)?;
                Some(RawTime::Utc(naive - off as i64 * 1_000_000))
            }
        };
    }
    if b.len() >= 8 && b[2] == b':' {
        let (tod, used) = parse_tod(b)?;
        if used == b.len() {
            return Some(RawTime::TimeOfDay(tod));
        }
        return None;
    }
    // Epoch seconds with a fraction: `1700000000.123`.
    if let Some(dot) = b.iter().position(|&c| c == b'.') {
        let secs = num(&b[..dot])?;
        let frac = &b[dot + 1..];
        if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) || secs >= 100_000_000_000 {
            return None;
        }
        let mut us = 0i64;
        for i in 0..6 {
            us = us * 10 + frac.get(i).map_or(0, |c| (c - b'0') as i64);
        }
        return Some(RawTime::Utc(secs * 1_000_000 + us));
    }
    // Epoch numbers, told apart by magnitude (seconds until year 5138, then ms, then us).
    let n = num(b)?;
    if n < 100_000_000_000 {
        Some(RawTime::Utc(n * 1_000_000))
    } else if n < 100_000_000_000_000 {
        Some(RawTime::Utc(n * 1_000))
    } else {
        Some(RawTime::Utc(n))
    }
}

/// Per-file state for the "time without a date" rule: the previous line's local day and time of day.
#[derive(Debug, Clone, Copy, Default)]
pub struct DateRef {
    pub at: Option<RefTime>,
}

/// The reference line of a [`DateRef`].
#[derive(Debug, Clone, Copy)]
pub enum RefTime {
    /// A dated line's local time (us since epoch in `--tz`), kept whole: every dated line moves
    /// the reference, and only a dateless one needs its day and time of day.
    Local(i64),
    /// The local day (days since epoch) and time of day (us) a dateless line was placed at.
    Placed { day: i64, tod: i64 },
}

impl DateRef {
    /// Records a line whose absolute local time (us since epoch in `--tz`) is known.
    pub fn see_local(&mut self, local_us: i64) {
        self.at = Some(RefTime::Local(local_us));
    }

    /// Gives a time of day the day of the reference line, crossing midnight when the clock jumps
    /// by more than [`MIDNIGHT_ROLLOVER_JUMP_MS`]; returns local us since epoch and moves the reference.
    pub fn place(&mut self, tod_us: i64) -> Option<i64> {
        let (day, ref_tod) = match self.at? {
            RefTime::Local(l) => (l.div_euclid(DAY_US), l.rem_euclid(DAY_US)),
            RefTime::Placed { day, tod } => (day, tod),
        };
        let jump = MIDNIGHT_ROLLOVER_JUMP_MS * MS_US;
        let day = if ref_tod - tod_us > jump {
            day + 1
        } else if tod_us - ref_tod > jump {
            day - 1
        } else {
            day
        };
        self.at = Some(RefTime::Placed { day, tod: tod_us });
        Some(day * DAY_US + tod_us)
    }
}

/// Formats a UTC time as RFC 3339 with milliseconds (and microseconds when present) in `tz`.
pub fn format_rfc3339(us: i64, tz: TzOffset) -> String {
    use chrono::{DateTime, FixedOffset, SecondsFormat};
    let Some(off) = FixedOffset::east_opt(tz.secs) else {
        return us.to_string();
    };
    let Some(dt) = DateTime::from_timestamp_micros(us) else {
        return us.to_string();
    };
    let dt = dt.with_timezone(&off);
    let fmt = if us.rem_euclid(1000) == 0 {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Micros
    };
    dt.to_rfc3339_opts(fmt, true)
}

/// Parses `--since`/`--until`: RFC 3339, or a date and time read in `tz`, or a bare date (midnight).
pub fn parse_bound(s: &str, tz: TzOffset) -> Option<i64> {
    match parse_time(s.trim().as_bytes())? {
        RawTime::Utc(us) => Some(us),
        RawTime::Local(us) => Some(us - tz.us()),
        RawTime::TimeOfDay(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_formats() {
        let z = parse_time(b"2026-11-26T02:16:43.882Z").unwrap();
        let RawTime::Utc(us) = z else { panic!() };
        assert_eq!(
            format_rfc3339(us, TzOffset::default()),
            "2026-11-26T02:16:43.882Z"
        );
        let p = parse_time(b"2026-11-26T10:16:43.882+08:00").unwrap();
        assert_eq!(p, z);
        assert_eq!(
            parse_time(b"02:16:43.882"),
            Some(RawTime::TimeOfDay(
                ((2 * 60 + 16) * 60 + 43) * 1_000_000 + 882_000
            ))
        );
        assert!(matches!(
            parse_time(b"2026-11-26 02:16:43"),
            Some(RawTime::Local(_))
        ));
        assert_eq!(parse_time(b"02:16"), None);
        assert_eq!(parse_time(b"2026-13-26T02:16:43Z"), None);
        assert_eq!(
            parse_time(b"1700000000000"),
            Some(RawTime::Utc(1_700_000_000_000_000))
        );
    }

    #[test]
    fn offsets() {
        assert_eq!("UTC".parse::<TzOffset>().unwrap().secs, 0);
        assert_eq!("+08:00".parse::<TzOffset>().unwrap().secs, 8 * 3600);
        assert_eq!("UTC+8".parse::<TzOffset>().unwrap().secs, 8 * 3600);
        assert_eq!(
            "-0530".parse::<TzOffset>().unwrap().secs,
            -(5 * 3600 + 1800)
        );
        assert!("Asia/Shanghai".parse::<TzOffset>().is_err());
    }

    #[test]
    fn midnight_rollover_both_ways() {
        let mut r = DateRef::default();
        r.see_local(10 * DAY_US + 23 * 3_600_000_000 + 59 * 60_000_000);
        assert_eq!(r.place(60_000_000), Some(11 * DAY_US + 60_000_000));
        // Back before midnight relative to 00:01 on day 11: day 10.
        assert_eq!(
            r.place(23 * 3_600_000_000),
            Some(10 * DAY_US + 23 * 3_600_000_000)
        );
        assert_eq!(
            r.place(23 * 3_600_000_000 + 5),
            Some(10 * DAY_US + 23 * 3_600_000_000 + 5)
        );
    }
}
