//! The store: the one place money moves, and the real guarantee of exactly once.
//!
//! The engine hands the store batches of [`Command`]s (an [`Op`], maybe with an
//! Idempotency-Key record and a fencing token); the store applies a batch in one
//! transaction and answers one [`OpResult`] per command, in order. A rejected op (not
//! enough money, a refund over the amount) is an answer, not a failure: it never
//! aborts the rest of its batch. A [`StoreError`] means the whole batch did not
//! commit and nothing it described moved, so the caller may retry.
//!
//! The schema enforces the promise by itself (see `sqlite/schema.sql` and
//! `postgres/schema.sql`, which hold the same rules): a unique
//! debit per order, a unique refund id, refunds never above the amount, balances
//! never negative, status changes only along the allowed transitions, an
//! append-only ledger. A double charge is refused by the database even if every
//! layer above it were wrong.
//!
//! Above the constraints, what each command does is decided once, for both
//! stores, by the pure money rules in [`rules`]; [`sqlite`] and [`postgres`] only
//! read the state the rules need and write what they decided, each in its own
//! dialect. Likewise what a store over a network does with a COMMIT whose
//! answer was lost is decided once, in [`commit_fate`].

pub mod commit_fate;
pub mod outbox;
pub mod postgres;
pub mod rules;
pub mod sqlite;

use crate::domain::{
    Account, AccountId, AuditReport, Currency, Entry, Event, Money, Order, OrderId, RefundId,
};
use outbox::{
    AttemptResult, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint, RetryOutcome,
};
use std::future::Future;
use std::pin::Pin;

/// One change the engine asks the store to make.
///
/// Two equal ops are the same request: the lane lets the second share the first's
/// result (single flight). That is why the whole body, not just the id, is part of
/// the equality: a refund id re-used with another amount must not share a result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    CreateAccount {
        id: AccountId,
        balance: Money,
        currency: Currency,
    },
    CreateOrder {
        id: OrderId,
        account_id: AccountId,
        amount: Money,
    },
    Deduct {
        order_id: OrderId,
    },
    Refund {
        order_id: OrderId,
        refund_id: RefundId,
        amount: Money,
    },
    /// Two-phase, step one: hold the order's amount on its account until
    /// `now + hold_ttl_ms` (the first hold stands; a duplicate replays it).
    Authorize {
        order_id: OrderId,
        hold_ttl_ms: i64,
    },
    /// Take `amount` (default: the whole hold) from the hold and release the rest.
    Capture {
        order_id: OrderId,
        amount: Option<Money>,
    },
    /// Release the hold at the caller's request.
    Void {
        order_id: OrderId,
    },
    /// Release the hold at `hold_expires_at` (the expiry sweeper's op).
    Expire {
        order_id: OrderId,
    },
}

/// What the store is asked to run: one [`Op`], with at most one Idempotency-Key
/// record to complete and at most one fencing token, each in the op's own
/// transaction. One flat value rather than wrappers around wrappers, so a
/// meaningless nesting (two keys, a key inside a token inside a key) cannot be
/// built and no consumer has to recurse to find the op.
///
/// Equal commands are the same request (single flight), as for [`Op`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Command {
    pub op: Op,
    /// The op's HTTP response is stored under this Idempotency-Key in the same
    /// transaction, so a crash can never leave a charge without its stored
    /// response or the reverse.
    pub idempotency: Option<IdemWrite>,
    /// The op is written under a lock whose fencing token is this: the store
    /// refuses it if its order was already written with a higher token.
    pub fence: Option<i64>,
}

impl Command {
    /// The op alone: no Idempotency-Key, no fencing token.
    pub fn new(op: Op) -> Self {
        Command {
            op,
            idempotency: None,
            fence: None,
        }
    }

    /// The same command, its response stored under `idem`.
    pub fn with_idempotency(self, idem: IdemWrite) -> Self {
        Command {
            idempotency: Some(idem),
            ..self
        }
    }

    /// The same command, written under fencing token `token`.
    pub fn fenced(self, token: i64) -> Self {
        Command {
            fence: Some(token),
            ..self
        }
    }

    /// Neither a fencing token to keep nor an Idempotency-Key record to complete:
    /// the only commands the committed state may answer without a write
    /// ([`rules::settled`]).
    pub fn is_plain(&self) -> bool {
        self.fence.is_none() && self.idempotency.is_none()
    }

    /// See [`Op::route_key`].
    pub fn route_key(&self) -> &str {
        self.op.route_key()
    }

