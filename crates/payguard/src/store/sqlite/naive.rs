//! The incident's code path (`--guard naive`), kept beside the SQLite store and
//! nowhere else.
//!
//! Why it exists: `payguard demo` shows the incident and its fix side by side, on
//! one machine, with no setup. This is the incident: for a deduct, load the order
//! into a shared cache, check its status in memory, pause (the incident's slow
//! calls), then debit, write the entry and set the status as separate statements
//! with no condition. It double charges; that is its purpose.
//!
//! It is not part of the [`Store`](crate::store::Store) trait: only a
//! [`NaiveSqlite`] can run it, and one is made only from a SQLite store whose
//! file was created naive (no money constraints), never from a guarded one, and
//! never on PostgreSQL. Creates, refunds and expiries take the ordinary
//! transactional path, so what an audit of a naive database finds is the
//! incident's damage alone.
//!
//! Two-phase steps (authorize, capture, void) get the same check-then-act: the
//! cached order is checked (PREPARE to hold, AUTHORIZED to capture or void), then
//! after the pause each step writes its entry, the account and the order as
//! separate unconditional statements. Two captures of one hold both take the
//! money; a capture racing a void both happen; the audit (duplicate debits, held
//! mismatches, entries without their status) and forensics (two `capture_commit`)
//! are seen catching it.

use super::error::unavailable;
use super::idempotency::write_idem;
use super::rows::{load_entry, load_order};
use super::{writer, SchemaKind, SqliteStore};
use crate::domain::{
    Entry, EntryKind, EventDraft, EventType, Money, Order, OrderId, OrderStatus, RequestId,
};
use crate::store::{Command, Op, OpResult, Output, Rejection, StoreError, StoreFuture};
use rusqlite::{params, Connection};
use std::sync::Arc;
use std::time::Duration;

/// What the naive path needs to log like the incident's service did.
#[derive(Clone, Debug)]
pub struct NaiveCtx {
    /// The pause between check and act, standing for the incident's slow calls.
    pub gap: Duration,
    pub req: RequestId,
    pub inst: Arc<str>,
}

/// A SQLite store on a naive database, and the incident's shared order cache.
/// Cheap to clone; clones share the store and the cache.
#[derive(Clone)]
pub struct NaiveSqlite {
    store: SqliteStore,
    /// The incident's `orderCache`: written on every load, read by the check.
    cache: Arc<scc::HashMap<OrderId, Order>>,
}

impl NaiveSqlite {
    /// The naive path over `store`; refuses a guarded database, whose money it
    /// would corrupt.
    pub fn new(store: SqliteStore) -> Result<Self, StoreError> {
        if store.schema() != SchemaKind::Naive {
            return Err(StoreError::Schema(
                "--guard naive refuses a guarded database: it would corrupt real money".into(),
            ));
        }
        Ok(NaiveSqlite {
            store,
            cache: Arc::new(scc::HashMap::new()),
        })
    }

