//! The simulated database: payguard's tables in memory, every command decided
//! by payguard's own money rules (`payguard::store::rules`), one request at a
//! time.
//!
//! Why a model: the stores are SQLite and PostgreSQL, which run on the wall
//! clock and their own threads, so no seed could replay them. What makes a
//! store payguard's is not its dialect but the decisions, and those are one
//! pure function ([`rules::decide`], [`rules::settled`]) that both real stores
//! call: this one calls it too, on the rows it keeps, and writes what it
//! decided the way `store/sqlite/commands.rs` does (each write conditional on
//! the state it was decided from, asserted here). A batch is one transaction:
//! all of it or none of it. Each request runs to the end before the next (what
//! serialisable transactions promise). The state outlives a crash or restart of
//! the host (it is durable); requests in flight are lost, before or after their
//! commit, which is what the store's commit-fate resolution is for
//! (payguard's `store::commit_fate`, run by [`crate::store`]): every transaction has an id, a look-up tells whether it
//! committed, and a transaction looked up before it arrived can no longer
//! commit (as PostgreSQL's `pg_terminate_backend` of the one in progress).
//!
//! Every commit is followed by a check of the accounts' holds (`held` is the
//! sum of the open holds, never negative, never above the balance), so a
//! broken invariant is seen the moment it happens, not only at the end. The
//! events feed is written in each movement's transaction from the rules'
//! `Effect::event`, as the real stores write it.
//!
//! A [`StoreVariant`] can switch a rule of the store off, to show the checks
//! failing: the one-debit rule (a deduct then sees a paid order as unpaid, as a
//! store without the status check and the unique debit would), the fence
//! check (a stale token is not refused), the refund id's one entry, a hold's
//! one capture and one release (an ended hold then reads as still held), the
//! expiry check of a capture, the refund bound of a captured order, the held
//! sum's update on a release, one event per effect, the time a batch
//! decides at (after its row locks, or when its attempt started), and the
//! Idempotency-Key rules (an answer stored in its command's transaction, a
//! claim's fingerprint compared, a held key not claimed again, a keyed
//! command whose key holds its answer not decided again; the claim is
//! decided in [`crate::store`]); and the webhook lease rules (a claim that
//! ignores an unexpired lease, a result kept without its lease:
//! [`crate::outbox`]).
//!
//! The outbox's tables (webhook endpoints, deliveries, attempts) are
//! [`crate::outbox`]'s, kept beside the money's ([`DbState::outbox`]); the
//! delivery loop's calls reach them as requests like the money path's.

use crate::oracle::OracleRef;
use crate::outbox::Outbox;
use crate::wire::{now_ms, Post, Server, DB_PORT};
use payguard::domain::{
    Account, AccountId, Currency, Entry, EntryKind, Event, EventDraft, EventType, Money, Order,
    OrderId, OrderStatus,
};
use payguard::store::outbox::{AttemptResult, ClaimRequest, Claimed, Endpoint};
use payguard::store::rules::{
    self, ClaimDecision, Decision, Effect, IdemCompletion, IdemRecord, Inconsistent, Rows, Verdict,
};
use payguard::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, Op, OpResult, Output, Rejection, StoreError,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Which of the store's own rules it keeps. [`StoreVariant::PAYGUARD`] keeps all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreVariant {
    /// A deduct of a paid order replays its debit (off: it charges again).
    pub one_debit: bool,
    /// A write under a token lower than the order's fence is refused.
    pub fence_check: bool,
    /// A refund id already made replays its entry (off: it is refunded again,
    /// within what is left to refund).
    pub refund_once: bool,
    /// A capture of a captured order replays it or is refused (off: the order
    /// is read as still held, and captured again).
    pub capture_once: bool,
    /// A void or expiry of an ended hold replays it or names what ended it
    /// (off: the order is read as still held, and released again).
    pub release_once: bool,
    /// A capture at or after `hold_expires_at` is refused `hold_expired` (off:
    /// captures are decided as if the hold had not expired yet).
    pub capture_before_expiry: bool,
    /// Refunds of a captured order stop at the captured sum (off: at the
    /// order's amount, as before two-phase payments).
    pub refund_within_captured: bool,
    /// A release lowers the account's `held` (off: the UPDATE forgets `held`).
    pub release_lowers_held: bool,
    /// An event is written per effect (off: also one per replayed movement,
    /// as payguard's naive path writes `order.paid` per charge).
    pub event_per_effect: bool,
    /// A batch decides at the time it holds its orders' rows (here: when the
    /// database runs it), as `store/postgres/batch.rs` reads its clock after
    /// its `FOR UPDATE` reads (off: at the instance's clock when the attempt
    /// started, as it did before the simulation found that a capture decided
    /// before the expiry could commit after a duplicate was told
    /// `hold_expired`).
    pub clock_after_locks: bool,
    /// A capture or void that finds its hold past the expiry writes that
    /// expiry as it refuses (`Effect::Lapse`; off: it only refuses, and the
    /// hold stays open for the sweeper, as payguard did before: an instance
    /// whose clock is behind could then still end it).
    pub lapse_writes: bool,
    /// A keyed command's definite answer is stored under its key in its
    /// transaction (off: the key is freed, as for an answer that may be
    /// retried, so a repeat runs again).
    pub key_keeps_answer: bool,
    /// A claim compares the request's fingerprint with the key's (off: any
    /// request under a key counts as the one it was first used for).
    pub key_checks_fingerprint: bool,
    /// A claim of a key held (in flight or answered) is refused (off: every
    /// claim takes the key).
    pub key_claimed_once: bool,
    /// A keyed command reads its key's record, and one whose key already
    /// holds a stored answer for the same request is not decided again
    /// (`rules::answered`: `Rejection::KeyAnswered`, and the keyed sequence
    /// answers the stored response). Off: the record is not read, and a
    /// command run again (a batch rerun after an unanswered commit that did
    /// commit) is decided afresh, as payguard did before seed 4096 found a
    /// keyed refund refused, stored, then made by such a rerun.
    pub rerun_reads_key: bool,
    /// Freeing a key (the keyed sequence's `idem_release`, or a command's own
    /// transaction) frees only the in-flight claim of the freeing request's
    /// token (`rules::releases`). Off: any in-flight record under the key, as
    /// payguard's stores did before claims had tokens, so a late release could
    /// free a claim another request took since.
    pub release_checks_claim: bool,
    /// A webhook claim takes only deliveries whose lease has run out
    /// (`lease_until <= now`). Off: a delivery leased to another instance is
    /// claimed again while its attempt may still be in flight.
    pub claim_respects_lease: bool,
    /// A webhook attempt's result is kept only while its claimer holds the
    /// lease (`lease_owner = owner AND attempts = attempt`). Off: any result
    /// of a pending delivery is kept, also one that comes back after another
    /// instance claimed it again.
    pub record_checks_lease: bool,
    /// A webhook claim takes only `pending` deliveries. Off: a delivered or
    /// failed one whose lease has run out is claimed and sent again.
    pub claim_only_pending: bool,
}

