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

use super::{
    after_commit_failpoint_applies, ClaimOutcome, Command, IdemClaim, IdemWrite, NaiveCtx, Op,
    OpResult, Output, Rejection, Store, StoreError, StoreFuture,
};
use crate::domain::{
    Account, AccountId, AuditReport, BalanceMismatch, Currency, DuplicateDebit, Entry, EntryKind,
    Money, Order, OrderId, OrderStatus, OverRefund, PaidMismatch, RefundId, Resolved,
};
use crate::failpoint::{self, Action};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Lane batches that may wait for the writer before senders are made to wait.
pub const WRITER_QUEUE_JOBS_MAX: usize = 1024;
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

/// One schema step: SQL, or code for what SQL alone cannot say.
#[derive(Clone, Copy)]
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>),
}

const MIGRATIONS: &[Migration] = &[
    Migration::Sql(include_str!("sqlite_schema.sql")),
    Migration::Sql(include_str!("sqlite_v2_idempotency.sql")),
    Migration::Sql(include_str!("sqlite_v3_fencing.sql")),
    Migration::Code(v4_checks_without_in_lists),
];
const NAIVE_MIGRATIONS: &[Migration] = &[
    Migration::Sql(include_str!("sqlite_naive_schema.sql")),
    Migration::Sql(include_str!("sqlite_v2_idempotency.sql")),
    Migration::Sql(include_str!("sqlite_v3_fencing.sql")),
];

/// The CHECK constraints' `IN (…)` lists of three or more values, and what says
/// the same without one: SQLite evaluates such a list through an ephemeral table
/// built on every execution of every INSERT or UPDATE of the table (3 per
/// `UPDATE orders`, 1 per ledger insert; about a third of a deduct's instructions,
/// measured with callgrind). The `OR` chains accept and refuse exactly the same rows.
const V4_CHECK_REWRITES: &[(&str, &str, &str)] = &[
    (
        "orders",
        "CHECK (status IN ('PREPARE', 'PAID', 'FAILED', 'PARTIALLY_REFUNDED', 'REFUNDED'))",
        "CHECK (status = 'PREPARE' OR status = 'PAID' OR status = 'FAILED' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED')",
    ),
    (
        "orders",
        "CHECK ((status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) = (debit_entry_id IS NOT NULL))",
        "CHECK ((status = 'PAID' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED') = (debit_entry_id IS NOT NULL))",
    ),
    (
        "orders",
        "CHECK (status NOT IN ('PREPARE', 'FAILED', 'PAID') OR refunded = 0)",
        "CHECK (NOT (status = 'PREPARE' OR status = 'FAILED' OR status = 'PAID') OR refunded = 0)",
    ),
    (
        "entries",
        "CHECK (kind IN ('debit', 'refund', 'reversal'))",
        "CHECK (kind = 'debit' OR kind = 'refund' OR kind = 'reversal')",
    ),
];

/// v4: the CHECKs of [`V4_CHECK_REWRITES`], rewritten in place. SQLite cannot
/// alter a CHECK; its documented way to change one without rebuilding the table
/// (ALTER TABLE, "Making Other Kinds Of Table Schema Changes") edits the table's
/// SQL in `sqlite_schema` under `writable_schema` and bumps `schema_version`. That
/// is safe here because every row already satisfies the new, equivalent CHECKs.
/// Each text must be found exactly once, and the tables must parse afterwards,
/// or the whole migration rolls back.
fn v4_checks_without_in_lists(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let schema = |e: rusqlite::Error| StoreError::Schema(format!("migration v4: {e}"));
    let version: i64 = tx
        .query_row("PRAGMA schema_version", [], |r| r.get(0))
        .map_err(schema)?;
    for table in ["orders", "entries"] {
        let mut sql: String = tx
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .map_err(schema)?;
        for (_, from, to) in V4_CHECK_REWRITES.iter().filter(|(t, _, _)| *t == table) {
            if sql.matches(from).count() != 1 {
                return Err(StoreError::Schema(format!(
                    "migration v4: {table} does not hold `{from}` exactly once; not a payguard v3 schema"
                )));
            }
            sql = sql.replacen(from, to, 1);
        }
        tx.execute_batch("PRAGMA writable_schema = ON")
            .map_err(schema)?;
        let changed = tx
            .execute(
                "UPDATE sqlite_schema SET sql = ?1 WHERE type = 'table' AND name = ?2",
                rusqlite::params![sql, table],
            )
            .map_err(schema)?;
        tx.execute_batch("PRAGMA writable_schema = OFF")
            .map_err(schema)?;
        if changed != 1 {
            return Err(StoreError::Schema(format!(
                "migration v4: {table}'s schema row changed {changed} times"
            )));
        }
    }
    tx.pragma_update(None, "schema_version", version + 1)
        .map_err(schema)?;
    // Both tables must parse and their rows pass the new CHECKs.
    let bad: i64 = tx
        .query_row(
            "SELECT (SELECT COUNT(*) FROM pragma_integrity_check('orders') WHERE integrity_check <> 'ok')
                  + (SELECT COUNT(*) FROM pragma_integrity_check('entries') WHERE integrity_check <> 'ok')",
            [],
            |r| r.get(0),
        )
        .map_err(schema)?;
    if bad != 0 {
        return Err(StoreError::Schema(format!(
            "migration v4: integrity_check found {bad} problems"
        )));
    }
    Ok(())
}

