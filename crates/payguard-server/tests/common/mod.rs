//! Starts the real server on port 0 with its own temporary SQLite database, the
//! way `payguard serve` does, and talks HTTP to it.
#![allow(dead_code)]

use payguard::store::sqlite::{SqliteConfig, SqliteStore};
use payguard::{Engine, EngineConfig};
use payguard_server::AppState;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::oneshot;

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    pub engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(EngineConfig::default()).await
}

pub async fn spawn_app_with(cfg: EngineConfig) -> TestApp {
    spawn_app_full(
        cfg,
        payguard_server::ApiKeys::default(),
        payguard_server::Limits::default(),
    )
    .await
}

pub async fn spawn_app_full(
    cfg: EngineConfig,
    keys: payguard_server::ApiKeys,
    limits: payguard_server::Limits,
) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("payguard.db");
    spawn_app_on(dir, db_path, cfg, keys, limits).await
}

/// A second server on an existing database (another instance, or a restart).
pub async fn spawn_app_on(
    dir: tempfile::TempDir,
    db_path: PathBuf,
    mut cfg: EngineConfig,
    keys: payguard_server::ApiKeys,
    limits: payguard_server::Limits,
) -> TestApp {
    let mut store_cfg = SqliteConfig::new(&db_path);
    if matches!(cfg.guard, payguard::engine::Guard::Naive { .. }) {
        // The incident's database, without the money constraints.
        store_cfg.schema = payguard::store::sqlite::SchemaKind::Naive;
    }
    let store = SqliteStore::open(store_cfg).expect("open store");
    cfg.instance_id = "test-1".into();
    let engine = Arc::new(match cfg.guard {
        payguard::engine::Guard::Naive { .. } => {
            let naive = payguard::store::sqlite::naive::NaiveSqlite::new(store).expect("naive");
            Engine::start_naive(naive, cfg, None)
        }
        _ => Engine::start(Arc::new(store), cfg),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let mut state = AppState::new(engine.clone());
    state.keys = keys;
    state.limits = limits;
    let server = tokio::spawn(payguard_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap(),
        db_path,
        engine,
        shutdown: Some(tx),
        server: Some(server),
        _dir: dir,
    }
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let r = req.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(_) => Value::String(text),
            }
        };
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    pub async fn post_empty(&self, path: &str) -> Resp {
        self.send(self.client.post(self.url(path))).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn account(&self, id: &str, balance: i64) {
        let r = self
            .post("/v1/accounts", json!({"id": id, "balance": balance}))
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    pub async fn order(&self, id: &str, account: &str, amount: i64) {
        let r = self
            .post(
                "/v1/orders",
                json!({"id": id, "account_id": account, "amount": amount}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    /// A GET's body as text, whatever its status (`/metrics`).
    pub async fn get_text(&self, path: &str) -> String {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        r.text().await.expect("body")
    }

    pub async fn balance(&self, account: &str) -> i64 {
        let r = self.get(&format!("/v1/accounts/{account}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["balance"].as_i64().unwrap()
    }

    /// Every row of every table, read straight from the database file.
    pub fn dump(&self) -> Vec<String> {
        let conn = rusqlite::Connection::open(&self.db_path).unwrap();
        let mut out = Vec::new();
        for table in ["accounts", "orders", "entries", "payguard_meta"] {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
                .unwrap();
            let cols = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    let mut s = format!("{table}:");
                    for i in 0..cols {
                        let v: rusqlite::types::Value = r.get(i)?;
                        s.push_str(&format!(" {v:?}"));
                    }
                    Ok(s)
                })
                .unwrap();
            for row in rows {
                out.push(row.unwrap());
            }
        }
        out
    }

    pub fn sql(&self, sql: &str) {
        let conn = rusqlite::Connection::open(&self.db_path).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    /// Stops the server the way SIGTERM does and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    /// Stops the server but keeps its database directory for another instance.
    pub async fn stop_keep_dir(mut self) -> (tempfile::TempDir, PathBuf) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, self.db_path.clone())
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn wait_stopped(&mut self) {
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}
