//! The money rules, once: what a command does, given the state a store read.
//!
//! Why: payguard has two stores, and they used to decide twice, SQLite in its SQL
//! and PostgreSQL in Rust "exactly as the SQLite store decides it". Two copies of
//! a rule drift (they already had: a refund that would overflow a balance was
//! refused on one and left to SQL arithmetic on the other). Here every decision
//! is one pure function from the rows a store read (the order, its account's
//! balance, the debit or refund entry a replay answers with, the order's fence,
//! the Idempotency-Key record) and the command, to a [`Decision`]: reject, replay,
//! or an [`Effect`], the writes to make. Each store only reads and writes, in its
//! own dialect, and both answer exactly the same for the same state.
//!
//! What it guarantees: nothing here does I/O, reads a clock or keeps state, so a
//! rule can be tested without a database and the same inputs always give the same
//! decision. The database constraints remain the last guarantee underneath: an
//! effect that contradicts them (a layer above the rules being wrong) is still
//! refused by the schema, and the stores write every effect conditionally on the
//! state it was decided from (a pair assertion).
//!
//! The rules, as API.md states them:
//! * create account: the same opening balance and currency again is a replay of
//!   the account as it is now; anything else for the id is `account_exists`;
//! * create order: the same account and amount again is a replay; anything else
//!   is `order_exists`; an unknown account is `account_not_found`;
//! * deduct: charges the order's amount once (PREPARE → PAID, one debit entry);
//!   not enough balance makes the order FAILED (terminal, answered
//!   `insufficient_funds` forever); a paid order (even refunded since) replays its
//!   debit with the order as it is now;
//! * refund: a refund id moves money once (the same order and amount again
//!   replays; anything else is `refund_exists`); only PAID or PARTIALLY_REFUNDED
//!   orders (`order_not_paid`), never above the amount (`refund_exceeds_paid`);
//!   a refund that would overflow the balance (only possible after a hand edit)
//!   is refused and moves nothing;
//! * two-phase (authorize, capture, void, expire): see [`ledger`]'s
//!   `authorize`, `capture` and `release`; the clock decides expiry (a capture or
//!   void at or after `hold_expires_at` is `hold_expired` whether or not the
//!   sweeper has written the release yet, and writes that release itself when it
//!   has not: [`Effect::Lapse`]), and once one of capture, void or
//!   expiry took effect its own repeats replay while the others are told who won;
//!   a deduct and a hold spend only `available` (`balance - held`);
//! * fencing: a command under a lock token lower than one that already wrote its
//!   order is stale and moves nothing; otherwise the order keeps the token;
//! * Idempotency-Key: see [`idempotency`];
//! * settled: a command without a fence or an Idempotency-Key whose decision is
//!   a replay or a definite refusal writes nothing, so the committed state alone
//!   answers it ([`settled`]): no lock is needed to read what already happened.

pub mod idempotency;
mod ledger;
#[cfg(test)]
mod tests;

pub use idempotency::{
    claim, completion, releases, stores_over, ClaimDecision, IdemCompletion, IdemRecord,
};

use crate::domain::{
    Account, AccountId, Entry, EntryKind, EventDraft, EventType, Money, Order, OrderId,
    OrderStatus, RefundId,
};
use crate::store::{Command, Op, OpResult, Output, Rejection};

/// What a store read for one command, before deciding it. A store fills the
/// fields its command needs (each field says for which) and leaves the others
/// empty; the rules read nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen<'a> {
    /// The order the op names (create order: the order with that id; deduct,
    /// refund: the order to move), as it stands, if it exists.
    pub order: Option<&'a Order>,
    /// The highest fencing token that wrote that order (0: none). Needed only
    /// when the command carries a token.
    pub fence: i64,
    /// Create account: the account with that id, if it exists.
    pub account: Option<&'a Account>,
    /// Create order: whether the account it names exists.
    pub account_exists: bool,
    /// Deduct, refund, two-phase: the balance of the order's account.
    pub balance: Option<Money>,
    /// Deduct, two-phase: the held sum of the order's account.
    pub held: Option<Money>,
    /// Deduct, capture: the debit (or capture) entry a paid order links
    /// (`order.debit_entry_id`).
    pub debit: Option<&'a Entry>,
    /// Refund: the entry already written under the refund id, if any.
    pub refund: Option<&'a Entry>,
    /// Authorize: the order's hold entry, if any.
    pub hold: Option<&'a Entry>,
    /// Void, expire: the order's release entry, if any.
    pub release: Option<&'a Entry>,
    /// A command with an Idempotency-Key: its key's record (scope and key), if
    /// any. Read only for keyed commands (none on the unkeyed hot path).
    pub key: Option<&'a IdemRecord>,
}