/// Which schema a database file holds, recorded in `payguard_meta.schema_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaKind {
    /// Every money rule enforced by the database: the only kind for real money.
    Guarded,
    /// The incident's database without those rules, for `--guard naive` only.
    Naive,
}

impl SchemaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaKind::Guarded => "guarded",
            SchemaKind::Naive => "naive",
        }
    }

    fn migrations(self) -> &'static [Migration] {
        match self {
            SchemaKind::Guarded => MIGRATIONS,
            SchemaKind::Naive => NAIVE_MIGRATIONS,
        }
    }
}

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

struct Job {
    ops: Vec<Command>,
    reply: oneshot::Sender<Result<Vec<OpResult>, StoreError>>,
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
    schema: SchemaKind,
    /// The incident's shared order cache, used only by the naive path.
    naive_cache: scc::HashMap<OrderId, Order>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

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

/// Creates or upgrades the guarded schema; refuses a database marked naive.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_kind(conn, SchemaKind::Guarded)
}

/// Creates or upgrades a schema of `kind`; refuses a database of another kind.
pub fn migrate_kind(conn: &mut Connection, want: SchemaKind) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    let has_meta: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'payguard_meta')",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if has_meta {
        let kind: Option<String> = tx
            .query_row(
                "SELECT value FROM payguard_meta WHERE key = 'schema_kind'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        if kind.as_deref() != Some(want.as_str()) {
            return Err(StoreError::Schema(match want {
                SchemaKind::Guarded => format!(
                    "schema_kind is {kind:?}; only a 'guarded' database can hold real money \
                     (a naive one lacks the constraints that prevent double charges)"
                ),
                SchemaKind::Naive => format!(
                    "schema_kind is {kind:?}; --guard naive only runs on a database it created \
                     itself, never on one that holds real money"
                ),
            }));
        }
    } else if version != 0 {
        return Err(StoreError::Schema(format!(
            "user_version {version} but no payguard_meta table: not a payguard database"
        )));
    } else {
        let tables: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        if tables != 0 {
            return Err(StoreError::Schema(
                "the file already holds tables that are not payguard's".into(),
            ));
        }
    }
    let migrations = want.migrations();
    let known = migrations.len() as i64;
    if version > known {
        return Err(StoreError::Schema(format!(
            "database schema v{version} is newer than this payguard (v{known})"
        )));
    }
    for (i, step) in migrations.iter().enumerate().skip(version as usize) {
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql).map_err(unavailable)?,
            Migration::Code(run) => run(&tx)?,
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
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

        let manager = SqliteConnectionManager::file(&cfg.path).with_init(|c| {
            c.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
            c.execute_batch("PRAGMA query_only = ON;")?;
            c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
            Ok(())
        });
        let reads = r2d2::Pool::builder()
            .thread_pool(pool_service_threads())
            .max_size(READ_POOL_CONNECTIONS_MAX)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_millis(READ_POOL_WAIT_MS))
            .build(manager)
            .map_err(unavailable)?;
        let write_manager = SqliteConnectionManager::file(&cfg.path).with_init(|c| {
            c.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
            c.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
            c.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
            Ok(())
        });
        let writes = r2d2::Pool::builder()
            .thread_pool(pool_service_threads())
            .max_size(WRITE_POOL_CONNECTIONS_MAX)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_millis(READ_POOL_WAIT_MS))
            .build(write_manager)
            .map_err(unavailable)?;

        let (tx, rx) = mpsc::channel(WRITER_QUEUE_JOBS_MAX);
        let batch_max = cfg.writer_batch_ops_max;
        let writer = std::thread::Builder::new()
            .name("payguard-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, batch_max))
            .map_err(unavailable)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                reads,
                writes,
                schema: cfg.schema,
                naive_cache: scc::HashMap::new(),
            }),
        })
    }

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
}

impl SqliteStore {
    fn write<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = inner.writes.get().map_err(unavailable)?;
                f(&mut conn, &inner)
            })
            .await
            .map_err(unavailable)?
        })
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>, batch_ops_max: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].ops.len();
        while n < batch_ops_max {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.ops.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let lens: Vec<usize> = jobs.iter().map(|j| j.ops.len()).collect();
        let ops: Vec<Command> = jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
        let now = chrono::Utc::now().timestamp_millis();
        let mut outcome = apply_ops(&mut conn, &ops, now);
        if outcome
            .as_ref()
            .is_ok_and(|r| after_commit_failpoint_applies(r))
            && failpoint::hit_blocking(failpoint::AFTER_COMMIT) == Some(Action::Error)
        {
            // Committed and durable, and every caller hears "unavailable": the
            // lost-acknowledgement case a retry must resolve as a replay.
            outcome = Err(StoreError::Unavailable(
                "failpoint store.after_commit: committed, reply lost".into(),
            ));
        }
        match outcome {
            Ok(results) => {
                debug_assert_eq!(results.len(), ops.len());
                let mut results = results.into_iter();
                for (job, len) in jobs.into_iter().zip(lens) {
                    let mine: Vec<OpResult> = results.by_ref().take(len).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One op in its own `BEGIN IMMEDIATE` transaction, with a savepoint around it.
fn run_one(conn: &mut Connection, op: &Command) -> Result<OpResult, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    match run_batch(conn, std::slice::from_ref(op), now, true) {
        Ok(mut results) => Ok(results.remove(0)),
        Err(Fault::Constraint(msg)) => Err(StoreError::Unavailable(msg)),
        Err(Fault::Store(e)) => Err(unavailable(e)),
    }
}

/// Why one op could not run.
enum Fault {
    /// A constraint or trigger refused the change: only this op is affected.
    Constraint(String),
    /// The database itself failed (I/O, lock timeout, corrupt row): the batch fails.
    Store(rusqlite::Error),
}

impl From<rusqlite::Error> for Fault {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::ConstraintViolation) => Fault::Constraint(e.to_string()),
            _ => Fault::Store(e),
        }
    }
}

