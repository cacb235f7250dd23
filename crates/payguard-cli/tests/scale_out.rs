//! Many instances on one PostgreSQL and one Redis: duplicates of one order land
//! on different instances at the same instant, and each order is charged once.
//! Needs PAYGUARD_TEST_POSTGRES_URL and PAYGUARD_TEST_REDIS_URL; skips without.

mod common;

use common::proxy::{FaultProxy, Mode};
use common::{
    assert_refused_as_stale, debits, pg_base, pg_url, redis_url, start, start_with_env,
    unique_prefix, PrivateRedis,
};
use payguard::store::postgres::ScratchDb;
use payguard_cli::storm::{history, storm, StormArgs};
use serde_json::json;
use std::time::Duration;

/// A storm on `targets`; strict (no faults) unless the caller sets `faults`.
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
        faults: false,
        slow_ms: payguard_cli::storm::liveness::SLOW_MS_DEFAULT,
        two_phase: 0.0,
        hold_grace_ms: payguard_cli::storm::HOLD_GRACE_MS_DEFAULT,
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

/// Issue #12: three instances on PostgreSQL + Redis, a duplicate storm with no
/// fault injected and every copy of an order sent to a different instance (as an
/// outside client spreading retries over a load balancer would). Before the fix a
/// batch held the locks it got while waiting for the rest, instances waited on
/// each other in a cycle until the 5 s wait limit, and the storm saw 503s and
/// 5-second stalls. A healthy service answers every request, none with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_answer_a_spread_duplicate_storm_without_503() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    let scratch = ScratchDb::create(&base, "pg_test_live").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("live");
    let servers: Vec<_> = (1..=3)
        .map(|i| {
            start(
                dir.path(),
                &format!("live-{i}"),
                &db,
                &["--redis", &redis, "--redis-prefix", &prefix],
            )
        })
        .collect();
    let targets: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    for (dup, orders, seed) in [(8, 200, 81), (12, 120, 121)] {
        let mut args = storm_args(targets.clone(), &db, orders, seed);
        args.dup = dup;
        args.concurrency = 64;
        let report = storm(&args).await.unwrap();
        assert!(report.ok, "--dup {dup}: {}", report.to_text());
        assert_eq!(
            report.unavailable_503,
            0,
            "--dup {dup}: {}",
            report.to_text()
        );
        assert_eq!(report.no_answer, 0, "--dup {dup}: {}", report.to_text());
        assert!(!report.cut_short, "--dup {dup}: {}", report.to_text());
        assert_eq!(report.double_charged_orders, 0);
        assert_eq!(report.db_audit_ok, Some(true));
    }
    let logs: String = servers
        .iter()
        .map(|s| s.log.clone())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    for s in servers {
        s.stop();
    }
    assert!(
        logs.contains("\"lock_acquired\""),
        "no instance took a Redis lock"
    );
    assert!(
        !logs.contains("\"lock_busy\""),
        "an order gave up waiting for a lock"
    );
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
    let a = start_with_env(
        dir.path(),
        "pay-a",
        &db,
        &common,
        &[("FAILPOINTS", "engine.after_lock=return(pause:1500)")],
    );
    let b = start(dir.path(), "pay-b", &db, &common);
    let http = reqwest::Client::new();
    const OID: &str = "OD20240517A1122";
    account_and_order(&http, &b.url, OID).await;

    let (client, a_url) = (http.clone(), a.url.clone());
    let stalled = tokio::spawn(async move { deduct(&client, &a_url, OID, "req-a").await });
    tokio::time::sleep(Duration::from_millis(700)).await; // A's lock has lapsed
    let (status, b_body) = deduct(&http, &b.url, OID, "req-b").await;
    assert_eq!(status, 200, "{b_body}");
    assert_eq!(b_body["replayed"], json!(false), "B charged");

    let (status, body) = stalled.await.unwrap();
    assert_stale_answer(status, &body);
    assert_eq!(debits(&http, &b.url, OID).await.len(), 1, "charged once");
    let a_log = a.log.clone();
    a.stop();
    b.stop();
    let log = std::fs::read_to_string(a_log).unwrap();
    assert_refused_as_stale(&log, "req-a");
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
    let mut args = storm_args(targets, &db, 150, 8);
    args.faults = true; // Redis flushed and killed mid-storm
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

/// A refused stale write's answer: 503 `unavailable` whose message names the
/// reason (nothing moved; a retry gets the real outcome).
fn assert_stale_answer(status: u16, body: &serde_json::Value) {
    assert_eq!(status, 503, "the stale holder must be refused: {body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("stale_fencing_token:"),
        "{body}"
    );
}

