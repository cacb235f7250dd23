//! The PostgreSQL store: several payguard instances, one database.
//!
//! Why it exists: SQLite is one machine's file. With PostgreSQL, many instances can
//! serve the same orders, and the schema (`postgres_schema.sql`) still refuses a
//! second debit, a refund over the amount, a negative balance or an illegal status
//! change by itself, whatever the instances above it do.
//!
//! How a batch runs (group commit, set-based): one READ COMMITTED transaction that
//!
//! 1. locks every order the batch names (`SELECT … WHERE id = ANY($1) ORDER BY id
//!    FOR UPDATE`), then every account it touches the same way, then reads the
//!    refund and debit entries it needs to answer replays. Every transaction takes
//!    order locks before account locks, each in id order, so lanes of one
//!    instance and other instances never wait on each other in a cycle;
//! 2. decides every op in Rust, in batch order, with exactly the SQLite store's
//!    semantics (replays, rejections, insufficient funds → FAILED), on an
//!    in-memory copy of those rows, so several orders on one account are charged
//!    in batch order and an overdraft fails only the order that would cause it;
//! 3. writes all effects with a handful of set-based statements over `unnest`
//!    arrays: new accounts, new orders, all ledger entries, one balance per
//!    account (PostgreSQL updates a row once per statement, so balances are
//!    aggregated first), and the orders' status changes (one statement per
//!    "round", see [`segments`]), each conditional on the state that was read;
//! 4. writes the Idempotency-Key records of the batch's idempotent ops (the
//!    rendered response of each committed result, or the release of its claim),
//!    again set-based, so a stored response never exists without its movement;
//! 5. commits.
//!
//! Round trips per batch, whatever its size: BEGIN, 2–3 reads, then one statement
//! per kind of write present (new accounts, new orders, entries, balances, order
//! status rounds, idempotency records), COMMIT: 7 for a batch of fresh deducts.
//!
//! A rejection is an answer and never aborts the batch. If a constraint fires
//! anyway (only possible when something above the database is wrong, or another
//! instance created the same id at the same moment), the batch is re-run with one
//! savepoint per op, so only that op is [`Rejection::Refused`]. Deadlocks and
//! serialisation failures (SQLSTATE 40P01, 40001) are retried
//! [`BATCH_ATTEMPTS_MAX`] times, then the batch fails with
//! [`StoreError::Unavailable`] (HTTP 503): nothing in it moved.
//!
//! Limits: a bounded connection pool ([`POOL_CONNECTIONS_MAX`]) with a wait
//! timeout, a server-side `statement_timeout` on every connection, and a
//! client-side deadline on every batch ([`PgConfig::batch_deadline_ms`]): a
//! connection the network has swallowed (blackhole, half-open) never answers, and
//! no server-side timeout can tell the client so.
//!
//! Ambiguous commits. A batch whose COMMIT was sent but not answered (the
//! connection broke, or the deadline passed) may or may not have committed, and
//! a 503 promises that nothing moved. So the store never guesses: every batch
//! learns its transaction id (`txid_current()`, pipelined with its first read),
//! and after an unanswered COMMIT a fresh connection asks `txid_status`, ending
//! the old backend (`pg_terminate_backend`) if it is still in progress so that
//! the answer cannot change later (a late COMMIT from a healed partition cannot
//! land after the store answered). Committed or aborted, the batch then simply
//! runs again: its ops are idempotent (a committed deduct reads back as its
//! replay, with its entry). Only if the fate cannot be learned does the caller
//! get [`StoreError::Unknown`] (HTTP 500), never a 503.
//! [`PgStore::stats`] counts savepoint replays and retries.
//!
//! Migrations are a list (`MIGRATIONS`); `payguard_meta` holds `schema_kind`
//! ('guarded') and `schema_version`. A database marked otherwise, holding foreign
//! tables, or newer than this build is refused, like the SQLite store does.

use super::{
    after_commit_failpoint_applies, ClaimOutcome, Command, IdemClaim, IdemWrite, Op, OpResult,
    Output, Rejection, Store, StoreError, StoreFuture,
};
use crate::domain::{
    Account, AccountId, AuditReport, BalanceMismatch, Currency, DuplicateDebit, Entry, EntryKind,
    Money, Order, OrderId, OrderStatus, OverRefund, PaidMismatch, RefundId, Resolved,
};
use crate::failpoint::{self, Action};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls, Row};

/// Re-exported so that tests and tools can build a [`PgConfig`] and run raw SQL
/// with exactly the client version the store uses.
pub use tokio_postgres;

/// Connections the pool keeps open at most (lanes' batches, seed requests, reads).
pub const POOL_CONNECTIONS_MAX: usize = 16;
/// How long a caller waits for a free connection before the store is unavailable.
pub const POOL_WAIT_MS: u64 = 5_000;
/// How long opening one connection may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Server-side limit on every statement, lock waits included.
pub const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// Client-side deadline of one batch, default: twice the statement timeout.
pub const BATCH_DEADLINE_MS: u64 = 2 * STATEMENT_TIMEOUT_MS;
/// How long learning an unanswered COMMIT's fate may take.
pub const RESOLVE_DEADLINE_MS: u64 = 5_000;
/// Times one batch is run again after unanswered COMMITs before giving up.
pub const AMBIGUOUS_RERUNS_MAX: u32 = 3;
/// Attempts of one batch when PostgreSQL reports a deadlock or serialisation failure.
pub const BATCH_ATTEMPTS_MAX: u32 = 5;
/// Base of the (linear, jittered) pause between those attempts.
pub const RETRY_BACKOFF_MS: u64 = 2;
/// Tries of one op in the savepoint-per-op fallback before it is `Refused`: a
/// second try sees what a racing instance committed meanwhile.
const CAREFUL_TRIES_MAX: u32 = 2;
/// `pg_advisory_xact_lock` key that serialises migrations of concurrent starters.
const MIGRATION_LOCK_KEY: i64 = 0x7061_7967_7561_7264; // "payguard"

/// Schema versions in order; `payguard_meta.schema_version` counts those applied.
/// A v2 (e.g. a `fence` column for fencing tokens) is appended here, never edited in.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/schema.sql"),
    include_str!("postgres/v2_idempotency.sql"),
    include_str!("postgres/v3_fencing.sql"),
];

#[derive(Clone, Debug)]
pub struct PgConfig {
    /// Where to connect; `statement_timeout` is added to its options.
    pub pg: tokio_postgres::Config,
    pub pool_connections_max: usize,
    pub pool_wait_ms: u64,
    pub statement_timeout_ms: u64,
    /// Client-side deadline of one batch ([`BATCH_DEADLINE_MS`]).
    pub batch_deadline_ms: u64,
}

impl PgConfig {
    /// From a `postgres://` or `postgresql://` URL (or a key=value string).
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let pg = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        Ok(Self::new(pg))
    }

    pub fn new(pg: tokio_postgres::Config) -> Self {
        PgConfig {
            pg,
            pool_connections_max: POOL_CONNECTIONS_MAX,
            pool_wait_ms: POOL_WAIT_MS,
            statement_timeout_ms: STATEMENT_TIMEOUT_MS,
            batch_deadline_ms: BATCH_DEADLINE_MS,
        }
    }
}

/// Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

/// What the store had to do beyond the fast path, since start (for tests and
/// metrics: on a healthy system both stay at or near zero).
#[derive(Debug, Default)]
pub struct PgStats {
    /// Batches re-run with a savepoint per op because a constraint fired.
    pub careful_batches: AtomicU64,
    /// Batch attempts repeated after a deadlock or serialisation failure.
    pub retries: AtomicU64,
    /// COMMITs sent and not answered, whose fate was then looked up.
    pub ambiguous_commits: AtomicU64,
    /// Of those, how many had committed.
    pub ambiguous_committed: AtomicU64,
}

