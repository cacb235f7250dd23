//! Reading payguard's rows back: column lists, row decoding, and the loads the
//! store's commands and GETs share.
//!
//! Rows come from our own schema, whose CHECKs already hold every value in range;
//! decoding still refuses an id, status or kind this build does not know, as a
//! corrupt row rather than a guess.

use super::error::bad_column;
use crate::domain::{
    Account, AccountId, Currency, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
};
use rusqlite::{Connection, OptionalExtension, Row};

pub(super) const ORDER_COLS: &str = "id, account_id, amount, status, refunded, debit_entry_id, failure_reason, created_at, updated_at, captured, held, hold_expires_at";
pub(super) const ENTRY_COLS: &str =
    "id, order_id, account_id, kind, amount, balance_after, refund_id, reverses, created_at";
pub(super) const ACCOUNT_COLS: &str =
    "id, balance, currency, opening_balance, created_at, updated_at, held";

pub(super) fn col_id<T>(
    row: &Row<'_>,
    idx: usize,
    parse: fn(&str) -> Result<T, crate::domain::IdError>,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    parse(&s).map_err(|e| bad_column(idx, e.to_string()))
}

pub(super) fn money(row: &Row<'_>, idx: usize) -> rusqlite::Result<Money> {
    Ok(Money::from_stored(row.get(idx)?))
}

pub(super) fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    let currency: String = row.get(2)?;
    Ok(Account {
        id: col_id(row, 0, AccountId::parse)?,
        balance: money(row, 1)?,
        currency: Currency::parse(&currency).map_err(|e| bad_column(2, e.to_string()))?,
        opening_balance: money(row, 3)?,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
        held: money(row, 6)?,
    })
}

pub(super) fn order_from_row(row: &Row<'_>) -> rusqlite::Result<Order> {
    order_from_row_at(row, 0)
}

/// As [`order_from_row`], from the row's columns starting at `at`.
pub(super) fn order_from_row_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Order> {
    let status: String = row.get(at + 3)?;
    Ok(Order {
        id: col_id(row, at, OrderId::parse)?,
        account_id: col_id(row, at + 1, AccountId::parse)?,
        amount: money(row, at + 2)?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| bad_column(at + 3, format!("unknown status {status:?}")))?,
        refunded: money(row, at + 4)?,
        debit_entry_id: row.get(at + 5)?,
        failure_reason: row.get(at + 6)?,
        created_at: row.get(at + 7)?,
        updated_at: row.get(at + 8)?,
        captured: row.get::<_, Option<i64>>(at + 9)?.map(Money::from_stored),
        held: money(row, at + 10)?,
        hold_expires_at: row.get(at + 11)?,
    })
}

pub(super) fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<Entry> {
    entry_from_row_at(row, 0)
}

/// As [`entry_from_row`], from the row's columns starting at `at`.
pub(super) fn entry_from_row_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Entry> {
    let kind: String = row.get(at + 3)?;
    let refund_id: Option<String> = row.get(at + 6)?;
    Ok(Entry {
        id: row.get(at)?,
        order_id: col_id(row, at + 1, OrderId::parse)?,
        account_id: col_id(row, at + 2, AccountId::parse)?,
        kind: EntryKind::parse(&kind)
            .ok_or_else(|| bad_column(at + 3, format!("unknown entry kind {kind:?}")))?,
        amount: money(row, at + 4)?,
        balance_after: money(row, at + 5)?,
        refund_id: refund_id
            .map(|s| RefundId::parse(&s).map_err(|e| bad_column(at + 6, e.to_string())))
            .transpose()?,
        reverses: row.get(at + 7)?,
        created_at: row.get(at + 8)?,
    })
}

pub(super) fn load_account(conn: &Connection, id: &str) -> rusqlite::Result<Option<Account>> {
    conn.prepare_cached(&format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ?1"
    ))?
    .query_row([id], account_from_row)
    .optional()
}

pub(super) fn load_order(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    conn.prepare_cached(&format!("SELECT {ORDER_COLS} FROM orders WHERE id = ?1"))?
        .query_row([id], order_from_row)
        .optional()
}

pub(super) fn load_entry(conn: &Connection, id: i64) -> rusqlite::Result<Option<Entry>> {
    conn.prepare_cached(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = ?1"))?
        .query_row([id], entry_from_row)
        .optional()
}

/// The order's one entry of `kind` (hold, capture, release), if written.
pub(super) fn load_order_entry(
    conn: &Connection,
    order_id: &str,
    kind: EntryKind,
) -> rusqlite::Result<Option<Entry>> {
    conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE order_id = ?1 AND kind = ?2"
    ))?
    .query_row([order_id, kind.as_str()], entry_from_row)
    .optional()
}

pub(super) fn load_refund(conn: &Connection, refund_id: &str) -> rusqlite::Result<Option<Entry>> {
    conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE refund_id = ?1"
    ))?
    .query_row([refund_id], entry_from_row)
    .optional()
}

/// The order's entries in commit order, or `None` when the order does not exist,
/// both from one read transaction.
pub(super) fn order_entries(
    conn: &mut Connection,
    order_id: &OrderId,
) -> rusqlite::Result<Option<Vec<Entry>>> {
    let tx = conn.transaction()?;
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
}

/// Up to `limit` AUTHORIZED orders whose hold expired at or before `now_ms`,
/// oldest first (the partial index `orders_open_holds` answers it).
pub(super) fn due_holds(
    conn: &mut Connection,
    now_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<OrderId>> {
    conn.prepare_cached(
        "SELECT id FROM orders WHERE status = 'AUTHORIZED' AND hold_expires_at <= ?1
         ORDER BY hold_expires_at, id LIMIT ?2",
    )?
    .query_map(rusqlite::params![now_ms, limit as i64], |r| {
        col_id(r, 0, OrderId::parse)
    })?
    .collect()
}
