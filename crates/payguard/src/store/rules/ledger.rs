//! The rules of each op: accounts, orders, charges, refunds, holds, fences.

use super::{Decision, Effect, Inconsistent, Movement, NewEntry, Seen};
use crate::domain::{
    Account, AccountId, Currency, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
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
            held: Money::ZERO,
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
            captured: None,
            held: Money::ZERO,
            hold_expires_at: None,
            created_at: now,
            updated_at: now,
        })),
    }
}

/// The account state a movement on `order` starts from: its balance and held sum.
fn funds(order: &Order, seen: &Seen<'_>) -> Result<(Money, Money), Inconsistent> {
    let missing = || Inconsistent(format!("account of order {} not found", order.id));
    Ok((
        seen.balance.ok_or_else(missing)?,
        seen.held.ok_or_else(missing)?,
    ))
}

/// What `balance` and `held` leave to spend; the store never holds a row where
/// it is negative.
fn available(order: &Order, balance: Money, held: Money) -> Result<Money, Inconsistent> {
    balance
        .checked_sub(held)
        .filter(|a| !a.is_negative())
        .ok_or_else(|| {
            Inconsistent(format!(
                "account {} holds {held} of a balance of {balance}",
                order.account_id
            ))
        })
}

/// The entry a replay answers with, which the state says must exist.
fn replayed(order: &Order, entry: Option<&Entry>, what: &str) -> Result<Decision, Inconsistent> {
    let entry =
        entry.ok_or_else(|| Inconsistent(format!("{what} entry of {} not found", order.id)))?;
    Ok(Decision::Replay(Output::Movement {
        order: order.clone(),
        entry: entry.clone(),
        replayed: true,
    }))
}

/// The order's status declined for want of funds (terminal).
fn decline(order: &Order, now: i64) -> Decision {
    Decision::Apply(Effect::Decline(Order {
        status: OrderStatus::Failed,
        failure_reason: Some(FAILURE_INSUFFICIENT_FUNDS.into()),
        updated_at: now,
        ..order.clone()
    }))
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
        // The two paths never mix: a held or captured order is not deducted.
        _ if order.is_two_phase() => Ok(Decision::Reject(Rejection::OrderAuthorized)),
        OrderStatus::Authorized | OrderStatus::Voided | OrderStatus::Expired => Err(Inconsistent(
            format!("two-phase order {order_id} has no hold_expires_at"),
        )),
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
            let (balance, held) = funds(order, seen)?;
            charge(order, balance, held, now)
        }
    }
}

/// A PREPARE order against its account's available funds: paid, or FAILED for
/// want of them (held money is never spent, a balance never negative).
fn charge(order: &Order, balance: Money, held: Money, now: i64) -> Result<Decision, Inconsistent> {
    if available(order, balance, held)? < order.amount {
        return Ok(decline(order, now));
    }
    let balance_after = Money::from_stored(balance.minor() - order.amount.minor());
    Ok(Decision::Apply(Effect::Charge(Movement {
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
        rest: None,
        balance_before: balance,
        held_before: held,
        held_after: held,
    })))
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
        OrderStatus::Prepare
        | OrderStatus::Failed
        | OrderStatus::Authorized
        | OrderStatus::Voided
        | OrderStatus::Expired => return Ok(Decision::Reject(Rejection::OrderNotPaid)),
        OrderStatus::Refunded => return Ok(Decision::Reject(Rejection::RefundExceedsPaid)),
        OrderStatus::Paid | OrderStatus::PartiallyRefunded => {}
    }
    // Bounded by what was taken: the amount, or what a capture took of it.
    let refundable = order.refundable();
    let refunded = match order.refunded.checked_add(amount) {
        Some(r) if r <= refundable => r,
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
    let held = seen
        .held
        .ok_or_else(|| Inconsistent(format!("account of order {order_id} not found")))?;
    let status = if refunded == refundable {
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
        rest: None,
        balance_before: balance,
        held_before: held,
        held_after: held,
    })))
}