struct Inner {
    batch_deadline: Duration,
    pool: Pool,
    stats: PgStats,
    /// Every call holds a read guard while it uses the pool; `close` takes the write
    /// guard (so it waits for calls in flight), sets the flag and closes the pool.
    /// Invariant: once the flag is true, no call gets a connection.
    closed: Arc<tokio::sync::RwLock<bool>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A PostgreSQL error as one line: SQLSTATE and message for server errors, the
/// cause chain for the others (tokio-postgres' own `Display` says only "db error").
fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn pg_unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(pg_message(&e))
}

/// A pool failure with the driver's cause spelled out (deadpool's own message
/// for a backend error is only "error occurred while creating a new object").
fn pool_unavailable(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Unavailable(format!(
            "cannot open a PostgreSQL connection: {}",
            pg_message(&e)
        )),
        deadpool_postgres::PoolError::Timeout(t) => StoreError::Unavailable(format!(
            "no PostgreSQL connection free within the pool's {t:?} timeout"
        )),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Why one pass over a batch could not finish.
#[derive(Debug)]
enum Fault {
    /// A constraint, trigger or conditional write refused the change: only the op
    /// at fault is affected (found by the savepoint-per-op pass).
    Constraint(String),
    /// Deadlock or serialisation failure: the whole batch may simply run again.
    Retry(String),
    /// The database failed (connection, timeout, corrupt row): the batch fails.
    Store(String),
    /// COMMIT of transaction `xid` was sent and no answer came back: it may have
    /// committed. Only [`apply_pooled`] may answer it, by looking the fate up.
    Ambiguous { xid: i64, detail: String },
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Self {
        let msg = pg_message(&e);
        match e.code() {
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => Fault::Retry(msg),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Fault::Retry(msg),
            // Class 23: integrity constraint violations, and our triggers' refusals.
            Some(c) if c.code().starts_with("23") => Fault::Constraint(msg),
            _ => Fault::Store(msg),
        }
    }
}

impl Fault {
    fn into_store_error(self) -> StoreError {
        match self {
            Fault::Constraint(m) | Fault::Retry(m) | Fault::Store(m) => StoreError::Unavailable(m),
            Fault::Ambiguous { xid, detail } => StoreError::Unknown(format!(
                "COMMIT of transaction {xid} was not answered ({detail}); its fate was not looked up"
            )),
        }
    }
}

impl PgStore {
    /// Connects, creates or upgrades the guarded schema (refusing a naive or
    /// foreign database) and returns the store.
    pub async fn connect(cfg: PgConfig) -> Result<Self, StoreError> {
        assert!(
            cfg.pool_connections_max > 0,
            "pool_connections_max must be > 0"
        );
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
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_connections_max)
            .wait_timeout(Some(Duration::from_millis(cfg.pool_wait_ms)))
            .create_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
            .recycle_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let mut client = pool.get().await.map_err(pool_unavailable)?;
        migrate(&mut client).await?;
        drop(client);
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                batch_deadline: Duration::from_millis(cfg.batch_deadline_ms.max(1)),
                stats: PgStats::default(),
                closed: Arc::new(tokio::sync::RwLock::new(false)),
            }),
        })
    }

    pub fn stats(&self) -> &PgStats {
        &self.inner.stats
    }

    /// Convenience for `--db postgres://…`.
    pub async fn connect_url(url: &str) -> Result<Self, StoreError> {
        Self::connect(PgConfig::from_url(url)?).await
    }
}

impl Inner {
    /// A connection, or `Closed` once `close` began. The guard must be held for as
    /// long as the connection is used.
    async fn enter(&self) -> Result<(tokio::sync::OwnedRwLockReadGuard<bool>, Object), StoreError> {
        let guard = self.closed.clone().read_owned().await;
        if *guard {
            return Err(StoreError::Closed);
        }
        let client = self.pool.get().await.map_err(pool_unavailable)?;
        Ok((guard, client))
    }
}

