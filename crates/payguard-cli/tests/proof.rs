//! The proof issue's promises: every check is first seen to fail on the naive
//! design (the incident), then to pass on `seed` and `full`.

use payguard::engine::Guard;
use payguard_cli::audit::{apply, fix_plan};
use payguard_cli::demo::LocalServer;
use payguard_cli::storm::{storm, StormArgs};
use rusqlite::Connection;
use std::path::Path;

fn args(url: &str, db: &Path, orders: usize, dup: usize, seed: u64) -> StormArgs {
    StormArgs {
        target: vec![url.to_owned()],
        api_key: None,
        orders,
        dup,
        concurrency: 64,
        duration: 120,
        refund_ratio: 0.3,
        poor_ratio: 0.0,
        seed,
        run_tag: Some(format!("t{seed}")),
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

fn dump(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut out = Vec::new();
    for table in ["accounts", "orders", "entries"] {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
            .unwrap();
        let cols = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..cols)
                    .map(|i| {
                        r.get::<_, rusqlite::types::Value>(i)
                            .map(|v| format!("{v:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap();
        for row in rows {
            out.push(format!("{table}: {}", row.unwrap().join(" ")));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_double_charges_and_audit_apply_pays_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("naive.db");
    let server = LocalServer::start(&db, Guard::Naive { gap_ms: 5 }, "naive-1")
        .await
        .unwrap();
    let report = storm(&args(&server.url, &db, 40, 8, 42)).await.unwrap();
    server.stop().await.unwrap();

    assert!(
        report.double_charged_orders > 0,
        "the naive design must double charge under 8 duplicates: {}",
        report.to_text()
    );
    assert!(report.money_lost > 0);
    assert!(!report.ok);
    let kinds: Vec<&str> = report.violations.iter().map(|v| v.kind).collect();
    assert!(kinds.contains(&"charged_more_than_once"), "{kinds:?}");
    assert!(kinds.contains(&"replays_disagree"), "{kinds:?}");
    assert_eq!(report.db_audit_ok, Some(false));
    assert_eq!(report.api_audit_ok, Some(false));

    // The aftermath: find every victim and pay them back, once.
    let mut conn = Connection::open(&db).unwrap();
    let before = payguard::store::sqlite::audit_connection(&mut conn).unwrap();
    assert!(!before.duplicate_debits.is_empty());
    let plan = fix_plan(&conn).unwrap();
    let extra_debits: i64 = before.duplicate_debits.iter().map(|d| d.count - 1).sum();
    assert_eq!(
        plan.len() as i64,
        extra_debits,
        "one reversal per extra debit"
    );
    let planned: i64 = plan.iter().map(|r| r.amount).sum();
    assert_eq!(
        planned, report.money_lost,
        "the plan pays back exactly what was lost"
    );

    let applied = apply(&mut conn).unwrap();
    assert_eq!(applied, plan);
    // Each pay-back is announced in its own transaction: one `order.reversed`
    // event per reversal entry, carrying it.
    let reversed: Vec<(i64, String)> = conn
        .prepare(
            "SELECT e.entry_id, x.kind FROM events e JOIN entries x ON x.id = e.entry_id
             WHERE e.type = 'order.reversed' ORDER BY e.seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reversed.len(), applied.len());
    assert!(reversed.iter().all(|(_, kind)| kind == "reversal"));
    // Downstream heard of every debit, the duplicates too: the naive design
    // announces each charge it makes (an order.paid per debit entry).
    let (paid_events, debits): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM events WHERE type = 'order.paid'),
                    (SELECT COUNT(*) FROM entries WHERE kind = 'debit')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(paid_events, debits);
    let after = payguard::store::sqlite::audit_connection(&mut conn).unwrap();
    assert!(after.ok, "{after:?}");
    assert!(after.duplicate_debits.is_empty());
    assert_eq!(after.resolved.len(), before.duplicate_debits.len());
    // Every balance is what it would have been had each order been charged once.
    let restored: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM accounts a WHERE a.balance <> a.opening_balance
               - (SELECT COALESCE(SUM(o.amount), 0) FROM orders o WHERE o.account_id = a.id AND o.status <> 'PREPARE' AND o.status <> 'FAILED')
               + (SELECT COALESCE(SUM(e.amount), 0) FROM entries e WHERE e.account_id = a.id AND e.kind = 'refund')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        restored, 0,
        "some balance is not opening − one charge per order + refunds"
    );

    // A second --apply changes nothing.
    let snapshot = dump(&db);
    assert!(apply(&mut conn).unwrap().is_empty());
    assert_eq!(dump(&db), snapshot);
}

async fn clean_storm(guard: Guard, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let server = LocalServer::start(&db, guard, name).await.unwrap();
    let (orders, dup) = (40, 8);
    let report = storm(&args(&server.url, &db, orders, dup, 42))
        .await
        .unwrap();
    server.stop().await.unwrap();
    assert!(report.ok, "{name}: {}", report.to_text());
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.money_lost, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    assert_eq!(report.api_audit_ok, Some(true));
    assert_eq!(
        report.paid_orders, orders,
        "no poor accounts: every order is paid"
    );
    assert_eq!(
        report.originals, orders,
        "{name}: one original answer per order"
    );
    assert!(
        report.replays >= (dup - 1) * orders,
        "{name}: {} replays, the duplicates did not all collide and replay",
        report.replays
    );
    assert!(report.refunds_moved > 0, "refunds were exercised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_storm_is_clean() {
    clean_storm(Guard::Full, "full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_storm_is_clean() {
    clean_storm(Guard::Seed, "seed").await;
}

#[test]
fn naive_refuses_to_start_without_the_flag_and_full_refuses_a_naive_db() {
    let dir = tempfile::tempdir().unwrap();
    let naive = dir.path().join("n.db");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args([
            "serve",
            "--guard",
            "naive",
            "--listen",
            "127.0.0.1:0",
            "--db",
        ])
        .arg(&naive)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DOUBLE CHARGES"), "{stderr}");
    assert!(stderr.contains("--i-know-this-double-charges"), "{stderr}");
    assert!(!naive.exists(), "nothing may be created before the refusal");

    // Create a naive database, then try to serve real money from it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = LocalServer::start(&naive, Guard::Naive { gap_ms: 1 }, "n")
            .await
            .unwrap();
        s.stop().await.unwrap();
    });
    for guard in ["full", "seed"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_payguard"))
            .args(["serve", "--guard", guard, "--listen", "127.0.0.1:0", "--db"])
            .arg(&naive)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{guard}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("naive"), "{guard}: {stderr}");
    }
}

/// The history checker: first seen failing on the naive design, then clean on full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_history_checker_fails_on_naive_and_holds_on_full() {
    use payguard_cli::storm::history;
    let dir = tempfile::tempdir().unwrap();
    for (name, guard) in [("naive", Guard::Naive { gap_ms: 5 }), ("full", Guard::Full)] {
        let db = dir.path().join(format!("{name}.db"));
        let server = LocalServer::start(&db, guard, name).await.unwrap();
        let mut a = args(&server.url, &db, 30, 8, 5);
        let file = dir.path().join(format!("{name}.history.jsonl"));
        a.history = Some(file.clone());
        a.poor_ratio = 0.2;
        let report = storm(&a).await.unwrap();
        server.stop().await.unwrap();
        let lines = history::read(&file).unwrap();
        assert!(
            lines.len() > 30 * 8 * 2,
            "{name}: the history records every request"
        );
        let violations = history::check(&lines).unwrap();
        let kinds: std::collections::BTreeSet<&str> = violations.iter().map(|v| v.kind).collect();
        match name {
            "naive" => {
                assert!(report.double_charged_orders > 0);
                assert!(kinds.contains("charged_more_than_once"), "{kinds:?}");
                assert!(kinds.contains("replays_disagree"), "{kinds:?}");
                assert!(kinds.contains("balance_outside_history"), "{kinds:?}");
            }
            _ => {
                assert!(report.ok, "{}", report.to_text());
                assert!(violations.is_empty(), "{violations:?}");
            }
        }
    }
}
