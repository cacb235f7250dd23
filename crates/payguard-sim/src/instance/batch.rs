//! One lane batch under the Redis locks of its orders: the engine's
//! `fenced_apply`, under either lock protocol.
//!
//! `JoinAll` is `fenced_apply` as it was before issue #12: `join_all` of one
//! waiting `acquire` per order, the write, then each lock released in turn; an
//! order still busy at the wait limit is answered `LockBusy`. `AcquireMany` is
//! issue #12's: one `ACQUIRE_MANY`, the granted orders written at once, one
//! `RELEASE_MANY`, and the busy orders handed back to the lane to park. In both,
//! an order whose lock could not be had because Redis is unreachable is written
//! without a token, and the writer may stall past the TTL before writing.

use super::locks::LockError;
use super::Node;
use crate::config::{LockProtocol, STALL_MS_MAX, STALL_MS_MIN};
use crate::oracle::Oracle;
use crate::wire::{DbReq, DbResp};
use payguard::domain::{AccountId, Entry, EntryKind, Money, Order, OrderId, OrderStatus};
use payguard::store::{Command, OpResult, Output, Rejection, StoreError};
use rand::Rng;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// An order that found its lock held elsewhere: the lane parks it.
#[derive(Debug, Clone)]
pub(super) struct Park {
    pub order: String,
    /// The holder's remaining lease.
    pub pttl_ms: u64,
    /// When the `ACQUIRE_MANY` that found it busy was sent.
    pub acquire_sent_ms: u64,
}

/// What a batch came to: one result per op, in order (a parked order's is a
/// placeholder the lane does not deliver), and the orders to park.
pub(super) struct BatchOutcome {
    pub results: Result<Vec<OpResult>, StoreError>,
    pub parked: Vec<Park>,
}

/// Tells the oracle a batch is in flight, until it ends or its host crashes.
struct InBatch {
    oracle: Rc<RefCell<Oracle>>,
    inst: usize,
    orders: usize,
}

impl Drop for InBatch {
    fn drop(&mut self) {
        self.oracle.borrow_mut().batch_ended(self.inst, self.orders);
    }
}

/// Runs one batch of deducts (each of a different order: single flight).
pub(super) async fn run(node: Rc<Node>, ops: Vec<Command>) -> BatchOutcome {
    let inst = &node.inst;
    let orders: Vec<String> = ops
        .iter()
        .map(|op| {
            op.order_id()
                .expect("the simulation only deducts")
                .as_str()
                .to_owned()
        })
        .collect();
    inst.oracle
        .borrow_mut()
        .batch_started(inst.index, orders.len());
    let _in_batch = InBatch {
        oracle: inst.oracle.clone(),
        inst: inst.index,
        orders: orders.len(),
    };
    inst.note(|| format!("batch {orders:?}"));
    match inst.protocol.lock {
        LockProtocol::JoinAll => join_all(&node, &orders).await,
        LockProtocol::AcquireMany => acquire_many(&node, &orders).await,
    }
}

/// `fenced_apply` before issue #12.
async fn join_all(node: &Node, orders: &[String]) -> BatchOutcome {
    let inst = &node.inst;
    let grants = futures::future::join_all(orders.iter().map(|o| inst.acquire(o))).await;
    let mut items = Vec::new();
    let mut leases = Vec::new();
    for (order, grant) in orders.iter().zip(grants) {
        match grant {
            Ok(lease) => {
                items.push((order.clone(), Some(lease.token)));
                leases.push(lease);
            }
            Err(LockError::Busy) => inst.note(|| format!("{order}: lock busy past the wait")),
            Err(e @ (LockError::Unavailable | LockError::Epoch)) => {
                inst.note(|| format!("{order}: lock {e:?}, writing without a token"));
                items.push((order.clone(), None));
            }
        }
    }
    let written = write(node, &items).await;
    for lease in leases {
        inst.release(lease).await;
    }
    BatchOutcome {
        results: results(orders, &items, written),
        parked: Vec::new(),
    }
}

/// `fenced_apply` after issue #12.
async fn acquire_many(node: &Node, orders: &[String]) -> BatchOutcome {
    let inst = &node.inst;
    let (items, owner, parked) = match inst.acquire_many(orders).await {
        Ok(grants) => {
            inst.oracle.borrow_mut().stats.parked += grants.busy.len() as u64;
            let parked = grants
                .busy
                .into_iter()
                .map(|(order, pttl_ms)| Park {
                    order,
                    pttl_ms,
                    acquire_sent_ms: grants.sent_ms,
                })
                .collect();
            let items: Vec<(String, Option<i64>)> = grants
                .granted
                .into_iter()
                .map(|(order, tok)| (order, Some(tok)))
                .collect();
            (items, Some(grants.owner), parked)
        }
        Err(e) => {
            inst.note(|| format!("{orders:?}: locks {e:?}, writing without tokens"));
            let items = orders.iter().map(|o| (o.clone(), None)).collect();
            (items, None, Vec::new())
        }
    };
    let written = write(node, &items).await;
    if let Some(owner) = owner {
        let mine = items.iter().map(|(o, _)| o.clone()).collect();
        inst.release_many(&owner, mine).await;
    }
    BatchOutcome {
        results: results(orders, &items, written),
        parked,
    }
}

