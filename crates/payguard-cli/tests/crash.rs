//! Crashes, with nothing acknowledged lost and nothing charged twice (SQLite).

mod common;

use common::{start, start_with_env};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

async fn post(
    http: &reqwest::Client,
    url: String,
    body: Option<serde_json::Value>,
) -> reqwest::Result<reqwest::Response> {
    let mut req = http.post(url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await
}

/// The process dies right after committing a charge and before answering it;
/// the client's retry gets the original result back, the ledger has one debit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_reply_then_the_retry_replays() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let db = db.to_str().unwrap();
    let http = reqwest::Client::new();
    let s = start_with_env(
        dir.path(),
        "c1",
        db,
        &[],
        &[("PAYGUARD_FAILPOINT", "exit_after_commit")],
    );
    let r = post(
        &http,
        format!("{}/v1/accounts", s.url),
        Some(json!({"id": "a", "balance": 5000})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = post(
        &http,
        format!("{}/v1/orders", s.url),
        Some(json!({"id": "o1", "account_id": "a", "amount": 1185})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let lost = http
        .post(format!("{}/v1/orders/o1/deduct", s.url))
        .header("idempotency-key", "pay-o1")
        .send()
        .await;
    assert!(lost.is_err(), "the reply must be lost: {lost:?}");
    assert_eq!(s.wait_exit(), Some(86), "the failpoint ended the process");

    let s = start(dir.path(), "c2", db, &[]);
    let retry = http
        .post(format!("{}/v1/orders/o1/deduct", s.url))
        .header("idempotency-key", "pay-o1")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(
        body["replayed"],
        json!(false),
        "the stored first response, as it would have been sent"
    );
    let plain: serde_json::Value = post(&http, format!("{}/v1/orders/o1/deduct", s.url), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plain["replayed"], json!(true));
    assert_eq!(plain["entry"]["id"], body["entry"]["id"]);
    let account: serde_json::Value = http
        .get(format!("{}/v1/accounts/a", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["balance"], 5000 - 1185);
    let audit: serde_json::Value = http
        .get(format!("{}/v1/audit", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["ok"], json!(true));
    s.stop();
}

/// `kill -9` at random moments under duplicate load, restart, repeat; then retry
/// every request that got no answer. Every acknowledged charge is in the ledger,
/// no order has two debits, and the audit is clean. Rounds: PAYGUARD_CRASH_ROUNDS
/// (default 12 for CI; the documented soak runs 60).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_charge() {
    let rounds: usize = std::env::var("PAYGUARD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    const ORDERS_PER_ROUND: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kill.db");
    let db = db.to_str().unwrap();
    let http = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // order id -> entry ids acknowledged for it
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    let mut unanswered: Vec<String> = Vec::new();
    {
        let s = start(dir.path(), "setup", db, &[]);
        let r = post(
            &http,
            format!("{}/v1/accounts", s.url),
            Some(json!({"id": "a", "balance": 1_000_000_000})),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
        s.stop();
    }
    for round in 0..rounds {
        let s = start(dir.path(), &format!("r{round}"), db, &[]);
        for i in 0..ORDERS_PER_ROUND {
            let r = post(
                &http,
                format!("{}/v1/orders", s.url),
                Some(json!({"id": format!("k{round}-{i}"), "account_id": "a", "amount": 100 + i})),
            )
            .await
            .unwrap();
            assert!(r.status().is_success());
        }
        let mut calls = Vec::new();
        for i in 0..ORDERS_PER_ROUND {
            for _dup in 0..2 {
                let (http, url, oid) = (
                    http.clone(),
                    format!("{}/v1/orders/k{round}-{i}/deduct", s.url),
                    format!("k{round}-{i}"),
                );
                calls.push(tokio::spawn(async move {
                    let r = http.post(url).send().await;
                    let entry = match r {
                        Ok(r) if r.status() == 200 => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|b| b["entry"]["id"].as_str().map(str::to_owned)),
                        _ => None,
                    };
                    (oid, entry)
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..25))).await;
        s.kill9();
        for c in calls {
            let (oid, entry) = c.await.unwrap();
            match entry {
                Some(e) => acked.entry(oid).or_default().push(e),
                None => unanswered.push(oid),
            }
        }
    }
    let s = start(dir.path(), "final", db, &[]);
    // Retry what got no answer: each must now settle as charged once.
    for oid in &unanswered {
        let r = post(&http, format!("{}/v1/orders/{oid}/deduct", s.url), None)
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "retry of {oid}");
    }
    let mut charged = 0;
    for round in 0..rounds {
        for i in 0..ORDERS_PER_ROUND {
            let oid = format!("k{round}-{i}");
            let body: serde_json::Value = http
                .get(format!("{}/v1/orders/{oid}/entries", s.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let debits: Vec<String> = body["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "debit")
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect();
            assert!(debits.len() <= 1, "{oid} charged {} times", debits.len());
            if let Some(ids) = acked.get(&oid) {
                assert_eq!(
                    debits.len(),
                    1,
                    "{oid} was acknowledged but is not in the ledger"
                );
                assert!(
                    ids.iter().all(|e| *e == debits[0]),
                    "{oid}: acknowledged {ids:?}, ledger {debits:?}"
                );
            }
            charged += debits.len();
        }
    }
    let audit: serde_json::Value = http
        .get(format!("{}/v1/audit", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["ok"], json!(true), "{audit}");
    assert!(
        !acked.is_empty() && !unanswered.is_empty(),
        "the kills must land mid-load: {} acked, {} unanswered",
        acked.len(),
        unanswered.len()
    );
    eprintln!("{rounds} kill -9 rounds: {} orders acknowledged, {} requests unanswered then retried, {charged} charged", acked.len(), unanswered.len());
    s.stop();
}