    /// See [`Op::order_id`].
    pub fn order_id(&self) -> Option<&OrderId> {
        self.op.order_id()
    }

    /// See [`Op::family`].
    pub fn family(&self) -> &'static str {
        self.op.family()
    }
}

impl From<Op> for Command {
    fn from(op: Op) -> Self {
        Command::new(op)
    }
}

/// Renders an op's result as the exact HTTP response (status, body bytes) to
/// store, or `None` for results that must not be stored (they did nothing and
/// may be retried). Supplied by the HTTP layer; the store only calls it.
pub type Render = std::sync::Arc<dyn Fn(&OpResult) -> Option<(u16, Vec<u8>)> + Send + Sync>;

/// Where an idempotent op's response goes. Equal (for single flight) when scope,
/// key, fingerprint and claim are; the renderer is not part of the identity.
/// (Two claims of one key are two requests: after a lapsed lease, each must
/// complete or free only its own claim, so they are never merged.)
#[derive(Clone)]
pub struct IdemWrite {
    /// Hex SHA-256 of the caller's API key (or `anonymous`).
    pub scope: String,
    pub key: String,
    /// Hex SHA-256 of method, path and canonical body.
    pub fingerprint: String,
    /// How long the stored response is kept (ms).
    pub ttl_ms: i64,
    /// The claim this request holds on the key ([`ClaimOutcome::Claimed`]): the
    /// op's transaction frees the key only while the claim is still this one.
    pub claim: ClaimToken,
    pub render: Render,
}

impl PartialEq for IdemWrite {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope
            && self.key == other.key
            && self.fingerprint == other.fingerprint
            && self.claim == other.claim
    }
}

impl Eq for IdemWrite {}

impl std::hash::Hash for IdemWrite {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scope.hash(state);
        self.key.hash(state);
        self.fingerprint.hash(state);
        self.claim.hash(state);
    }
}

impl std::fmt::Debug for IdemWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdemWrite")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

/// A request to reserve an Idempotency-Key before running its op.
#[derive(Clone, Debug)]
pub struct IdemClaim {
    pub scope: String,
    pub key: String,
    pub fingerprint: String,
    pub now_ms: i64,
    /// How long an in-flight reservation holds if its instance dies.
    pub lease_ms: i64,
    pub ttl_ms: i64,
}

/// Names one claim of an Idempotency-Key: unique among all claims ever made in
/// one database (SQLite: a counter row; PostgreSQL: a sequence, so across every
/// instance that shares it), so a release or a completion that carries it
/// touches only the in-flight record of the request that made the claim, never
/// a claim another request took since (the first one's lease lapsed, or its
/// transaction committed and freed the key before its answer was lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimToken(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours under `token`: run the op (with [`Command::idempotency`]
    /// set and carrying `token`), and free it, if need be, with `token`.
    Claimed { token: ClaimToken },
    /// The first request finished: replay its response (when `same_request`).
    Done {
        same_request: bool,
        status: u16,
        body: Vec<u8>,
    },
    /// The first request is still running (its lease holds).
    InFlight { same_request: bool },
}

impl Op {
    /// The key that routes this op to a lane: all work on one order lands in one lane.
    pub fn route_key(&self) -> &str {
        match self {
            Op::CreateAccount { id, .. } => id.as_str(),
            Op::CreateOrder { id, .. } => id.as_str(),
            Op::Deduct { order_id }
            | Op::Refund { order_id, .. }
            | Op::Authorize { order_id, .. }
            | Op::Capture { order_id, .. }
            | Op::Void { order_id }
            | Op::Expire { order_id } => order_id.as_str(),
        }
    }

    /// The order this op concerns, if any (for the race sentinel and the cache).
    pub fn order_id(&self) -> Option<&OrderId> {
        match self {
            Op::CreateAccount { .. } => None,
            Op::CreateOrder { id, .. } => Some(id),
            Op::Deduct { order_id }
            | Op::Refund { order_id, .. }
            | Op::Authorize { order_id, .. }
            | Op::Capture { order_id, .. }
            | Op::Void { order_id }
            | Op::Expire { order_id } => Some(order_id),
        }
    }

    /// The log event prefix of money movements (`deduct`, `refund`, `authorize`,
    /// `capture`, `void`, `expire`; LOGS.md), else `create`.
    pub fn family(&self) -> &'static str {
        match self {
            Op::Deduct { .. } => "deduct",
            Op::Refund { .. } => "refund",
            Op::Authorize { .. } => "authorize",
            Op::Capture { .. } => "capture",
            Op::Void { .. } => "void",
            Op::Expire { .. } => "expire",
            Op::CreateAccount { .. } | Op::CreateOrder { .. } => "create",
        }
    }

    /// Whether the op moves money or holds on an order (everything but creates).
    pub fn is_movement(&self) -> bool {
        !matches!(self, Op::CreateAccount { .. } | Op::CreateOrder { .. })
    }
}