/// Applies `ops` in one `BEGIN IMMEDIATE` transaction, one result per op.
///
/// Public so that tests can race two connections on one file with no lane or lock
/// above them, and see the constraints alone keep every order to one debit.
pub fn apply_ops(
    conn: &mut Connection,
    ops: &[Command],
    now_ms: i64,
) -> Result<Vec<OpResult>, StoreError> {
    match run_batch(conn, ops, now_ms, false) {
        Ok(results) => Ok(results),
        Err(Fault::Constraint(msg)) => {
            tracing::warn!(event = "store_constraint", detail = %msg, "replaying batch with a savepoint per op");
            match run_batch(conn, ops, now_ms, true) {
                Ok(results) => Ok(results),
                Err(Fault::Constraint(msg)) => Err(StoreError::Unavailable(msg)),
                Err(Fault::Store(e)) => Err(unavailable(e)),
            }
        }
        Err(Fault::Store(e)) => Err(unavailable(e)),
    }
}

fn run_batch(
    conn: &mut Connection,
    ops: &[Command],
    now: i64,
    careful: bool,
) -> Result<Vec<OpResult>, Fault> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Fault::Store)?;
    let mut out = Vec::with_capacity(ops.len());
    // Half-way through a batch of two or more (see `failpoint::MID_BATCH`).
    let midpoint = if ops.len() >= 2 {
        ops.len() / 2
    } else {
        usize::MAX
    };
    for (i, op) in ops.iter().enumerate() {
        if i == midpoint && failpoint::hit_blocking(failpoint::MID_BATCH) == Some(Action::Error) {
            return Err(Fault::Store(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("failpoint store.mid_batch".into()),
            )));
        }
        if !careful {
            out.push(exec_command(&tx, op, now)?);
            continue;
        }
        tx.execute_batch("SAVEPOINT op").map_err(Fault::Store)?;
        match exec_command(&tx, op, now) {
            Ok(r) => {
                tx.execute_batch("RELEASE op").map_err(Fault::Store)?;
                out.push(r);
            }
            Err(Fault::Constraint(msg)) => {
                tx.execute_batch("ROLLBACK TO op; RELEASE op")
                    .map_err(Fault::Store)?;
                tracing::error!(event = "store_refused", op = ?op, detail = %msg, "the database refused a change");
                out.push(Err(Rejection::Refused(msg)));
            }
            Err(f) => return Err(f),
        }
    }
    tx.commit().map_err(Fault::Store)?;
    Ok(out)
}

const ORDER_COLS: &str = "id, account_id, amount, status, refunded, debit_entry_id, failure_reason, created_at, updated_at";
const ENTRY_COLS: &str =
    "id, order_id, account_id, kind, amount, balance_after, refund_id, reverses, created_at";
const ACCOUNT_COLS: &str = "id, balance, currency, opening_balance, created_at, updated_at";

fn bad_column(idx: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(what),
    )
}

fn col_id<T>(
    row: &Row<'_>,
    idx: usize,
    parse: fn(&str) -> Result<T, crate::domain::IdError>,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    parse(&s).map_err(|e| bad_column(idx, e.to_string()))
}

fn money(row: &Row<'_>, idx: usize) -> rusqlite::Result<Money> {
    Ok(Money::from_stored(row.get(idx)?))
}

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    let currency: String = row.get(2)?;
    Ok(Account {
        id: col_id(row, 0, AccountId::parse)?,
        balance: money(row, 1)?,
        currency: Currency::parse(&currency).map_err(|e| bad_column(2, e.to_string()))?,
        opening_balance: money(row, 3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
    })
}

fn order_from_row(row: &Row<'_>) -> rusqlite::Result<Order> {
    let status: String = row.get(3)?;
    Ok(Order {
        id: col_id(row, 0, OrderId::parse)?,
        account_id: col_id(row, 1, AccountId::parse)?,
        amount: money(row, 2)?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| bad_column(3, format!("unknown status {status:?}")))?,
        refunded: money(row, 4)?,
        debit_entry_id: row.get(5)?,
        failure_reason: row.get(6)?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
    })
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<Entry> {
    let kind: String = row.get(3)?;
    let refund_id: Option<String> = row.get(6)?;
    Ok(Entry {
        id: row.get(0)?,
        order_id: col_id(row, 1, OrderId::parse)?,
        account_id: col_id(row, 2, AccountId::parse)?,
        kind: EntryKind::parse(&kind)
            .ok_or_else(|| bad_column(3, format!("unknown entry kind {kind:?}")))?,
        amount: money(row, 4)?,
        balance_after: money(row, 5)?,
        refund_id: refund_id
            .map(|s| RefundId::parse(&s).map_err(|e| bad_column(6, e.to_string())))
            .transpose()?,
        reverses: row.get(7)?,
        created_at: row.get(8)?,
    })
}

fn load_account(conn: &Connection, id: &str) -> rusqlite::Result<Option<Account>> {
    conn.prepare_cached(&format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ?1"
    ))?
    .query_row([id], account_from_row)
    .optional()
}

