//! What the engine counts and logs about each request's outcome: the LOGS.md
//! events `*_commit`, `*_replay`, `*_rejected` and `*_end` that forensics reads.

use super::{event_name, EngineError, EngineStats};
use crate::store::{Output, Rejection, StoreError};
use std::time::Instant;

/// Counts `result` of an op of `family` in the engine's stats.
pub(super) fn count(stats: &EngineStats, family: &str, result: &Result<Output, EngineError>) {
    match &result {
        Ok(out) if out.is_replay() => {
            stats.replayed.inc();
        }
        Ok(_) => {
            stats.committed.inc();
            let step = match family {
                "authorize" => Some(&stats.holds_authorized),
                "capture" => Some(&stats.holds_captured),
                "void" => Some(&stats.holds_voided),
                "expire" => Some(&stats.holds_expired),
                _ => None,
            };
            if let Some(counter) = step {
                counter.inc();
            }
        }
        Err(EngineError::Rejected(r)) => {
            stats.rejected.inc();
            if *r == Rejection::HoldLapsed {
                // The capture or void wrote the hold's expiry as it refused.
                stats.holds_expired.inc();
            }
        }
        Err(EngineError::Overloaded) => {
            stats.overloaded.inc();
        }
        Err(EngineError::ShuttingDown | EngineError::Store(_) | EngineError::TimedOut) => {
            stats.store_failures.inc();
        }
    }
}

/// Logs the outcome of a money movement (`family` deduct or refund).
pub(super) fn log(
    family: &'static str,
    oid: &str,
    req: &str,
    inst: &str,
    result: &Result<Output, EngineError>,
    started: Instant,
) {
    let outcome = match &result {
        Ok(Output::Movement {
            entry,
            replayed: false,
            ..
        }) => {
            tracing::info!(
                event = event_name(family, "commit"),
                oid,
                entry = entry.id,
                amount = entry.amount.minor(),
                balance_after = entry.balance_after.minor(),
                req,
                inst
            );
            "committed"
        }
        Ok(Output::Movement {
            entry,
            replayed: true,
            ..
        }) => {
            tracing::info!(
                event = event_name(family, "replay"),
                oid,
                entry = entry.id,
                req,
                inst
            );
            "replayed"
        }
        Ok(_) => "committed",
        Err(EngineError::Rejected(r)) => {
            if *r == Rejection::HoldLapsed {
                // The expiry this request wrote (LOGS.md: "an expiry writes
                // `hold_expired`"), then its own refusal.
                tracing::info!(
                    event = event_name("expire", "commit"),
                    oid,
                    by = family,
                    req,
                    inst
                );
            }
            tracing::info!(
                event = event_name(family, "rejected"),
                oid,
                reason = r.reason(),
                req,
                inst
            );
            r.reason()
        }
        Err(e @ (EngineError::Overloaded | EngineError::ShuttingDown | EngineError::TimedOut)) => {
            let reason = match e {
                EngineError::Overloaded => "overloaded",
                EngineError::TimedOut => "timed_out",
                _ => "shutting_down",
            };
            tracing::warn!(
                event = event_name(family, "rejected"),
                oid,
                reason,
                req,
                inst
            );
            "unavailable"
        }
        Err(EngineError::Store(e @ StoreError::Unknown(_))) => {
            // It may have moved: never logged as "unavailable" (nothing moved).
            tracing::error!(event = event_name(family, "rejected"), oid, reason = "outcome_unknown", detail = %e, req, inst);
            "unknown"
        }
        Err(EngineError::Store(e)) => {
            tracing::error!(event = event_name(family, "rejected"), oid, reason = "store_unavailable", detail = %e, req, inst);
            "unavailable"
        }
    };
    let dur_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        event = event_name(family, "end"),
        oid,
        outcome,
        dur_ms,
        req,
        inst
    );
}
