//! Liveness is a checked property, and its checker is seen failing: `payguard
//! storm` against a stub whose money is always right but whose second instance
//! answers some deducts with 503 or 500, sleeps past `--slow-ms`, or cuts its
//! answer off. Without `--faults` each fails the run (exit 1) under its own
//! name; with `--faults` only the 500 does. `check-history` judges a recorded
//! history the same way. Bounded: a few seconds per test, no database.

mod stub;

use payguard_cli::storm::{liveness, storm, StormArgs};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use stub::{Behaviour, Ledger, Stub};

/// A healthy instance and one that misbehaves as told, on one ledger.
async fn pair(broken: Behaviour) -> (Stub, Stub) {
    let ledger = Ledger::shared();
    let healthy = stub::start(ledger.clone(), Behaviour::default()).await;
    let broken = stub::start(ledger, broken).await;
    (healthy, broken)
}

/// `payguard storm` against `targets` with `extra` flags: (exit code, stdout).
async fn storm_bin(targets: &[&str], tag: &str, extra: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args([
            "storm",
            "--orders",
            "24",
            "--dup",
            "4",
            "--concurrency",
            "16",
        ])
        .args(["--refund-ratio", "0.3", "--seed", "7", "--no-progress"])
        .args(["--run-tag", tag, "--target", &targets.join(",")])
        .args(extra)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "storm failed to run ({code}): {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn kind<'a>(report: &'a Value, name: &str) -> &'a Value {
    &report["liveness"]["kinds"][name]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_service_passes_a_strict_storm_and_each_target_is_reported() {
    let (a, b) = pair(Behaviour::default()).await;
    let report = storm(&StormArgs {
        target: vec![a.url.clone(), b.url.clone()],
        api_key: None,
        orders: 24,
        dup: 4,
        concurrency: 16,
        duration: 60,
        refund_ratio: 0.3,
        poor_ratio: 0.1,
        seed: 7,
        run_tag: Some("healthy".into()),
        db: None,
        json: true,
        html: None,
        history: None,
        faults: false,
        slow_ms: liveness::SLOW_MS_DEFAULT,
        two_phase: 0.0,
        hold_grace_ms: payguard_cli::storm::HOLD_GRACE_MS_DEFAULT,
        no_progress: true,
    })
    .await
    .unwrap();
    assert!(report.ok, "{}", report.to_text());
    for k in liveness::KINDS {
        assert_eq!(report.liveness.count(k), 0, "{k}");
        assert!(report.liveness.kinds[k].violation, "strict: {k} counts");
    }
    assert_eq!(report.per_target.len(), 2);
    for t in &report.per_target {
        assert!(t.requests > 24, "{}: {} requests", t.target, t.requests);
        assert_eq!(t.statuses.failed(), 0);
        assert!(!t.buckets.is_empty());
        assert_eq!(
            t.buckets.iter().map(|b| b.requests).sum::<usize>(),
            t.requests
        );
    }
    assert_eq!(
        report.per_target.iter().map(|t| t.requests).sum::<usize>(),
        report.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_without_faults_is_a_violation_and_with_faults_is_counted() {
    let (a, b) = pair(Behaviour {
        unavailable_every: Some(5),
        ..Behaviour::default()
    })
    .await;
    let targets = [a.url.as_str(), b.url.as_str()];
    let (code, text) = storm_bin(&targets, "u1", &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("unavailable"), "{text}");
    assert!(
        text.contains("answered 503 with no fault injected"),
        "{text}"
    );
    assert!(
        text.contains(&format!("→ {}: 503", b.url)),
        "an example: {text}"
    );

    let (code, out) = storm_bin(&targets, "u2", &["--json"]).await;
    assert_eq!(code, 1);
    let r = json(&out);
    let u = kind(&r, "unavailable");
    assert!(u["count"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(u["violation"], true);
    let ex = &u["examples"][0];
    assert_eq!(ex["target"], b.url.as_str());
    assert_eq!(ex["status"], 503);
    assert!(ex["order_id"].as_str().unwrap().starts_with("u2-o"), "{ex}");
    assert!(ex["latency_ms"].as_f64().is_some());
    let v = r["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "unavailable")
        .unwrap_or_else(|| panic!("{}", r["violations"]));
    assert_eq!(v["count"], u["count"]);
    let per_target = r["per_target"].as_array().unwrap();
    assert_eq!(per_target[0]["unavailable_503"], 0, "the healthy instance");
    assert_eq!(per_target[1]["unavailable_503"], u["count"]);

    let (code, out) = storm_bin(&targets, "u3", &["--json", "--faults"]).await;
    let r = json(&out);
    assert_eq!(code, 0, "{}", r["violations"]);
    assert!(kind(&r, "unavailable")["count"].as_u64().unwrap() > 0);
    assert_eq!(kind(&r, "unavailable")["violation"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_slow_ms_is_a_violation_and_shows_on_its_target() {
    let (a, b) = pair(Behaviour {
        slow_every: Some((12, Duration::from_millis(400))),
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("storm.html");
    let targets = [a.url.as_str(), b.url.as_str()];
    let flags = [
        "--json",
        "--slow-ms",
        "250",
        "--html",
        html.to_str().unwrap(),
    ];
    let (code, out) = storm_bin(&targets, "s1", &flags).await;
    assert_eq!(code, 1, "{out}");
    let r = json(&out);
    let slow = kind(&r, "slow_request");
    assert!(slow["count"].as_u64().unwrap() >= 3, "{slow}");
    assert_eq!(slow["violation"], true);
    assert_eq!(slow["examples"][0]["target"], b.url.as_str());
    assert!(slow["examples"][0]["latency_ms"].as_f64().unwrap() >= 250.0);
    let broken = &r["per_target"][1];
    assert!(broken["slow"].as_u64().unwrap() >= 3, "{broken}");
    assert!(broken["max_ms"].as_f64().unwrap() >= 400.0, "{broken}");
    let stalled = broken["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["max_ms"].as_f64().unwrap() >= 400.0)
        .count();
    assert!(stalled >= 1, "the stall shows in the target's buckets");
    assert_self_contained_page(&html, &targets);

    let (code, out) = storm_bin(&targets, "s2", &["--slow-ms", "250", "--faults"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("slow_request"), "{out}");
    assert!(out.contains("allowed: --faults"), "{out}");
}

fn assert_self_contained_page(html: &Path, targets: &[&str]) {
    let page = std::fs::read_to_string(html).unwrap();
    for t in targets {
        assert!(
            page.contains(&format!("<figcaption>{t}</figcaption><svg")),
            "a chart per target"
        );
    }
    assert!(page.contains("slow_request"));
    assert!(page.contains("VIOLATION"));
    assert!(
        !page.contains("<script") && !page.contains("src="),
        "no external assets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_is_a_violation_even_with_faults() {
    let (a, b) = pair(Behaviour {
        server_error_every: Some(9),
        ..Behaviour::default()
    })
    .await;
    let targets = [a.url.as_str(), b.url.as_str()];
    for (tag, extra) in [("e1", &[][..]), ("e2", &["--faults"][..])] {
        let (code, text) = storm_bin(&targets, tag, extra).await;
        assert_eq!(code, 1, "{tag}: {text}");
        assert!(text.contains("server_error"), "{tag}: {text}");
        assert!(text.contains(": 500 after"), "{tag}: an example: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_an_answer_is_a_violation_without_faults() {
    let (a, b) = pair(Behaviour {
        cut_every: Some(7),
        ..Behaviour::default()
    })
    .await;
    let targets = [a.url.as_str(), b.url.as_str()];
    let (code, out) = storm_bin(&targets, "n1", &["--json"]).await;
    assert_eq!(code, 1, "{out}");
    let r = json(&out);
    let n = kind(&r, "unanswered");
    assert!(n["count"].as_u64().unwrap() > 0, "{n}");
    assert_eq!(n["examples"][0]["status"], 0);
    // Cut mid-body, or before the status line went out: either way, no answer.
    let why = n["examples"][0]["error"].as_str().unwrap();
    assert!(["body", "reset"].contains(&why), "{n}");
    assert_eq!(r["per_target"][1]["unanswered"], n["count"]);

    let (code, out) = storm_bin(&targets, "n2", &["--json", "--faults"]).await;
    let r = json(&out);
    assert_eq!(
        code, 0,
        "lost answers are allowed with --faults: {}",
        r["violations"]
    );
    assert!(kind(&r, "unanswered")["count"].as_u64().unwrap() > 0);
}

/// The recorded history carries the run's rules: a strict run's 503s fail
/// `check-history`, `check-history --faults` allows them, and a history recorded
/// with `--faults` passes as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_history_judges_liveness_as_the_run_recorded() {
    let (a, b) = pair(Behaviour {
        unavailable_every: Some(5),
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let targets = [a.url.as_str(), b.url.as_str()];
    let check = |file: &Path, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_payguard"))
            .arg("check-history")
            .arg(file)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let strict = dir.path().join("strict.jsonl");
    let (code, _) = storm_bin(&targets, "h1", &["--history", strict.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    let (code, text) = check(&strict, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("unavailable"), "{text}");
    assert!(text.contains(&format!("→ {}: 503", b.url)), "{text}");
    let (code, text) = check(&strict, &["--faults"]);
    assert_eq!(code, 0, "{text}");

    let faults = dir.path().join("faults.jsonl");
    let flags = ["--faults", "--history", faults.to_str().unwrap()];
    let (code, _) = storm_bin(&targets, "h2", &flags).await;
    assert_eq!(code, 0);
    let (code, text) = check(&faults, &[]);
    assert_eq!(code, 0, "{text}");
    let (code, out) = check(&faults, &["--json"]);
    assert_eq!((code, json(&out)), (0, serde_json::json!([])));
}
