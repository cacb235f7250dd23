//! Pipelined SQLite commits (`--sqlite-sync pipelined`, the default): the
//! writer commits without waiting for the disk and the syncer fsyncs behind it.
//! Nothing may be answered, or shown to any reader, before that fsync: these
//! tests hold the syncer before its fsync (failpoint `store.before_sync`) and
//! watch that neither the charge's caller nor a GET nor the events feed hears
//! of the charge until it is released. An answer sent at commit, or a read
//! that skipped the durable watermark, would arrive about `HOLD_MS` early.

mod common;

use common::{start, start_with_env};
use serde_json::json;
use std::time::{Duration, Instant};

/// How long the syncer is held before each fsync.
const HOLD_MS: u64 = 1_500;
/// Slack for a loaded machine: an early answer arrives within milliseconds.
const EARLY_MS: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_answered_or_read_before_its_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("durable.db");
    let db = db.to_str().unwrap();
    let http = reqwest::Client::new();
    let hold = format!("store.before_sync=return(pause:{HOLD_MS})");
    let s = start_with_env(dir.path(), "d1", db, &[], &[("FAILPOINTS", &hold)]);
    for (path, body) in [
        ("accounts", json!({"id": "a", "balance": 5000})),
        (
            "orders",
            json!({"id": "o1", "account_id": "a", "amount": 1185}),
        ),
    ] {
        let r = http
            .post(format!("{}/v1/{path}", s.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // Wait out the order's own fsync hold before the charge.
    tokio::time::sleep(Duration::from_millis(HOLD_MS + 200)).await;
    let t0 = Instant::now();
    let charge = {
        let (http, url) = (http.clone(), format!("{}/v1/orders/o1/deduct", s.url));
        tokio::spawn(async move {
            let r = http.post(url).send().await.unwrap();
            (r.status(), t0.elapsed())
        })
    };
    // The charge is committed within milliseconds; its fsync is held. Each
    // read either waits for that fsync or shows nothing of the charge (the
    // order itself may come from the engine's cache, filled only by answers).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let read = |path: &str| {
        let (http, url) = (http.clone(), format!("{}{path}", s.url));
        tokio::spawn(async move {
            let body: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (body, t0.elapsed())
        })
    };
    let (order, entries, feed) = (
        read("/v1/orders/o1"),
        read("/v1/orders/o1/entries"),
        read("/v1/events?after=0"),
    );
    let (status, charged_after) = charge.await.unwrap();
    assert_eq!(status, 200);
    let early = Duration::from_millis(EARLY_MS);
    assert!(
        charged_after >= early,
        "the charge was answered {charged_after:?} after it was sent, before its fsync"
    );
    let mut waited = 0;
    for (name, read) in [("order", order), ("entries", entries), ("events", feed)] {
        let (body, after) = read.await.unwrap();
        let shows_charge = body["status"] == "PAID"
            || body["entries"]
                .as_array()
                .is_some_and(|es| es.iter().any(|e| e["kind"] == "debit"))
            || body.to_string().contains("order.paid");
        assert!(
            after >= early || !shows_charge,
            "GET {name} showed the charge {after:?} in, before its fsync: {body}"
        );
        if after >= early {
            waited += 1;
        }
    }
    // The store's reads (entries, the feed) cannot answer without the gate.
    assert!(waited >= 2, "only {waited} reads waited for the fsync");
    // Once released, every read includes the charge.
    let order: serde_json::Value = http
        .get(format!("{}/v1/orders/o1", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(order["status"], "PAID", "{order}");
}

/// The same hold is never reached under `--sqlite-sync full` (each commit
/// fsyncs itself): the charge is answered without waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_commits_do_not_wait_for_the_syncer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full.db");
    let db = db.to_str().unwrap();
    let http = reqwest::Client::new();
    let hold = format!("store.before_sync=return(pause:{HOLD_MS})");
    let s = start_with_env(
        dir.path(),
        "f1",
        db,
        &["--sqlite-sync", "full"],
        &[("FAILPOINTS", &hold)],
    );
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/v1/accounts", s.url))
        .json(&json!({"id": "a", "balance": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        t0.elapsed() < Duration::from_millis(HOLD_MS),
        "full sync must not pass through the held fsync: {:?}",
        t0.elapsed()
    );
    drop(s);
    // The same file, pipelined and unheld, reads what full sync wrote.
    let s = start(dir.path(), "f2", db, &[]);
    let body: serde_json::Value = http
        .get(format!("{}/v1/accounts/a", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["balance"], 5000, "{body}");
}
