//! Network faults between payguard and PostgreSQL, through a TCP fault proxy:
//! connections reset, latency, a blackhole (partition that heals), half-open
//! connections (answers lost). Under each, mid-storm: nothing is charged twice,
//! nothing acknowledged is lost, and the recorded history holds every 503 to
//! "nothing moved". Needs PAYGUARD_TEST_POSTGRES_URL.

mod common;

use common::proxy::{FaultProxy, Mode};
use common::{pg_base, start};
use payguard::store::postgres::ScratchDb;
use payguard_cli::storm::{history, storm, StormArgs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A scratch database, a proxy in front of its server, the URL through the proxy
/// and the direct one (for the checkers).
async fn proxied(base: &str, tag: &str) -> (ScratchDb, FaultProxy, String, String) {
    let scratch = ScratchDb::create(base, tag).await.unwrap();
    let (server_part, _) = base.rsplit_once('/').unwrap();
    let host_port = server_part.rsplit_once('@').map_or(server_part, |(_, h)| h);
    let host_port = host_port
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let proxy = FaultProxy::start(host_port.to_owned()).await;
    let user = server_part
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://")
        .split_once('@')
        .map_or("postgres", |(u, _)| u);
    let via_proxy = format!(
        "postgres://{user}@127.0.0.1:{}/{}",
        proxy.port, scratch.name
    );
    let direct = common::pg_url(base, &scratch.name);
    (scratch, proxy, via_proxy, direct)
}

fn storm_args(
    target: String,
    db: String,
    seed: u64,
    history: Option<std::path::PathBuf>,
    two_phase: f64,
) -> StormArgs {
    StormArgs {
        target: vec![target],
        api_key: None,
        orders: 150,
        dup: 4,
        concurrency: 32,
        duration: 120,
        refund_ratio: 0.2,
        poor_ratio: 0.1,
        seed,
        run_tag: Some(format!("pf{seed}")),
        db: Some(db),
        json: true,
        html: None,
        no_progress: true,
        history,
        // Every storm here injects a network fault between payguard and PostgreSQL.
        faults: true,
        slow_ms: payguard_cli::storm::liveness::SLOW_MS_DEFAULT,
        two_phase,
        hold_grace_ms: payguard_cli::storm::HOLD_GRACE_MS_DEFAULT,
    }
}

/// Runs a storm through the proxy while `fault` plays, then checks the online
/// report and the recorded history (where a 503 must mean nothing moved).
async fn storm_through_fault<F, Fut>(
    tag: &str,
    seed: u64,
    extra: &[&str],
    fault: F,
) -> (String, usize)
where
    F: FnOnce(Arc<FaultProxy>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let base = pg_base().expect("checked by the caller");
    let (scratch, proxy, via_proxy, direct) = proxied(&base, tag).await;
    let proxy = Arc::new(proxy);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), tag, &via_proxy, extra);
    let file = dir.path().join("history.jsonl");
    let two_phase = if tag.contains("two_phase") { 0.5 } else { 0.0 };
    let args = storm_args(
        server.url.clone(),
        direct,
        seed,
        Some(file.clone()),
        two_phase,
    );
    let storming = tokio::spawn(async move { storm(&args).await });
    fault(proxy.clone()).await;
    proxy.set(Mode::Pass);
    let report = match storming.await.unwrap() {
        Ok(r) => r,
        Err(e) => panic!(
            "{tag}: the storm failed: {e:#}\n{}",
            std::fs::read_to_string(&server.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    let log_path = server.log.clone();
    server.stop();
    assert!(report.ok, "{}", report.to_text());
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    let lines = history::read(&file).unwrap();
    let violations = history::check(&lines).unwrap();
    assert!(violations.is_empty(), "history violations: {violations:?}");
    let log = std::fs::read_to_string(log_path).unwrap();
    eprintln!(
        "{tag}: {} requests, {} answered 503, {} answered 500, {} unanswered; history clean",
        report.requests, report.unavailable_503, report.server_errors_500, report.no_answer
    );
    drop(proxy);
    scratch.drop_db().await.unwrap();
    (log, report.unavailable_503)
}

/// Every proxied connection cut 6 times, 120 ms apart, during setup and the
/// duplicate storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_reset_mid_storm_change_nothing() {
    if pg_base().is_none() {
        return;
    }
    let cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = cut.clone();
    storm_through_fault("pg_test_reset", 21, &[], |proxy| async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            counted.fetch_add(proxy.reset_all(), Ordering::Relaxed);
        }
    })
    .await;
    assert!(
        cut.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no connection was cut"
    );
}

/// The reset storm with half its orders paid in two steps (issue #14):
/// authorizes, captures, voids and expiries racing while every PostgreSQL
/// connection is cut 6 times; the history checker's two-phase invariants hold
/// (one of capture, void or expiry per hold, `held` adding up, every 503 a
/// step that did not happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_phase_storm_through_connection_resets_changes_nothing() {
    if pg_base().is_none() {
        return;
    }
    let cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = cut.clone();
    storm_through_fault(
        "pg_test_two_phase_reset",
        27,
        &["--sweep-interval", "100ms"],
        |proxy| async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(120)).await;
                counted.fetch_add(proxy.reset_all(), Ordering::Relaxed);
            }
        },
    )
    .await;
    assert!(cut.load(Ordering::Relaxed) > 0, "no connection was cut");
}

