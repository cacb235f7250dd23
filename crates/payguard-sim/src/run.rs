//! One seed from start to verdict, and batches of seeds.
//!
//! Why here: the seed is the whole test case. It decides the scenario (accounts,
//! orders, when each duplicate is sent and where), the network (latency, loss),
//! the faults and when they strike (Redis `FLUSHALL`, Redis restart, instance
//! crash + restart, database restart, partitions between any instance and Redis,
//! the database or the clients, slow links to Redis or the database), and it
//! seeds turmoil and every host's RNG. A failing seed is therefore a complete,
//! replayable bug report. The scenario and the faults are drawn whole before
//! the run, every request and fault numbered ([`schedule`]), so a
//! [`Mask`] can remove some of them and leave the rest as drawn
//! ([`crate::shrink`]).
//!
//! One seed in [`CALM_SEED_ONE_IN`] is calm: no fault, no message loss, no
//! stall. On such a seed (and on any other that happens to draw none) the
//! liveness check applies: every request answered 200, 402 or a definite 409,
//! each within one lock TTL plus the store's batch deadline
//! ([`LIVENESS_BOUND_MS`]). The safety checks apply to every seed, and so does
//! the sweepers' liveness: a seed runs until no short hold is left AUTHORIZED,
//! or until [`SWEEP_GRACE_MS`] after its expiry, the clients and the faults.

use crate::checks;
use crate::client::{self, Flow, FollowUps, Send};
use crate::config::*;
use crate::db::{self, DbState};
use crate::hooks;
use crate::instance::{self, Instance};
use crate::keys;
use crate::oracle::{Oracle, OracleRef, Stats, Violation, ViolationKind};
use crate::redis::{self, RedisState, SharedRedis};
use crate::shrink::Mask;
use crate::two_phase;
use crate::wire::{instance_host, Ask, Post, CLIENT_HOST, DB_HOST, REDIS_HOST};
use crate::Protocol;
use payguard::domain::OrderStatus;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The verdict on one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub stats: Stats,
    /// Simulated time the seed took.
    pub sim_ms: u64,
    /// Everything observable at the end, for comparing two replays.
    pub fingerprint: String,
    /// What happened, when asked for ([`run_seed_traced`]).
    pub trace: Vec<String>,
    /// Events in the schedule (kept in `trace` or not): how long it is.
    pub events: u64,
    /// Requests and faults planned (after a [`Mask`]): how big it is.
    pub planned: usize,
    /// No fault, message loss or stall happened: liveness was checked.
    pub fault_free: bool,
}

impl Outcome {
    pub fn has(&self, kind: ViolationKind) -> bool {
        self.violations.iter().any(|v| v.kind == kind)
    }
}

/// A fault, as the seed schedules it.
#[derive(Debug, Clone)]
enum Action {
    Flush,
    Crash(String),
    Bounce(String),
    Partition(String, String),
    Repair(String, String),
    /// Every message between the two takes this long (a GC'd peer, a congested link).
    Slow(String, String, u64),
    /// Back to the seed's latency.
    Fast(String, String),
}

