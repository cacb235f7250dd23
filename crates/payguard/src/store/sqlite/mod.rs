//! The SQLite store: the embedded default, durable on one machine.
//!
//! SQLite has exactly one writer at a time, so instead of letting lane
//! transactions fight over its lock, one writer thread owns the only write
//! connection. Lanes send it their batches over a bounded queue; the writer drains
//! whatever has queued up (up to [`SqliteConfig::writer_batch_ops_max`] ops) and
//! commits it as one transaction: group commit, one fsync for many requests.
//!
//! Durability: WAL with `synchronous=FULL`, so a commit that was answered survives
//! power loss. Reads use a small pool of read-only connections, which WAL lets run
//! beside the writer.
//!
//! Each op first runs without a savepoint (the fast path). If any op trips a
//! constraint (only possible when something above the database is wrong), the
//! transaction is rolled back and the batch replayed with one savepoint per op, so
//! the refused op is undone alone and the rest of the batch still commits.
//!
//! What each command does is decided by the money rules ([`crate::store::rules`],
//! the same as PostgreSQL's); this store reads what they need and writes what
//! they decided.
//!
//! Files: [`connection`] (pragmas, pools), [`schema`] (migrations), [`writer`]
//! (the writer thread, one batch, savepoint replay), [`commands`] (one command:
//! read, decide, write), [`rows`], [`idempotency`], [`audit`], [`error`], and
//! [`naive`], the incident's code path for `--guard naive`, which only a naive
//! file accepts.

mod audit;
mod commands;
mod connection;
mod error;
mod events;
mod idempotency;
pub mod naive;
mod rows;
mod schema;
mod writer;

pub use audit::audit_connection;
pub use connection::{
    open_connection, BUSY_TIMEOUT_MS, READ_POOL_CONNECTIONS_MAX, READ_POOL_WAIT_MS,
    WRITE_POOL_CONNECTIONS_MAX,
};
pub use events::insert_reversal_event;
pub use schema::{migrate, migrate_kind, SchemaKind};
pub use writer::{apply_ops, WRITER_QUEUE_JOBS_MAX};

use crate::domain::{Account, AccountId, AuditReport, Entry, Event, Order, OrderId};
use crate::store::outbox::{
    AttemptResult, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint, RetryOutcome,
};
use crate::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, OpResult, Store, StoreError, StoreFuture,
};
use error::unavailable;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use writer::Job;

#[derive(Clone, Debug)]
pub struct SqliteConfig {
    pub path: PathBuf,
    /// Most ops the writer commits in one transaction (lane batches are merged).
    pub writer_batch_ops_max: usize,
    pub schema: SchemaKind,
}

impl SqliteConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            writer_batch_ops_max: 1024,
            schema: SchemaKind::Guarded,
        }
    }
}

