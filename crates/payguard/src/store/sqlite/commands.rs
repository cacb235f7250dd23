//! One command inside the writer's transaction: read, decide, write.
//!
//! The decision is [`rules::decide`]'s, the same as PostgreSQL's; this file only
//! reads what the rules need and writes what they decided, in SQLite's dialect.
//! Every write names the state it was decided from and must change exactly one
//! row (a pair assertion), so a world that is not as read is a constraint fault
//! (the batch is replayed with a savepoint per command) rather than a wrong write.
//!
//! The money path's statements build no ephemeral table: no `RETURNING` (SQLite
//! builds one per execution of a statement with it; measured with callgrind,
//! about a fifth of a deduct's instructions) and no constant `IN` list of three or
//! more; a new entry's id is `last_insert_rowid()`.

use super::error::{bad_column, expect_one, Fault};
use super::idempotency::{self, write_idem};
#[cfg(doc)]
use super::rows::ORDER_COLS;
use super::rows::{load_account, load_entry, load_order_entry, load_refund, order_from_row};
use crate::domain::{EntryKind, Money, Order, OrderId};
use crate::store::rules::{self, Decision, Effect, Movement};
use crate::store::{Command, Op, OpResult, Rejection};
use rusqlite::{params, Connection, OptionalExtension};

/// The rows one command's decision needs ([`rules::Rows`]).
type Read = rules::Rows;

pub(super) fn exec_command(conn: &Connection, cmd: &Command, now: i64) -> Result<OpResult, Fault> {
    let mut read = read_for(conn, &cmd.op)?;
    if let Some(idem) = &cmd.idempotency {
        // Only a keyed command reads its key: has a committed transaction
        // answered it already ([`rules::answered`])? The writer is the only
        // one, so the record cannot change before this transaction commits.
        read.key = idempotency::record(conn, &idem.scope, &idem.key)?;
    }
    let verdict = rules::decide(cmd, &read.seen(), now)
        .map_err(|e| Fault::Store(bad_column(0, e.to_string())))?;
    if let (Some(token), Some(order_id)) = (verdict.fence, cmd.order_id()) {
        write_fence(conn, order_id, token)?;
    }
    let answer = match verdict.decision {
        Decision::Reject(Rejection::StaleFencingToken) => {
            tracing::warn!(
                event = "stale_fencing_token",
                oid = cmd.order_id().map(OrderId::as_str).unwrap_or(""),
                token = cmd.fence.unwrap_or(0)
            );
            Err(Rejection::StaleFencingToken)
        }
        Decision::Reject(r) => Err(r),
        Decision::Replay(out) => Ok(out),
        Decision::Apply(effect) => write_effect(conn, &effect, now)?,
    };
    match &cmd.idempotency {
        // The key holds this request's answer: it stays as it is.
        Some(_) if answer == Err(Rejection::KeyAnswered) => {}
        Some(idem) => write_idem(conn, idem, &answer, now)?,
        None => {}
    }
    Ok(answer)
}

/// The commands the committed state settles, answered from one read
/// transaction (one WAL snapshot) without writing ([`rules::settled`]); `None`
/// for each command that must run as a write. State the rules find inconsistent
/// is no answer here: the write path fails that command's batch and says why.
pub(super) fn settled(
    conn: &mut Connection,
    cmds: &[Command],
    now: i64,
) -> rusqlite::Result<Vec<Option<OpResult>>> {
    let tx = conn.transaction()?;
    let mut answers = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        if !cmd.is_plain() {
            // Not even read: the rules answer `None` for it whatever the state.
            answers.push(None);
            continue;
        }
        let read = read_for(&tx, &cmd.op).map_err(|f| match f {
            Fault::Store(e) => e,
            Fault::Constraint(msg) => bad_column(0, msg),
        })?;
        answers.push(rules::settled(cmd, &read.seen(), now).unwrap_or(None));
    }
    tx.commit()?;
    Ok(answers)
}

/// The order an op names with its fence and its account's balance, in one join;
/// the order's columns in [`ORDER_COLS`]' order, as [`order_from_row`] reads them.
const ORDER_STATE_SQL: &str = "SELECT o.id, o.account_id, o.amount, o.status, o.refunded,
        o.debit_entry_id, o.failure_reason, o.created_at, o.updated_at,
        o.captured, o.held, o.hold_expires_at, o.fence, a.balance, a.held
     FROM orders o LEFT JOIN accounts a ON a.id = o.account_id
     WHERE o.id = ?1";

/// An order as read with its fence and its account's balance and held sum.
type OrderState = (Order, i64, Option<(Money, Money)>);

