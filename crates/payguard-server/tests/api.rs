//! The engine issue's promises, shown over real HTTP against a real database:
//! the money promises on every backend (`on_each_backend!`: SQLite, and
//! PostgreSQL when `PAYGUARD_TEST_POSTGRES_URL` is set), the rest on SQLite,
//! whose file some of them read directly.

mod common;

use common::{spawn_app, spawn_app_with};
use futures::future::join_all;
use payguard::EngineConfig;
use payguard_testkit::on_each_backend;
use serde_json::{json, Value};
use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_deducts_charge_once() {
    // The first deduct waits 300 ms in its lane for its batch to fill, and the
    // 200 requests go over connections opened beforehand, so the other 199
    // arrive while it is in flight even on a loaded machine: the race is made
    // certain, not left to the scheduler. (A duplicate that arrives after the
    // charge committed is a replay from the order cache on SQLite, which never
    // meets the lane: with 20 ms and new connections, a cold CI run once saw no
    // collision at all.)
    let opts = payguard_testkit::AppOptions {
        engine: EngineConfig {
            instance_id: "test-1".into(),
            batch_wait_us: 300_000,
            ..EngineConfig::default()
        },
        ..payguard_testkit::AppOptions::instance("test-1")
    };
    on_each_backend!("two_hundred_concurrent_deducts_charge_once", opts.clone(), app => {
        app.account("acct-1", 1_000_000).await;
        app.order("OD20240517A1122", "acct-1", 1185).await;

        // 200 keep-alive connections, open before the race starts.
        let warm = (0..200).map(|_| app.send(app.client.get(app.url("/healthz"))));
        for r in join_all(warm).await {
            assert_eq!(r.status, 200);
        }
        let calls = (0..200).map(|i| {
            let req = app
                .client
                .post(app.url("/v1/orders/OD20240517A1122/deduct"))
                .header("x-request-id", format!("dup-{i}"));
            app.send(req)
        });
        let responses = join_all(calls).await;

        let mut entry_ids = HashSet::new();
        let mut fresh = 0;
        for r in &responses {
            assert_eq!(r.status, 200, "{:?}", r.body);
            entry_ids.insert(r.body["entry"]["id"].as_str().unwrap().to_owned());
            if r.body["replayed"] == json!(false) {
                fresh += 1;
            } else {
                assert_eq!(r.body["replayed"], json!(true));
            }
            assert_eq!(r.body["order"]["status"], "PAID");
        }
        assert_eq!(entry_ids.len(), 1, "every response names the same entry");
        assert_eq!(
            fresh, 1,
            "exactly one response is the original, 199 are replays"
        );

        let entries = app.get("/v1/orders/OD20240517A1122/entries").await;
        let entries = entries.body["entries"].as_array().unwrap().clone();
        assert_eq!(entries.len(), 1, "one debit entry: {entries:?}");
        assert_eq!(entries[0]["kind"], "debit");
        assert_eq!(entries[0]["amount"], 1185);
        assert_eq!(app.balance("acct-1").await, 1_000_000 - 1185);

        // The duplicates really collided: they shared the first one's result in the lane.
        let stats = app.engine.stats();
        let joined = payguard::engine::EngineStats::get(&stats.joined);
        let collisions = payguard::engine::EngineStats::get(&stats.collisions);
        assert!(
            collisions > 0,
            "the race sentinel saw no concurrent request"
        );
        assert!(joined > 0, "no duplicate joined an in-flight deduct");

        let audit = app.get("/v1/audit").await;
        assert_eq!(audit.body["ok"], json!(true), "{:?}", audit.body);
        app.stop().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_racing_refunds_never_exceed_the_amount() {
    on_each_backend!("fifty_racing_refunds_never_exceed_the_amount", app => {
        app.account("acct-r", 10_000).await;
        app.order("order-r", "acct-r", 1_000).await;
        assert_eq!(
            app.post_empty("/v1/orders/order-r/deduct").await.status,
            200
        );
        assert_eq!(app.balance("acct-r").await, 9_000);

        let calls = (0..50).map(|i| {
            app.post(
                "/v1/orders/order-r/refunds",
                json!({"id": format!("refund-{i}"), "amount": 70}),
            )
        });
        let responses = join_all(calls).await;
        let ok = responses.iter().filter(|r| r.status == 200).count();
        for r in &responses {
            match r.status {
                200 => assert_eq!(r.body["entry"]["kind"], "refund"),
                409 => assert_eq!(r.body["error"]["code"], "refund_exceeds_paid"),
                s => panic!("unexpected status {s}: {:?}", r.body),
            }
        }
        assert_eq!(ok, 14, "14 × 70 = 980 fits in 1000, a 15th would not");
        let order = app.get("/v1/orders/order-r").await.body;
        assert_eq!(order["refunded"], 980);
        assert_eq!(order["status"], "PARTIALLY_REFUNDED");
        assert_eq!(app.balance("acct-r").await, 9_980);

        // The last 20 fit exactly; one more id then crosses it.
        let r = app
            .post(
                "/v1/orders/order-r/refunds",
                json!({"id": "last", "amount": 20}),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["order"]["status"], "REFUNDED");
        let r = app
            .post(
                "/v1/orders/order-r/refunds",
                json!({"id": "one-more", "amount": 1}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (409, json!("refund_exceeds_paid"))
        );
        // A deduct after refunds is a replay and moves nothing.
        let r = app.post_empty("/v1/orders/order-r/deduct").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["replayed"], json!(true));
        assert_eq!(r.body["order"]["status"], "REFUNDED");
        assert_eq!(app.balance("acct-r").await, 10_000);
        assert_eq!(app.get("/v1/audit").await.body["ok"], json!(true));
        app.stop().await;
    });
}

#[tokio::test]
async fn insufficient_funds_is_402_and_stays_402() {
    on_each_backend!("insufficient_funds_is_402_and_stays_402", app => {
        app.account("poor", 50).await;
        app.order("too-big", "poor", 100).await;
        for _ in 0..3 {
            let r = app.post_empty("/v1/orders/too-big/deduct").await;
            assert_eq!(r.status, 402, "{:?}", r.body);
            assert_eq!(r.body["error"]["code"], "insufficient_funds");
        }
        let order = app.get("/v1/orders/too-big").await.body;
        assert_eq!(order["status"], "FAILED");
        assert_eq!(order["failure_reason"], "insufficient_funds");
        assert_eq!(app.balance("poor").await, 50);
        // Even once money arrives elsewhere, FAILED is terminal: still 402.
        app.order("small", "poor", 50).await;
        assert_eq!(app.post_empty("/v1/orders/small/deduct").await.status, 200);
        assert_eq!(
            app.post_empty("/v1/orders/too-big/deduct").await.status,
            402
        );
        assert_eq!(app.balance("poor").await, 0);
        // A refund of a FAILED order is refused.
        let r = app
            .post(
                "/v1/orders/too-big/refunds",
                json!({"id": "rf", "amount": 1}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (409, json!("order_not_paid"))
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn overdraft_race_on_one_account_never_goes_negative() {
    on_each_backend!("overdraft_race_on_one_account_never_goes_negative", app => {
        app.account("shared", 1_000).await;
        for i in 0..30 {
            app.order(&format!("od-{i}"), "shared", 100).await;
        }
        let calls = (0..30).map(|i| app.post_empty_owned(format!("/v1/orders/od-{i}/deduct")));
        let responses = join_all(calls).await;
        let paid = responses.iter().filter(|r| r.status == 200).count();
        let refused = responses.iter().filter(|r| r.status == 402).count();
        assert_eq!((paid, refused), (10, 20));
        assert_eq!(app.balance("shared").await, 0);
        assert_eq!(app.get("/v1/audit").await.body["ok"], json!(true));
        app.stop().await;
    });
}

/// The same overdraft race on the incident's design (`Guard::Naive` on the naive
/// schema: check the balance in memory, pause, act): the checks above must catch
/// it, or they would prove nothing on payguard.
#[tokio::test]
async fn the_overdraft_checks_catch_the_naive_design() {
    let app = spawn_app_with(EngineConfig {
        guard: payguard::engine::Guard::Naive { gap_ms: 5 },
        ..EngineConfig::default()
    })
    .await;
    app.account("shared", 1_000).await;
    for i in 0..30 {
        app.order(&format!("od-{i}"), "shared", 100).await;
    }
    let calls = (0..30).map(|i| app.post_empty_owned(format!("/v1/orders/od-{i}/deduct")));
    let responses = join_all(calls).await;
    let paid = responses.iter().filter(|r| r.status == 200).count();
    let balance = app.balance("shared").await;
    let audit_ok = app.get("/v1/audit").await.body["ok"] == json!(true);
    assert!(
        paid > 10 || balance != 1_000 - 100 * paid as i64 || balance < 0 || !audit_ok,
        "the naive design passed the overdraft checks: {paid} paid, balance {balance}, audit ok {audit_ok}"
    );
    eprintln!(
        "naive: {paid} of 30 paid on a balance of 1000, balance now {balance}, audit ok {audit_ok}"
    );
    app.stop().await;
}

trait PostOwned {
    fn post_empty_owned(&self, path: String) -> impl std::future::Future<Output = common::Resp>;
}

impl PostOwned for payguard_testkit::TestApp {
    async fn post_empty_owned(&self, path: String) -> common::Resp {
        self.post_empty(&path).await
    }
}

#[tokio::test]
async fn creates_and_refunds_replay_or_conflict_as_documented() {
    on_each_backend!("creates_and_refunds_replay_or_conflict_as_documented", app => {
        let body = json!({"id": "a1", "balance": 500, "currency": "USD"});
        assert_eq!(app.post("/v1/accounts", body.clone()).await.status, 201);
        let again = app.post("/v1/accounts", body.clone()).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body["currency"], "USD");
        let other = app
            .post(
                "/v1/accounts",
                json!({"id": "a1", "balance": 501, "currency": "USD"}),
            )
            .await;
        assert_eq!(
            (other.status, other.body["error"]["code"].clone()),
            (409, json!("account_exists"))
        );

        let order = json!({"id": "o1", "account_id": "a1", "amount": 200});
        let created = app.post("/v1/orders", order.clone()).await;
        assert_eq!(created.status, 201);
        assert_eq!(created.body["status"], "PREPARE");
        assert_eq!(created.body["debit_entry_id"], Value::Null);
        assert_eq!(app.post("/v1/orders", order).await.status, 200);
        let r = app
            .post(
                "/v1/orders",
                json!({"id": "o1", "account_id": "a1", "amount": 201}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (409, json!("order_exists"))
        );
        let r = app
            .post(
                "/v1/orders",
                json!({"id": "o2", "account_id": "nobody", "amount": 1}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (404, json!("account_not_found"))
        );

        // The same account body after money moved is still a 200 replay.
        let paid = app.post("/v1/orders/o1/deduct", json!({})).await;
        assert_eq!(paid.status, 200, "{:?}", paid.body);
        assert_eq!(paid.body["entry"]["balance_after"], 300);
        let again = app.post("/v1/accounts", body).await;
        assert_eq!(
            (again.status, again.body["balance"].clone()),
            (200, json!(300))
        );

        let refund = json!({"id": "rf-1", "amount": 50});
        let first = app.post("/v1/orders/o1/refunds", refund.clone()).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.body["replayed"], json!(false));
        assert_eq!(first.body["order"]["status"], "PARTIALLY_REFUNDED");
        let second = app.post("/v1/orders/o1/refunds", refund).await;
        assert_eq!(second.status, 200);
        assert_eq!(second.body["replayed"], json!(true));
        assert_eq!(second.body["entry"]["id"], first.body["entry"]["id"]);
        let r = app
            .post("/v1/orders/o1/refunds", json!({"id": "rf-1", "amount": 51}))
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (409, json!("refund_exists"))
        );
        app.order("o3", "a1", 10).await;
        assert_eq!(app.post_empty("/v1/orders/o3/deduct").await.status, 200);
        let r = app
            .post("/v1/orders/o3/refunds", json!({"id": "rf-1", "amount": 50}))
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].clone()),
            (409, json!("refund_exists"))
        );
        // A rejected refund stores nothing: the id is still free later.
        let r = app
            .post(
                "/v1/orders/o3/refunds",
                json!({"id": "rf-big", "amount": 11}),
            )
            .await;
        assert_eq!(r.status, 409);
        let r = app
            .post(
                "/v1/orders/o3/refunds",
                json!({"id": "rf-big", "amount": 10}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["order"]["status"].clone()),
            (200, json!("REFUNDED"))
        );

        let entries = app.get("/v1/orders/o1/entries").await.body["entries"].clone();
        let kinds: Vec<_> = entries
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, vec!["debit", "refund"]);
        assert_eq!(app.balance("a1").await, 500 - 200 + 50 - 10 + 10);
        assert_eq!(app.get("/v1/audit").await.body["ok"], json!(true));
        app.stop().await;
    });
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app().await;
    let r = app
        .send(
            app.client
                .get(app.url("/healthz"))
                .header("x-request-id", "trace-42"),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-42");
    assert_eq!(r.body["status"], "ok");
    assert_eq!(r.body["store"], "sqlite");
    assert_eq!(r.body["guard"], "full");
    assert_eq!(r.body["instance"], "test-1");
    let r = app
        .send(
            app.client
                .get(app.url("/healthz"))
                .header("x-request-id", "bad id!"),
        )
        .await;
    let generated = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(generated, "bad id!");
    assert!(!generated.is_empty() && generated.len() <= 64);
    let r = app.get("/v1/orders/none").await;
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (404, json!("order_not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn audit_is_ok_then_sees_a_corrupted_balance() {
    let app = spawn_app().await;
    app.account("acct-a", 1_000).await;
    app.order("o-a", "acct-a", 300).await;
    assert_eq!(app.post_empty("/v1/orders/o-a/deduct").await.status, 200);
    let audit = app.get("/v1/audit").await.body;
    assert_eq!(audit["ok"], json!(true), "{audit:?}");
    assert_eq!(audit["accounts_checked"], 1);
    assert_eq!(audit["orders_checked"], 1);
    assert_eq!(audit["entries_checked"], 1);

    // Someone edits the balance by hand: the ledger no longer explains it.
    app.sql("UPDATE accounts SET balance = balance + 5 WHERE id = 'acct-a'");
    let audit = app.get("/v1/audit").await.body;
    assert_eq!(audit["ok"], json!(false));
    assert_eq!(
        audit["balance_mismatches"],
        json!([{"account_id": "acct-a", "expected": 700, "actual": 705}])
    );
    app.stop().await;
}

/// Every bad input gets its documented status and leaves every table unchanged.
#[tokio::test]
async fn bad_input_gets_documented_4xx_and_changes_nothing() {
    let app = spawn_app().await;
    app.account("acct-b", 1_000).await;
    app.order("prep", "acct-b", 100).await;
    let before = app.dump();

    let big = "x".repeat(70 * 1024);
    let json_ct = "application/json";
    // (method, path, content type, raw body, status, code)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":".into(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "not json".into(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":\"10\"}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":10,\"extra\":1}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\"}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":-1}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":9007199254740992}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":18446744073709551616}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":10.5}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":1e3}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n 1\",\"balance\":10}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"\",\"balance\":10}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            format!("{{\"id\":\"{}\",\"balance\":10}}", "a".repeat(65)),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "{\"id\":\"n1\",\"balance\":10,\"currency\":\"usd\"}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "[]".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            "[\"n1\", 10, null]".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/prep/deduct",
            Some(json_ct),
            "[]".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts",
            Some("text/plain"),
            "{\"id\":\"n1\",\"balance\":10}".into(),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/accounts",
            None,
            "{\"id\":\"n1\",\"balance\":10}".into(),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/accounts",
            Some(json_ct),
            format!("{{\"id\":\"n1\",\"balance\":10,\"pad\":\"{big}\"}}"),
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/v1/orders",
            Some(json_ct),
            "{\"id\":\"n2\",\"account_id\":\"acct-b\",\"amount\":0}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders",
            Some(json_ct),
            "{\"id\":\"n2\",\"account_id\":\"acct-b\",\"amount\":-5}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders",
            Some(json_ct),
            "{\"id\":\"n2\",\"account_id\":\"acct-b\",\"amount\":9007199254740992}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders",
            Some(json_ct),
            "{\"id\":\"n2\",\"account_id\":\"acct b\",\"amount\":5}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders",
            Some(json_ct),
            "{\"id\":\"n2\",\"account_id\":\"nobody\",\"amount\":5}".into(),
            404,
            "account_not_found",
        ),
        (
            "POST",
            "/v1/orders/prep/deduct",
            Some(json_ct),
            "{\"amount\":1}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/prep/deduct",
            Some(json_ct),
            "{".into(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/orders/prep/deduct",
            Some("text/plain"),
            "hello".into(),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/orders/prep/deduct",
            Some(json_ct),
            big.clone(),
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/v1/orders/bad%20id/deduct",
            None,
            String::new(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/nope/deduct",
            None,
            String::new(),
            404,
            "order_not_found",
        ),
        (
            "POST",
            "/v1/orders/prep/refunds",
            Some(json_ct),
            "{\"id\":\"r1\",\"amount\":5}".into(),
            409,
            "order_not_paid",
        ),
        (
            "POST",
            "/v1/orders/prep/refunds",
            Some(json_ct),
            "{\"id\":\"r1\",\"amount\":0}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/prep/refunds",
            Some(json_ct),
            "{\"id\":\"r 1\",\"amount\":5}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/prep/refunds",
            Some(json_ct),
            "{\"amount\":5}".into(),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/orders/nope/refunds",
            Some(json_ct),
            "{\"id\":\"r1\",\"amount\":5}".into(),
            404,
            "order_not_found",
        ),
        (
            "GET",
            "/v1/orders/prep/deduct",
            None,
            String::new(),
            405,
            "method_not_allowed",
        ),
        (
            "DELETE",
            "/v1/accounts/acct-b",
            None,
            String::new(),
            405,
            "method_not_allowed",
        ),
        (
            "GET",
            "/v1/nothing-here",
            None,
            String::new(),
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/accounts/nobody",
            None,
            String::new(),
            404,
            "account_not_found",
        ),
        (
            "GET",
            "/v1/orders/nope/entries",
            None,
            String::new(),
            404,
            "order_not_found",
        ),
    ];
    for (method, path, ct, body, status, code) in cases {
        let mut req = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .body(body.clone());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = app.send(req).await;
        let shown: String = body.chars().take(80).collect();
        assert_eq!(r.status, status, "{method} {path} {shown:?}: {:?}", r.body);
        assert_eq!(
            r.body["error"]["code"], code,
            "{method} {path} {shown:?}: {:?}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path}: error without a message"
        );
    }
    assert_eq!(
        app.dump(),
        before,
        "a rejected request changed the database"
    );
    app.stop().await;
}

/// SIGTERM's path: requests accepted before shutdown are answered, and every
/// acknowledged charge is in the ledger afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_answers_and_keeps_every_acknowledged_charge() {
    let mut app = spawn_app_with(EngineConfig {
        batch_wait_us: 2_000,
        ..EngineConfig::default()
    })
    .await;
    app.account("acct-s", 1_000_000).await;
    for i in 0..100 {
        app.order(&format!("s-{i}"), "acct-s", 10).await;
    }
    let client = app.client.clone();
    let base = app.base.clone();
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/orders/s-{i}/deduct");
            tokio::spawn(async move {
                match client.post(url).send().await {
                    Ok(r) => Some(r.status().as_u16()),
                    Err(_) => None,
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    app.trigger_shutdown();
    let mut acked = 0;
    for (i, c) in calls.into_iter().enumerate() {
        match c.await.unwrap() {
            Some(200) => acked += 1,
            Some(503) | None => {}
            Some(s) => panic!("s-{i}: unexpected status {s}"),
        }
    }
    app.wait_stopped().await;
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    let debits: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM entries WHERE kind = 'debit'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(acked > 0, "no request was answered before shutdown");
    assert!(
        debits >= acked,
        "{acked} charges acknowledged but only {debits} in the ledger"
    );
    let report = payguard::store::sqlite::audit_connection(
        &mut rusqlite::Connection::open(&app.db_path).unwrap(),
    )
    .unwrap();
    assert!(report.ok, "{report:?}");
}

/// The OpenAPI document links creates to what follows them (schemathesis's
/// stateful phase walks these), with the Link Object's fields in the spec's camel
/// case (utoipa 5.5 writes `operation_id`; see `openapi::document`).
#[tokio::test]
async fn the_openapi_document_links_operations_in_spec_case() {
    let app = spawn_app().await;
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    let links = &r.body["paths"]["/v1/orders"]["post"]["responses"]["201"]["links"];
    assert_eq!(links["Deduct"]["operationId"], "deduct", "{links}");
    assert_eq!(links["Deduct"]["parameters"]["id"], "$response.body#/id");
    let text = r.body.to_string();
    assert!(
        !text.contains("\"operation_id\""),
        "snake case left in the document"
    );
    let deduct_links =
        &r.body["paths"]["/v1/orders/{id}/deduct"]["post"]["responses"]["200"]["links"];
    assert_eq!(deduct_links["Refund"]["operationId"], "refund");
    app.stop().await;
}

/// One app per SQLite file: the engine answers replays of paid orders from its
/// cache, which holds only while no other app writes the file. A second app on
/// the same file (a second `payguard serve`) refuses to start and says why; once
/// the first has stopped, the file is free again.
#[tokio::test]
async fn a_second_app_on_the_same_sqlite_file_refuses_to_start() {
    use payguard::store::sqlite::SqliteConfig;
    use payguard_server::app::{self, AppSpec, Database};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.db");
    let spec = || {
        AppSpec::new(
            Database::Sqlite(SqliteConfig::new(&path)),
            EngineConfig::default(),
        )
    };
    let first = app::build(spec()).await.unwrap();
    let refused = |r: anyhow::Result<app::App>| match r {
        Ok(_) => panic!("a second app started on {}", path.display()),
        Err(e) => format!("{e:#}"),
    };
    let why = refused(app::build(spec()).await);
    assert!(
        why.contains("another payguard app is serving") && why.contains("one.db"),
        "{why}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = first.spawn(listener).unwrap();
    refused(app::build(spec()).await);
    running.stop().await.unwrap();
    let again = app::build(spec())
        .await
        .expect("the file is free once the first app has stopped");
    again.engine().shutdown().await.unwrap();
}
