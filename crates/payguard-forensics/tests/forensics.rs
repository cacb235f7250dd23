//! End-to-end tests: real fixture files through `run`, and the binary for stdin, env and exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use payguard_forensics::{run, ForensicsArgs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ForensicsArgs,
}

fn fx(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
        .display()
        .to_string()
}

/// Runs with `--json` and the given arguments; returns (exit status, parsed JSON).
fn json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["payguard-forensics", "--json"];
    all.extend_from_slice(args);
    let cli = Cli::try_parse_from(all).expect("arguments parse");
    let mut out = Vec::new();
    let code = run(&cli.args, &mut out).expect("run");
    let v: Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
    (code, v)
}

fn text(args: &[&str]) -> (i32, String) {
    let mut all = vec!["payguard-forensics"];
    all.extend_from_slice(args);
    let cli = Cli::try_parse_from(all).expect("arguments parse");
    let mut out = Vec::new();
    let code = run(&cli.args, &mut out).expect("run");
    (code, String::from_utf8(out).expect("utf-8 report"))
}

fn incidents(v: &Value) -> &Vec<Value> {
    v["incidents"].as_array().expect("incidents array")
}

#[test]
fn the_incident_three_lines() {
    let f = fx("incident.log");
    let (code, v) = json(&[&f, "--tz", "+08:00", "--date", "2024-05-17"]);
    assert_eq!(code, 1);
    let inc = incidents(&v);
    assert_eq!(inc.len(), 1, "{v:#}");
    let i = &inc[0];
    assert_eq!(i["order_id"], "OD20240517A1122");
    assert_eq!(i["kind"], "duplicate_effect");
    assert_eq!(i["effects"], 2);
    assert_eq!(i["amount_lost"], 1_185_000);
    assert_eq!(i["race_window_ms"].as_f64(), Some(1.0));
    assert_eq!(i["first_entry"], "2024-05-17T02:16:43.882+08:00");
    assert_eq!(i["second_entry"], "2024-05-17T02:16:43.883+08:00");
    assert_eq!(i["evidence"].as_array().unwrap().len(), 3);
    assert_eq!(i["evidence"][2]["line"], 3);
    assert_eq!(i["evidence"][2]["event"], "duplicate_deduct");
    for k in [
        "files",
        "lines_read",
        "lines_parsed",
        "lines_skipped",
        "orders_seen",
        "race_windows",
        "skipped",
        "totals",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(
        (
            v["files"].as_u64(),
            v["lines_read"].as_u64(),
            v["orders_seen"].as_u64()
        ),
        (Some(1), Some(3), Some(1))
    );
    for k in ["no_format", "cut_json", "binary"] {
        assert_eq!(v["skipped"][k], 0);
    }
    assert_eq!(v["totals"]["orders_affected"], 1);
    assert_eq!(v["totals"]["duplicate_effects"], 1);
    assert_eq!(v["totals"]["amount_lost"], 1_185_000);
    assert_eq!(v["race_windows"].as_array().unwrap().len(), 0);

    let (code, t) = text(&[&f]);
    assert_eq!(code, 1);
    assert!(t.contains("¥11,850.00"), "{t}");
    assert!(t.contains("1185000 fen"), "{t}");
    assert!(t.contains("race window 1.0 ms"), "{t}");
}

#[test]
fn every_format_is_read() {
    let (c, v) = json(&[&fx("formats/payguard-text.log")]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (
            i["order_id"].as_str(),
            i["amount_lost"].as_i64(),
            i["race_window_ms"].as_f64()
        ),
        (Some("OT1"), Some(250_000), Some(2.0))
    );
    assert_eq!(i["hosts"], serde_json::json!(["pay-1", "pay-2"]));
    assert_eq!(
        i["effects"], 2,
        "a duplicate_deduct whose req has a commit is not an extra debit"
    );

    let (c, v) = json(&[&fx("formats/payguard-json.jsonl")]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (
            i["order_id"].as_str(),
            i["effects"].as_u64(),
            i["amount_lost"].as_i64()
        ),
        (Some("OJ1"), Some(2), Some(990))
    );
    assert_eq!(i["race_window_ms"].as_f64(), Some(0.8));
    assert_eq!(i["hosts"], serde_json::json!(["pay-1", "pay-3"]));

    let (c, v) = json(&[&fx("formats/tracing.jsonl")]);
    assert_eq!(c, 0);
    assert!(incidents(&v).is_empty());
    let r = &v["race_windows"][0];
    assert_eq!(
        (
            r["order_id"].as_str(),
            r["width_ms"].as_f64(),
            r["moved_money"].as_u64()
        ),
        (Some("OR1"), Some(0.8), Some(1))
    );

    let (c, v) = json(&[&fx("formats/logfmt.log")]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (
            i["order_id"].as_str(),
            i["amount_lost"].as_i64(),
            i["race_window_ms"].as_f64()
        ),
        (Some("OL 1"), Some(700), Some(4.0))
    );
    assert_eq!(i["hosts"], serde_json::json!(["pay-4"]));
}

#[test]
fn all_formats_mixed_in_one_run() {
    let (c, v) = json(&[&fx("formats"), &fx("incident.log")]);
    assert_eq!(c, 1);
    assert_eq!(v["files"], 5);
    assert_eq!(incidents(&v).len(), 4);
    // Worst first: 1,185,000 then 250,000, 990, 700.
    let lost: Vec<i64> = incidents(&v)
        .iter()
        .map(|i| i["amount_lost"].as_i64().unwrap())
        .collect();
    assert_eq!(lost, vec![1_185_000, 250_000, 990, 700]);
    assert_eq!(v["totals"]["amount_lost"], 1_185_000 + 250_000 + 990 + 700);
    assert_eq!(v["totals"]["race_windows"], 1);
}

#[test]
fn skew_makes_and_breaks_races() {
    let dir = fx("skew");
    let (_, plain) = json(&[&dir]);
    let (_, skewed) = json(&[&dir, "--skew", "pay-2=-45"]);
    let ids = |v: &Value| -> Vec<String> {
        v["race_windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["order_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&plain), vec!["S2"]);
    assert_eq!(ids(&skewed), vec!["S1"]);
    assert_eq!(skewed["race_windows"][0]["width_ms"].as_f64(), Some(5.0));
    assert_eq!(
        skewed["race_windows"][0]["hosts"],
        serde_json::json!(["pay-1", "pay-2"])
    );
    // Skewing the other host the other way does the same.
    let (_, other) = json(&[&dir, "--skew", "pay-1=45"]);
    assert_eq!(ids(&other), vec!["S1"]);
}

#[test]
fn out_of_order_lines_give_the_same_answer() {
    let (_, sorted) = json(&[&fx("formats/payguard-text.log")]);
    let (_, shuffled) = json(&[&fx("out-of-order.log")]);
    let a = &incidents(&sorted)[0];
    let b = &incidents(&shuffled)[0];
    for k in [
        "effects",
        "amount_lost",
        "race_window_ms",
        "first_entry",
        "second_entry",
        "hosts",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
}

#[test]
fn sequential_requests_are_not_races_even_when_shuffled() {
    // ONR1: req-less, two requests one after the other, lines shuffled (ends must pair by time).
    // ONR2: the second request starts exactly when the first ends.
    let (c, v) = json(&[&fx("no-race.log")]);
    assert_eq!(c, 0, "{v:#}");
    assert_eq!(v["orders_seen"], 2);
    assert_eq!(v["totals"]["race_windows"], 0, "{v:#}");
}

#[test]
fn req_less_requests_without_end_are_not_in_flight_for_minutes() {
    let (c, v) = json(&[&fx("late-plain.log"), "--date", "2024-05-17"]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (i["effects"].as_u64(), i["amount_lost"].as_i64()),
        (Some(2), Some(5000))
    );
    assert!(i["race_window_ms"].is_null(), "{i}");
    assert_eq!(v["totals"]["race_windows_in_incidents"], 0);
}

#[test]
fn dateless_lines_take_the_nearest_date_and_cross_midnight() {
    let (c, v) = json(&[&fx("midnight.log")]);
    assert_eq!(c, 1);
    assert_eq!(incidents(&v).len(), 2);
    // OM2: dateless lines after a dated line just before midnight roll over to the next day.
    let i = &incidents(&v)[0];
    assert_eq!(i["order_id"], "OM2");
    assert_eq!(i["first_entry"], "2026-11-28T00:00:00.100Z");
    // OM1: dateless lines before the first dated line take its date, and the day before it.
    let i = &incidents(&v)[1];
    assert_eq!(i["first_entry"], "2026-11-26T23:59:59.998Z");
    assert_eq!(i["evidence"][2]["ts"], "2026-11-27T00:00:00.200Z");
    assert_eq!(i["race_window_ms"].as_f64(), Some(1.0));
    // Without any dated line, --date is used; --tz shifts the result.
    let (_, v) = json(&[
        &fx("incident.log"),
        "--date",
        "2024-05-17",
        "--tz",
        "+08:00",
    ]);
    assert_eq!(
        v["incidents"][0]["evidence"][0]["ts"],
        "2024-05-17T02:16:43.882+08:00"
    );
    let (_, v) = json(&[&fx("incident.log"), "--date", "2024-05-17"]);
    assert_eq!(
        v["incidents"][0]["evidence"][0]["ts"],
        "2024-05-17T02:16:43.882Z"
    );
}

#[test]
fn junk_is_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fx("junk.log")).unwrap();
    // A line over log_line_bytes_max.
    bytes.extend_from_slice(
        format!(
            "02:16:45.000 [INFO] deduct_start: oid=OD20240517A1122, pad={}\n",
            "x".repeat(70_000)
        )
        .as_bytes(),
    );
    let p = dir.path().join("junk.log");
    std::fs::write(&p, bytes).unwrap();
    let (c, v) = json(&[p.to_str().unwrap()]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (
            i["order_id"].as_str(),
            i["amount_lost"].as_i64(),
            i["race_window_ms"].as_f64()
        ),
        (Some("OD20240517A1122"), Some(1_185_000), Some(1.0))
    );
    let sk = &v["skipped"];
    assert_eq!(sk["no_format"], 4, "{sk}");
    assert_eq!(sk["binary"], 2, "{sk}");
    assert_eq!(sk["cut_json"], 1, "{sk}");
    assert_eq!(sk["bad_json"], 1, "{sk}");
    assert_eq!(sk["blank"], 1, "{sk}");
    assert_eq!(sk["too_long"], 1, "{sk}");
    assert_eq!(v["lines_read"], 13);
    assert_eq!(v["lines_skipped"], 10);
    assert_eq!(v["lines_parsed"], 3);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The incident's lines first, then enough filler that the cut falls well after them.
fn incident_then_filler() -> Vec<u8> {
    let mut d = std::fs::read(fx("incident.log")).unwrap();
    for i in 0..20_000 {
        d.extend_from_slice(
            format!(
                "2026-11-26T03:00:{:02}.{:03}Z [INFO] order_query: oid=F{i}, found=true\n",
                i % 60,
                i % 1000
            )
            .as_bytes(),
        );
    }
    d
}

#[test]
fn truncated_gz_and_zst_keep_what_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = incident_then_filler();
    let gz = gzip(&data);
    let cut = &gz[..gz.len() * 2 / 3];
    std::fs::write(dir.path().join("pay-1.log.gz"), cut).unwrap();
    let other = String::from_utf8(data.clone())
        .unwrap()
        .replace("OD20240517A1122", "OD-ZST");
    let zst = zstd::encode_all(other.as_bytes(), 3).unwrap();
    std::fs::write(dir.path().join("pay-9.log.zst"), &zst[..zst.len() / 2]).unwrap();
    std::fs::copy(
        fx("formats/payguard-text.log"),
        dir.path().join("pay-2.log"),
    )
    .unwrap();
    let (c, v) = json(&[dir.path().to_str().unwrap()]);
    assert_eq!(c, 1);
    let errs = v["input_errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs
        .iter()
        .any(|e| e["file"].as_str().unwrap().ends_with("pay-1.log.gz")));
    assert!(errs
        .iter()
        .any(|e| e["file"].as_str().unwrap().ends_with("pay-9.log.zst")));
    let ids: Vec<&str> = incidents(&v)
        .iter()
        .map(|i| i["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["OD-ZST", "OD20240517A1122", "OT1"],
        "incidents from both damaged files and the good one"
    );
    let i = &incidents(&v)[1];
    assert_eq!(
        (i["effects"].as_u64(), i["race_window_ms"].as_f64()),
        (Some(2), Some(1.0)),
        "{i}"
    );
    assert_eq!(i["hosts"], serde_json::json!(["pay-1"]));
    let read = v["lines_read"].as_u64().unwrap();
    assert!(read > 100 && read < 2 * 20_003 + 10, "read {read}");
    let (_, t) = text(&[dir.path().to_str().unwrap()]);
    assert!(t.contains("DAMAGED INPUT"), "{t}");
    // A whole good .gz reads completely.
    std::fs::write(dir.path().join("pay-1.log.gz"), &gz).unwrap();
    std::fs::remove_file(dir.path().join("pay-9.log.zst")).unwrap();
    let (_, v) = json(&[dir.path().to_str().unwrap()]);
    assert!(v["input_errors"].as_array().unwrap().is_empty());
    assert_eq!(v["lines_read"], 20_003 + 10);
}

#[test]
fn folders_are_read_recursively_and_compression_is_told_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    // gzip content under a plain `.log` name (a rotated file), two folders down.
    std::fs::write(
        deep.join("pay-7.log"),
        gzip(&std::fs::read(fx("incident.log")).unwrap()),
    )
    .unwrap();
    std::fs::copy(fx("storm.jsonl"), dir.path().join("a/storm.jsonl")).unwrap();
    let (c, v) = json(&[dir.path().to_str().unwrap()]);
    assert_eq!(c, 1);
    assert_eq!(v["files"], 2);
    assert_eq!(v["incidents"][0]["hosts"], serde_json::json!(["pay-7"]));
    assert_eq!(v["incidents"][0]["amount_lost"], 1_185_000);
    assert_eq!(v["totals"]["race_windows"], 50);
    assert_eq!(v["skipped"]["binary"], 0);
}

