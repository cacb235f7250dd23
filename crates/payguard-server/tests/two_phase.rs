//! Two-phase payments (API.md "Two-phase payments") over real HTTP, on every
//! backend: each step exactly once under concurrent duplicates, races between
//! capture, void and expiry with one winner and every loser told who won, time
//! deciding expiry without a sweeper, refunds bounded by the captured sum, and the
//! held sums adding up in the audit afterwards. On PostgreSQL the races also run
//! over three instances with their duplicates spread across them (with Redis
//! locks when `PAYGUARD_TEST_REDIS_URL` is set).

mod common;

use futures::future::join_all;
use payguard::EngineConfig;
use payguard_server::TwoPhase;
use payguard_testkit::{AppOptions, Backend, Resp, TestApp, TestDb};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// An app whose sweeper runs every `sweep_ms` (0: none).
async fn app_on(db: &TestDb, name: &str, sweep_ms: u64, redis: Option<String>) -> TestApp {
    let opts = AppOptions {
        engine: EngineConfig {
            instance_id: name.into(),
            ..EngineConfig::default()
        },
        redis,
        two_phase: TwoPhase {
            sweep_interval_ms: sweep_ms,
            ..TwoPhase::default()
        },
        ..AppOptions::instance(name)
    };
    TestApp::spawn(db, opts).await
}

