//! The PostgreSQL store: several payguard instances, one database.
//!
//! Why it exists: SQLite is one machine's file. With PostgreSQL, many instances can
//! serve the same orders, and the schema (`postgres/schema.sql`) still refuses a
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
//! 2. decides every command, in batch order, with the money rules
//!    ([`crate::store::rules`], the same as SQLite's), on an in-memory copy of
//!    those rows ([`plan`]), so several orders on one account are charged in
//!    batch order and an overdraft fails only the order that would cause it;
//! 3. writes all effects with a handful of set-based statements over `unnest`
//!    arrays: new accounts, new orders, all ledger entries, one balance per
//!    account (PostgreSQL updates a row once per statement, so balances are
//!    aggregated first), and the orders' status changes (one statement per
//!    "round", see [`writes`]), each conditional on the state that was read;
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
//! savepoint per op, so only that op is [`Refused`](crate::store::Rejection::Refused). Deadlocks and
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
//! Migrations are a list ([`schema`]); `payguard_meta` holds `schema_kind`
//! ('guarded') and `schema_version`. A database marked otherwise, holding foreign
//! tables, or newer than this build is refused, like the SQLite store does.
//!
//! Files: [`connection`] (pool, close guard, raw connections), [`schema`]
//! (migrations), [`batch`] (one batch: read, decide, write, commit; savepoint
//! replay, retries), [`commit`] (unanswered COMMITs: PostgreSQL's side of the
//! shared loop, [`crate::store::commit_fate`]), [`reads`] (what a batch
//! locks and reads), [`plan`] (its decisions in memory), [`writes`] (set-based
//! writes), [`idempotency`], [`rows`], [`audit`], [`error`]; `scratch` (throwaway
//! databases) only with the `test-support` feature.

mod audit;
mod batch;
mod commit;
mod connection;
mod error;
mod events;
mod idempotency;
mod plan;
mod reads;
mod rows;
mod schema;
#[cfg(any(test, feature = "test-support"))]
mod scratch;
mod writes;

pub use audit::audit_client;
pub use batch::{apply_ops, apply_ops_on_clock, Clock};
pub use connection::connect_raw;
pub use events::SEQUENCE_PASS_EVENTS_MAX;
pub use schema::migrate;
#[cfg(any(test, feature = "test-support"))]
pub use scratch::ScratchDb;

use crate::domain::{Account, AccountId, AuditReport, Entry, Event, Order, OrderId};
use crate::store::outbox::{
    AttemptResult, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint, RetryOutcome,
};
use crate::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, OpResult, Store, StoreError, StoreFuture,
};
use connection::Inner;
use error::{pg_unavailable, Fault};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

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

impl PgStore {
    /// Connects, creates or upgrades the guarded schema (refusing a naive or
    /// foreign database) and returns the store.
    pub async fn connect(cfg: PgConfig) -> Result<Self, StoreError> {
        assert!(
            cfg.pool_connections_max > 0,
            "pool_connections_max must be > 0"
        );
        let pool = connection::pool(&cfg)?;
        let mut client = pool.get().await.map_err(error::pool_unavailable)?;
        schema::migrate(&mut client).await?;
        drop(client);
        Ok(PgStore {
            inner: Arc::new(Inner::new(pool, &cfg)),
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

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn counters(&self) -> Vec<super::StoreCounter> {
        let s = self.stats();
        let get = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        vec![
            super::StoreCounter {
                name: "pg_careful_batches",
                help: "Batches re-run with a savepoint per op because a constraint fired",
                value: get(&s.careful_batches),
            },
            super::StoreCounter {
                name: "pg_batch_retries",
                help: "Batch attempts repeated after a deadlock or serialisation failure",
                value: get(&s.retries),
            },
            super::StoreCounter {
                name: "pg_ambiguous_commits",
                help: "COMMITs sent and not answered, whose fate was then looked up",
                value: get(&s.ambiguous_commits),
            },
            super::StoreCounter {
                name: "pg_ambiguous_commits_committed",
                help: "Of the unanswered COMMITs looked up, those that had committed",
                value: get(&s.ambiguous_committed),
            },
        ]
    }

    fn apply(&self, ops: Vec<Command>) -> StoreFuture<Vec<OpResult>> {
        let inner = self.inner.clone();
        Box::pin(async move { commit::apply_pooled(&inner, &ops, false).await })
    }

    fn apply_isolated(&self, op: Command) -> StoreFuture<OpResult> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // One transaction whose first statement locks the order row
            // (`SELECT … FOR UPDATE`), then re-checks its status before writing.
            let mut results = commit::apply_pooled(&inner, std::slice::from_ref(&op), true).await?;
            results
                .pop()
                .ok_or_else(|| StoreError::Unavailable("no result for the op".into()))
        })
    }

