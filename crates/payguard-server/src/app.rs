//! The composition root: the one place a payguard app is assembled from its
//! parts (a store, an optional Redis lock, the engine, the HTTP state).
//!
//! Why one place: `payguard serve`, `payguard demo`, the benchmarks and every
//! test used to assemble the app themselves, and the copies drifted (tests
//! reported a guard they did not run, and left an order cache on over a shared
//! PostgreSQL that production never does). The assembly rules live here once:
//!
//! * `--guard naive` runs only on SQLite, on the naive schema, through the
//!   quarantined naive path ([`NaiveSqlite`]); every other guard runs on the
//!   guarded schema through the [`Store`] trait;
//! * the Redis lock draws its fencing epochs from the store's sequence
//!   ([`payguard::engine::fence_epochs`]) and is owned by the engine;
//! * `/healthz` reports what the engine is ([`crate::ServiceInfo::of`]), and the
//!   engine turns its order cache off on a shared PostgreSQL itself;
//! * one app per SQLite file, held by an exclusive lock on a file beside it
//!   ([`SqliteOwner`]) for as long as the app serves: the engine answers
//!   replays of paid orders from its cache, which is right only while no other
//!   app writes the same file.
//!
//! What differs between callers is data ([`AppSpec`]): where the database is,
//! the engine's configuration, the lock, keys and limits. Binding a socket and
//! choosing the shutdown signal stay with the caller ([`App::spawn`] for a
//! server in this process, as the demo and the tests run it).

use crate::{ApiKeys, AppState, Limits};
use anyhow::Context;
use payguard::engine::Guard;
use payguard::lock::redis::RedisLocks;
use payguard::store::postgres::{PgConfig, PgStore};
use payguard::store::sqlite::naive::NaiveSqlite;
use payguard::store::sqlite::{SchemaKind, SqliteConfig, SqliteStore};
use payguard::{Engine, EngineConfig, Store};
use std::sync::Arc;
use std::time::Duration;

/// Where the money lives.
#[derive(Clone, Debug)]
pub enum Database {
    /// An embedded SQLite file. Its schema follows the guard (naive or guarded).
    Sqlite(SqliteConfig),
    /// A PostgreSQL database shared by any number of instances.
    Postgres(Box<PgConfig>),
}

/// The cross-instance order lock (`--redis`).
#[derive(Clone, Debug)]
pub struct RedisSpec {
    pub url: String,
    /// Prefix of every key, so deployments (or tests) can share one Redis.
    pub prefix: String,
    pub ttl: Duration,
}

/// Everything that differs between two payguard apps. (Not `Debug`: it holds
/// the API keys' digests.)
#[derive(Clone)]
pub struct AppSpec {
    pub db: Database,
    /// The guard and the instance id are part of it.
    pub engine: EngineConfig,
    pub redis: Option<RedisSpec>,
    pub keys: ApiKeys,
    pub limits: Limits,
    pub two_phase: crate::TwoPhase,
    pub webhooks: crate::outbox::WebhookSettings,
}

impl AppSpec {
    /// No lock, no API keys, default limits.
    pub fn new(db: Database, engine: EngineConfig) -> Self {
        AppSpec {
            db,
            engine,
            redis: None,
            keys: ApiKeys::default(),
            limits: Limits::default(),
            two_phase: crate::TwoPhase::default(),
            webhooks: crate::outbox::WebhookSettings::default(),
        }
    }
}

/// An assembled app: its engine running, its HTTP state ready to serve.
pub struct App {
    pub state: AppState,
    /// On SQLite: this app's claim on its file, released when the app is dropped
    /// (after [`crate::serve`] returns, or with [`Running`]'s task).
    pub sqlite_owner: Option<SqliteOwner>,
}

/// An exclusive `flock(2)` on `<database>-payguard.lock`, held while an app
/// serves a SQLite file. A second app on the same file (another `payguard serve`,
/// or a second app in this process) fails to start with a message that says
/// which file and why, instead of serving replays from a cache the other app's
/// writes make stale. The lock is advisory and separate from SQLite's own
/// locks (SQLite uses `fcntl` locks on the database; this is `flock` on another
/// file), so tools that open the database directly (`sqlite3`, `payguard audit`)
/// are not blocked. The lock file stays on disk; the kernel releases the lock
/// when the process exits, `kill -9` included.
#[derive(Debug)]
pub struct SqliteOwner {
    _file: std::fs::File,
}

