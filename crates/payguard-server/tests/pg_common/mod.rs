//! Real servers on port 0 over PostgreSQL (each its own pool, like `payguard
//! serve --db postgres://…`), assembled by the composition root through
//! `payguard-testkit`, for the multi-instance PostgreSQL test files.
#![allow(dead_code)]

use payguard::engine::{EngineConfig, Guard};
use payguard::store::postgres::ScratchDb;
use payguard_testkit::{pg_database, AppOptions, TestApp};
use serde_json::Value;

/// A scratch database for `test`, or `None` with a printed reason.
pub async fn scratch(test: &str) -> Option<ScratchDb> {
    payguard_testkit::pg_scratch(test).await
}

/// One instance: a [`TestApp`] answering `(status, body)` pairs.
pub struct Instance(TestApp);

impl std::ops::Deref for Instance {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.0
    }
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
    let opts = AppOptions {
        engine: EngineConfig {
            guard,
            instance_id: name.into(),
            ..EngineConfig::default()
        },
        redis: redis.map(str::to_owned),
        keys,
        limits,
        two_phase: payguard_server::TwoPhase::default(),
        webhooks: payguard_server::outbox::WebhookSettings::default(),
    };
    Instance(TestApp::spawn_on(pg_database(db), &db.name, opts).await)
}

impl Instance {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = self.send(req).await;
        (r.status, r.body)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn stop(self) {
        self.0.stop().await;
    }
}
