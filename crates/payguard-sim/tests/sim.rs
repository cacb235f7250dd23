//! The simulation's verdicts: payguard's protocol holds over thousands of seeds,
//! and the checker catches each broken variant (so it is not a no-op).
//!
//! `PAYGUARD_SIM_SEEDS=N` sets how many seeds the main test runs (default
//! `CI_SEEDS`), `PAYGUARD_SIM_FIRST_SEED=F` where they start (default 0), so a
//! soak can go past the seeds CI runs; `PAYGUARD_SIM_SEED=S` replays one seed of
//! every test, printing its trace. Every failure prints its seed and the command
//! that replays it.

#![forbid(unsafe_code)]

use payguard_sim::config::CI_SEEDS;
use payguard_sim::{
    run_seed, run_seed_traced, run_seeds, Outcome, Protocol, SeedsReport, ViolationKind,
};

/// Broken variants must be caught within this many seeds.
const FIND_WITHIN_SEEDS: u64 = 2_000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

fn replay_command(seed: u64, test: &str) -> String {
    format!("PAYGUARD_SIM_SEED={seed} cargo test -p payguard-sim --test sim {test} -- --exact --nocapture")
}

fn describe(o: &Outcome, test: &str) -> String {
    let mut s = format!(
        "seed {} ({} simulated ms, {:?}):\n",
        o.seed, o.sim_ms, o.stats
    );
    for v in &o.violations {
        s.push_str(&format!("  {:?}: {}\n", v.kind, v.detail));
    }
    s.push_str(&format!("  replay: {}\n", replay_command(o.seed, test)));
    s
}

/// One seed when `PAYGUARD_SIM_SEED` is set, else `default` seeds from
/// `PAYGUARD_SIM_FIRST_SEED` (0).
fn seeds_or_replay(
    test: &str,
    protocol: Protocol,
    default: u64,
    stop_at: Option<ViolationKind>,
) -> SeedsReport {
    if let Some(seed) = env_u64("PAYGUARD_SIM_SEED") {
        let o = run_seed_traced(seed, protocol, true);
        eprintln!("{}\n{}", o.trace.join("\n"), describe(&o, test));
        let failures = if o.violations.is_empty() {
            vec![]
        } else {
            vec![o]
        };
        return SeedsReport {
            runs: 1,
            failures,
            ..SeedsReport::default()
        };
    }
    let first = env_u64("PAYGUARD_SIM_FIRST_SEED").unwrap_or(0);
    let r = run_seeds(protocol, first, default, stop_at);
    eprintln!(
        "{test}: {} seeds in {:.1} s ({} simulated ms per seed), {} failing; totals {:?}",
        r.runs,
        r.wall.as_secs_f64(),
        r.sim_ms / r.runs.max(1),
        r.failures.len(),
        r.totals
    );
    r
}

#[test]
fn payguard_protocol_holds_for_every_seed() {
    holds_for_every_seed("payguard_protocol_holds_for_every_seed", Protocol::PAYGUARD);
}

/// The seeds on which the simulation found a live holder refused forever (an
/// epoch raise delayed across a flush, before `RAISE_EPOCH` checked the hash's
/// incarnation): clean on payguard now, and still caught with the check off.
const WEDGED_ORDER_SEEDS: [u64; 3] = [2424, 36337, 37437];

#[test]
fn the_seeds_that_wedged_an_order_hold_now() {
    for seed in WEDGED_ORDER_SEEDS {
        let o = run_seed(seed, Protocol::PAYGUARD);
        assert!(
            o.violations.is_empty(),
            "{}",
            describe(&o, "the_seeds_that_wedged_an_order_hold_now")
        );
    }
    let old = Protocol {
        raise_epoch_checks_incarnation: false,
        ..Protocol::PAYGUARD
    };
    let caught = WEDGED_ORDER_SEEDS
        .iter()
        .filter(|&&seed| run_seed(seed, old).has(ViolationKind::LiveHolderStaleToken))
        .count();
    assert!(
        caught > 0,
        "without the incarnation check none of {WEDGED_ORDER_SEEDS:?} wedges an order: the checker lost the gap"
    );
}

