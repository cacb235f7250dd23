//! The protocol switches and every limit of the simulation, in one place.
//!
//! Times are simulated milliseconds (turmoil ticks one millisecond at a time).
//! They are scaled down from production (a 30 s lock TTL, 500 ms Redis timeout) so
//! that one seed is a few hundred simulated milliseconds and hundreds of seeds
//! fit in a CI run; what matters is their order: a stall is longer than the TTL,
//! a Redis call's timeout shorter than a slow link, a client may give up on an
//! instance that is still working (so its retry overlaps the original), and the
//! TTL is longer than a healthy request's worst case (three duplicates of an
//! order taking its lock one after the other on three instances, at the highest
//! latency), so that the liveness check ("answered within one TTL when nothing is
//! broken") tells progress by release from progress by expiry or by giving up.

/// Which safety mechanisms the simulated protocol runs with. The default is
/// payguard's protocol; flipping any one re-creates a broken design (or an old
/// payguard), so a test can show the checker catching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// The database refuses a write whose token is lower than the order's fence.
    pub fencing: bool,
    /// The old bug (fixed in e03f2f7): after raising the epoch, set the counter
    /// back to 1, racing with grants already made under the new epoch.
    pub reset_counter_on_new_epoch: bool,
    /// The database allows one debit per order and checks the status inside the
    /// deduct's own transaction. Off, an instance reads the order, then debits
    /// unconditionally (the incident's check-then-act), relying on lock + fence.
    pub db_unique_debit: bool,
    /// `RAISE_EPOCH` refuses when the fence hash is not the incarnation the
    /// caller's `ACQUIRE` saw (a flush re-created it), so an epoch taken before a
    /// flush cannot be raised after it; the refused holder gives the lock back
    /// and acquires again. Off is payguard before this simulation found the gap
    /// (seed 2424: a raise delayed across a flush wedged an order).
    pub raise_epoch_checks_incarnation: bool,
    /// How a batch takes the locks of its orders.
    pub lock: LockProtocol,
}

/// How a lane's batch takes the Redis locks of its orders (issue #12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockProtocol {
    /// payguard before issue #12: `join_all` of one waiting `acquire` per order,
    /// each polling with back-off up to [`LOCK_WAIT_MS_MAX`] while the locks
    /// already granted stay held. Two instances each holding a lock the other's
    /// batch waits for stay stuck until the wait limit, then answer `LockBusy`.
    JoinAll,
    /// Issue #12: one `ACQUIRE_MANY` round trip takes every free lock of the batch
    /// and waits for none; a busy order leaves the batch and parks in its lane
    /// (leaving a waiter marker in Redis) until `RELEASE_MANY` publishes its
    /// release, or a fallback timer fires. Nothing waits while holding a lock.
    AcquireMany,
}

impl Protocol {
    /// payguard as it is.
    pub const PAYGUARD: Protocol = Protocol {
        fencing: true,
        reset_counter_on_new_epoch: false,
        db_unique_debit: true,
        raise_epoch_checks_incarnation: true,
        lock: LockProtocol::AcquireMany,
    };

    /// payguard before issue #12: batches take their locks with `join_all`.
    pub const JOIN_ALL: Protocol = Protocol {
        lock: LockProtocol::JoinAll,
        ..Protocol::PAYGUARD
    };
}

impl Default for Protocol {
    fn default() -> Self {
        Self::PAYGUARD
    }
}

/// payguard instances in the simulation.
pub const INSTANCES: usize = 3;
/// Accounts opened per seed.
pub const ACCOUNTS: usize = 3;
/// Orders per seed, spread over the accounts.
pub const ORDERS: usize = 8;
/// Each order's deduct is sent this many times, each copy to a different instance.
pub const DUPLICATES: usize = 3;
/// Order amounts, minor units: drawn from this range.
pub const ORDER_AMOUNT_MIN: i64 = 100;
pub const ORDER_AMOUNT_MAX: i64 = 5_000;
/// One account in this many opens with half of what its orders need (so 402s happen).
pub const TIGHT_ACCOUNT_ONE_IN: u32 = 3;
/// The others open with this many times what their orders need: enough for a
/// double charge, so only the protocol (not a lack of funds) can stop one.
pub const OPENING_TIMES_OWED: std::ops::RangeInclusive<i64> = 2..=3;