/// A ledger line of `kind` for `order` that leaves the balance at `balance_after`.
fn line(order: &Order, kind: EntryKind, amount: Money, balance_after: Money, now: i64) -> NewEntry {
    NewEntry {
        order_id: order.id.clone(),
        account_id: order.account_id.clone(),
        kind,
        amount,
        balance_after,
        refund_id: None,
        created_at: now,
    }
}

/// Whether the hold of an AUTHORIZED order has expired at `now`: time decides,
/// whether or not the sweeper has written the release yet.
fn hold_expired(order: &Order, now: i64) -> bool {
    order.hold_expires_at.is_some_and(|at| now >= at)
}

/// Two-phase, step one: PREPARE → AUTHORIZED, the amount held on the account
/// until `now + hold_ttl_ms`; not enough available: FAILED, as a deduct. Every
/// repeat, whatever its TTL, replays the first hold (the order as it is now).
pub(super) fn authorize(
    order_id: &OrderId,
    hold_ttl_ms: i64,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Decision, Inconsistent> {
    let Some(order) = seen.order else {
        return Ok(Decision::Reject(Rejection::OrderNotFound));
    };
    match order.status {
        OrderStatus::Failed => Ok(Decision::Reject(Rejection::InsufficientFunds)),
        _ if order.is_two_phase() => replayed(order, seen.hold, "hold"),
        // Paid in one step: the paths never mix.
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            Ok(Decision::Reject(Rejection::OrderNotAuthorized))
        }
        OrderStatus::Authorized | OrderStatus::Voided | OrderStatus::Expired => Err(Inconsistent(
            format!("two-phase order {order_id} has no hold_expires_at"),
        )),
        OrderStatus::Prepare => {
            let (balance, held) = funds(order, seen)?;
            if available(order, balance, held)? < order.amount {
                return Ok(decline(order, now));
            }
            let held_after = held.checked_add(order.amount).ok_or_else(|| {
                Inconsistent(format!("held sum of {} overflows", order.account_id))
            })?;
            Ok(Decision::Apply(Effect::Hold(Movement {
                before: order.clone(),
                after: Order {
                    status: OrderStatus::Authorized,
                    held: order.amount,
                    hold_expires_at: Some(now.saturating_add(hold_ttl_ms)),
                    updated_at: now,
                    ..order.clone()
                },
                entry: line(order, EntryKind::Hold, order.amount, balance, now),
                rest: None,
                balance_before: balance,
                held_before: held,
                held_after,
            })))
        }
    }
}

/// The refusal that names what already ended a hold (capture, void, expiry),
/// for a two-phase order no longer AUTHORIZED.
fn ended_by(order: &Order) -> Rejection {
    match order.status {
        OrderStatus::Voided => Rejection::HoldVoided,
        OrderStatus::Expired => Rejection::HoldExpired,
        _ => Rejection::HoldAlreadyCaptured,
    }
}

/// Two-phase, step two: take `amount` (default: the whole hold) out of the
/// balance, release the whole hold from `held` (a partial capture writes a
/// release of the rest), AUTHORIZED → PAID with `captured`. The same amount
/// again replays the capture; anything else names what ended the hold.
pub(super) fn capture(
    order_id: &OrderId,
    amount: Option<Money>,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Decision, Inconsistent> {
    let Some(order) = seen.order else {
        return Ok(Decision::Reject(Rejection::OrderNotFound));
    };
    if !order.is_two_phase() {
        return Ok(Decision::Reject(Rejection::OrderNotAuthorized));
    }
    // No amount and the whole hold are the same request.
    let n = amount.unwrap_or(order.amount);
    match order.status {
        OrderStatus::Authorized => {}
        OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded => {
            return if order.captured == Some(n) {
                replayed(order, seen.debit, "capture")
            } else {
                Ok(Decision::Reject(Rejection::HoldAlreadyCaptured))
            };
        }
        OrderStatus::Voided | OrderStatus::Expired => return Ok(Decision::Reject(ended_by(order))),
        OrderStatus::Prepare | OrderStatus::Failed => {
            return Err(Inconsistent(format!(
                "order {order_id} is {} with a hold expiry",
                order.status.as_str()
            )))
        }
    }
    if hold_expired(order, now) {
        return lapse(order, seen, now);
    }
    if n > order.held || n.minor() <= 0 {
        return Ok(Decision::Reject(Rejection::CaptureExceedsHold));
    }
    let (balance, held) = funds(order, seen)?;
    let bad = || Inconsistent(format!("account {} cannot take its hold", order.account_id));
    let balance_after = balance
        .checked_sub(n)
        .filter(|b| !b.is_negative())
        .ok_or_else(bad)?;
    let held_after = held
        .checked_sub(order.held)
        .filter(|h| !h.is_negative())
        .ok_or_else(bad)?;
    let left = Money::from_stored(order.held.minor() - n.minor());
    Ok(Decision::Apply(Effect::Capture(Movement {
        before: order.clone(),
        after: Order {
            status: OrderStatus::Paid,
            captured: Some(n),
            held: Money::ZERO,
            updated_at: now,
            ..order.clone()
        },
        entry: line(order, EntryKind::Capture, n, balance_after, now),
        rest: (left.minor() > 0)
            .then(|| Box::new(line(order, EntryKind::Release, left, balance_after, now))),
        balance_before: balance,
        held_before: held,
        held_after,
    })))
}

/// Who releases a hold without taking it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Release {
    /// The caller (`void`), before `hold_expires_at`.
    Void,
    /// The sweeper, at or after `hold_expires_at`.
    Expiry,
}