fn load_order_state(conn: &Connection, id: &OrderId) -> Result<Option<OrderState>, Fault> {
    Ok(conn
        .prepare_cached(ORDER_STATE_SQL)?
        .query_row([id.as_str()], |r| {
            let balance: Option<i64> = r.get(13)?;
            let held: Option<i64> = r.get(14)?;
            Ok((
                order_from_row(r)?,
                r.get(12)?,
                balance
                    .zip(held)
                    .map(|(b, h)| (Money::from_stored(b), Money::from_stored(h))),
            ))
        })
        .optional()?)
}

/// Reads what the rules need to decide `op` (see [`rules::Seen`] for which fields).
fn read_for(conn: &Connection, op: &Op) -> Result<Read, Fault> {
    let mut read = Read::default();
    match op {
        Op::CreateAccount { id, .. } => read.account = load_account(conn, id.as_str())?,
        Op::CreateOrder { id, account_id, .. } => {
            read.set_order(load_order_state(conn, id)?);
            if read.order.is_none() {
                read.account_exists = conn
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")?
                    .query_row([account_id.as_str()], |r| r.get(0))?;
            }
        }
        Op::Deduct { order_id } => {
            read.set_order(load_order_state(conn, order_id)?);
            if let Some(id) = read.order.as_ref().and_then(|o| o.debit_entry_id) {
                read.debit = load_entry(conn, id)?;
            }
        }
        Op::Refund {
            order_id,
            refund_id,
            ..
        } => {
            read.set_order(load_order_state(conn, order_id)?);
            if read.order.is_some() {
                read.refund = load_refund(conn, refund_id.as_str())?;
            }
        }
        Op::Authorize { order_id, .. } => {
            read.set_order(load_order_state(conn, order_id)?);
            if read.order.as_ref().is_some_and(Order::is_two_phase) {
                read.hold = load_order_entry(conn, order_id.as_str(), EntryKind::Hold)?;
            }
        }
        Op::Capture { order_id, .. } => {
            read.set_order(load_order_state(conn, order_id)?);
            if let Some(id) = read.order.as_ref().and_then(|o| o.debit_entry_id) {
                read.debit = load_entry(conn, id)?;
            }
        }
        Op::Void { order_id } | Op::Expire { order_id } => {
            read.set_order(load_order_state(conn, order_id)?);
            if read.order.as_ref().is_some_and(|o| {
                o.is_two_phase() && o.status != crate::domain::OrderStatus::Authorized
            }) {
                read.release = load_order_entry(conn, order_id.as_str(), EntryKind::Release)?;
            }
        }
    }
    Ok(read)
}

impl rules::Rows {
    fn set_order(&mut self, found: Option<OrderState>) {
        if let Some((order, fence, funds)) = found {
            self.order = Some(order);
            self.fence = fence;
            self.balance = funds.map(|f| f.0);
            self.held = funds.map(|f| f.1);
        }
    }
}

/// Keeps `token` as the order's fence (the rules checked it is not stale).
fn write_fence(conn: &Connection, order_id: &OrderId, token: i64) -> Result<(), Fault> {
    let changed = conn
        .prepare_cached("UPDATE orders SET fence = ?1 WHERE id = ?2 AND fence <= ?1")?
        .execute(params![token, order_id.as_str()])?;
    expect_one(changed, "fence")
}

/// Makes the writes of `effect`; returns the command's answer.
fn write_effect(conn: &Connection, effect: &Effect, now: i64) -> Result<OpResult, Fault> {
    let entry_id = match effect {
        Effect::OpenAccount(a) => {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?4)",
                )?
                .execute(params![
                    a.id.as_str(),
                    a.currency.as_str(),
                    a.opening_balance.minor(),
                    a.created_at
                ])?;
            expect_one(inserted, "new account")?;
            0
        }
        Effect::PlaceOrder(o) => {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
                     VALUES (?1, ?2, ?3, 'PREPARE', 0, ?4, ?4)",
                )?
                .execute(params![
                    o.id.as_str(),
                    o.account_id.as_str(),
                    o.amount.minor(),
                    o.created_at
                ])?;
            expect_one(inserted, "new order")?;
            0
        }
        Effect::Charge(m) => write_charge(conn, m, now)?,
        Effect::Decline(failed) => {
            let changed = conn
                .prepare_cached(
                    "UPDATE orders SET status = 'FAILED', failure_reason = ?1, updated_at = ?2
                     WHERE id = ?3 AND status = 'PREPARE'",
                )?
                .execute(params![
                    failed.failure_reason.as_deref(),
                    now,
                    failed.id.as_str()
                ])?;
            expect_one(changed, "PREPARE -> FAILED")?;
            0
        }
        Effect::Refund(m) => write_refund(conn, m, now)?,
        Effect::Hold(m) | Effect::Capture(m) | Effect::Release(m) | Effect::Lapse(m) => {
            write_two_phase(conn, m, now)?
        }
    };
    // The outbox: the event is part of the movement's transaction.
    if let Some(draft) = effect.event(entry_id) {
        super::events::insert_event(conn, &draft, now)?;
    }
    Ok(effect.answer(entry_id))
}

