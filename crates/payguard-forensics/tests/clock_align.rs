//! Clock alignment against known truth: `gen-logs` writes the same corpus twice, once on true
//! UTC clocks and once with hosts in local time without a zone and with skewed clocks; forensics
//! on the second must find the first's race windows and incidents, at the same moments within
//! 1 ms. Each test also runs with `--no-align` and checks that the comparison then fails, so the
//! tests prove alignment is what makes them pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Microseconds since the epoch of an RFC 3339 time in a report.
fn us(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .timestamp_micros()
}

/// Writes a corpus with `gen-logs` into a fresh folder under `dir`; returns its `logs` folder.
fn corpus(dir: &Path, name: &str, hosts: u32, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let st = Command::new(env!("CARGO_BIN_EXE_gen-logs"))
        .args([
            "--orders",
            "4000",
            "--incident-every",
            "300",
            "--race-every",
            "20",
        ])
        .args(["--hosts", &hosts.to_string(), "--out"])
        .arg(&out)
        .args(extra)
        .output()
        .expect("gen-logs runs");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out.join("logs")
}

fn forensics(logs: &Path, extra: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_payguard-forensics"))
        .arg(logs)
        .arg("--json")
        .args(extra)
        .output()
        .expect("forensics runs");
    assert!(
        o.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON")
}

/// Per order: (first entry, second entry, window width in ms) of every race window and
/// every incident with a window.
fn moments(v: &Value) -> BTreeMap<String, (i64, i64, f64)> {
    let mut m = BTreeMap::new();
    for r in v["race_windows"].as_array().unwrap() {
        let w = r["width_ms"].as_f64().unwrap();
        let (a, b) = (
            us(r["first_entry"].as_str().unwrap()),
            us(r["second_entry"].as_str().unwrap()),
        );
        m.insert(r["order_id"].as_str().unwrap().to_string(), (a, b, w));
    }
    for i in v["incidents"].as_array().unwrap() {
        let w = i["race_window_ms"].as_f64().unwrap_or(-1.0);
        let (a, b) = (
            us(i["first_entry"].as_str().unwrap()),
            us(i["second_entry"].as_str().unwrap()),
        );
        m.insert(
            format!("incident {}", i["order_id"].as_str().unwrap()),
            (a, b, w),
        );
    }
    m
}

/// `None` when `got` has the same windows as `truth` within 1 ms, else what differs first.
fn mismatch(truth: &Value, got: &Value) -> Option<String> {
    mismatch_by(truth, got, 0)
}

/// Like [`mismatch`] with `got`'s clock `shift_us` ahead of the truth: offsets are relative,
/// so aligned times are on the reference host's clock, whatever its error.
fn mismatch_by(truth: &Value, got: &Value, shift_us: i64) -> Option<String> {
    let (t, g) = (moments(truth), moments(got));
    if t.len() != g.len() || t.keys().ne(g.keys()) {
        let only: Vec<&String> = t.keys().filter(|k| !g.contains_key(*k)).collect();
        let extra: Vec<&String> = g.keys().filter(|k| !t.contains_key(*k)).collect();
        return Some(format!("only in truth {only:?}, only found {extra:?}"));
    }
    for (k, (ta, tb, tw)) in &t {
        let (ga, gb, gw) = g[k];
        let (ga, gb) = (ga - shift_us, gb - shift_us);
        if (ta - ga).abs() > 1000 || (tb - gb).abs() > 1000 || (tw - gw).abs() > 1.0 {
            return Some(format!(
                "{k}: truth {ta}/{tb} {tw} ms, found {ga}/{gb} {gw} ms"
            ));
        }
    }
    None
}

/// Asserts host `h`'s clock: applied, its zone, and an interval holding `skew_ms` that is narrow.
fn assert_clock(v: &Value, h: &str, zone: Option<&str>, skew_ms: f64) {
    let c = &v["clock"]["hosts"][h];
    assert_eq!(c["applied"], true, "{h}: {c}");
    assert_eq!(c["zone"].as_str(), zone, "{h}: {c}");
    let (lo, hi) = (
        c["interval_ms"][0].as_f64().unwrap(),
        c["interval_ms"][1].as_f64().unwrap(),
    );
    assert!(
        lo <= skew_ms && skew_ms <= hi && hi - lo <= 4.0,
        "{h}: {c}, truth {skew_ms}"
    );
    assert!(
        (c["skew_ms"].as_f64().unwrap() - skew_ms).abs() <= 1.0,
        "{h}: {c}"
    );
    assert!(c["constraints"].as_u64().unwrap() >= 8, "{h}: {c}");
}

/// The truth of one host: its zone-less zone (if any) and its clock error in ms (gen-logs' skew).
type Truth<'a> = (&'a str, Option<&'a str>, f64);

/// Checks every host's clock against the truth, relative to the reported reference host, and
/// gives the reference's clock error in microseconds (what aligned times are off by).
fn assert_clocks(v: &Value, truth: &[Truth<'_>]) -> i64 {
    let hosts = v["clock"]["hosts"].as_object().unwrap();
    let reference: Vec<&String> = hosts
        .iter()
        .filter(|(_, c)| c["reference"] == true)
        .map(|(h, _)| h)
        .collect();
    assert_eq!(reference.len(), 1, "{hosts:?}");
    let err = |h: &str| truth.iter().find(|t| t.0 == h).map_or(0.0, |t| t.2);
    let ref_err = err(reference[0]);
    for h in hosts.keys() {
        let zone = truth.iter().find(|t| t.0 == h).and_then(|t| t.1);
        let zone = zone.or((hosts[h]["zone"].as_str() == Some("+00:00")).then_some("+00:00"));
        assert_clock(v, h, zone, ref_err - err(h));
    }
    (ref_err * 1000.0) as i64
}

#[test]
fn a_zone_less_host_at_plus_eight_and_skewed_hosts_are_aligned() {
    let d = tempfile::tempdir().unwrap();
    let truth = forensics(&corpus(d.path(), "truth", 3, &[]), &["--no-align"]);
    assert!(!moments(&truth).is_empty());
    let logs = corpus(
        d.path(),
        "shifted",
        3,
        &[
            "--local",
            "pay-1=+08:00",
            "--skew",
            "pay-1=-287",
            "--skew",
            "pay-2=430",
        ],
    );
    let got = forensics(&logs, &[]);
    // gen-logs' skew is the clock's error; forensics' skew is what corrects it.
    assert_clock(&got, "pay-1", Some("+08:00"), 287.0);
    assert_clock(&got, "pay-2", None, -430.0);
    assert_eq!(got["clock"]["hosts"]["pay-3"]["reference"], true);
    assert_eq!(mismatch(&truth, &got), None);
    assert_eq!(truth["totals"]["incidents"], got["totals"]["incidents"]);
    let off = forensics(&logs, &["--no-align"]);
    assert!(off.get("clock").is_none());
    assert!(
        mismatch(&truth, &off).is_some(),
        "without alignment the windows must be wrong"
    );
}

#[test]
fn zones_minus_five_and_plus_five_thirty_with_small_and_large_skews() {
    let d = tempfile::tempdir().unwrap();
    let truth = forensics(&corpus(d.path(), "truth", 4, &[]), &["--no-align"]);
    let logs = corpus(
        d.path(),
        "shifted",
        4,
        &[
            "--local",
            "pay-2=-05:00",
            "--skew",
            "pay-2=20",
            "--local",
            "pay-3=+05:30",
            "--skew",
            "pay-3=-800",
            "--skew",
            "pay-4=-20",
        ],
    );
    let got = forensics(&logs, &[]);
    let shift = assert_clocks(
        &got,
        &[
            ("pay-2", Some("-05:00"), 20.0),
            ("pay-3", Some("+05:30"), -800.0),
            ("pay-4", None, -20.0),
        ],
    );
    assert_eq!(mismatch_by(&truth, &got, shift), None);
    assert!(mismatch(&truth, &forensics(&logs, &["--no-align"])).is_some());
}

#[test]
fn user_tz_and_skew_win_over_inference() {
    let d = tempfile::tempdir().unwrap();
    let truth = forensics(&corpus(d.path(), "truth", 3, &[]), &["--no-align"]);
    let logs = corpus(
        d.path(),
        "shifted",
        3,
        &["--skew", "pay-2=430", "--skew", "pay-3=-60"],
    );
    // The user fixes pay-2 (rightly): it becomes the reference; pay-3 is still inferred.
    let got = forensics(&logs, &["--skew", "pay-2=-430"]);
    let c = &got["clock"]["hosts"];
    assert_eq!(c["pay-2"]["skew_ms"], -430.0);
    assert_eq!(c["pay-2"]["reference"], true);
    assert_clock(&got, "pay-3", None, 60.0);
    assert_eq!(mismatch(&truth, &got), None);
    // A wrong user skew is not overridden: the windows are then off, as the user asked.
    let wrong = forensics(&logs, &["--skew", "pay-2=0"]);
    assert_eq!(wrong["clock"]["hosts"]["pay-2"]["skew_ms"], 0.0);
    assert!(mismatch(&truth, &wrong).is_some());
}

#[test]
fn a_host_with_too_little_evidence_is_left_alone_and_said_so() {
    let d = tempfile::tempdir().unwrap();
    let logs = corpus(
        d.path(),
        "shifted",
        3,
        &[
            "--solo-hosts",
            "1",
            "--skew",
            "pay-3=300",
            "--skew",
            "pay-2=-150",
        ],
    );
    let got = forensics(&logs, &[]);
    let c = &got["clock"]["hosts"]["pay-3"];
    assert_eq!(c["applied"], false, "{c}");
    assert!(c["skew_ms"].is_null(), "{c}");
    let notes: Vec<&str> = got["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("pay-3: too little evidence")),
        "{notes:?}"
    );
    assert_clock(&got, "pay-2", None, 150.0);
    let text = Command::new(env!("CARGO_BIN_EXE_payguard-forensics"))
        .arg(&logs)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("clock pay-3: left alone"), "{text}");
    assert!(text.contains("clock pay-2: skew +150.0 ms"), "{text}");
}

/// The `clock.steps` entries naming `host`, each checked to say it moved `by_ms` (±2 ms).
fn assert_steps(v: &Value, host: &str, by_ms: f64, followed: bool) {
    let steps = v["clock"]["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "{}", v["clock"]);
    for s in steps {
        assert_eq!(s["host"], host, "{s}");
        assert_eq!(s["followed"], followed, "{s}");
        let by = s["by_ms"].as_f64().unwrap();
        let by = if s["hosts"][1] == host { by } else { -by };
        assert!((by - by_ms).abs() <= 2.0, "{s}");
    }
}

#[test]
fn a_clock_step_mid_file_is_followed_and_without_alignment_its_orderings_are_impossible() {
    let d = tempfile::tempdir().unwrap();
    let truth = forensics(&corpus(d.path(), "truth", 3, &[]), &[]);
    // The checker is silent on a healthy corpus, so what it finds below is the step.
    assert_eq!(truth["totals"]["impossible_orderings"], 0);
    assert!(truth["impossible_orderings"].as_array().unwrap().is_empty());
    assert!(truth["clock"]["steps"].as_array().unwrap().is_empty());
    let logs = corpus(d.path(), "stepped", 3, &["--step", "pay-2=600@40"]);
    let got = forensics(&logs, &[]);
    // In the sample pay-2's orderings contradict each other: no single offset is applied...
    assert_eq!(got["clock"]["hosts"]["pay-2"]["applied"], false);
    let notes: Vec<&str> = got["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(notes.iter().any(|n| n.contains("contradict")), "{notes:?}");
    // ...but the merge finds the step, moves pay-2's later times back, and every window is right.
    assert_steps(&got, "pay-2", 600.0, true);
    assert_eq!(mismatch(&truth, &got), None);
    assert_eq!(got["totals"]["impossible_orderings"], 0);
    // Without alignment nothing is moved, and the broken orderings are listed.
    let off = forensics(&logs, &["--no-align"]);
    let imp = off["impossible_orderings"].as_array().unwrap();
    assert!(!imp.is_empty());
    for i in imp {
        assert_eq!(i["kind"], "replay_before_commit", "{i}");
        assert_eq!(i["hosts"][0], "pay-2", "{i}");
        assert!((i["by_ms"].as_f64().unwrap() - 600.0).abs() <= 2.0, "{i}");
        // Only after the step, 40 s into the run (21:00:40Z).
        assert!(
            us(i["at"].as_str().unwrap()) >= us("2026-11-25T21:00:39.900Z"),
            "{i}"
        );
    }
    assert!(mismatch(&truth, &off).is_some());
}

/// The trace's slices and instants as (host pid, name, absolute start in us), sorted.
fn trace_events(path: &Path) -> Vec<(u64, String, i64)> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let t0 = us(v["otherData"]["time_zero"].as_str().unwrap());
    let mut out: Vec<(u64, String, i64)> = v["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] != "M")
        .map(|e| {
            let ts = e["ts"].as_f64().unwrap() as i64 + t0;
            (
                e["pid"].as_u64().unwrap(),
                e["name"].as_str().unwrap().to_string(),
                ts,
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn since_until_and_the_trace_use_the_aligned_times() {
    let d = tempfile::tempdir().unwrap();
    let window = [
        "--since",
        "2026-11-25T21:00:20Z",
        "--until",
        "2026-11-25T21:00:50Z",
    ];
    let (tt, tg) = (d.path().join("truth.json"), d.path().join("got.json"));
    let mut a: Vec<&str> = window.to_vec();
    a.extend(["--no-align", "--trace-out", tt.to_str().unwrap()]);
    let truth = forensics(&corpus(d.path(), "truth", 3, &[]), &a);
    let logs = corpus(
        d.path(),
        "shifted",
        3,
        &["--local", "pay-1=+08:00", "--skew", "pay-1=-287"],
    );
    let mut a: Vec<&str> = window.to_vec();
    a.extend(["--trace-out", tg.to_str().unwrap()]);
    let got = forensics(&logs, &a);
    assert_eq!(got["clock"]["hosts"]["pay-3"]["reference"], true);
    assert_eq!(truth["events_filtered"], got["events_filtered"]);
    assert_eq!(mismatch(&truth, &got), None);
    let (t, g) = (trace_events(&tt), trace_events(&tg));
    assert!(!t.is_empty());
    assert_eq!(t.len(), g.len());
    for (a, b) in t.iter().zip(&g) {
        assert!(
            a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() <= 1000,
            "{a:?} / {b:?}"
        );
    }
    // Without alignment pay-1's events are eight hours away: the window filters them out.
    let off = forensics(&logs, &[&window[..], &["--no-align"]].concat());
    assert_ne!(truth["events_filtered"], off["events_filtered"]);
}

#[test]
fn lock_hand_overs_bracket_tighter_and_a_small_step_shows_two_lock_holders() {
    let d = tempfile::tempdir().unwrap();
    let width = |v: &Value, h: &str| {
        let i = &v["clock"]["hosts"][h]["interval_ms"];
        i[1].as_f64().unwrap() - i[0].as_f64().unwrap()
    };
    // Replays alone bracket each offset within about ±1 ms (the replay is 1 ms after the commit).
    let plain = forensics(&corpus(d.path(), "plain", 3, &["--skew", "pay-2=45"]), &[]);
    assert!(width(&plain, "pay-2") >= 1.5, "{}", plain["clock"]);
    // Replayers that log taking the lock 250 us after the committer released it pin it closer.
    let locks = forensics(
        &corpus(
            d.path(),
            "locks",
            3,
            &["--replay-locks", "--skew", "pay-2=45"],
        ),
        &[],
    );
    assert_clock(&locks, "pay-2", None, -45.0);
    assert!(width(&locks, "pay-2") <= 1.0, "{}", locks["clock"]);
    assert_eq!(locks["totals"]["impossible_orderings"], 0);
    // pay-2's clock steps 3 ms back mid-run: its lock holdings now overlap the committers'.
    let logs = corpus(
        d.path(),
        "step",
        3,
        &["--replay-locks", "--step", "pay-2=-3@40"],
    );
    // Aligned, the step is found by the pairs that bracket it and followed.
    let got = forensics(&logs, &[]);
    assert_eq!(got["clock"]["hosts"]["pay-2"]["applied"], false);
    assert_steps(&got, "pay-2", -3.0, true);
    assert_eq!(got["totals"]["impossible_orderings"], 0);
    // Without alignment, its lock holdings overlap the committers'.
    let got = forensics(&logs, &["--no-align"]);
    let imp = got["impossible_orderings"].as_array().unwrap();
    assert!(!imp.is_empty());
    for i in imp {
        assert_eq!(i["kind"], "two_lock_holders", "{i}");
        assert!(i["hosts"][0] == "pay-2" || i["hosts"][1] == "pay-2", "{i}");
    }
}

#[test]
fn a_host_with_only_ledger_ids_is_aligned_by_them() {
    let d = tempfile::tempdir().unwrap();
    let ids = ["--solo-hosts", "1", "--ledger-ids"];
    let truth = forensics(&corpus(d.path(), "truth", 3, &ids), &["--no-align"]);
    let skewed = [&ids[..], &["--skew", "pay-3=300", "--skew", "pay-2=-150"]].concat();
    let logs = corpus(d.path(), "shifted", 3, &skewed);
    let got = forensics(&logs, &[]);
    // pay-3 takes part in no cross-host race: only the shared ledger sequence places it.
    let c = &got["clock"]["hosts"]["pay-3"];
    assert_eq!(c["applied"], true, "{c}");
    assert_eq!(c["evidence"], "ledger_ids", "{c}");
    let (lo, hi) = (
        c["interval_ms"][0].as_f64().unwrap(),
        c["interval_ms"][1].as_f64().unwrap(),
    );
    assert!(lo <= -300.0 && -300.0 <= hi && hi - lo <= 10.0, "{c}");
    // pay-2 is still placed by its orderings, as tightly as without ids.
    assert_clock(&got, "pay-2", None, 150.0);
    assert_eq!(got["clock"]["hosts"]["pay-2"]["evidence"], "orderings");
    assert_eq!(mismatch(&truth, &got), None);
    // Without the shared sequence (ids per order) pay-3 has no evidence and is left alone.
    let no_ids: Vec<&str> = skewed
        .iter()
        .copied()
        .filter(|a| *a != "--ledger-ids")
        .collect();
    let logs = corpus(d.path(), "no-ids", 3, &no_ids);
    let c = &forensics(&logs, &[])["clock"]["hosts"]["pay-3"];
    assert_eq!(c["applied"], false, "{c}");
}

#[test]
fn a_zone_less_host_with_no_other_evidence_gets_its_zone_from_the_event_rate() {
    let d = tempfile::tempdir().unwrap();
    let logs = corpus(
        d.path(),
        "shifted",
        3,
        &[
            "--solo-hosts",
            "1",
            "--local",
            "pay-3=+05:30",
            "--skew",
            "pay-3=300",
            "--skew",
            "pay-2=-150",
        ],
    );
    let got = forensics(&logs, &[]);
    // pay-3 shares no order and no ledger sequence with the others: only its events per
    // second, rising and falling with theirs 5 h 30 min later, say where its zone is.
    let c = &got["clock"]["hosts"]["pay-3"];
    assert_eq!(c["applied"], true, "{c}");
    assert_eq!(c["evidence"], "event_rate", "{c}");
    assert_eq!(c["zone"], "+05:30", "{c}");
    assert_eq!(c["constraints"], 0, "{c}");
    // Weak evidence names the zone, never a millisecond skew; strong evidence is not touched.
    assert_eq!(c["skew_ms"], 0.0, "{c}");
    assert_clock(&got, "pay-2", None, 150.0);
    assert_eq!(got["clock"]["hosts"]["pay-2"]["evidence"], "orderings");
    // With the zone given, there is nothing left for the event rate to say.
    let given = forensics(&logs, &["--tz", "+05:30"]);
    assert_eq!(given["clock"]["hosts"]["pay-3"]["applied"], false);
}

#[test]
fn a_clock_step_after_the_sample_is_found_by_the_merge() {
    let d = tempfile::tempdir().unwrap();
    // pay-2's clock jumps 600 ms ahead 60 s into an 80 s run: about three quarters into its file.
    let logs = corpus(d.path(), "late-step", 3, &["--step", "pay-2=600@60"]);
    // The sample (256 KiB of each ~1.2 MB file) ends long before the step: it sees none.
    let got = forensics(&logs, &["--align-sample-bytes", "262144"]);
    assert_eq!(got["clock"]["hosts"]["pay-2"]["applied"], true);
    assert_steps(&got, "pay-2", 600.0, true);
    // Followed: every race window after the step is where it truly was.
    let truth = forensics(&corpus(d.path(), "truth", 3, &[]), &["--no-align"]);
    assert_eq!(mismatch(&truth, &got), None);
    assert_eq!(got["totals"]["impossible_orderings"], 0);
    let steps = got["clock"]["steps"].as_array().unwrap();
    // Seen against both other hosts, each saying pay-2 moved 600 ms ahead, from 21:01:00.
    assert_eq!(steps.len(), 2, "{steps:?}");
    for s in steps {
        assert_eq!(s["host"], "pay-2", "{s}");
        let by = s["by_ms"].as_f64().unwrap();
        let by = if s["hosts"][1] == "pay-2" { by } else { -by };
        assert!((by - 600.0).abs() <= 2.0, "{s}");
        let at = us(s["at"].as_str().unwrap());
        assert!(
            (us("2026-11-25T21:01:00Z")..us("2026-11-25T21:01:02Z")).contains(&at),
            "{s}"
        );
    }
    let notes: Vec<&str> = got["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("pay-2: its clock stepped by +600.0 ms")
                && n.contains("moved back")),
        "{notes:?}"
    );
    // A healthy corpus shows no step.
    let healthy = forensics(&corpus(d.path(), "healthy", 3, &[]), &[]);
    assert!(healthy["clock"]["steps"].as_array().unwrap().is_empty());
}