/// The kinds of fault a seed draws from, each entry equally likely. `FLUSHALL` is
/// listed twice: losing the fence hash is what the epoch logic exists for.
#[derive(Debug, Clone, Copy)]
enum FaultKind {
    RedisFlush,
    RedisRestart,
    InstanceCrash,
    DbRestart,
    /// An instance cut off from this host.
    Partition(&'static str),
    /// Every message between an instance and this host slowed down.
    SlowLink(&'static str),
}

const FAULT_KINDS: [FaultKind; 10] = [
    FaultKind::RedisFlush,
    FaultKind::RedisFlush,
    FaultKind::RedisRestart,
    FaultKind::InstanceCrash,
    FaultKind::DbRestart,
    FaultKind::Partition(REDIS_HOST),
    FaultKind::Partition(DB_HOST),
    FaultKind::Partition(CLIENT_HOST),
    FaultKind::SlowLink(REDIS_HOST),
    FaultKind::SlowLink(DB_HOST),
];

/// The seed's faults: (when, which fault, what), in time order; a fault's
/// number is the order it was drawn in (a [`Mask`] names it).
fn draw_faults(rng: &mut SmallRng) -> Vec<(u64, usize, Action)> {
    let mut out = Vec::new();
    for fault in 0..rng.random_range(0..=FAULTS_MAX) {
        let at = rng.random_range(0..FAULT_WINDOW_MS);
        let until = at + rng.random_range(1..=FAULT_DURATION_MS_MAX);
        let inst = instance_host(rng.random_range(0..INSTANCES));
        let mut down = |host: String| {
            out.push((at, fault, Action::Crash(host.clone())));
            out.push((until, fault, Action::Bounce(host)));
        };
        match FAULT_KINDS[rng.random_range(0..FAULT_KINDS.len())] {
            FaultKind::RedisFlush => out.push((at, fault, Action::Flush)),
            FaultKind::RedisRestart => down(REDIS_HOST.to_owned()),
            FaultKind::InstanceCrash => down(inst),
            FaultKind::DbRestart => down(DB_HOST.to_owned()),
            FaultKind::Partition(other) => {
                out.push((at, fault, Action::Partition(inst.clone(), other.to_owned())));
                out.push((until, fault, Action::Repair(inst, other.to_owned())));
            }
            FaultKind::SlowLink(other) => {
                let ms = rng.random_range(1..=SLOW_LINK_MS_MAX);
                out.push((at, fault, Action::Slow(inst.clone(), other.to_owned(), ms)));
                out.push((until, fault, Action::Fast(inst, other.to_owned())));
            }
        }
    }
    // Stable: two actions at the same ms keep the order they were drawn in.
    out.sort_by_key(|(at, _, _)| *at);
    out
}

/// What a seed opens before the clients start, and the requests they send.
struct Scenario {
    accounts: Vec<(String, i64)>,
    /// Per account: it opens with half of what its deducts need.
    tight: Vec<bool>,
    orders: Vec<(String, String, i64)>,
    /// The instants the deducts go out at.
    bursts: Vec<u64>,
    plan: Vec<Send>,
    /// Two-phase payments (with `Protocol::two_phase`).
    flows: Vec<Flow>,
    /// What the plan's keyed requests send once answered (with
    /// `Protocol::idempotency_keys`).
    follow_ups: FollowUps,
}

fn draw_scenario(rng: &mut SmallRng) -> Scenario {
    let amounts: Vec<i64> = (0..ORDERS)
        .map(|_| rng.random_range(ORDER_AMOUNT_MIN..=ORDER_AMOUNT_MAX))
        .collect();
    let mut accounts = Vec::new();
    let mut tight = Vec::new();
    for a in 0..ACCOUNTS {
        let owed: i64 = amounts.iter().skip(a).step_by(ACCOUNTS).sum();
        tight.push(rng.random_ratio(1, TIGHT_ACCOUNT_ONE_IN));
        let opening = if tight[a] {
            owed / 2
        } else {
            // Enough for a double charge too, so only the protocol can stop one.
            owed * rng.random_range(OPENING_TIMES_OWED)
        };
        accounts.push((format!("acct{a}"), opening));
    }
    // Orders come in bursts, so lanes on every instance batch several at once,
    // each order's copies on different instances: the old deadlock's setting.
    let bursts: Vec<u64> = (0..rng.random_range(1..=SEND_BURSTS_MAX))
        .map(|_| rng.random_range(SEND_START_MS..SEND_WINDOW_MS))
        .collect();
    let mut orders = Vec::new();
    let mut plan = Vec::new();
    for (k, amount) in amounts.into_iter().enumerate() {
        let order = format!("order{k}");
        orders.push((order.clone(), format!("acct{}", k % ACCOUNTS), amount));
        let base = bursts[rng.random_range(0..bursts.len())];
        for d in 0..DUPLICATES {
            plan.push(Send {
                order: order.clone(),
                ask: Ask::Deduct,
                at_ms: base + rng.random_range(0..=DUPLICATE_SPREAD_MS),
                first_instance: (k + d) % INSTANCES,
                key: None,
                reuses_key: false,
                id: 0,
            });
        }
    }
    Scenario {
        accounts,
        tight,
        orders,
        bursts,
        plan,
        flows: Vec::new(),
        follow_ups: FollowUps::new(),
    }
}

/// The two-phase payments of `Protocol::two_phase` ([`two_phase::draw`], their
/// own random stream): their orders join the accounts, whose openings grow by
/// what the holds need (a tight account by half of it, the others twice).
fn draw_two_phase(seed: u64, scenario: &mut Scenario) {
    let drawn = two_phase::draw(seed, &scenario.bursts);
    for (order, account, amount) in drawn.orders {
        let (id, opening) = &mut scenario.accounts[account];
        *opening += if scenario.tight[account] {
            amount / 2
        } else {
            amount * 2
        };
        scenario.orders.push((order, id.clone(), amount));
    }
    scenario.flows = drawn.flows;
}

/// The refunds of `Protocol::refunds`, from their own random stream: for one
/// order in `REFUND_ORDER_ONE_IN`, `REFUNDS_PER_ORDER` refund ids of 1/4 to 3/4
/// of its amount each, every one sent `DUPLICATES` times, a copy to each
/// instance, within `REFUND_DELAY_MS_MAX` of the order's first deduct.
fn draw_refunds(seed: u64, scenario: &mut Scenario) {
    let mut rng = SmallRng::seed_from_u64(seed ^ REFUND_RNG_SALT);
    let mut refunds = Vec::new();
    for (k, (order, _, amount)) in scenario.orders.iter().enumerate() {
        if !rng.random_ratio(1, REFUND_ORDER_ONE_IN) {
            continue;
        }
        let first = scenario
            .plan
            .iter()
            .filter(|s| &s.order == order)
            .map(|s| s.at_ms)
            .min()
            .unwrap_or(0);
        for r in 0..REFUNDS_PER_ORDER {
            let id = format!("{order}-refund{r}");
            let part = rng.random_range((amount / 4).max(1)..=(amount * 3 / 4).max(1));
            let at = first + rng.random_range(0..=REFUND_DELAY_MS_MAX);
            for d in 0..DUPLICATES {
                refunds.push(Send {
                    order: order.clone(),
                    ask: Ask::Refund {
                        id: id.clone(),
                        amount: part,
                    },
                    at_ms: at + rng.random_range(0..=DUPLICATE_SPREAD_MS),
                    first_instance: (k + r + d) % INSTANCES,
                    key: None,
                    reuses_key: false,
                    id: 0,
                });
            }
        }
    }
    scenario.plan.extend(refunds);
}

/// Runs one seed of `protocol` and checks it.
pub fn run_seed(seed: u64, protocol: Protocol) -> Outcome {
    run_seed_traced(seed, protocol, false)
}

/// The network and faults a seed drew.
struct Weather {
    latency_ms: u64,
    fail_rate: f64,
    faults: VecDeque<(u64, usize, Action)>,
    stall_percent: u32,
}

impl Weather {
    /// A calm seed has no fault, no message loss and no stall.
    fn draw(rng: &mut SmallRng) -> Weather {
        let calm = rng.random_ratio(1, CALM_SEED_ONE_IN);
        let latency_ms = LATENCY_MS_MAX_CHOICES[rng.random_range(0..LATENCY_MS_MAX_CHOICES.len())];
        if calm {
            return Weather {
                latency_ms,
                fail_rate: 0.0,
                faults: VecDeque::new(),
                stall_percent: 0,
            };
        }
        Weather {
            latency_ms,
            fail_rate: FAIL_RATE_CHOICES[rng.random_range(0..FAIL_RATE_CHOICES.len())],
            faults: draw_faults(rng).into(),
            stall_percent: STALL_PERCENT,
        }
    }

    /// The receiver's faults (with webhooks, on a seed that has faults), on
    /// their own random stream, numbered after the seed's other faults.
    fn add_receiver_faults(&mut self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed ^ RECEIVER_FAULT_RNG_SALT);
        let first = self.faults.iter().map(|(_, f, _)| f + 1).max().unwrap_or(0);
        let mut all: Vec<(u64, usize, Action)> = self.faults.drain(..).collect();
        let host = hooks::RECEIVER_HOST.to_owned();
        for fault in first..first + rng.random_range(0..=RECEIVER_FAULTS_MAX) {
            let at = rng.random_range(0..FAULT_WINDOW_MS);
            let until = at + rng.random_range(1..=FAULT_DURATION_MS_MAX);
            let inst = instance_host(rng.random_range(0..INSTANCES));
            match rng.random_range(0..3) {
                0 => {
                    all.push((at, fault, Action::Crash(host.clone())));
                    all.push((until, fault, Action::Bounce(host.clone())));
                }
                1 => {
                    all.push((at, fault, Action::Partition(inst.clone(), host.clone())));
                    all.push((until, fault, Action::Repair(inst, host.clone())));
                }
                _ => {
                    let ms = rng.random_range(1..=SLOW_LINK_MS_MAX);
                    all.push((at, fault, Action::Slow(inst.clone(), host.clone(), ms)));
                    all.push((until, fault, Action::Fast(inst, host.clone())));
                }
            }
        }
        // Stable: the seed's own faults keep their order at the same ms.
        all.sort_by_key(|(at, _, _)| *at);
        self.faults = all.into();
    }

    fn mask(&mut self, mask: &Mask) {
        self.faults.retain(|(_, f, _)| !mask.faults.contains(f));
    }

    /// Nothing but latency: no fault scheduled, no message lost.
    fn is_fair(&self) -> bool {
        self.faults.is_empty() && self.fail_rate == 0.0
    }
}

/// Arms the engine's deliberate bug (if the protocol asks for one) on this
/// thread for as long as it lives: one seed.
struct Armed;

impl Armed {
    fn new(protocol: Protocol) -> Armed {
        use payguard::mutants::{arm, Mutant};
        arm(if protocol.lane_forgets_waiter {
            Some(Mutant::LaneForgetsWaiter)
        } else if protocol.release_acquires_as_one {
            Some(Mutant::ReleaseAcquiresAsOne)
        } else if protocol.sweeper_dies_on_failure {
            Some(Mutant::SweeperDiesOnFailure)
        } else if protocol.release_key_after_stale_token {
            Some(Mutant::ReleaseKeyAfterStaleToken)
        } else if protocol.unanswered_commit_guessed_aborted {
            Some(Mutant::UnansweredCommitGuessedAborted)
        } else if protocol.committed_attempt_forgotten {
            Some(Mutant::CommittedAttemptForgotten)
        } else if protocol.reset_counter_on_new_epoch {
            Some(Mutant::ResetCounterOnNewEpoch)
        } else if protocol.timed_out_attempt_recorded_delivered {
            Some(Mutant::TimedOutAttemptRecordedDelivered)
        } else {
            None
        });
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        payguard::mutants::arm(None);
    }
}

/// Everything a seed draws before it runs: its scenario and weather, and the
/// RNG that goes on to seed turmoil and the instances. Drawn whole, then
/// masked, so that removing one request or fault changes nothing else drawn.
struct Drawn {
    scenario: Scenario,
    weather: Weather,
    rng: SmallRng,
}

fn draw(seed: u64, protocol: Protocol) -> Drawn {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut scenario = draw_scenario(&mut rng);
    if protocol.refunds {
        draw_refunds(seed, &mut scenario);
    }
    if protocol.two_phase {
        draw_two_phase(seed, &mut scenario);
    }
    if protocol.idempotency_keys {
        scenario.follow_ups = keys::draw(seed, &mut scenario.plan, &mut scenario.flows);
    }
    for (n, s) in scenario.sends_mut().enumerate() {
        s.id = n;
    }
    let mut weather = Weather::draw(&mut rng);
    if protocol.webhooks && !weather.faults.is_empty() {
        weather.add_receiver_faults(seed);
    }
    Drawn {
        scenario,
        weather,
        rng,
    }
}

impl Scenario {
    /// Every request planned, numbered in this order.
    fn sends_mut(&mut self) -> impl Iterator<Item = &mut Send> {
        let flows = self.flows.iter_mut().flat_map(|f| {
            f.authorize
                .iter_mut()
                .chain(f.then.iter_mut())
                .chain(f.follow_ups.values_mut().flatten())
        });
        self.plan
            .iter_mut()
            .chain(self.follow_ups.values_mut().flatten())
            .chain(flows)
    }

