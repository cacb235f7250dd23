//! A batch's decisions, in memory, before any write.

use super::error::Fault;
use crate::domain::{
    Account, AccountId, Currency, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
};
use crate::store::{Command, Op, OpResult, Output, Rejection};
use std::collections::HashMap;

/// An order as this batch sees it: its row before the batch (`base`, or the row
/// the batch inserts) and each state it passes through, in batch order.
pub(super) struct OrderSlot {
    pub(super) base: Order,
    pub(super) created: bool,
    pub(super) states: Vec<Order>,
}

impl OrderSlot {
    pub(super) fn current(&self) -> &Order {
        self.states.last().unwrap_or(&self.base)
    }
}

/// An account as this batch sees it.
pub(super) struct AccountSlot {
    /// The balance of the row before the batch's update (opening balance if new).
    pub(super) base_balance: Money,
    pub(super) current: Account,
    pub(super) created: bool,
    pub(super) changed: bool,
}

/// Everything one pass knows and decides, before any write.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) orders: HashMap<OrderId, OrderSlot>,
    pub(super) accounts: HashMap<AccountId, AccountSlot>,
    /// Refund entries by refund id, read or written by this batch.
    pub(super) refunds: HashMap<RefundId, Entry>,
    /// Debit entries by id, read or written by this batch.
    pub(super) debits: HashMap<i64, Entry>,
    /// Entries this batch writes, in batch order; entry `i` carries the
    /// placeholder id `-(i + 1)` until the insert assigns the real one.
    pub(super) new_entries: Vec<Entry>,
    pub(super) new_accounts: Vec<AccountId>,
    pub(super) new_orders: Vec<OrderId>,
    /// Per order: the highest fencing token seen (read from the row, then raised
    /// by this batch's fenced ops). Written back with the batch.
    pub(super) fences: HashMap<OrderId, i64>,
}

pub(super) fn placeholder(index: usize) -> i64 {
    -(index as i64) - 1
}

impl Plan {
    /// One command, exactly as the SQLite store decides it, against the batch's state.
    pub(super) fn decide(&mut self, cmd: &Command, now: i64) -> Result<OpResult, Fault> {
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
