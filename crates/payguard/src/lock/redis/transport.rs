//! How the lock client reaches Redis: one call, "evaluate this lock script
//! with these `KEYS` and `ARGV`", answered with Redis's reply or an error.
//!
//! Why a trait: the client's steps ([`super::RedisLocks`]: an owner per
//! acquire, the counter check, the epoch raise on the incarnation the grant
//! saw, the give-backs) are written once, over this call. Production sends it
//! to a Redis server ([`RedisConnection`]: `EVALSHA`, loading the script on
//! `NOSCRIPT`, through a `ConnectionManager` with the command timeout); the
//! deterministic simulation (`crates/payguard-sim`) sends the script's text,
//! keys and args over its simulated network to a Redis model that runs the
//! same Lua. Whatever implements it guarantees one thing: an error means the
//! script may or may not have run (the client then gives back what it may
//! have been granted).

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// One round trip to Redis per call.
pub trait LockTransport: Send + Sync + 'static {
    /// Evaluates `script` (one of [`super::scripts`]' texts, or a mutant's)
    /// with `keys` and `args`: Redis's reply, or why none came.
    fn eval<'a>(
        &'a self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'a, Result<redis::Value, String>>;
}

/// Production's transport: a Redis server behind a `ConnectionManager`
/// (reconnects; each command times out), each script sent by its SHA.
pub struct RedisConnection {
    conn: ConnectionManager,
    /// The client's scripts with their SHA computed once.
    scripts: Vec<(&'static str, redis::Script)>,
}

impl RedisConnection {
    /// Connects to `client`'s server; each command (and the connection) may
    /// take `command_timeout` before it counts as failed, retried once.
    pub async fn connect(
        client: redis::Client,
        command_timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisConnection {
            conn,
            scripts: super::scripts::LOCK_SCRIPTS
                .iter()
                .map(|text| (*text, redis::Script::new(text)))
                .collect(),
        })
    }

    fn script(&self, text: &'static str) -> redis::Script {
        self.scripts
            .iter()
            .find(|(t, _)| *t == text)
            .map_or_else(|| redis::Script::new(text), |(_, s)| s.clone())
    }
}

impl LockTransport for RedisConnection {
    fn eval<'a>(
        &'a self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'a, Result<redis::Value, String>> {
        Box::pin(async move {
            let script = self.script(script);
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            let mut conn = self.conn.clone();
            invocation
                .invoke_async::<redis::Value>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
