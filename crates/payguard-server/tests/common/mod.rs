//! A real server on port 0 with its own temporary SQLite database, assembled by
//! the composition root as `payguard serve` is (through `payguard-testkit`), for
//! the test files that read or edit the SQLite file directly.
#![allow(dead_code)]

use payguard::EngineConfig;
#[allow(unused_imports)]
pub use payguard_testkit::Resp;
use payguard_testkit::{AppOptions, TestDb};
use std::path::PathBuf;

/// A test app on SQLite, with its file at hand.
pub struct TestApp {
    app: payguard_testkit::TestApp,
    db: TestDb,
    pub db_path: PathBuf,
}

impl std::ops::Deref for TestApp {
    type Target = payguard_testkit::TestApp;
    fn deref(&self) -> &Self::Target {
        &self.app
    }
}

impl std::ops::DerefMut for TestApp {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.app
    }
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
    cfg.instance_id = "test-1".into();
    let db = TestDb::Sqlite {
        dir,
        path: db_path.clone(),
    };
    let app = payguard_testkit::TestApp::spawn(
        &db,
        AppOptions {
            engine: cfg,
            keys,
            limits,
            ..AppOptions::instance("test-1")
        },
    )
    .await;
    TestApp { app, db, db_path }
}

impl TestApp {
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
    pub async fn stop(self) {
        self.app.stop().await;
    }

    /// Stops the server but keeps its database directory for another instance.
    pub async fn stop_keep_dir(self) -> (tempfile::TempDir, PathBuf) {
        self.app.stop().await;
        match self.db {
            TestDb::Sqlite { dir, path } => (dir, path),
            TestDb::Postgres(_) => unreachable!("common apps run on SQLite"),
        }
    }
}
