//! Crashes, with nothing acknowledged lost and nothing charged twice: `kill -9`
//! at random moments and exits at failpoints (mid-batch, after commit), on SQLite
//! and on PostgreSQL (those need PAYGUARD_TEST_POSTGRES_URL, else they skip).

mod common;

use common::{debits, get_json, pg_base, pg_url, start, start_with_env, Server};
use payguard::store::postgres::ScratchDb;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
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
        &[("FAILPOINTS", "store.after_commit=return(exit)")],
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
    let account: serde_json::Value = get_json(&http, format!("{}/v1/accounts/a", s.url)).await;
    assert_eq!(account["balance"], 5000 - 1185);
    let audit: serde_json::Value = get_json(&http, format!("{}/v1/audit", s.url)).await;
    assert_eq!(audit["ok"], json!(true));
    s.stop();
}

/// How a round's server dies.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// `kill -9` up to this many ms after the round's first answer.
    Kill9 { within_ms: u64 },
    /// The server is armed with `FAILPOINTS=<this>` and ends itself (exit 86)
    /// where it says; killed after the round if it never got there.
    Failpoint(&'static str),
}

/// What the rounds left behind.
struct Rounds {
    acked: usize,
    unanswered: usize,
    charged: usize,
    exits_at_failpoint: usize,
}

fn crash_rounds_from_env(default: usize) -> usize {
    std::env::var("PAYGUARD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rounds of duplicate load (30 orders × 2 concurrent deducts) on one database,
/// each ended by `crash`, each followed by a restart; then every request that got
/// no answer is retried. Every acknowledged charge must be in the ledger with the
/// acknowledged entry id, no order may have two debits, every retry settles as
/// charged once, and the audit is clean.
async fn crash_rounds(dir: &Path, db: &str, rounds: usize, crash: Crash, seed: u64) -> Rounds {
    crash_rounds_on(dir, db, rounds, crash, seed, &[]).await
}

/// [`crash_rounds`] with extra `serve` flags on every server (`--guard naive`).
async fn crash_rounds_on(
    dir: &Path,
    db: &str,
    rounds: usize,
    crash: Crash,
    seed: u64,
    extra: &[&str],
) -> Rounds {
    const ORDERS_PER_ROUND: usize = 30;
    const ROUND_WAIT: Duration = Duration::from_secs(10);
    let http = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // order id -> entry ids acknowledged for it
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    let mut unanswered: Vec<String> = Vec::new();
    let mut exits_at_failpoint = 0;
    {
        let s = start(dir, "setup", db, extra);
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
        let name = format!("r{round}");
        // Orders are created on a clean server, so the crash lands on deducts only.
        {
            let s = start(dir, &format!("{name}-orders"), db, extra);
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
            s.stop();
        }
        let s: Server = match crash {
            Crash::Kill9 { .. } => start(dir, &name, db, extra),
            Crash::Failpoint(fp) => start_with_env(dir, &name, db, extra, &[("FAILPOINTS", fp)]),
        };
        let mut calls = Vec::new();
        // Answers seen so far this round: a kill waits for the first, so that it
        // lands mid-load however slow the machine is (CI once saw 12 rounds of
        // kills that all landed before the server answered anything).
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..ORDERS_PER_ROUND {
            for _dup in 0..2 {
                let (http, url, oid, answered) = (
                    http.clone(),
                    format!("{}/v1/orders/k{round}-{i}/deduct", s.url),
                    format!("k{round}-{i}"),
                    answered.clone(),
                );
                calls.push(tokio::spawn(async move {
                    let r = tokio::time::timeout(ROUND_WAIT, http.post(url).send()).await;
                    let entry = match r {
                        Ok(Ok(r)) if r.status() == 200 => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|b| b["entry"]["id"].as_str().map(str::to_owned)),
                        _ => None,
                    };
                    if entry.is_some() {
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    (oid, entry)
                }));
            }
        }
        match crash {
            Crash::Kill9 { within_ms } => {
                let first_answer_by = tokio::time::Instant::now() + ROUND_WAIT;
                while answered.load(std::sync::atomic::Ordering::Relaxed) == 0
                    && tokio::time::Instant::now() < first_answer_by
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..within_ms))).await;
                s.kill9();
            }
            Crash::Failpoint(_) => {
                let mut outcomes = Vec::new();
                for c in calls.drain(..) {
                    outcomes.push(c.await.unwrap());
                }
                match s.try_exit() {
                    Ok(Some(code)) => {
                        assert_eq!(code, 86, "{name} ended, but not at the failpoint");
                        exits_at_failpoint += 1;
                    }
                    Ok(None) => panic!("{name}: exit code unknown"),
                    Err(s) => s.kill9(),
                }
                calls = outcomes
                    .into_iter()
                    .map(|o| tokio::spawn(async move { o }))
                    .collect();
            }
        }
        for c in calls {
            let (oid, entry) = c.await.unwrap();
            match entry {
                Some(e) => acked.entry(oid).or_default().push(e),
                None => unanswered.push(oid),
            }
        }
    }
    let s = start(dir, "final", db, extra);
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
            let debits: Vec<String> = debits(&http, &s.url, &oid)
                .await
                .iter()
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
            assert_eq!(debits.len(), 1, "{oid} is not charged after its retry");
            charged += debits.len();
        }
    }
    let audit: serde_json::Value = get_json(&http, format!("{}/v1/audit", s.url)).await;
    assert_eq!(audit["ok"], json!(true), "{audit}");
    s.stop();
    Rounds {
        acked: acked.len(),
        unanswered: unanswered.len(),
        charged,
        exits_at_failpoint,
    }
}

