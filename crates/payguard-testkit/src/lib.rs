//! Dev-only test kit: real payguard apps on port 0, over either backend.
//!
//! Why a crate: the server's tests, the CLI's tests and the fuzz checks each
//! used to assemble an app by hand (one copy per backend, `common` and
//! `pg_common`), and the copies drifted from what `payguard serve` runs. Here an
//! app is assembled by the one composition root ([`payguard_server::app`]) on a
//! [`TestDb`] of either [`Backend`], so a test written once runs on SQLite and
//! on PostgreSQL ([`Backend::available`]), as production would.
//!
//! PostgreSQL needs `PAYGUARD_TEST_POSTGRES_URL`; each test gets its own scratch
//! database. Without the variable, PostgreSQL runs are skipped with a printed
//! reason (a user's laptop), never silently.
#![forbid(unsafe_code)]

use payguard::engine::EngineConfig;
use payguard::store::postgres::{PgConfig, ScratchDb};
use payguard::store::sqlite::SqliteConfig;
use payguard::Engine;
use payguard_server::app::{self, AppSpec, Database, RedisSpec, Running};
use payguard_server::{ApiKeys, Limits};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Where PostgreSQL tests find their server.
pub const POSTGRES_URL_ENV: &str = "PAYGUARD_TEST_POSTGRES_URL";
/// Connections per test instance's pool: many tests run at once on one server,
/// and small pools fit its `max_connections`.
pub const TEST_PG_POOL_MAX: usize = 4;

/// Which database a test app runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backends this machine can run: SQLite always, PostgreSQL when
    /// [`POSTGRES_URL_ENV`] is set (otherwise `test` prints that it skips it).
    pub fn available(test: &str) -> Vec<Backend> {
        if postgres_url().is_some() {
            vec![Backend::Sqlite, Backend::Postgres]
        } else {
            eprintln!(
                "SKIP {test} on PostgreSQL: set {POSTGRES_URL_ENV} (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it"
            );
            vec![Backend::Sqlite]
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

fn postgres_url() -> Option<String> {
    std::env::var(POSTGRES_URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
}

/// A scratch PostgreSQL database for `test`, or `None` (with a printed reason)
/// when [`POSTGRES_URL_ENV`] is not set.
pub async fn pg_scratch(test: &str) -> Option<ScratchDb> {
    match postgres_url() {
        Some(url) => Some(
            ScratchDb::create(&url, "pg_test")
                .await
                .expect("create a scratch database"),
        ),
        None => {
            eprintln!("SKIP {test}: set {POSTGRES_URL_ENV} (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it");
            None
        }
    }
}

/// What the composition root opens for a scratch PostgreSQL database: its
/// own pool of [`TEST_PG_POOL_MAX`] connections, as one `payguard serve` would.
pub fn pg_database(db: &ScratchDb) -> Database {
    Database::Postgres(Box::new(PgConfig {
        pool_connections_max: TEST_PG_POOL_MAX,
        ..PgConfig::new(db.config.clone())
    }))
}

/// A test's own database: a SQLite file in a temporary directory, or a scratch
/// PostgreSQL database. Several apps may share one (instances side by side, or
/// a restart).
pub enum TestDb {
    Sqlite {
        dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres(Box<ScratchDb>),
}

impl TestDb {
    /// A fresh database on `backend`. Panics when PostgreSQL is asked for and
    /// not configured: ask [`Backend::available`] first.
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("payguard.db");
                TestDb::Sqlite { dir, path }
            }
            Backend::Postgres => TestDb::Postgres(Box::new(
                pg_scratch("TestDb::create")
                    .await
                    .expect("PostgreSQL asked for but not configured"),
            )),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestDb::Sqlite { .. } => Backend::Sqlite,
            TestDb::Postgres(_) => Backend::Postgres,
        }
    }

    /// What the composition root opens for this database.
    pub fn database(&self) -> Database {
        match self {
            TestDb::Sqlite { path, .. } => Database::Sqlite(SqliteConfig::new(path)),
            TestDb::Postgres(db) => pg_database(db),
        }
    }

    /// What keeps this database's Redis keys apart from other tests'.
    fn scope(&self) -> String {
        match self {
            TestDb::Sqlite { path, .. } => path.display().to_string(),
            TestDb::Postgres(pg) => pg.name.clone(),
        }
    }

    /// The SQLite file, for tests that read or edit it directly.
    pub fn sqlite_path(&self) -> Option<&PathBuf> {
        match self {
            TestDb::Sqlite { path, .. } => Some(path),
            TestDb::Postgres(_) => None,
        }
    }

    /// Drops a scratch PostgreSQL database (SQLite's directory goes with the value).
    pub async fn drop_db(self) {
        if let TestDb::Postgres(db) = self {
            (*db).drop_db().await.expect("drop the scratch database");
        }
    }
}

/// What a test app is started with, beyond its database.
#[derive(Clone)]
pub struct AppOptions {
    pub engine: EngineConfig,
    /// A Redis URL: the app takes its order locks there (`--redis`).
    pub redis: Option<String>,
    pub keys: ApiKeys,
    pub limits: Limits,
    pub two_phase: payguard_server::TwoPhase,
    pub webhooks: payguard_server::outbox::WebhookSettings,
}

impl AppOptions {
    /// The engine's defaults under `instance` as its instance id.
    pub fn instance(instance: &str) -> Self {
        AppOptions {
            engine: EngineConfig {
                instance_id: instance.into(),
                ..EngineConfig::default()
            },
            redis: None,
            keys: ApiKeys::default(),
            limits: Limits::default(),
            two_phase: payguard_server::TwoPhase::default(),
            webhooks: payguard_server::outbox::WebhookSettings::default(),
        }
    }
}

/// One real server on port 0, assembled by the composition root.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub engine: Arc<Engine>,
    running: Option<Running>,
}

