//! After PostgreSQL + Redis instances have run and stopped in this process,
//! nothing they started is left: no async task, no file descriptor, no database
//! connection. Its own test binary, so no other test's sockets move the baseline.
//! Needs PAYGUARD_TEST_POSTGRES_URL and PAYGUARD_TEST_REDIS_URL; skips without.

mod pg_common;

use futures::future::join_all;
use payguard::engine::Guard;
use pg_common::{scratch, spawn_locked};
use serde_json::json;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// PostgreSQL + Redis instances run (duplicate deducts, so the locks are taken)
/// and stop, three times in one process: afterwards the async tasks and open fds
/// are back to the baseline, and the database has no connection of theirs left
/// (the pool closed everything it opened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_postgres_and_redis_instances_leave_nothing_behind() {
    const ROUNDS: usize = 3;
    const SETTLE_SECS: u64 = 15;
    let Some(db) = scratch("stopped_postgres_and_redis_instances_leave_nothing_behind").await
    else {
        return;
    };
    let redis = match std::env::var("PAYGUARD_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            eprintln!("SKIP: PAYGUARD_TEST_REDIS_URL is not set");
            db.drop_db().await.unwrap();
            return;
        }
    };
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIP: no /proc on this system");
        db.drop_db().await.unwrap();
        return;
    }
    let watcher = db.connect().await.unwrap();
    let connections = || async {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up once so lazily created process-wide resources exist before the baseline.
    spawn_locked(&db, "warm", Guard::Full, Some(&redis))
        .await
        .stop()
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (tasks0, fds0) = (metrics.num_alive_tasks(), open_fds());
    for round in 0..ROUNDS {
        let a = spawn_locked(&db, &format!("leak-{round}"), Guard::Full, Some(&redis)).await;
        let (status, _) = a
            .post(
                "/v1/accounts",
                json!({"id": format!("acct{round}"), "balance": 1_000_000}),
            )
            .await;
        assert_eq!(status, 201);
        for i in 0..20 {
            let (status, _) = a
                .post(
                    "/v1/orders",
                    json!({"id": format!("o{round}-{i}"), "account_id": format!("acct{round}"), "amount": 10}),
                )
                .await;
            assert_eq!(status, 201);
        }
        let calls = (0..20).flat_map(|i| {
            let path = format!("/v1/orders/o{round}-{i}/deduct");
            (0..5).map(move |_| path.clone())
        });
        let calls: Vec<String> = calls.collect();
        for (status, body) in join_all(calls.iter().map(|p| a.post(p, json!({})))).await {
            assert_eq!(status, 200, "round {round}: {body}");
        }
        assert!(
            connections().await > 0,
            "the instance holds pool connections"
        );
        a.stop().await;
    }
    let settle = std::time::Instant::now();
    loop {
        let (tasks, fds, conns) = (metrics.num_alive_tasks(), open_fds(), connections().await);
        if (tasks, fds, conns) == (tasks0, fds0, 0) {
            break;
        }
        assert!(
            settle.elapsed() < std::time::Duration::from_secs(SETTLE_SECS),
            "left behind: tasks {tasks0} -> {tasks}, fds {fds0} -> {fds}, database connections 0 -> {conns}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(watcher);
    db.drop_db().await.unwrap();
}
