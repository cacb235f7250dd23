//! What a batch reads before it decides: every row it touches, locked; and the
//! same reads unlocked, in one read-only snapshot, for the commands the committed
//! state already settles ([`settled`]).

use super::error::{corrupt, Fault};
use super::idempotency::{record_from_row, RECORD_COLS};
use super::plan::{AccountSlot, OrderSlot, Plan};
use super::rows::{
    account_from_row, entry_from_row, order_from_row, ACCOUNT_COLS, ENTRY_COLS, ORDER_COLS,
};
use crate::domain::{AccountId, Entry, EntryKind, OrderId, RefundId};
use crate::store::{Command, Op};
use std::collections::{BTreeSet, HashMap};

/// The ids one batch reads, each set sorted (the global lock order is id order).
#[derive(Default)]
struct Wanted<'a> {
    orders: BTreeSet<&'a str>,
    accounts: BTreeSet<&'a str>,
    refunds: BTreeSet<&'a str>,
    /// Orders the batch deducts or captures: their debit (capture) entries
    /// answer replays.
    deducts: BTreeSet<&'a str>,
    /// Orders the batch authorizes, voids or expires: their hold and release
    /// entries answer replays.
    holds: BTreeSet<&'a str>,
}

impl<'a> Wanted<'a> {
    fn of(cmds: &'a [Command]) -> Self {
        let mut w = Wanted::default();
        for cmd in cmds {
            match &cmd.op {
                Op::CreateAccount { id, .. } => {
                    w.accounts.insert(id.as_str());
                }
                Op::CreateOrder { id, account_id, .. } => {
                    w.orders.insert(id.as_str());
                    w.accounts.insert(account_id.as_str());
                }
                Op::Deduct { order_id } | Op::Capture { order_id, .. } => {
                    w.orders.insert(order_id.as_str());
                    w.deducts.insert(order_id.as_str());
                }
                Op::Authorize { order_id, .. }
                | Op::Void { order_id }
                | Op::Expire { order_id } => {
                    w.orders.insert(order_id.as_str());
                    w.holds.insert(order_id.as_str());
                }
                Op::Refund {
                    order_id,
                    refund_id,
                    ..
                } => {
                    w.orders.insert(order_id.as_str());
                    w.refunds.insert(refund_id.as_str());
                }
            }
        }
        w
    }
}

/// Whether a batch's reads lock the rows they read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RowLocks {
    /// `FOR UPDATE`: the batch will write what it decides from them.
    ForUpdate,
    /// Plain reads: nothing will be written ([`settled`]).
    None,
}

impl RowLocks {
    fn clause(self) -> &'static str {
        match self {
            RowLocks::ForUpdate => " FOR UPDATE",
            RowLocks::None => "",
        }
    }
}

/// Reads (and with [`RowLocks::ForUpdate`] locks) every row the batch touches:
/// orders, then accounts, each in id order (the global lock order), then the
/// entries that replays return.
pub(super) async fn read_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    cmds: &[Command],
    plan: &mut Plan,
    locks: RowLocks,
) -> Result<(), Fault> {
    let mut wanted = Wanted::of(cmds);
    let holds = std::mem::take(&mut wanted.holds);
    let debit_ids = if wanted.orders.is_empty() {
        Vec::new()
    } else {
        lock_orders(tx, &wanted, plan, locks).await?
    };
    if cmds.iter().any(|c| c.fence.is_some()) && !plan.orders.is_empty() {
        read_fences(tx, plan).await?;
    }
    for slot in plan.orders.values() {
        wanted.accounts.insert(slot.base.account_id.as_str());
    }
    if !wanted.accounts.is_empty() {
        lock_accounts(tx, &wanted.accounts, &mut plan.accounts, locks).await?;
    }
    if !wanted.refunds.is_empty() || !debit_ids.is_empty() {
        read_entries(
            tx,
            &wanted.refunds,
            &debit_ids,
            &mut plan.refunds,
            &mut plan.debits,
        )
        .await?;
    }
    let two_phase: Vec<String> = holds
        .iter()
        .filter(|id| {
            OrderId::parse(id)
                .ok()
                .and_then(|id| plan.orders.get(&id))
                .is_some_and(|slot| slot.base.is_two_phase())
        })
        .map(|id| id.to_string())
        .collect();
    if !two_phase.is_empty() {
        read_hold_entries(tx, &two_phase, plan).await?;
    }
    if locks == RowLocks::ForUpdate && cmds.iter().any(|c| c.idempotency.is_some()) {
        // A keyed command's answer may already be stored ([`rules::answered`]);
        // a settled read answers no keyed command, so it needs none of them.
        //
        // [`rules::answered`]: crate::store::rules::answered
        lock_keys(tx, cmds, plan).await?;
    }
    Ok(())
}

/// Reads and locks (after the orders and accounts, in (scope, key) order) the
/// Idempotency-Key records of the batch's keyed commands: one statement, and
/// only when the batch has a keyed command. Locked, not only read: under READ
/// COMMITTED another transaction could complete the record (a rerun of the
/// same batch on another connection, or a request that took a lapsed lease)
/// between this read and this batch's commit, and this batch would decide a
/// command already answered. `FOR UPDATE` waits for that transaction and reads
/// what it committed. No lock cycle: the claim transaction locks a key's
/// record alone, and a batch takes the records last (and writes them anyway,
/// at the end, in `write_idempotency`).
async fn lock_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    cmds: &[Command],
    plan: &mut Plan,
) -> Result<(), Fault> {
    let wanted: BTreeSet<(&str, &str)> = cmds
        .iter()
        .filter_map(|c| c.idempotency.as_ref())
        .map(|i| (i.scope.as_str(), i.key.as_str()))
        .collect();
    let scopes: Vec<&str> = wanted.iter().map(|w| w.0).collect();
    let keys: Vec<&str> = wanted.iter().map(|w| w.1).collect();
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {RECORD_COLS}, i.scope, i.key FROM idempotency AS i
             JOIN unnest($1::text[], $2::text[]) AS t (sc, k) ON i.scope = t.sc AND i.key = t.k
             ORDER BY i.scope, i.key FOR UPDATE OF i"
        ))
        .await?;
    for row in tx.query(&stmt, &[&scopes, &keys]).await? {
        let record = record_from_row(&row)?;
        plan.keys.insert((row.try_get(7)?, row.try_get(8)?), record);
    }
    Ok(())
}

