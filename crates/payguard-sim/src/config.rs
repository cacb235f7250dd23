//! The variants the simulation can run, and every limit of the simulation, in
//! one place.
//!
//! Times are simulated milliseconds (turmoil ticks one millisecond at a time).
//! They are scaled down from production (a 30 s lock TTL, a 5 s lock wait, a
//! 500 ms Redis timeout) so that one seed is a few hundred simulated
//! milliseconds and thousands of seeds fit in a CI run; what matters is their
//! order: a stall is longer than the TTL, a call's timeout shorter than a slow
//! link, a client may give up on an instance that is still working (so its
//! retry overlaps the original), the lock wait is shorter than the TTL (as in
//! production), and the TTL is longer than a healthy request's worst case, so
//! that the liveness check tells progress by release from progress by expiry
//! or by giving up.

use crate::db::StoreVariant;

/// What the simulated instances run. The default is payguard; each other
/// setting re-creates a broken design (or an old payguard), so a test can show
/// the checks catching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// How a batch takes its orders' locks.
    pub lock: LockProtocol,
    /// Which of its own rules the store keeps.
    pub store: StoreVariant,
    /// The engine's lanes forget the duplicates that joined an op by single
    /// flight (`payguard::engine::mutants`): they are never answered.
    pub lane_forgets_waiter: bool,
    /// The engine gives back the leases of all a batch's acquires in one
    /// release (`payguard::engine::mutants`), as it did before the refunds.
    pub release_acquires_as_one: bool,
    /// The lock client's old bug (fixed in e03f2f7): after raising the epoch,
    /// set the counter back to 1, racing with grants already made under it
    /// (`payguard::mutants::Mutant::ResetCounterOnNewEpoch`, in the real client).
    pub reset_counter_on_new_epoch: bool,
    /// A lock script's text the instances send instead of the shipped one (a
    /// broken variant of a script; `None`: payguard's scripts).
    pub script_swap: Option<ScriptSwap>,
    /// The clients also refund (a workload switch, not a rule): some orders get
    /// `REFUNDS_PER_ORDER` refund ids whose amounts may add up past the charge,
    /// each sent `DUPLICATES` times around the order's deduct. Drawn from their
    /// own random stream, so a seed's deducts and faults are the same either way.
    pub refunds: bool,
    /// The clients also pay in two phases (a workload switch): `TWO_PHASE_ORDERS`
    /// more orders are authorized (a hold, some expiring mid-run), then captured
    /// (whole or in part), voided, both at once, or left to expire, each request
    /// sent `DUPLICATES` times; some captured orders are refunded; every instance
    /// runs payguard's expiry sweeper. Drawn from their own random stream, so a
    /// seed's deducts, refunds and faults are the same either way.
    pub two_phase: bool,
    /// The clients send Idempotency-Keys (a workload switch): some requests
    /// carry one, are sent again under it once answered, and some keys are
    /// reused for another request ([`crate::keys`]). Drawn from their own
    /// random stream, so a seed's orders, refunds, holds and faults are the
    /// same either way.
    pub idempotency_keys: bool,
    /// The engine's sweeper loop ends at its first failed sweep
    /// (`payguard::engine::mutants::Mutant::SweeperDiesOnFailure`).
    pub sweeper_dies_on_failure: bool,
    /// The keyed sequence frees its key after a stale fencing token too
    /// (`payguard::engine::mutants::Mutant::ReleaseKeyAfterStaleToken`).
    pub release_key_after_stale_token: bool,
    /// payguard's commit-fate loop answers an unanswered COMMIT "nothing
    /// moved" without looking it up
    /// (`payguard::mutants::Mutant::UnansweredCommitGuessedAborted`).
    pub unanswered_commit_guessed_aborted: bool,
    /// payguard's commit-fate loop answers a failure after an attempt that
    /// committed "nothing moved"
    /// (`payguard::mutants::Mutant::CommittedAttemptForgotten`).
    pub committed_attempt_forgotten: bool,
    /// Each instance's clock is off by up to this many ms either way (its own
    /// random stream); 0: every host reads the one simulated clock. An
    /// instance decides its batches, its snapshot reads and its sweeps at its
    /// own clock, as payguard's PostgreSQL store and sweeper do.
    pub clock_skew_ms: i64,
    /// The Idempotency-Key claims and releases (`idem_claim`, `idem_release`)
    /// cross the simulated network to the database, as the money path does: a
    /// claim's answer can be lost (the claim taken, the request told 503) and a
    /// release can be lost or arrive late. Off: they read and write the
    /// database's state directly (no network draw, so the seeds pinned before
    /// this switch keep their schedules).
    pub keys_over_network: bool,
    /// Every instance runs payguard's webhook delivery loop
    /// (`payguard::outbox::delivery`, at the scaled `WEBHOOK_*` limits) over
    /// the database's outbox ([`crate::outbox`]), delivering every event to
    /// the seed's endpoints at a simulated receiver ([`crate::hooks`]) that
    /// sometimes fails or answers late; the seed then drains its deliveries
    /// and the webhook checks run. Off: no loop, no receiver host, no
    /// endpoint (the seeds pinned before this switch keep their schedules).
    pub webhooks: bool,
    /// payguard's delivery loop records an attempt that timed out as
    /// delivered (`payguard::mutants::Mutant::TimedOutAttemptRecordedDelivered`).
    pub timed_out_attempt_recorded_delivered: bool,
}