/// What a successful op produced. `created`/`replayed` tell the first execution
/// from a repeat that changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Account {
        account: Account,
        created: bool,
    },
    Order {
        order: Order,
        created: bool,
    },
    Movement {
        order: Order,
        entry: Entry,
        replayed: bool,
    },
}

impl Output {
    /// The order after this op, for the read cache.
    pub fn order(&self) -> Option<&Order> {
        match self {
            Output::Account { .. } => None,
            Output::Order { order, .. } | Output::Movement { order, .. } => Some(order),
        }
    }

    /// The ledger entry a movement answered with.
    pub fn entry(&self) -> Option<&Entry> {
        match self {
            Output::Movement { entry, .. } => Some(entry),
            Output::Account { .. } | Output::Order { .. } => None,
        }
    }

    /// The same result as seen by a duplicate that did not execute it.
    pub fn as_replay(&self) -> Output {
        match self.clone() {
            Output::Account { account, .. } => Output::Account {
                account,
                created: false,
            },
            Output::Order { order, .. } => Output::Order {
                order,
                created: false,
            },
            Output::Movement { order, entry, .. } => Output::Movement {
                order,
                entry,
                replayed: true,
            },
        }
    }

    pub fn is_replay(&self) -> bool {
        match self {
            Output::Account { created, .. } | Output::Order { created, .. } => !created,
            Output::Movement { replayed, .. } => *replayed,
        }
    }
}

/// Why an op was refused. No variant moved money out of a balance; two settle
/// the order as they refuse: `InsufficientFunds` (PREPARE → FAILED) and
/// `HoldLapsed` (the expiry's release, AUTHORIZED → EXPIRED). The others wrote
/// nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("account already exists with another opening balance or currency")]
    AccountExists,
    #[error("account not found")]
    AccountNotFound,
    #[error("order already exists with another account or amount")]
    OrderExists,
    #[error("order not found")]
    OrderNotFound,
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("order is not paid")]
    OrderNotPaid,
    #[error("refund id already used with another order or amount")]
    RefundExists,
    #[error("refund would exceed the amount paid")]
    RefundExceedsPaid,
    /// Capture or void of an order that was never authorized (or paid by deduct).
    #[error("order was not authorized")]
    OrderNotAuthorized,
    /// Deduct of an order that took the two-phase path.
    #[error("order was authorized; capture or void it")]
    OrderAuthorized,
    #[error("capture would exceed the hold")]
    CaptureExceedsHold,
    #[error("the hold was already captured")]
    HoldAlreadyCaptured,
    #[error("the hold was voided")]
    HoldVoided,
    #[error("the hold expired")]
    HoldExpired,
    /// A capture or void found its hold at or after `hold_expires_at` and still
    /// open, and wrote the expiry itself (the release entry, AUTHORIZED →
    /// EXPIRED, the `order.hold_expired` event) in its transaction. The client
    /// hears `hold_expired`, exactly as [`Rejection::HoldExpired`]; the variant
    /// exists so the engine counts and logs the expiry this request made.
    #[error("the hold expired")]
    HoldLapsed,
    /// The sweeper's expiry of a hold whose time has not come (its clock is
    /// behind the one that read the order): nothing moved, try later.
    #[error("the hold has not expired yet")]
    HoldNotExpired,
    /// A database constraint refused the change, or the money rules found the
    /// stored state could not take it (a refund that would overflow a balance).
    /// Only reachable if a layer above the database was wrong or the database was
    /// edited by hand; nothing of the change was kept.
    #[error("the database refused the change: {0}")]
    Refused(String),
    /// The op's lock token is older than one that already wrote the order: its
    /// lock expired while it waited and another holder took over.
    #[error("stale fencing token: the lock was lost before the write")]
    StaleFencingToken,
    /// Another instance held the order's lock for longer than the wait limit.
    #[error("the order's lock is held elsewhere; retry")]
    LockBusy,
    /// A keyed command whose Idempotency-Key already holds a stored answer for
    /// the same request ([`rules::answered`]): a committed transaction answered
    /// it (a batch rerun after its unanswered COMMIT did commit, or a repeat
    /// whose lease lapsed while another completed the key). Nothing was written
    /// and nothing was decided: the answer is the key's stored response, which
    /// the keyed sequence (`engine::keyed`) reads and answers instead. Never
    /// stored under the key, and never a client's answer itself.
    #[error("the request was already answered: its answer is stored under its Idempotency-Key")]
    KeyAnswered,
}

