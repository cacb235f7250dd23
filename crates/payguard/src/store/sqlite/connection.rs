//! SQLite connections: payguard's pragmas, and the pools beside the writer.
//!
//! Every connection waits for SQLite's lock a bounded time and keeps prepared
//! statements; write connections use WAL with `synchronous=FULL`, so an answered
//! commit survives power loss, and enforce foreign keys. Read connections are
//! `query_only`. The pools share two service threads for the whole process.

use super::error::{bad_column, unavailable};
use crate::store::StoreError;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// Read-only connections for GETs and the audit.
pub const READ_POOL_CONNECTIONS_MAX: u32 = 4;
/// How long a connection waits for SQLite's lock (another process, a checkpoint).
pub const BUSY_TIMEOUT_MS: u64 = 5_000;
/// How long a GET waits for a free read connection.
pub const READ_POOL_WAIT_MS: u64 = 5_000;
/// Prepared statements kept per connection.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Threads that run r2d2's background work (connection creation and reaping) for
/// every SQLite pool of the process. r2d2 otherwise starts three per pool and keeps
/// them after the pool is dropped, so a process that opens many stores (tests,
/// benchmarks, the demo) would pile up idle threads.
const POOL_SERVICE_THREADS: usize = 2;

fn pool_service_threads() -> std::sync::Arc<scheduled_thread_pool::ScheduledThreadPool> {
    static SHARED: std::sync::OnceLock<std::sync::Arc<scheduled_thread_pool::ScheduledThreadPool>> =
        std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            std::sync::Arc::new(
                scheduled_thread_pool::ScheduledThreadPool::builder()
                    .num_threads(POOL_SERVICE_THREADS)
                    .thread_name_pattern("payguard-pool-{}")
                    .build(),
            )
        })
        .clone()
}

/// Read-write connections for per-request transactions (`seed`) and the naive path.
pub const WRITE_POOL_CONNECTIONS_MAX: u32 = 8;

/// Opens a read-write connection with payguard's pragmas. Public so that tests and
/// the benchmark can drive the same SQL as the writer without the engine.
pub fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(bad_column(
            0,
            format!("could not switch {} to WAL (got {mode})", path.display()),
        ));
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(conn)
}

/// The pool of read-only connections (GETs, the audit).
pub(super) fn read_pool(path: &Path) -> Result<r2d2::Pool<SqliteConnectionManager>, StoreError> {
    let manager = SqliteConnectionManager::file(path).with_init(|c| {
        c.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        c.execute_batch("PRAGMA query_only = ON;")?;
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(())
    });
    r2d2::Pool::builder()
        .thread_pool(pool_service_threads())
        .max_size(READ_POOL_CONNECTIONS_MAX)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_millis(READ_POOL_WAIT_MS))
        .build(manager)
        .map_err(unavailable)
}

/// The pool of read-write connections beside the writer thread (`seed`'s
/// per-request transactions, Idempotency-Key claims, the naive path).
pub(super) fn write_pool(path: &Path) -> Result<r2d2::Pool<SqliteConnectionManager>, StoreError> {
    let manager = SqliteConnectionManager::file(path).with_init(|c| {
        c.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        c.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(())
    });
    r2d2::Pool::builder()
        .thread_pool(pool_service_threads())
        .max_size(WRITE_POOL_CONNECTIONS_MAX)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(READ_POOL_WAIT_MS))
        .build(manager)
        .map_err(unavailable)
}

/// Connections of the webhook delivery loop (fan-out, leases, attempt results).
pub const OUTBOX_POOL_CONNECTIONS_MAX: u32 = 2;

/// The pool the delivery loop writes its bookkeeping through, with
/// `synchronous = NORMAL`: its commits skip the fsync (the next money commit's
/// fsync, or a checkpoint, carries them to disk). Why that is safe here and
/// nowhere else: losing the last of these commits to a power cut only makes a
/// delivery pending again (it is sent again: at least once allows that) or a
/// fan-out run again (its inserts ignore what exists). Nothing about money,
/// events, endpoints or Idempotency-Keys is written through it. Measured: with
/// every lease and result fsynced, deliveries lagged 9 s behind a 14,000
/// deducts/s run (BENCHMARKS.md, "Events and webhooks").
pub(super) fn outbox_pool(path: &Path) -> Result<r2d2::Pool<SqliteConnectionManager>, StoreError> {
    let manager = SqliteConnectionManager::file(path).with_init(|c| {
        c.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        c.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(())
    });
    r2d2::Pool::builder()
        .thread_pool(pool_service_threads())
        .max_size(OUTBOX_POOL_CONNECTIONS_MAX)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(READ_POOL_WAIT_MS))
        .build(manager)
        .map_err(unavailable)
}