/// Releases the whole hold: AUTHORIZED → VOIDED (a void, before the expiry) or
/// EXPIRED (the sweeper, at or after it). The same release again replays;
/// anything else names what ended the hold.
pub(super) fn release(
    order_id: &OrderId,
    by: Release,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Decision, Inconsistent> {
    let Some(order) = seen.order else {
        return Ok(Decision::Reject(Rejection::OrderNotFound));
    };
    if !order.is_two_phase() {
        return Ok(Decision::Reject(Rejection::OrderNotAuthorized));
    }
    let target = match by {
        Release::Void => OrderStatus::Voided,
        Release::Expiry => OrderStatus::Expired,
    };
    match order.status {
        OrderStatus::Authorized => {}
        s if s == target => return replayed(order, seen.release, "release"),
        OrderStatus::Prepare | OrderStatus::Failed => {
            return Err(Inconsistent(format!(
                "order {order_id} is {} with a hold expiry",
                order.status.as_str()
            )))
        }
        _ => return Ok(Decision::Reject(ended_by(order))),
    }
    match (by, hold_expired(order, now)) {
        (Release::Void, true) => lapse(order, seen, now),
        (Release::Expiry, false) => Ok(Decision::Reject(Rejection::HoldNotExpired)),
        (Release::Void, false) | (Release::Expiry, true) => Ok(Decision::Apply(Effect::Release(
            release_all(order, target, seen, now)?,
        ))),
    }
}

/// A capture or void that found an open hold at or after its expiry: it writes
/// the expiry ([`Effect::Lapse`]) and is told `hold_expired`, so what it was told
/// is what the database says from then on, whatever another instance's clock.
fn lapse(order: &Order, seen: &Seen<'_>, now: i64) -> Result<Decision, Inconsistent> {
    Ok(Decision::Apply(Effect::Lapse(release_all(
        order,
        OrderStatus::Expired,
        seen,
        now,
    )?)))
}

/// The movement that releases an AUTHORIZED order's whole hold into `target`
/// (VOIDED or EXPIRED): a release entry, `held` down by the hold.
fn release_all(
    order: &Order,
    target: OrderStatus,
    seen: &Seen<'_>,
    now: i64,
) -> Result<Movement, Inconsistent> {
    let (balance, held) = funds(order, seen)?;
    let held_after = held
        .checked_sub(order.held)
        .filter(|h| !h.is_negative())
        .ok_or_else(|| Inconsistent(format!("account {} lacks its hold", order.account_id)))?;
    Ok(Movement {
        before: order.clone(),
        after: Order {
            status: target,
            held: Money::ZERO,
            updated_at: now,
            ..order.clone()
        },
        entry: line(order, EntryKind::Release, order.held, balance, now),
        rest: None,
        balance_before: balance,
        held_before: held,
        held_after,
    })
}