/// `kill -9` at random moments under duplicate load, restart, repeat. Rounds:
/// PAYGUARD_CRASH_ROUNDS (default 12 for CI; the documented soak runs 60).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_charge() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kill.db");
    let rounds = crash_rounds_from_env(12);
    let r = crash_rounds(
        dir.path(),
        db.to_str().unwrap(),
        rounds,
        Crash::Kill9 { within_ms: 25 },
        9,
    )
    .await;
    assert!(
        r.acked > 0 && r.unanswered > 0,
        "the kills must land mid-load: {} acked, {} unanswered",
        r.acked,
        r.unanswered
    );
    eprintln!("SQLite: {rounds} kill -9 rounds: {} orders acknowledged, {} requests unanswered then retried, {} charged", r.acked, r.unanswered, r.charged);
}

/// The same on PostgreSQL: the instance dies, the database keeps what it committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_on_postgres_loses_no_acknowledged_charge() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_kill9").await.unwrap();
    let db = pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let rounds = crash_rounds_from_env(12);
    let r = crash_rounds(dir.path(), &db, rounds, Crash::Kill9 { within_ms: 150 }, 19).await;
    assert!(
        r.acked > 0 && r.unanswered > 0,
        "the kills must land mid-load: {} acked, {} unanswered",
        r.acked,
        r.unanswered
    );
    eprintln!("PostgreSQL: {rounds} kill -9 rounds: {} orders acknowledged, {} requests unanswered then retried, {} charged", r.acked, r.unanswered, r.charged);
    // Nothing of the killed instances lingers on the server: every connection
    // they held is closed, so no pool slot or row lock outlives its process.
    const SETTLE_SECS: u64 = 10;
    let watcher = scratch.connect().await.unwrap();
    let settle = std::time::Instant::now();
    loop {
        let left: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&scratch.name],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(SETTLE_SECS),
            "{left} connections of killed instances still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(watcher);
    scratch.drop_db().await.unwrap();
}

