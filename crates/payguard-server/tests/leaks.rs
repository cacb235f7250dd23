//! After servers have run and stopped in this process, nothing they started is
//! left behind: no async task, no file descriptor (database files, sockets), no
//! thread (SQLite's writer and readers) and no database connection (PostgreSQL's
//! pool). One test for every backend (SQLite; PostgreSQL with the Redis lock when
//! both are configured, skipped with a printed reason otherwise), run one after
//! the other in its own test binary, so no other test's sockets or threads move
//! the baseline.

use futures::future::join_all;
use payguard::store::postgres::tokio_postgres::Client;
use payguard_testkit::{AppOptions, Backend, TestApp, TestDb};
use serde_json::json;
use std::time::Duration;

/// Start-run-stop rounds per backend.
const ROUNDS: usize = 3;
/// How long what a stopped server started may take to go (blocking-pool threads
/// linger idle for a while by design).
const SETTLE_SECS: u64 = 15;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn thread_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_servers_leave_no_task_fd_thread_or_connection_behind() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIP: no /proc on this system");
        return;
    }
    for backend in
        Backend::available("stopped_servers_leave_no_task_fd_thread_or_connection_behind")
    {
        let db = TestDb::create(backend).await;
        let redis = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => match std::env::var("PAYGUARD_TEST_REDIS_URL") {
                Ok(u) if !u.is_empty() => Some(u),
                _ => {
                    eprintln!(
                        "SKIP the Redis lock on PostgreSQL: PAYGUARD_TEST_REDIS_URL is not set"
                    );
                    None
                }
            },
        };
        rounds_leave_nothing(&db, redis).await;
        db.drop_db().await;
    }
}

/// Connections other than the watcher's to a scratch PostgreSQL database.
async fn connections(watcher: &Option<(Client, String)>) -> i64 {
    match watcher {
        None => 0,
        Some((client, name)) => client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0),
    }
}

/// Instances run duplicate deducts (so the locks, with Redis, are taken) and
/// stop, [`ROUNDS`] times on `db`; afterwards tasks and fds are back to the
/// baseline, SQLite's threads too, and PostgreSQL has no connection of theirs.
async fn rounds_leave_nothing(db: &TestDb, redis: Option<String>) {
    let backend = db.backend().name();
    let watcher = match db {
        TestDb::Postgres(scratch) => Some((scratch.connect().await.unwrap(), scratch.name.clone())),
        TestDb::Sqlite { .. } => None,
    };
    let opts = |name: &str| AppOptions {
        redis: redis.clone(),
        ..AppOptions::instance(name)
    };
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up once so lazily created process-wide resources exist before the baseline.
    TestApp::spawn(db, opts("warm")).await.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (tasks0, fds0, threads0) = (metrics.num_alive_tasks(), open_fds(), threads());
    for round in 0..ROUNDS {
        let app = TestApp::spawn(db, opts(&format!("leak-{round}"))).await;
        let acct = format!("acct{round}");
        app.account(&acct, 1_000_000).await;
        for i in 0..20 {
            app.order(&format!("o{round}-{i}"), &acct, 10).await;
        }
        let paths: Vec<String> = (0..20)
            .flat_map(|i| std::iter::repeat_n(format!("/v1/orders/o{round}-{i}/deduct"), 5))
            .collect();
        for r in join_all(paths.iter().map(|p| app.post(p, json!({})))).await {
            assert_eq!(r.status, 200, "{backend} round {round}: {:?}", r.body);
        }
        if watcher.is_some() {
            assert!(
                connections(&watcher).await > 0,
                "the instance holds pool connections"
            );
        }
        app.stop().await;
    }
    let settle = std::time::Instant::now();
    loop {
        let (tasks, fds, th, conns) = (
            metrics.num_alive_tasks(),
            open_fds(),
            threads(),
            connections(&watcher).await,
        );
        // SQLite's threads are checked as before; PostgreSQL's instances start none
        // of their own, and their connections are counted instead.
        let threads_ok = watcher.is_some() || th <= threads0 + 2;
        if (tasks, fds, conns) == (tasks0, fds0, 0) && threads_ok {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(SETTLE_SECS),
            "{backend}: left behind: tasks {tasks0} -> {tasks}, fds {fds0} -> {fds}, threads {threads0} -> {th}, database connections 0 -> {conns}: {:?}",
            thread_names()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