impl StoreVariant {
    /// Whether this store's freeing of a key by the claim `token` frees
    /// `record` (`rules::releases`, or, `release_checks_claim` off, any
    /// in-flight record).
    pub fn frees(&self, record: &IdemRecord, token: ClaimToken) -> bool {
        if self.release_checks_claim {
            rules::releases(record, token)
        } else {
            record.done.is_none()
        }
    }

    pub const PAYGUARD: StoreVariant = StoreVariant {
        one_debit: true,
        fence_check: true,
        refund_once: true,
        capture_once: true,
        release_once: true,
        capture_before_expiry: true,
        refund_within_captured: true,
        release_lowers_held: true,
        event_per_effect: true,
        clock_after_locks: true,
        lapse_writes: true,
        key_keeps_answer: true,
        key_checks_fingerprint: true,
        key_claimed_once: true,
        rerun_reads_key: true,
        release_checks_claim: true,
        claim_respects_lease: true,
        record_checks_lease: true,
        claim_only_pending: true,
    };
}

/// What an instance asks the database; each is one transaction.
#[derive(Debug, Clone)]
pub enum DbReq {
    /// A lane's batch, under transaction id `xid`; `now` is the instance's
    /// clock when the attempt started, `clock_offset_ms` how far that clock is
    /// off the simulated one.
    Apply {
        xid: u64,
        cmds: Vec<Command>,
        now: i64,
        clock_offset_ms: i64,
    },
    /// Did transaction `xid` commit? Ends it if it has not arrived yet.
    Fate { xid: u64 },
    /// `Store::settled`: what the committed state answers without a write,
    /// at the instance's clock `now` (a snapshot read takes no row lock, so
    /// the PostgreSQL store decides it at the caller's time too).
    Settled { cmds: Vec<Command>, now: i64 },
    /// `nextval('fence_epochs')`.
    NextFenceEpoch,
    /// `Store::due_holds`: AUTHORIZED orders whose hold expired at `now_ms`.
    DueHolds { now_ms: i64, limit: usize },
    /// `Store::idem_claim` (one transaction of its own).
    Claim(IdemClaim),
    /// `Store::idem_release`: frees the claim `token` made.
    Release {
        scope: String,
        key: String,
        token: ClaimToken,
    },
    /// `Store::webhook_endpoints`.
    HookEndpoints { id: Option<String> },
    /// `Store::webhook_fan_out` at the caller's `now_ms`.
    HookFanOut { now_ms: i64 },
    /// `Store::webhook_claim`.
    HookClaim(ClaimRequest),
    /// `Store::webhook_record`.
    HookRecord(Vec<AttemptResult>),
}