fn holds_for_every_seed(test: &str, protocol: Protocol) {
    let seeds = env_u64("PAYGUARD_SIM_SEEDS").unwrap_or(CI_SEEDS);
    let r = seeds_or_replay(test, protocol, seeds, None);
    let shown: Vec<String> = r
        .failures
        .iter()
        .take(5)
        .map(|o| describe(o, test))
        .collect();
    assert!(
        r.failures.is_empty(),
        "{} of {} seeds broke an invariant; the first:\n{}",
        r.failures.len(),
        r.runs,
        shown.join("")
    );
}

/// Asserts that `kind` shows up for `protocol` within [`FIND_WITHIN_SEEDS`] seeds.
fn must_find(test: &str, protocol: Protocol, kind: ViolationKind) {
    let r = seeds_or_replay(test, protocol, FIND_WITHIN_SEEDS, Some(kind));
    let hit = r.failures.iter().find(|o| o.has(kind));
    match hit {
        Some(o) => eprintln!("{test}: found {kind:?} at {}", describe(o, test)),
        None => panic!(
            "{test}: no {kind:?} in {} seeds: the checker missed a broken protocol",
            r.runs
        ),
    }
}

#[test]
fn without_fencing_and_unique_debit_a_double_charge_is_found() {
    must_find(
        "without_fencing_and_unique_debit_a_double_charge_is_found",
        Protocol {
            fencing: false,
            db_unique_debit: false,
            ..Protocol::PAYGUARD
        },
        ViolationKind::DoubleCharge,
    );
}

#[test]
fn the_counter_reset_bug_gives_a_live_holder_a_stale_token() {
    must_find(
        "the_counter_reset_bug_gives_a_live_holder_a_stale_token",
        Protocol {
            reset_counter_on_new_epoch: true,
            ..Protocol::PAYGUARD
        },
        ViolationKind::LiveHolderStaleToken,
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 77, 4242] {
        for protocol in [
            Protocol::PAYGUARD,
            Protocol {
                fencing: false,
                db_unique_debit: false,
                reset_counter_on_new_epoch: true,
                raise_epoch_checks_incarnation: false,
                ..Protocol::JOIN_ALL
            },
            Protocol {
                raise_epoch_checks_incarnation: true,
                ..Protocol::PAYGUARD
            },
        ] {
            let a = run_seed(seed, protocol);
            let b = run_seed(seed, protocol);
            assert_eq!(
                a.fingerprint, b.fingerprint,
                "seed {seed} {protocol:?} replayed differently"
            );
        }
    }
}

/// The money violations: what the database alone must prevent.
const MONEY: [ViolationKind; 5] = [
    ViolationKind::DoubleCharge,
    ViolationKind::AcknowledgedChargeMissing,
    ViolationKind::BalanceDrift,
    ViolationKind::NegativeBalance,
    ViolationKind::DeclinedButCharged,
];

/// Seeds for the variant that is expected to hold without fencing.
const DATABASE_ALONE_SEEDS: u64 = 200;

#[test]
fn without_fencing_the_database_still_charges_once() {
    let test = "without_fencing_the_database_still_charges_once";
    let protocol = Protocol {
        fencing: false,
        ..Protocol::PAYGUARD
    };
    let r = seeds_or_replay(test, protocol, DATABASE_ALONE_SEEDS, None);
    // Stale tokens do get applied here (that is what fencing is for); money never moves twice.
    let money: Vec<String> = r
        .failures
        .iter()
        .filter(|o| MONEY.iter().any(|k| o.has(*k)))
        .take(5)
        .map(|o| describe(o, test))
        .collect();
    assert!(
        money.is_empty(),
        "the database's constraints let money move wrongly:\n{}",
        money.join("")
    );
    if env_u64("PAYGUARD_SIM_SEED").is_none() {
        assert!(
            r.failures
                .iter()
                .any(|o| o.has(ViolationKind::StaleTokenApplied)),
            "no stale write got through without fencing: the seeds never exercise the fence"
        );
    }
}

#[test]
fn fencing_without_the_unique_debit_double_charges_when_the_lock_is_unavailable() {
    must_find(
        "fencing_without_the_unique_debit_double_charges_when_the_lock_is_unavailable",
        Protocol {
            db_unique_debit: false,
            ..Protocol::PAYGUARD
        },
        ViolationKind::DoubleCharge,
    );
}