/// The rows of a [`Seen`], owned: what a store fills in as it reads (SQLite's
/// writer, the simulation's database, the engine's cache of paid orders) and
/// lends to the rules with [`Rows::seen`].
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub order: Option<Order>,
    pub fence: i64,
    pub account: Option<Account>,
    pub account_exists: bool,
    pub balance: Option<Money>,
    pub held: Option<Money>,
    pub debit: Option<Entry>,
    pub refund: Option<Entry>,
    pub hold: Option<Entry>,
    pub release: Option<Entry>,
    pub key: Option<IdemRecord>,
}

impl Rows {
    pub fn seen(&self) -> Seen<'_> {
        Seen {
            order: self.order.as_ref(),
            fence: self.fence,
            account: self.account.as_ref(),
            account_exists: self.account_exists,
            balance: self.balance,
            held: self.held,
            debit: self.debit.as_ref(),
            refund: self.refund.as_ref(),
            hold: self.hold.as_ref(),
            release: self.release.as_ref(),
            key: self.key.as_ref(),
        }
    }
}

/// The decision on one command: the fence to keep, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Raise the order's fence to this token (a fenced command on an existing
    /// order whose token was not stale); written whatever the decision.
    pub fence: Option<i64>,
    pub decision: Decision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Refused: nothing is written.
    Reject(Rejection),
    /// Already done: answer with what is stored; nothing is written.
    Replay(Output),
    /// Write this, then answer with [`Effect::answer`].
    Apply(Effect),
}

/// The writes one command makes. A store makes each conditional on the state it
/// was decided from (the order's status and refunded sum, the balance read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Insert this account (its balance is its opening balance).
    OpenAccount(Account),
    /// Insert this order, in PREPARE.
    PlaceOrder(Order),
    /// Insert the debit entry, move the balance down, and PREPARE → PAID with the
    /// new entry as the order's debit.
    Charge(Movement),
    /// PREPARE → FAILED (`failure_reason` set): the balance cannot pay. Nothing
    /// else is written, and the command answers `insufficient_funds`.
    Decline(Order),
    /// Insert the refund entry, move the balance back up, and raise the order's
    /// refunded sum (PAID | PARTIALLY_REFUNDED → PARTIALLY_REFUNDED | REFUNDED).
    Refund(Movement),
    /// Insert the hold entry, raise the account's held sum, PREPARE → AUTHORIZED
    /// (with `held` and `hold_expires_at`).
    Hold(Movement),
    /// Insert the capture entry (the order's debit) and, for a partial capture,
    /// a release of the rest; take the captured sum from the balance and the
    /// whole hold from `held`; AUTHORIZED → PAID with `captured`.
    Capture(Movement),
    /// Insert the release entry, lower `held` by the hold; AUTHORIZED → VOIDED
    /// or EXPIRED.
    Release(Movement),
    /// The expiry, written by the capture or void that found a hold at or after
    /// its `hold_expires_at` and still open: the same writes as an expiry's
    /// [`Effect::Release`] (AUTHORIZED → EXPIRED), and the command answers
    /// [`Rejection::HoldLapsed`]. Why it writes rather than only refuses: a
    /// refusal that left the hold open let another instance whose clock was
    /// behind (or a batch decided a moment earlier) capture or void the hold
    /// after a client had been told `hold_expired`; once the expiry is in the
    /// database, every later request reads who won instead of a clock.
    Lapse(Movement),
}

/// One movement of money: a new ledger entry, a balance change, an order change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movement {
    /// The order as read: the order's write is conditional on its status and
    /// refunded sum.
    pub before: Order,
    /// The order as the movement leaves it. A charge's `debit_entry_id` is the new
    /// entry's, unknown until the ledger gives it: see [`Movement::settle`].
    pub after: Order,
    /// The ledger line to insert; the ledger gives it its id. The command
    /// answers with it.
    pub entry: NewEntry,
    /// A second line, inserted after `entry`: the release of what a partial
    /// capture left of its hold.
    pub rest: Option<Box<NewEntry>>,
    /// The balance as read: the balance's write is conditional on it, and
    /// `entry.balance_after` is the new one.
    pub balance_before: Money,
    /// The account's held sum as read (the write is conditional on it too), and
    /// as the movement leaves it.
    pub held_before: Money,
    pub held_after: Money,
}