/// A lock script sent in place of a shipped one: `runs` whenever the client
/// evaluates `shipped` (one of `payguard::lock::redis::LOCK_SCRIPTS`). The
/// texts are `'static` so that a [`Protocol`] stays `Copy`: a test that edits
/// a shipped text leaks its edit once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ScriptSwap {
    pub shipped: &'static str,
    pub runs: &'static str,
}

impl std::fmt::Debug for ScriptSwap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use payguard::lock::redis::{ACQUIRE_MANY, RAISE_EPOCH, RELEASE_MANY};
        let name = [
            (ACQUIRE_MANY, "ACQUIRE_MANY"),
            (RAISE_EPOCH, "RAISE_EPOCH"),
            (RELEASE_MANY, "RELEASE_MANY"),
        ]
        .iter()
        .find(|(text, _)| *text == self.shipped)
        .map_or("a script", |(_, name)| name);
        write!(f, "{name} edited ({} bytes)", self.runs.len())
    }
}

/// How a lane's batch takes the Redis locks of its orders (issue #12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockProtocol {
    /// payguard: `ACQUIRE_MANY` in one round trip, busy orders parked until
    /// their release (the engine's `fenced_apply` over [`crate::locks::SimLocks`]).
    AcquireMany,
    /// payguard before issue #12: `join_all` of one waiting acquire per order,
    /// the locks already granted held meanwhile ([`crate::locks::JoinAll`]
    /// around the same service).
    JoinAll,
}

