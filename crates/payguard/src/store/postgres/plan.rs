//! A batch's state in memory, and its decisions, before any write.
//!
//! A batch reads and locks its rows once; then each command is decided by the
//! money rules against the state the commands before it left (so several orders
//! on one account are charged in batch order, and an overdraft fails only the
//! order that would cause it), and its effect recorded here. [`super::writes`]
//! then writes the whole plan with a few set-based statements.

use super::error::Fault;
use crate::domain::{
    Account, AccountId, Entry, EntryKind, EventDraft, Money, Order, OrderId, RefundId,
};
use crate::store::rules::{self, Decision, Effect, IdemRecord, Movement, Seen};
use crate::store::{Command, Op, OpResult, Rejection};
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
    /// The held sum of the row before the batch's update (0 if new).
    pub(super) base_held: Money,
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
    /// Debit (and capture) entries by id, read or written by this batch.
    pub(super) debits: HashMap<i64, Entry>,
    /// Hold entries by order, read or written by this batch.
    pub(super) holds: HashMap<OrderId, Entry>,
    /// Release entries by order, read or written by this batch.
    pub(super) releases: HashMap<OrderId, Entry>,
    /// Entries this batch writes, in batch order; entry `i` carries the
    /// placeholder id `-(i + 1)` until the insert assigns the real one.
    pub(super) new_entries: Vec<Entry>,
    /// Events this batch writes, in batch order, with placeholder entry ids.
    pub(super) new_events: Vec<EventDraft>,
    pub(super) new_accounts: Vec<AccountId>,
    pub(super) new_orders: Vec<OrderId>,
    /// Per order: the highest fencing token seen (read from the row, then raised
    /// by this batch's fenced ops). Written back with the batch.
    pub(super) fences: HashMap<OrderId, i64>,
    /// The records of the batch's keyed commands, by (scope, key), as they
    /// stood before the batch (read for keyed commands only).
    pub(super) keys: HashMap<(String, String), IdemRecord>,
}

pub(super) fn placeholder(index: usize) -> i64 {
    -(index as i64) - 1
}

impl Plan {
    /// One command against the batch's state as it stands after the commands
    /// before it: the rules decide ([`rules::decide`], the same as SQLite's), and
    /// the plan records the effect in memory for [`super::writes`] to write.
    pub(super) fn decide(&mut self, cmd: &Command, now: i64) -> Result<OpResult, Fault> {
        let verdict =
            rules::decide(cmd, &self.seen(cmd), now).map_err(|e| Fault::Store(e.to_string()))?;
        if let (Some(token), Some(order)) = (verdict.fence, cmd.order_id()) {
            self.fences.insert(order.clone(), token);
        }
        match verdict.decision {
            Decision::Reject(Rejection::StaleFencingToken) => {
                tracing::warn!(
                    event = "stale_fencing_token",
                    oid = cmd.order_id().map(OrderId::as_str).unwrap_or(""),
                    token = cmd.fence.unwrap_or(0)
                );
                Ok(Err(Rejection::StaleFencingToken))
            }
            Decision::Reject(r) => Ok(Err(r)),
            Decision::Replay(out) => Ok(Ok(out)),
            Decision::Apply(effect) => self.record(&effect, now),
        }
    }

    /// What the committed state answers `cmd` without a write
    /// ([`rules::settled`]), for a plan that was read and will not be written.
    /// State the rules find inconsistent is no answer here: the command goes on
    /// to the write path, which fails its batch and says why.
    pub(super) fn settled(&self, cmd: &Command, now: i64) -> Option<OpResult> {
        rules::settled(cmd, &self.seen(cmd), now).unwrap_or(None)
    }