/// The gap the simulation found (seed 2424), step by step with no network and
/// no seed, in the scripts as they were: `RAISE_EPOCH` carrying an epoch taken
/// before a flush, arriving after it, re-creates the fence hash with that older
/// epoch. Every later grant then packs a token below one already written, so the
/// order's live holders are all refused with `stale_fencing_token` until the next
/// flush. Money still moves once (the fence refuses, the unique debit holds); the
/// order is wedged. payguard's `RAISE_EPOCH` now checks the incarnation (next test).
#[test]
fn without_the_incarnation_check_a_raise_delayed_across_a_flush_regresses_the_epoch() {
    use payguard::lock::token;
    use payguard_sim::redis::RedisState;
    use payguard_sim::wire::{RedisReq, RedisResp};

    let mut redis = RedisState::default();
    let acquire = |r: &mut RedisState, order: &str, owner: &str| match r.exec(
        &RedisReq::Acquire {
            key: format!("lock:order:{order}"),
            owner: owner.into(),
            ttl_ms: 1_000,
        },
        0,
    ) {
        RedisResp::Acquired(Some((n, epoch, _))) => (n, epoch),
        other => panic!("{other:?}"),
    };
    let raise = |r: &mut RedisState, fresh: i64| match r.exec(&RedisReq::RaiseEpoch { fresh }, 0) {
        RedisResp::Epoch(e) => e,
        other => panic!("{other:?}"),
    };
    // After a flush, Y and X both find no epoch; Y's nextval comes first (5), X's second (6).
    assert_eq!(acquire(&mut redis, "B", "Y"), (1, None));
    assert_eq!(acquire(&mut redis, "C", "X"), (2, None));
    let x_epoch = token::epoch_in_force(raise(&mut redis, 6), 6);
    // W takes order A under epoch 6 and writes it: A's fence is (6, 3).
    let (n, epoch) = acquire(&mut redis, "A", "W");
    let fence_a = token::pack(epoch.expect("raised by X"), n);
    assert_eq!(token::unpack(fence_a), (x_epoch, 3));
    let _ = redis.exec(
        &RedisReq::Release {
            key: "lock:order:A".into(),
            owner: "W".into(),
        },
        0,
    );
    // Redis is flushed; then Y's delayed RAISE_EPOCH(5) lands.
    redis.flush();
    assert_eq!(raise(&mut redis, 5), 5);
    // V, the live holder of A, gets (5, 1): below A's fence, refused forever.
    let (n, epoch) = acquire(&mut redis, "A", "V");
    let v = token::pack(epoch.expect("re-created by Y"), n);
    assert!(
        v < fence_a,
        "the unchecked raise no longer regresses the epoch"
    );
}

/// The same interleaving against payguard's scripts: the delayed raise is refused.
#[test]
fn the_incarnation_check_refuses_a_raise_delayed_across_a_flush() {
    use payguard_sim::redis::RedisState;
    use payguard_sim::wire::{RedisReq, RedisResp};

    let mut redis = RedisState::default();
    let acquire = |r: &mut RedisState, order: &str, owner: &str| match r.exec(
        &RedisReq::Acquire {
            key: format!("lock:order:{order}"),
            owner: owner.into(),
            ttl_ms: 1_000,
        },
        0,
    ) {
        RedisResp::Acquired(Some(got)) => got,
        other => panic!("{other:?}"),
    };
    let (_, _, y_incarnation) = acquire(&mut redis, "B", "Y");
    let (_, _, x_incarnation) = acquire(&mut redis, "C", "X");
    let raise = RedisReq::RaiseEpochIfSame {
        fresh: 6,
        incarnation: x_incarnation.expect("the hash exists"),
    };
    assert!(matches!(redis.exec(&raise, 0), RedisResp::Epoch(6)));
    redis.flush();
    let late = RedisReq::RaiseEpochIfSame {
        fresh: 5,
        incarnation: y_incarnation.expect("the hash existed"),
    };
    assert!(matches!(redis.exec(&late, 0), RedisResp::Refused));
    // The next grant finds no epoch and takes a fresh one, above every earlier one.
    let (n, epoch, _) = acquire(&mut redis, "A", "V");
    assert_eq!((n, epoch), (1, None));
}