/// The balance from `m.balance_before` to the new entry's `balance_after`, and
/// the held sum from `m.held_before` to `m.held_after`: a compare-and-set on
/// both as they were read.
fn write_balance(conn: &Connection, m: &Movement, now: i64) -> Result<(), Fault> {
    let changed = conn
        .prepare_cached(
            "UPDATE accounts SET balance = ?1, held = ?2, updated_at = ?3
             WHERE id = ?4 AND balance = ?5 AND held = ?6",
        )?
        .execute(params![
            m.entry.balance_after.minor(),
            m.held_after.minor(),
            now,
            m.entry.account_id.as_str(),
            m.balance_before.minor(),
            m.held_before.minor()
        ])?;
    expect_one(changed, "balance")
}

/// A ledger line without a refund id (hold, capture, release); returns its id.
fn insert_line(conn: &Connection, e: &rules::NewEntry) -> Result<i64, Fault> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            e.order_id.as_str(),
            e.account_id.as_str(),
            e.kind.as_str(),
            e.amount.minor(),
            e.balance_after.minor(),
            e.created_at
        ])?;
    expect_one(inserted, e.kind.as_str())?;
    Ok(conn.last_insert_rowid())
}

/// A two-phase step (hold, capture, release): its entries, the balance and held
/// sum, and the order's move from the state that was read. Returns the id of the
/// entry the command answers with.
fn write_two_phase(conn: &Connection, m: &Movement, now: i64) -> Result<i64, Fault> {
    let entry_id = insert_line(conn, &m.entry)?;
    if let Some(rest) = &m.rest {
        insert_line(conn, rest)?;
    }
    write_balance(conn, m, now)?;
    let (order, _) = m.settle(entry_id);
    let changed = conn
        .prepare_cached(
            "UPDATE orders SET status = ?1, debit_entry_id = ?2, captured = ?3, held = ?4,
                    hold_expires_at = ?5, updated_at = ?6
             WHERE id = ?7 AND status = ?8 AND held = ?9",
        )?
        .execute(params![
            order.status.as_str(),
            order.debit_entry_id,
            order.captured.map(Money::minor),
            order.held.minor(),
            order.hold_expires_at,
            now,
            order.id.as_str(),
            m.before.status.as_str(),
            m.before.held.minor()
        ])?;
    expect_one(changed, "two-phase status change")?;
    Ok(entry_id)
}

/// A charge: the debit entry, the balance, PREPARE → PAID. Returns the entry id.
fn write_charge(conn: &Connection, m: &Movement, now: i64) -> Result<i64, Fault> {
    let e = &m.entry;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES (?1, ?2, 'debit', ?3, ?4, ?5)",
        )?
        .execute(params![
            e.order_id.as_str(),
            e.account_id.as_str(),
            e.amount.minor(),
            e.balance_after.minor(),
            e.created_at
        ])?;
    expect_one(inserted, "debit entry")?;
    let entry_id = conn.last_insert_rowid();
    write_balance(conn, m, now)?;
    let changed = conn
        .prepare_cached(
            "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, updated_at = ?2
             WHERE id = ?3 AND status = 'PREPARE'",
        )?
        .execute(params![entry_id, now, e.order_id.as_str()])?;
    expect_one(changed, "PREPARE -> PAID")?;
    Ok(entry_id)
}

/// A refund: the refund entry, the balance, the order's refunded sum and status
/// (from the ones that were read). Returns the entry id.
fn write_refund(conn: &Connection, m: &Movement, now: i64) -> Result<i64, Fault> {
    let e = &m.entry;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at)
             VALUES (?1, ?2, 'refund', ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            e.order_id.as_str(),
            e.account_id.as_str(),
            e.amount.minor(),
            e.balance_after.minor(),
            e.refund_id.as_ref().map(|r| r.as_str()),
            e.created_at
        ])?;
    expect_one(inserted, "refund entry")?;
    let entry_id = conn.last_insert_rowid();
    write_balance(conn, m, now)?;
    let changed = conn
        .prepare_cached(
            "UPDATE orders SET refunded = ?1, status = ?2, updated_at = ?3
             WHERE id = ?4 AND status = ?5 AND refunded = ?6",
        )?
        .execute(params![
            m.after.refunded.minor(),
            m.after.status.as_str(),
            now,
            m.after.id.as_str(),
            m.before.status.as_str(),
            m.before.refunded.minor()
        ])?;
    expect_one(changed, "refund status change")?;
    Ok(entry_id)
}