/// The process ends inside a group commit, half of its ops executed, nothing
/// committed: none of that batch may survive (the audit would see a debit without
/// its balance change), none of it was acknowledged, and the retries charge once.
async fn mid_batch_exit(db: &str, dir: &Path) {
    let rounds = crash_rounds_from_env(4);
    let r = crash_rounds(
        dir,
        db,
        rounds,
        Crash::Failpoint("store.mid_batch=return(exit)"),
        29,
    )
    .await;
    assert!(
        r.exits_at_failpoint > 0,
        "no round reached a batch of two or more ops"
    );
    assert!(r.unanswered > 0);
    eprintln!("{db}: {rounds} rounds, {} ended at store.mid_batch: {} orders acknowledged, {} unanswered then retried, {} charged", r.exits_at_failpoint, r.acked, r.unanswered, r.charged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_mid_batch_on_sqlite_commits_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mid.db");
    mid_batch_exit(db.to_str().unwrap(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_mid_batch_on_postgres_commits_none_of_it() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_midbatch").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    mid_batch_exit(&pg_url(&base, &scratch.name), dir.path()).await;
    scratch.drop_db().await.unwrap();
}

/// A batch fails half-way (the database errors before COMMIT): every request in
/// it is answered 503, and 503 means nothing moved (the order is still PREPARE);
/// the retry then charges once.
async fn mid_batch_error(db: &str, dir: &Path) {
    const WAVES_MAX: usize = 5;
    const WAVE: usize = 40;
    let http = reqwest::Client::new();
    let s = start_with_env(
        dir,
        "midbatch-error",
        db,
        &[],
        &[("FAILPOINTS", "store.mid_batch=1*return(error)")],
    );
    let r = post(
        &http,
        format!("{}/v1/accounts", s.url),
        Some(json!({"id": "a", "balance": 1_000_000})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let mut failed: Vec<String> = Vec::new();
    let mut paid = 0;
    for wave in 0..WAVES_MAX {
        for i in 0..WAVE {
            let r = post(
                &http,
                format!("{}/v1/orders", s.url),
                Some(json!({"id": format!("e{wave}-{i}"), "account_id": "a", "amount": 10})),
            )
            .await
            .unwrap();
            assert_eq!(r.status(), 201);
        }
        let calls: Vec<_> = (0..WAVE)
            .map(|i| {
                let (http, url, oid) = (
                    http.clone(),
                    format!("{}/v1/orders/e{wave}-{i}/deduct", s.url),
                    format!("e{wave}-{i}"),
                );
                tokio::spawn(async move { (oid, http.post(url).send().await.unwrap().status()) })
            })
            .collect();
        for c in calls {
            let (oid, status) = c.await.unwrap();
            match status.as_u16() {
                200 => paid += 1,
                503 => failed.push(oid),
                other => panic!("{oid}: unexpected {other}"),
            }
        }
        if !failed.is_empty() {
            break;
        }
    }
    assert!(!failed.is_empty(), "the failpoint never failed a batch");
    for oid in &failed {
        let order: serde_json::Value = get_json(&http, format!("{}/v1/orders/{oid}", s.url)).await;
        assert_eq!(
            order["status"], "PREPARE",
            "{oid} got 503 but moved: {order}"
        );
        let r = post(&http, format!("{}/v1/orders/{oid}/deduct", s.url), None)
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "retry of {oid}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["replayed"],
            json!(false),
            "the retry is the first charge"
        );
    }
    let audit: serde_json::Value = get_json(&http, format!("{}/v1/audit", s.url)).await;
    assert_eq!(audit["ok"], json!(true), "{audit}");
    eprintln!("{db}: one batch failed mid-way: {} requests got 503 with nothing moved and then charged once on retry; {paid} paid directly", failed.len());
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_failing_mid_way_on_sqlite_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("miderr.db");
    mid_batch_error(db.to_str().unwrap(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_failing_mid_way_on_postgres_moves_nothing() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_miderr").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    mid_batch_error(&pg_url(&base, &scratch.name), dir.path()).await;
    scratch.drop_db().await.unwrap();
}

/// The crash checker, run on the incident's design (`--guard naive`, duplicates
/// racing through a check-then-act): it must catch the double charges, or it
/// would prove nothing on payguard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_crash_checker_catches_the_naive_design() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("naive.db");
    let db = db.to_str().unwrap().to_owned();
    let caught = std::panic::AssertUnwindSafe(crash_rounds_on(
        dir.path(),
        &db,
        2,
        Crash::Kill9 { within_ms: 200 },
        39,
        &[
            "--guard",
            "naive",
            "--i-know-this-double-charges",
            "--naive-gap-ms",
            "5",
        ],
    ))
    .catch_unwind()
    .await;
    let message = match caught {
        Ok(_) => panic!("the crash checker passed the naive design"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(
        message.contains("charged") || message.contains("audit"),
        "it failed, but not on money: {message}"
    );
    eprintln!("naive design caught: {message}");
}

/// Holds that expired while no instance ran, released by a sweeper that dies
/// mid-sweep: first an exit inside the sweeper's expiry batch (the failpoint
/// `store.mid_batch`), then `kill -9` the moment a sweep begins, on the same
/// database; a last instance sweeps what is left. Every hold is released exactly
/// once (one release entry each, EXPIRED), `held` is back to zero and the audit is
/// clean. SQLite, and PostgreSQL when configured.
async fn sweeper_dies_mid_sweep(db: &str, dir: &Path) {
    const HOLDS: usize = 24;
    let http = reqwest::Client::new();
    // A sweeper that never comes round while the holds are made.
    let s = start(dir, "hold-maker", db, &["--sweep-interval", "1h"]);
    let r = post(
        &http,
        format!("{}/v1/accounts", s.url),
        Some(json!({"id": "holder", "balance": 1_000_000})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    for i in 0..HOLDS {
        let r = post(
            &http,
            format!("{}/v1/orders", s.url),
            Some(json!({"id": format!("h{i}"), "account_id": "holder", "amount": 100})),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
        let r = post(
            &http,
            format!("{}/v1/orders/h{i}/authorize", s.url),
            Some(json!({"hold_ttl_s": 1})),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    }
    s.stop();
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // An exit inside the expiry batch.
    let s = start_with_env(
        dir,
        "sweeper-exit",
        db,
        &["--sweep-interval", "20ms"],
        &[("FAILPOINTS", "store.mid_batch=return(exit)")],
    );
    assert_eq!(
        s.wait_exit(),
        Some(86),
        "the sweep ended the process mid-batch"
    );
    // kill -9 as a sweep begins.
    let s = start(dir, "sweeper-killed", db, &["--sweep-interval", "20ms"]);
    s.wait_for_log(&["\"expire_start\""], Duration::from_secs(10));
    s.kill9();
    let open: serde_json::Value = {
        let s = start(dir, "reader", db, &["--sweep-interval", "1h"]);
        let a = get_json(&http, format!("{}/v1/accounts/holder", s.url)).await;
        s.stop();
        a
    };
    eprintln!(
        "{db}: after an exit mid-sweep and a kill -9 mid-sweep, {} of {HOLDS} holds still held",
        open["held"].as_i64().unwrap_or(-1) / 100
    );

    // The last sweeper releases the rest.
    let s = start(dir, "sweeper", db, &["--sweep-interval", "20ms"]);
    let mut held = i64::MAX;
    for _ in 0..200 {
        held = get_json(&http, format!("{}/v1/accounts/holder", s.url)).await["held"]
            .as_i64()
            .unwrap();
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held, 0, "every hold released");
    for i in 0..HOLDS {
        let order = get_json(&http, format!("{}/v1/orders/h{i}", s.url)).await;
        assert_eq!(order["status"], "EXPIRED", "h{i}: {order}");
        let entries = get_json(&http, format!("{}/v1/orders/h{i}/entries", s.url)).await;
        let kinds: Vec<&str> = entries["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["hold", "release"], "h{i}: released exactly once");
    }
    let account = get_json(&http, format!("{}/v1/accounts/holder", s.url)).await;
    assert_eq!(account["balance"], 1_000_000);
    let audit = get_json(&http, format!("{}/v1/audit", s.url)).await;
    assert_eq!(audit["ok"], json!(true), "{audit}");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_dying_mid_sweep_releases_each_hold_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sweep.db");
    sweeper_dies_mid_sweep(db.to_str().unwrap(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_dying_mid_sweep_releases_each_hold_once_on_postgres() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_sweep").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    sweeper_dies_mid_sweep(&pg_url(&base, &scratch.name), dir.path()).await;
    scratch.drop_db().await.unwrap();
}
