//! The expiry sweeper: releases every hold nobody captured or voided, once its
//! `hold_expires_at` has passed.
//!
//! Why it is safe to run on every instance at once, and to kill at any moment:
//! the sweeper only *asks*. It reads which AUTHORIZED orders are due and submits
//! an [`Op::Expire`] for each through the engine, like any request: the order's
//! lane, its lock, and the store's money rules decide again against committed
//! state, where AUTHORIZED → EXPIRED is a conditional transition with one release
//! entry per order (a unique index). A second sweeper gets a replay, a capture
//! that won gets `hold_already_captured`, a sweeper killed mid-sweep leaves the
//! hold AUTHORIZED for the next tick. Time decides, not the sweeper: a capture at
//! or after `hold_expires_at` is refused even if no sweeper ever ran, and writes
//! the expiry it found (`rules::Effect::Lapse`), so the sweeper then replays it.

use super::{Engine, EngineError};
use crate::domain::RequestId;
use crate::store::{Op, Rejection};
use std::sync::Arc;
use std::time::Duration;

/// Orders asked for per store read; a tick reads again while a read comes back full.
pub const SWEEP_BATCH_MAX: usize = 256;
/// Reads per tick at most, so one tick's work is bounded (256 × 64 holds) and a
/// backlog drains over several ticks rather than starving the lanes.
pub const SWEEP_READS_PER_TICK_MAX: usize = 64;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Holds this sweep released.
    pub expired: u64,
    /// Holds another sweeper (or an earlier tick) had already released.
    pub replayed: u64,
    /// Holds a capture or a void ended first.
    pub lost: u64,
    /// Expiries that failed and are left for the next tick (store down, lane
    /// full, lock busy).
    pub failed: u64,
}

/// Expires every hold due at `now_ms` (bounded by [`SWEEP_READS_PER_TICK_MAX`]).
pub async fn sweep_once(engine: &Engine, now_ms: i64) -> Sweep {
    let mut sweep = Sweep::default();
    let inst = engine.config().instance_id.clone();
    for _ in 0..SWEEP_READS_PER_TICK_MAX {
        let due = match engine.store().due_holds(now_ms, SWEEP_BATCH_MAX).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(event = "sweep_failed", detail = %e, inst = inst.as_str());
                sweep.failed += 1;
                return sweep;
            }
        };
        let full = due.len() == SWEEP_BATCH_MAX;
        let req = RequestId::parse(&format!("sweep-{now_ms}"))
            .unwrap_or_else(|_| RequestId::parse("sweep").expect("a valid request id"));
        let answers = futures::future::join_all(
            due.into_iter()
                .map(|order_id| engine.submit(Op::Expire { order_id }, req.clone())),
        )
        .await;
        let before = sweep;
        for answer in answers {
            match answer {
                Ok(out) if out.is_replay() => sweep.replayed += 1,
                Ok(_) => sweep.expired += 1,
                Err(EngineError::Rejected(
                    Rejection::HoldAlreadyCaptured | Rejection::HoldVoided,
                )) => sweep.lost += 1,
                Err(_) => sweep.failed += 1,
            }
        }
        // Nothing more due, or nothing this read could move (all left for the
        // next tick): stop rather than read the same orders again at once.
        let settled = |s: &Sweep| s.expired + s.replayed + s.lost;
        if !full || settled(&sweep) == settled(&before) {
            break;
        }
    }
    sweep
}

/// Sweeps every `interval` until the task is dropped. The first sweep runs at
/// once, so holds that expired while no instance ran are released at start.
pub async fn run(engine: Arc<Engine>, interval: Duration) {
    run_on_clock(engine, interval, || chrono::Utc::now().timestamp_millis()).await
}

/// [`run`], reading "now" (ms since the epoch, the clock `hold_expires_at` is
/// on) from `clock`: the deterministic simulation sweeps on its simulated clock
/// (`crates/payguard-sim`), so what it runs is this loop, not a copy of it.
pub async fn run_on_clock(
    engine: Arc<Engine>,
    interval: Duration,
    clock: impl Fn() -> i64 + Send + 'static,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock();
        let sweep = sweep_once(&engine, now).await;
        if sweep.failed > 0 && super::mutants::armed(super::mutants::Mutant::SweeperDiesOnFailure) {
            // The simulation's broken variant: the task ends, as one written
            // with `?` on the store's error would; this loop never does.
            return;
        }
        if sweep != Sweep::default() {
            tracing::info!(
                event = "sweep",
                expired = sweep.expired,
                replayed = sweep.replayed,
                lost = sweep.lost,
                failed = sweep.failed,
                inst = engine.config().instance_id.as_str()
            );
        }
    }
}
