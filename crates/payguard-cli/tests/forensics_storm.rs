//! Forensics on payguard's own logs: a naive-mode storm's log must show exactly
//! the double charges the database audit finds, and a full-mode storm's log none
//! (but many race windows: duplicates that collided and were answered once).

mod common;

use common::start;
use payguard_cli::storm::{storm, StormArgs};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn storm_args(url: &str, db: &Path) -> StormArgs {
    StormArgs {
        target: vec![url.to_owned()],
        api_key: None,
        orders: 40,
        dup: 8,
        concurrency: 64,
        duration: 120,
        refund_ratio: 0.2,
        poor_ratio: 0.1,
        seed: 99,
        run_tag: Some("fx".into()),
        db: Some(format!("sqlite://{}", db.display())),
        json: true,
        html: None,
        no_progress: true,
        history: None,
        // No fault injected: every request answered, quickly.
        faults: false,
        slow_ms: payguard_cli::storm::liveness::SLOW_MS_DEFAULT,
        two_phase: 0.0,
        hold_grace_ms: payguard_cli::storm::HOLD_GRACE_MS_DEFAULT,
    }
}

fn forensics(log: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args(["forensics", "--json"])
        .arg(log)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_storm_logs_show_exactly_the_audited_double_charges() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("naive-1.db");
    let server = start(
        dir.path(),
        "naive-1",
        db.to_str().unwrap(),
        &[
            "--guard",
            "naive",
            "--i-know-this-double-charges",
            "--naive-gap-ms",
            "5",
        ],
    );
    let report = storm(&storm_args(&server.url, &db)).await.unwrap();
    server.stop();
    assert!(report.double_charged_orders > 0, "{}", report.to_text());

    let mut conn = rusqlite::Connection::open(&db).unwrap();
    let audit = payguard::store::sqlite::audit_connection(&mut conn).unwrap();
    let audited: BTreeSet<String> = audit
        .duplicate_debits
        .iter()
        .map(|d| d.order_id.clone())
        .collect();
    let lost: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(e.amount), 0) FROM entries e WHERE e.kind = 'debit'
               AND e.id > (SELECT MIN(f.id) FROM entries f WHERE f.order_id = e.order_id AND f.kind = 'debit')",
            [],
            |r| r.get(0),
        )
        .unwrap();

    let (code, f) = forensics(&dir.path().join("naive-1.log"));
    assert_eq!(code, 1, "incidents found means exit 1");
    let found: BTreeSet<String> = f["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["order_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        found, audited,
        "forensics and the audit disagree on which orders"
    );
    assert_eq!(f["totals"]["amount_lost"].as_i64().unwrap(), lost);
    assert_eq!(report.money_lost, lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_storm_logs_show_race_windows_and_no_incident() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full-1.db");
    let server = start(dir.path(), "full-1", db.to_str().unwrap(), &[]);
    let report = storm(&storm_args(&server.url, &db)).await.unwrap();
    server.stop();
    assert!(report.ok, "{}", report.to_text());
    let (code, f) = forensics(&dir.path().join("full-1.log"));
    assert_eq!(code, 0);
    assert_eq!(f["incidents"].as_array().unwrap().len(), 0);
    assert!(
        f["totals"]["race_windows"].as_u64().unwrap() > 0,
        "8 colliding duplicates per order must show as race windows: {}",
        f["totals"]
    );
}