/// Lanes per instance (production: 16). Orders are routed with payguard's own
/// `lane_for`, so every instance puts an order in the same lane.
pub const LANES: usize = 2;
/// Most orders in one batch (production `batch_max`: 256 ops).
pub const BATCH_ORDERS_MAX: usize = 8;
/// How long a lane waits for more work before sending a batch that is not full,
/// when no batch is in flight (production `batch_wait_us`: 100 µs; one tick here).
pub const BATCH_WAIT_MS: u64 = 1;
/// Requests one lane's queue holds before new ones are refused (503).
pub const LANE_QUEUE_DEPTH_MAX: usize = 256;

/// The lock's TTL (production: 30 000 ms). Also the liveness bound: in a seed
/// with no fault, every request is answered within this.
pub const LOCK_TTL_MS: u64 = 150;
/// How long a request waits for a held lock before answering 503 (production:
/// 5 000 ms). Shorter than the TTL, as in production, so the old protocol's
/// deadlock ends at this limit with `LockBusy`, as it did in issue #12 (a
/// stalled holder's lease still runs out while clients retry elsewhere).
pub const LOCK_WAIT_MS_MAX: u64 = LOCK_TTL_MS * 2 / 3;
/// Back-off between attempts on a held lock: from this, doubling (as `RedisLocks::acquire`).
pub const LOCK_RETRY_US_MIN: u64 = 200;
/// ... up to this.
pub const LOCK_RETRY_US_MAX: u64 = 10_000;
/// `ACQUIRE_MANY` rounds per batch when `RAISE_EPOCH` is refused (the fence hash
/// was re-created under the batch): past this, Redis counts as unavailable.
pub const ACQUIRE_MANY_ATTEMPTS_MAX: usize = 3;
/// A parked order is retried after min(the holder's PTTL, this) even without a
/// release notification (lost message, dead holder).
pub const RELEASE_WAIT_MS_MAX: u64 = LOCK_TTL_MS / 3;
/// Release notifications are remembered this long, so one that arrives between
/// `ACQUIRE_MANY`'s reply and the parking still wakes the order. Longer than a
/// Redis call may take.
pub const RELEASE_NOTICE_KEEP_MS: u64 = 4 * REDIS_COMMAND_TIMEOUT_MS;
/// Release notifications remembered at most (oldest forgotten first).
pub const RELEASE_NOTICES_MAX: usize = 1_024;
/// The subscriber re-sends `SUBSCRIBE` this often; an unanswered one means the
/// subscription may have lapsed (a real client sees its connection drop).
pub const SUBSCRIPTION_CHECK_MS: u64 = 20;
/// How long one Redis command may take before the lock counts as unavailable
/// (production: 500 ms). Longer than a healthy round trip at the highest
/// latency, so only a fault (a slow link, a partition, a loss) times a call out.
pub const REDIS_COMMAND_TIMEOUT_MS: u64 = 2 * LATENCY_MS_MAX + 4;
/// How long one database call may take before the instance answers "unknown".
pub const DB_CALL_TIMEOUT_MS: u64 = 30;

/// Percent of batch writes before which the writer stalls (GC pause, SIGSTOP:
/// after taking its locks, before writing), in seeds that are not calm.
pub const STALL_PERCENT: u32 = 20;
/// A stall lasts between these (always longer than [`LOCK_TTL_MS`]).
pub const STALL_MS_MIN: u64 = LOCK_TTL_MS + 10;
pub const STALL_MS_MAX: u64 = LOCK_TTL_MS * 2;
/// One seed in this many is calm: no fault, no message loss, no stall, so the
/// liveness check applies (other seeds that happen to draw none count too).
pub const CALM_SEED_ONE_IN: u32 = 3;

