//! `payguard bench http` never drops its outside client's rows silently: with
//! no wrk on PATH it runs our own client's rows, says on standard error, in
//! the table and in the JSON why wrk's are missing, and still succeeds;
//! asked for wrk explicitly (`--outside wrk`), it fails instead. With wrk
//! installed, both clients' rows are there, the ceiling's (the same durable
//! writes behind the plainest server) included.

use std::process::{Command, Output};

/// A small `bench http` with `PATH` set to `path` (an empty directory stands
/// for a machine without wrk).
fn bench(path: &std::ffi::OsStr, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args([
            "bench",
            "http",
            "--quick",
            "--requests",
            "50",
            "--concurrency",
            "16",
        ])
        .args(extra)
        .env("PATH", path)
        .output()
        .expect("payguard runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn without_wrk_its_rows_are_skipped_out_loud() {
    let empty = tempfile::tempdir().unwrap();
    let out = bench(empty.path().as_os_str(), &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("wrk rows skipped: `wrk` is not on PATH"),
        "{stderr}"
    );
    assert!(
        stdout.contains("outside client: wrk rows skipped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| GET /healthz (constant, same server) | reqwest |"),
        "{stdout}"
    );
    assert!(!stdout.contains("| wrk |"), "{stdout}");

    let out = bench(empty.path().as_os_str(), &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let skipped = json["outside"]["skipped"].as_str().unwrap_or_default();
    assert!(skipped.contains("not on PATH"), "{json}");
    assert!(
        json["first_charges_over_healthz"]["reqwest"].is_f64(),
        "{json}"
    );

    let out = bench(empty.path().as_os_str(), &["--outside", "wrk"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--outside wrk: `wrk` is not on PATH"));
}

#[test]
fn with_wrk_each_row_is_measured_by_both_clients() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let has_wrk = std::env::split_paths(&path).any(|d| d.join("wrk").is_file());
    if !has_wrk {
        eprintln!("skipped: no wrk on PATH (apt-get install -y wrk)");
        return;
    }
    let out = bench(
        &path,
        &["--json", "--outside", "wrk", "--outside-secs", "1"],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{}{stderr}", text(&out.stdout));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let sides = json["sides"].as_array().expect("sides");
    for target in [
        "GET /healthz (constant, same server)",
        "payguard deduct (durable, SQLite)",
        "payguard deduct replays (paid orders)",
        "ceiling: axum + one writer thread, payguard's SQL (durable, SQLite)",
    ] {
        for client in ["reqwest", "wrk"] {
            let row = sides
                .iter()
                .find(|s| s["target"] == target && s["client"] == client)
                .unwrap_or_else(|| panic!("no {target} row by {client}: {json}"));
            assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
            assert_eq!(row["errors"], 0, "{row}");
            assert!(row["over_healthz"].is_f64(), "{row}");
        }
    }
    assert!(json["replays_over_healthz"]["wrk"].is_f64(), "{json}");
    assert!(json["first_charges_over_ceiling"]["wrk"].is_f64(), "{json}");
}
