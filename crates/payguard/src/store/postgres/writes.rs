//! Writing a batch's plan with a handful of set-based statements.

use super::error::{expect_rows, Fault};
use super::plan::{placeholder, AccountSlot, Plan};
use crate::domain::{EventDraft, Order, OrderStatus, RefundId};
use crate::store::Output;
use std::collections::HashMap;

/// Splits an order's successive states into the fewest single-row updates the
/// status trigger accepts: consecutive changes are merged while the first state's
/// status may become the last's directly (`PAID → … → REFUNDED` is one update;
/// `PREPARE → PAID → PARTIALLY_REFUNDED` needs two). Returns (from, to) pairs.
pub(super) fn segments<'a>(base: &'a Order, states: &'a [Order]) -> Vec<(&'a Order, &'a Order)> {
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

/// Writes the plan with set-based statements, one per kind of write present;
/// returns placeholder → real entry id. Each statement names the state it expects
/// and must change exactly the rows the plan says (a pair assertion).
pub(super) async fn write_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<HashMap<i64, i64>, Fault> {
    if !plan.new_accounts.is_empty() {
        insert_accounts(tx, plan, now).await?;
    }
    if !plan.new_orders.is_empty() {
        insert_orders(tx, plan, now).await?;
    }
    let real_ids = if plan.new_entries.is_empty() {
        HashMap::new()
    } else {
        insert_entries(tx, plan, now).await?
    };
    update_balances(tx, plan, now).await?;
    // One UPDATE per round: round k holds every order's k-th segment.
    for round in rounds(plan) {
        update_orders(tx, &round, &real_ids, now).await?;
    }
    if !plan.fences.is_empty() {
        update_fences(tx, plan).await?;
    }
    if !plan.new_events.is_empty() {
        let mut drafts = plan.new_events.clone();
        for d in &mut drafts {
            patch_draft(d, &real_ids)?;
        }
        super::events::insert_events(tx, &drafts, now).await?;
    }
    Ok(real_ids)
}

