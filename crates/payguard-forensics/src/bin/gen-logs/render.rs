//! How one log line looks in each of the five formats, and the time stamps they use.
//!
//! Why apart: the generator decides what happens (which events, when, on which host); this
//! decides only how it is written, so both can be read on their own.

fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2026-11-26T02:16:43.882Z`
pub(crate) fn rfc3339(us: i64) -> String {
    let ms = us.div_euclid(1000);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// `02:16:43.882`
fn tod(us: i64) -> String {
    let rem = us.div_euclid(1000).rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Fmt {
    Plain,
    Text,
    Json,
    Tracing,
    Logfmt,
}

pub(crate) struct Line<'a> {
    pub(crate) ts: i64,
    pub(crate) level: &'a str,
    pub(crate) event: &'a str,
    pub(crate) oid: &'a str,
    pub(crate) req: Option<&'a str>,
    pub(crate) host: &'a str,
    pub(crate) extra: &'a [(&'a str, String)],
}

/// How one host's clock writes times: `shift_us` added to the true time (zone and skew), and
/// whether the zone is left out (local time without a zone).
pub(crate) struct HostClock {
    pub(crate) host: String,
    pub(crate) shift_us: i64,
    pub(crate) zone_less: bool,
    /// A clock step: from this true time on, the clock is `step_us` further off.
    pub(crate) step_from_us: i64,
    pub(crate) step_us: i64,
}

/// Set once by `main` from `--local` and `--skew`; hosts not listed write true UTC with `Z`.
pub(crate) static CLOCKS: std::sync::OnceLock<Vec<HostClock>> = std::sync::OnceLock::new();

/// A line's time as its host writes it: the written instant and whether to drop the zone.
fn host_time(host: &str, ts: i64) -> (i64, bool) {
    match CLOCKS.get().and_then(|v| v.iter().find(|c| c.host == host)) {
        Some(c) => {
            let step = if ts >= c.step_from_us { c.step_us } else { 0 };
            (ts + c.shift_us + step, c.zone_less)
        }
        None => (ts, false),
    }
}

/// Set once by `main` from `--ledger-ids`.
pub(crate) static LEDGER_IDS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A commit's fields with its entry id from the shared sequence: the id's letter, then the true
/// commit time in microseconds (so a higher id was committed later, on whatever host).
fn with_ledger_id<'a>(l: &Line<'a>) -> Option<Vec<(&'a str, String)>> {
    if !LEDGER_IDS.get().copied().unwrap_or(false) || !l.event.ends_with("_commit") {
        return None;
    }
    let id = |v: &String| format!("{}{}", &v[..1], l.ts);
    Some(
        l.extra
            .iter()
            .map(|(k, v)| (*k, if *k == "entry" { id(v) } else { v.clone() }))
            .collect(),
    )
}

pub(crate) fn render(f: Fmt, l: &Line<'_>) -> String {
    let mut s = String::with_capacity(200);
    let ids = with_ledger_id(l);
    let extra: &[(&str, String)] = ids.as_deref().unwrap_or(l.extra);
    let (ts, zone_less) = host_time(l.host, l.ts);
    let mut stamp = rfc3339(ts);
    if zone_less {
        stamp.pop();
    }
    let is_num = |k: &str| {
        matches!(
            k,
            "amount" | "balance_after" | "dur_ms" | "entries" | "token"
        )
    };
    match f {
        Fmt::Plain => {
            s.push_str(&format!(
                "{} [{}] {}: oid={}",
                tod(ts),
                l.level,
                l.event,
                l.oid
            ));
            for (k, v) in extra {
                s.push_str(&format!(", {k}={v}"));
            }
        }
        Fmt::Text => {
            s.push_str(&format!(
                "{} [{}] {}: oid={}",
                stamp, l.level, l.event, l.oid
            ));
            for (k, v) in extra {
                s.push_str(&format!(", {k}={v}"));
            }
            if let Some(r) = l.req {
                s.push_str(&format!(", req={r}"));
            }
            s.push_str(&format!(", inst={}", l.host));
        }
        Fmt::Json | Fmt::Tracing => {
            let mut fields = format!("\"oid\":\"{}\"", l.oid);
            for (k, v) in extra {
                if is_num(k) {
                    fields.push_str(&format!(",\"{k}\":{v}"));
                } else {
                    fields.push_str(&format!(",\"{k}\":\"{v}\""));
                }
            }
            if let Some(r) = l.req {
                fields.push_str(&format!(",\"req\":\"{r}\""));
            }
            fields.push_str(&format!(",\"inst\":\"{}\"", l.host));
            if f == Fmt::Json {
                s.push_str(&format!(
                    "{{\"ts\":\"{}\",\"level\":\"{}\",\"event\":\"{}\",{fields}}}",
                    stamp, l.level, l.event
                ));
            } else {
                s.push_str(&format!(
                    "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"fields\":{{\"message\":\"{}\",{fields}}},\"target\":\"payguard::engine\"}}",
                    stamp,
                    l.level,
                    l.event
                ));
            }
        }
        Fmt::Logfmt => {
            s.push_str(&format!(
                "ts={} level={} event={} oid={}",
                stamp,
                l.level.to_ascii_lowercase(),
                l.event,
                l.oid
            ));
            for (k, v) in extra {
                s.push_str(&format!(" {k}={v}"));
            }
            if let Some(r) = l.req {
                s.push_str(&format!(" req={r}"));
            }
            s.push_str(&format!(" host={}", l.host));
        }
    }
    s.push('\n');
    s
}