impl Rejection {
    /// The `reason` of a `*_rejected` log event.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::AccountExists => "account_exists",
            Rejection::AccountNotFound => "account_not_found",
            Rejection::OrderExists => "order_exists",
            Rejection::OrderNotFound => "order_not_found",
            Rejection::InsufficientFunds => "insufficient_funds",
            Rejection::OrderNotPaid => "order_not_paid",
            Rejection::RefundExists => "refund_exists",
            Rejection::RefundExceedsPaid => "refund_exceeds_paid",
            Rejection::OrderNotAuthorized => "order_not_authorized",
            Rejection::OrderAuthorized => "order_authorized",
            Rejection::CaptureExceedsHold => "capture_exceeds_hold",
            Rejection::HoldAlreadyCaptured => "hold_already_captured",
            Rejection::HoldVoided => "hold_voided",
            Rejection::HoldExpired | Rejection::HoldLapsed => "hold_expired",
            Rejection::HoldNotExpired => "hold_not_expired",
            Rejection::Refused(_) => "refused_by_database",
            Rejection::StaleFencingToken => "stale_fencing_token",
            Rejection::LockBusy => "lock_busy",
            Rejection::KeyAnswered => "key_answered",
        }
    }

    /// A definite answer about the order, safe to store and replay. The others
    /// (a refusal by the database, a lost or busy lock) moved nothing and a retry
    /// may well succeed; [`Rejection::KeyAnswered`] is no answer about the
    /// order at all (the key's stored one is), so it is never stored.
    pub fn is_definite(&self) -> bool {
        !matches!(
            self,
            Rejection::Refused(_)
                | Rejection::StaleFencingToken
                | Rejection::LockBusy
                | Rejection::HoldNotExpired
                | Rejection::KeyAnswered
        )
    }
}

pub type OpResult = Result<Output, Rejection>;

/// Whether the after-commit failpoint applies to a committed batch: it moved money
/// (a fresh debit or refund, not a replay). Always false, without looking at the
/// results, in builds without failpoints (the check sits on the commit path).
pub(crate) fn after_commit_failpoint_applies(results: &[OpResult]) -> bool {
    crate::failpoint::ENABLED
        && results.iter().any(|r| {
            matches!(
                r,
                Ok(Output::Movement {
                    replayed: false,
                    ..
                })
            )
        })
}

