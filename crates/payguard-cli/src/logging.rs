//! The log formats of `shared/spec/LOGS.md`, which `payguard forensics` reads back.
//!
//! `json`: one object a line, `{"ts":…,"level":"INFO","event":"order_cache_set","oid":…}`.
//! `text`: `2026-11-26T02:16:43.882Z [INFO] order_cache_set: oid=…, status=PREPARE, req=…`.
//! The event name comes from the `event` field; lines without one (library logs)
//! use `log` and carry their message as `msg`. Output goes through a non-blocking
//! writer that is *not* lossy: under pressure it slows the logger rather than drop
//! evidence a forensic reconstruction may need.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    /// API.md's default: JSON when stdout is not a terminal.
    pub fn default_for_stdout() -> Self {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    }
}

/// Installs the global subscriber; keep the guard alive until exit so the last
/// lines are flushed.
pub fn init(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    let filter = EnvFilter::try_from_env("PAYGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Span fields are read back as plain `key=value` text (`request_span_req`).
        .with_ansi(false)
        .event_format(PayguardFormat { format })
        .init();
    guard
}

pub struct PayguardFormat {
    pub format: LogFormat,
}

#[derive(Default)]
struct Fields {
    event: Option<String>,
    message: Option<String>,
    rest: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event" => self.event = Some(value.to_owned()),
            "message" => self.message = Some(value.to_owned()),
            name => self.rest.push((name, value.into())),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.push((field.name(), value.into()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // Durations: microsecond precision is plenty and keeps lines short.
        let rounded = (value * 1000.0).round() / 1000.0;
        self.rest.push((field.name(), rounded.into()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let s = format!("{value:?}");
        match field.name() {
            "event" => self.event = Some(s),
            "message" => self.message = Some(s),
            name => self.rest.push((name, s.into())),
        }
    }
}

impl<S, N> FormatEvent<S, N> for PayguardFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        // A line logged while serving a request carries that request's id, even
        // when the code that logged it did not know it (error mapping, store
        // failures): the client was given this id, so support can find the line.
        if !f.rest.iter().any(|(k, _)| *k == "req") {
            if let Some(req) = request_span_req(ctx) {
                f.rest.push(("req", req.into()));
            }
        }
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let level = event.metadata().level().as_str();
        let name = f.event.take().unwrap_or_else(|| "log".to_owned());
        if let Some(msg) = f.message.take() {
            f.rest.push(("msg", msg.into()));
        }
        let mut line = String::with_capacity(160);
        match self.format {
            LogFormat::Json => {
                // Written by hand so the keys keep LOGS.md's order: ts, level, event, fields.
                let _ = write!(
                    line,
                    "{{\"ts\":\"{ts}\",\"level\":\"{level}\",\"event\":{}",
                    serde_json::Value::String(name)
                );
                for (k, v) in &f.rest {
                    let _ = write!(line, ",{}:{v}", serde_json::Value::String((*k).to_owned()));
                }
                line.push('}');
            }
            LogFormat::Text => {
                let _ = write!(line, "{ts} [{level}] {name}:");
                for (i, (k, v)) in f.rest.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    match v {
                        serde_json::Value::String(s) => {
                            let _ = write!(line, "{sep}{k}={s}");
                        }
                        other => {
                            let _ = write!(line, "{sep}{k}={other}");
                        }
                    }
                }
            }
        }
        writeln!(writer, "{line}")
    }
}

/// The `req` of the request span (payguard-server's `request` middleware) this
/// event was logged in, if any.
fn request_span_req<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let scope = ctx.event_scope()?;
    for span in scope {
        if span.name() != payguard_server::REQUEST_SPAN {
            continue;
        }
        let ext = span.extensions();
        let fields = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()?;
        return fields
            .fields
            .split(' ')
            .find_map(|kv| kv.strip_prefix("req="))
            // `req = %id` formats bare, `req = "…"` quoted: ids never hold quotes.
            .map(|v| v.trim_matches('"').to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat) -> String {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(PayguardFormat { format })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                event = "order_cache_set",
                oid = "OD20240517A1122",
                status = "PREPARE",
                req = "r1",
                inst = "pay-1"
            );
            tracing::warn!(
                event = "duplicate_deduct",
                oid = "OD20240517A1122",
                amount = 1_185_000_i64,
                entries = 2_i64,
                req = "r2",
                inst = "pay-2"
            );
            tracing::info!(
                event = "deduct_end",
                oid = "o",
                outcome = "committed",
                dur_ms = 1.23456_f64,
                req = "r3",
                inst = "pay-1"
            );
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    /// Strips the timestamp, which is the only part that changes between runs.
    fn without_ts(line: &str) -> String {
        match line.find("Z") {
            Some(i) if line.starts_with("20") => line[i + 1..].to_owned(),
            _ => line.to_owned(),
        }
    }

    #[test]
    fn a_line_logged_inside_a_request_carries_its_req() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(PayguardFormat {
                format: LogFormat::Json,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(payguard_server::REQUEST_SPAN, req = "4cba02ec");
            let _in = span.enter();
            tracing::error!(event = "internal_error", detail = "boom");
            // An explicit req wins over the span's.
            tracing::info!(event = "deduct_start", req = "other");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"], "internal_error");
        assert_eq!(lines[0]["req"], "4cba02ec");
        assert_eq!(lines[1]["req"], "other");
        assert_eq!(out.lines().nth(1).unwrap().matches("\"req\"").count(), 1);
    }

    #[test]
    fn text_lines_match_logs_md() {
        let out = capture(LogFormat::Text);
        let lines: Vec<String> = out.lines().map(without_ts).collect();
        assert_eq!(
            lines,
            vec![
                " [INFO] order_cache_set: oid=OD20240517A1122, status=PREPARE, req=r1, inst=pay-1",
                " [WARN] duplicate_deduct: oid=OD20240517A1122, amount=1185000, entries=2, req=r2, inst=pay-2",
                " [INFO] deduct_end: oid=o, outcome=committed, dur_ms=1.235, req=r3, inst=pay-1",
            ]
        );
        let ts = &out[..24];
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn json_lines_match_logs_md_in_key_order() {
        let out = capture(LogFormat::Json);
        let first = out.lines().next().unwrap();
        assert!(first.starts_with("{\"ts\":\"20"), "{first}");
        let rest = &first[first.find("\"level\"").unwrap()..];
        assert_eq!(
            rest,
            "\"level\":\"INFO\",\"event\":\"order_cache_set\",\"oid\":\"OD20240517A1122\",\"status\":\"PREPARE\",\"req\":\"r1\",\"inst\":\"pay-1\"}"
        );
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        }
        let dup: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
        assert_eq!(dup["amount"], 1_185_000);
        assert_eq!(dup["level"], "WARN");
    }
}