/// For 400 ms mid-storm every connection that sends a COMMIT loses all answers
/// from then on (half-open at the worst moment): the transactions commit and
/// payguard never hears it. Each unanswered COMMIT must be looked up
/// (`txid_status`) and answered with the truth, never a 503 for a batch that
/// committed; the history checker holds every 503 to "nothing moved".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_postgres_connections_never_turn_a_commit_into_a_503() {
    if pg_base().is_none() {
        return;
    }
    half_open("pg_test_halfopen", &["--pg-batch-deadline-ms", "700"]).await;
}

/// The same with half the orders paid in two steps (issue #14): a capture,
/// void or expiry whose COMMIT goes unanswered is looked up like a charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_phase_storm_through_half_open_commits_changes_nothing() {
    if pg_base().is_none() {
        return;
    }
    half_open(
        "pg_test_two_phase_halfopen",
        &["--pg-batch-deadline-ms", "700", "--sweep-interval", "100ms"],
    )
    .await;
}

async fn half_open(tag: &str, extra: &[&str]) {
    let (log, _) = storm_through_fault(tag, 31, extra, |proxy| async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.set(Mode::HalfOpenAtCommit);
        tokio::time::sleep(Duration::from_millis(400)).await;
    })
    .await;
    let resolved: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("\"store_commit_resolved\"")
                || l.contains("\"store_commit_unanswered\"")
                || l.contains("store_outcome_unknown")
        })
        .collect();
    assert!(
        resolved.iter().any(|l| l.contains("\"committed\":true")),
        "no unanswered COMMIT was found committed: the fault missed the commits\n{}",
        resolved.join("\n")
    );
}

/// PostgreSQL blackholed for 2.5 s mid-storm (bytes held, then delivered late,
/// as TCP would after a partition heals): batches give up at their deadline,
/// unanswered COMMITs are resolved once the database is reachable again (a late
/// COMMIT cannot land after the answer: its backend is ended first), and the
/// lanes are free again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_blackhole_mid_storm_moves_nothing_it_denies() {
    if pg_base().is_none() {
        return;
    }
    blackhole("pg_test_blackhole", &["--pg-batch-deadline-ms", "700"]).await;
}

/// The same with half the orders paid in two steps (issue #14).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_phase_storm_through_a_postgres_blackhole_moves_nothing_it_denies() {
    if pg_base().is_none() {
        return;
    }
    blackhole(
        "pg_test_two_phase_blackhole",
        &["--pg-batch-deadline-ms", "700", "--sweep-interval", "100ms"],
    )
    .await;
}

async fn blackhole(tag: &str, extra: &[&str]) {
    let (log, unavailable) = storm_through_fault(tag, 32, extra, |proxy| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.set(Mode::Blackhole);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    })
    .await;
    let past_deadline = log.lines().filter(|l| l.contains("batch deadline")).count();
    eprintln!(
        "{past_deadline} batches gave up at their deadline, {unavailable} requests answered 503"
    );
    assert!(
        past_deadline > 0,
        "the blackhole must have held some batch past its deadline"
    );
}

/// 40 ms added to every chunk each way for the whole storm: slower, same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_latency_changes_nothing_but_time() {
    if pg_base().is_none() {
        return;
    }
    latency("pg_test_latency", &[]).await;
}

/// The same with half the orders paid in two steps (issue #14).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_phase_storm_through_postgres_latency_changes_nothing_but_time() {
    if pg_base().is_none() {
        return;
    }
    latency("pg_test_two_phase_latency", &["--sweep-interval", "100ms"]).await;
}

async fn latency(tag: &str, extra: &[&str]) {
    storm_through_fault(tag, 33, extra, |proxy| async move {
        proxy.set(Mode::Latency(Duration::from_millis(40)));
        tokio::time::sleep(Duration::from_millis(3000)).await;
    })
    .await;
}

/// One deduct whose COMMIT lands and whose answer is lost: the request must not
/// get a 503 (which promises nothing moved) for money that moved. payguard looks
/// the transaction up and answers 200 with the charge. (With the lookup switched
/// off this request gets a 503 while the order is PAID: that is how this test
/// was seen failing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_commit_is_looked_up_not_reported_as_503() {
    let Some(base) = pg_base() else { return };
    let (scratch, proxy, via_proxy, _) = proxied(&base, "pg_test_lostack").await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        "pay-lostack",
        &via_proxy,
        &["--pg-batch-deadline-ms", "700"],
    );
    let http = reqwest::Client::new();
    for (path, body) in [
        (
            "accounts",
            serde_json::json!({"id": "acct", "balance": 5000}),
        ),
        (
            "orders",
            serde_json::json!({"id": "OD1", "account_id": "acct", "amount": 1185}),
        ),
    ] {
        let r = http
            .post(format!("{}/v1/{path}", server.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    proxy.set(Mode::HalfOpenAtCommit);
    let url = format!("{}/v1/orders/OD1/deduct", server.url);
    let pending = tokio::spawn(async move { http.post(url).send().await.unwrap() });
    // Long enough for the COMMIT to go out and its answer to be lost; the lookup
    // and the re-run that follow (after the 700 ms deadline) see a healthy network.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Pass);
    let r = pending.await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    let log = std::fs::read_to_string(&server.log).unwrap();
    server.stop();
    assert_eq!(
        status, 200,
        "the charge committed; the answer must say so: {body}"
    );
    assert_eq!(body["order"]["status"], "PAID");
    assert!(
        log.contains("\"store_commit_resolved\"") && log.contains("\"committed\":true"),
        "the COMMIT's answer must have been lost and looked up:\n{log}"
    );
    drop(proxy);
    scratch.drop_db().await.unwrap();
}