    fn sends(&self) -> Vec<&Send> {
        let flows = self.flows.iter().flat_map(|f| {
            f.authorize
                .iter()
                .chain(f.then.iter())
                .chain(f.follow_ups.values().flatten())
        });
        self.plan
            .iter()
            .chain(self.follow_ups.values().flatten())
            .chain(flows)
            .collect()
    }

    /// Removes what `mask` names; a key's follow-ups go with its last copy.
    fn mask(&mut self, mask: &Mask) {
        let keep = |s: &Send| !mask.sends.contains(&s.id) && !mask.orders.contains(&s.order);
        fn keyed(sends: &[&[Send]]) -> Vec<String> {
            sends
                .iter()
                .flat_map(|l| l.iter())
                .filter(|s| !s.reuses_key)
                .filter_map(|s| s.key.clone())
                .collect()
        }
        self.plan.retain(keep);
        let live = keyed(&[&self.plan]);
        self.follow_ups.retain(|k, _| live.contains(k));
        for f in self.follow_ups.values_mut() {
            f.retain(keep);
        }
        self.flows
            .retain(|f| f.authorize.iter().chain(&f.then).any(keep));
        for f in &mut self.flows {
            f.authorize.retain(keep);
            f.then.retain(keep);
            let live = keyed(&[&f.authorize, &f.then]);
            f.follow_ups.retain(|k, _| live.contains(k));
            for u in f.follow_ups.values_mut() {
                u.retain(keep);
            }
        }
    }
}

/// What a seed will run once `mask` is applied: its requests and faults, one
/// line each, by number (what a [`Mask`] names).
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    pub orders: Vec<String>,
    pub sends: Vec<(usize, String)>,
    pub faults: Vec<(usize, String)>,
}