/// One HTTP answer.
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl TestApp {
    /// Starts an app on `db` with `opts` (Redis keys get a prefix unique to
    /// the database, so apps of one test share their locks and no other test's).
    pub async fn spawn(db: &TestDb, opts: AppOptions) -> TestApp {
        Self::spawn_on(db.database(), &db.scope(), opts).await
    }

    /// Like [`TestApp::spawn`], on a database the test holds itself; `scope`
    /// names it in the Redis key prefix.
    pub async fn spawn_on(database: Database, scope: &str, opts: AppOptions) -> TestApp {
        let spec = AppSpec {
            redis: opts.redis.map(|url| RedisSpec {
                url,
                prefix: format!("testkit-{}", scope.replace(['/', '.'], "-")),
                ttl: std::time::Duration::from_millis(payguard::lock::LOCK_TTL_MS),
            }),
            keys: opts.keys,
            limits: opts.limits,
            two_phase: opts.two_phase,
            webhooks: opts.webhooks,
            ..AppSpec::new(database, opts.engine)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let running = app::build(spec)
            .await
            .expect("assemble the app")
            .spawn(listener)
            .expect("serve");
        TestApp {
            addr: running.addr,
            base: running.url.clone(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("HTTP client"),
            engine: running.engine.clone(),
            running: Some(running),
        }
    }

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
            serde_json::from_str(&text).unwrap_or(Value::String(text))
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

    /// Opens an account; asserts 201.
    pub async fn account(&self, id: &str, balance: i64) {
        let r = self
            .post("/v1/accounts", json!({"id": id, "balance": balance}))
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    /// Places an order; asserts 201.
    pub async fn order(&self, id: &str, account: &str, amount: i64) {
        let r = self
            .post(
                "/v1/orders",
                json!({"id": id, "account_id": account, "amount": amount}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    pub async fn balance(&self, account: &str) -> i64 {
        let r = self.get(&format!("/v1/accounts/{account}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["balance"].as_i64().expect("balance is a number")
    }

    /// Starts the drain the way SIGTERM does, without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(running) = &mut self.running {
            running.trigger_stop();
        }
    }

    /// Stops the server the way SIGTERM does and waits for the drain.
    pub async fn stop(mut self) {
        self.wait_stopped().await;
    }

    /// Waits for a drain that [`TestApp::trigger_shutdown`] (or [`TestApp::stop`]) began.
    pub async fn wait_stopped(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("the server stopped cleanly");
        }
    }
}

/// Runs a test body once per available backend ([`Backend::available`]), each
/// time on a fresh database with a fresh app bound to `$app` (instance
/// `test-1`, the engine's defaults); the body stops the app, and the database is
/// dropped after it. One test, written once, for SQLite and PostgreSQL.
///
/// ```ignore
/// on_each_backend!("deducts_charge_once", app => {
///     app.account("a", 100).await;
///     app.stop().await;
/// });
/// ```
#[macro_export]
macro_rules! on_each_backend {
    ($test:expr, $app:ident => $body:block) => {
        $crate::on_each_backend!($test, $crate::AppOptions::instance("test-1"), $app => $body)
    };
    ($test:expr, $opts:expr, $app:ident => $body:block) => {
        for backend in $crate::Backend::available($test) {
            let db = $crate::TestDb::create(backend).await;
            let $app = $crate::TestApp::spawn(&db, $opts).await;
            eprintln!("{} on {}", $test, backend.name());
            $body
            db.drop_db().await;
        }
    };
}