/// A ledger entry before the ledger has given it an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    pub order_id: OrderId,
    pub account_id: AccountId,
    pub kind: EntryKind,
    pub amount: Money,
    pub balance_after: Money,
    pub refund_id: Option<RefundId>,
    pub created_at: i64,
}

impl NewEntry {
    /// The entry once the ledger gave it `id`.
    pub fn with_id(&self, id: i64) -> Entry {
        Entry {
            id,
            order_id: self.order_id.clone(),
            account_id: self.account_id.clone(),
            kind: self.kind,
            amount: self.amount,
            balance_after: self.balance_after,
            refund_id: self.refund_id.clone(),
            reverses: None,
            created_at: self.created_at,
        }
    }
}

impl Movement {
    /// The order and the entry once the ledger gave the entry `entry_id` (a
    /// charge links it as the order's debit).
    pub fn settle(&self, entry_id: i64) -> (Order, Entry) {
        let mut order = self.after.clone();
        if matches!(self.entry.kind, EntryKind::Debit | EntryKind::Capture) {
            order.debit_entry_id = Some(entry_id);
        }
        (order, self.entry.with_id(entry_id))
    }
}

impl Effect {
    /// The movement this effect makes, if it moves money or a hold.
    pub fn movement(&self) -> Option<&Movement> {
        match self {
            Effect::Charge(m)
            | Effect::Refund(m)
            | Effect::Hold(m)
            | Effect::Capture(m)
            | Effect::Release(m)
            | Effect::Lapse(m) => Some(m),
            Effect::OpenAccount(_) | Effect::PlaceOrder(_) | Effect::Decline(_) => None,
        }
    }

    /// The ledger line this effect answers with, if any.
    pub fn entry(&self) -> Option<&NewEntry> {
        self.movement().map(|m| &m.entry)
    }

    /// What the command answers once the effect is written; `entry_id` is the id
    /// the ledger gave [`Effect::entry`] (ignored by effects that insert none).
    pub fn answer(&self, entry_id: i64) -> OpResult {
        match self {
            Effect::OpenAccount(account) => Ok(Output::Account {
                account: account.clone(),
                created: true,
            }),
            Effect::PlaceOrder(order) => Ok(Output::Order {
                order: order.clone(),
                created: true,
            }),
            Effect::Charge(m)
            | Effect::Refund(m)
            | Effect::Hold(m)
            | Effect::Capture(m)
            | Effect::Release(m) => {
                let (order, entry) = m.settle(entry_id);
                Ok(Output::Movement {
                    order,
                    entry,
                    replayed: false,
                })
            }
            Effect::Decline(_) => Err(Rejection::InsufficientFunds),
            Effect::Lapse(_) => Err(Rejection::HoldLapsed),
        }
    }

    /// The event this effect writes in its own transaction (API.md, "Events
    /// and webhooks"), or `None` for effects that change no order's money or
    /// status (a new account, a new PREPARE order). Decided here, once, for both
    /// stores; `entry_id` as for [`Effect::answer`].
    pub fn event(&self, entry_id: i64) -> Option<EventDraft> {
        let kind = match self {
            Effect::OpenAccount(_) | Effect::PlaceOrder(_) => return None,
            Effect::Decline(failed) => {
                return Some(EventDraft {
                    kind: EventType::OrderPaymentFailed,
                    order: failed.clone(),
                    entry: None,
                })
            }
            Effect::Charge(_) | Effect::Capture(_) => EventType::OrderPaid,
            Effect::Refund(_) => EventType::OrderRefunded,
            Effect::Hold(_) => EventType::OrderAuthorized,
            Effect::Release(m) if m.after.status == OrderStatus::Voided => EventType::OrderVoided,
            Effect::Release(_) | Effect::Lapse(_) => EventType::OrderHoldExpired,
        };
        let (order, entry) = self.movement()?.settle(entry_id);
        Some(EventDraft {
            kind,
            order,
            entry: Some(entry),
        })
    }
}

/// The state a store read contradicts itself (a paid order without its debit,
/// an order whose account is missing): the database was edited by hand or is
/// corrupt. Not an answer: the store fails the batch rather than guess.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent stored state: {0}")]
pub struct Inconsistent(pub String);