impl Schedule {
    /// Requests and faults: the schedule's size.
    pub fn size(&self) -> usize {
        self.sends.len() + self.faults.len()
    }
}

/// The schedule of `seed` under `mask`.
pub fn schedule(seed: u64, protocol: Protocol, mask: &Mask) -> Schedule {
    let mut d = draw(seed, protocol);
    d.scenario.mask(mask);
    d.weather.mask(mask);
    let mut orders: Vec<String> = Vec::new();
    let sends = d
        .scenario
        .sends()
        .into_iter()
        .map(|s| {
            if !orders.contains(&s.order) {
                orders.push(s.order.clone());
            }
            let key = s
                .key
                .as_ref()
                .map_or(String::new(), |k| format!(" [key {k}]"));
            let when = if s.key.is_some() && d.scenario.is_follow_up(s) {
                format!("{} ms after its key's first answers", s.at_ms)
            } else {
                format!("at {} ms", s.at_ms)
            };
            let what = format!(
                "{} {} {when} to inst{}{key}",
                s.order, s.ask, s.first_instance
            );
            (s.id, what)
        })
        .collect();
    let mut faults: Vec<(usize, String)> = Vec::new();
    for (at, f, action) in &d.weather.faults {
        match faults.iter_mut().find(|(n, _)| n == f) {
            Some((_, line)) => line.push_str(&format!(", {action:?} at {at} ms")),
            None => faults.push((*f, format!("{action:?} at {at} ms"))),
        }
    }
    faults.sort_by_key(|(f, _)| *f);
    Schedule {
        orders,
        sends,
        faults,
    }
}

