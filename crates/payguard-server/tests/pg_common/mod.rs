//! Real servers on port 0 over PostgreSQL (each its own PgStore and pool, like
//! `payguard serve --db postgres://…`), for the PostgreSQL test files.
#![allow(dead_code)]

use payguard::engine::Guard;
use payguard::store::postgres::{PgConfig, PgStore, ScratchDb};
use payguard::{Engine, EngineConfig};
use payguard_server::AppState;
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::oneshot;

const URL_ENV: &str = "PAYGUARD_TEST_POSTGRES_URL";

pub async fn scratch(test: &str) -> Option<ScratchDb> {
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
pub struct Instance {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn(db: &ScratchDb, name: &str, guard: Guard) -> Instance {
    spawn_locked(db, name, guard, None).await
}

/// Like [`spawn`], with Redis order locks (`--redis`) when `redis` is a URL.
pub async fn spawn_locked(
    db: &ScratchDb,
    name: &str,
    guard: Guard,
    redis: Option<&str>,
) -> Instance {
    spawn_full(
        db,
        name,
        guard,
        redis,
        payguard_server::ApiKeys::default(),
        payguard_server::Limits::default(),
    )
    .await
}

/// Like [`spawn_locked`], with API keys and limits of the test's choosing.
pub async fn spawn_full(
    db: &ScratchDb,
    name: &str,
    guard: Guard,
    redis: Option<&str>,
    keys: payguard_server::ApiKeys,
    limits: payguard_server::Limits,
) -> Instance {
    let store: Arc<dyn payguard::Store> = Arc::new(
        PgStore::connect(PgConfig {
            // Many tests run at once on one server: small pools fit its max_connections.
            pool_connections_max: 4,
            ..PgConfig::new(db.config.clone())
        })
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
                payguard::engine::fence_epochs(store.clone()),
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
    let mut state = AppState::new(engine.clone());
    state.keys = keys;
    state.limits = limits;
    let server = tokio::spawn(payguard_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Instance {
        addr,
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
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
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

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}