/// Decides one command against the state a store read for it, at `now` (ms).
///
/// First of all: a keyed command whose key already holds a stored answer for
/// the same request ([`answered`]) is not decided again, whatever the state:
/// it is [`Rejection::KeyAnswered`], nothing is written, and its caller reads
/// the key's stored answer.
pub fn decide(cmd: &Command, seen: &Seen<'_>, now: i64) -> Result<Verdict, Inconsistent> {
    if answered(cmd, seen) {
        return Ok(Verdict {
            fence: None,
            decision: Decision::Reject(Rejection::KeyAnswered),
        });
    }
    let fence = match (cmd.fence, seen.order) {
        (Some(token), Some(_)) => match ledger::fence(seen.fence, token) {
            Some(kept) => Some(kept),
            None => {
                return Ok(Verdict {
                    fence: None,
                    decision: Decision::Reject(Rejection::StaleFencingToken),
                })
            }
        },
        // Unfenced, or an order that does not exist (yet): nothing to fence.
        _ => None,
    };
    let decision = match &cmd.op {
        Op::CreateAccount {
            id,
            balance,
            currency,
        } => ledger::open_account(seen.account, id, *balance, *currency, now),
        Op::CreateOrder {
            id,
            account_id,
            amount,
        } => ledger::place_order(
            seen.order,
            seen.account_exists,
            id,
            account_id,
            *amount,
            now,
        ),
        Op::Deduct { order_id } => ledger::deduct(order_id, seen, now)?,
        Op::Refund {
            order_id,
            refund_id,
            amount,
        } => ledger::refund(order_id, refund_id, *amount, seen, now)?,
        Op::Authorize {
            order_id,
            hold_ttl_ms,
        } => ledger::authorize(order_id, *hold_ttl_ms, seen, now)?,
        Op::Capture { order_id, amount } => ledger::capture(order_id, *amount, seen, now)?,
        Op::Void { order_id } => ledger::release(order_id, ledger::Release::Void, seen, now)?,
        Op::Expire { order_id } => ledger::release(order_id, ledger::Release::Expiry, seen, now)?,
    };
    Ok(Verdict { fence, decision })
}

/// Whether `cmd` carries an Idempotency-Key whose record already holds a stored
/// answer for the same request (the same fingerprint): a committed transaction
/// answered it, and that answer stands.
///
/// Why: a command can run twice, most plainly when the PostgreSQL store reruns
/// a batch whose COMMIT went unanswered but did commit
/// (`store/postgres/commit.rs`). A movement reads back as its replay, but a
/// refusal writes nothing to read back: decided afresh after the state moved
/// (a refund refused `order_not_paid`, its order charged since), it was made,
/// while the key kept answering the refusal (found by the deterministic
/// simulation, seed 4096). The key's record is written in the command's own
/// transaction, so it is the one row that says "this already committed".
/// A record completed by another request under the same key and fingerprint
/// (this one's lease lapsed) is the same request's answer too.
pub fn answered(cmd: &Command, seen: &Seen<'_>) -> bool {
    match (&cmd.idempotency, seen.key) {
        (Some(idem), Some(record)) => {
            record.done.is_some() && record.fingerprint == idem.fingerprint
        }
        _ => false,
    }
}

/// What `cmd` answers from the committed state alone, without writing anything or
/// holding its order's lock: a replay, or a definite refusal. `None` when the
/// command must run as a write: its decision is an effect (a charge, a decline,
/// a refund, a new row), its refusal may change on a retry (a lock or database
/// refusal), or it carries what only a write may do (a fencing token to keep, an
/// Idempotency-Key record to complete).
///
/// Why: with cross-instance locks, a duplicate that waited for another
/// instance's release almost always finds its order already settled; answering
/// it from a read spares a lock round trip, a write transaction and a release
/// (issue #12). It is safe because nothing is written: the answer is the one the
/// write path would give against the same state ([`decide`] decides both).
pub fn settled(cmd: &Command, seen: &Seen<'_>, now: i64) -> Result<Option<OpResult>, Inconsistent> {
    if !cmd.is_plain() {
        return Ok(None);
    }
    Ok(match decide(cmd, seen, now)?.decision {
        Decision::Replay(out) => Some(Ok(out)),
        Decision::Reject(r) if r.is_definite() => Some(Err(r)),
        Decision::Reject(_) | Decision::Apply(_) => None,
    })
}
