//! The simulated database: orders with a `fence` column, one debit per order, a
//! fence-epoch sequence, balances that never go below zero.
//!
//! Why a model: the checks that make payguard safe are a handful of SQL
//! statements (`UPDATE orders SET fence = ?1 WHERE id = ?2 AND fence <= ?1`, the
//! unique debit per order, the `CHECK (balance >= 0)`, `nextval('fence_epochs')`),
//! and each request is one transaction; this host runs them one request at a
//! time, which is what serialisable transactions promise. The state outlives a
//! crash of the host (it is durable); only requests in flight are lost.

use crate::config::Protocol;
use crate::oracle::Oracle;
use crate::wire::{now_ms, DbReq, DbResp, Server, DB_PORT};
use payguard::lock::token;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

#[derive(Debug, Clone)]
pub struct Order {
    pub account: String,
    /// Minor units.
    pub amount: i64,
    /// The highest fencing token that wrote this order (0: none yet).
    pub fence: i64,
    /// The entry of the order's (first) debit; `Some` means PAID.
    pub paid_entry: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub opening: i64,
    pub balance: i64,
}

#[derive(Debug, Clone)]
pub struct Debit {
    pub entry: u64,
    pub order: String,
    pub account: String,
    pub amount: i64,
}

#[derive(Debug)]
pub struct DbState {
    pub protocol: Protocol,
    pub orders: BTreeMap<String, Order>,
    pub accounts: BTreeMap<String, Account>,
    /// The append-only ledger's debits.
    pub debits: Vec<Debit>,
    /// `fence_epochs`: the last value handed out; only grows.
    pub fence_epoch_seq: i64,
    pub oracle: Rc<RefCell<Oracle>>,
}

impl DbState {
    pub fn new(protocol: Protocol, oracle: Rc<RefCell<Oracle>>) -> Self {
        DbState {
            protocol,
            orders: BTreeMap::new(),
            accounts: BTreeMap::new(),
            debits: Vec::new(),
            fence_epoch_seq: 0,
            oracle,
        }
    }

    /// The fence step of a fenced transaction: advance the order's fence to
    /// `token`, or refuse a token lower than one that already wrote it.
    fn fence(&mut self, order: &str, token: Option<i64>, now: u64) -> Result<(), DbResp> {
        let fencing = self.protocol.fencing;
        let Some(o) = self.orders.get_mut(order) else {
            return Err(DbResp::NoSuchOrder);
        };
        if let Some(t) = token {
            if fencing {
                // UPDATE orders SET fence = t WHERE id = order AND fence <= t
                if o.fence > t {
                    let mut oracle = self.oracle.borrow_mut();
                    oracle.stats.stale_refused += 1;
                    let fence = o.fence;
                    oracle.note(now, || {
                        format!(
                            "db: {order} refuses token {:?}, fence {:?}: stale_fencing_token",
                            token::unpack(t),
                            token::unpack(fence)
                        )
                    });
                    return Err(DbResp::StaleFencingToken);
                }
                o.fence = t;
            }
        }
        self.oracle.borrow_mut().write_applied(order, token, now);
        Ok(())
    }

    /// Moves the money: one debit entry, the balance down, the order PAID. The
    /// `CHECK (balance >= 0)` refuses it when the account cannot pay.
    fn debit(&mut self, order: &str) -> DbResp {
        let o = self.orders.get(order).expect("fenced before").clone();
        let account = self
            .accounts
            .get_mut(&o.account)
            .expect("orders reference accounts");
        let Some(after) = account.balance.checked_sub(o.amount).filter(|b| *b >= 0) else {
            return DbResp::InsufficientFunds;
        };
        account.balance = after;
        let entry = self.debits.len() as u64 + 1;
        self.debits.push(Debit {
            entry,
            order: order.to_owned(),
            account: o.account.clone(),
            amount: o.amount,
        });
        let o = self.orders.get_mut(order).expect("fenced before");
        o.paid_entry.get_or_insert(entry);
        DbResp::Charged { entry }
    }

    /// One transaction: one op, or a batch whose ops are each answered on their
    /// own (as payguard's stores run a batch: a refused op rolls back to its
    /// savepoint, the others commit).
    pub fn exec(&mut self, req: &DbReq, now: u64) -> DbResp {
        match req {
            DbReq::Batch(ops) => {
                DbResp::Batch(ops.iter().map(|op| self.exec_op(op, now)).collect())
            }
            op => self.exec_op(op, now),
        }
    }

    fn exec_op(&mut self, req: &DbReq, now: u64) -> DbResp {
        let run = |db: &mut DbState| -> Result<DbResp, DbResp> {
            match req {
                DbReq::NextFenceEpoch => {
                    db.fence_epoch_seq += 1;
                    Ok(DbResp::Epoch(db.fence_epoch_seq))
                }
                DbReq::Deduct { order, token } | DbReq::Debit { order, token } => {
                    db.fence(order, *token, now)?;
                    let paid = db.orders[order.as_str()].paid_entry;
                    match paid {
                        // The unique index refuses a second debit; payguard answers a replay.
                        Some(entry) if db.protocol.db_unique_debit => {
                            Ok(DbResp::Replayed { entry })
                        }
                        _ => Ok(db.debit(order)),
                    }
                }
                DbReq::Read { order, token } => {
                    db.fence(order, *token, now)?;
                    Ok(match db.orders[order.as_str()].paid_entry {
                        Some(entry) => DbResp::Replayed { entry },
                        None => DbResp::Prepare,
                    })
                }
                DbReq::Batch(_) => panic!("a batch inside a batch"),
            }
        };
        let resp = run(self).unwrap_or_else(|refused| refused);
        self.oracle
            .borrow_mut()
            .note(now, || format!("db: {req:?} -> {resp:?}"));
        resp
    }
}

/// The database host's software. Its state survives a crash; the socket does not.
pub async fn serve(state: Rc<RefCell<DbState>>) -> turmoil::Result {
    let server = Server::bind(DB_PORT).await?;
    loop {
        let req = server.recv::<DbReq>().await?;
        let resp = state.borrow_mut().exec(&req.body, now_ms());
        server.reply(&req, resp).await;
    }
}
