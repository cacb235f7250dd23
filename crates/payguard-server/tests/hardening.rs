//! The hardening issue's promises: API keys, Idempotency-Key, limits.

mod common;

use common::{spawn_app_full, spawn_app_on};
use futures::future::join_all;
use payguard::engine::EngineStats;
use payguard::EngineConfig;
use payguard_server::{ApiKeys, Limits};
use serde_json::json;

const KEY_A: &str = "key-a-0123456789abcdef";
const KEY_B: &str = "key-b-0123456789abcdef";

fn keys() -> ApiKeys {
    ApiKeys::new([KEY_A, KEY_B]).unwrap()
}

async fn keyed_app() -> common::TestApp {
    spawn_app_full(EngineConfig::default(), keys(), Limits::default()).await
}

fn post(app: &common::TestApp, path: &str, key: &str) -> reqwest::RequestBuilder {
    app.client.post(app.url(path)).bearer_auth(key)
}

async fn setup(app: &common::TestApp, key: &str) {
    let r = app
        .send(post(app, "/v1/accounts", key).json(&json!({"id": "acct", "balance": 100_000})))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    for o in ["o1", "o2"] {
        let r = app
            .send(
                post(app, "/v1/orders", key)
                    .json(&json!({"id": o, "account_id": "acct", "amount": 1_000})),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_and_changes_nothing() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let before = app.dump();
    for auth in [
        None,
        Some("Bearer wrong-key-0123456789"),
        Some("Basic a2V5"),
        Some("Bearer "),
    ] {
        for (path, body) in [
            ("/v1/orders/o1/deduct", None),
            ("/v1/accounts", Some(json!({"id": "x", "balance": 1}))),
            (
                "/v1/orders/o1/refunds",
                Some(json!({"id": "r", "amount": 1})),
            ),
        ] {
            let mut req = app.client.post(app.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = app.send(req).await;
            assert_eq!(r.status, 401, "{auth:?} {path}");
            assert_eq!(r.body["error"]["code"], "unauthorized");
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
    }
    let r = app.get("/v1/orders/o1").await;
    assert_eq!(r.status, 401, "reads need a key too");
    assert_eq!(app.dump(), before);
    // Public routes need none.
    assert_eq!(app.get("/healthz").await.status, 200);
    // And the right key works.
    let r = app.send(post(&app, "/v1/orders/o1/deduct", KEY_B)).await;
    assert_eq!(r.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn same_idempotency_key_twice_replays_byte_for_byte() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let send = || {
        app.client
            .post(app.url("/v1/orders/o1/refunds"))
            .bearer_auth(KEY_A)
            .header("idempotency-key", "refund-o1-1")
            .header("content-type", "application/json")
    };
    assert_eq!(
        app.send(post(&app, "/v1/orders/o1/deduct", KEY_A))
            .await
            .status,
        200
    );
    let first = send()
        .body(r#"{"id":"rf1","amount":300}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_bytes = first.bytes().await.unwrap();
    // Same key, same body with other key order and spacing: a replay.
    let second = send()
        .body("{ \"amount\": 300,\n \"id\": \"rf1\" }")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(
        second.bytes().await.unwrap(),
        first_bytes,
        "replay is byte for byte"
    );
    // Another body under the same key: 422, nothing moves.
    let before = app.dump();
    let third = send()
        .body(r#"{"id":"rf2","amount":300}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 422);
    let body: serde_json::Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reuse");
    // Another path under the same key: 422 as well.
    let r = app
        .send(post(&app, "/v1/orders/o2/deduct", KEY_A).header("idempotency-key", "refund-o1-1"))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (422, json!("idempotency_key_reuse"))
    );
    assert_eq!(app.dump(), before);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_with_one_key_execute_once() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let stats = app.engine.stats();
    let before = EngineStats::get(&stats.committed) + EngineStats::get(&stats.replayed);
    let calls = (0..20).map(|_| async {
        let r = app
            .client
            .post(app.url("/v1/orders/o1/deduct"))
            .bearer_auth(KEY_A)
            .header("idempotency-key", "deduct-o1")
            .send()
            .await
            .unwrap();
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (r.status().as_u16(), replayed, r.bytes().await.unwrap())
    });
    let results = join_all(calls).await;
    let after = EngineStats::get(&stats.committed) + EngineStats::get(&stats.replayed);
    assert_eq!(
        after - before,
        1,
        "the engine ran the deduct once for 20 requests"
    );
    let firsts: Vec<_> = results
        .iter()
        .filter(|(_, replayed, _)| !replayed)
        .collect();
    assert_eq!(firsts.len(), 1, "exactly one response is the original");
    for (status, _, bytes) in &results {
        assert_eq!(*status, 200);
        assert_eq!(
            bytes, &firsts[0].2,
            "every replay is the first response's bytes"
        );
    }
    let body: serde_json::Value = serde_json::from_slice(&firsts[0].2).unwrap();
    assert_eq!(body["replayed"], json!(false));
    app.stop().await;
}

#[tokio::test]
async fn one_key_under_two_api_keys_is_two_requests() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let send = |api: &'static str, order: &'static str| {
        app.send(
            post(&app, "/v1/orders", api)
                .header("idempotency-key", "same-key")
                .json(&json!({"id": order, "account_id": "acct", "amount": 5})),
        )
    };
    let a = send(KEY_A, "from-a").await;
    let b = send(KEY_B, "from-b").await;
    assert_eq!(
        (a.status, b.status),
        (201, 201),
        "{:?} {:?}",
        a.body,
        b.body
    );
    assert!(!a.headers.contains_key("idempotent-replayed"));
    assert!(!b.headers.contains_key("idempotent-replayed"));
    // Each key replays its own first response.
    let a2 = send(KEY_A, "from-a").await;
    assert_eq!(a2.headers["idempotent-replayed"], "true");
    assert_eq!(a2.body["id"], "from-a");
    app.stop().await;
}

#[tokio::test]
async fn a_key_whose_first_request_got_503_can_be_used_again() {
    // Instance 1 times every write out before it reaches the store: 503.
    let timing_out = Limits {
        request_timeout_ms: 0,
        ..Limits::default()
    };
    let app = spawn_app_full(EngineConfig::default(), keys(), Limits::default()).await;
    setup(&app, KEY_A).await;
    let (dir, db) = app.stop_keep_dir().await;
    let app = spawn_app_on(dir, db, EngineConfig::default(), keys(), timing_out).await;
    let before = app.dump();
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "retry-me"))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (503, json!("unavailable"))
    );
    assert_eq!(app.dump(), before, "a 503 moved nothing and stored nothing");
    let (dir, db) = app.stop_keep_dir().await;
    // Instance 2, same database: the key is free, the request runs.
    let app = spawn_app_on(dir, db, EngineConfig::default(), keys(), Limits::default()).await;
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "retry-me"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.headers.contains_key("idempotent-replayed"));
    assert_eq!(r.body["replayed"], json!(false));
    // After a restart the stored response still replays.
    let (dir, db) = app.stop_keep_dir().await;
    let app = spawn_app_on(dir, db, EngineConfig::default(), keys(), Limits::default()).await;
    let again = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "retry-me"))
        .await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, r.body);
    app.stop().await;
}

