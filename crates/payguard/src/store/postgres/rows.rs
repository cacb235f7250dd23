//! Reading payguard's rows back from PostgreSQL: column lists and row decoding.
//!
//! Rows come from our own schema, whose CHECKs already hold every value in range;
//! decoding still refuses an id, status or kind this build does not know, as a
//! corrupt row rather than a guess.

use super::error::{corrupt, Fault};
use crate::domain::{
    Account, AccountId, Currency, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
};
use tokio_postgres::Row;

pub(super) const ORDER_COLS: &str = "id, account_id, amount, status, refunded, debit_entry_id, failure_reason, created_at, updated_at, captured, held, hold_expires_at";
pub(super) const ENTRY_COLS: &str =
    "id, order_id, account_id, kind, amount, balance_after, refund_id, reverses, created_at";
pub(super) const ACCOUNT_COLS: &str =
    "id, balance, currency, opening_balance, created_at, updated_at, held";

pub(super) fn account_from_row(row: &Row) -> Result<Account, Fault> {
    let currency: &str = row.try_get(2)?;
    Ok(Account {
        id: AccountId::parse(row.try_get(0)?).map_err(corrupt)?,
        balance: Money::from_stored(row.try_get(1)?),
        currency: Currency::parse(currency).map_err(corrupt)?,
        opening_balance: Money::from_stored(row.try_get(3)?),
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        held: Money::from_stored(row.try_get(6)?),
    })
}

pub(super) fn order_from_row(row: &Row) -> Result<Order, Fault> {
    order_from_row_at(row, 0)
}

/// As [`order_from_row`], from the row's columns starting at `at`.
pub(super) fn order_from_row_at(row: &Row, at: usize) -> Result<Order, Fault> {
    let status: &str = row.try_get(at + 3)?;
    Ok(Order {
        id: OrderId::parse(row.try_get(at)?).map_err(corrupt)?,
        account_id: AccountId::parse(row.try_get(at + 1)?).map_err(corrupt)?,
        amount: Money::from_stored(row.try_get(at + 2)?),
        status: OrderStatus::parse(status)
            .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
        refunded: Money::from_stored(row.try_get(at + 4)?),
        debit_entry_id: row.try_get(at + 5)?,
        failure_reason: row.try_get(at + 6)?,
        created_at: row.try_get(at + 7)?,
        updated_at: row.try_get(at + 8)?,
        captured: row
            .try_get::<_, Option<i64>>(at + 9)?
            .map(Money::from_stored),
        held: Money::from_stored(row.try_get(at + 10)?),
        hold_expires_at: row.try_get(at + 11)?,
    })
}

pub(super) fn entry_from_row(row: &Row) -> Result<Entry, Fault> {
    entry_from_row_at(row, 0)
}

/// As [`entry_from_row`], from the row's columns starting at `at`.
pub(super) fn entry_from_row_at(row: &Row, at: usize) -> Result<Entry, Fault> {
    let kind: &str = row.try_get(at + 3)?;
    let refund_id: Option<&str> = row.try_get(at + 6)?;
    Ok(Entry {
        id: row.try_get(at)?,
        order_id: OrderId::parse(row.try_get(at + 1)?).map_err(corrupt)?,
        account_id: AccountId::parse(row.try_get(at + 2)?).map_err(corrupt)?,
        kind: EntryKind::parse(kind).ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
        amount: Money::from_stored(row.try_get(at + 4)?),
        balance_after: Money::from_stored(row.try_get(at + 5)?),
        refund_id: refund_id
            .map(RefundId::parse)
            .transpose()
            .map_err(corrupt)?,
        reverses: row.try_get(at + 7)?,
        created_at: row.try_get(at + 8)?,
    })
}

pub(super) async fn load_account(
    client: &deadpool_postgres::ClientWrapper,
    id: &AccountId,
) -> Result<Option<Account>, Fault> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1"
        ))
        .await?;
    let row = client.query_opt(&stmt, &[&id.as_str()]).await?;
    row.as_ref().map(account_from_row).transpose()
}

pub(super) async fn load_order(
    client: &deadpool_postgres::ClientWrapper,
    id: &OrderId,
) -> Result<Option<Order>, Fault> {
    let stmt = client
        .prepare_cached(&format!("SELECT {ORDER_COLS} FROM orders WHERE id = $1"))
        .await?;
    let row = client.query_opt(&stmt, &[&id.as_str()]).await?;
    row.as_ref().map(order_from_row).transpose()
}

/// Up to `limit` AUTHORIZED orders whose hold expired at or before `now_ms`,
/// oldest first (the partial index `orders_open_holds` answers it).
pub(super) async fn due_holds(
    client: &deadpool_postgres::ClientWrapper,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<OrderId>, Fault> {
    let stmt = client
        .prepare_cached(
            "SELECT id FROM orders WHERE status = 'AUTHORIZED' AND hold_expires_at <= $1
             ORDER BY hold_expires_at, id LIMIT $2",
        )
        .await?;
    client
        .query(&stmt, &[&now_ms, &(limit as i64)])
        .await?
        .iter()
        .map(|r| OrderId::parse(r.try_get(0)?).map_err(corrupt))
        .collect()
}

/// The order's entries in commit order, or `None` when the order does not exist.
pub(super) async fn order_entries(
    client: &deadpool_postgres::ClientWrapper,
    order_id: &OrderId,
) -> Result<Option<Vec<Entry>>, Fault> {
    // Orders are never deleted, so two statements cannot disagree.
    let exists = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
        .await?;
    let exists: bool = client
        .query_one(&exists, &[&order_id.as_str()])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLS} FROM entries WHERE order_id = $1 ORDER BY id"
        ))
        .await?;
    let rows = client.query(&stmt, &[&order_id.as_str()]).await?;
    rows.iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