impl Scenario {
    fn is_follow_up(&self, s: &Send) -> bool {
        self.follow_ups
            .values()
            .chain(self.flows.iter().flat_map(|f| f.follow_ups.values()))
            .flatten()
            .any(|u| u.id == s.id)
    }
}

/// [`run_seed`], keeping a line per event (grants, database answers, faults,
/// client answers) when `trace` is set: what a replay prints.
pub fn run_seed_traced(seed: u64, protocol: Protocol, trace: bool) -> Outcome {
    run_seed_masked(seed, protocol, &Mask::default(), trace)
}

/// [`run_seed_traced`] with what `mask` names removed from the seed's schedule.
pub fn run_seed_masked(seed: u64, protocol: Protocol, mask: &Mask, trace: bool) -> Outcome {
    let _armed = Armed::new(protocol);
    let Drawn {
        mut scenario,
        mut weather,
        mut rng,
    } = draw(seed, protocol);
    scenario.mask(mask);
    weather.mask(mask);
    let planned = scenario.sends().len() + {
        let faults: std::collections::BTreeSet<usize> =
            weather.faults.iter().map(|(_, f, _)| *f).collect();
        faults.len()
    };
    let oracle = OracleRef::default();
    oracle.borrow_mut().trace = trace.then(Vec::new);
    let post = Post::default();
    let redis_state: SharedRedis = Arc::new(Mutex::new(RedisState::default()));
    let db_state = Arc::new(Mutex::new(DbState::new(protocol.store)));
    lock(&db_state).open(&scenario.accounts, &scenario.orders);
    let receiver = protocol.webhooks.then(|| {
        hooks::create_endpoints(&mut lock(&db_state));
        Arc::new(Mutex::new(hooks::Receiver::new(seed)))
    });
    let fair = weather.is_fair();
    oracle.borrow_mut().note(0, || {
        format!(
            "seed {seed}: {protocol:?}, latency up to {} ms, loss {}, stalls {}%, {} fault actions",
            weather.latency_ms,
            weather.fail_rate,
            weather.stall_percent,
            weather.faults.len()
        )
    });
    let mut sim = turmoil::Builder::new()
        .rng_seed(rng.random())
        .enable_random_order()
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_millis(SIM_DURATION_MS_MAX))
        .min_message_latency(Duration::ZERO)
        .max_message_latency(Duration::from_millis(weather.latency_ms))
        .fail_rate(weather.fail_rate)
        .build();
    {
        let (post, state) = (post.clone(), redis_state.clone());
        sim.host(REDIS_HOST, move || {
            redis::serve(post.clone(), state.clone())
        });
    }
    {
        let (post, state, oracle) = (post.clone(), db_state.clone(), oracle.clone());
        sim.host(DB_HOST, move || {
            db::serve(post.clone(), state.clone(), oracle.clone())
        });
    }
    let mut skew = SmallRng::seed_from_u64(seed ^ CLOCK_SKEW_RNG_SALT);
    for i in 0..INSTANCES {
        let clock_offset_ms = match protocol.clock_skew_ms {
            0 => 0,
            d => skew.random_range(-d..=d),
        };
        let inst = Rc::new(Instance {
            index: i,
            protocol,
            stall_percent: weather.stall_percent,
            clock_offset_ms,
            rng_seed: rng.random(),
            post: post.clone(),
            db: db_state.clone(),
            redis_truth: redis_state.clone(),
            oracle: oracle.clone(),
            boots: Cell::new(0),
        });
        sim.host(instance_host(i), move || instance::serve(inst.clone()));
    }
    if let Some(receiver) = &receiver {
        let (post, state, oracle) = (post.clone(), receiver.clone(), oracle.clone());
        sim.host(hooks::RECEIVER_HOST, move || {
            hooks::serve(post.clone(), state.clone(), oracle.clone())
        });
    }
    sim.client(
        CLIENT_HOST,
        client::run(
            scenario.plan,
            scenario.follow_ups,
            scenario.flows,
            post.clone(),
            oracle.clone(),
        ),
    );
    drive(
        &mut sim,
        weather,
        &oracle,
        &redis_state,
        &db_state,
        protocol.webhooks,
    );
    let sim_ms = sim.elapsed().as_millis() as u64;
    drop(sim);
    let db = lock(&db_state);
    let mut oracle = oracle.borrow_mut();
    oracle.stats.grants = redis::lock(&redis_state).grants;
    oracle.stats.stale_refused = db.stale_refused;
    oracle.stats.expiry_replays = db.races.expiry_replays;
    oracle.stats.captures_too_late = db.races.captures_too_late;
    let receiver = receiver
        .as_ref()
        .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()));
    Outcome {
        planned,
        ..verdict(seed, sim_ms, fair, &db, receiver.as_deref(), &mut oracle)
    }
}