#[tokio::test]
async fn keys_expire_after_the_ttl_and_are_pruned() {
    let short = Limits {
        idempotency_ttl_ms: 150,
        ..Limits::default()
    };
    let app = spawn_app_full(EngineConfig::default(), keys(), short).await;
    setup(&app, KEY_A).await;
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "k1"))
        .await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Expired: the same key with another request is a new request, not a 422.
    let r = app
        .send(post(&app, "/v1/orders/o2/deduct", KEY_A).header("idempotency-key", "k1"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.headers.contains_key("idempotent-replayed"));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let pruned = app.engine.store().idem_prune(now).await.unwrap();
    assert_eq!(pruned, 1);
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_in_flight_key_makes_others_wait_then_409_and_a_dead_lease_frees_it() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let scope = payguard_server::ApiKeys::new([KEY_A])
        .unwrap()
        .verify(KEY_A)
        .unwrap()
        .0;
    let fp = payguard_server::idempotency::fingerprint("POST", "/v1/orders/o1/deduct", b"");
    let far = i64::MAX / 2;
    // Another instance holds the key, alive (lease in the future).
    app.sql(&format!(
        "INSERT INTO idempotency (scope, key, fingerprint, state, lease_until, created_at, expires_at)
         VALUES ('{scope}', 'held', '{fp}', 'in_flight', {far}, 0, {far})"
    ));
    let started = std::time::Instant::now();
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "held"))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (409, json!("idempotency_key_in_use"))
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "it waited 5 s first"
    );
    // That instance died: its lease lapsed, the key is usable again.
    app.sql("UPDATE idempotency SET lease_until = 1 WHERE key = 'held'");
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "held"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn header_limit_and_bad_idempotency_keys_are_refused() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    let before = app.dump();
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("x-padding", "p".repeat(20_000)))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (431, json!("headers_too_large"))
    );
    let r = app
        .send(post(&app, "/v1/orders/o1/deduct", KEY_A).header("idempotency-key", "k".repeat(256)))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (422, json!("invalid_request"))
    );
    assert_eq!(app.dump(), before);
    app.stop().await;
}