fn load_order(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    conn.prepare_cached(&format!("SELECT {ORDER_COLS} FROM orders WHERE id = ?1"))?
        .query_row([id], order_from_row)
        .optional()
}

fn load_entry(conn: &Connection, id: i64) -> rusqlite::Result<Option<Entry>> {
    conn.prepare_cached(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = ?1"))?
        .query_row([id], entry_from_row)
        .optional()
}

fn load_refund(conn: &Connection, refund_id: &str) -> rusqlite::Result<Option<Entry>> {
    conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE refund_id = ?1"
    ))?
    .query_row([refund_id], entry_from_row)
    .optional()
}

/// A row that must exist because this transaction just saw or wrote it.
fn must<T>(v: Option<T>, what: &str) -> Result<T, Fault> {
    v.ok_or_else(|| {
        Fault::Store(bad_column(
            0,
            format!("{what} vanished inside its own transaction"),
        ))
    })
}

fn exec_command(conn: &Connection, cmd: &Command, now: i64) -> Result<OpResult, Fault> {
    let result = match (cmd.fence, cmd.order_id()) {
        (Some(token), Some(order_id)) if !advance_fence(conn, order_id, token)? => {
            Err(Rejection::StaleFencingToken)
        }
        _ => exec_op(conn, &cmd.op, now)?,
    };
    if let Some(idem) = &cmd.idempotency {
        write_idem(conn, idem, &result, now)?;
    }
    Ok(result)
}

/// Advances the order's fence to `token`, or refuses a token lower than one that
/// already wrote it (false): the lock holder it belongs to lost the lock.
fn advance_fence(conn: &Connection, order_id: &OrderId, token: i64) -> Result<bool, Fault> {
    let changed = conn
        .prepare_cached("UPDATE orders SET fence = ?1 WHERE id = ?2 AND fence <= ?1")?
        .execute(params![token, order_id.as_str()])?;
    if changed == 0 && load_order(conn, order_id.as_str())?.is_some() {
        tracing::warn!(
            event = "stale_fencing_token",
            oid = order_id.as_str(),
            token
        );
        return Ok(false);
    }
    Ok(true)
}

fn exec_op(conn: &Connection, op: &Op, now: i64) -> Result<OpResult, Fault> {
    match op {
        Op::CreateAccount {
            id,
            balance,
            currency,
        } => create_account(conn, id, *balance, *currency, now),
        Op::CreateOrder {
            id,
            account_id,
            amount,
        } => create_order(conn, id, account_id, *amount, now),
        Op::Deduct { order_id } => deduct(conn, order_id, now),
        Op::Refund {
            order_id,
            refund_id,
            amount,
        } => refund(conn, order_id, refund_id, *amount, now),
    }
}

fn create_account(
    conn: &Connection,
    id: &AccountId,
    balance: Money,
    currency: Currency,
    now: i64,
) -> Result<OpResult, Fault> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?3, ?4, ?4) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            id.as_str(),
            currency.as_str(),
            balance.minor(),
            now
        ])?;
    if inserted == 1 {
        return Ok(Ok(Output::Account {
            account: Account {
                id: id.clone(),
                balance,
                currency,
                opening_balance: balance,
                created_at: now,
                updated_at: now,
            },
            created: true,
        }));
    }
    let existing = must(load_account(conn, id.as_str())?, "account")?;
    if existing.opening_balance == balance && existing.currency == currency {
        Ok(Ok(Output::Account {
            account: existing,
            created: false,
        }))
    } else {
        Ok(Err(Rejection::AccountExists))
    }
}

fn create_order(
    conn: &Connection,
    id: &OrderId,
    account_id: &AccountId,
    amount: Money,
    now: i64,
) -> Result<OpResult, Fault> {
    if let Some(existing) = load_order(conn, id.as_str())? {
        return Ok(
            if existing.account_id == *account_id && existing.amount == amount {
                Ok(Output::Order {
                    order: existing,
                    created: false,
                })
            } else {
                Err(Rejection::OrderExists)
            },
        );
    }
    let account_exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")?
        .query_row([account_id.as_str()], |r| r.get(0))?;
    if !account_exists {
        return Ok(Err(Rejection::AccountNotFound));
    }
    conn.prepare_cached(
        "INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'PREPARE', 0, ?4, ?4)",
    )?
    .execute(params![
        id.as_str(),
        account_id.as_str(),
        amount.minor(),
        now
    ])?;
    Ok(Ok(Output::Order {
        order: Order {
            id: id.clone(),
            account_id: account_id.clone(),
            amount,
            status: OrderStatus::Prepare,
            refunded: Money::ZERO,
            debit_entry_id: None,
            failure_reason: None,
            created_at: now,
            updated_at: now,
        },
        created: true,
    }))
}

/// Completes (or drops) the Idempotency-Key reservation of an op, inside the
/// op's own transaction.
fn write_idem(
    conn: &Connection,
    idem: &IdemWrite,
    result: &OpResult,
    now: i64,
) -> Result<(), Fault> {
    match (idem.render)(result) {
        Some((status, body)) => {
            let changed = conn
                .prepare_cached(
                    "UPDATE idempotency SET state = 'done', status = ?1, body = ?2, lease_until = NULL,
                            expires_at = ?3
                     WHERE scope = ?4 AND key = ?5 AND fingerprint = ?6 AND state = 'in_flight'",
                )?
                .execute(params![
                    status,
                    body,
                    now.saturating_add(idem.ttl_ms),
                    idem.scope,
                    idem.key,
                    idem.fingerprint
                ])?;
            if changed != 1 {
                // Our lease lapsed and another request took the key over; the op
                // itself is exactly once regardless, and that request stores its own.
                tracing::warn!(event = "idempotency_lease_lost", key = %idem.key);
            }
        }
        None => {
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE scope = ?1 AND key = ?2 AND state = 'in_flight'",
            )?
            .execute(params![idem.scope, idem.key])?;
        }
    }
    Ok(())
}