fn lock(db: &Arc<Mutex<DbState>>) -> std::sync::MutexGuard<'_, DbState> {
    db.lock().unwrap_or_else(|e| e.into_inner())
}

/// The latest expiry of a short hold still AUTHORIZED: the sweepers have work
/// left (long holds outlive every seed).
fn hold_left_to_sweep(db: &Arc<Mutex<DbState>>) -> Option<u64> {
    lock(db)
        .tables
        .orders
        .values()
        .filter(|(o, _)| o.status == OrderStatus::Authorized)
        .filter_map(|(o, _)| o.hold_expires_at)
        .filter(|at| *at < HOLD_TTL_MS_LONG)
        .max()
        .map(|at| at as u64)
}

/// Steps the simulation, injecting the faults on time, until the clients are
/// done, every fault healed, nothing was in flight for a while, and no short
/// hold is left for the sweepers (or [`SWEEP_GRACE_MS`] passed after its
/// expiry, the clients and the faults: the end-of-seed check names it), and,
/// with `webhooks`, no delivery is left pending (or [`WEBHOOK_DRAIN_MS_MAX`]
/// passed after the clients and the faults: the webhook checks name it).
fn drive(
    sim: &mut turmoil::Sim<'_>,
    mut weather: Weather,
    oracle: &OracleRef,
    redis_state: &SharedRedis,
    db_state: &Arc<Mutex<DbState>>,
    webhooks: bool,
) {
    let last_fault_ms = weather.faults.back().map_or(0, |(at, _, _)| *at);
    let mut clients_done_ms: Option<u64> = None;
    let mut busy_ms = 0;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while weather.faults.front().is_some_and(|(at, _, _)| *at <= now) {
            let (_, _, action) = weather.faults.pop_front().expect("checked");
            let mut o = oracle.borrow_mut();
            o.stats.faults += 1;
            o.note(now, || format!("fault: {action:?}"));
            drop(o);
            inject(sim, action, redis_state, weather.latency_ms);
        }
        if let Some(done) = clients_done_ms {
            // Settled: every fault healed, nothing in flight for a while (a stalled
            // holder that outlived its client still writes before the check).
            let in_flight = oracle.borrow().in_flight;
            if in_flight > 0 {
                busy_ms = now;
            }
            let settled = done.max(last_fault_ms).max(busy_ms) + DRAIN_QUIET_MS;
            let sweeping = hold_left_to_sweep(db_state);
            let swept =
                sweeping.is_none_or(|at| now >= at.max(done).max(last_fault_ms) + SWEEP_GRACE_MS);
            let delivered = !webhooks || {
                let db = lock(db_state);
                !db.outbox.work_left(&db.tables.events)
                    || now >= done.max(last_fault_ms) + WEBHOOK_DRAIN_MS_MAX
            };
            if weather.faults.is_empty() && now >= settled && swept && delivered {
                return;
            }
            let hung = done.max(last_fault_ms) + IN_FLIGHT_DRAIN_MS_MAX;
            if weather.faults.is_empty() && in_flight > 0 && now >= hung {
                oracle.borrow_mut().violate(
                    ViolationKind::Hang,
                    format!("{in_flight} requests still in an instance {IN_FLIGHT_DRAIN_MS_MAX} ms after the clients and the faults ended"),
                );
                return;
            }
        }
        match sim.step() {
            Ok(true) => {
                clients_done_ms.get_or_insert(now);
            }
            Ok(false) => {}
            Err(e) => {
                oracle
                    .borrow_mut()
                    .check(ViolationKind::SimulationError, false, || e.to_string());
                return;
            }
        }
    }
}