/// Deducts are sent in bursts: each order picks one of up to this many instants.
pub const SEND_BURSTS_MAX: usize = 3;
/// No deduct leaves before this: every host binds its sockets in the first
/// tick, and a datagram to a socket not yet bound is lost.
pub const SEND_START_MS: u64 = 1;
/// The burst instants lie within this window from the start.
pub const SEND_WINDOW_MS: u64 = 60;
/// The copies of one deduct leave within this many ms of each other ("at once").
pub const DUPLICATE_SPREAD_MS: u64 = 2;
/// A client waits this long for an answer before counting it unknown and trying
/// the next instance. Shorter than an instance's worst case (lock wait + stall +
/// calls), on purpose: a client giving up while its request is still being worked
/// on is how retries overlap the original in real life.
pub const CLIENT_TIMEOUT_MS: u64 = LOCK_TTL_MS + 60;
/// Attempts per deduct (503 or no answer is retried on the next instance).
pub const CLIENT_ATTEMPTS_MAX: usize = 3;
/// Pause between a client's attempts.
pub const CLIENT_RETRY_MS: u64 = 15;

/// Faults are injected within this window from the start.
pub const FAULT_WINDOW_MS: u64 = 180;
/// At most this many faults per seed.
pub const FAULTS_MAX: usize = 5;
/// A crashed host, or a partition, lasts up to this long.
pub const FAULT_DURATION_MS_MAX: u64 = 80;
/// The highest per-seed network latency (one way). Kept under a fortieth of the
/// TTL: a healthy request's worst case is about 40 one-way trips (a batch in
/// flight before it, two rounds parked behind the other two duplicates' holders,
/// each holder's write and release, its own batch), and the liveness check
/// holds every request of a seed with no fault to one TTL. Longer delays are
/// faults (slow links).
pub const LATENCY_MS_MAX: u64 = 3;
/// Network latency per seed: the maximum is drawn from these.
pub const LATENCY_MS_MAX_CHOICES: [u64; 3] = [1, 2, LATENCY_MS_MAX];
/// A slow-link fault delays every message on it by up to this (longer than a
/// Redis command's timeout, so some calls time out while they are applied).
pub const SLOW_LINK_MS_MAX: u64 = 40;
/// Message loss per seed (turmoil's random link failure rate): drawn from these.
pub const FAIL_RATE_CHOICES: [f64; 3] = [0.0, 0.01, 0.05];
/// After the clients are done, the last fault healed and the last deduct in an
/// instance ended, run this much longer before the final check: a call that timed
/// out may still be on a slow link, and reach the database after its caller gave up.
pub const DRAIN_QUIET_MS: u64 = SLOW_LINK_MS_MAX + 4 * LATENCY_MS_MAX + 10;
/// A seed that has not finished by then is itself a failure (a hang).
pub const SIM_DURATION_MS_MAX: u64 = 20_000;
/// Largest datagram the simulated wire protocol sends.
pub const DATAGRAM_BYTES_MAX: usize = 4_096;

// The orderings the comments above rely on, checked when the crate compiles.
const _: () = {
    assert!(LOCK_WAIT_MS_MAX < LOCK_TTL_MS);
    assert!(40 * LATENCY_MS_MAX <= LOCK_TTL_MS);
    assert!(REDIS_COMMAND_TIMEOUT_MS > 2 * LATENCY_MS_MAX);
    assert!(DB_CALL_TIMEOUT_MS > 2 * LATENCY_MS_MAX);
    assert!(SLOW_LINK_MS_MAX > REDIS_COMMAND_TIMEOUT_MS);
    assert!(STALL_MS_MIN > LOCK_TTL_MS);
    assert!(RELEASE_WAIT_MS_MAX < LOCK_WAIT_MS_MAX);
    assert!(RELEASE_NOTICE_KEEP_MS > REDIS_COMMAND_TIMEOUT_MS);
    assert!(SUBSCRIPTION_CHECK_MS >= REDIS_COMMAND_TIMEOUT_MS);
    assert!(CLIENT_TIMEOUT_MS < LOCK_WAIT_MS_MAX + STALL_MS_MIN);
};

/// Seeds run by `cargo test` unless `PAYGUARD_SIM_SEEDS` says otherwise.
pub const CI_SEEDS: u64 = 300;
/// Worker threads for a batch of seeds (each seed is one single-threaded simulation).
pub const SEED_THREADS_MAX: usize = 2;