/// The hold and release entries of two-phase orders (replays of authorize,
/// void and expiry answer with them).
async fn read_hold_entries(
    tx: &deadpool_postgres::Transaction<'_>,
    order_ids: &[String],
    plan: &mut Plan,
) -> Result<(), Fault> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLS} FROM entries
             WHERE order_id = ANY($1::text[]) AND kind IN ('hold', 'release')"
        ))
        .await?;
    for row in tx.query(&stmt, &[&order_ids]).await? {
        let entry = entry_from_row(&row)?;
        let map = match entry.kind {
            EntryKind::Hold => &mut plan.holds,
            _ => &mut plan.releases,
        };
        map.insert(entry.order_id.clone(), entry);
    }
    Ok(())
}

/// Reads (and locks, in id order) the batch's orders; returns the debit entry
/// ids of the deducted ones that are paid.
async fn lock_orders(
    tx: &deadpool_postgres::Transaction<'_>,
    wanted: &Wanted<'_>,
    plan: &mut Plan,
    locks: RowLocks,
) -> Result<Vec<i64>, Fault> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ORDER_COLS} FROM orders WHERE id = ANY($1::text[]) ORDER BY id{}",
            locks.clause()
        ))
        .await?;
    let ids: Vec<&str> = wanted.orders.iter().copied().collect();
    let mut debit_ids = Vec::new();
    for row in tx.query(&stmt, &[&ids]).await? {
        let order = order_from_row(&row)?;
        if let (true, Some(debit)) = (
            wanted.deducts.contains(order.id.as_str()),
            order.debit_entry_id,
        ) {
            debit_ids.push(debit);
        }
        plan.orders.insert(
            order.id.clone(),
            OrderSlot {
                base: order,
                created: false,
                states: Vec::new(),
            },
        );
    }
    Ok(debit_ids)
}

/// The fence each of the (already locked) orders keeps.
async fn read_fences(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &mut Plan,
) -> Result<(), Fault> {
    let stmt = tx
        .prepare_cached("SELECT id, fence FROM orders WHERE id = ANY($1::text[])")
        .await?;
    let ids: Vec<&str> = plan.orders.keys().map(OrderId::as_str).collect();
    for row in tx.query(&stmt, &[&ids]).await? {
        let id: String = row.try_get(0)?;
        let fence: i64 = row.try_get(1)?;
        let id = OrderId::parse(&id).map_err(corrupt)?;
        plan.fences.insert(id, fence);
    }
    Ok(())
}

/// Reads (and locks, in id order) the batch's accounts, after its orders.
async fn lock_accounts(
    tx: &deadpool_postgres::Transaction<'_>,
    account_ids: &BTreeSet<&str>,
    accounts: &mut HashMap<AccountId, AccountSlot>,
    locks: RowLocks,
) -> Result<(), Fault> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1::text[]) ORDER BY id{}",
            locks.clause()
        ))
        .await?;
    let ids: Vec<&str> = account_ids.iter().copied().collect();
    for row in tx.query(&stmt, &[&ids]).await? {
        let account = account_from_row(&row)?;
        accounts.insert(
            account.id.clone(),
            AccountSlot {
                base_balance: account.balance,
                base_held: account.held,
                current: account,
                created: false,
                changed: false,
            },
        );
    }
    Ok(())
}

/// The entries replays answer with: refunds by refund id, debits by id.
async fn read_entries(
    tx: &deadpool_postgres::Transaction<'_>,
    refund_ids: &BTreeSet<&str>,
    debit_ids: &[i64],
    refunds: &mut HashMap<RefundId, Entry>,
    debits: &mut HashMap<i64, Entry>,
) -> Result<(), Fault> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLS} FROM entries
             WHERE refund_id = ANY($1::text[]) OR id = ANY($2::int8[])"
        ))
        .await?;
    let ids: Vec<&str> = refund_ids.iter().copied().collect();
    for row in tx.query(&stmt, &[&ids, &debit_ids]).await? {
        let entry = entry_from_row(&row)?;
        match (&entry.kind, &entry.refund_id) {
            (EntryKind::Refund, Some(rid)) => {
                refunds.insert(rid.clone(), entry);
            }
            (EntryKind::Debit | EntryKind::Capture, _) => {
                debits.insert(entry.id, entry);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The commands the committed state settles, answered from one read-only
/// REPEATABLE READ snapshot without locking a row ([`rules::settled`]); `None`
/// for each command that must run as a write.
///
/// [`rules::settled`]: crate::store::rules::settled
pub(super) async fn settled(
    client: &mut deadpool_postgres::ClientWrapper,
    cmds: &[Command],
    now: i64,
) -> Result<Vec<Option<crate::store::OpResult>>, Fault> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut plan = Plan::default();
    read_batch(&tx, cmds, &mut plan, RowLocks::None).await?;
    let answers = cmds.iter().map(|cmd| plan.settled(cmd, now)).collect();
    tx.commit().await?;
    Ok(answers)
}