/// Creates or upgrades the guarded schema; refuses a database marked naive (or
/// anything else) and a database that holds tables that are not payguard's.
///
/// Runs in one transaction under an advisory lock, so instances starting at the
/// same moment migrate once.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg_unavailable)?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('payguard_meta') IS NOT NULL", &[])
        .await
        .map_err(pg_unavailable)?
        .get(0);
    let version: usize = if has_meta {
        let rows = tx
            .query(
                "SELECT key, value FROM payguard_meta WHERE key IN ('schema_kind', 'schema_version')",
                &[],
            )
            .await
            .map_err(pg_unavailable)?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == k)
                .map(|r| r.get::<_, String>(1))
        };
        let kind = get("schema_kind");
        if kind.as_deref() != Some("guarded") {
            return Err(StoreError::Schema(format!(
                "schema_kind is {kind:?}; only a 'guarded' database can hold real money \
                 (a naive one lacks the constraints that prevent double charges)"
            )));
        }
        let version = get("schema_version");
        version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                StoreError::Schema(format!(
                    "payguard_meta.schema_version is {version:?}, not a version number"
                ))
            })?
    } else {
        let tables: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
                &[],
            )
            .await
            .map_err(pg_unavailable)?
            .get(0);
        if tables != 0 {
            return Err(StoreError::Schema(
                "the database already holds tables that are not payguard's".into(),
            ));
        }
        0
    };
    if version > MIGRATIONS.len() {
        return Err(StoreError::Schema(format!(
            "database schema v{version} is newer than this payguard (v{})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(sql).await.map_err(pg_unavailable)?;
        tx.execute(
            "INSERT INTO payguard_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&(i + 1).to_string()],
        )
        .await
        .map_err(pg_unavailable)?;
    }
    tx.commit().await.map_err(pg_unavailable)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Applies `ops` in one transaction, one result per op (see the module docs).
/// `isolated` runs every op in its own savepoint from the start (`--guard seed`).
///
/// Public so that tests can drive two stores' connections against one database
/// with no lane or lock above them.
pub async fn apply_ops(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    now: i64,
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    apply_counted(client, ops, now, isolated, &PgStats::default(), &mut None)
        .await
        .map_err(Fault::into_store_error)
}

/// A batch on a pooled connection, under the batch deadline, with unanswered
/// COMMITs resolved (see the module docs): the only way the store runs ops.
async fn apply_pooled(
    inner: &Inner,
    ops: &[Command],
    isolated: bool,
) -> Result<Vec<OpResult>, StoreError> {
    let mut reruns = 0;
    // Once an earlier attempt is known to have committed, no error may be
    // reported as "nothing moved": the batch is re-run (it replays) until it reads
    // its result back, or the caller gets `Unknown`.
    let mut committed_before = false;
    loop {
        let (_open, mut client) = inner.enter().await?;
        // The xid whose COMMIT is on the wire, while it is.
        let mut sent = None;
        let attempt = tokio::time::timeout(
            inner.batch_deadline,
            apply_counted(
                &mut client,
                ops,
                now_ms(),
                isolated,
                &inner.stats,
                &mut sent,
            ),
        )
        .await;
        // Why the batch runs again, for the error if it gives up.
        let why: String = match attempt {
            Ok(Ok(results)) => return Ok(results),
            Ok(Err(Fault::Ambiguous { xid, detail })) => {
                drop(Object::take(client));
                resolve(inner, xid, &detail, &mut committed_before).await?;
                detail
            }
            Ok(Err(f)) => {
                let e = f.into_store_error();
                if !committed_before {
                    return Err(e);
                }
                e.to_string()
            }
            Err(_) => {
                let detail = format!(
                    "no answer within the {:?} batch deadline",
                    inner.batch_deadline
                );
                // The connection is lost to us: never hand it back to the pool.
                drop(Object::take(client));
                match sent {
                    Some(xid) => {
                        resolve(inner, xid, &detail, &mut committed_before).await?;
                        detail
                    }
                    // COMMIT was never sent: the server rolls back when the
                    // connection goes, and nothing of this attempt can commit.
                    None if !committed_before => {
                        return Err(StoreError::Unavailable(format!(
                            "{detail}; nothing was committed"
                        )))
                    }
                    None => detail,
                }
            }
        };
        reruns += 1;
        if reruns > AMBIGUOUS_RERUNS_MAX {
            return Err(if committed_before {
                StoreError::Unknown(format!(
                    "an earlier attempt committed, and reading its result back failed: {why}"
                ))
            } else {
                StoreError::Unavailable(format!(
                    "{reruns} COMMITs in a row went unanswered, none of them committed: {why}"
                ))
            });
        }
        tokio::time::sleep(Duration::from_millis(RERUN_BACKOFF_MS * u64::from(reruns))).await;
    }
}

/// Pause before re-running a batch after an unanswered COMMIT, times the rerun.
const RERUN_BACKOFF_MS: u64 = 50;

/// Looks up an unanswered COMMIT's fate (bounded by [`RESOLVE_DEADLINE_MS`]),
/// so the batch can run again; `Unknown` when the fate cannot be learned.
async fn resolve(
    inner: &Inner,
    xid: i64,
    detail: &str,
    committed_before: &mut bool,
) -> Result<(), StoreError> {
    inner
        .stats
        .ambiguous_commits
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(event = "store_commit_unanswered", xid, detail = %detail, "looking up the transaction's fate");
    let committed = tokio::time::timeout(
        Duration::from_millis(RESOLVE_DEADLINE_MS),
        commit_fate(inner, xid),
    )
    .await
    .map_err(|_| {
        StoreError::Unknown(format!(
            "COMMIT of transaction {xid} was not answered ({detail}) and its fate could not be learned within {RESOLVE_DEADLINE_MS} ms"
        ))
    })?;
    tracing::warn!(
        event = "store_commit_resolved",
        xid,
        committed,
        "running the batch again (it replays if it committed)"
    );
    if committed {
        *committed_before = true;
        inner
            .stats
            .ambiguous_committed
            .fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether transaction `xid` committed. A transaction still in progress (its
/// COMMIT may yet arrive from a connection the network is holding) has its
/// backend ended first, so the answer is final. Connection failures on the way
/// are retried (the caller bounds the whole look-up).
async fn commit_fate(inner: &Inner, xid: i64) -> bool {
    /// Pause between looks while a terminated backend finishes, or after a failure.
    const FATE_POLL_MS: u64 = 10;
    loop {
        match commit_fate_once(inner, xid).await {
            Ok(Some(committed)) => return committed,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "store_commit_lookup_failed", xid, detail = %e, "retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(FATE_POLL_MS)).await;
    }
}

/// One look: `Some(committed)` when final, `None` while still in progress (its
/// backend is then ended).
async fn commit_fate_once(inner: &Inner, xid: i64) -> Result<Option<bool>, StoreError> {
    let client = inner.pool.get().await.map_err(pool_unavailable)?;
    let status: Option<String> = client
        .query_one("SELECT txid_status($1)::text", &[&xid])
        .await
        .map_err(pg_unavailable)?
        .get(0);
    match status.as_deref() {
        Some("committed") => Ok(Some(true)),
        Some("aborted") => Ok(Some(false)),
        Some("in progress") => {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE backend_xid = ($1::bigint % 4294967296)::text::xid",
                    &[&xid],
                )
                .await
                .map_err(pg_unavailable)?;
            Ok(None)
        }
        other => Err(StoreError::Unavailable(format!(
            "txid_status({xid}) is {other:?}"
        ))),
    }
}

async fn apply_counted(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    now: i64,
    isolated: bool,
    stats: &PgStats,
    sent: &mut Option<i64>,
) -> Result<Vec<OpResult>, Fault> {
    let mut careful = isolated;
    let mut attempt = 1;
    loop {
        match run_batch(client, ops, now, careful, sent).await {
            Ok(results) => {
                debug_assert_eq!(results.len(), ops.len());
                return Ok(results);
            }
            Err(Fault::Constraint(msg)) if !careful => {
                tracing::warn!(event = "store_constraint", detail = %msg, "replaying batch with a savepoint per op");
                careful = true;
                stats.careful_batches.fetch_add(1, Ordering::Relaxed);
            }
            Err(Fault::Retry(msg)) if attempt < BATCH_ATTEMPTS_MAX => {
                tracing::warn!(event = "store_retry", attempt, detail = %msg, "retrying batch");
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| u64::from(d.subsec_nanos() % 3))
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(
                    RETRY_BACKOFF_MS * u64::from(attempt) + jitter,
                ))
                .await;
                attempt += 1;
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => return Err(f),
        }
    }
}

/// This transaction's id, to look its fate up if its COMMIT goes unanswered.
async fn txid(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, Fault> {
    let stmt = tx.prepare_cached("SELECT txid_current()").await?;
    Ok(tx.query_one(&stmt, &[]).await?.try_get(0)?)
}

async fn run_batch(
    client: &mut deadpool_postgres::ClientWrapper,
    ops: &[Command],
    now: i64,
    careful: bool,
    sent: &mut Option<i64>,
) -> Result<Vec<OpResult>, Fault> {
    let mut tx = client.transaction().await?;
    let (xid, results) = if careful {
        let xid = txid(&tx).await?;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let mut tries = 0;
            loop {
                tries += 1;
                let sp = tx.savepoint("op").await?;
                match run_pass(&sp, std::slice::from_ref(op), now).await {
                    Ok(mut r) => {
                        sp.commit().await?;
                        out.push(r.remove(0));
                        break;
                    }
                    Err(Fault::Constraint(msg)) => {
                        sp.rollback().await?;
                        if tries < CAREFUL_TRIES_MAX {
                            continue;
                        }
                        tracing::error!(event = "store_refused", op = ?op, detail = %msg, "the database refused a change");
                        out.push(Err(Rejection::Refused(msg)));
                        break;
                    }
                    Err(f) => return Err(f),
                }
            }
        }
        (xid, out)
    } else {
        // Pipelined: both go out before either answer is awaited.
        futures::try_join!(txid(&tx), run_pass(&tx, ops, now))?
    };
    // A batch of two or more has done its writes and not committed: a crash here
    // must leave none of it, and none of it was acknowledged.
    if ops.len() >= 2 && failpoint::hit(failpoint::MID_BATCH).await == Some(Action::Error) {
        return Err(Fault::Store("failpoint store.mid_batch".into()));
    }
    *sent = Some(xid);
    match tx.commit().await {
        Ok(()) => *sent = None,
        // The server answered: it rolled back.
        Err(e) if e.code().is_some() => {
            *sent = None;
            return Err(e.into());
        }
        Err(e) => {
            return Err(Fault::Ambiguous {
                xid,
                detail: pg_message(&e),
            })
        }
    }
    if after_commit_failpoint_applies(&results) {
        if let Some(Action::Error) = failpoint::hit(failpoint::AFTER_COMMIT).await {
            return Err(Fault::Store(
                "failpoint store.after_commit: committed, reply lost".into(),
            ));
        }
    }
    Ok(results)
}

const ORDER_COLS: &str = "id, account_id, amount, status, refunded, debit_entry_id, failure_reason, created_at, updated_at";
const ENTRY_COLS: &str =
    "id, order_id, account_id, kind, amount, balance_after, refund_id, reverses, created_at";
const ACCOUNT_COLS: &str = "id, balance, currency, opening_balance, created_at, updated_at";

fn corrupt(what: impl std::fmt::Display) -> Fault {
    Fault::Store(format!("unreadable row: {what}"))
}

fn account_from_row(row: &Row) -> Result<Account, Fault> {
    let currency: &str = row.try_get(2)?;
    Ok(Account {
        id: AccountId::parse(row.try_get(0)?).map_err(corrupt)?,
        balance: Money::from_stored(row.try_get(1)?),
        currency: Currency::parse(currency).map_err(corrupt)?,
        opening_balance: Money::from_stored(row.try_get(3)?),
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
    })
}

fn order_from_row(row: &Row) -> Result<Order, Fault> {
    let status: &str = row.try_get(3)?;
    Ok(Order {
        id: OrderId::parse(row.try_get(0)?).map_err(corrupt)?,
        account_id: AccountId::parse(row.try_get(1)?).map_err(corrupt)?,
        amount: Money::from_stored(row.try_get(2)?),
        status: OrderStatus::parse(status)
            .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
        refunded: Money::from_stored(row.try_get(4)?),
        debit_entry_id: row.try_get(5)?,
        failure_reason: row.try_get(6)?,
        created_at: row.try_get(7)?,
        updated_at: row.try_get(8)?,
    })
}

fn entry_from_row(row: &Row) -> Result<Entry, Fault> {
    let kind: &str = row.try_get(3)?;
    let refund_id: Option<&str> = row.try_get(6)?;
    Ok(Entry {
        id: row.try_get(0)?,
        order_id: OrderId::parse(row.try_get(1)?).map_err(corrupt)?,
        account_id: AccountId::parse(row.try_get(2)?).map_err(corrupt)?,
        kind: EntryKind::parse(kind).ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
        amount: Money::from_stored(row.try_get(4)?),
        balance_after: Money::from_stored(row.try_get(5)?),
        refund_id: refund_id
            .map(RefundId::parse)
            .transpose()
            .map_err(corrupt)?,
        reverses: row.try_get(7)?,
        created_at: row.try_get(8)?,
    })
}

/// An order as this batch sees it: its row before the batch (`base`, or the row
/// the batch inserts) and each state it passes through, in batch order.
struct OrderSlot {
    base: Order,
    created: bool,
    states: Vec<Order>,
}

impl OrderSlot {
    fn current(&self) -> &Order {
        self.states.last().unwrap_or(&self.base)
    }
}

/// An account as this batch sees it.
struct AccountSlot {
    /// The balance of the row before the batch's update (opening balance if new).
    base_balance: Money,
    current: Account,
    created: bool,
    changed: bool,
}

/// Everything one pass knows and decides, before any write.
#[derive(Default)]
struct Plan {
    orders: HashMap<OrderId, OrderSlot>,
    accounts: HashMap<AccountId, AccountSlot>,
    /// Refund entries by refund id, read or written by this batch.
    refunds: HashMap<RefundId, Entry>,
    /// Debit entries by id, read or written by this batch.
    debits: HashMap<i64, Entry>,
    /// Entries this batch writes, in batch order; entry `i` carries the
    /// placeholder id `-(i + 1)` until the insert assigns the real one.
    new_entries: Vec<Entry>,
    new_accounts: Vec<AccountId>,
    new_orders: Vec<OrderId>,
    /// Per order: the highest fencing token seen (read from the row, then raised
    /// by this batch's fenced ops). Written back with the batch.
    fences: HashMap<OrderId, i64>,
}

fn placeholder(index: usize) -> i64 {
    -(index as i64) - 1
}

/// Runs one pass: read and lock, decide in Rust, write set-based.
async fn run_pass(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[Command],
    now: i64,
) -> Result<Vec<OpResult>, Fault> {
    let mut plan = Plan::default();
    read_batch(tx, ops, &mut plan).await?;
    let mut results: Vec<OpResult> = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(plan.decide(op, now)?);
    }
    let ids = write_batch(tx, &plan, now).await?;
    for out in results.iter_mut().flatten() {
        patch_ids(out, &ids)?;
    }
    write_idempotency(tx, ops, &results, now).await?;
    Ok(results)
}

/// Completes (or drops) the Idempotency-Key reservations of the batch's
/// idempotent ops, in the batch's own transaction, with two set-based statements:
/// the stored response is exactly the committed result (real entry ids included).
async fn write_idempotency(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[Command],
    results: &[OpResult],
    now: i64,
) -> Result<(), Fault> {
    let mut done: Vec<(&IdemWrite, i32, Vec<u8>)> = Vec::new();
    let mut dropped: Vec<&IdemWrite> = Vec::new();
    for (op, result) in ops.iter().zip(results) {
        if let Some(idem) = &op.idempotency {
            match (idem.render)(result) {
                Some((status, body)) => done.push((idem, i32::from(status), body)),
                None => dropped.push(idem),
            }
        }
    }
    if !done.is_empty() {
        let scopes: Vec<&str> = done.iter().map(|d| d.0.scope.as_str()).collect();
        let keys: Vec<&str> = done.iter().map(|d| d.0.key.as_str()).collect();
        let prints: Vec<&str> = done.iter().map(|d| d.0.fingerprint.as_str()).collect();
        let statuses: Vec<i32> = done.iter().map(|d| d.1).collect();
        let bodies: Vec<&[u8]> = done.iter().map(|d| d.2.as_slice()).collect();
        let expires: Vec<i64> = done
            .iter()
            .map(|d| now.saturating_add(d.0.ttl_ms))
            .collect();
        let stmt = tx
            .prepare_cached(
                "UPDATE idempotency AS i SET state = 'done', status = t.st, body = t.b,
                        lease_until = NULL, expires_at = t.exp
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::bytea[], $6::int8[])
                      AS t (sc, k, f, st, b, exp)
                 WHERE i.scope = t.sc AND i.key = t.k AND i.fingerprint = t.f AND i.state = 'in_flight'
                 RETURNING i.key",
            )
            .await?;
        let stored = tx
            .query(
                &stmt,
                &[&scopes, &keys, &prints, &statuses, &bodies, &expires],
            )
            .await?;
        if stored.len() != done.len() {
            // A lease lapsed and another request took its key over; the op itself
            // is exactly once regardless, and that request stores its own answer.
            let stored: std::collections::HashSet<&str> =
                stored.iter().filter_map(|r| r.try_get(0).ok()).collect();
            for key in keys.iter().filter(|k| !stored.contains(*k)) {
                tracing::warn!(event = "idempotency_lease_lost", key = %key);
            }
        }
    }
    if !dropped.is_empty() {
        let scopes: Vec<&str> = dropped.iter().map(|d| d.scope.as_str()).collect();
        let keys: Vec<&str> = dropped.iter().map(|d| d.key.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "DELETE FROM idempotency AS i USING unnest($1::text[], $2::text[]) AS t (sc, k)
                 WHERE i.scope = t.sc AND i.key = t.k AND i.state = 'in_flight'",
            )
            .await?;
        tx.execute(&stmt, &[&scopes, &keys]).await?;
    }
    Ok(())
}

/// Reserves an Idempotency-Key (see [`Store::idem_claim`]). A new key is inserted
/// with `ON CONFLICT DO NOTHING`, which waits for a racing claimer's commit, so of
/// two instances claiming one key at once exactly one gets `Claimed`; an existing
/// key is read `FOR UPDATE` and taken over only when expired or its lease lapsed.
async fn idem_claim_on(
    client: &mut deadpool_postgres::ClientWrapper,
    c: &IdemClaim,
) -> Result<ClaimOutcome, Fault> {
    let tx = client.transaction().await?;
    let lease_until = c.now_ms.saturating_add(c.lease_ms);
    let expires_at = c.now_ms.saturating_add(c.ttl_ms);
    let insert = tx
        .prepare_cached(
            "INSERT INTO idempotency
                 (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at)
             VALUES ($1, $2, $3, 'in_flight', $4, NULL, NULL, $5, $6)
             ON CONFLICT (scope, key) DO NOTHING",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &c.scope,
        &c.key,
        &c.fingerprint,
        &lease_until,
        &c.now_ms,
        &expires_at,
    ];
    if tx.execute(&insert, &params).await? == 1 {
        tx.commit().await?;
        return Ok(ClaimOutcome::Claimed);
    }
    let select = tx
        .prepare_cached(
            "SELECT fingerprint, state, lease_until, status, body, expires_at
             FROM idempotency WHERE scope = $1 AND key = $2 FOR UPDATE",
        )
        .await?;
    let row = tx
        .query_opt(&select, &[&c.scope, &c.key])
        .await?
        .ok_or_else(|| Fault::Retry("idempotency key vanished during its claim".into()))?;
    let fingerprint: &str = row.try_get(0)?;
    let state: &str = row.try_get(1)?;
    let lease: Option<i64> = row.try_get(2)?;
    let status: Option<i32> = row.try_get(3)?;
    let body: Option<Vec<u8>> = row.try_get(4)?;
    let expires: i64 = row.try_get(5)?;
    let same_request = fingerprint == c.fingerprint;
    if expires >= c.now_ms {
        match (state, status, body) {
            ("done", Some(status), Some(body)) => {
                let status = u16::try_from(status)
                    .map_err(|_| corrupt(format!("stored status {status}")))?;
                return Ok(ClaimOutcome::Done {
                    same_request,
                    status,
                    body,
                });
            }
            _ if lease.is_some_and(|l| l >= c.now_ms) => {
                return Ok(ClaimOutcome::InFlight { same_request });
            }
            // An in-flight claim whose lease lapsed: its instance died.
            _ => {}
        }
    }
    let take_over = tx
        .prepare_cached(
            "UPDATE idempotency SET fingerprint = $3, state = 'in_flight', lease_until = $4,
                    status = NULL, body = NULL, created_at = $5, expires_at = $6
             WHERE scope = $1 AND key = $2",
        )
        .await?;
    tx.execute(&take_over, &params).await?;
    tx.commit().await?;
    Ok(ClaimOutcome::Claimed)
}

/// Reads and locks every row the batch touches: orders, then accounts, each in id
/// order (the global lock order), then the entries that replays return.
async fn read_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[Command],
    plan: &mut Plan,
) -> Result<(), Fault> {
    let mut order_ids = BTreeSet::new();
    let mut account_ids = BTreeSet::new();
    let mut refund_ids = BTreeSet::new();
    let mut deducts = BTreeSet::new();
    for op in ops {
        match &op.op {
            Op::CreateAccount { id, .. } => {
                account_ids.insert(id.as_str());
            }
            Op::CreateOrder { id, account_id, .. } => {
                order_ids.insert(id.as_str());
                account_ids.insert(account_id.as_str());
            }
            Op::Deduct { order_id } => {
                order_ids.insert(order_id.as_str());
                deducts.insert(order_id.as_str());
            }
            Op::Refund {
                order_id,
                refund_id,
                ..
            } => {
                order_ids.insert(order_id.as_str());
                refund_ids.insert(refund_id.as_str());
            }
        }
    }
    let mut debit_ids: Vec<i64> = Vec::new();
    if !order_ids.is_empty() {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {ORDER_COLS} FROM orders WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
            ))
            .await?;
        let ids: Vec<&str> = order_ids.into_iter().collect();
        for row in tx.query(&stmt, &[&ids]).await? {
            let order = order_from_row(&row)?;
            if let (true, Some(debit)) = (deducts.contains(order.id.as_str()), order.debit_entry_id)
            {
                debit_ids.push(debit);
            }
            plan.orders.insert(
                order.id.clone(),
                OrderSlot {
                    base: order,
                    created: false,
                    states: Vec::new(),
                },
            );
        }
    }
    if ops.iter().any(|op| op.fence.is_some()) && !plan.orders.is_empty() {
        // The rows are locked already; this reads the fence each one keeps.
        let stmt = tx
            .prepare_cached("SELECT id, fence FROM orders WHERE id = ANY($1::text[])")
            .await?;
        let ids: Vec<&str> = plan.orders.keys().map(OrderId::as_str).collect();
        for row in tx.query(&stmt, &[&ids]).await? {
            let id: String = row.try_get(0)?;
            let fence: i64 = row.try_get(1)?;
            let id = OrderId::parse(&id).map_err(corrupt)?;
            plan.fences.insert(id, fence);
        }
    }
    for slot in plan.orders.values() {
        account_ids.insert(slot.base.account_id.as_str());
    }
    if !account_ids.is_empty() {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
            ))
            .await?;
        let ids: Vec<&str> = account_ids.into_iter().collect();
        for row in tx.query(&stmt, &[&ids]).await? {
            let account = account_from_row(&row)?;
            plan.accounts.insert(
                account.id.clone(),
                AccountSlot {
                    base_balance: account.balance,
                    current: account,
                    created: false,
                    changed: false,
                },
            );
        }
    }
    if !refund_ids.is_empty() || !debit_ids.is_empty() {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS} FROM entries
                 WHERE refund_id = ANY($1::text[]) OR id = ANY($2::int8[])"
            ))
            .await?;
        let ids: Vec<&str> = refund_ids.into_iter().collect();
        for row in tx.query(&stmt, &[&ids, &debit_ids]).await? {
            let entry = entry_from_row(&row)?;
            match (&entry.kind, &entry.refund_id) {
                (EntryKind::Refund, Some(rid)) => {
                    plan.refunds.insert(rid.clone(), entry);
                }
                (EntryKind::Debit, _) => {
                    plan.debits.insert(entry.id, entry);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

impl Plan {
    /// One command, exactly as the SQLite store decides it, against the batch's state.
    fn decide(&mut self, cmd: &Command, now: i64) -> Result<OpResult, Fault> {
        if let (Some(token), Some(order)) = (cmd.fence, cmd.order_id()) {
            let seen = self.fences.get(order).copied().unwrap_or(0);
            if self.orders.contains_key(order) && token < seen {
                return Ok(Err(Rejection::StaleFencingToken));
            }
            if self.orders.contains_key(order) {
                self.fences.insert(order.clone(), token.max(seen));
            }
        }
        match &cmd.op {
            Op::CreateAccount {
                id,
                balance,
                currency,
            } => Ok(self.create_account(id, *balance, *currency, now)),
            Op::CreateOrder {
                id,
                account_id,
                amount,
            } => Ok(self.create_order(id, account_id, *amount, now)),
            Op::Deduct { order_id } => self.deduct(order_id, now),
            Op::Refund {
                order_id,
                refund_id,
                amount,
            } => self.refund(order_id, refund_id, *amount, now),
        }
    }

    fn create_account(
        &mut self,
        id: &AccountId,
        balance: Money,
        currency: Currency,
        now: i64,
    ) -> OpResult {
        if let Some(slot) = self.accounts.get(id) {
            let existing = &slot.current;
            return if existing.opening_balance == balance && existing.currency == currency {
                Ok(Output::Account {
                    account: existing.clone(),
                    created: false,
                })
            } else {
                Err(Rejection::AccountExists)
            };
        }
        let account = Account {
            id: id.clone(),
            balance,
            currency,
            opening_balance: balance,
            created_at: now,
            updated_at: now,
        };
        self.accounts.insert(
            id.clone(),
            AccountSlot {
                base_balance: balance,
                current: account.clone(),
                created: true,
                changed: false,
            },
        );
        self.new_accounts.push(id.clone());
        Ok(Output::Account {
            account,
            created: true,
        })
    }

    fn create_order(
        &mut self,
        id: &OrderId,
        account_id: &AccountId,
        amount: Money,
        now: i64,
    ) -> OpResult {
        if let Some(slot) = self.orders.get(id) {
            let existing = slot.current();
            return if existing.account_id == *account_id && existing.amount == amount {
                Ok(Output::Order {
                    order: existing.clone(),
                    created: false,
                })
            } else {
                Err(Rejection::OrderExists)
            };
        }
        if !self.accounts.contains_key(account_id) {
            return Err(Rejection::AccountNotFound);
        }
        let order = Order {
            id: id.clone(),
            account_id: account_id.clone(),
            amount,
            status: OrderStatus::Prepare,
            refunded: Money::ZERO,
            debit_entry_id: None,
            failure_reason: None,
            created_at: now,
            updated_at: now,
        };
        self.orders.insert(
            id.clone(),
            OrderSlot {
                base: order.clone(),
                created: true,
                states: Vec::new(),
            },
        );
        self.new_orders.push(id.clone());
        Ok(Output::Order {
            order,
            created: true,
        })
    }

    fn deduct(&mut self, order_id: &OrderId, now: i64) -> Result<OpResult, Fault> {
        let Some(slot) = self.orders.get_mut(order_id) else {
            return Ok(Err(Rejection::OrderNotFound));
        };
        let order = slot.current().clone();
        match order.status {
            OrderStatus::Failed => return Ok(Err(Rejection::InsufficientFunds)),
            OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
                let entry_id = order
                    .debit_entry_id
                    .ok_or_else(|| Fault::Store(format!("paid order {order_id} has no debit")))?;
                let entry = self.debits.get(&entry_id).cloned().ok_or_else(|| {
                    Fault::Store(format!("debit entry {entry_id} of {order_id} not found"))
                })?;
                return Ok(Ok(Output::Movement {
                    order,
                    entry,
                    replayed: true,
                }));
            }
            OrderStatus::Prepare => {}
        }
        let account = self
            .accounts
            .get_mut(&order.account_id)
            .ok_or_else(|| Fault::Store(format!("account of order {order_id} not found")))?;
        let Some(balance_after) = account
            .current
            .balance
            .checked_sub(order.amount)
            .filter(|b| !b.is_negative())
        else {
            slot.states.push(Order {
                status: OrderStatus::Failed,
                failure_reason: Some("insufficient_funds".into()),
                updated_at: now,
                ..order
            });
            return Ok(Err(Rejection::InsufficientFunds));
        };
        account.current.balance = balance_after;
        account.current.updated_at = now;
        account.changed = true;
        let id = placeholder(self.new_entries.len());
        let entry = Entry {
            id,
            order_id: order_id.clone(),
            account_id: order.account_id.clone(),
            kind: EntryKind::Debit,
            amount: order.amount,
            balance_after,
            refund_id: None,
            reverses: None,
            created_at: now,
        };
        self.new_entries.push(entry.clone());
        self.debits.insert(id, entry.clone());
        let order = Order {
            status: OrderStatus::Paid,
            debit_entry_id: Some(id),
            updated_at: now,
            ..order
        };
        slot.states.push(order.clone());
        Ok(Ok(Output::Movement {
            order,
            entry,
            replayed: false,
        }))
    }

    fn refund(
        &mut self,
        order_id: &OrderId,
        refund_id: &RefundId,
        amount: Money,
        now: i64,
    ) -> Result<OpResult, Fault> {
        let Some(slot) = self.orders.get_mut(order_id) else {
            return Ok(Err(Rejection::OrderNotFound));
        };
        let order = slot.current().clone();
        if let Some(existing) = self.refunds.get(refund_id) {
            return Ok(
                if existing.order_id == *order_id && existing.amount == amount {
                    Ok(Output::Movement {
                        order,
                        entry: existing.clone(),
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
        let account = self
            .accounts
            .get_mut(&order.account_id)
            .ok_or_else(|| Fault::Store(format!("account of order {order_id} not found")))?;
        let Some(balance_after) = account.current.balance.checked_add(amount) else {
            return Ok(Err(Rejection::Refused(
                "the refund would overflow the balance".into(),
            )));
        };
        account.current.balance = balance_after;
        account.current.updated_at = now;
        account.changed = true;
        let entry = Entry {
            id: placeholder(self.new_entries.len()),
            order_id: order_id.clone(),
            account_id: order.account_id.clone(),
            kind: EntryKind::Refund,
            amount,
            balance_after,
            refund_id: Some(refund_id.clone()),
            reverses: None,
            created_at: now,
        };
        self.new_entries.push(entry.clone());
        self.refunds.insert(refund_id.clone(), entry.clone());
        let order = Order {
            status,
            refunded,
            updated_at: now,
            ..order
        };
        slot.states.push(order.clone());
        Ok(Ok(Output::Movement {
            order,
            entry,
            replayed: false,
        }))
    }
}

/// Splits an order's successive states into the fewest single-row updates the
/// status trigger accepts: consecutive changes are merged while the first state's
/// status may become the last's directly (`PAID → … → REFUNDED` is one update;
/// `PREPARE → PAID → PARTIALLY_REFUNDED` needs two). Returns (from, to) pairs.
fn segments<'a>(base: &'a Order, states: &'a [Order]) -> Vec<(&'a Order, &'a Order)> {
    let mut out = Vec::new();
    let mut from = base;
    let mut to: Option<&Order> = None;
    for s in states {
        match to {
            Some(t) if !from.status.can_become(s.status) => {
                out.push((from, t));
                from = t;
            }
            _ => {}
        }
        to = Some(s);
    }
    if let Some(t) = to {
        out.push((from, t));
    }
    out
}

/// Writes the plan with set-based statements; returns placeholder → real entry id.
async fn write_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<HashMap<i64, i64>, Fault> {
    if !plan.new_accounts.is_empty() {
        let mut ids = Vec::with_capacity(plan.new_accounts.len());
        let mut currencies = Vec::with_capacity(ids.capacity());
        let mut balances = Vec::with_capacity(ids.capacity());
        for id in &plan.new_accounts {
            let slot = &plan.accounts[id];
            debug_assert!(slot.created);
            ids.push(id.as_str());
            currencies.push(slot.current.currency.as_str());
            balances.push(slot.base_balance.minor());
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
                 SELECT i, c, b, b, $4, $4 FROM unnest($1::text[], $2::text[], $3::int8[]) AS t (i, c, b)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?;
        let n = tx
            .query(&stmt, &[&ids, &currencies, &balances, &now])
            .await?
            .len();
        expect_rows(n, ids.len(), "new accounts (another instance created one)")?;
    }
    if !plan.new_orders.is_empty() {
        let mut ids = Vec::with_capacity(plan.new_orders.len());
        let mut accounts = Vec::with_capacity(ids.capacity());
        let mut amounts = Vec::with_capacity(ids.capacity());
        for id in &plan.new_orders {
            let base = &plan.orders[id].base;
            ids.push(id.as_str());
            accounts.push(base.account_id.as_str());
            amounts.push(base.amount.minor());
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
                 SELECT i, a, m, 'PREPARE', 0, $4, $4 FROM unnest($1::text[], $2::text[], $3::int8[]) AS t (i, a, m)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?;
        let n = tx
            .query(&stmt, &[&ids, &accounts, &amounts, &now])
            .await?
            .len();
        expect_rows(n, ids.len(), "new orders (another instance created one)")?;
    }
    let mut real_ids = HashMap::with_capacity(plan.new_entries.len());
    if !plan.new_entries.is_empty() {
        let len = plan.new_entries.len();
        let mut order_ids = Vec::with_capacity(len);
        let mut account_ids = Vec::with_capacity(len);
        let mut kinds = Vec::with_capacity(len);
        let mut amounts = Vec::with_capacity(len);
        let mut balances = Vec::with_capacity(len);
        let mut refund_ids: Vec<Option<&str>> = Vec::with_capacity(len);
        for e in &plan.new_entries {
            order_ids.push(e.order_id.as_str());
            account_ids.push(e.account_id.as_str());
            kinds.push(e.kind.as_str());
            amounts.push(e.amount.minor());
            balances.push(e.balance_after.minor());
            refund_ids.push(e.refund_id.as_ref().map(RefundId::as_str));
        }
        // ORDER BY n: ids are drawn in batch order, so "commit order" is batch order.
        let stmt = tx
            .prepare_cached(
                "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at)
                 SELECT o, a, k, m, b, r, $7
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[])
                      WITH ORDINALITY AS t (o, a, k, m, b, r, n)
                 ORDER BY n
                 RETURNING id, kind, order_id, refund_id",
            )
            .await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &order_ids,
                    &account_ids,
                    &kinds,
                    &amounts,
                    &balances,
                    &refund_ids,
                    &now,
                ],
            )
            .await?;
        expect_rows(rows.len(), len, "ledger entries")?;
        // Each new entry is unique by (debit, order) or (refund, refund id).
        let mut by_key: HashMap<(&str, &str), i64> = HashMap::with_capacity(len);
        for row in &rows {
            let kind: &str = row.try_get(1)?;
            let key: &str = if kind == "debit" {
                row.try_get(2)?
            } else {
                row.try_get::<_, Option<&str>>(3)?.unwrap_or("")
            };
            by_key.insert((kind, key), row.try_get(0)?);
        }
        for (i, e) in plan.new_entries.iter().enumerate() {
            let key = match &e.refund_id {
                Some(r) => r.as_str(),
                None => e.order_id.as_str(),
            };
            let id = by_key
                .get(&(e.kind.as_str(), key))
                .ok_or_else(|| Fault::Store(format!("inserted entry for {key} not returned")))?;
            real_ids.insert(placeholder(i), *id);
        }
    }
    let changed: Vec<&AccountSlot> = plan.accounts.values().filter(|a| a.changed).collect();
    if !changed.is_empty() {
        let ids: Vec<&str> = changed.iter().map(|a| a.current.id.as_str()).collect();
        let balances: Vec<i64> = changed.iter().map(|a| a.current.balance.minor()).collect();
        let expected: Vec<i64> = changed.iter().map(|a| a.base_balance.minor()).collect();
        // Pair assertion: each account is written once, from the balance that was read.
        let stmt = tx
            .prepare_cached(
                "UPDATE accounts AS a SET balance = t.b, updated_at = $4
                 FROM unnest($1::text[], $2::int8[], $3::int8[]) AS t (i, b, old)
                 WHERE a.id = t.i AND a.balance = t.old
                 RETURNING a.id",
            )
            .await?;
        let n = tx
            .query(&stmt, &[&ids, &balances, &expected, &now])
            .await?
            .len();
        expect_rows(n, ids.len(), "balance updates")?;
    }
    // One UPDATE per round: round k holds every order's k-th segment.
    let mut rounds: Vec<Vec<(&Order, &Order)>> = Vec::new();
    for slot in plan.orders.values() {
        debug_assert!(!slot.created || slot.base.status == OrderStatus::Prepare);
        for (k, seg) in segments(&slot.base, &slot.states).into_iter().enumerate() {
            if rounds.len() <= k {
                rounds.push(Vec::new());
            }
            rounds[k].push(seg);
        }
    }
    for round in rounds {
        let len = round.len();
        let mut ids = Vec::with_capacity(len);
        let mut old_status = Vec::with_capacity(len);
        let mut old_refunded = Vec::with_capacity(len);
        let mut status = Vec::with_capacity(len);
        let mut refunded = Vec::with_capacity(len);
        let mut debit = Vec::with_capacity(len);
        let mut reason = Vec::with_capacity(len);
        for (from, to) in round {
            ids.push(to.id.as_str());
            old_status.push(from.status.as_str());
            old_refunded.push(from.refunded.minor());
            status.push(to.status.as_str());
            refunded.push(to.refunded.minor());
            debit.push(
                to.debit_entry_id
                    .map(|id| real_ids.get(&id).copied().unwrap_or(id)),
            );
            reason.push(to.failure_reason.as_deref());
        }
        let stmt = tx
            .prepare_cached(
                "UPDATE orders AS o SET status = t.s, refunded = t.r,
                        debit_entry_id = t.d, failure_reason = t.f, updated_at = $8
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::int8[], $7::text[])
                      AS t (i, old_s, old_r, s, r, d, f)
                 WHERE o.id = t.i AND o.status = t.old_s AND o.refunded = t.old_r
                 RETURNING o.id",
            )
            .await?;
        let n = tx
            .query(
                &stmt,
                &[
                    &ids,
                    &old_status,
                    &old_refunded,
                    &status,
                    &refunded,
                    &debit,
                    &reason,
                    &now,
                ],
            )
            .await?
            .len();
        expect_rows(n, len, "order status changes")?;
    }
    if !plan.fences.is_empty() {
        let (ids, tokens): (Vec<&str>, Vec<i64>) =
            plan.fences.iter().map(|(id, t)| (id.as_str(), *t)).unzip();
        let stmt = tx
            .prepare_cached(
                "UPDATE orders AS o SET fence = f.token
                 FROM unnest($1::text[], $2::int8[]) AS f(id, token)
                 WHERE o.id = f.id AND o.fence <= f.token",
            )
            .await?;
        let n = tx.execute(&stmt, &[&ids, &tokens]).await? as usize;
        expect_rows(n, ids.len(), "fence updates")?;
    }
    Ok(real_ids)
}

/// The conditional write that makes a change happen once: any other row count
/// means the world was not as read.
fn expect_rows(changed: usize, want: usize, what: &str) -> Result<(), Fault> {
    if changed == want {
        Ok(())
    } else {
        Err(Fault::Constraint(format!(
            "{what}: expected to change {want} rows, changed {changed}"
        )))
    }
}

/// Replaces placeholder entry ids with the ids the insert assigned.
fn patch_ids(out: &mut Output, ids: &HashMap<i64, i64>) -> Result<(), Fault> {
    let fix = |id: &mut i64| -> Result<(), Fault> {
        if *id < 0 {
            *id = *ids
                .get(id)
                .ok_or_else(|| Fault::Store(format!("placeholder entry id {id} unassigned")))?;
        }
        Ok(())
    };
    match out {
        Output::Account { .. } => {}
        Output::Order { order, .. } => {
            if let Some(id) = order.debit_entry_id.as_mut() {
                fix(id)?;
            }
        }
        Output::Movement { order, entry, .. } => {
            if let Some(id) = order.debit_entry_id.as_mut() {
                fix(id)?;
            }
            fix(&mut entry.id)?;
        }
    }
    Ok(())
}

/// The invariant checks of API.md's `GET /v1/audit`, in one REPEATABLE READ
/// snapshot; the same queries as the SQLite store's, in PostgreSQL's dialect.
/// Ids sort bytewise (`COLLATE "C"`) like SQLite's.
pub async fn audit_client(client: &mut tokio_postgres::Client) -> Result<AuditReport, StoreError> {
    audit_inner(client).await.map_err(Fault::into_store_error)
}

async fn audit_inner(client: &mut tokio_postgres::Client) -> Result<AuditReport, Fault> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let counts = tx
        .query_one(
            "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM orders),
                    (SELECT COUNT(*) FROM entries)",
            &[],
        )
        .await?;
    let mut report = AuditReport {
        accounts_checked: counts.try_get(0)?,
        orders_checked: counts.try_get(1)?,
        entries_checked: counts.try_get(2)?,
        ..AuditReport::default()
    };
    for row in tx
        .query(
            "SELECT d.order_id, d.debits,
                    (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
             FROM (SELECT order_id, COUNT(*) AS debits FROM entries WHERE kind = 'debit'
                   GROUP BY order_id HAVING COUNT(*) > 1) d
             ORDER BY d.order_id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        let order_id: String = row.try_get(0)?;
        let debits: i64 = row.try_get(1)?;
        let reversed: i64 = row.try_get(2)?;
        if debits - reversed > 1 {
            report.duplicate_debits.push(DuplicateDebit {
                order_id,
                count: debits - reversed,
            });
        } else {
            report.resolved.push(Resolved { order_id, reversed });
        }
    }
    for row in tx
        .query(
            "SELECT id, amount, refunded FROM (
                 SELECT o.id, o.amount,
                        GREATEST(o.refunded, COALESCE(SUM(e.amount), 0))::bigint AS refunded
                 FROM orders o LEFT JOIN entries e ON e.order_id = o.id AND e.kind = 'refund'
                 GROUP BY o.id) t
             WHERE refunded > amount
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        report.over_refunded.push(OverRefund {
            order_id: row.try_get(0)?,
            amount: row.try_get(1)?,
            refunded: row.try_get(2)?,
        });
    }
    for row in tx
        .query(
            "SELECT id, expected, balance FROM (
                 SELECT a.id,
                        (a.opening_balance
                          - COALESCE(SUM(CASE WHEN e.kind = 'debit' THEN e.amount END), 0)
                          + COALESCE(SUM(CASE WHEN e.kind IN ('refund', 'reversal') THEN e.amount END), 0)
                        )::bigint AS expected,
                        a.balance
                 FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
                 GROUP BY a.id) t
             WHERE expected <> balance OR balance < 0
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        report.balance_mismatches.push(BalanceMismatch {
            account_id: row.try_get(0)?,
            expected: row.try_get(1)?,
            actual: row.try_get(2)?,
        });
    }
    for row in tx
        .query(
            "SELECT id, status, debits FROM (
                 SELECT o.id, o.status,
                        (SELECT COUNT(*) FROM entries e WHERE e.order_id = o.id AND e.kind = 'debit') AS debits
                 FROM orders o) t
             WHERE (status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) <> (debits > 0)
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        let m = PaidMismatch {
            order_id: row.try_get(0)?,
            status: row.try_get(1)?,
            debits: row.try_get(2)?,
        };
        if m.debits == 0 {
            report.paid_without_entry.push(m);
        } else {
            report.entry_without_paid.push(m);
        }
    }
    tx.commit().await?;
    Ok(report.finish())
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn apply(&self, ops: Vec<Command>) -> StoreFuture<Vec<OpResult>> {
        let inner = self.inner.clone();
        Box::pin(async move { apply_pooled(&inner, &ops, false).await })
    }

    fn apply_isolated(&self, op: Command) -> StoreFuture<OpResult> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // One transaction whose first statement locks the order row
            // (`SELECT … FOR UPDATE`), then re-checks its status before writing.
            let mut results = apply_pooled(&inner, std::slice::from_ref(&op), true).await?;
            results
                .pop()
                .ok_or_else(|| StoreError::Unavailable("no result for the op".into()))
        })
    }

    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1"
                ))
                .await
                .map_err(pg_unavailable)?;
            let row = client
                .query_opt(&stmt, &[&id.as_str()])
                .await
                .map_err(pg_unavailable)?;
            row.as_ref()
                .map(account_from_row)
                .transpose()
                .map_err(Fault::into_store_error)
        })
    }

    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            let stmt = client
                .prepare_cached(&format!("SELECT {ORDER_COLS} FROM orders WHERE id = $1"))
                .await
                .map_err(pg_unavailable)?;
            let row = client
                .query_opt(&stmt, &[&id.as_str()])
                .await
                .map_err(pg_unavailable)?;
            row.as_ref()
                .map(order_from_row)
                .transpose()
                .map_err(Fault::into_store_error)
        })
    }

    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            // Orders are never deleted, so two statements cannot disagree.
            let exists = client
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
                .await
                .map_err(pg_unavailable)?;
            let exists: bool = client
                .query_one(&exists, &[&order_id.as_str()])
                .await
                .map_err(pg_unavailable)?
                .get(0);
            if !exists {
                return Ok(None);
            }
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLS} FROM entries WHERE order_id = $1 ORDER BY id"
                ))
                .await
                .map_err(pg_unavailable)?;
            let rows = client
                .query(&stmt, &[&order_id.as_str()])
                .await
                .map_err(pg_unavailable)?;
            rows.iter()
                .map(entry_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
                .map_err(Fault::into_store_error)
        })
    }

    fn audit(&self) -> StoreFuture<AuditReport> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            audit_client(&mut client).await
        })
    }

    fn idem_claim(&self, claim: IdemClaim) -> StoreFuture<ClaimOutcome> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            let mut attempt = 1;
            loop {
                match idem_claim_on(&mut client, &claim).await {
                    Ok(outcome) => return Ok(outcome),
                    Err(Fault::Retry(_)) if attempt < BATCH_ATTEMPTS_MAX => attempt += 1,
                    Err(f) => return Err(f.into_store_error()),
                }
            }
        })
    }

    fn idem_release(&self, scope: String, key: String) -> StoreFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            client
                .execute(
                    "DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND state = 'in_flight'",
                    &[&scope, &key],
                )
                .await
                .map_err(pg_unavailable)?;
            Ok(())
        })
    }

    fn idem_prune(&self, now_ms: i64) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            client
                .execute("DELETE FROM idempotency WHERE expires_at < $1", &[&now_ms])
                .await
                .map_err(pg_unavailable)
        })
    }

    fn next_fence_epoch(&self) -> StoreFuture<i64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            let row = client
                .query_one("SELECT nextval('fence_epochs')", &[])
                .await
                .map_err(pg_unavailable)?;
            row.try_get::<_, i64>(0).map_err(pg_unavailable)
        })
    }

    fn close(&self) -> StoreFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // Waits for every call in flight to finish with its connection.
            let mut closed = inner.closed.write().await;
            *closed = true;
            inner.pool.close();
            Ok(())
        })
    }
}

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

