//! Idempotency-Keys in the simulation: which requests carry one, how an
//! instance runs a keyed request, and what must hold of their answers at the
//! end of a seed.
//!
//! Why one module: the workload and its verdict are one contract, as in
//! [`crate::two_phase`]. One request in [`KEYED_ONE_IN`] (all its copies, a
//! copy to each instance, and all their retries) carries a key; once its
//! copies are answered, the same request goes once more under the key to some
//! instance (by then its answer is stored), and for one keyed request in
//! [`KEY_REUSE_ONE_IN`], another request goes under the same key too: a refund
//! of 1 under a refund id of its own. The keys are drawn from their own random
//! stream ([`KEYS_RNG_SALT`]), so a seed's orders, amounts, refunds, holds and
//! faults are the ones it draws without them (their timing is not: keyed
//! requests take other paths through the engine).
//!
//! What runs is payguard's: an instance runs a keyed request with
//! [`Engine::submit_keyed`], the sequence `payguard-server` runs for every POST
//! with the header (claim, replay, wait, refuse a reuse, run the command with
//! its record so the store completes it in the op's transaction, free the key
//! after a retryable failure), and the database decides claims and
//! completions with payguard's rules ([`crate::store`], [`crate::db`]). What
//! is the simulation's: the fingerprint (the server hashes method, path and
//! canonical body; here the request's description, equal exactly when the
//! requests are) and the bytes stored ([`render`]: the client's answer, where
//! the server stores its JSON), both below the HTTP layer this simulation does
//! not run. Which answers are stored is payguard's
//! ([`payguard::engine::keyed::stored_answer`]).
//!
//! What it guarantees, per seed and key: every definite answer to the keyed
//! request equals the first one (the same entry, or the same refusal), the
//! answers under the key name at most one entry (one effect per key), and the
//! request that reused the key was answered 422 and moved no money.

use crate::client::{Flow, FollowUps, Send};
use crate::config::*;
use crate::db::DbState;
use crate::instance::api_answer;
use crate::oracle::{Oracle, OracleRef, ViolationKind};
use crate::wire::{now_ms, ApiResp, Ask};
use payguard::domain::{EntryKind, RequestId};
use payguard::engine::keyed::{stored_answer, KeyLimits, Keyed, KeyedAnswer};
use payguard::engine::Engine;
use payguard::store::{Op, Rejection};
use payguard::EngineError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A refund id that only a key's reuse asks for.
pub fn reuse_refund_id(key: &str) -> String {
    format!("{key}-reuse")
}

/// Keys the requests of `sends` (all copies of a request alike) from `rng`,
/// adding their follow-ups to `follow_ups`.
fn key_requests(rng: &mut SmallRng, n: &mut usize, sends: &mut [Send], follow_ups: &mut FollowUps) {
    let mut requests: Vec<(String, Ask)> = Vec::new();
    for s in sends.iter() {
        let r = (s.order.clone(), s.ask.clone());
        if !requests.contains(&r) {
            requests.push(r);
        }
    }
    for (order, ask) in requests {
        if !rng.random_ratio(1, KEYED_ONE_IN) {
            continue;
        }
        *n += 1;
        let key = format!("key{n}");
        for s in sends
            .iter_mut()
            .filter(|s| s.order == order && s.ask == ask)
        {
            s.key = Some(key.clone());
        }
        let mut follow = vec![Send {
            order: order.clone(),
            ask: ask.clone(),
            at_ms: rng.random_range(KEY_FOLLOW_UP_DELAY_MS),
            first_instance: rng.random_range(0..INSTANCES),
            key: Some(key.clone()),
            reuses_key: false,
            id: 0,
        }];
        if rng.random_ratio(1, KEY_REUSE_ONE_IN) {
            follow.push(Send {
                order,
                ask: Ask::Refund {
                    id: reuse_refund_id(&key),
                    amount: 1,
                },
                at_ms: rng.random_range(KEY_FOLLOW_UP_DELAY_MS),
                first_instance: rng.random_range(0..INSTANCES),
                key: Some(key.clone()),
                reuses_key: true,
                id: 0,
            });
        }
        follow_ups.insert(key, follow);
    }
}

/// Keys some of the plan's and the flows' requests; the follow-ups of the
/// plan's keys (the flows keep their own).
pub fn draw(seed: u64, plan: &mut [Send], flows: &mut [Flow]) -> FollowUps {
    let mut rng = SmallRng::seed_from_u64(seed ^ KEYS_RNG_SALT);
    let mut n = 0;
    let mut follow_ups = FollowUps::new();
    key_requests(&mut rng, &mut n, plan, &mut follow_ups);
    for f in flows {
        key_requests(&mut rng, &mut n, &mut f.authorize, &mut f.follow_ups);
        key_requests(&mut rng, &mut n, &mut f.then, &mut f.follow_ups);
    }
    follow_ups
}

/// The limits of payguard-server's keyed requests, scaled to the simulation.
pub const LIMITS: KeyLimits = KeyLimits {
    lease_ms: KEY_LEASE_MS,
    ttl_ms: KEY_TTL_MS,
    wait_ms: KEY_WAIT_MS,
    poll_ms: KEY_POLL_MS,
};

/// The reasons a stored 409 can name.
const REASONS: [Rejection; 8] = [
    Rejection::OrderNotPaid,
    Rejection::RefundExceedsPaid,
    Rejection::OrderNotAuthorized,
    Rejection::OrderAuthorized,
    Rejection::CaptureExceedsHold,
    Rejection::HoldAlreadyCaptured,
    Rejection::HoldVoided,
    Rejection::HoldExpired,
];