/// Found by the `router` fuzz target: every method a client invented became a label of its
/// own, so requests without a key could grow the metrics (memory, and `/metrics` past 4 MiB)
/// without bound. Methods outside RFC 9110's are now counted as `other`.
#[tokio::test]
async fn invented_methods_do_not_grow_the_metrics() {
    let app = keyed_app().await;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("FUZZ{i}").as_bytes()).unwrap();
        let r = app
            .send(app.client.request(method, app.url("/v1/accounts")))
            .await;
        assert!(matches!(r.status, 401 | 405), "{}", r.status);
    }
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("FUZZ"), "{text}");
    assert!(
        text.contains(
            r#"payguard_http_requests_total{route="/v1/accounts",method="other",status="#
        ),
        "{text}"
    );
    assert!(text.len() < 64 * 1024, "{} bytes", text.len());
    app.stop().await;
}

#[tokio::test]
async fn metrics_need_no_key_and_count_what_happened() {
    let app = keyed_app().await;
    setup(&app, KEY_A).await;
    for _ in 0..3 {
        assert_eq!(
            app.send(post(&app, "/v1/orders/o1/deduct", KEY_A))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        app.send(post(&app, "/v1/orders/nope/deduct", KEY_A))
            .await
            .status,
        404
    );
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("openmetrics"));
    let text = r.text().await.unwrap();
    for needle in [
        r#"payguard_http_requests_total{route="/v1/orders/{id}/deduct",method="POST",status="200"} 3"#,
        r#"payguard_http_requests_total{route="/v1/orders/{id}/deduct",method="POST",status="404"} 1"#,
        r#"payguard_http_request_duration_seconds_count{route="/v1/orders/{id}/deduct",method="POST"} 4"#,
        "payguard_ops_replayed_total 2",
        "payguard_ops_rejected_total 1",
        "payguard_inflight_collisions_total",
        r#"payguard_lane_queue_depth{lane="0"} 0"#,
        "payguard_lane_batch_size_bucket",
        "payguard_store_commit_seconds_count",
        r#"payguard_instance_info{instance="test-1",guard="full",store="sqlite"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // Account + two orders + the first deduct committed.
    assert!(text.contains("payguard_ops_committed_total 4"), "{text}");
    app.stop().await;
}
