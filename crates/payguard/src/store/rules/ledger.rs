//! The rules of each op: accounts, orders, charges, refunds, fences.

use super::{Decision, Effect, Inconsistent, Movement, NewEntry, Seen};
use crate::domain::{
    Account, AccountId, Currency, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
};
use crate::store::{Output, Rejection};

/// Why a declined order failed, as `failure_reason` stores it.
pub const FAILURE_INSUFFICIENT_FUNDS: &str = "insufficient_funds";

/// The token an order keeps after a write under `token`, or `None` when `token`
/// is older than one that already wrote it (`kept`): its holder lost the lock.
pub(super) fn fence(kept: i64, token: i64) -> Option<i64> {
    (token >= kept).then_some(token)
}

pub(super) fn open_account(
    existing: Option<&Account>,
    id: &AccountId,
    balance: Money,
    currency: Currency,
    now: i64,
) -> Decision {
    match existing {
        // Compared with the opening balance, even after money moved.
        Some(a) if a.opening_balance == balance && a.currency == currency => {
            Decision::Replay(Output::Account {
                account: a.clone(),
                created: false,
            })
        }
        Some(_) => Decision::Reject(Rejection::AccountExists),
        None => Decision::Apply(Effect::OpenAccount(Account {
            id: id.clone(),
            balance,
            currency,
            opening_balance: balance,
            created_at: now,
            updated_at: now,
        })),
    }
}

pub(super) fn place_order(
    existing: Option<&Order>,
    account_exists: bool,
    id: &OrderId,
    account_id: &AccountId,
    amount: Money,
    now: i64,
) -> Decision {
    match existing {
        Some(o) if o.account_id == *account_id && o.amount == amount => {
            Decision::Replay(Output::Order {
                order: o.clone(),
                created: false,
            })
        }
        Some(_) => Decision::Reject(Rejection::OrderExists),
        None if !account_exists => Decision::Reject(Rejection::AccountNotFound),
        None => Decision::Apply(Effect::PlaceOrder(Order {
            id: id.clone(),
            account_id: account_id.clone(),
            amount,
            status: OrderStatus::Prepare,
            refunded: Money::ZERO,
            debit_entry_id: None,
            failure_reason: None,
            created_at: now,
            updated_at: now,
        })),
    }
}

pub(super) fn deduct(
    order_id: &OrderId,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Decision, Inconsistent> {
    let Some(order) = seen.order else {
        return Ok(Decision::Reject(Rejection::OrderNotFound));
    };
    match order.status {
        OrderStatus::Failed => Ok(Decision::Reject(Rejection::InsufficientFunds)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            // A replay: the original entry, and the order as it is now.
            let entry_id = order
                .debit_entry_id
                .ok_or_else(|| Inconsistent(format!("paid order {order_id} has no debit")))?;
            let entry = seen.debit.filter(|e| e.id == entry_id).ok_or_else(|| {
                Inconsistent(format!("debit entry {entry_id} of {order_id} not found"))
            })?;
            Ok(Decision::Replay(Output::Movement {
                order: order.clone(),
                entry: entry.clone(),
                replayed: true,
            }))
        }
        OrderStatus::Prepare => {
            let balance = seen
                .balance
                .ok_or_else(|| Inconsistent(format!("account of order {order_id} not found")))?;
            Ok(charge(order, balance, now))
        }
    }
}

/// A PREPARE order against its account's balance: paid, or FAILED for want of
/// funds (never a negative balance).
fn charge(order: &Order, balance: Money, now: i64) -> Decision {
    let Some(balance_after) = balance
        .checked_sub(order.amount)
        .filter(|b| !b.is_negative())
    else {
        return Decision::Apply(Effect::Decline(Order {
            status: OrderStatus::Failed,
            failure_reason: Some(FAILURE_INSUFFICIENT_FUNDS.into()),
            updated_at: now,
            ..order.clone()
        }));
    };
    Decision::Apply(Effect::Charge(Movement {
        before: order.clone(),
        after: Order {
            status: OrderStatus::Paid,
            updated_at: now,
            ..order.clone()
        },
        entry: NewEntry {
            order_id: order.id.clone(),
            account_id: order.account_id.clone(),
            kind: EntryKind::Debit,
            amount: order.amount,
            balance_after,
            refund_id: None,
            created_at: now,
        },
        balance_before: balance,
    }))
}

pub(super) fn refund(
    order_id: &OrderId,
    refund_id: &RefundId,
    amount: Money,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Decision, Inconsistent> {
    let Some(order) = seen.order else {
        return Ok(Decision::Reject(Rejection::OrderNotFound));
    };
    if let Some(existing) = seen.refund {
        // A refund id belongs to one order and one amount, forever.
        return Ok(
            if existing.order_id == *order_id && existing.amount == amount {
                Decision::Replay(Output::Movement {
                    order: order.clone(),
                    entry: existing.clone(),
                    replayed: true,
                })
            } else {
                Decision::Reject(Rejection::RefundExists)
            },
        );
    }
    match order.status {
        OrderStatus::Prepare | OrderStatus::Failed => {
            return Ok(Decision::Reject(Rejection::OrderNotPaid))
        }
        OrderStatus::Refunded => return Ok(Decision::Reject(Rejection::RefundExceedsPaid)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded => {}
    }
    let refunded = match order.refunded.checked_add(amount) {
        Some(r) if r <= order.amount => r,
        _ => return Ok(Decision::Reject(Rejection::RefundExceedsPaid)),
    };
    let balance = seen
        .balance
        .ok_or_else(|| Inconsistent(format!("account of order {order_id} not found")))?;
    let Some(balance_after) = balance.checked_add(amount) else {
        // Refunds never exceed what was charged, so only a balance edited by
        // hand gets here: refuse (HTTP 500) rather than wrap or saturate.
        return Ok(Decision::Reject(Rejection::Refused(
            "the refund would overflow the balance".into(),
        )));
    };
    let status = if refunded == order.amount {
        OrderStatus::Refunded
    } else {
        OrderStatus::PartiallyRefunded
    };
    Ok(Decision::Apply(Effect::Refund(Movement {
        before: order.clone(),
        after: Order {
            status,
            refunded,
            updated_at: now,
            ..order.clone()
        },
        entry: NewEntry {
            order_id: order.id.clone(),
            account_id: order.account_id.clone(),
            kind: EntryKind::Refund,
            amount,
            balance_after,
            refund_id: Some(refund_id.clone()),
            created_at: now,
        },
        balance_before: balance,
    })))
}