#[derive(Debug, Clone)]
pub enum DbResp {
    Applied(Result<Vec<OpResult>, StoreError>),
    Fate(bool),
    Settled(Vec<Option<OpResult>>),
    Epoch(i64),
    Due(Vec<OrderId>),
    Claimed(ClaimOutcome),
    /// Whether the release freed a record.
    Released(bool),
    HookEndpoints(Vec<Endpoint>),
    FannedOut(u64),
    HookClaimed(Vec<Claimed>),
    /// Per result, whether it was kept.
    Recorded(Vec<bool>),
}

/// The tables: what a transaction changes, all or nothing.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub accounts: BTreeMap<AccountId, Account>,
    /// Each order with its fence (the highest token that wrote it; 0: none).
    pub orders: BTreeMap<OrderId, (Order, i64)>,
    /// The ledger, append only; entry `id` is at index `id - 1`.
    pub entries: Vec<Entry>,
    /// The events feed (written in each movement's transaction).
    pub events: Vec<Event>,
    /// Idempotency-Key records by (scope, key).
    pub idem: BTreeMap<(String, String), IdemRecord>,
    /// Per order, the highest token of a fenced write applied to it.
    pub applied_tokens: BTreeMap<OrderId, i64>,
}

#[derive(Debug)]
pub struct DbState {
    pub variant: StoreVariant,
    pub tables: Tables,
    /// `fence_epochs`: the last value handed out; only grows.
    pub fence_epoch_seq: i64,
    /// `idempotency_claims`: the last claim token handed out; only grows.
    pub claim_token_seq: i64,
    /// Transaction id → committed. Absent: not seen yet.
    xids: BTreeMap<u64, bool>,
    /// Fenced writes applied below a token already applied to their order:
    /// what the fence check exists to refuse (checked at the end of the seed).
    pub stale_applied: Vec<String>,
    /// Stale writes refused by the fence check.
    pub stale_refused: u64,
    /// What broke the accounts' hold invariants after a commit (`held` the sum
    /// of the open holds, never negative, never above the balance): checked at
    /// every commit, reported at the end of the seed.
    pub held_broken: Vec<String>,
    /// Two-phase races as the database answered them (committed or read):
    /// expiries that found the hold already released by another sweeper (a
    /// replay); captures that came at or after the expiry. (An expiry never
    /// finds a hold captured or voided: it is read as due only once the
    /// expiry passed, after which neither can win, every host reading one
    /// clock.)
    pub races: Races,
    /// Transactions committed, and looked up after their answer was lost.
    pub commits: u64,
    pub fate_lookups: u64,
    /// The outbox's tables (webhook endpoints, deliveries, attempts).
    pub outbox: Outbox,
}

/// See [`DbState::races`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Races {
    pub expiry_replays: u64,
    pub captures_too_late: u64,
}

impl Races {
    fn count(&mut self, cmd: &Command, answer: &OpResult) {
        match (&cmd.op, answer) {
            (Op::Expire { .. }, Ok(out)) if out.is_replay() => self.expiry_replays += 1,
            (Op::Capture { .. }, Err(Rejection::HoldExpired | Rejection::HoldLapsed)) => {
                self.captures_too_late += 1
            }
            _ => {}
        }
    }
}

/// The rows one command's decision needs (payguard's [`Rows`]).
type Read = Rows;

impl Tables {
    fn entry(&self, id: i64) -> Option<Entry> {
        usize::try_from(id - 1)
            .ok()
            .and_then(|i| self.entries.get(i))
            .cloned()
    }

    fn order_entry(&self, order: &OrderId, kind: EntryKind) -> Option<Entry> {
        self.entries
            .iter()
            .find(|e| &e.order_id == order && e.kind == kind)
            .cloned()
    }

    /// Reads what the rules need to decide `op` (as `sqlite::commands::read_for`).
    fn read_for(&self, op: &Op, variant: StoreVariant) -> Read {
        let mut read = Read::default();
        let set_order = |read: &mut Read, id: &OrderId| {
            if let Some((order, fence)) = self.orders.get(id) {
                let account = self.accounts.get(&order.account_id);
                read.order = Some(order.clone());
                read.fence = *fence;
                read.balance = account.map(|a| a.balance);
                read.held = account.map(|a| a.held);
            }
        };
        match op {
            Op::CreateAccount { id, .. } => read.account = self.accounts.get(id).cloned(),
            Op::CreateOrder { id, account_id, .. } => {
                set_order(&mut read, id);
                read.account_exists = self.accounts.contains_key(account_id);
            }
            Op::Deduct { order_id } => {
                set_order(&mut read, order_id);
                if !variant.one_debit {
                    // The broken store: it does not look at what already happened.
                    if let Some(o) = read
                        .order
                        .as_mut()
                        .filter(|o| o.status == OrderStatus::Paid)
                    {
                        o.status = OrderStatus::Prepare;
                        o.debit_entry_id = None;
                    }
                }
                if let Some(id) = read.order.as_ref().and_then(|o| o.debit_entry_id) {
                    read.debit = self.entry(id);
                }
            }
            Op::Refund {
                order_id,
                refund_id,
                ..
            } => {
                set_order(&mut read, order_id);
                // The broken store does not look for the refund id's entry.
                read.refund = self
                    .entries
                    .iter()
                    .filter(|_| variant.refund_once)
                    .find(|e| e.refund_id.as_ref() == Some(refund_id))
                    .cloned();
            }
            Op::Authorize { order_id, .. } => {
                set_order(&mut read, order_id);
                read.hold = self.order_entry(order_id, EntryKind::Hold);
            }
            Op::Capture { order_id, .. } => {
                set_order(&mut read, order_id);
                let captured = read.order.as_ref().is_some_and(|o| o.captured.is_some());
                if !variant.capture_once && captured {
                    // The broken store: a captured order still looks held.
                    read.order = read.order.take().map(still_held);
                }
                if let Some(id) = read.order.as_ref().and_then(|o| o.debit_entry_id) {
                    read.debit = self.entry(id);
                }
            }
            Op::Void { order_id } | Op::Expire { order_id } => {
                set_order(&mut read, order_id);
                if !variant.release_once {
                    // The broken store: an ended hold still looks held.
                    read.order = read.order.take().map(still_held);
                }
                read.release = self.order_entry(order_id, EntryKind::Release);
            }
        }
        read
    }