fn inject(sim: &mut turmoil::Sim<'_>, action: Action, redis_state: &SharedRedis, latency_ms: u64) {
    match action {
        Action::Flush => redis::lock(redis_state).flush(),
        Action::Crash(h) => sim.crash(h),
        Action::Bounce(h) => sim.bounce(h),
        Action::Partition(a, b) => sim.partition(a, b),
        Action::Repair(a, b) => sim.repair(a, b),
        Action::Slow(a, b, ms) => sim.set_link_latency(a, b, Duration::from_millis(ms)),
        Action::Fast(a, b) => {
            sim.set_link_latency(a.clone(), b.clone(), Duration::ZERO);
            sim.set_link_max_message_latency(a, b, Duration::from_millis(latency_ms));
        }
    }
}

/// The checks at the end: safety always, liveness when nothing went wrong (no
/// fault, no loss, no stall).
fn verdict(
    seed: u64,
    sim_ms: u64,
    fair: bool,
    db: &DbState,
    receiver: Option<&hooks::Receiver>,
    oracle: &mut Oracle,
) -> Outcome {
    checks::money(db, oracle);
    two_phase::check(db, oracle, sim_ms);
    keys::check(db, oracle);
    let fault_free = fair && oracle.stats.stalls == 0;
    if fault_free {
        oracle.check_liveness(LIVENESS_BOUND_MS);
    }
    if let Some(receiver) = receiver {
        hooks::check(db, receiver, oracle, fault_free);
    }
    let balances: Vec<i64> = db
        .tables
        .accounts
        .values()
        .map(|a| a.balance.minor())
        .collect();
    let debits: Vec<(i64, &str)> = db
        .tables
        .entries
        .iter()
        .map(|e| (e.id, e.order_id.as_str()))
        .collect();
    let fingerprint = format!(
        "{sim_ms} {:?} {:?} {debits:?} {balances:?} {} {:?}",
        oracle.stats, oracle.violations, db.fence_epoch_seq, oracle.acks
    );
    Outcome {
        seed,
        violations: oracle.violations.clone(),
        stats: oracle.stats.clone(),
        sim_ms,
        fingerprint,
        trace: oracle.trace.take().unwrap_or_default(),
        events: oracle.events,
        planned: 0,
        fault_free,
    }
}

/// [`run_seed_masked`], a panic (an instance's assertion, turmoil's) made a
/// [`ViolationKind::SimulationError`].
pub fn run_seed_caught(seed: u64, protocol: Protocol, mask: &Mask) -> Outcome {
    std::panic::catch_unwind(|| run_seed_masked(seed, protocol, mask, false)).unwrap_or_else(
        |panic| Outcome {
            seed,
            violations: vec![Violation {
                kind: ViolationKind::SimulationError,
                detail: format!("panicked: {panic:?}"),
            }],
            stats: Stats::default(),
            sim_ms: 0,
            fingerprint: String::new(),
            trace: Vec::new(),
            events: 0,
            planned: 0,
            fault_free: false,
        },
    )
}

/// What a batch of seeds found.
#[derive(Debug, Default)]
pub struct SeedsReport {
    /// Seeds run to the end.
    pub runs: u64,
    /// Failing seeds, lowest first.
    pub failures: Vec<Outcome>,
    pub wall: Duration,
    /// Simulated time over all seeds run.
    pub sim_ms: u64,
    /// Sums over all seeds run.
    pub totals: Stats,
    /// Seeds with no fault (liveness checked).
    pub fault_free: u64,
}