    /// What the rules need for `cmd`, from the batch's state (see [`Seen`]).
    fn seen(&self, cmd: &Command) -> Seen<'_> {
        let order = cmd
            .order_id()
            .and_then(|id| self.orders.get(id))
            .map(OrderSlot::current);
        let account = order.and_then(|o| self.accounts.get(&o.account_id));
        let balance = account.map(|a| a.current.balance);
        let held = account.map(|a| a.current.held);
        let mut seen = Seen {
            order,
            fence: cmd
                .order_id()
                .and_then(|id| self.fences.get(id))
                .copied()
                .unwrap_or(0),
            key: cmd
                .idempotency
                .as_ref()
                .and_then(|i| self.keys.get(&(i.scope.clone(), i.key.clone()))),
            ..Seen::default()
        };
        match &cmd.op {
            Op::CreateAccount { id, .. } => {
                seen.account = self.accounts.get(id).map(|a| &a.current)
            }
            Op::CreateOrder { account_id, .. } => {
                seen.account_exists = self.accounts.contains_key(account_id)
            }
            Op::Deduct { .. } | Op::Capture { .. } => {
                seen.balance = balance;
                seen.held = held;
                seen.debit = order
                    .and_then(|o| o.debit_entry_id)
                    .and_then(|id| self.debits.get(&id));
            }
            Op::Refund { refund_id, .. } => {
                seen.balance = balance;
                seen.held = held;
                seen.refund = self.refunds.get(refund_id);
            }
            Op::Authorize { order_id, .. } | Op::Void { order_id } | Op::Expire { order_id } => {
                seen.balance = balance;
                seen.held = held;
                seen.hold = self.holds.get(order_id);
                seen.release = self.releases.get(order_id);
            }
        }
        seen
    }

    /// Records `effect` in the batch's state (new rows, the order's next state,
    /// the account's balance); returns the command's answer, whose new entry
    /// carries a placeholder id until the batch is written.
    fn record(&mut self, effect: &Effect, now: i64) -> Result<OpResult, Fault> {
        let entry_id = placeholder(self.new_entries.len());
        match effect {
            Effect::OpenAccount(account) => {
                self.accounts.insert(
                    account.id.clone(),
                    AccountSlot {
                        base_balance: account.balance,
                        base_held: account.held,
                        current: account.clone(),
                        created: true,
                        changed: false,
                    },
                );
                self.new_accounts.push(account.id.clone());
            }
            Effect::PlaceOrder(order) => {
                self.orders.insert(
                    order.id.clone(),
                    OrderSlot {
                        base: order.clone(),
                        created: true,
                        states: Vec::new(),
                    },
                );
                self.new_orders.push(order.id.clone());
            }
            Effect::Decline(failed) => self.slot(&failed.id)?.states.push(failed.clone()),
            Effect::Charge(m)
            | Effect::Refund(m)
            | Effect::Hold(m)
            | Effect::Capture(m)
            | Effect::Release(m)
            | Effect::Lapse(m) => self.record_movement(m, entry_id, now)?,
        }
        if let Some(event) = effect.event(entry_id) {
            self.new_events.push(event);
        }
        Ok(effect.answer(entry_id))
    }

    fn record_movement(&mut self, m: &Movement, entry_id: i64, now: i64) -> Result<(), Fault> {
        let (order, entry) = m.settle(entry_id);
        let account = self
            .accounts
            .get_mut(&entry.account_id)
            .ok_or_else(|| Fault::Store(format!("account of order {} not found", order.id)))?;
        // Pair assertion: the movement was decided from this very balance and
        // held sum.
        if account.current.balance != m.balance_before || account.current.held != m.held_before {
            return Err(Fault::Store(format!(
                "balance of {} moved under the plan",
                entry.account_id
            )));
        }
        account.current.balance = entry.balance_after;
        account.current.held = m.held_after;
        account.current.updated_at = now;
        account.changed = true;
        match (&entry.kind, &entry.refund_id) {
            (EntryKind::Refund, Some(rid)) => {
                self.refunds.insert(rid.clone(), entry.clone());
            }
            (EntryKind::Hold, _) => {
                self.holds.insert(order.id.clone(), entry.clone());
            }
            (EntryKind::Release, _) => {
                self.releases.insert(order.id.clone(), entry.clone());
            }
            _ => {
                self.debits.insert(entry_id, entry.clone());
            }
        }
        self.new_entries.push(entry);
        if let Some(rest) = &m.rest {
            // A partial capture's release of the rest: the next placeholder.
            let rest = rest.with_id(placeholder(self.new_entries.len()));
            self.releases.insert(order.id.clone(), rest.clone());
            self.new_entries.push(rest);
        }
        self.slot(&order.id)?.states.push(order);
        Ok(())
    }

    fn slot(&mut self, id: &OrderId) -> Result<&mut OrderSlot, Fault> {
        self.orders
            .get_mut(id)
            .ok_or_else(|| Fault::Store(format!("order {id} decided but not read")))
    }
}