    /// The store underneath, for everything but the naive deduct (reads, the
    /// audit, Idempotency-Key claims).
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// Runs `cmd` the incident's way if it is a deduct (its Idempotency-Key
    /// record is still written; the naive path takes no lock, so a fencing token
    /// is ignored), else on the ordinary transactional path.
    pub fn apply(&self, cmd: Command, ctx: NaiveCtx) -> StoreFuture<OpResult> {
        let cache = self.cache.clone();
        self.store.write(move |conn| {
            let result = match &cmd.op {
                Op::Deduct { order_id } => naive_deduct(conn, &cache, order_id, &ctx),
                Op::Authorize { .. } | Op::Capture { .. } | Op::Void { .. } => {
                    match naive_hold_step(conn, &cache, &cmd.op, &ctx).map_err(unavailable)? {
                        Some(result) => Ok(result),
                        // Not a state the naive check acts on: the ordinary path answers.
                        None => return writer::run_one(conn, &cmd),
                    }
                }
                _ => return writer::run_one(conn, &cmd),
            }
            .map_err(unavailable)?;
            if let Some(idem) = &cmd.idempotency {
                let now = chrono::Utc::now().timestamp_millis();
                write_idem(conn, idem, &result, now).map_err(|f| f.into_store_error())?;
            }
            Ok(result)
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

/// The incident's deduct: check the cached order, pause, act.
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
        OrderStatus::Authorized | OrderStatus::Voided | OrderStatus::Expired => {
            return Ok(Err(Rejection::OrderAuthorized))
        }
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
    naive_act(conn, cache, order, ctx)
}

/// The act, after the check and the pause: the balance, the entry and the status,
/// each its own statement, none conditional on the state the check saw.
fn naive_act(
    conn: &Connection,
    cache: &scc::HashMap<OrderId, Order>,
    order: Order,
    ctx: &NaiveCtx,
) -> rusqlite::Result<OpResult> {
    let order_id = &order.id.clone();
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
    let entry = Entry {
        id: entry_id,
        order_id: order.id.clone(),
        account_id: order.account_id.clone(),
        kind: EntryKind::Debit,
        amount: order.amount,
        balance_after: Money::from_stored(balance_after),
        refund_id: None,
        reverses: None,
        created_at: now,
    };
    announce(conn, EventType::OrderPaid, &order, &entry, now)?;
    Ok(Ok(Output::Movement {
        entry,
        order,
        replayed: false,
    }))
}

/// The event of a naive movement, in its own statement like every other step
/// here: a duplicate charge is announced twice, as downstream would have seen it.
fn announce(
    conn: &Connection,
    kind: EventType,
    order: &Order,
    entry: &Entry,
    now: i64,
) -> rusqlite::Result<()> {
    let draft = EventDraft {
        kind,
        order: order.clone(),
        entry: Some(entry.clone()),
    };
    super::events::insert_event(conn, &draft, now).map_err(|f| match f {
        super::error::Fault::Store(e) => e,
        super::error::Fault::Constraint(msg) => super::error::bad_column(0, msg),
    })
}

/// The incident's two-phase step: check the cached order's status, pause, act.
/// `None` when the cached status is not the one this step acts on (a replay or a
/// refusal, which the ordinary path answers).
fn naive_hold_step(
    conn: &Connection,
    cache: &scc::HashMap<OrderId, Order>,
    op: &Op,
    ctx: &NaiveCtx,
) -> rusqlite::Result<Option<OpResult>> {
    let Some(order_id) = op.order_id() else {
        return Ok(None);
    };
    let Some(order) = naive_load(conn, cache, order_id, ctx)? else {
        return Ok(Some(Err(Rejection::OrderNotFound)));
    };
    let acts_on = match op {
        Op::Authorize { .. } => OrderStatus::Prepare,
        _ => OrderStatus::Authorized,
    };
    if order.status != acts_on {
        return Ok(None);
    }
    // The slow calls between check and act.
    std::thread::sleep(ctx.gap);
    let now = chrono::Utc::now().timestamp_millis();
    let account = order.account_id.as_str();
    // Each step its own statement, none conditional on the state the check saw.
    let (kind, amount, status, balance_delta, held_delta) = match op {
        Op::Authorize { hold_ttl_ms, .. } => {
            conn.prepare_cached(
                "UPDATE orders SET status = 'AUTHORIZED', held = amount, hold_expires_at = ?1,
                        updated_at = ?2 WHERE id = ?3",
            )?
            .execute(params![now + hold_ttl_ms, now, order_id.as_str()])?;
            (
                EntryKind::Hold,
                order.amount,
                OrderStatus::Authorized,
                0,
                order.amount.minor(),
            )
        }
        Op::Capture { amount, .. } => {
            let n = amount.unwrap_or(order.amount);
            (
                EntryKind::Capture,
                n,
                OrderStatus::Paid,
                -n.minor(),
                -order.held.minor(),
            )
        }
        _ => (
            EntryKind::Release,
            order.held,
            OrderStatus::Voided,
            0,
            -order.held.minor(),
        ),
    };
    let balance_after: i64 = conn
        .prepare_cached(
            "UPDATE accounts SET balance = balance + ?1, held = held + ?2, updated_at = ?3
             WHERE id = ?4 RETURNING balance",
        )?
        .query_row(params![balance_delta, held_delta, now, account], |r| {
            r.get(0)
        })?;
    let entry_id: i64 = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        )?
        .query_row(
            params![
                order_id.as_str(),
                account,
                kind.as_str(),
                amount.minor(),
                balance_after,
                now
            ],
            |r| r.get(0),
        )?;
    let mut after = Order {
        status,
        updated_at: now,
        ..order.clone()
    };
    match op {
        Op::Capture { .. } => {
            let rest = order.held.minor() - amount.minor();
            if rest > 0 {
                conn.prepare_cached(
                    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
                     VALUES (?1, ?2, 'release', ?3, ?4, ?5)",
                )?
                .execute(params![order_id.as_str(), account, rest, balance_after, now])?;
            }
            conn.prepare_cached(
                "UPDATE orders SET status = 'PAID', captured = ?1, held = 0, debit_entry_id = ?2,
                        updated_at = ?3 WHERE id = ?4",
            )?
            .execute(params![amount.minor(), entry_id, now, order_id.as_str()])?;
            after.captured = Some(amount);
            after.held = Money::ZERO;
            after.debit_entry_id = Some(entry_id);
        }
        Op::Void { .. } => {
            conn.prepare_cached(
                "UPDATE orders SET status = 'VOIDED', held = 0, updated_at = ?1 WHERE id = ?2",
            )?
            .execute(params![now, order_id.as_str()])?;
            after.held = Money::ZERO;
        }
        _ => {
            if let Op::Authorize { hold_ttl_ms, .. } = op {
                after.held = order.amount;
                after.hold_expires_at = Some(now + hold_ttl_ms);
            }
        }
    }
    cache.upsert_sync(order_id.clone(), after.clone());
    let entry = Entry {
        id: entry_id,
        order_id: order_id.clone(),
        account_id: order.account_id.clone(),
        kind,
        amount,
        balance_after: Money::from_stored(balance_after),
        refund_id: None,
        reverses: None,
        created_at: now,
    };
    let event = match op {
        Op::Capture { .. } => EventType::OrderPaid,
        Op::Void { .. } => EventType::OrderVoided,
        _ => EventType::OrderAuthorized,
    };
    announce(conn, event, &after, &entry, now)?;
    Ok(Some(Ok(Output::Movement {
        entry,
        order: after,
        replayed: false,
    })))
}