/// Runs seeds `first..first + count` on up to [`SEED_THREADS_MAX`] threads. With
/// `stop_at` set, stops claiming new seeds once a seed shows a violation of that
/// kind; seeds are claimed in order, so the lowest such seed is still found and
/// the answer does not depend on thread timing.
pub fn run_seeds(
    protocol: Protocol,
    first: u64,
    count: u64,
    stop_at: Option<ViolationKind>,
) -> SeedsReport {
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let stop = AtomicBool::new(false);
    let report = Mutex::new(SeedsReport::default());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(SEED_THREADS_MAX);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= first + count {
                    return;
                }
                let outcome = run_seed_caught(seed, protocol, &Mask::default());
                if stop_at.is_some_and(|k| outcome.has(k)) {
                    stop.store(true, Ordering::SeqCst);
                }
                let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                r.runs += 1;
                r.sim_ms += outcome.sim_ms;
                r.fault_free += u64::from(outcome.fault_free);
                add_stats(&mut r.totals, &outcome.stats);
                if !outcome.violations.is_empty() {
                    r.failures.push(outcome);
                }
            });
        }
    });
    let mut r = report.into_inner().unwrap_or_else(|e| e.into_inner());
    r.failures.sort_by_key(|o| o.seed);
    if let Some(kind) = stop_at {
        // Seeds past the first hit may or may not have run, depending on timing.
        if let Some(hit) = r.failures.iter().find(|o| o.has(kind)).map(|o| o.seed) {
            r.failures.retain(|o| o.seed <= hit);
        }
    }
    r.wall = started.elapsed();
    r
}

fn add_stats(t: &mut Stats, s: &Stats) {
    let Stats {
        grants,
        new_epochs,
        stalls,
        stale_refused,
        acks,
        declined,
        refund_acks,
        refunds_refused,
        hold_acks,
        capture_acks,
        void_acks,
        two_phase_refused,
        captured,
        captured_in_part,
        voided,
        expired,
        held_open,
        feed_events,
        expiry_replays,
        captures_too_late,
        keyed_answers,
        key_replays,
        key_reuses_refused,
        key_in_use,
        unanswered,
        faults,
        batches,
        batched_ops,
        multi_op_batches,
        lock_rounds,
        multi_order_lock_rounds,
        overlapping_lock_rounds,
        parked,
        settled_hints,
        notices,
        woken,
        fallback_retries,
        resubscriptions,
        fate_lookups,
        nothing_moved,
        lock_busy,
        unknown,
        answer_ms_max,
        hook_deliveries,
        hook_delivered,
        hook_failed,
        hook_attempts,
        hook_retries,
        hook_receipts,
        hook_duplicates,
    } = s;
    t.grants += grants;
    t.new_epochs += new_epochs;
    t.stalls += stalls;
    t.stale_refused += stale_refused;
    t.acks += acks;
    t.declined += declined;
    t.refund_acks += refund_acks;
    t.refunds_refused += refunds_refused;
    t.hold_acks += hold_acks;
    t.capture_acks += capture_acks;
    t.void_acks += void_acks;
    t.two_phase_refused += two_phase_refused;
    t.captured += captured;
    t.captured_in_part += captured_in_part;
    t.voided += voided;
    t.expired += expired;
    t.held_open += held_open;
    t.feed_events += feed_events;
    t.expiry_replays += expiry_replays;
    t.captures_too_late += captures_too_late;
    t.keyed_answers += keyed_answers;
    t.key_replays += key_replays;
    t.key_reuses_refused += key_reuses_refused;
    t.key_in_use += key_in_use;
    t.unanswered += unanswered;
    t.faults += faults;
    t.batches += batches;
    t.batched_ops += batched_ops;
    t.multi_op_batches += multi_op_batches;
    t.lock_rounds += lock_rounds;
    t.multi_order_lock_rounds += multi_order_lock_rounds;
    t.overlapping_lock_rounds += overlapping_lock_rounds;
    t.parked += parked;
    t.settled_hints += settled_hints;
    t.notices += notices;
    t.woken += woken;
    t.fallback_retries += fallback_retries;
    t.resubscriptions += resubscriptions;
    t.fate_lookups += fate_lookups;
    t.nothing_moved += nothing_moved;
    t.lock_busy += lock_busy;
    t.unknown += unknown;
    t.answer_ms_max = t.answer_ms_max.max(*answer_ms_max);
    t.hook_deliveries += hook_deliveries;
    t.hook_delivered += hook_delivered;
    t.hook_failed += hook_failed;
    t.hook_attempts += hook_attempts;
    t.hook_retries += hook_retries;
    t.hook_receipts += hook_receipts;
    t.hook_duplicates += hook_duplicates;
}