    /// AUTHORIZED orders whose hold expired at `now`, oldest expiry first (as
    /// the stores' `due_holds`).
    fn due_holds(&self, now: i64, limit: usize) -> Vec<OrderId> {
        let mut due: Vec<(i64, OrderId)> = self
            .orders
            .values()
            .filter(|(o, _)| o.status == OrderStatus::Authorized)
            .filter_map(|(o, _)| {
                o.hold_expires_at
                    .filter(|at| *at <= now)
                    .map(|at| (at, o.id.clone()))
            })
            .collect();
        due.sort();
        due.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// What breaks the hold invariants of each account: `held` is the sum of
    /// its AUTHORIZED orders' holds, at least zero and at most the balance.
    pub fn held_broken(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, a) in &self.accounts {
            let open: i64 = self
                .orders
                .values()
                .filter(|(o, _)| &o.account_id == id && o.status == OrderStatus::Authorized)
                .map(|(o, _)| o.held.minor())
                .sum();
            if a.held.minor() != open || a.held.is_negative() || a.held > a.balance {
                out.push(format!(
                    "account {id}: held {}, open holds {open}, balance {} (minor units)",
                    a.held.minor(),
                    a.balance.minor()
                ));
            }
        }
        out
    }

    /// One ledger line; returns its id.
    fn insert_line(&mut self, e: &rules::NewEntry) -> i64 {
        let id = self.entries.len() as i64 + 1;
        self.entries.push(e.with_id(id));
        id
    }

    /// Makes the writes of `effect` (as `sqlite::commands::write_effect`);
    /// returns the command's answer.
    fn write_effect(
        &mut self,
        effect: &Effect,
        now: i64,
        variant: StoreVariant,
    ) -> Result<OpResult, Inconsistent> {
        let broken = |what: &str| Inconsistent(format!("{what}: not as read"));
        let entry_id = match effect {
            Effect::OpenAccount(a) => {
                if self.accounts.insert(a.id.clone(), a.clone()).is_some() {
                    return Err(broken("new account"));
                }
                0
            }
            Effect::PlaceOrder(o) => {
                if self.orders.insert(o.id.clone(), (o.clone(), 0)).is_some() {
                    return Err(broken("new order"));
                }
                0
            }
            Effect::Decline(failed) => {
                let (order, _) = self
                    .orders
                    .get_mut(&failed.id)
                    .ok_or_else(|| broken("order"))?;
                if order.status != OrderStatus::Prepare {
                    return Err(broken("PREPARE -> FAILED"));
                }
                *order = Order {
                    updated_at: now,
                    ..failed.clone()
                };
                0
            }
            Effect::Charge(m)
            | Effect::Refund(m)
            | Effect::Hold(m)
            | Effect::Capture(m)
            | Effect::Release(m)
            | Effect::Lapse(m) => {
                let account = self
                    .accounts
                    .get(&m.entry.account_id)
                    .ok_or_else(|| broken("account"))?;
                // The balance's compare-and-set on the state it was decided from.
                if account.balance != m.balance_before || account.held != m.held_before {
                    return Err(broken("balance"));
                }
                let id = self.insert_line(&m.entry);
                if let Some(rest) = &m.rest {
                    self.insert_line(rest);
                }
                let account = self
                    .accounts
                    .get_mut(&m.entry.account_id)
                    .expect("read above");
                account.balance = m.entry.balance_after;
                account.held = match effect {
                    // The broken store's release forgets the held sum.
                    Effect::Release(_) | Effect::Lapse(_) if !variant.release_lowers_held => {
                        m.held_before
                    }
                    _ => m.held_after,
                };
                account.updated_at = now;
                let (after, _) = m.settle(id);
                let (order, _) = self
                    .orders
                    .get_mut(&after.id)
                    .ok_or_else(|| broken("order"))?;
                *order = after;
                id
            }
        };
        if let Some(draft) = effect.event(entry_id) {
            self.push_event(draft, now);
        }
        Ok(effect.answer(entry_id))
    }