fn redis_url() -> Option<String> {
    std::env::var("PAYGUARD_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

async fn account_json(app: &TestApp, id: &str) -> Value {
    let r = app.get(&format!("/v1/accounts/{id}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

fn code(r: &Resp) -> &str {
    r.body["error"]["code"].as_str().unwrap_or("")
}

async fn audit_ok(app: &TestApp) {
    let audit = app.get("/v1/audit").await.body;
    assert_eq!(audit["ok"], json!(true), "{audit}");
    assert_eq!(audit["held_mismatches"], json!([]), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_step_is_exactly_once_and_refunds_stop_at_the_captured_sum() {
    let test = "each_step_is_exactly_once_and_refunds_stop_at_the_captured_sum";
    for backend in Backend::available(test) {
        eprintln!("{test} on {}", backend.name());
        let db = TestDb::create(backend).await;
        let app = app_on(&db, "tp-1", 0, None).await;
        app.account("acct", 10_000).await;
        app.order("o1", "acct", 1_000).await;

        // 50 duplicate authorizes, whatever their TTL: one hold.
        let holds = join_all(
            (0..50).map(|i| app.post("/v1/orders/o1/authorize", json!({"hold_ttl_s": 3600 + i}))),
        )
        .await;
        let mut entries = HashSet::new();
        let fresh = holds
            .iter()
            .inspect(|r| {
                assert_eq!(r.status, 200, "{:?}", r.body);
                assert_eq!(r.body["entry"]["kind"], "hold");
                entries.insert(r.body["entry"]["id"].to_string());
            })
            .filter(|r| r.body["replayed"] == json!(false))
            .count();
        assert_eq!((fresh, entries.len()), (1, 1), "one hold, one entry");
        let order = app.get("/v1/orders/o1").await.body;
        assert_eq!(order["status"], "AUTHORIZED");
        assert_eq!(order["held"], 1_000);
        assert!(order["hold_expires_at"].is_string(), "{order}");
        assert_eq!(order["captured"], Value::Null);
        let acct = account_json(&app, "acct").await;
        assert_eq!(
            (&acct["balance"], &acct["held"], &acct["available"]),
            (&json!(10_000), &json!(1_000), &json!(9_000))
        );

        // The paths never mix.
        let r = app.post_empty("/v1/orders/o1/deduct").await;
        assert_eq!((r.status, code(&r)), (409, "order_authorized"));
        // Above the hold: refused, nothing moves.
        let r = app
            .post("/v1/orders/o1/capture", json!({"amount": 1_001}))
            .await;
        assert_eq!((r.status, code(&r)), (409, "capture_exceeds_hold"));
        for bad in [
            json!({"amount": 0}),
            json!({"amount": -5}),
            json!({"amount": 1.5}),
        ] {
            let r = app.post("/v1/orders/o1/capture", bad.clone()).await;
            assert_eq!((r.status, code(&r)), (422, "invalid_request"), "{bad}");
        }

        // 20 duplicate partial captures: one capture, the rest of the hold released.
        let captures =
            join_all((0..20).map(|_| app.post("/v1/orders/o1/capture", json!({"amount": 600}))))
                .await;
        let mut entries = HashSet::new();
        let fresh = captures
            .iter()
            .inspect(|r| {
                assert_eq!(r.status, 200, "{:?}", r.body);
                assert_eq!(r.body["entry"]["kind"], "capture");
                assert_eq!(r.body["entry"]["amount"], 600);
                entries.insert(r.body["entry"]["id"].to_string());
            })
            .filter(|r| r.body["replayed"] == json!(false))
            .count();
        assert_eq!((fresh, entries.len()), (1, 1), "one capture, one entry");
        // The losers are told who won; the winner's repeat replays.
        let r = app.post_empty("/v1/orders/o1/capture").await;
        assert_eq!((r.status, code(&r)), (409, "hold_already_captured"));
        let r = app.post_empty("/v1/orders/o1/void").await;
        assert_eq!((r.status, code(&r)), (409, "hold_already_captured"));
        let r = app
            .post("/v1/orders/o1/capture", json!({"amount": 600}))
            .await;
        assert_eq!((r.status, &r.body["replayed"]), (200, &json!(true)));
        let r = app.post_empty("/v1/orders/o1/authorize").await;
        assert_eq!((r.status, &r.body["entry"]["kind"]), (200, &json!("hold")));

        let order = app.get("/v1/orders/o1").await.body;
        assert_eq!(
            (&order["status"], &order["captured"], &order["held"]),
            (&json!("PAID"), &json!(600), &json!(0))
        );
        let acct = account_json(&app, "acct").await;
        assert_eq!(
            (&acct["balance"], &acct["held"], &acct["available"]),
            (&json!(9_400), &json!(0), &json!(9_400))
        );
        let kinds: Vec<(String, i64)> = app.get("/v1/orders/o1/entries").await.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["amount"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("hold".into(), 1_000),
                ("capture".into(), 600),
                ("release".into(), 400)
            ]
        );

        // 20 racing refunds of 100 each: 6 fit in the 600 captured, not in 1,000.
        let refunds = join_all((0..20).map(|i| {
            app.post(
                "/v1/orders/o1/refunds",
                json!({"id": format!("rf-{i}"), "amount": 100}),
            )
        }))
        .await;
        let ok = refunds.iter().filter(|r| r.status == 200).count();
        for r in &refunds {
            assert!(
                r.status == 200 || (r.status == 409 && code(r) == "refund_exceeds_paid"),
                "{:?}",
                r.body
            );
        }
        assert_eq!(ok, 6, "refunds stop at the captured 600");
        let order = app.get("/v1/orders/o1").await.body;
        assert_eq!(
            (&order["status"], &order["refunded"]),
            (&json!("REFUNDED"), &json!(600))
        );
        assert_eq!(app.balance("acct").await, 10_000);
        audit_ok(&app).await;
        let metrics = app.get_text("/metrics").await;
        for line in [
            "payguard_holds_authorized_total 1",
            "payguard_holds_captured_total 1",
            "payguard_holds_voided_total 0",
            "payguard_holds_open 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} not in /metrics");
        }
        app.stop().await;
        db.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_and_deducts_spend_only_what_is_available() {
    let test = "holds_and_deducts_spend_only_what_is_available";
    for backend in Backend::available(test) {
        eprintln!("{test} on {}", backend.name());
        let db = TestDb::create(backend).await;
        let app = app_on(&db, "tp-1", 0, None).await;
        app.account("acct", 1_000).await;
        for (id, amount) in [("a", 800), ("b", 300), ("c", 200), ("d", 1)] {
            app.order(id, "acct", amount).await;
        }
        assert_eq!(app.post_empty("/v1/orders/a/authorize").await.status, 200);
        // 200 available: a 300 deduct and a 300 hold are refused.
        let r = app.post_empty("/v1/orders/b/deduct").await;
        assert_eq!((r.status, code(&r)), (402, "insufficient_funds"));
        assert_eq!(app.get("/v1/orders/b").await.body["status"], "FAILED");
        let r = app.post_empty("/v1/orders/b/authorize").await;
        assert_eq!((r.status, code(&r)), (402, "insufficient_funds"));
        assert_eq!(app.post_empty("/v1/orders/c/authorize").await.status, 200);
        let acct = account_json(&app, "acct").await;
        assert_eq!(
            (&acct["held"], &acct["available"]),
            (&json!(1_000), &json!(0))
        );
        let r = app.post_empty("/v1/orders/d/authorize").await;
        assert_eq!((r.status, code(&r)), (402, "insufficient_funds"));
        // A void gives it back.
        let r = app.post_empty("/v1/orders/c/void").await;
        assert_eq!(
            (r.status, &r.body["entry"]["kind"]),
            (200, &json!("release"))
        );
        let r = app.post_empty("/v1/orders/c/void").await;
        assert_eq!((r.status, &r.body["replayed"]), (200, &json!(true)));
        let r = app.post_empty("/v1/orders/c/capture").await;
        assert_eq!((r.status, code(&r)), (409, "hold_voided"));
        assert_eq!(app.get("/v1/orders/c").await.body["status"], "VOIDED");
        assert_eq!(account_json(&app, "acct").await["available"], 200);
        // Capture or void of an order never authorized.
        app.order("e", "acct", 5).await;
        assert_eq!(app.post_empty("/v1/orders/e/deduct").await.status, 200);
        for path in [
            "/v1/orders/e/capture",
            "/v1/orders/e/void",
            "/v1/orders/b/capture",
        ] {
            let r = app.post_empty(path).await;
            assert_eq!(
                (r.status, code(&r)),
                (409, "order_not_authorized"),
                "{path}"
            );
        }
        let r = app.post_empty("/v1/orders/e/authorize").await;
        assert_eq!((r.status, code(&r)), (409, "order_not_authorized"));
        let r = app.post_empty("/v1/orders/nope/capture").await;
        assert_eq!((r.status, code(&r)), (404, "order_not_found"));
        let r = app
            .post("/v1/orders/d/authorize", json!({"hold_ttl_s": 2_592_001}))
            .await;
        assert_eq!((r.status, code(&r)), (422, "invalid_request"));
        audit_ok(&app).await;
        app.stop().await;
        db.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_decides_expiry_and_the_sweeper_releases_each_hold_once() {
    let test = "time_decides_expiry_and_the_sweeper_releases_each_hold_once";
    for backend in Backend::available(test) {
        eprintln!("{test} on {}", backend.name());
        let db = TestDb::create(backend).await;
        // No sweeper: only time stands between the hold and its expiry.
        let app = app_on(&db, "tp-1", 0, None).await;
        app.account("acct", 1_000).await;
        app.order("x", "acct", 400).await;
        let r = app
            .post("/v1/orders/x/authorize", json!({"hold_ttl_s": 1}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        // A second hold nobody touches: the sweeper's.
        app.order("y", "acct", 100).await;
        let r = app
            .post("/v1/orders/y/authorize", json!({"hold_ttl_s": 1}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        // Time decides: a capture after the expiry is refused with no sweeper
        // running, and it writes the expiry it found, so whatever any other
        // instance's clock says later, the hold stays expired.
        let r = app.post_empty("/v1/orders/x/capture").await;
        assert_eq!((r.status, code(&r)), (409, "hold_expired"));
        let order = app.get("/v1/orders/x").await.body;
        assert_eq!(
            (&order["status"], &order["held"]),
            (&json!("EXPIRED"), &json!(0)),
            "the refused capture released the hold: {order}"
        );
        for path in ["/v1/orders/x/capture", "/v1/orders/x/void"] {
            let r = app.post_empty(path).await;
            assert_eq!((r.status, code(&r)), (409, "hold_expired"), "{path}");
        }
        let kinds = entry_kinds(&app, "x").await;
        assert_eq!(kinds, vec![json!("hold"), json!("release")], "one release");
        let events = app.get("/v1/events?limit=1000").await.body;
        let expiries: Vec<&Value> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "order.hold_expired")
            .collect();
        assert_eq!(expiries.len(), 1, "one expiry event: {events}");
        assert_eq!(expiries[0]["data"]["order"]["id"], "x");
        assert_eq!(expiries[0]["data"]["entry"]["kind"], "release");
        let order = app.get("/v1/orders/y").await.body;
        assert_eq!(order["status"], "AUTHORIZED", "no sweeper ran: {order}");
        assert_eq!(account_json(&app, "acct").await["held"], 100);

        // Three sweeps at once (three instances' ticks): one release.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let sweeps =
            join_all((0..3).map(|_| payguard::engine::sweeper::sweep_once(&app.engine, now))).await;
        let expired: u64 = sweeps.iter().map(|s| s.expired).sum();
        let failed: u64 = sweeps.iter().map(|s| s.failed).sum();
        assert_eq!((expired, failed), (1, 0), "{sweeps:?}");
        let again = payguard::engine::sweeper::sweep_once(&app.engine, now).await;
        assert_eq!(again, Default::default(), "nothing is due any more");
        let order = app.get("/v1/orders/y").await.body;
        assert_eq!(
            (&order["status"], &order["held"]),
            (&json!("EXPIRED"), &json!(0))
        );
        let acct = account_json(&app, "acct").await;
        assert_eq!(
            (&acct["balance"], &acct["held"]),
            (&json!(1_000), &json!(0))
        );
        let kinds = entry_kinds(&app, "y").await;
        assert_eq!(kinds, vec![json!("hold"), json!("release")]);
        let r = app.post_empty("/v1/orders/y/capture").await;
        assert_eq!((r.status, code(&r)), (409, "hold_expired"));
        let r = app.post_empty("/v1/orders/y/authorize").await;
        assert_eq!((r.status, &r.body["replayed"]), (200, &json!(true)));
        audit_ok(&app).await;
        app.stop().await;
        db.drop_db().await;
    }
}

/// The kinds of an order's ledger entries, in order.
async fn entry_kinds(app: &TestApp, order: &str) -> Vec<Value> {
    app.get(&format!("/v1/orders/{order}/entries")).await.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].clone())
        .collect()
}

/// What won an order's race, read from its final state.
fn winner(order: &Value) -> &'static str {
    match order["status"].as_str() {
        Some("PAID") => "capture",
        Some("VOIDED") => "void",
        Some("EXPIRED") => "expiry",
        other => panic!("the race left {other:?}: {order}"),
    }
}

/// Many orders, each raced by duplicate captures and voids sent around its
/// expiry, across `apps` (each with a sweeper every 20 ms): exactly one of
/// capture, void or expiry takes effect per order, every other answer is a
/// replay of the winner or the 409 naming it, and the money adds up.
async fn race(apps: &[TestApp]) {
    const ORDERS: usize = 24;
    const AMOUNT: i64 = 100;
    let app = &apps[0];
    app.account("racer", 1_000_000).await;
    for i in 0..ORDERS {
        app.order(&format!("r{i}"), "racer", AMOUNT).await;
        let r = app
            .post(
                &format!("/v1/orders/r{i}/authorize"),
                json!({"hold_ttl_s": 1}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Fire from just before the expiry to just after it, spread over instances.
    tokio::time::sleep(std::time::Duration::from_millis(550)).await;
    let calls = (0..ORDERS * 6).map(|k| {
        let i = k % ORDERS;
        let app = &apps[k % apps.len()];
        let path = if (k / ORDERS).is_multiple_of(2) {
            "capture"
        } else {
            "void"
        };
        async move {
            tokio::time::sleep(std::time::Duration::from_millis((k as u64 * 37) % 700)).await;
            (
                i,
                path,
                app.post_empty(&format!("/v1/orders/r{i}/{path}")).await,
            )
        }
    });
    let answers = join_all(calls).await;
    // Let the sweepers finish what expired.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut won: HashMap<&str, usize> = HashMap::new();
    let mut captured = 0;
    for i in 0..ORDERS {
        let order = app.get(&format!("/v1/orders/r{i}")).await.body;
        let w = winner(&order);
        *won.entry(w).or_default() += 1;
        if w == "capture" {
            captured += AMOUNT;
        }
        let mine: Vec<&(usize, &str, Resp)> = answers.iter().filter(|(o, _, _)| *o == i).collect();
        let fresh = mine
            .iter()
            .filter(|(_, _, r)| r.status == 200 && r.body["replayed"] == json!(false))
            .count();
        assert!(fresh <= 1, "order r{i}: {fresh} fresh answers");
        for (_, path, r) in &mine {
            let ok = match (w, *path, r.status) {
                (w, p, 200) => (w == "capture" && p == "capture") || (w == "void" && p == "void"),
                ("capture", _, 409) => code(r) == "hold_already_captured",
                ("void", _, 409) => code(r) == "hold_voided",
                ("expiry", _, 409) => code(r) == "hold_expired",
                _ => false,
            };
            assert!(
                ok,
                "order r{i} won by {w}: {path} answered {} {:?}",
                r.status, r.body
            );
        }
        if w != "expiry" {
            assert_eq!(fresh, 1, "order r{i} won by {w} without a fresh answer");
        }
        let kinds: Vec<Value> = app.get(&format!("/v1/orders/r{i}/entries")).await.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].clone())
            .collect();
        let want = match w {
            "capture" => vec![json!("hold"), json!("capture")],
            _ => vec![json!("hold"), json!("release")],
        };
        assert_eq!(kinds, want, "order r{i}");
    }
    eprintln!("race winners: {won:?}");
    assert!(
        won.len() >= 2,
        "the race should end in more than one way across {ORDERS} orders: {won:?}"
    );
    let acct = account_json(app, "racer").await;
    assert_eq!(acct["balance"], 1_000_000 - captured);
    assert_eq!(acct["held"], 0);
    audit_ok(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_void_and_expiry_race_with_one_winner() {
    let test = "capture_void_and_expiry_race_with_one_winner";
    for backend in Backend::available(test) {
        eprintln!("{test} on {}", backend.name());
        let db = TestDb::create(backend).await;
        let app = app_on(&db, "tp-1", 20, None).await;
        race(std::slice::from_ref(&app)).await;
        app.stop().await;
        db.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_race_capture_void_and_expiry_with_one_winner() {
    let test = "three_instances_race_capture_void_and_expiry_with_one_winner";
    if !Backend::available(test).contains(&Backend::Postgres) {
        return;
    }
    let db = TestDb::create(Backend::Postgres).await;
    let redis = redis_url();
    if redis.is_none() {
        eprintln!("SKIP the Redis locks of {test}: set PAYGUARD_TEST_REDIS_URL");
    }
    let mut apps = Vec::new();
    for name in ["tp-a", "tp-b", "tp-c"] {
        apps.push(app_on(&db, name, 20, redis.clone()).await);
    }
    race(&apps).await;
    for app in apps {
        app.stop().await;
    }
    db.drop_db().await;
}

/// The same race on the incident's design (`--guard naive`: check the cached
/// order, pause, act): duplicate captures both take the money and a void racing a
/// capture both happen, and the audit is seen catching it, or it would prove
/// nothing on payguard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checks_catch_double_captures_on_the_naive_design() {
    let app = common::spawn_app_with(EngineConfig {
        guard: payguard::engine::Guard::Naive { gap_ms: 5 },
        ..EngineConfig::default()
    })
    .await;
    app.account("naive", 100_000).await;
    const ORDERS: usize = 10;
    for i in 0..ORDERS {
        app.order(&format!("n{i}"), "naive", 100).await;
        let r = app.post_empty(&format!("/v1/orders/n{i}/authorize")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let calls = (0..ORDERS * 3).map(|k| {
        let i = k % ORDERS;
        let step = if k < ORDERS * 2 { "capture" } else { "void" };
        let path = format!("/v1/orders/n{i}/{step}");
        let app = &app;
        async move { app.post_empty(&path).await }
    });
    let answers = join_all(calls).await;
    let fresh = answers
        .iter()
        .filter(|r| r.status == 200 && r.body["replayed"] == json!(false))
        .count();
    let audit = app.get("/v1/audit").await.body;
    eprintln!(
        "naive: {fresh} fresh answers for {ORDERS} holds; audit ok {}, duplicate_debits {}, held_mismatches {}, entry_without_paid {}",
        audit["ok"],
        audit["duplicate_debits"].as_array().map_or(0, Vec::len),
        audit["held_mismatches"].as_array().map_or(0, Vec::len),
        audit["entry_without_paid"].as_array().map_or(0, Vec::len),
    );
    assert!(
        fresh > ORDERS,
        "the naive design took only one step per hold"
    );
    assert_eq!(audit["ok"], json!(false), "the audit missed it: {audit}");
    assert!(
        !audit["duplicate_debits"].as_array().unwrap().is_empty()
            || !audit["held_mismatches"].as_array().unwrap().is_empty(),
        "{audit}"
    );
    app.stop().await;
}