/// The answer as stored under a key: its status and the client's answer.
fn encode(a: ApiResp) -> (u16, Vec<u8>) {
    let status = match a {
        ApiResp::Charged { .. } | ApiResp::Replayed { .. } => 200,
        ApiResp::InsufficientFunds => 402,
        ApiResp::NoSuchOrder => 404,
        ApiResp::Conflict { .. } => 409,
        _ => 422,
    };
    let body = match a {
        ApiResp::Charged { entry } => format!("charged {entry}"),
        ApiResp::Replayed { entry } => format!("replayed {entry}"),
        ApiResp::Conflict { reason } => reason.to_owned(),
        other => format!("{other:?}"),
    };
    (status, body.into_bytes())
}

/// The client's answer from a stored one (as [`encode`] wrote it).
fn decode(status: u16, body: &[u8]) -> ApiResp {
    let body = String::from_utf8_lossy(body);
    let entry = |prefix: &str| body.strip_prefix(prefix).and_then(|e| e.parse().ok());
    match status {
        200 => match (entry("charged "), entry("replayed ")) {
            (Some(entry), _) => ApiResp::Charged { entry },
            (_, Some(entry)) => ApiResp::Replayed { entry },
            _ => ApiResp::Refused,
        },
        402 => ApiResp::InsufficientFunds,
        404 => ApiResp::NoSuchOrder,
        409 => REASONS
            .iter()
            .map(Rejection::reason)
            .find(|r| *r == body)
            .map_or(ApiResp::Refused, |reason| ApiResp::Conflict { reason }),
        _ => ApiResp::Refused,
    }
}

/// What the store writes under a key: payguard's choice of what is stored,
/// the client's answer as the bytes.
fn render() -> payguard::store::Render {
    Arc::new(|result| {
        stored_answer(
            result,
            |out| encode(api_answer(&Ok(out.clone()))),
            |r| encode(api_answer(&Err(EngineError::Rejected(r.clone())))),
        )
    })
}

/// A stand-in for the server's fingerprint: equal exactly when the requests are.
fn fingerprint(op: &Op) -> String {
    format!("POST {op:?}")
}

/// Runs `op` under `key` as payguard-server's keyed routes do, at the
/// instance's clock; the client's answer.
pub async fn submit(
    engine: &Engine,
    key: String,
    op: Op,
    rid: RequestId,
    clock_offset_ms: i64,
    oracle: &OracleRef,
) -> ApiResp {
    let keyed = Keyed {
        scope: KEY_SCOPE.to_owned(),
        key,
        fingerprint: fingerprint(&op),
    };
    let answer = engine
        .submit_keyed(keyed, op, rid, None, render(), LIMITS, move || {
            now_ms() as i64 + clock_offset_ms
        })
        .await;
    match answer {
        KeyedAnswer::Replay { status, body } => {
            oracle.borrow_mut().stats.key_replays += 1;
            decode(status, &body)
        }
        KeyedAnswer::Reused => ApiResp::KeyReused,
        KeyedAnswer::InUse => ApiResp::KeyInUse,
        KeyedAnswer::ClaimFailed(e) => api_answer(&Err(EngineError::Store(e))),
        KeyedAnswer::Ran(result) => api_answer(&result),
    }
}

/// What an answer says, for comparing two answers to one request: the entry
/// (a first answer and its replay name the same), or the refusal.
fn said(a: ApiResp) -> String {
    match a {
        ApiResp::Charged { entry } | ApiResp::Replayed { entry } => format!("entry {entry}"),
        ApiResp::Conflict { reason } => format!("409 {reason}"),
        other => format!("{other:?}"),
    }
}

/// The end-of-seed checks of the keyed requests (see the module docs).
pub fn check(db: &DbState, oracle: &mut Oracle) {
    let mut by_key: BTreeMap<&str, Vec<&crate::oracle::Keyed>> = BTreeMap::new();
    let keyed = oracle.keyed.clone();
    for k in &keyed {
        by_key.entry(k.key.as_str()).or_default().push(k);
    }
    for (key, answers) in by_key {
        let mut first: Option<&crate::oracle::Keyed> = None;
        let mut entries: Vec<i64> = Vec::new();
        for a in answers {
            if let ApiResp::Charged { entry } | ApiResp::Replayed { entry } = a.answer {
                if !entries.contains(&entry) {
                    entries.push(entry);
                }
            }
            if a.reuses_key {
                oracle.check(
                    ViolationKind::KeyReuseAnswered,
                    a.answer == ApiResp::KeyReused,
                    || {
                        format!(
                            "key {key} reused for {} {}: answered {:?}",
                            a.order, a.ask, a.answer
                        )
                    },
                );
                continue;
            }
            let Some(f) = first else {
                first = Some(a);
                continue;
            };
            oracle.check(
                ViolationKind::KeyAnswerChanged,
                said(a.answer) == said(f.answer),
                || {
                    format!(
                        "key {key}, {} {}: answered {:?}, first {:?}",
                        a.order, a.ask, a.answer, f.answer
                    )
                },
            );
        }
        oracle.check(ViolationKind::KeyTwoEffects, entries.len() <= 1, || {
            format!("key {key}: answers name entries {entries:?}")
        });
    }
    for e in &db.tables.entries {
        let Some(id) = e.refund_id.as_ref().filter(|_| e.kind == EntryKind::Refund) else {
            continue;
        };
        oracle.check(
            ViolationKind::KeyReuseMoved,
            !id.as_str().ends_with("-reuse"),
            || {
                format!(
                    "order {}: refund {} (entry {}) made by a request that reused a key",
                    e.order_id.as_str(),
                    id.as_str(),
                    e.id
                )
            },
        );
    }
}