/// Where [`SqliteOwner`] keeps its lock for the database at `db`.
pub fn sqlite_lock_path(db: &std::path::Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-payguard.lock");
    name.into()
}

impl SqliteOwner {
    /// Takes the lock for the database at `db`, without waiting.
    pub fn claim(db: &std::path::Path) -> anyhow::Result<Self> {
        let path = sqlite_lock_path(db);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(SqliteOwner { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => anyhow::bail!(
                "another payguard app is serving {} (it holds {}): one app per SQLite file; \
                 stop it first, or run several instances on PostgreSQL",
                db.display(),
                path.display()
            ),
            Err(e) => {
                Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

impl App {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.state.engine
    }

    /// Serves on `listener` in this process until [`Running::stop`].
    pub fn spawn(self, listener: tokio::net::TcpListener) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let engine = self.state.engine.clone();
        let owner = self.sqlite_owner;
        let task = tokio::spawn(async move {
            let served = crate::serve(listener, self.state, async move {
                let _ = rx.await;
            })
            .await;
            // The file is free for another app only once this one has drained.
            drop(owner);
            served
        });
        Ok(Running {
            addr,
            url: format!("http://{addr}"),
            engine,
            shutdown: Some(tx),
            task,
        })
    }
}

/// A server running in this process (the demo's sides, the tests' apps).
pub struct Running {
    pub addr: std::net::SocketAddr,
    /// `http://{addr}`.
    pub url: String,
    pub engine: Arc<Engine>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Begins the drain (as SIGTERM does) without waiting for it.
    pub fn trigger_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops accepting, drains what is in flight, shuts the engine down.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger_stop();
        (&mut self.task).await?
    }
}

/// Opens the store, connects the lock, starts the engine and builds the HTTP
/// state, by the rules in the module docs.
pub async fn build(spec: AppSpec) -> anyhow::Result<App> {
    let naive = matches!(spec.engine.guard, Guard::Naive { .. });
    let mut sqlite_owner = None;
    let (store, naive_path): (Arc<dyn Store>, Option<NaiveSqlite>) = match spec.db {
        Database::Sqlite(mut cfg) => {
            cfg.schema = if naive {
                SchemaKind::Naive
            } else {
                SchemaKind::Guarded
            };
            let path = cfg.path.clone();
            sqlite_owner = Some(SqliteOwner::claim(&path)?);
            let sqlite = SqliteStore::open(cfg)
                .with_context(|| format!("opening SQLite database {}", path.display()))?;
            let naive_path = if naive {
                Some(NaiveSqlite::new(sqlite.clone())?)
            } else {
                None
            };
            (Arc::new(sqlite), naive_path)
        }
        Database::Postgres(cfg) => {
            // The naive schema exists only for SQLite: the naive mode is the
            // one-command local demo, never something to point at a shared database.
            anyhow::ensure!(!naive, "--guard naive runs on SQLite only");
            let pg = PgStore::connect(*cfg)
                .await
                .context("opening the PostgreSQL database")?;
            (Arc::new(pg), None)
        }
    };
    let redis = match &spec.redis {
        None => None,
        Some(r) => Some(Arc::new(
            RedisLocks::connect(
                &r.url,
                &r.prefix,
                &spec.engine.instance_id,
                r.ttl,
                payguard::engine::fence_epochs(store.clone()),
            )
            .await
            .with_context(|| format!("connecting to Redis at {}", r.url))?,
        )),
    };
    let engine = Arc::new(match naive_path {
        Some(naive) => Engine::start_naive(naive, spec.engine, redis),
        None => Engine::start_with_locks(store, spec.engine, redis),
    });
    let mut state = AppState::new(engine);
    state.keys = spec.keys;
    state.limits = spec.limits;
    state.two_phase = spec.two_phase;
    state.webhooks = spec.webhooks;
    Ok(App {
        state,
        sqlite_owner,
    })
}