    fn settled(&self, cmds: Vec<Command>, now: i64) -> StoreFuture<Vec<Option<OpResult>>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            match tokio::time::timeout(
                inner.batch_deadline,
                reads::settled(&mut client, &cmds, now),
            )
            .await
            {
                Ok(answers) => answers.map_err(Fault::into_store_error),
                Err(_) => {
                    // Mid-transaction: never hand this connection back to the pool.
                    drop(deadpool_postgres::Object::take(client));
                    Err(StoreError::Unavailable(format!(
                        "no answer within the {:?} batch deadline",
                        inner.batch_deadline
                    )))
                }
            }
        })
    }

    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            rows::load_account(&client, &id)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            rows::load_order(&client, &id)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn open_holds(&self) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            let count = async {
                let stmt = client
                    .prepare_cached("SELECT COUNT(*) FROM orders WHERE status = 'AUTHORIZED'")
                    .await?;
                let n: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
                Ok::<u64, Fault>(n as u64)
            };
            count.await.map_err(Fault::into_store_error)
        })
    }

    fn due_holds(&self, now_ms: i64, limit: usize) -> StoreFuture<Vec<OrderId>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            rows::due_holds(&client, now_ms, limit)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            rows::order_entries(&client, &order_id)
                .await
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
                match idempotency::claim(&mut client, &claim).await {
                    Ok(outcome) => return Ok(outcome),
                    Err(Fault::Retry(_)) if attempt < BATCH_ATTEMPTS_MAX => attempt += 1,
                    Err(f) => return Err(f.into_store_error()),
                }
            }
        })
    }

    fn idem_release(&self, scope: String, key: String, token: ClaimToken) -> StoreFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            // `rules::releases`: only the in-flight claim `token` made.
            client
                .execute(
                    "DELETE FROM idempotency
                     WHERE scope = $1 AND key = $2 AND state = 'in_flight' AND claim = $3",
                    &[&scope, &key, &token.0],
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

    fn events(&self, after: i64, limit: usize) -> StoreFuture<Vec<Event>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::events(&**client, after, limit)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn sequence_events(&self, wait: bool) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            events::sequence(&mut client, wait)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn last_event_seq(&self) -> StoreFuture<i64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            let row = client
                .query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[])
                .await
                .map_err(pg_unavailable)?;
            row.try_get::<_, i64>(0).map_err(pg_unavailable)
        })
    }

    fn webhook_create(&self, endpoint: Endpoint) -> StoreFuture<bool> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            // Number what has committed first: the endpoint's cursor starts
            // after every event committed before it, numbered or not yet.
            events::sequence(&mut client, true)
                .await
                .map_err(Fault::into_store_error)?;
            events::create_endpoint(&**client, &endpoint)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_endpoints(&self, id: Option<String>) -> StoreFuture<Vec<Endpoint>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::endpoints(&**client, id.as_deref())
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_delete(&self, id: String, now_ms: i64) -> StoreFuture<bool> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::delete_endpoint(&**client, &id, now_ms)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_fan_out(&self, now_ms: i64) -> StoreFuture<u64> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            events::fan_out(&mut client, now_ms)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_claim(&self, req: ClaimRequest) -> StoreFuture<Vec<Claimed>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::claim(&client, &req)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_record(&self, results: Vec<AttemptResult>) -> StoreFuture<Vec<bool>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            events::record(&mut client, &results)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_deliveries(
        &self,
        endpoint_id: String,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreFuture<Vec<Delivery>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::deliveries(&**client, &endpoint_id, status, None, limit)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_retry(
        &self,
        endpoint_id: String,
        event_id: String,
        now_ms: i64,
    ) -> StoreFuture<RetryOutcome> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, mut client) = inner.enter().await?;
            events::retry(&mut client, &endpoint_id, &event_id, now_ms)
                .await
                .map_err(Fault::into_store_error)
        })
    }

    fn webhook_backlog(&self) -> StoreFuture<Vec<Backlog>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (_open, client) = inner.enter().await?;
            events::backlog(&**client)
                .await
                .map_err(Fault::into_store_error)
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
