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

pub(crate) fn render(f: Fmt, l: &Line<'_>) -> String {
    let mut s = String::with_capacity(200);
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
                tod(l.ts),
                l.level,
                l.event,
                l.oid
            ));
            for (k, v) in l.extra {
                s.push_str(&format!(", {k}={v}"));
            }
        }
        Fmt::Text => {
            s.push_str(&format!(
                "{} [{}] {}: oid={}",
                rfc3339(l.ts),
                l.level,
                l.event,
                l.oid
            ));
            for (k, v) in l.extra {
                s.push_str(&format!(", {k}={v}"));
            }
            if let Some(r) = l.req {
                s.push_str(&format!(", req={r}"));
            }
            s.push_str(&format!(", inst={}", l.host));
        }
        Fmt::Json | Fmt::Tracing => {
            let mut fields = format!("\"oid\":\"{}\"", l.oid);
            for (k, v) in l.extra {
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
                    rfc3339(l.ts),
                    l.level,
                    l.event
                ));
            } else {
                s.push_str(&format!(
                    "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"fields\":{{\"message\":\"{}\",{fields}}},\"target\":\"payguard::engine\"}}",
                    rfc3339(l.ts),
                    l.level,
                    l.event
                ));
            }
        }
        Fmt::Logfmt => {
            s.push_str(&format!(
                "ts={} level={} event={} oid={}",
                rfc3339(l.ts),
                l.level.to_ascii_lowercase(),
                l.event,
                l.oid
            ));
            for (k, v) in l.extra {
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