/// Cheap to clone; all clones share the writer and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once closed. Batches (`--guard full`) are written by the writer thread only.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    reads: r2d2::Pool<SqliteConnectionManager>,
    /// Per-request transactions (`seed`) and the naive path; SQLite's own lock
    /// serialises them against each other and the writer.
    writes: r2d2::Pool<SqliteConnectionManager>,
    /// The delivery loop's bookkeeping, without fsync (see
    /// [`connection::outbox_pool`] for why that is safe there only).
    outbox: r2d2::Pool<SqliteConnectionManager>,
    schema: SchemaKind,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, migrates it and starts the writer.
    pub fn open(cfg: SqliteConfig) -> Result<Self, StoreError> {
        assert!(
            cfg.writer_batch_ops_max > 0,
            "writer_batch_ops_max must be > 0"
        );
        let mut conn = open_connection(&cfg.path).map_err(unavailable)?;
        migrate_kind(&mut conn, cfg.schema)?;

        let reads = connection::read_pool(&cfg.path)?;
        let writes = connection::write_pool(&cfg.path)?;
        let outbox = connection::outbox_pool(&cfg.path)?;
        let (tx, writer) = writer::spawn(conn, cfg.writer_batch_ops_max)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                reads,
                writes,
                outbox,
                schema: cfg.schema,
            }),
        })
    }

    /// Which schema the file holds (guarded, or naive for `--guard naive`).
    pub fn schema(&self) -> SchemaKind {
        self.inner.schema
    }

    /// Runs `f` on a read-only connection, off the async threads.
    fn read<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = self.inner.reads.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get().map_err(unavailable)?;
                f(&mut conn).map_err(unavailable)
            })
            .await
            .map_err(unavailable)?
        })
    }

    /// Runs `f` on a read-write connection of the pool (not the writer's), off
    /// the async threads: per-request transactions, idempotency records, the
    /// naive path.
    pub(super) fn write<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on_pool(self.inner.writes.clone(), f)
    }

    /// Runs `f` on a connection of the delivery loop's pool (no fsync).
    fn outbox_write<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on_pool(self.inner.outbox.clone(), f)
    }

    fn on_pool<T, F>(pool: r2d2::Pool<SqliteConnectionManager>, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get().map_err(unavailable)?;
                f(&mut conn)
            })
            .await
            .map_err(unavailable)?
        })
    }
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn apply(&self, cmds: Vec<Command>) -> StoreFuture<Vec<OpResult>> {
        let sender = self.inner.jobs.lock().map(|g| g.clone()).unwrap_or(None);
        Box::pin(async move {
            let sender = sender.ok_or(StoreError::Closed)?;
            let (reply, rx) = oneshot::channel();
            sender
                .send(Job { cmds, reply })
                .await
                .map_err(|_| StoreError::Closed)?;
            // The writer answers every job it takes; a dropped reply means it died.
            rx.await
                .map_err(|_| unavailable("the SQLite writer stopped"))?
        })
    }

    fn apply_isolated(&self, cmd: Command) -> StoreFuture<OpResult> {
        if self.inner.schema != SchemaKind::Guarded {
            return Box::pin(async {
                Err(StoreError::Schema(
                    "a naive database only runs --guard naive".into(),
                ))
            });
        }
        self.write(move |conn| writer::run_one(conn, &cmd))
    }

    fn settled(&self, cmds: Vec<Command>, now: i64) -> StoreFuture<Vec<Option<OpResult>>> {
        if self.inner.schema != SchemaKind::Guarded {
            return Box::pin(async {
                Err(StoreError::Schema(
                    "a naive database only runs --guard naive".into(),
                ))
            });
        }
        self.read(move |c| commands::settled(c, &cmds, now))
    }

    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        self.read(move |c| rows::load_account(c, id.as_str()))
    }

    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>> {
        self.read(move |c| rows::load_order(c, id.as_str()))
    }

    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        self.read(move |c| rows::order_entries(c, &order_id))
    }

    fn audit(&self) -> StoreFuture<AuditReport> {
        self.read(audit_connection)
    }

    fn open_holds(&self) -> StoreFuture<u64> {
        self.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM orders WHERE status = 'AUTHORIZED'")?
                .query_row([], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        })
    }

    fn due_holds(&self, now_ms: i64, limit: usize) -> StoreFuture<Vec<OrderId>> {
        self.read(move |c| rows::due_holds(c, now_ms, limit))
    }

    fn idem_claim(&self, claim: IdemClaim) -> StoreFuture<ClaimOutcome> {
        self.write(move |conn| idempotency::claim(conn, &claim).map_err(unavailable))
    }

    fn idem_release(&self, scope: String, key: String, token: ClaimToken) -> StoreFuture<()> {
        self.write(move |conn| idempotency::release(conn, &scope, &key, token).map_err(unavailable))
    }

    fn idem_prune(&self, now_ms: i64) -> StoreFuture<u64> {
        self.write(move |conn| idempotency::prune(conn, now_ms).map_err(unavailable))
    }

    fn next_fence_epoch(&self) -> StoreFuture<i64> {
        self.write(move |conn| {
            let now = chrono::Utc::now().timestamp_millis();
            conn.query_row(
                "INSERT INTO fence_epochs (created_at) VALUES (?1) RETURNING id",
                [now],
                |r| r.get(0),
            )
            .map_err(unavailable)
        })
    }

    fn events(&self, after: i64, limit: usize) -> StoreFuture<Vec<Event>> {
        self.read(move |c| events::events(c, after, limit))
    }

    fn sequence_events(&self, _wait: bool) -> StoreFuture<u64> {
        Box::pin(async { Ok(0) })
    }

    fn last_event_seq(&self) -> StoreFuture<i64> {
        self.read(|c| c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0)))
    }

    fn webhook_create(&self, endpoint: Endpoint) -> StoreFuture<bool> {
        self.write(move |c| events::create_endpoint(c, &endpoint).map_err(unavailable))
    }

    fn webhook_endpoints(&self, id: Option<String>) -> StoreFuture<Vec<Endpoint>> {
        self.read(move |c| events::endpoints(c, id.as_deref()))
    }

    fn webhook_delete(&self, id: String, now_ms: i64) -> StoreFuture<bool> {
        self.write(move |c| events::delete_endpoint(c, &id, now_ms).map_err(unavailable))
    }

    fn webhook_fan_out(&self, now_ms: i64) -> StoreFuture<u64> {
        self.outbox_write(move |c| events::fan_out(c, now_ms).map_err(unavailable))
    }

    fn webhook_claim(&self, req: ClaimRequest) -> StoreFuture<Vec<Claimed>> {
        self.outbox_write(move |c| events::claim(c, &req).map_err(unavailable))
    }

    fn webhook_record(&self, results: Vec<AttemptResult>) -> StoreFuture<Vec<bool>> {
        self.outbox_write(move |c| events::record(c, &results).map_err(unavailable))
    }

    fn webhook_deliveries(
        &self,
        endpoint_id: String,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreFuture<Vec<Delivery>> {
        self.read(move |c| events::deliveries(c, &endpoint_id, status, None, limit))
    }

    fn webhook_retry(
        &self,
        endpoint_id: String,
        event_id: String,
        now_ms: i64,
    ) -> StoreFuture<RetryOutcome> {
        self.write(move |c| events::retry(c, &endpoint_id, &event_id, now_ms).map_err(unavailable))
    }

    fn webhook_backlog(&self) -> StoreFuture<Vec<Backlog>> {
        self.read(|c| events::backlog(c))
    }

    fn close(&self) -> StoreFuture<()> {
        // Dropping the last sender lets the writer finish the queued jobs and exit.
        let sender = self.inner.jobs.lock().map(|mut g| g.take()).unwrap_or(None);
        drop(sender);
        let writer = self
            .inner
            .writer
            .lock()
            .map(|mut g| g.take())
            .unwrap_or(None);
        Box::pin(async move {
            if let Some(handle) = writer {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .map_err(unavailable)?
                    .map_err(|_| unavailable("the SQLite writer panicked"))?;
            }
            Ok(())
        })
    }
}
