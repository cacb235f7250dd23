//! `--trace-out`: the findings as a Chrome trace event file that Perfetto (ui.perfetto.dev) opens.
//!
//! Why: a race is easier seen than read. Each host is a process (named by metadata events),
//! each request an async slice (`ph` b/e) from its entry to its end, and each money effect,
//! duplicate, replay or rejection an instant event (`ph` i). Only orders with an incident or a
//! race window are drawn (at most `timeline_orders_max`), so the file stays small.

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::json;

use crate::clock::{format_rfc3339, TzOffset};
use crate::engine::Engine;
use crate::error::ForensicsError;

/// Writes the trace to `path`.
pub fn write(path: &Path, e: &Engine, tz: TzOffset) -> Result<(), ForensicsError> {
    let err = |x: std::io::Error| ForensicsError::Output {
        path: path.to_path_buf(),
        reason: x.to_string(),
    };
    let f = std::fs::File::create(path).map_err(err)?;
    let mut w = BufWriter::new(f);
    write_to(&mut w, e, tz).map_err(err)?;
    w.flush().map_err(err)
}

fn write_to(w: &mut dyn Write, e: &Engine, tz: TzOffset) -> std::io::Result<()> {
    let tls = &e.results.timelines;
    let t0 = tls
        .iter()
        .flat_map(|t| {
            t.reqs
                .iter()
                .map(|r| r.entry)
                .chain(t.marks.iter().map(|m| m.ts))
        })
        .min()
        .unwrap_or(0);
    let mut used_hosts: Vec<u16> = tls
        .iter()
        .flat_map(|t| {
            t.reqs
                .iter()
                .map(|r| r.host)
                .chain(t.marks.iter().map(|m| m.host))
        })
        .collect();
    used_hosts.sort_unstable();
    used_hosts.dedup();
    let host_name = |h: u16| {
        e.hosts
            .get(h as usize)
            .cloned()
            .unwrap_or_else(|| "?".into())
    };
    let mut first = true;
    let mut emit = |w: &mut dyn Write, v: serde_json::Value| -> std::io::Result<()> {
        if !first {
            w.write_all(b",\n")?;
        }
        first = false;
        serde_json::to_writer(&mut *w, &v)?;
        Ok(())
    };
    w.write_all(b"{\"displayTimeUnit\":\"ms\",")?;
    write!(
        w,
        "\"otherData\":{{\"generator\":\"payguard forensics\",\"time_zero\":{}}},",
        serde_json::to_string(&format_rfc3339(t0, tz))?
    )?;
    w.write_all(b"\"traceEvents\":[\n")?;
    for &h in &used_hosts {
        let pid = h as u64 + 1;
        emit(
            w,
            json!({"ph":"M","name":"process_name","pid":pid,"tid":0,"args":{"name":host_name(h)}}),
        )?;
        emit(
            w,
            json!({"ph":"M","name":"process_sort_index","pid":pid,"tid":0,"args":{"sort_index":pid}}),
        )?;
        emit(
            w,
            json!({"ph":"M","name":"thread_name","pid":pid,"tid":1,"args":{"name":"requests"}}),
        )?;
    }
    let mut id: u64 = 0;
    for t in tls {
        let cat = if t.incident { "incident" } else { "race" };
        for r in &t.reqs {
            id += 1;
            let pid = r.host as u64 + 1;
            let name = format!("{} {}", t.order_id, r.label);
            let args = json!({
                "order_id": t.order_id, "request": r.label, "host": host_name(r.host),
                "entry": format_rfc3339(r.entry, tz), "end": format_rfc3339(r.end, tz),
                "in_flight_ms": (r.end - r.entry) as f64 / 1000.0,
            });
            emit(
                w,
                json!({"ph":"b","cat":cat,"name":name,"id":format!("0x{id:x}"),"pid":pid,"tid":1,
                "ts":(r.entry - t0) as f64,"args":args}),
            )?;
            emit(
                w,
                json!({"ph":"e","cat":cat,"name":name,"id":format!("0x{id:x}"),"pid":pid,"tid":1,
                "ts":(r.end - t0) as f64}),
            )?;
        }
        for m in &t.marks {
            emit(
                w,
                json!({"ph":"i","s":"p","cat":cat,"name":m.kind.name(),"pid":m.host as u64 + 1,"tid":1,
                "ts":(m.ts - t0) as f64,
                "args":{"order_id":t.order_id,"amount":m.amount,"at":format_rfc3339(m.ts, tz)}}),
            )?;
        }
    }
    w.write_all(b"\n]}\n")?;
    Ok(())
}
