//! The HTTP promises once more, against PostgreSQL, with two server instances
//! sharing one database: their lanes never see each other's requests, so only the
//! database keeps an order to one charge.
//!
//! Needs `PAYGUARD_TEST_POSTGRES_URL` (e.g. postgres://postgres@127.0.0.1:5432/postgres);
//! without it each test prints why and passes without running. Each test makes
//! its own database and drops it at the end.

mod pg_common;

use futures::future::join_all;
use payguard::engine::Guard;
use pg_common::{scratch, spawn, Instance};
use serde_json::json;
use std::collections::HashSet;

/// 200 concurrent deducts of one order, spread over two instances: one debit,
/// one original answer, 199 replays naming the same entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_deducts_on_two_instances_charge_once() {
    let Some(db) = scratch("two_hundred_concurrent_deducts_on_two_instances_charge_once").await
    else {
        return;
    };
    let a = spawn(&db, "pg-a", Guard::Full).await;
    let b = spawn(&db, "pg-b", Guard::Full).await;
    assert_eq!(
        a.post(
            "/v1/accounts",
            json!({"id": "acct-1", "balance": 1_000_000})
        )
        .await
        .0,
        201
    );
    assert_eq!(
        b.post(
            "/v1/orders",
            json!({"id": "OD20240517A1122", "account_id": "acct-1", "amount": 1185})
        )
        .await
        .0,
        201
    );
    let calls = (0..200).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        inst.post("/v1/orders/OD20240517A1122/deduct", json!({}))
    });
    let responses = join_all(calls).await;
    let mut entry_ids = HashSet::new();
    let mut fresh = 0;
    for (status, body) in &responses {
        assert_eq!(*status, 200, "{body:?}");
        entry_ids.insert(body["entry"]["id"].as_str().unwrap().to_owned());
        if body["replayed"] == json!(false) {
            fresh += 1;
        } else {
            assert_eq!(body["replayed"], json!(true));
        }
        assert_eq!(body["order"]["status"], "PAID");
    }
    assert_eq!(entry_ids.len(), 1, "every response names the same entry");
    assert_eq!(fresh, 1, "one original, 199 replays");
    let (_, entries) = a.get("/v1/orders/OD20240517A1122/entries").await;
    assert_eq!(
        entries["entries"].as_array().unwrap().len(),
        1,
        "{entries:?}"
    );
    let (_, account) = b.get("/v1/accounts/acct-1").await;
    assert_eq!(account["balance"], json!(1_000_000 - 1185));
    let (_, health) = a.get("/healthz").await;
    assert_eq!(health["store"], "postgres");
    let (_, audit) = b.get("/v1/audit").await;
    assert_eq!(audit["ok"], json!(true), "{audit:?}");
    // Each instance's lanes saw only its own half: the database kept it to one.
    let committed = |i: &Instance| payguard::engine::EngineStats::get(&i.engine.stats().committed);
    assert_eq!(
        committed(&a) + committed(&b),
        3,
        "account, order and one deduct"
    );
    a.stop().await;
    b.stop().await;
    db.drop_db().await.unwrap();
}

/// Many orders on one account, deducted at once from two instances: the balance
/// pays exactly as many as it can, never goes negative, the rest are 402 FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overdraft_race_on_one_account_across_instances_never_goes_negative() {
    let Some(db) =
        scratch("overdraft_race_on_one_account_across_instances_never_goes_negative").await
    else {
        return;
    };
    let a = spawn(&db, "pg-a", Guard::Full).await;
    let b = spawn(&db, "pg-b", Guard::Full).await;
    a.post("/v1/accounts", json!({"id": "hot", "balance": 1_000}))
        .await;
    for i in 0..40 {
        let (status, body) = a
            .post(
                "/v1/orders",
                json!({"id": format!("o-{i}"), "account_id": "hot", "amount": 100}),
            )
            .await;
        assert_eq!(status, 201, "{body:?}");
    }
    let calls = (0..40).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        let path = format!("/v1/orders/o-{i}/deduct");
        async move { inst.post(&path, json!({})).await }
    });
    let responses = join_all(calls).await;
    let paid = responses.iter().filter(|(s, _)| *s == 200).count();
    let refused = responses.iter().filter(|(s, _)| *s == 402).count();
    assert_eq!((paid, refused), (10, 30), "{responses:?}");
    let (_, account) = b.get("/v1/accounts/hot").await;
    assert_eq!(account["balance"], json!(0));
    let (_, audit) = a.get("/v1/audit").await;
    assert_eq!(audit["ok"], json!(true), "{audit:?}");
    a.stop().await;
    b.stop().await;
    db.drop_db().await.unwrap();
}