    /// Appends an event to the feed, numbered in commit order.
    fn push_event(&mut self, draft: EventDraft, now: i64) {
        let seq = self.events.len() as i64 + 1;
        self.events.push(Event {
            seq,
            // Not `new_event_id` (wall clock, random): a seed must replay.
            id: format!("evt_sim_{seq:020}"),
            kind: draft.kind,
            created_at: now,
            order: draft.order,
            entry: draft.entry,
        });
    }
}

impl DbState {
    pub fn new(variant: StoreVariant) -> Self {
        DbState {
            variant,
            tables: Tables::default(),
            fence_epoch_seq: 0,
            claim_token_seq: 0,
            xids: BTreeMap::new(),
            stale_applied: Vec::new(),
            stale_refused: 0,
            held_broken: Vec::new(),
            races: Races::default(),
            commits: 0,
            fate_lookups: 0,
            outbox: Outbox::default(),
        }
    }

    /// Runs `cmds` as one transaction at `now`: every answer, or nothing kept.
    pub fn apply(&mut self, cmds: &[Command], now: i64) -> Result<Vec<OpResult>, StoreError> {
        let mut t = self.tables.clone();
        let mut stale_applied = Vec::new();
        let mut stale_refused = 0;
        let mut answers = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let answer = self
                .exec_command(&mut t, cmd, now, &mut stale_applied)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            stale_refused += u64::from(answer == Err(Rejection::StaleFencingToken));
            answers.push(answer);
        }
        if self.held_broken.is_empty() {
            self.held_broken = t
                .held_broken()
                .into_iter()
                .map(|b| format!("after a commit at {now} ms: {b}"))
                .collect();
        }
        for (cmd, answer) in cmds.iter().zip(&answers) {
            self.races.count(cmd, answer);
        }
        self.tables = t;
        self.stale_applied.extend(stale_applied);
        self.stale_refused += stale_refused;
        self.commits += 1;
        Ok(answers)
    }

    fn exec_command(
        &self,
        t: &mut Tables,
        cmd: &Command,
        now: i64,
        stale_applied: &mut Vec<String>,
    ) -> Result<OpResult, Inconsistent> {
        let mut read = t.read_for(&cmd.op, self.variant);
        if let (Some(idem), true) = (&cmd.idempotency, self.variant.rerun_reads_key) {
            // Only a keyed command reads its key (`read_for`'s rows, as the
            // stores read them for keyed commands only).
            read.key = t.idem.get(&(idem.scope.clone(), idem.key.clone())).cloned();
        }
        let decided_on = if self.variant.fence_check {
            cmd.clone()
        } else {
            // The broken store: it never looks at the token.
            Command {
                fence: None,
                ..cmd.clone()
            }
        };
        let verdict = self.decide(&decided_on, &read, now)?;
        // Neither a stale write nor a command whose key holds its answer
        // (`KeyAnswered`, decided before the fence: it keeps no fence and
        // writes nothing) applies anything under its token.
        let applies_nothing = matches!(
            verdict.decision,
            Decision::Reject(Rejection::StaleFencingToken | Rejection::KeyAnswered)
        );
        if let (Some(token), Some(order_id), false) = (cmd.fence, cmd.order_id(), applies_nothing) {
            if read.order.is_some() {
                let prev = t.applied_tokens.get(order_id).copied().unwrap_or(0);
                if token < prev {
                    stale_applied.push(format!(
                        "order {order_id}: write with token {:?} applied after one with {:?}",
                        payguard::lock::token::unpack(token),
                        payguard::lock::token::unpack(prev)
                    ));
                }
                t.applied_tokens.insert(order_id.clone(), prev.max(token));
            }
        }
        if let (Some(token), Some(order_id)) = (verdict.fence, cmd.order_id()) {
            if let Some((_, fence)) = t.orders.get_mut(order_id) {
                // UPDATE orders SET fence = token WHERE id = .. AND fence <= token
                if *fence > token {
                    return Err(Inconsistent("fence: not as read".into()));
                }
                *fence = token;
            }
        }
        let answer = match verdict.decision {
            Decision::Reject(r) => Err(r),
            Decision::Replay(out) => Ok(out),
            Decision::Apply(effect) => t.write_effect(&effect, now, self.variant)?,
        };
        if let (
            false,
            Ok(Output::Movement {
                replayed: true,
                order,
                entry,
            }),
        ) = (self.variant.event_per_effect, &answer)
        {
            // The broken store: an event per answer, replays included.
            let kind = match entry.kind {
                EntryKind::Refund | EntryKind::Reversal => EventType::OrderRefunded,
                EntryKind::Hold => EventType::OrderAuthorized,
                EntryKind::Release => EventType::OrderVoided,
                EntryKind::Debit | EntryKind::Capture => EventType::OrderPaid,
            };
            t.push_event(
                EventDraft {
                    kind,
                    order: order.clone(),
                    entry: Some(entry.clone()),
                },
                now,
            );
        }
        if let Some(idem) = &cmd.idempotency {
            let key = (idem.scope.clone(), idem.key.clone());
            let record = t.idem.get(&key);
            let stores = record.is_some_and(|r| rules::stores_over(r, idem));
            let frees = record.is_some_and(|r| self.variant.frees(r, idem.claim));
            match rules::completion(idem, &answer, now) {
                IdemCompletion::Store {
                    status,
                    body,
                    expires_at,
                } if stores && self.variant.key_keeps_answer => {
                    let r = t.idem.get_mut(&key).expect("checked");
                    r.done = Some((status, body));
                    r.lease_until = None;
                    r.claim = None;
                    r.expires_at = expires_at;
                }
                // The broken store frees the key of a definite answer too.
                IdemCompletion::Store { .. } if stores => {
                    t.idem.remove(&key);
                }
                IdemCompletion::Release if frees => {
                    t.idem.remove(&key);
                }
                // Our lease lapsed and another request took the key (or our
                // transaction freed it already and another claimed it since).
                _ => {}
            }
        }
        Ok(answer)
    }

    /// payguard's rules on `read`, as this variant of the store applies them.
    fn decide(&self, cmd: &Command, read: &Read, now: i64) -> Result<Verdict, Inconsistent> {
        let order = read.order.as_ref();
        match &cmd.op {
            Op::Capture { .. } if !self.variant.capture_before_expiry => {
                // The broken store: a capture is decided before the hold's expiry.
                let before = order
                    .and_then(|o| o.hold_expires_at)
                    .map_or(now, |at| now.min(at - 1));
                let mut verdict = rules::decide(cmd, &read.seen(), before)?;
                if let Decision::Apply(Effect::Capture(m)) = &mut verdict.decision {
                    // Written when it commits, as every entry is.
                    m.entry.created_at = now;
                    m.after.updated_at = now;
                    if let Some(rest) = m.rest.as_mut() {
                        rest.created_at = now;
                    }
                }
                Ok(verdict)
            }
            Op::Refund { .. } if !self.variant.refund_within_captured => {
                // The broken store: the refund bound is the order's amount.
                let captured = order.and_then(|o| o.captured);
                let mut as_if = read.clone();
                if let Some(o) = as_if.order.as_mut() {
                    o.captured = None;
                }
                let mut verdict = rules::decide(cmd, &as_if.seen(), now)?;
                if let Decision::Apply(Effect::Refund(m)) = &mut verdict.decision {
                    m.before.captured = captured;
                    m.after.captured = captured;
                }
                Ok(verdict)
            }
            _ => {
                let mut verdict = rules::decide(cmd, &read.seen(), now)?;
                if let (false, Decision::Apply(Effect::Lapse(_))) =
                    (self.variant.lapse_writes, &verdict.decision)
                {
                    // The old store: the refusal alone, nothing written.
                    verdict.decision = Decision::Reject(Rejection::HoldExpired);
                }
                Ok(verdict)
            }
        }
    }

    /// Whether transaction `xid` committed (it arrived, was not ended by a
    /// look-up first, and its batch applied).
    pub fn committed(&self, xid: u64) -> bool {
        self.xids.get(&xid) == Some(&true)
    }

    /// `Store::settled`: one snapshot, nothing written.
    pub fn settled(&mut self, cmds: &[Command], now: i64) -> Vec<Option<OpResult>> {
        let answers: Vec<Option<OpResult>> = cmds
            .iter()
            .map(|cmd| {
                if !cmd.is_plain() {
                    return None;
                }
                let read = self.tables.read_for(&cmd.op, self.variant);
                // `rules::settled`, over this variant's decision.
                match self.decide(cmd, &read, now).map(|v| v.decision) {
                    Ok(Decision::Replay(out)) => Some(Ok(out)),
                    Ok(Decision::Reject(r)) if r.is_definite() => Some(Err(r)),
                    _ => None,
                }
            })
            .collect();
        for (cmd, answer) in cmds.iter().zip(&answers) {
            if let Some(answer) = answer {
                self.races.count(cmd, answer);
            }
        }
        answers
    }

    /// One request, as the host runs it at `now` (the database's clock).
    pub fn exec(&mut self, req: &DbReq, now: i64) -> DbResp {
        match req {
            DbReq::Apply {
                xid,
                cmds,
                now: started,
                clock_offset_ms,
            } => {
                // The instance reads its clock once it holds the rows: now.
                let now = if self.variant.clock_after_locks {
                    now + clock_offset_ms
                } else {
                    *started
                };
                if self.xids.get(xid) == Some(&false) {
                    // Looked up (and so ended) before it arrived.
                    return DbResp::Applied(Err(StoreError::Unavailable(format!(
                        "transaction {xid} was ended"
                    ))));
                }
                let got = self.apply(cmds, now);
                self.xids.insert(*xid, got.is_ok());
                DbResp::Applied(got)
            }
            DbReq::Fate { xid } => {
                self.fate_lookups += 1;
                DbResp::Fate(*self.xids.entry(*xid).or_insert(false))
            }
            DbReq::Settled { cmds, now } => DbResp::Settled(self.settled(cmds, *now)),
            DbReq::NextFenceEpoch => {
                self.fence_epoch_seq += 1;
                DbResp::Epoch(self.fence_epoch_seq)
            }
            DbReq::DueHolds { now_ms, limit } => {
                DbResp::Due(self.tables.due_holds(*now_ms, *limit))
            }
            DbReq::Claim(c) => DbResp::Claimed(self.claim(c)),
            DbReq::Release { scope, key, token } => {
                DbResp::Released(self.release(scope, key, *token))
            }
            DbReq::HookEndpoints { id } => {
                DbResp::HookEndpoints(self.outbox.endpoints(id.as_deref()))
            }
            DbReq::HookFanOut { now_ms } => {
                DbResp::FannedOut(self.outbox.fan_out(&self.tables.events, *now_ms))
            }
            DbReq::HookClaim(c) => DbResp::HookClaimed(self.outbox.claim(
                c,
                &self.tables.events,
                self.variant,
                now as u64,
            )),
            DbReq::HookRecord(results) => {
                DbResp::Recorded(self.outbox.record(results, self.variant, now as u64))
            }
        }
    }

    /// `Store::idem_claim`: [`rules::claim`] as this variant decides it; a key
    /// taken gets the next claim token.
    pub fn claim(&mut self, claim: &IdemClaim) -> ClaimOutcome {
        let key = (claim.scope.clone(), claim.key.clone());
        let existing = self.tables.idem.get(&key);
        let decision = match existing {
            // The broken stores: any claim takes the key, or any request
            // under it is the one it was first used for.
            Some(_) if !self.variant.key_claimed_once => ClaimDecision::Take,
            Some(r) if !self.variant.key_checks_fingerprint => rules::claim(
                existing,
                &IdemClaim {
                    fingerprint: r.fingerprint.clone(),
                    ..claim.clone()
                },
            ),
            _ => rules::claim(existing, claim),
        };
        match decision {
            ClaimDecision::Answer(outcome) => outcome,
            ClaimDecision::Take => {
                self.claim_token_seq += 1;
                let token = ClaimToken(self.claim_token_seq);
                self.tables.idem.insert(
                    key,
                    IdemRecord {
                        fingerprint: claim.fingerprint.clone(),
                        done: None,
                        lease_until: Some(claim.now_ms.saturating_add(claim.lease_ms)),
                        claim: Some(token),
                        expires_at: claim.now_ms.saturating_add(claim.ttl_ms),
                    },
                );
                ClaimOutcome::Claimed { token }
            }
        }
    }

    /// `Store::idem_release`: frees the record if this variant frees it for
    /// `token` ([`StoreVariant::frees`]); whether it did.
    pub fn release(&mut self, scope: &str, key: &str, token: ClaimToken) -> bool {
        let key = (scope.to_owned(), key.to_owned());
        let freed = self
            .tables
            .idem
            .get(&key)
            .is_some_and(|r| self.variant.frees(r, token));
        if freed {
            self.tables.idem.remove(&key);
        }
        freed
    }

    /// Opens `accounts` (id, opening balance) and places `orders` (id, account,
    /// amount) through the same rules, before the seed starts.
    pub fn open(&mut self, accounts: &[(String, i64)], orders: &[(String, String, i64)]) {
        let id = |s: &str| AccountId::parse(s).expect("well formed");
        let money = |m: i64| Money::amount(m).expect("in range");
        let mut cmds: Vec<Command> = accounts
            .iter()
            .map(|(a, balance)| {
                Op::CreateAccount {
                    id: id(a),
                    balance: money(*balance),
                    currency: Currency::parse("CNY").expect("well formed"),
                }
                .into()
            })
            .collect();
        cmds.extend(orders.iter().map(|(o, a, amount)| {
            Command::from(Op::CreateOrder {
                id: OrderId::parse(o).expect("well formed"),
                account_id: id(a),
                amount: money(*amount),
            })
        }));
        let created = self
            .apply(&cmds, 0)
            .expect("the seed's accounts and orders");
        assert!(created.iter().all(Result::is_ok), "{created:?}");
    }

    /// The debit entries of each order (`Debit` or `Capture`), in ledger order.
    pub fn debits(&self) -> BTreeMap<&OrderId, Vec<&Entry>> {
        let mut out: BTreeMap<&OrderId, Vec<&Entry>> = BTreeMap::new();
        for e in &self.tables.entries {
            if matches!(e.kind, EntryKind::Debit | EntryKind::Capture) {
                out.entry(&e.order_id).or_default().push(e);
            }
        }
        out
    }
}