impl Protocol {
    /// payguard as it is.
    pub const PAYGUARD: Protocol = Protocol {
        lock: LockProtocol::AcquireMany,
        store: StoreVariant::PAYGUARD,
        lane_forgets_waiter: false,
        release_acquires_as_one: false,
        reset_counter_on_new_epoch: false,
        script_swap: None,
        refunds: true,
        two_phase: true,
        idempotency_keys: true,
        sweeper_dies_on_failure: false,
        release_key_after_stale_token: false,
        unanswered_commit_guessed_aborted: false,
        committed_attempt_forgotten: false,
        clock_skew_ms: 0,
        keys_over_network: false,
        webhooks: false,
        timed_out_attempt_recorded_delivered: false,
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

/// One order in `REFUND_ORDER_ONE_IN` gets refunds (with `Protocol::refunds`).
pub const REFUND_ORDER_ONE_IN: u32 = 2;
/// Refund ids per refunded order; each asks for 1/4 to 3/4 of the order's
/// amount, so two may add up past it (one is then `refund_exceeds_paid`).
pub const REFUNDS_PER_ORDER: usize = 2;
/// A refund is sent this many ms after its order's burst at most: some come
/// before the charge commits (`order_not_paid`), most after.
pub const REFUND_DELAY_MS_MAX: u64 = 20;
/// Salt of the refunds' own random stream (see `Protocol::refunds`).
pub const REFUND_RNG_SALT: u64 = 0x0005_eed0_f2ef_04d5;

/// Two-phase orders per seed (with `Protocol::two_phase`), on the same accounts
/// as the deducts, whose openings grow by what these orders need.
pub const TWO_PHASE_ORDERS: usize = 4;
/// Salt of the two-phase workload's own random stream.
pub const TWO_PHASE_RNG_SALT: u64 = 0x0002_9ba5_e0f4_01d5;
/// A short hold's TTL is drawn from this range: it expires mid-run, before,
/// during or after the captures and voids aimed at it.
pub const HOLD_TTL_MS_SHORT: std::ops::RangeInclusive<i64> = 20..=120;
/// A long hold outlives the seed (it is still open at the end).
pub const HOLD_TTL_MS_LONG: i64 = 60_000;
/// One hold in this many is long.
pub const LONG_HOLD_ONE_IN: u32 = 4;
/// Captures and voids aimed "soon" leave this long after the authorize.
pub const CAPTURE_DELAY_MS: std::ops::RangeInclusive<u64> = 5..=40;
/// Captures and voids aimed at the expiry leave within this of it, either side.
pub const EXPIRY_RACE_MS: i64 = 12;
/// A captured order's refunds leave this long after its capture is sent.
pub const TWO_PHASE_REFUND_DELAY_MS: std::ops::RangeInclusive<u64> = 5..=30;
/// Each instance's expiry sweeper ticks this often (production: 1 000 ms).
pub const SWEEP_INTERVAL_MS: u64 = 10;
/// A short hold still AUTHORIZED this long after its expiry (and after the
/// clients and the last fault ended) was never released: the sweeper failed.
/// Long enough for a writer stalled past its TTL and a lock wait that gives up.
pub const SWEEP_GRACE_MS: u64 = 4 * (STALL_MS_MAX + LOCK_WAIT_MS_MAX);

/// One request in this many (all copies of it: a deduct, a refund, an
/// authorize, a capture or a void) carries an Idempotency-Key.
pub const KEYED_ONE_IN: u32 = 3;
/// One keyed request in this many is followed, once it is answered, by
/// another request under the same key: a refund of 1 under a refund id of its
/// own (another body, and for a deduct or a two-phase step another path).
pub const KEY_REUSE_ONE_IN: u32 = 2;
/// A keyed request's follow-ups (the same request again, to another
/// instance, and the reuse) leave this long after its copies were answered.
pub const KEY_FOLLOW_UP_DELAY_MS: std::ops::RangeInclusive<u64> = 1..=40;
/// Salt of the Idempotency-Keys' own random stream.
pub const KEYS_RNG_SALT: u64 = 0x000b_e71d_e0ce_01d5;
/// The clients' scope (the server: the SHA-256 of their API key).
pub const KEY_SCOPE: &str = "sim-clients";
/// payguard-server's `IDEMPOTENCY_LEASE_MS` (30 000 ms), scaled to the hang
/// bound (`IN_FLIGHT_DRAIN_MS_MAX`), longer than any request stays in an
/// instance on a seed that passes: a live first request keeps its claim, a
/// crashed one's lapses within the seed.
pub const KEY_LEASE_MS: i64 = IN_FLIGHT_DRAIN_MS_MAX as i64;
/// payguard-server's `IDEMPOTENCY_WAIT_MS` (5 000 ms), scaled: a repeat waits
/// for the first request with its key as long as a healthy request may take.
pub const KEY_WAIT_MS: u64 = LIVENESS_BOUND_MS;
/// payguard-server's `IDEMPOTENCY_POLL_MS` (20 ms), scaled.
pub const KEY_POLL_MS: u64 = 2;
/// How long an answer is kept under its key (production: 24 h): the seed.
pub const KEY_TTL_MS: i64 = SIM_DURATION_MS_MAX as i64;

/// Salt of the instances' clock offsets' random stream (`Protocol::clock_skew_ms`).
pub const CLOCK_SKEW_RNG_SALT: u64 = 0x000c_10c5_0ff5_e7d5;

/// payguard instances in the simulation.
pub const INSTANCES: usize = 3;
/// Accounts opened per seed.
pub const ACCOUNTS: usize = 3;
/// Orders per seed, spread over the accounts.
pub const ORDERS: usize = 8;
/// Each order's deduct is sent this many times, copy `d` first to instance
/// `(order + d) % INSTANCES`: one copy to each instance, and the fourth again
/// to the first one's, so that within an instance duplicates join by single
/// flight (a double click), even on a seed with no fault and no retry.
pub const DUPLICATES: usize = 4;
/// Order amounts, minor units: drawn from this range.
pub const ORDER_AMOUNT_MIN: i64 = 100;
pub const ORDER_AMOUNT_MAX: i64 = 5_000;
/// One account in this many opens with half of what its orders need (so 402s happen).
pub const TIGHT_ACCOUNT_ONE_IN: u32 = 3;
/// The others open with this many times what their orders need: enough for a
/// double charge, so only the protocol (not a lack of funds) can stop one.
pub const OPENING_TIMES_OWED: std::ops::RangeInclusive<i64> = 2..=3;

/// The engine's lanes per instance (production: 16). Few, so that orders
/// share lanes and batches hold several orders.
pub const LANES: usize = 2;
/// The engine's `batch_max` (production: 256).
pub const BATCH_MAX: usize = 8;
/// The engine's `batch_wait_us` (production: 100 µs; one tick here).
pub const BATCH_WAIT_US: u64 = 1_000;
/// The engine's `lane_queue_depth_max`.
pub const LANE_QUEUE_DEPTH_MAX: usize = 256;

/// The lock's TTL (production: 30 000 ms).
pub const LOCK_TTL_MS: u64 = 150;
/// How long a busy order waits in all before 503 `LockBusy` (production
/// 5 000 ms; the lock service's `wait_max`). Shorter than the TTL, as in
/// production, so the old protocol's deadlock ends at this limit.
pub const LOCK_WAIT_MS_MAX: u64 = LOCK_TTL_MS * 2 / 3;
/// The old protocol's polling back-off: from this, doubling ...
pub const LOCK_RETRY_US_MIN: u64 = 200;
/// ... up to this.
pub const LOCK_RETRY_US_MAX: u64 = 10_000;
/// A parked order is retried after min(the holder's PTTL, this) even without a
/// release notification (production `RELEASE_WAIT_MS_MAX`: 250 ms).
pub const RELEASE_WAIT_MS_MAX: u64 = LOCK_TTL_MS / 3;
/// A waiter marker outlives the lease it waits on by this (production 1 000 ms).
pub const WAITER_MARK_GRACE_MS: u64 = 50;
/// A settled hint outlives its release by this (production 30 000 ms: longer
/// than a seed here too).
pub const SETTLED_HINT_MS: u64 = 5_000;
/// The release feed re-sends `SUBSCRIBE` this often; an unanswered one means
/// the subscription may have lapsed (the simulation's stand-in for a pub/sub
/// connection's loss, `locks::SimReleaseFeed`).
pub const SUBSCRIPTION_CHECK_MS: u64 = 20;
/// payguard's release subscriber pauses this long before subscribing again
/// (production `RESUBSCRIBE_PAUSE_MS`: 100 ms, a fifth of a Redis command's
/// timeout, as here).
pub const RESUBSCRIBE_PAUSE_MS: u64 = REDIS_COMMAND_TIMEOUT_MS / 5;
/// How long subscribing may take (production `SUBSCRIBE_TIMEOUT_MS`: 2 000 ms,
/// four command timeouts, since it opens a connection first). Here subscribing
/// is one round trip, so it gets a command's timeout less the pause: an
/// unanswered `SUBSCRIBE` is sent again one command timeout later, as the
/// simulation's own subscriber did before payguard's ran, so a seed whose
/// first `SUBSCRIBE` is lost (sent before Redis listens) keeps its schedule.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = REDIS_COMMAND_TIMEOUT_MS - RESUBSCRIBE_PAUSE_MS;
/// How long one Redis command may take before the lock counts as unavailable
/// (production: 500 ms). Longer than a healthy round trip at the highest
/// latency, so only a fault (a slow link, a partition, a loss) times a call out.
pub const REDIS_COMMAND_TIMEOUT_MS: u64 = 2 * LATENCY_MS_MAX + 4;

/// The store's deadline on one batch (PostgreSQL's `batch_deadline_ms`).
pub const BATCH_DEADLINE_MS: u64 = 30;
/// How long the store may take to learn an unanswered commit's fate
/// (production `RESOLVE_DEADLINE_MS`: 5 000 ms).
pub const RESOLVE_DEADLINE_MS: u64 = 60;
/// One fate look-up's timeout, and the pause after a failed one.
pub const FATE_CALL_TIMEOUT_MS: u64 = REDIS_COMMAND_TIMEOUT_MS;
pub const FATE_POLL_MS: u64 = 5;
/// Pause before re-running a batch after an unanswered commit, times the rerun
/// (production 50 ms).
pub const RERUN_BACKOFF_MS: u64 = 5;

/// Percent of fenced batches whose writer stalls before writing (GC pause,
/// SIGSTOP: after taking its locks), in seeds that are not calm.
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
/// ticks, and a datagram to a socket not yet bound is lost.
pub const SEND_START_MS: u64 = 2;
/// The burst instants lie within this window from the start.
pub const SEND_WINDOW_MS: u64 = 60;
/// The copies of one deduct leave within this many ms of each other ("at once").
pub const DUPLICATE_SPREAD_MS: u64 = 2;
/// A client waits this long for an answer before counting it unknown and trying
/// the next instance. Shorter than an instance's worst case (lock wait + stall +
/// calls), on purpose: a client giving up while its request is still being worked
/// on is how retries overlap the original in real life.
pub const CLIENT_TIMEOUT_MS: u64 = LOCK_TTL_MS + 60;
/// Attempts per request (anything but 200, 402 or a definite 409 is retried
/// on the next instance).
pub const CLIENT_ATTEMPTS_MAX: usize = 3;
/// Pause between a client's attempts.
pub const CLIENT_RETRY_MS: u64 = 15;

/// The liveness bound: in a seed with no fault, every request is answered
/// within one lock TTL plus the store's batch deadline.
pub const LIVENESS_BOUND_MS: u64 = LOCK_TTL_MS + BATCH_DEADLINE_MS;

/// Faults are injected within this window from the start.
pub const FAULT_WINDOW_MS: u64 = 180;
/// At most this many faults per seed.
pub const FAULTS_MAX: usize = 5;
/// A crashed host, or a partition, lasts up to this long.
pub const FAULT_DURATION_MS_MAX: u64 = 80;
/// The highest per-seed network latency (one way). Longer delays are faults
/// (slow links).
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
/// A request still inside an instance this long after the clients are done
/// and the last fault healed is a hang (every wait of the engine, the store
/// and the lock service is bounded far below it).
pub const IN_FLIGHT_DRAIN_MS_MAX: u64 = 1_000;
/// A seed that has not finished by then is itself a failure (a hang).
pub const SIM_DURATION_MS_MAX: u64 = 20_000;

// The orderings the comments above rely on, checked when the crate compiles.
const _: () = {
    assert!(LOCK_WAIT_MS_MAX < LOCK_TTL_MS);
    assert!(REDIS_COMMAND_TIMEOUT_MS > 2 * LATENCY_MS_MAX);
    assert!(BATCH_DEADLINE_MS > 2 * LATENCY_MS_MAX);
    assert!(SLOW_LINK_MS_MAX > REDIS_COMMAND_TIMEOUT_MS);
    assert!(STALL_MS_MIN > LOCK_TTL_MS);
    assert!(RELEASE_WAIT_MS_MAX < LOCK_WAIT_MS_MAX);
    assert!(SUBSCRIPTION_CHECK_MS >= REDIS_COMMAND_TIMEOUT_MS);
    // A feed that fails at once never spins within one instant, and a lapse
    // costs a waiter less than its fallback.
    assert!(RESUBSCRIBE_PAUSE_MS > 0);
    assert!(RESUBSCRIBE_PAUSE_MS < RELEASE_WAIT_MS_MAX);
    assert!(SUBSCRIBE_TIMEOUT_MS > 2 * LATENCY_MS_MAX);
    assert!(CLIENT_TIMEOUT_MS < LOCK_WAIT_MS_MAX + STALL_MS_MIN);
    assert!(CLIENT_TIMEOUT_MS > LIVENESS_BOUND_MS);
    assert!(SWEEP_INTERVAL_MS < LIVENESS_BOUND_MS);
    assert!((*HOLD_TTL_MS_SHORT.end() as u64) < FAULT_WINDOW_MS);
    assert!(KEY_WAIT_MS < CLIENT_TIMEOUT_MS);
    assert!(HOLD_TTL_MS_LONG as u64 > SIM_DURATION_MS_MAX);
    assert!(WEBHOOK_TIMEOUT_MS > 2 * LATENCY_MS_MAX);
    assert!(WEBHOOK_LEASE_MS > WEBHOOK_TIMEOUT_MS as i64 + 2 * LATENCY_MS_MAX as i64);
    assert!(RECEIVER_SLOW_MS > WEBHOOK_TIMEOUT_MS);
    assert!(RECEIVER_FAILS_PER_DELIVERY_MAX < WEBHOOK_RETRY_MAX);
    // A receiver down or cut off for a whole fault is retried past it: the
    // retries' total wait outlasts the longest fault, so no delivery is
    // `failed` by a fault alone.
    assert!(
        WEBHOOK_RETRY_DELAYS_MS[WEBHOOK_RETRY_DELAYS_MS.len() - 1]
            * (WEBHOOK_RETRY_MAX as i64 - WEBHOOK_RETRY_DELAYS_MS.len() as i64)
            > FAULT_DURATION_MS_MAX as i64 + SLOW_LINK_MS_MAX as i64
    );
    assert!(WEBHOOK_PER_ENDPOINT_MAX < WEBHOOK_INFLIGHT_MAX);
};

/// The delivery loop's tick (production `DELIVERY_TICK_MS`: 100 ms).
pub const WEBHOOK_TICK_MS: u64 = 10;
/// One attempt's deadline (production `DELIVERY_TIMEOUT_MS`: 15 000 ms):
/// longer than a healthy round trip to the receiver at the highest latency.
pub const WEBHOOK_TIMEOUT_MS: u64 = 15;
/// How long a claim's lease runs (production `DELIVERY_LEASE_MS`: the
/// timeout plus 15 s): the timeout plus as much again.
pub const WEBHOOK_LEASE_MS: i64 = 2 * WEBHOOK_TIMEOUT_MS as i64;
/// The wait after attempt k fails (production `RETRY_DELAYS_MS`: 5 s, 5 min,
/// 30 min, 2 h, 5 h, 10 h, 10 h), the last one repeating.
pub const WEBHOOK_RETRY_DELAYS_MS: [i64; 4] = [5, 10, 20, 40];
/// Attempts per delivery before it is `failed` (production default 8): room
/// for the receiver's failures ([`RECEIVER_FAILS_PER_DELIVERY_MAX`]) and for
/// attempts the faults cost (a claim whose answer is lost, a crashed claimer).
pub const WEBHOOK_RETRY_MAX: u32 = 12;
/// Attempts in flight from one instance in all, and to one endpoint
/// (production 256 and 64): small, so the room limits are met.
pub const WEBHOOK_INFLIGHT_MAX: usize = 6;
pub const WEBHOOK_PER_ENDPOINT_MAX: usize = 4;
/// The receiver's port.
pub const RECEIVER_PORT: u16 = 8443;
/// Per seed, the percent of attempts the receiver fails (drawn from these),
/// half answered 500 at once, half answered 504 after
/// [`RECEIVER_SLOW_MS`] (past the attempt's timeout).
pub const RECEIVER_FAIL_PERCENT_CHOICES: [u32; 3] = [0, 15, 40];
/// A slow answer comes this long after the attempt arrived.
pub const RECEIVER_SLOW_MS: u64 = WEBHOOK_TIMEOUT_MS + 10;
/// The receiver fails at most this many attempts of one delivery; then it
/// answers 200.
pub const RECEIVER_FAILS_PER_DELIVERY_MAX: u32 = 2;
/// With webhooks, at most this many faults of the receiver per seed that has
/// faults (its host down, cut off from an instance, or its link to an
/// instance slow past the attempt timeout), drawn from their own stream
/// ([`RECEIVER_FAULT_RNG_SALT`]) after the seed's other faults, so those stay
/// as they are; timed and bounded like them ([`FAULT_WINDOW_MS`],
/// [`FAULT_DURATION_MS_MAX`], [`SLOW_LINK_MS_MAX`]).
pub const RECEIVER_FAULTS_MAX: usize = 2;
/// Salt of the receiver's faults' random stream.
pub const RECEIVER_FAULT_RNG_SALT: u64 = 0x000e_bb00_fa17_01d5;
/// Salt of the receiver's own random stream.
pub const RECEIVER_RNG_SALT: u64 = 0x000e_bb00_c5e1_01d5;
/// With webhooks, a seed runs until no delivery is left pending (or this
/// long after the clients and the last fault ended: the check then names
/// what was left).
pub const WEBHOOK_DRAIN_MS_MAX: u64 = 3_000;
/// How long a due delivery may wait for room behind the seed's other
/// deliveries (a seed's few dozen fit the instances' room a few times over).
pub const WEBHOOK_ROOM_WAIT_MS: u64 = 100;
/// On a seed with no fault, every delivery is `delivered` within this of its
/// event's commit: ticks to be fanned out and claimed, then per failure of
/// the receiver (at most [`RECEIVER_FAILS_PER_DELIVERY_MAX`]) a late answer,
/// a retry delay and a tick, plus [`WEBHOOK_ROOM_WAIT_MS`].
pub const WEBHOOK_LIVENESS_MS: u64 = 4 * WEBHOOK_TICK_MS
    + RECEIVER_FAILS_PER_DELIVERY_MAX as u64
        * (RECEIVER_SLOW_MS + WEBHOOK_RETRY_DELAYS_MS[1] as u64 + WEBHOOK_TICK_MS)
    + WEBHOOK_ROOM_WAIT_MS;

/// Seeds run by `cargo test` unless `PAYGUARD_SIM_SEEDS` says otherwise.
pub const CI_SEEDS: u64 = 1_000;
/// Worker threads for a batch of seeds (each seed is one single-threaded simulation).
pub const SEED_THREADS_MAX: usize = 2;