/// Creates account `acct` (10 000) and order `oid` (1185) through `url`.
async fn account_and_order(http: &reqwest::Client, url: &str, oid: &str) {
    let r = http
        .post(format!("{url}/v1/accounts"))
        .json(&json!({"id": "acct", "balance": 10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{url}/v1/orders"))
        .json(&json!({"id": oid, "account_id": "acct", "amount": 1185}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

async fn deduct(
    http: &reqwest::Client,
    url: &str,
    oid: &str,
    req: &str,
) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{url}/v1/orders/{oid}/deduct"))
        .header("x-request-id", req)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A real SIGSTOP on three instances: A takes the order's lock and, while it is
/// about to write (a 300 ms pause, well inside the 1 s TTL, so A alone would write
/// in time), the whole process is frozen with SIGSTOP for 2.5 s. Its lock lapses;
/// B and C race duplicates, one charges with a higher token, the other replays.
/// Resumed with SIGCONT, A's write is refused with `stale_fencing_token` (503 and
/// its log), and the order is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigstopped_lock_holder_on_three_instances_is_refused() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    const OID: &str = "OD20240517S0001";
    let scratch = ScratchDb::create(&base, "pg_test_sigstop").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("sigstop");
    let args = [
        "--redis",
        redis.as_str(),
        "--redis-prefix",
        prefix.as_str(),
        "--lock-ttl-ms",
        "1000",
    ];
    let a = start_with_env(
        dir.path(),
        "pay-a",
        &db,
        &args,
        &[("FAILPOINTS", "engine.after_lock=1*return(pause:300)")],
    );
    let b = start(dir.path(), "pay-b", &db, &args);
    let c = start(dir.path(), "pay-c", &db, &args);
    let http = reqwest::Client::new();
    account_and_order(&http, &b.url, OID).await;

    let (client, a_url) = (http.clone(), a.url.clone());
    let stalled = tokio::spawn(async move { deduct(&client, &a_url, OID, "req-a").await });
    a.wait_for_log(
        &["\"failpoint_hit\"", "engine.after_lock"],
        Duration::from_secs(10),
    );
    a.signal("STOP");
    let stopped_at = std::time::Instant::now();
    // B and C race duplicates while A is frozen; they wait for A's lock to lapse.
    let (rb, rc) = tokio::join!(
        deduct(&http, &b.url, OID, "req-b"),
        deduct(&http, &c.url, OID, "req-c")
    );
    let frozen_for = Duration::from_millis(2500).saturating_sub(stopped_at.elapsed());
    tokio::time::sleep(frozen_for).await;
    a.signal("CONT");
    let (status, body) = stalled.await.unwrap();

    assert_eq!((rb.0, rc.0), (200, 200), "{rb:?} {rc:?}");
    let fresh: Vec<_> = [&rb.1, &rc.1]
        .into_iter()
        .filter(|b| b["replayed"] == json!(false))
        .collect();
    assert_eq!(
        fresh.len(),
        1,
        "exactly one of B and C charged: {rb:?} {rc:?}"
    );
    assert_eq!(rb.1["entry"]["id"], rc.1["entry"]["id"], "one entry");
    assert_stale_answer(status, &body);
    let d = debits(&http, &c.url, OID).await;
    assert_eq!(d.len(), 1, "charged once: {d:?}");
    let a_log = a.log.clone();
    for s in [a, b, c] {
        s.stop();
    }
    let log = std::fs::read_to_string(a_log).unwrap();
    assert_refused_as_stale(&log, "req-a");
    scratch.drop_db().await.unwrap();
}

/// A lock holder dies between taking the lock and writing (failpoint
/// `engine.after_lock=return(exit)`): its order is stranded only until the lock's
/// TTL, then another instance charges it once, with a higher fencing token, and
/// the client's retry of the lost request replays that charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_holder_that_dies_strands_its_order_only_until_the_ttl() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    const OID: &str = "OD20240517X0001";
    const TTL_MS: u64 = 1500;
    let scratch = ScratchDb::create(&base, "pg_test_lockdeath").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("lockdeath");
    let ttl = TTL_MS.to_string();
    let args = [
        "--redis",
        redis.as_str(),
        "--redis-prefix",
        prefix.as_str(),
        "--lock-ttl-ms",
        ttl.as_str(),
    ];
    let a = start_with_env(
        dir.path(),
        "pay-a",
        &db,
        &args,
        &[("FAILPOINTS", "engine.after_lock=return(exit)")],
    );
    let b = start(dir.path(), "pay-b", &db, &args);
    let http = reqwest::Client::new();
    account_and_order(&http, &b.url, OID).await;

    let lost = http
        .post(format!("{}/v1/orders/{OID}/deduct", a.url))
        .send()
        .await;
    assert!(lost.is_err(), "A died before answering: {lost:?}");
    assert_eq!(a.wait_exit(), Some(86), "A ended at the failpoint");
    // A's log died with it (like kill -9); Redis shows the lock it left behind.
    let mut redis_conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}:lock:order:{OID}");
    let holder: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    assert!(
        holder.as_deref().is_some_and(|h| h.starts_with("pay-a:")),
        "the dead holder's lock must still be there: {holder:?}"
    );
    let fence_before: i64 = redis::cmd("HGET")
        .arg(format!("{prefix}:fence"))
        .arg("n")
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    assert!(
        debits(&http, &b.url, OID).await.is_empty(),
        "A wrote nothing"
    );

    let asked = std::time::Instant::now();
    let (status, body) = deduct(&http, &b.url, OID, "req-b").await;
    let waited = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"], json!(false), "B charged");
    assert!(
        waited >= Duration::from_millis(TTL_MS / 2),
        "B must have waited for A's lock to lapse, took {waited:?}"
    );
    let b_granted = b.wait_for_log(&["\"lock_acquired\"", OID, "req-b"], Duration::from_secs(1));
    let b_token = serde_json::from_str::<serde_json::Value>(&b_granted).unwrap()["token"]
        .as_i64()
        .unwrap();
    assert!(
        b_token & 0xffff_ffff > fence_before & 0xffff_ffff,
        "B's grant {b_granted} must come after the dead holder's (counter {fence_before})"
    );
    let (status, retry) = deduct(&http, &b.url, OID, "req-a-retry").await;
    assert_eq!(status, 200);
    assert_eq!(retry["replayed"], json!(true));
    assert_eq!(retry["entry"]["id"], body["entry"]["id"]);
    assert_eq!(debits(&http, &b.url, OID).await.len(), 1, "charged once");
    b.stop();
    scratch.drop_db().await.unwrap();
}

/// Redis behind the fault proxy, two instances on PostgreSQL, mid-storm: Redis
/// blackholed for 1.5 s (lock calls time out: the instances write without tokens,
/// the database still charges once), then every Redis connection cut. 0
/// violations, and the recorded history holds every 503 to "nothing moved".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_blackholed_and_reset_mid_storm_changes_nothing() {
    let (Some(base), Some(redis)) = (pg_base(), redis_url()) else {
        return;
    };
    let upstream = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = FaultProxy::start(upstream).await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let scratch = ScratchDb::create(&base, "pg_test_redisfault")
        .await
        .unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("redisfault");
    let servers: Vec<_> = (1..=2)
        .map(|i| {
            start(
                dir.path(),
                &format!("pay-{i}"),
                &db,
                &[
                    "--redis",
                    &via_proxy,
                    "--redis-prefix",
                    &prefix,
                    "--lock-ttl-ms",
                    "1000",
                ],
            )
        })
        .collect();
    let targets = servers.iter().map(|s| s.url.clone()).collect();
    let file = dir.path().join("history.jsonl");
    let mut args = storm_args(targets, &db, 150, 9);
    args.history = Some(file.clone());
    args.faults = true; // Redis blackholed, then every connection cut
    let storming = tokio::spawn(async move { storm(&args).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = proxy.reset_all();
    let report = storming.await.unwrap().unwrap();
    let logs: String = servers
        .iter()
        .map(|s| std::fs::read_to_string(&s.log).unwrap())
        .collect();
    for s in servers {
        s.stop();
    }
    assert!(report.ok, "{}", report.to_text());
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.server_errors_500, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    let violations = history::check(&history::read(&file).unwrap()).unwrap();
    assert!(violations.is_empty(), "history violations: {violations:?}");
    let unavailable = logs.matches("\"lock_unavailable\"").count();
    let granted = logs.matches("\"lock_acquired\"").count();
    eprintln!(
        "Redis blackholed 1.5 s, then {cut} connections cut: {} requests, {} answered 503, {granted} locks granted, {unavailable} writes without a lock",
        report.requests, report.unavailable_503
    );
    assert!(unavailable > 0, "the blackhole never made a lock call fail");
    assert!(granted > 0, "no lock was ever granted through the proxy");
    scratch.drop_db().await.unwrap();
}

/// `payguard audit` pointed at a PostgreSQL database that payguard never used
/// says so in words (exit 2), instead of a raw "relation does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_database_payguard_never_used_says_so() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_emptyaudit")
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args(["audit", "--db", &pg_url(&base, &scratch.name)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a payguard database"), "{stderr}");
    scratch.drop_db().await.unwrap();
}
