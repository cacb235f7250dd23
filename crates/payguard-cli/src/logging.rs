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

/// Bytes the log writer thread gathers before one `write(2)`: it writes when
/// this fills or when no line is waiting, so a quiet server's lines still appear
/// at once and a busy one's go out many to a syscall (issue #16: one write per
/// line was 8–10 % of a loaded server's CPU).
pub const LOG_WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Installs the global subscriber; keep the guard alive until exit so the last
/// lines are flushed.
pub fn init(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(stdout_buffered());
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

/// Standard output without its line buffering: the writer thread flushes this
/// whenever its queue is empty (tracing-appender's worker does), and on exit.
/// Falls back to the line-buffered handle if the descriptor cannot be shared.
fn stdout_buffered() -> Box<dyn std::io::Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::io::BufWriter::with_capacity(
            LOG_WRITE_BUFFER_BYTES,
            std::fs::File::from(fd),
        )),
        Err(_) => Box::new(std::io::stdout()),
    }
}

pub struct PayguardFormat {
    pub format: LogFormat,
}

/// One event's fields, formatted as they are visited into buffers reused from
/// line to line (no value is boxed or copied per field).
struct Fields {
    format: LogFormat,
    event: String,
    has_event: bool,
    message: String,
    has_message: bool,
    /// The fields other than `event` and `message`, already formatted with their
    /// separators (`,"k":v` in JSON, `, k=v` in text), in the order visited.
    rest: String,
    has_req: bool,
    count: usize,
}

impl Fields {
    fn new(format: LogFormat) -> Self {
        Fields {
            format,
            event: String::new(),
            has_event: false,
            message: String::new(),
            has_message: false,
            rest: String::with_capacity(192),
            has_req: false,
            count: 0,
        }
    }

    fn clear(&mut self) {
        self.event.clear();
        self.has_event = false;
        self.message.clear();
        self.has_message = false;
        self.rest.clear();
        self.has_req = false;
        self.count = 0;
    }

    fn key(&mut self, name: &str) {
        if name == "req" {
            self.has_req = true;
        }
        match self.format {
            LogFormat::Json => {
                self.rest.push(',');
                json_str(&mut self.rest, name);
                self.rest.push(':');
            }
            LogFormat::Text => {
                self.rest.push_str(if self.count == 0 { " " } else { ", " });
                self.rest.push_str(name);
                self.rest.push('=');
            }
        }
        self.count += 1;
    }

    fn push_str(&mut self, name: &str, value: &str) {
        self.key(name);
        match self.format {
            LogFormat::Json => json_str(&mut self.rest, value),
            LogFormat::Text => self.rest.push_str(value),
        }
    }

    fn push_display(&mut self, name: &str, value: impl std::fmt::Display) {
        self.key(name);
        let _ = write!(self.rest, "{value}");
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event" => {
                self.event.push_str(value);
                self.has_event = true;
            }
            "message" => {
                self.message.push_str(value);
                self.has_message = true;
            }
            name => self.push_str(name, value),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push_display(field.name(), value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push_display(field.name(), value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push_display(field.name(), value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // Durations: microsecond precision is plenty and keeps lines short.
        let rounded = (value * 1000.0).round() / 1000.0;
        // JSON's number form (`2.0`, `1.235`); not finite: null, as serde_json says.
        match serde_json::Number::from_f64(rounded) {
            Some(n) => self.push_display(field.name(), n),
            None => self.push_display(field.name(), "null"),
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "event" => {
                let _ = write!(self.event, "{value:?}");
                self.has_event = true;
            }
            "message" => {
                let _ = write!(self.message, "{value:?}");
                self.has_message = true;
            }
            name => {
                let formatted = format!("{value:?}");
                self.push_str(name, &formatted);
            }
        }
    }
}

/// Appends `s` as a JSON string (quotes and escapes, as serde_json writes them).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[from..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        from = i + 1;
    }
    out.push_str(&s[from..]);
    out.push('"');
}

/// What one thread reuses from line to line: the fields, the line, and the
/// last timestamp formatted with its millisecond (a busy server writes many
/// lines a millisecond).
struct Scratch {
    fields: Fields,
    line: String,
    ts_ms: i64,
    ts: String,
}

impl Scratch {
    fn new(format: LogFormat) -> Self {
        Scratch {
            fields: Fields::new(format),
            line: String::with_capacity(256),
            ts_ms: i64::MIN,
            ts: String::with_capacity(24),
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

impl PayguardFormat {
    fn format_into<S, N>(&self, sc: &mut Scratch, ctx: &FmtContext<'_, S, N>, event: &Event<'_>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        let f = &mut sc.fields;
        f.clear();
        f.format = self.format;
        event.record(f);
        // A line logged while serving a request carries that request's id, even
        // when the code that logged it did not know it (error mapping, store
        // failures): the client was given this id, so support can find the line.
        if !f.has_req {
            if let Some(req) = request_span_req(ctx) {
                f.push_str("req", &req);
            }
        }
        if f.has_message {
            let msg = std::mem::take(&mut f.message);
            f.push_str("msg", &msg);
            f.message = msg;
        }
        let now = chrono::Utc::now();
        let ms = now.timestamp_millis();
        if ms != sc.ts_ms {
            sc.ts.clear();
            let _ = write!(sc.ts, "{}", now.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
            sc.ts_ms = ms;
        }
        let level = event.metadata().level().as_str();
        let name = if f.has_event { f.event.as_str() } else { "log" };
        let line = &mut sc.line;
        line.clear();
        match self.format {
            LogFormat::Json => {
                // Written by hand so the keys keep LOGS.md's order: ts, level, event, fields.
                let _ = write!(
                    line,
                    "{{\"ts\":\"{}\",\"level\":\"{level}\",\"event\":",
                    sc.ts
                );
                json_str(line, name);
                line.push_str(&f.rest);
                line.push('}');
            }
            LogFormat::Text => {
                let _ = write!(line, "{} [{level}] {name}:", sc.ts);
                line.push_str(&f.rest);
            }
        }
        line.push('\n');
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
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut slot) => {
                let sc = slot.get_or_insert_with(|| Scratch::new(self.format));
                self.format_into(sc, ctx, event);
                writer.write_str(&sc.line)
            }
            // A line logged while formatting one (re-entrant): its own buffers.
            Err(_) => {
                let mut sc = Scratch::new(self.format);
                self.format_into(&mut sc, ctx, event);
                writer.write_str(&sc.line)
            }
        })
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
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in [
            "plain",
            "quote \" and backslash \\",
            "new\nline\r\ttab",
            "\u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "¥2.37M — 双重扣款",
            "",
        ] {
            let mut out = String::new();
            json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn messages_debug_values_and_whole_floats_keep_their_old_form() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(PayguardFormat {
                format: LogFormat::Json,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(dur_ms = 2.0_f64, op = ?Some("x\"y"), "lock {} lost", 7);
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let rest = &out[out.find("\"level\"").unwrap()..];
        assert_eq!(
            rest,
            "\"level\":\"WARN\",\"event\":\"log\",\"dur_ms\":2.0,\"op\":\"Some(\\\"x\\\\\\\"y\\\")\",\"msg\":\"lock 7 lost\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["op"], "Some(\"x\\\"y\")");
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