/// A broken store's view of an ended two-phase order: still AUTHORIZED, with
/// its whole amount held and nothing captured.
fn still_held(o: Order) -> Order {
    if !o.is_two_phase() || o.status == OrderStatus::Authorized {
        return o;
    }
    Order {
        status: OrderStatus::Authorized,
        held: o.amount,
        captured: None,
        debit_entry_id: None,
        ..o
    }
}

/// A short form of a request, for the trace.
fn describe(req: &DbReq) -> String {
    let ops = |cmds: &[Command]| -> Vec<String> {
        cmds.iter()
            .map(|c| {
                let o = c.order_id().map(OrderId::as_str).unwrap_or("-");
                match c.fence {
                    Some(t) => {
                        format!("{}({o}@{:?})", c.family(), payguard::lock::token::unpack(t))
                    }
                    None => format!("{}({o})", c.family()),
                }
            })
            .collect()
    };
    match req {
        DbReq::Apply { xid, cmds, now, .. } => {
            format!("apply xid {xid} (started at {now} ms) {:?}", ops(cmds))
        }
        DbReq::Fate { xid } => format!("fate of xid {xid}"),
        DbReq::Settled { cmds, now } => format!("settled at {now} ms? {:?}", ops(cmds)),
        DbReq::NextFenceEpoch => "nextval(fence_epochs)".into(),
        DbReq::DueHolds { now_ms, .. } => format!("holds due at {now_ms} ms?"),
        DbReq::Claim(c) => format!("claim key {} at {} ms", c.key, c.now_ms),
        DbReq::Release { key, token, .. } => format!("release key {key} claim {}", token.0),
        DbReq::HookEndpoints { .. } => "webhook endpoints?".into(),
        DbReq::HookFanOut { now_ms } => format!("webhook fan-out at {now_ms} ms"),
        DbReq::HookClaim(c) => format!(
            "webhook claim by {} at {} ms {:?} (total {})",
            c.owner, c.now_ms, c.wants, c.total_max
        ),
        DbReq::HookRecord(rs) => format!(
            "webhook record {:?}",
            rs.iter()
                .map(|r| format!(
                    "{}/{}#{} by {}: {:?}",
                    r.endpoint_id, r.event_id, r.attempt, r.owner, r.next
                ))
                .collect::<Vec<_>>()
        ),
    }
}