/// The store could not do the whole batch: nothing in it was committed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store is shut down")]
    Closed,
    #[error("database is not a payguard database or has the wrong schema: {0}")]
    Schema(String),
    /// The batch may or may not have committed, and the store could not learn
    /// which (PostgreSQL: an unanswered COMMIT whose fate could not be looked up).
    /// Never a 503, which promises that nothing moved: the same request, retried,
    /// reads back the truth (a replay, or a first charge).
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// What the engine and the HTTP layer need from a database.
/// One of a store's own counters, as `/metrics` exports it
/// (`payguard_store_<name>_total`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreCounter {
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, as `/healthz` reports it.
    fn kind(&self) -> &'static str;
    /// The store's own counters since start (PostgreSQL: retried batches,
    /// ambiguous COMMITs), read at each scrape of `/metrics`. None by default.
    fn counters(&self) -> Vec<StoreCounter> {
        Vec::new()
    }
    /// Applies `cmds` in one transaction; one result per command, in order.
    fn apply(&self, cmds: Vec<Command>) -> StoreFuture<Vec<OpResult>>;
    /// Applies one command in its own transaction that takes the database's write
    /// or row lock before re-reading the order (`--guard seed`: the write-up's fix).
    fn apply_isolated(&self, cmd: Command) -> StoreFuture<OpResult>;
    /// Answers, from the committed state and without writing or locking
    /// anything, the commands that state already settles ([`rules::settled`]: a
    /// replay, a definite refusal); `None` for each command that must run as a
    /// write. One snapshot for the whole call. With cross-instance locks, the
    /// engine asks this first for an order another instance just released.
    /// `now_ms` is the time the rules decide at (a hold's expiry), as for a write.
    fn settled(&self, cmds: Vec<Command>, now_ms: i64) -> StoreFuture<Vec<Option<OpResult>>>;
    fn account(&self, id: AccountId) -> StoreFuture<Option<Account>>;
    fn order(&self, id: OrderId) -> StoreFuture<Option<Order>>;
    /// The order's entries in commit order; `None` when the order does not exist.
    fn entries(&self, order_id: OrderId) -> StoreFuture<Option<Vec<Entry>>>;
    fn audit(&self) -> StoreFuture<AuditReport>;
    /// Up to `limit` AUTHORIZED orders whose hold expired at or before `now_ms`,
    /// oldest expiry first: the expiry sweeper's work (it expires each through
    /// the engine, where the money rules decide again).
    fn due_holds(&self, now_ms: i64, limit: usize) -> StoreFuture<Vec<OrderId>>;
    /// How many holds are open (AUTHORIZED orders), for `/metrics`.
    fn open_holds(&self) -> StoreFuture<u64>;
    /// Reserves an Idempotency-Key, or reports what holds it.
    fn idem_claim(&self, claim: IdemClaim) -> StoreFuture<ClaimOutcome>;
    /// Frees the in-flight reservation `token` made, whose op did nothing (503,
    /// 500). A no-op when the key holds anything else: a stored answer, another
    /// claim (taken after this one's lease lapsed, or after its transaction
    /// committed and freed the key), or nothing ([`rules::releases`]).
    fn idem_release(&self, scope: String, key: String, token: ClaimToken) -> StoreFuture<()>;
    /// Deletes stored responses that expired before `now_ms`; returns how many.
    fn idem_prune(&self, now_ms: i64) -> StoreFuture<u64>;
    /// A new fencing epoch from a sequence that only grows (see `lock::redis`).
    fn next_fence_epoch(&self) -> StoreFuture<i64>;
    /// Finishes queued work and releases the database. Later calls fail with `Closed`.
    fn close(&self) -> StoreFuture<()>;

    // Events and webhooks ([`outbox`]). The events are written by `apply`, in
    // each movement's own transaction.

    /// Committed events with `seq > after`, in `seq` order, at most `limit`. A
    /// reader that passes the last `seq` it saw misses none and sees none twice.
    fn events(&self, after: i64, limit: usize) -> StoreFuture<Vec<Event>>;
    /// Gives committed events their `seq` where the transaction could not
    /// (PostgreSQL; see `postgres/v5_events.sql`); returns how many it numbered.
    /// SQLite numbers events as it commits them: always 0. `wait`: when
    /// another instance is numbering right now, wait for it and number what is
    /// left (a reader that must see every event committed before it asked);
    /// otherwise leave the work to that instance.
    fn sequence_events(&self, wait: bool) -> StoreFuture<u64>;
    /// The feed's last `seq` (0: no event yet), for `/metrics`.
    fn last_event_seq(&self) -> StoreFuture<i64>;
    /// Stores a new endpoint; it receives the events committed after this.
    /// False when an endpoint with its id already exists (nothing written).
    fn webhook_create(&self, endpoint: Endpoint) -> StoreFuture<bool>;
    /// Every endpoint not deleted (`id`: only that one).
    fn webhook_endpoints(&self, id: Option<String>) -> StoreFuture<Vec<Endpoint>>;
    /// Deletes an endpoint (no more deliveries); false when there was none.
    fn webhook_delete(&self, id: String, now_ms: i64) -> StoreFuture<bool>;
    /// Turns newly sequenced events into deliveries for the endpoints they
    /// match; returns how many deliveries it created.
    fn webhook_fan_out(&self, now_ms: i64) -> StoreFuture<u64>;
    /// Leases due deliveries to one claimer.
    fn webhook_claim(&self, req: ClaimRequest) -> StoreFuture<Vec<Claimed>>;
    /// Logs attempts and, for each whose claimer still holds the lease, writes
    /// what it decided, in one transaction; returns whether each was kept.
    fn webhook_record(&self, results: Vec<AttemptResult>) -> StoreFuture<Vec<bool>>;
    /// An endpoint's deliveries with their attempts, newest event first.
    fn webhook_deliveries(
        &self,
        endpoint_id: String,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreFuture<Vec<Delivery>>;
    /// Sends a `failed` delivery again, now.
    fn webhook_retry(
        &self,
        endpoint_id: String,
        event_id: String,
        now_ms: i64,
    ) -> StoreFuture<RetryOutcome>;
    /// Per endpoint: undelivered deliveries and the oldest one's event time.
    fn webhook_backlog(&self) -> StoreFuture<Vec<Backlog>>;
}