/// A stored Idempotency-Key row, as `idem_claim_on` reads it.
struct IdemRow {
    fingerprint: String,
    state: String,
    lease_until: Option<i64>,
    status: Option<u16>,
    body: Option<Vec<u8>>,
    expires_at: i64,
}

fn idem_claim_on(conn: &mut Connection, c: &IdemClaim) -> rusqlite::Result<ClaimOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .prepare_cached(
            "SELECT fingerprint, state, lease_until, status, body, expires_at
             FROM idempotency WHERE scope = ?1 AND key = ?2",
        )?
        .query_row(params![c.scope, c.key], |r| {
            Ok(IdemRow {
                fingerprint: r.get(0)?,
                state: r.get(1)?,
                lease_until: r.get(2)?,
                status: r.get(3)?,
                body: r.get(4)?,
                expires_at: r.get(5)?,
            })
        })
        .optional()?;
    let outcome = match existing {
        Some(row) if row.expires_at >= c.now_ms => {
            let same_request = row.fingerprint == c.fingerprint;
            let lease = row.lease_until;
            match (row.state.as_str(), row.status, row.body) {
                ("done", Some(status), Some(body)) => Some(ClaimOutcome::Done {
                    same_request,
                    status,
                    body,
                }),
                _ if lease.is_some_and(|l| l >= c.now_ms) => {
                    Some(ClaimOutcome::InFlight { same_request })
                }
                // An in-flight claim whose lease lapsed: its instance died.
                _ => None,
            }
        }
        _ => None,
    };
    if let Some(outcome) = outcome {
        return Ok(outcome);
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO idempotency
             (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at)
         VALUES (?1, ?2, ?3, 'in_flight', ?4, NULL, NULL, ?5, ?6)",
    )?
    .execute(params![
        c.scope,
        c.key,
        c.fingerprint,
        c.now_ms.saturating_add(c.lease_ms),
        c.now_ms,
        c.now_ms.saturating_add(c.ttl_ms)
    ])?;
    tx.commit()?;
    Ok(ClaimOutcome::Claimed)
}

/// The conditional update that makes a state change happen once: it names the
/// state it expects, and any other row count means the world was not as read.
fn expect_one(changed: usize, what: &str) -> Result<(), Fault> {
    if changed == 1 {
        Ok(())
    } else {
        Err(Fault::Constraint(format!(
            "{what}: expected to change 1 row, changed {changed}"
        )))
    }
}