/// The batch's new accounts, in one insert.
async fn insert_accounts(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<(), Fault> {
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
    expect_rows(n, ids.len(), "new accounts (another instance created one)")
}

/// The batch's new orders (PREPARE), in one insert.
async fn insert_orders(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<(), Fault> {
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
    expect_rows(n, ids.len(), "new orders (another instance created one)")
}

/// The batch's ledger entries, in batch order, in one insert; returns
/// placeholder → real entry id.
async fn insert_entries(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<HashMap<i64, i64>, Fault> {
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
    // Each new entry is unique by (kind, order) or (refund, refund id): one
    // debit, hold, capture or release per order.
    let mut by_key: HashMap<(&str, &str), i64> = HashMap::with_capacity(len);
    for row in &rows {
        let kind: &str = row.try_get(1)?;
        let key: &str = if kind == "refund" {
            row.try_get::<_, Option<&str>>(3)?.unwrap_or("")
        } else {
            row.try_get(2)?
        };
        by_key.insert((kind, key), row.try_get(0)?);
    }
    let mut real_ids = HashMap::with_capacity(len);
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
    Ok(real_ids)
}

/// One balance per changed account (PostgreSQL updates a row once per
/// statement, so the batch's movements were summed in the plan).
async fn update_balances(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    now: i64,
) -> Result<(), Fault> {
    let changed: Vec<&AccountSlot> = plan.accounts.values().filter(|a| a.changed).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = changed.iter().map(|a| a.current.id.as_str()).collect();
    let balances: Vec<i64> = changed.iter().map(|a| a.current.balance.minor()).collect();
    let expected: Vec<i64> = changed.iter().map(|a| a.base_balance.minor()).collect();
    let held: Vec<i64> = changed.iter().map(|a| a.current.held.minor()).collect();
    let expected_held: Vec<i64> = changed.iter().map(|a| a.base_held.minor()).collect();
    // Pair assertion: each account is written once, from the balance and held
    // sum that were read.
    let stmt = tx
        .prepare_cached(
            "UPDATE accounts AS a SET balance = t.b, held = t.h, updated_at = $4
             FROM unnest($1::text[], $2::int8[], $3::int8[], $5::int8[], $6::int8[])
                  AS t (i, b, old, h, old_h)
             WHERE a.id = t.i AND a.balance = t.old AND a.held = t.old_h
             RETURNING a.id",
        )
        .await?;
    let n = tx
        .query(
            &stmt,
            &[&ids, &balances, &expected, &now, &held, &expected_held],
        )
        .await?
        .len();
    expect_rows(n, ids.len(), "balance updates")
}

/// The orders' status changes as rounds: round k holds every order's k-th
/// segment (see [`segments`]).
fn rounds(plan: &Plan) -> Vec<Vec<(&Order, &Order)>> {
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
    rounds
}

/// One round of order changes, each conditional on the status and refunded sum
/// it starts from.
async fn update_orders(
    tx: &deadpool_postgres::Transaction<'_>,
    round: &[(&Order, &Order)],
    real_ids: &HashMap<i64, i64>,
    now: i64,
) -> Result<(), Fault> {
    let len = round.len();
    let mut ids = Vec::with_capacity(len);
    let mut old_status = Vec::with_capacity(len);
    let mut old_refunded = Vec::with_capacity(len);
    let mut status = Vec::with_capacity(len);
    let mut refunded = Vec::with_capacity(len);
    let mut debit = Vec::with_capacity(len);
    let mut reason = Vec::with_capacity(len);
    let mut captured = Vec::with_capacity(len);
    let mut held = Vec::with_capacity(len);
    let mut expires = Vec::with_capacity(len);
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
        captured.push(to.captured.map(|m| m.minor()));
        held.push(to.held.minor());
        expires.push(to.hold_expires_at);
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE orders AS o SET status = t.s, refunded = t.r,
                    debit_entry_id = t.d, failure_reason = t.f, updated_at = $8,
                    captured = t.c, held = t.h, hold_expires_at = t.x
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::int8[],
                         $7::text[], $9::int8[], $10::int8[], $11::int8[])
                  AS t (i, old_s, old_r, s, r, d, f, c, h, x)
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
                &captured,
                &held,
                &expires,
            ],
        )
        .await?
        .len();
    expect_rows(n, len, "order status changes")
}

/// Each fenced order keeps the highest token that wrote it.
async fn update_fences(tx: &deadpool_postgres::Transaction<'_>, plan: &Plan) -> Result<(), Fault> {
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
    expect_rows(n, ids.len(), "fence updates")
}

/// Replaces a placeholder entry id with the id the insert assigned.
fn fix_id(id: &mut i64, ids: &HashMap<i64, i64>) -> Result<(), Fault> {
    if *id < 0 {
        *id = *ids
            .get(id)
            .ok_or_else(|| Fault::Store(format!("placeholder entry id {id} unassigned")))?;
    }
    Ok(())
}

/// An event's order and entry with the ids the insert assigned.
fn patch_draft(d: &mut EventDraft, ids: &HashMap<i64, i64>) -> Result<(), Fault> {
    if let Some(id) = d.order.debit_entry_id.as_mut() {
        fix_id(id, ids)?;
    }
    if let Some(e) = d.entry.as_mut() {
        fix_id(&mut e.id, ids)?;
    }
    Ok(())
}

/// Replaces placeholder entry ids with the ids the insert assigned.
pub(super) fn patch_ids(out: &mut Output, ids: &HashMap<i64, i64>) -> Result<(), Fault> {
    let fix = |id: &mut i64| fix_id(id, ids);
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

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Money, OrderId};

    fn order(status: OrderStatus, refunded: i64) -> Order {
        Order {
            id: OrderId::parse("o").unwrap(),
            account_id: AccountId::parse("a").unwrap(),
            amount: Money::from_stored(100),
            status,
            refunded: Money::from_stored(refunded),
            debit_entry_id: None,
            failure_reason: None,
            captured: None,
            held: Money::ZERO,
            hold_expires_at: None,
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