#[test]
fn healthy_storm_has_race_windows_and_no_incident() {
    let (c, v) = json(&[&fx("storm.jsonl")]);
    assert_eq!(c, 0);
    assert!(incidents(&v).is_empty());
    let rw = v["race_windows"].as_array().unwrap();
    assert_eq!(rw.len(), 50);
    assert!(rw.iter().all(|r| r["moved_money"] == 1
        && r["requests"] == 3
        && r["width_ms"].as_f64() == Some(1.0)));
    assert_eq!(v["totals"]["race_windows"], 50);
    assert_eq!(v["totals"]["amount_lost"], 0);
}

#[test]
fn late_second_debit_is_an_incident_without_a_window() {
    let (c, v) = json(&[&fx("late.jsonl")]);
    assert_eq!(c, 1);
    let i = &incidents(&v)[0];
    assert_eq!(
        (i["effects"].as_u64(), i["amount_lost"].as_i64()),
        (Some(2), Some(4200))
    );
    assert!(i["race_window_ms"].is_null());
    assert_eq!(i["first_entry"], "2026-11-26T07:00:00.000Z");
    assert_eq!(i["second_entry"], "2026-11-26T07:04:30.000Z");
    assert_eq!(v["totals"]["race_windows"], 0);
    assert_eq!(v["totals"]["race_windows_in_incidents"], 0);
}

