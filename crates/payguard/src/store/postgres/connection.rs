//! PostgreSQL connections: the bounded pool every call goes through, the guard
//! that keeps a closed store from handing out connections, and plain connections
//! outside the pool (migrations' tools, the audit command, scratch databases).

use super::error::{pg_unavailable, pool_unavailable, unavailable};
use super::{PgConfig, PgStats, CONNECT_TIMEOUT_MS};
use crate::store::StoreError;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;

/// What every clone of a [`PgStore`](super::PgStore) shares.
pub(super) struct Inner {
    /// Client-side deadline of one batch ([`PgConfig::batch_deadline_ms`]).
    pub(super) batch_deadline: Duration,
    pub(super) pool: Pool,
    pub(super) stats: PgStats,
    /// Every call holds a read guard while it uses the pool; `close` takes the write
    /// guard (so it waits for calls in flight), sets the flag and closes the pool.
    /// Invariant: once the flag is true, no call gets a connection.
    pub(super) closed: Arc<tokio::sync::RwLock<bool>>,
}

impl Inner {
    pub(super) fn new(pool: Pool, cfg: &PgConfig) -> Self {
        Inner {
            pool,
            batch_deadline: Duration::from_millis(cfg.batch_deadline_ms.max(1)),
            stats: PgStats::default(),
            closed: Arc::new(tokio::sync::RwLock::new(false)),
        }
    }

    /// A connection, or `Closed` once `close` began. The guard must be held for as
    /// long as the connection is used.
    pub(super) async fn enter(
        &self,
    ) -> Result<(tokio::sync::OwnedRwLockReadGuard<bool>, Object), StoreError> {
        let guard = self.closed.clone().read_owned().await;
        if *guard {
            return Err(StoreError::Closed);
        }
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        Ok((guard, client))
    }
}

/// The pool of `cfg`: bounded, with a wait limit, and every connection carrying
/// payguard's server-side limits (`statement_timeout`, and twice that for a
/// transaction left idle).
pub(super) fn pool(cfg: &PgConfig) -> Result<Pool, StoreError> {
    let mut pg = cfg.pg.clone();
    // Appended to any `options` of the URL, so ours win for these two settings.
    let limits = format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        cfg.statement_timeout_ms,
        cfg.statement_timeout_ms.saturating_mul(2)
    );
    let options = match cfg.pg.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {limits}"),
        _ => limits,
    };
    pg.options(options);
    pg.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
    pg.application_name("payguard");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(cfg.pool_connections_max)
        .wait_timeout(Some(Duration::from_millis(cfg.pool_wait_ms)))
        .create_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
        .recycle_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(unavailable)
}

/// One connection outside any pool, its driver task spawned on the current runtime.
pub async fn connect_raw(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, StoreError> {
    let (client, conn) = config.connect(NoTls).await.map_err(pg_unavailable)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(event = "pg_connection_closed", detail = %e);
        }
    });
    Ok(client)
}