/// A short form of an answer, for the trace.
pub fn describe_result(r: &OpResult) -> String {
    match r {
        Ok(payguard::store::Output::Movement {
            entry, replayed, ..
        }) => {
            format!(
                "entry {}{}",
                entry.id,
                if *replayed { " (replay)" } else { "" }
            )
        }
        Ok(_) => "ok".into(),
        Err(e) => e.reason().into(),
    }
}

fn describe_resp(resp: &DbResp) -> String {
    match resp {
        DbResp::Applied(Ok(r)) => {
            format!("{:?}", r.iter().map(describe_result).collect::<Vec<_>>())
        }
        DbResp::Applied(Err(e)) => format!("failed: {e}"),
        DbResp::Fate(c) => format!("committed: {c}"),
        DbResp::Settled(r) => format!(
            "{:?}",
            r.iter()
                .map(|a| a.as_ref().map_or("write".into(), describe_result))
                .collect::<Vec<_>>()
        ),
        DbResp::Epoch(e) => format!("epoch {e}"),
        DbResp::Due(ids) => format!("{:?}", ids.iter().map(OrderId::as_str).collect::<Vec<_>>()),
        DbResp::Claimed(outcome) => describe_claim(outcome),
        DbResp::Released(freed) => format!("freed {freed}"),
        DbResp::HookEndpoints(e) => format!("{} endpoints", e.len()),
        DbResp::FannedOut(n) => format!("{n} deliveries created"),
        DbResp::HookClaimed(c) => format!(
            "claimed {:?}",
            c.iter()
                .map(|c| format!("{}/{}#{}", c.endpoint_id, c.event.id, c.attempt))
                .collect::<Vec<_>>()
        ),
        DbResp::Recorded(kept) => format!("kept {kept:?}"),
    }
}

/// A short form of a claim's outcome, for the trace.
pub fn describe_claim(outcome: &ClaimOutcome) -> String {
    match outcome {
        ClaimOutcome::Claimed { token } => format!("claimed (claim {})", token.0),
        ClaimOutcome::Done {
            same_request,
            status,
            ..
        } => format!("done ({status}), same request: {same_request}"),
        ClaimOutcome::InFlight { same_request } => {
            format!("in flight, same request: {same_request}")
        }
    }
}

/// The database host's software. Its state survives a crash; the socket does not.
pub async fn serve(post: Post, state: Arc<Mutex<DbState>>, oracle: OracleRef) -> turmoil::Result {
    let server = Server::bind(post, DB_PORT).await?;
    loop {
        let req = server.recv().await?;
        let Some(body) = req.body.downcast_ref::<DbReq>().cloned() else {
            continue;
        };
        let now = now_ms();
        let resp = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exec(&body, now as i64);
        oracle.borrow_mut().note(now, || {
            format!("db: {} -> {}", describe(&body), describe_resp(&resp))
        });
        server.reply(&req, Box::new(resp)).await;
    }
}
