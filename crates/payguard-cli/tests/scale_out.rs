//! Many instances on one PostgreSQL and one Redis: duplicates of one order land
//! on different instances at the same instant, and each order is charged once.
//! Needs PAYGUARD_TEST_POSTGRES_URL and PAYGUARD_TEST_REDIS_URL; skips without.

mod common;

use common::{pg_base, pg_url, redis_url, start, unique_prefix, PrivateRedis};
use payguard::store::postgres::ScratchDb;
use payguard_cli::storm::{storm, StormArgs};
use serde_json::json;
use std::time::Duration;

fn storm_args(targets: Vec<String>, db: &str, orders: usize, seed: u64) -> StormArgs {
    StormArgs {
        target: targets,
        api_key: None,
        orders,
        dup: 6,
        concurrency: 48,
        duration: 120,
        refund_ratio: 0.2,
        poor_ratio: 0.1,
        seed,
        run_tag: Some(format!("so{seed}")),
        db: Some(db.to_owned()),
        json: true,
        html: None,
        no_progress: true,
        history: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_postgres_and_redis_charge_once() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    let scratch = ScratchDb::create(&base, "pg_test_three").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("three");
    let servers: Vec<_> = (1..=3)
        .map(|i| {
            start(
                dir.path(),
                &format!("pay-{i}"),
                &db,
                &["--redis", &redis, "--redis-prefix", &prefix],
            )
        })
        .collect();
    // Each copy of a deduct goes to a different instance (storm round-robins them).
    let targets = servers.iter().map(|s| s.url.clone()).collect();
    let report = storm(&storm_args(targets, &db, 60, 3)).await.unwrap();
    for s in servers {
        s.stop();
    }
    assert!(report.ok, "{}", report.to_text());
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    assert!(report.replays >= 5 * report.paid_orders - report.unavailable_503);
    // The instances really contended: the logs show fenced writes.
    let fenced = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .map(|log| log.matches("\"lock_acquired\"").count())
        .sum::<usize>();
    assert!(fenced > 0, "no instance took a Redis lock");
    scratch.drop_db().await.unwrap();
}

/// Instance A takes an order's lock, then stalls past the lock's TTL (injected
/// pause); instance B takes the lock with a higher token and charges. A's write is
/// refused with `stale_fencing_token`, in its response (a 503: nothing moved, retry)
/// and its log, and the order is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_lock_holder_is_refused_with_stale_fencing_token() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    let scratch = ScratchDb::create(&base, "pg_test_fence").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("fence");
    let common = [
        "--redis",
        redis.as_str(),
        "--redis-prefix",
        prefix.as_str(),
        "--lock-ttl-ms",
        "300",
    ];
    let mut a_args = common.to_vec();
    a_args.extend(["--failpoint-pause-after-lock-ms", "1500"]);
    let a = start(dir.path(), "pay-a", &db, &a_args);
    let b = start(dir.path(), "pay-b", &db, &common);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/accounts", b.url))
        .json(&json!({"id": "acct", "balance": 10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{}/v1/orders", b.url))
        .json(&json!({"id": "OD20240517A1122", "account_id": "acct", "amount": 1185}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let a_url = format!("{}/v1/orders/OD20240517A1122/deduct", a.url);
    let client = http.clone();
    let stalled = tokio::spawn(async move {
        let r = client
            .post(a_url)
            .header("x-request-id", "req-a")
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    });
    tokio::time::sleep(Duration::from_millis(700)).await; // A's lock has lapsed
    let r = http
        .post(format!("{}/v1/orders/OD20240517A1122/deduct", b.url))
        .header("x-request-id", "req-b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b_body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b_body["replayed"], json!(false), "B charged");

    let (status, body) = stalled.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("stale_fencing_token:"),
        "{body}"
    );
    let entries: serde_json::Value = http
        .get(format!("{}/v1/orders/OD20240517A1122/entries", b.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        entries["entries"].as_array().unwrap().len(),
        1,
        "charged once"
    );
    let a_log = a.log.clone();
    a.stop();
    b.stop();
    let log = std::fs::read_to_string(a_log).unwrap();
    let refused = log.lines().any(|l| {
        l.contains("\"event\":\"deduct_rejected\"")
            && l.contains("\"reason\":\"stale_fencing_token\"")
            && l.contains("\"req\":\"req-a\"")
    });
    assert!(
        refused,
        "A's log must say deduct_rejected reason=stale_fencing_token:\n{log}"
    );
    scratch.drop_db().await.unwrap();
}

/// Redis flushed and restarted in the middle of a storm on two instances:
/// requests in the gap succeed or get 503, and nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushed_and_restarted_mid_storm_changes_nothing() {
    let (Some(base), Some(_)) = (pg_base(), redis_url()) else {
        return;
    };
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let scratch = ScratchDb::create(&base, "pg_test_flush").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<_> = (1..=2)
        .map(|i| {
            start(
                dir.path(),
                &format!("pay-{i}"),
                &db,
                &["--redis", &redis.url],
            )
        })
        .collect();
    let targets = servers.iter().map(|s| s.url.clone()).collect();
    let args = storm_args(targets, &db, 150, 8);
    let storming = tokio::spawn(async move { storm(&args).await });
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if round == 3 {
            redis.kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(redis.restart(), "redis-server did not come back");
        } else {
            redis.flushall();
        }
    }
    let report = storming.await.unwrap().unwrap();
    for s in servers {
        s.stop();
    }
    assert!(report.ok, "{}", report.to_text());
    assert_eq!(report.server_errors_500, 0);
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    scratch.drop_db().await.unwrap();
}