#[test]
fn a_second_debit_long_after_the_order_was_retired_is_still_an_incident() {
    // The first debit at 10:00, then 40 minutes of other orders (over 8 MB, so the order is
    // retired from memory long before), then a second debit at 10:40 on another host.
    let dir = tempfile::tempdir().unwrap();
    let mut a = String::new();
    a.push_str("2026-11-26T10:00:00.000Z [INFO] deduct_start: oid=OLONG, req=a, inst=pay-1\n");
    a.push_str("2026-11-26T10:00:00.004Z [INFO] deduct_commit: oid=OLONG, amount=7700, req=a, inst=pay-1\n");
    let n = 120_000;
    for i in 0..n {
        let ms = 1_000 + i as i64 * 2_398_000 / n as i64;
        a.push_str(&format!(
            "2026-11-26T10:{:02}:{:02}.{:03}Z [INFO] deduct_start: oid=F{i}, req=f{i}, inst=pay-1\n",
            ms / 60_000,
            ms / 1000 % 60,
            ms % 1000
        ));
    }
    a.push_str("2026-11-26T10:40:00.000Z [INFO] deduct_start: oid=OLONG, req=b, inst=pay-2\n");
    a.push_str("2026-11-26T10:40:00.004Z [INFO] deduct_commit: oid=OLONG, amount=7700, req=b, inst=pay-2\n");
    assert!(a.len() > 8 << 20);
    let p = dir.path().join("pay.log");
    std::fs::write(&p, a).unwrap();
    let (c, v) = json(&[p.to_str().unwrap()]);
    assert_eq!(c, 1, "{}", v["totals"]);
    let i = &incidents(&v)[0];
    assert_eq!(
        (
            i["order_id"].as_str(),
            i["effects"].as_u64(),
            i["amount_lost"].as_i64()
        ),
        (Some("OLONG"), Some(2), Some(7700))
    );
    assert!(i["race_window_ms"].is_null());
    assert_eq!(i["first_entry"], "2026-11-26T10:00:00.000Z");
    assert_eq!(i["second_entry"], "2026-11-26T10:40:00.000Z");
    assert_eq!(i["hosts"], serde_json::json!(["pay-1", "pay-2"]));
    assert_eq!(
        i["evidence"][0]["line"], 1,
        "the first debit's own lines are the evidence"
    );
    assert_eq!(
        v["orders_rejoined"], 1,
        "the order was retired in between: this tests the memory"
    );
    assert_eq!(v["orders_seen"], n as u64 + 1);
}

