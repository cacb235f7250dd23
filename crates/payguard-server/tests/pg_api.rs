//! The HTTP promises once more, against PostgreSQL, with two server instances
//! sharing one database: their lanes never see each other's requests, so only the
//! database keeps an order to one charge.
//!
//! Needs `PAYGUARD_TEST_POSTGRES_URL` (e.g. postgres://postgres@127.0.0.1:5432/postgres);
//! without it each test prints why and passes without running. Each test makes
//! its own database and drops it at the end.

use futures::future::join_all;
use payguard::engine::Guard;
use payguard::store::postgres::{PgConfig, PgStore, ScratchDb};
use payguard::{Engine, EngineConfig};
use payguard_server::{AppState, ServiceInfo};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::oneshot;

const URL_ENV: &str = "PAYGUARD_TEST_POSTGRES_URL";

async fn scratch(test: &str) -> Option<ScratchDb> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(
            ScratchDb::create(&url, "pg_test")
                .await
                .expect("create a scratch database"),
        ),
        _ => {
            eprintln!("SKIP {test}: set {URL_ENV} (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it");
            None
        }
    }
}

/// One real server on port 0 over its own PgStore (its own pool), like `payguard
/// serve --db postgres://…`.
struct Instance {
    base: String,
    client: reqwest::Client,
    engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn spawn(db: &ScratchDb, name: &str, guard: Guard) -> Instance {
    spawn_locked(db, name, guard, None).await
}

/// Like [`spawn`], with Redis order locks (`--redis`) when `redis` is a URL.
async fn spawn_locked(db: &ScratchDb, name: &str, guard: Guard, redis: Option<&str>) -> Instance {
    let store: Arc<dyn payguard::Store> = Arc::new(
        PgStore::connect(PgConfig::new(db.config.clone()))
            .await
            .expect("connect"),
    );
    let locks = match redis {
        Some(url) => Some(Arc::new(
            payguard::lock::redis::RedisLocks::connect(
                url,
                &format!("leaks-{}-{}", db.name, name),
                name,
                std::time::Duration::from_millis(payguard::lock::LOCK_TTL_MS),
                store.clone(),
            )
            .await
            .expect("connect to redis"),
        )),
        None => None,
    };
    let engine = Arc::new(Engine::start_with_locks(
        store,
        EngineConfig {
            guard,
            instance_id: name.into(),
            ..EngineConfig::default()
        },
        locks,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let state = AppState::new(
        engine.clone(),
        ServiceInfo {
            instance: name.into(),
            guard: guard.name(),
            lock: "local",
        },
    );
    let server = tokio::spawn(payguard_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Instance {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap(),
        engine,
        shutdown: Some(tx),
        server,
    }
}

impl Instance {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

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