/// Charges an order once. The fast path reads the PREPARE order with its account's
/// balance (one join), then makes the same three writes as the raw-SQL baseline:
/// the ledger insert, the balance (a compare-and-set on the balance read) and the
/// status (`WHERE status = 'PREPARE'`), each checked to change exactly one row.
/// None of them uses `RETURNING`: SQLite builds an ephemeral table for every
/// execution of a statement with `RETURNING` (measured with callgrind: about a
/// fifth of this path's instructions), and the entry id is `last_insert_rowid()`.
/// When no PREPARE order matches, or its account cannot pay, the slow path reads
/// the order to say why: unknown, already paid (a replay), FAILED, or not enough
/// money (then it becomes FAILED).
fn deduct(conn: &Connection, order_id: &OrderId, now: i64) -> Result<OpResult, Fault> {
    let prepared: Option<(String, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT o.account_id, o.amount, o.created_at, a.balance
             FROM orders o JOIN accounts a ON a.id = o.account_id
             WHERE o.id = ?1 AND o.status = 'PREPARE'",
        )?
        .query_row(params![order_id.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((account_id, amount, created_at, balance)) = prepared else {
        return deduct_refused(conn, order_id, now);
    };
    let Some(balance_after) = balance.checked_sub(amount).filter(|b| *b >= 0) else {
        return deduct_refused(conn, order_id, now);
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES (?1, ?2, 'debit', ?3, ?4, ?5)",
        )?
        .execute(params![
            order_id.as_str(),
            account_id,
            amount,
            balance_after,
            now
        ])?;
    expect_one(inserted, "debit entry")?;
    let entry_id = conn.last_insert_rowid();
    // Pair assertion: the balance written is the one the entry recorded, from the
    // balance that was read.
    let changed = conn
        .prepare_cached(
            "UPDATE accounts SET balance = ?1, updated_at = ?2 WHERE id = ?3 AND balance = ?4",
        )?
        .execute(params![balance_after, now, account_id, balance])?;
    expect_one(changed, "balance after debit")?;
    let changed = conn
        .prepare_cached(
            "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, updated_at = ?2
             WHERE id = ?3 AND status = 'PREPARE'",
        )?
        .execute(params![entry_id, now, order_id.as_str()])?;
    expect_one(changed, "PREPARE -> PAID")?;
    let account_id =
        AccountId::parse(&account_id).map_err(|e| Fault::Store(bad_column(1, e.to_string())))?;
    let amount = Money::from_stored(amount);
    let entry = Entry {
        id: entry_id,
        order_id: order_id.clone(),
        account_id: account_id.clone(),
        kind: EntryKind::Debit,
        amount,
        balance_after: Money::from_stored(balance_after),
        refund_id: None,
        reverses: None,
        created_at: now,
    };
    let order = Order {
        id: order_id.clone(),
        account_id,
        amount,
        status: OrderStatus::Paid,
        refunded: Money::ZERO,
        debit_entry_id: Some(entry_id),
        failure_reason: None,
        created_at,
        updated_at: now,
    };
    Ok(Ok(Output::Movement {
        order,
        entry,
        replayed: false,
    }))
}

/// Why no PREPARE order could be charged.
fn deduct_refused(conn: &Connection, order_id: &OrderId, now: i64) -> Result<OpResult, Fault> {
    let Some(order) = load_order(conn, order_id.as_str())? else {
        return Ok(Err(Rejection::OrderNotFound));
    };
    match order.status {
        OrderStatus::Failed => Ok(Err(Rejection::InsufficientFunds)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            let entry_id = must(order.debit_entry_id, "debit link of a paid order")?;
            let entry = must(load_entry(conn, entry_id)?, "debit entry")?;
            Ok(Ok(Output::Movement {
                order,
                entry,
                replayed: true,
            }))
        }
        OrderStatus::Prepare => {
            // PREPARE and still not matched: the account cannot pay.
            let changed = conn
                .prepare_cached(
                    "UPDATE orders SET status = 'FAILED', failure_reason = 'insufficient_funds', updated_at = ?1
                     WHERE id = ?2 AND status = 'PREPARE'",
                )?
                .execute(params![now, order_id.as_str()])?;
            expect_one(changed, "PREPARE -> FAILED")?;
            Ok(Err(Rejection::InsufficientFunds))
        }
    }
}

fn refund(
    conn: &Connection,
    order_id: &OrderId,
    refund_id: &RefundId,
    amount: Money,
    now: i64,
) -> Result<OpResult, Fault> {
    let Some(order) = load_order(conn, order_id.as_str())? else {
        return Ok(Err(Rejection::OrderNotFound));
    };
    if let Some(existing) = load_refund(conn, refund_id.as_str())? {
        return Ok(
            if existing.order_id == *order_id && existing.amount == amount {
                Ok(Output::Movement {
                    order,
                    entry: existing,
                    replayed: true,
                })
            } else {
                Err(Rejection::RefundExists)
            },
        );
    }
    match order.status {
        OrderStatus::Prepare | OrderStatus::Failed => return Ok(Err(Rejection::OrderNotPaid)),
        OrderStatus::Refunded => return Ok(Err(Rejection::RefundExceedsPaid)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded => {}
    }
    let refunded = match order.refunded.checked_add(amount) {
        Some(r) if r <= order.amount => r,
        _ => return Ok(Err(Rejection::RefundExceedsPaid)),
    };
    let status = if refunded == order.amount {
        OrderStatus::Refunded
    } else {
        OrderStatus::PartiallyRefunded
    };
    let balance_after: i64 = conn
        .prepare_cached(
            "UPDATE accounts SET balance = balance + ?1, updated_at = ?2 WHERE id = ?3 RETURNING balance",
        )?
        .query_row(
            params![amount.minor(), now, order.account_id.as_str()],
            |r| r.get(0),
        )?;
    let entry_id: i64 = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at)
             VALUES (?1, ?2, 'refund', ?3, ?4, ?5, ?6) RETURNING id",
        )?
        .query_row(
            params![
                order_id.as_str(),
                order.account_id.as_str(),
                amount.minor(),
                balance_after,
                refund_id.as_str(),
                now
            ],
            |r| r.get(0),
        )?;
    let changed = conn
        .prepare_cached(
            "UPDATE orders SET refunded = ?1, status = ?2, updated_at = ?3
             WHERE id = ?4 AND refunded = ?5 AND status IN ('PAID', 'PARTIALLY_REFUNDED')",
        )?
        .execute(params![
            refunded.minor(),
            status.as_str(),
            now,
            order_id.as_str(),
            order.refunded.minor()
        ])?;
    expect_one(changed, "refund status change")?;
    let entry = Entry {
        id: entry_id,
        order_id: order.id.clone(),
        account_id: order.account_id.clone(),
        kind: EntryKind::Refund,
        amount,
        balance_after: Money::from_stored(balance_after),
        refund_id: Some(refund_id.clone()),
        reverses: None,
        created_at: now,
    };
    let order = Order {
        status,
        refunded,
        updated_at: now,
        ..order
    };
    Ok(Ok(Output::Movement {
        order,
        entry,
        replayed: false,
    }))
}

/// The invariant checks of API.md's `GET /v1/audit`, in one read transaction so
/// every figure comes from the same snapshot. Written against the columns every
/// payguard schema has (guarded or naive), so it can judge either.
pub fn audit_connection(conn: &mut Connection) -> rusqlite::Result<AuditReport> {
    let tx = conn.transaction()?;
    let mut report = AuditReport {
        accounts_checked: tx.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?,
        orders_checked: tx.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?,
        entries_checked: tx.query_row("SELECT COUNT(*) FROM entries", [], |r| r.get(0))?,
        ..AuditReport::default()
    };
    {
        let mut stmt = tx.prepare(
            "SELECT d.order_id, d.debits,
                    (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
             FROM (SELECT order_id, COUNT(*) AS debits FROM entries WHERE kind = 'debit'
                   GROUP BY order_id HAVING COUNT(*) > 1) d
             ORDER BY d.order_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (order_id, debits, reversed) = row?;
            if debits - reversed > 1 {
                report.duplicate_debits.push(DuplicateDebit {
                    order_id,
                    count: debits - reversed,
                });
            } else {
                report.resolved.push(Resolved { order_id, reversed });
            }
        }
    }
    {
        let mut stmt = tx.prepare(
            "SELECT o.id, o.amount, MAX(o.refunded, COALESCE(SUM(e.amount), 0)) AS refunded
             FROM orders o LEFT JOIN entries e ON e.order_id = o.id AND e.kind = 'refund'
             GROUP BY o.id HAVING MAX(o.refunded, COALESCE(SUM(e.amount), 0)) > o.amount
             ORDER BY o.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(OverRefund {
                order_id: r.get(0)?,
                amount: r.get(1)?,
                refunded: r.get(2)?,
            })
        })?;
        for row in rows {
            report.over_refunded.push(row?);
        }
    }
    {
        let mut stmt = tx.prepare(
            "SELECT a.id,
                    a.opening_balance
                      - COALESCE(SUM(CASE WHEN e.kind = 'debit' THEN e.amount END), 0)
                      + COALESCE(SUM(CASE WHEN e.kind IN ('refund', 'reversal') THEN e.amount END), 0)
                      AS expected,
                    a.balance
             FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
             GROUP BY a.id HAVING expected <> a.balance OR a.balance < 0
             ORDER BY a.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BalanceMismatch {
                account_id: r.get(0)?,
                expected: r.get(1)?,
                actual: r.get(2)?,
            })
        })?;
        for row in rows {
            report.balance_mismatches.push(row?);
        }
    }
    {
        let mut stmt = tx.prepare(
            "SELECT o.id, o.status,
                    (SELECT COUNT(*) FROM entries e WHERE e.order_id = o.id AND e.kind = 'debit') AS debits
             FROM orders o
             WHERE (o.status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) <> (debits > 0)
             ORDER BY o.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PaidMismatch {
                order_id: r.get(0)?,
                status: r.get(1)?,
                debits: r.get(2)?,
            })
        })?;
        for row in rows {
            let m = row?;
            if m.debits == 0 {
                report.paid_without_entry.push(m);
            } else {
                report.entry_without_paid.push(m);
            }
        }
    }
    tx.commit()?;
    Ok(report.finish())
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn apply(&self, ops: Vec<Command>) -> StoreFuture<Vec<OpResult>> {
        let sender = self.inner.jobs.lock().map(|g| g.clone()).unwrap_or(None);
        Box::pin(async move {
            let sender = sender.ok_or(StoreError::Closed)?;
            let (reply, rx) = oneshot::channel();
            sender
                .send(Job { ops, reply })
                .await
                .map_err(|_| StoreError::Closed)?;
            // The writer answers every job it takes; a dropped reply means it died.
            rx.await
                .map_err(|_| unavailable("the SQLite writer stopped"))?
        })
    }

    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        self.read(move |c| load_account(c, id.as_str()))
    }

    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>> {
        self.read(move |c| load_order(c, id.as_str()))
    }

    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        self.read(move |c| {
            let tx = c.transaction()?;
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM orders WHERE id = ?1)")?
                .query_row([order_id.as_str()], |r| r.get(0))?;
            if !exists {
                return Ok(None);
            }
            let entries = tx
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLS} FROM entries WHERE order_id = ?1 ORDER BY id"
                ))?
                .query_map([order_id.as_str()], entry_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(entries))
        })
    }

    fn audit(&self) -> StoreFuture<AuditReport> {
        self.read(audit_connection)
    }

    fn apply_isolated(&self, op: Command) -> StoreFuture<OpResult> {
        self.write(move |conn, inner| {
            if inner.schema != SchemaKind::Guarded {
                return Err(StoreError::Schema(
                    "a naive database only runs --guard naive".into(),
                ));
            }
            run_one(conn, &op)
        })
    }

    fn apply_naive(&self, op: Command, ctx: NaiveCtx) -> StoreFuture<OpResult> {
        self.write(move |conn, inner| {
            if inner.schema != SchemaKind::Naive {
                return Err(StoreError::Schema(
                    "--guard naive refuses a guarded database: it would corrupt real money".into(),
                ));
            }
            // The deduct, if it is one (maybe under an Idempotency-Key; the naive
            // path takes no lock, so it has no fencing token to honour).
            let deduct = match &op.op {
                Op::Deduct { order_id } => Some(order_id),
                _ => None,
            };
            if let Some(order_id) = deduct {
                let r =
                    naive_deduct(conn, &inner.naive_cache, order_id, &ctx).map_err(unavailable)?;
                if let Some(idem) = &op.idempotency {
                    let now = chrono::Utc::now().timestamp_millis();
                    write_idem(conn, idem, &r, now).map_err(|f| match f {
                        Fault::Store(e) => unavailable(e),
                        Fault::Constraint(m) => StoreError::Unavailable(m),
                    })?;
                }
                return Ok(r);
            }
            // The incident is the deduction. Creates and refunds take the ordinary
            // transactional path (which checks state inside BEGIN IMMEDIATE even
            // without the schema's constraints), so what an audit of a naive
            // database finds is the incident's damage alone, and `payguard audit
            // --apply` can repair all of it.
            run_one(conn, &op)
        })
    }

    fn idem_claim(&self, claim: IdemClaim) -> StoreFuture<ClaimOutcome> {
        self.write(move |conn, _| idem_claim_on(conn, &claim).map_err(unavailable))
    }

    fn idem_release(&self, scope: String, key: String) -> StoreFuture<()> {
        self.write(move |conn, _| {
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE scope = ?1 AND key = ?2 AND state = 'in_flight'",
            )
            .and_then(|mut s| s.execute(params![scope, key]))
            .map(|_| ())
            .map_err(unavailable)
        })
    }

    fn idem_prune(&self, now_ms: i64) -> StoreFuture<u64> {
        self.write(move |conn, _| {
            conn.execute("DELETE FROM idempotency WHERE expires_at < ?1", [now_ms])
                .map(|n| n as u64)
                .map_err(unavailable)
        })
    }

    fn next_fence_epoch(&self) -> StoreFuture<i64> {
        self.write(move |conn, _| {
            let now = chrono::Utc::now().timestamp_millis();
            conn.query_row(
                "INSERT INTO fence_epochs (created_at) VALUES (?1) RETURNING id",
                [now],
                |r| r.get(0),
            )
            .map_err(unavailable)
        })
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

/// The incident's `orderCache[orderID] = order`: load, cache, log.
fn naive_load(
    conn: &Connection,
    cache: &scc::HashMap<OrderId, Order>,
    order_id: &OrderId,
    ctx: &NaiveCtx,
) -> rusqlite::Result<Option<Order>> {
    let Some(order) = load_order(conn, order_id.as_str())? else {
        return Ok(None);
    };
    cache.upsert_sync(order.id.clone(), order.clone());
    tracing::info!(
        event = "order_cache_set",
        oid = order_id.as_str(),
        status = order.status.as_str(),
        req = ctx.req.as_str(),
        inst = &*ctx.inst
    );
    // The check reads the cache, not the database: the incident's mistake.
    Ok(cache.read_sync(order_id, |_, o| o.clone()).or(Some(order)))
}

fn naive_deduct(
    conn: &Connection,
    cache: &scc::HashMap<OrderId, Order>,
    order_id: &OrderId,
    ctx: &NaiveCtx,
) -> rusqlite::Result<OpResult> {
    let Some(order) = naive_load(conn, cache, order_id, ctx)? else {
        return Ok(Err(Rejection::OrderNotFound));
    };
    match order.status {
        OrderStatus::Prepare => {}
        OrderStatus::Failed => return Ok(Err(Rejection::InsufficientFunds)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            let entry = order
                .debit_entry_id
                .map(|id| load_entry(conn, id))
                .transpose()?
                .flatten();
            return Ok(match entry {
                Some(entry) => Ok(Output::Movement {
                    order,
                    entry,
                    replayed: true,
                }),
                None => Err(Rejection::Refused("paid order without its debit".into())),
            });
        }
    }
    // The slow calls between check and act.
    std::thread::sleep(ctx.gap);
    let now = chrono::Utc::now().timestamp_millis();
    let balance: i64 = conn
        .prepare_cached("SELECT balance FROM accounts WHERE id = ?1")?
        .query_row([order.account_id.as_str()], |r| r.get(0))?;
    if balance < order.amount.minor() {
        // Rejecting is not what the incident got wrong: this one write is
        // conditional, so a duplicate that was paid meanwhile is not marked FAILED.
        conn.prepare_cached(
            "UPDATE orders SET status = 'FAILED', failure_reason = 'insufficient_funds', updated_at = ?1
             WHERE id = ?2 AND status = 'PREPARE'",
        )?
        .execute(params![now, order_id.as_str()])?;
        cache.remove_sync(order_id);
        return Ok(Err(Rejection::InsufficientFunds));
    }
    // Each step its own statement, none conditional on the state it assumes.
    let balance_after: i64 = conn
        .prepare_cached(
            "UPDATE accounts SET balance = balance - ?1, updated_at = ?2 WHERE id = ?3 RETURNING balance",
        )?
        .query_row(
            params![order.amount.minor(), now, order.account_id.as_str()],
            |r| r.get(0),
        )?;
    let entry_id: i64 = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES (?1, ?2, 'debit', ?3, ?4, ?5) RETURNING id",
        )?
        .query_row(
            params![
                order_id.as_str(),
                order.account_id.as_str(),
                order.amount.minor(),
                balance_after,
                now
            ],
            |r| r.get(0),
        )?;
    conn.prepare_cached(
        "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, updated_at = ?2 WHERE id = ?3",
    )?
    .execute(params![entry_id, now, order_id.as_str()])?;
    let debits: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM entries WHERE order_id = ?1 AND kind = 'debit'")?
        .query_row([order_id.as_str()], |r| r.get(0))?;
    if debits > 1 {
        tracing::error!(
            event = "duplicate_deduct",
            oid = order_id.as_str(),
            amount = order.amount.minor(),
            entries = debits,
            req = ctx.req.as_str(),
            inst = &*ctx.inst
        );
    }
    let order = Order {
        status: OrderStatus::Paid,
        debit_entry_id: Some(entry_id),
        updated_at: now,
        ..order
    };
    cache.upsert_sync(order.id.clone(), order.clone());
    Ok(Ok(Output::Movement {
        entry: Entry {
            id: entry_id,
            order_id: order.id.clone(),
            account_id: order.account_id.clone(),
            kind: EntryKind::Debit,
            amount: order.amount,
            balance_after: Money::from_stored(balance_after),
            refund_id: None,
            reverses: None,
            created_at: now,
        },
        order,
        replayed: false,
    }))
}