#[test]
fn order_since_and_until_filter() {
    let all = [fx("formats"), fx("late.jsonl")];
    let (c, v) = json(&[&all[0], &all[1], "--order", "OLATE"]);
    assert_eq!(c, 1);
    assert_eq!(incidents(&v).len(), 1);
    assert_eq!(v["orders_seen"], 1);
    // The second debit is after --until: no incident.
    let (c, v) = json(&[&all[1], "--until", "2026-11-26T07:01:00Z"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["events_filtered"], 3);
    // --since in --tz.
    let (c, _) = json(&[&all[1], "--since", "2026-11-26 15:02:00", "--tz", "+08:00"]);
    assert_eq!(c, 0);
    let (c, _) = json(&[&all[1], "--since", "2026-11-26 14:59:00", "--tz", "+08:00"]);
    assert_eq!(c, 1);
}

#[test]
fn exit_2_for_unreadable_input_and_bad_values() {
    let (c, _) = text(&[&fx("incident.log"), "/definitely/not/here.log"]);
    assert_eq!(c, 2);
    let (c, _) = text(&[&fx("incident.log"), "--since", "yesterday"]);
    assert_eq!(c, 2);
    let empty = tempfile::tempdir().unwrap();
    let (c, _) = text(&[empty.path().to_str().unwrap()]);
    assert_eq!(
        c, 2,
        "an empty folder analyses nothing: not a clean bill of health"
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_payguard-forensics"))
}

#[test]
fn binary_exit_codes_stdin_and_env() {
    let out = bin().arg(fx("storm.jsonl")).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = bin().arg(fx("incident.log")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = bin().arg("/nope/missing.log").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nope/missing.log") && err.contains("No such file"),
        "{err}"
    );
    let out = bin()
        .args([&fx("incident.log"), "--tz", "Mars/Base"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // stdin, with --json from the environment.
    let mut child = bin()
        .arg("-")
        .env("PAYGUARD_JSON", "true")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(fx("incident.log")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["incidents"][0]["hosts"], serde_json::json!(["stdin"]));
    assert_eq!(v["incidents"][0]["evidence"][0]["file"], "-");

    // PAYGUARD_SKEW works like --skew.
    let out = bin()
        .arg(fx("skew"))
        .env("PAYGUARD_JSON", "1")
        .env("PAYGUARD_SKEW", "pay-2=-45")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["race_windows"][0]["order_id"], "S1");
}

#[test]
fn trace_and_html_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let trace: PathBuf = dir.path().join("t.json");
    let html: PathBuf = dir.path().join("r.html");
    let (c, _) = text(&[
        &fx("formats"),
        &fx("incident.log"),
        "--trace-out",
        trace.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    assert_eq!(c, 1);
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let evs = t["traceEvents"].as_array().unwrap();
    let count = |ph: &str| evs.iter().filter(|e| e["ph"] == ph).count();
    let names: Vec<&str> = evs
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    for h in ["pay-1", "pay-2", "pay-3", "pay-4", "incident"] {
        assert!(names.contains(&h), "{names:?}");
    }
    assert_eq!(count("b"), count("e"));
    // OT1 2 + OJ1 2 + OR1 2 + OL1 2 + incident 2 requests.
    assert_eq!(count("b"), 10);
    assert!(evs
        .iter()
        .any(|e| e["ph"] == "i" && e["name"] == "duplicate_deduct"));
    assert!(evs
        .iter()
        .any(|e| e["ph"] == "i" && e["name"] == "deduct_commit"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg")
            && page.contains("race window 1.0 ms")
            && page.contains("OD20240517A1122")
    );
    assert!(
        !page.contains("<script") && !page.contains("http://") && !page.contains("https://")
            || page.contains("xmlns=\"http://www.w3.org/2000/svg\"")
    );
    assert!(!page.contains("<script") && !page.contains("<link") && !page.contains("src="));
}

/// Two-phase payments (issue #14): a `capture_commit` is the order's debit, so two of them
/// for one order, or one beside a `deduct_commit`, are a duplicate effect, reported under
/// the names the service wrote; one capture after a hold (with its replay) is not.
#[test]
fn a_second_capture_commit_is_a_duplicate_effect() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("two-phase.log");
    std::fs::write(
        &log,
        "2026-12-01T02:05:56.551Z [INFO] authorize_start: oid=OK1, req=r0, inst=pay-1
2026-12-01T02:05:56.555Z [INFO] authorize_commit: oid=OK1, entry=1, amount=12000, balance_after=50000, req=r0, inst=pay-1
2026-12-01T02:05:56.556Z [INFO] authorize_end: oid=OK1, outcome=committed, dur_ms=4.5, req=r0, inst=pay-1
2026-12-01T02:05:56.599Z [INFO] capture_start: oid=OK1, req=r1, inst=pay-1
2026-12-01T02:05:56.604Z [INFO] capture_start: oid=OK1, req=r2, inst=pay-1
2026-12-01T02:05:56.615Z [INFO] capture_commit: oid=OK1, entry=2, amount=9000, balance_after=41000, req=r1, inst=pay-1
2026-12-01T02:05:56.615Z [INFO] capture_end: oid=OK1, outcome=committed, dur_ms=16.0, req=r1, inst=pay-1
2026-12-01T02:05:56.616Z [INFO] capture_replay: oid=OK1, entry=2, req=r2, inst=pay-1
2026-12-01T02:05:56.616Z [INFO] capture_end: oid=OK1, outcome=replayed, dur_ms=11.8, req=r2, inst=pay-1
2026-12-01T02:06:00.000Z [INFO] capture_start: oid=OD2, req=r3, inst=pay-1
2026-12-01T02:06:00.001Z [INFO] capture_start: oid=OD2, req=r4, inst=pay-2
2026-12-01T02:06:00.010Z [INFO] capture_commit: oid=OD2, entry=7, amount=500, balance_after=100, req=r3, inst=pay-1
2026-12-01T02:06:00.011Z [INFO] capture_commit: oid=OD2, entry=8, amount=500, balance_after=-400, req=r4, inst=pay-2
2026-12-01T02:06:00.012Z [INFO] capture_end: oid=OD2, outcome=committed, dur_ms=12, req=r3, inst=pay-1
2026-12-01T02:06:00.013Z [INFO] capture_end: oid=OD2, outcome=committed, dur_ms=12, req=r4, inst=pay-2
2026-12-01T02:07:00.000Z [INFO] deduct_start: oid=OD3, req=r5, inst=pay-1
2026-12-01T02:07:00.002Z [INFO] capture_start: oid=OD3, req=r6, inst=pay-2
2026-12-01T02:07:00.005Z [INFO] deduct_commit: oid=OD3, entry=9, amount=300, balance_after=0, req=r5, inst=pay-1
2026-12-01T02:07:00.006Z [INFO] capture_commit: oid=OD3, entry=10, amount=300, balance_after=-300, req=r6, inst=pay-2
",
    )
    .unwrap();
    let (code, v) = json(&[log.to_str().unwrap(), "--no-align"]);
    assert_eq!(code, 1, "{v:#}");
    let inc = incidents(&v);
    let orders: Vec<&str> = inc
        .iter()
        .map(|i| i["order_id"].as_str().unwrap())
        .collect();
    let mut sorted = orders.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["OD2", "OD3"], "{v:#}");
    for i in inc {
        assert_eq!(i["kind"], "duplicate_effect", "{i:#}");
        assert_eq!(i["effects"], 2, "{i:#}");
    }
    let od2 = inc.iter().find(|i| i["order_id"] == "OD2").unwrap();
    assert_eq!(od2["amount_lost"], 500);
    let events: Vec<&str> = od2["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.iter().filter(|e| **e == "capture_commit").count() == 2,
        "the report names the events as written: {events:?}"
    );
}

#[test]
fn long_order_ids_are_told_apart_past_the_inline_key() {
    // The open-order table keeps ids of at most 30 bytes inline and longer ones boxed, and looks
    // them up two different ways: ids that share their first 30 bytes must stay apart.
    let short = "OD-0123456789-0123456789-01234"; // 30 bytes: inline
    let long = format!("{short}-A"); // boxed, same first 30 bytes
    let long2 = format!("{short}-B");
    assert_eq!(short.len(), 30);
    let line = |ms: u32, ev: &str, oid: &str, req: &str, host: &str| {
        format!("2026-11-26T02:16:43.{ms:03}Z [INFO] {ev}: oid={oid}, amount=5, req={req}, inst={host}\n")
    };
    let mut log = String::new();
    for (i, oid) in [short, &long, &long2].into_iter().enumerate() {
        let r = format!("r{i}");
        log += &line(100 + i as u32, "deduct_start", oid, &r, "pay-1");
        log += &line(110 + i as u32, "deduct_commit", oid, &r, "pay-1");
    }
    // Only `long` is debited a second time, by another request on another host.
    log += &line(120, "deduct_start", &long, "r9", "pay-2");
    log += &line(130, "deduct_commit", &long, "r9", "pay-2");
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("long-ids.log");
    std::fs::write(&p, log).expect("write log");
    let (code, v) = json(&[p.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1);
    assert_eq!(v["orders_seen"], 3, "{v:#}");
    let inc = incidents(&v);
    assert_eq!(inc.len(), 1, "{v:#}");
    assert_eq!(inc[0]["order_id"], long.as_str());
    assert_eq!(inc[0]["effects"], 2);
}
