//! Throwaway databases for tests and benchmarks (`test-support` feature).
//!
//! Test scaffolding, not the store: it is compiled only for payguard's own tests
//! and for crates that enable `test-support` (payguard-cli's `bench scale` and
//! `bench engine --db postgres://…` create one per run).

use super::connection::connect_raw;
use super::error::pg_unavailable;
use crate::store::StoreError;

/// A throwaway database for tests and benchmarks: `CREATE DATABASE <prefix>_<random>`
/// on the server of `base_url`, dropped by [`ScratchDb::drop_db`] (or, if the
/// holder panicked first, by `Drop` on a helper thread).
pub struct ScratchDb {
    base: tokio_postgres::Config,
    pub name: String,
    /// The scratch database's connection settings.
    pub config: tokio_postgres::Config,
    dropped: bool,
}

impl ScratchDb {
    pub async fn create(base_url: &str, prefix: &str) -> Result<Self, StoreError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base: tokio_postgres::Config = base_url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}_{}_{nanos:x}_{seq}", std::process::id());
        let client = connect_raw(&base).await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(pg_unavailable)?;
        let mut config = base.clone();
        config.dbname(&name);
        Ok(ScratchDb {
            base,
            name,
            config,
            dropped: false,
        })
    }

    /// A plain connection to the scratch database (for hand-written SQL).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, StoreError> {
        connect_raw(&self.config).await
    }

    pub async fn drop_db(mut self) -> Result<(), StoreError> {
        self.dropped = true;
        drop_database(&self.base, &self.name).await
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (base, name) = (self.base.clone(), self.name.clone());
        // Drop runs inside an async test that is unwinding: use a fresh runtime
        // on its own thread rather than block the caller's.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(drop_database(&base, &name));
            }
        })
        .join();
    }
}

pub(super) async fn drop_database(
    base: &tokio_postgres::Config,
    name: &str,
) -> Result<(), StoreError> {
    let client = connect_raw(base).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(pg_unavailable)
}