/// The failpoint of scenario 3, at random: a stall longer than the TTL.
async fn maybe_stall(node: &Node) {
    let inst = &node.inst;
    let stall = {
        let mut rng = inst.rng.borrow_mut();
        rng.random_ratio(inst.stall_percent, 100)
            .then(|| rng.random_range(STALL_MS_MIN..=STALL_MS_MAX))
    };
    if let Some(ms) = stall {
        inst.oracle.borrow_mut().stats.stalls += 1;
        inst.note(|| format!("stalls {ms} ms"));
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The database's answers for a batch's ops, or nothing in time.
async fn db_batch(node: &Node, ops: Vec<DbReq>) -> Option<Vec<DbResp>> {
    if ops.is_empty() {
        return Some(Vec::new());
    }
    let n = ops.len();
    match node.inst.db(DbReq::Batch(ops)).await {
        Ok(DbResp::Batch(answers)) if answers.len() == n => Some(answers),
        _ => None,
    }
}

/// The write under the locks: payguard's fenced transaction for the batch, or
/// (without the database's unique debit) a fenced read, then unconditional
/// debits for the orders it found unpaid.
async fn write(node: &Node, items: &[(String, Option<i64>)]) -> Option<Vec<DbResp>> {
    if items.is_empty() {
        return Some(Vec::new());
    }
    let op = |make: fn(String, Option<i64>) -> DbReq| {
        move |(order, token): &(String, Option<i64>)| make(order.clone(), *token)
    };
    if node.inst.protocol.db_unique_debit {
        maybe_stall(node).await;
        let deducts = items
            .iter()
            .map(op(|order, token| DbReq::Deduct { order, token }));
        return db_batch(node, deducts.collect()).await;
    }
    let reads = items
        .iter()
        .map(op(|order, token| DbReq::Read { order, token }));
    let mut answers = db_batch(node, reads.collect()).await?;
    let unpaid: Vec<usize> = (0..items.len())
        .filter(|&i| answers[i] == DbResp::Prepare)
        .collect();
    if unpaid.is_empty() {
        return Some(answers);
    }
    maybe_stall(node).await;
    let debits = unpaid.iter().map(|&i| {
        let (order, token) = items[i].clone();
        DbReq::Debit { order, token }
    });
    let debited = db_batch(node, debits.collect()).await?;
    for (i, answer) in unpaid.into_iter().zip(debited) {
        answers[i] = answer;
    }
    Some(answers)
}

/// One result per order of the batch: the database's answer for a written
/// order, `LockBusy` for one that was not (busy: answered or parked by the lane).
/// No answer from the database fails the whole batch, as in the engine.
fn results(
    orders: &[String],
    items: &[(String, Option<i64>)],
    written: Option<Vec<DbResp>>,
) -> Result<Vec<OpResult>, StoreError> {
    let written =
        written.ok_or_else(|| StoreError::Unknown("the database did not answer in time".into()))?;
    Ok(orders
        .iter()
        .map(|order| match items.iter().position(|(o, _)| o == order) {
            Some(i) => op_result(order, &written[i]),
            None => Err(Rejection::LockBusy),
        })
        .collect())
}

/// The database's answer to one deduct, as the store would return it.
fn op_result(order: &str, answer: &DbResp) -> OpResult {
    match answer {
        DbResp::Charged { entry } => Ok(movement(order, *entry, false)),
        DbResp::Replayed { entry } => Ok(movement(order, *entry, true)),
        DbResp::InsufficientFunds => Err(Rejection::InsufficientFunds),
        DbResp::StaleFencingToken => Err(Rejection::StaleFencingToken),
        DbResp::NoSuchOrder => Err(Rejection::OrderNotFound),
        DbResp::Epoch(_) | DbResp::Prepare | DbResp::Batch(_) => {
            panic!("{order}: {answer:?} is not an answer to a deduct")
        }
    }
}

/// A debit as payguard's store reports it. Only the entry id and `replayed` are
/// read back ([`super::lane`]); the rest is filler the simulated database does
/// not keep.
fn movement(order: &str, entry: u64, replayed: bool) -> Output {
    let order_id = OrderId::parse(order).expect("order ids are well formed");
    let account_id = AccountId::parse("sim").expect("well formed");
    let entry = entry as i64;
    Output::Movement {
        order: Order {
            id: order_id.clone(),
            account_id: account_id.clone(),
            amount: Money::ZERO,
            status: OrderStatus::Paid,
            refunded: Money::ZERO,
            debit_entry_id: Some(entry),
            failure_reason: None,
            captured: None,
            held: Money::ZERO,
            hold_expires_at: None,
            created_at: 0,
            updated_at: 0,
        },
        entry: Entry {
            id: entry,
            order_id,
            account_id,
            kind: EntryKind::Debit,
            amount: Money::ZERO,
            balance_after: Money::ZERO,
            refund_id: None,
            reverses: None,
            created_at: 0,
        },
        replayed,
    }
}