/// `--guard seed` on PostgreSQL: one locked transaction per request, still one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_guard_on_postgres_charges_once() {
    let Some(db) = scratch("seed_guard_on_postgres_charges_once").await else {
        return;
    };
    let a = spawn(&db, "seed-a", Guard::Seed).await;
    let b = spawn(&db, "seed-b", Guard::Seed).await;
    a.post("/v1/accounts", json!({"id": "acct", "balance": 500}))
        .await;
    a.post(
        "/v1/orders",
        json!({"id": "o", "account_id": "acct", "amount": 120}),
    )
    .await;
    let calls = (0..40).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        inst.post("/v1/orders/o/deduct", json!({}))
    });
    let responses = join_all(calls).await;
    let fresh = responses
        .iter()
        .filter(|(s, body)| *s == 200 && body["replayed"] == json!(false))
        .count();
    assert!(responses.iter().all(|(s, _)| *s == 200), "{responses:?}");
    assert_eq!(fresh, 1);
    let (_, account) = b.get("/v1/accounts/acct").await;
    assert_eq!(account["balance"], json!(380));
    let refunds = (0..10).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        inst.post(
            "/v1/orders/o/refunds",
            json!({"id": format!("rf-{i}"), "amount": 50}),
        )
    });
    let refunds = join_all(refunds).await;
    assert_eq!(refunds.iter().filter(|(s, _)| *s == 200).count(), 2);
    assert_eq!(refunds.iter().filter(|(s, _)| *s == 409).count(), 8);
    let (_, audit) = a.get("/v1/audit").await;
    assert_eq!(audit["ok"], json!(true), "{audit:?}");
    a.stop().await;
    b.stop().await;
    db.drop_db().await.unwrap();
}

/// One Idempotency-Key sent 20 times at once, half to each instance: the deduct
/// runs once, and every answer is the first response's bytes (the key's record
/// lives in the shared database, written in the money transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_on_two_instances_executes_once() {
    let Some(db) = scratch("one_idempotency_key_on_two_instances_executes_once").await else {
        return;
    };
    let a = spawn(&db, "pg-a", Guard::Full).await;
    let b = spawn(&db, "pg-b", Guard::Full).await;
    a.post("/v1/accounts", json!({"id": "acct", "balance": 1_000}))
        .await;
    a.post(
        "/v1/orders",
        json!({"id": "o1", "account_id": "acct", "amount": 100}),
    )
    .await;
    let calls = (0..20).map(|i| {
        let inst = if i % 2 == 0 { &a } else { &b };
        async move {
            let r = inst
                .client
                .post(format!("{}/v1/orders/o1/deduct", inst.base))
                .header("idempotency-key", "deduct-o1")
                .send()
                .await
                .unwrap();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            (r.status().as_u16(), replayed, r.bytes().await.unwrap())
        }
    });
    let results = join_all(calls).await;
    let firsts: Vec<_> = results
        .iter()
        .filter(|(_, replayed, _)| !replayed)
        .collect();
    assert_eq!(firsts.len(), 1, "exactly one original: {results:?}");
    for (status, _, bytes) in &results {
        assert_eq!(*status, 200);
        assert_eq!(
            bytes, &firsts[0].2,
            "every replay is the first response's bytes"
        );
    }
    let (_, account) = b.get("/v1/accounts/acct").await;
    assert_eq!(account["balance"], json!(900));
    let stored = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "SELECT COUNT(*) FROM idempotency WHERE key = 'deduct-o1' AND state = 'done'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(stored, 1);
    a.stop().await;
    b.stop().await;
    db.drop_db().await.unwrap();
}

/// The PostgreSQL store's own counters (retried batches, ambiguous COMMITs)
/// reach `/metrics`, so an operator sees them without reading logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_counters_are_in_metrics() {
    let Some(db) = scratch("postgres_store_counters_are_in_metrics").await else {
        return;
    };
    let a = spawn(&db, "pg-metrics", Guard::Full).await;
    let (status, body) = a.get("/metrics").await;
    assert_eq!(status, 200);
    let text = body.as_str().expect("metrics are text").to_owned();
    for name in [
        "payguard_store_pg_batch_retries_total 0",
        "payguard_store_pg_careful_batches_total 0",
        "payguard_store_pg_ambiguous_commits_total 0",
        "payguard_store_pg_ambiguous_commits_committed_total 0",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    a.stop().await;
    db.drop_db().await.unwrap();
}