async fn drop_database(base: &tokio_postgres::Config, name: &str) -> Result<(), StoreError> {
    let client = connect_raw(base).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(pg_unavailable)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: OrderStatus, refunded: i64) -> Order {
        Order {
            id: OrderId::parse("o").unwrap(),
            account_id: AccountId::parse("a").unwrap(),
            amount: Money::from_stored(100),
            status,
            refunded: Money::from_stored(refunded),
            debit_entry_id: None,
            failure_reason: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn shape(base: &Order, states: &[Order]) -> Vec<(OrderStatus, OrderStatus)> {
        segments(base, states)
            .into_iter()
            .map(|(a, b)| (a.status, b.status))
            .collect()
    }

    #[test]
    fn segments_merge_only_transitions_the_trigger_allows() {
        use OrderStatus::*;
        let base = order(Prepare, 0);
        assert!(shape(&base, &[]).is_empty());
        assert_eq!(shape(&base, &[order(Paid, 0)]), vec![(Prepare, Paid)]);
        assert_eq!(
            shape(
                &base,
                &[
                    order(Paid, 0),
                    order(PartiallyRefunded, 10),
                    order(PartiallyRefunded, 20),
                    order(Refunded, 100)
                ]
            ),
            vec![(Prepare, Paid), (Paid, Refunded)]
        );
        let paid = order(Paid, 0);
        assert_eq!(
            shape(
                &paid,
                &[order(PartiallyRefunded, 10), order(PartiallyRefunded, 20)]
            ),
            vec![(Paid, PartiallyRefunded)]
        );
        for (from, to) in segments(&paid, &[order(PartiallyRefunded, 10), order(Refunded, 100)]) {
            assert!(from.status.can_become(to.status));
        }
    }
}
