//! Webhooks in the simulation (`Protocol::webhooks`): the receiver host the
//! seed's endpoints point at, the attempt payguard's delivery loop makes to it
//! ([`SimDeliver`], the simulation's `payguard::outbox::delivery::Deliver`),
//! and the end-of-seed checks of what was delivered ([`check`]).
//!
//! Why a receiver: at least once and one attempt at a time are promises about
//! what an endpoint sees. The receiver stands in for a customer's endpoint
//! behind `payguard-server`'s HTTP sender: it records every attempt that
//! reaches it (endpoint, event, attempt number, time, its answer) and answers
//! 200, or, on the seed's random choice, 500 at once or 504 past the attempt's
//! timeout (at most [`RECEIVER_FAILS_PER_DELIVERY_MAX`] failures per
//! delivery), so retries, timeouts and leases running out happen. It never
//! answers 410 and never crashes (the faults are the instances', the
//! database's and the network's). Not simulated: signing, the secret, SSRF
//! rules and HTTP itself (the sender's own tests cover them); an attempt is
//! one message and its answer, either of which the network may lose.
//!
//! What the checks hold, per seed with webhooks on ([`check`]):
//! * fan-out: every committed event after an endpoint's creation that matches
//!   it has exactly one delivery for it, and no delivery names an event that
//!   did not commit or does not match (`ViolationKind::WebhookFanOut`);
//! * nothing lost: once the seed drained, every delivery is `delivered` and
//!   was received; `failed` only after [`WEBHOOK_RETRY_MAX`] claims (never on
//!   a seed with no fault) (`WebhookUndelivered`);
//! * no delivery recorded `delivered` for an attempt the receiver did not
//!   answer 2xx (`WebhookDeliveredWithoutAck`);
//! * no attempt received after its delivery's `delivered` record committed
//!   while its own lease still ran and its result was not kept (a live
//!   claimer's attempt ends before its lease: only an attempt whose lease ran
//!   out, e.g. a claim answered late, or one its claimer gave up on, a
//!   timeout kept as a retry while the message was still on a slow link, may
//!   land after, as a timed-out HTTP request may; the endpoint dedupes by
//!   `webhook-id`) (`WebhookReceivedAfterDelivered`);
//! * attempts numbered 1..n by the claims, without gaps, n the delivery's
//!   `attempts`; every receipt and attempt row names a claimed number; a
//!   result kept is the latest claim's (no claim came between), and a
//!   `delivered` one is the last attempt's (`WebhookAttempts`);
//! * one attempt at a time: no claim while the previous attempt's lease still
//!   ran and its result was not kept (`WebhookOverlap`);
//! * on a seed with no fault, every delivery `delivered` within
//!   [`WEBHOOK_LIVENESS_MS`] of its event (`WebhookLiveness`).

use crate::config::{
    RECEIVER_FAILS_PER_DELIVERY_MAX, RECEIVER_FAIL_PERCENT_CHOICES, RECEIVER_PORT,
    RECEIVER_RNG_SALT, RECEIVER_SLOW_MS, WEBHOOK_INFLIGHT_MAX, WEBHOOK_LEASE_MS,
    WEBHOOK_LIVENESS_MS, WEBHOOK_PER_ENDPOINT_MAX, WEBHOOK_RETRY_DELAYS_MS, WEBHOOK_RETRY_MAX,
    WEBHOOK_TICK_MS, WEBHOOK_TIMEOUT_MS,
};
use crate::db::DbState;
use crate::oracle::{Oracle, OracleRef, ViolationKind};
use crate::outbox::{DeliveryKey, HookLog, SIM_ENDPOINTS};
use crate::wire::{now_ms, CallError, Caller, Post, Server};
use payguard::outbox::delivery::{Answer, Deliver, DeliverySettings, Sent};
use payguard::outbox::Clock;
use payguard::store::outbox::{AttemptNext, Claimed, DeliveryStatus, Endpoint, EndpointStatus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The receiver's host.
pub const RECEIVER_HOST: &str = "hooks";

/// One attempt, as it crosses the network.
#[derive(Debug, Clone)]
pub struct HookPost {
    pub endpoint_id: String,
    pub event_id: String,
    pub attempt: u32,
    pub owner: String,
}

/// The receiver's answer: an HTTP status.
#[derive(Debug, Clone, Copy)]
pub struct HookAnswer {
    pub status: u16,
}

/// One attempt that reached the receiver.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub endpoint_id: String,
    pub event_id: String,
    pub attempt: u32,
    pub owner: String,
    pub at: u64,
    /// What it answered (504: late, past the attempt's timeout).
    pub status: u16,
}

/// The receiver's state: its random stream and what it received.
#[derive(Debug)]
pub struct Receiver {
    rng: SmallRng,
    fail_percent: u32,
    failed: BTreeMap<DeliveryKey, u32>,
    pub receipts: Vec<Receipt>,
}

pub type SharedReceiver = Arc<Mutex<Receiver>>;

impl Receiver {
    /// The seed's receiver: its failure rate and answers from its own stream.
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ RECEIVER_RNG_SALT);
        let fail_percent =
            RECEIVER_FAIL_PERCENT_CHOICES[rng.random_range(0..RECEIVER_FAIL_PERCENT_CHOICES.len())];
        Receiver {
            rng,
            fail_percent,
            failed: BTreeMap::new(),
            receipts: Vec::new(),
        }
    }

    /// The answer to `post` and after how long (ms).
    fn answer(&mut self, post: &HookPost) -> (u16, u64) {
        let key = (post.endpoint_id.clone(), post.event_id.clone());
        let failed = self.failed.entry(key).or_default();
        if *failed < RECEIVER_FAILS_PER_DELIVERY_MAX
            && self.rng.random_ratio(self.fail_percent, 100)
        {
            *failed += 1;
            if self.rng.random_bool(0.5) {
                return (500, 0);
            }
            return (504, RECEIVER_SLOW_MS);
        }
        (200, 0)
    }
}

fn lock(r: &SharedReceiver) -> std::sync::MutexGuard<'_, Receiver> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The receiver host's software.
pub async fn serve(post: Post, state: SharedReceiver, oracle: OracleRef) -> turmoil::Result {
    let server = Rc::new(Server::bind(post, RECEIVER_PORT).await?);
    loop {
        let req = server.recv().await?;
        let Some(body) = req.body.downcast_ref::<HookPost>().cloned() else {
            continue;
        };
        let at = now_ms();
        let (status, after_ms) = {
            let mut r = lock(&state);
            let (status, after_ms) = r.answer(&body);
            r.receipts.push(Receipt {
                endpoint_id: body.endpoint_id.clone(),
                event_id: body.event_id.clone(),
                attempt: body.attempt,
                owner: body.owner.clone(),
                at,
                status,
            });
            (status, after_ms)
        };
        oracle.borrow_mut().note(at, || {
            format!(
                "hooks: {}/{} attempt {} from {} -> {status}{}",
                body.endpoint_id,
                body.event_id,
                body.attempt,
                body.owner,
                if after_ms > 0 {
                    format!(" after {after_ms} ms")
                } else {
                    String::new()
                }
            )
        });
        let server = server.clone();
        tokio::task::spawn_local(async move {
            if after_ms > 0 {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
            }
            server.reply(&req, Box::new(HookAnswer { status })).await;
        });
    }
}

/// The seed's endpoints, created before it starts (their cursors at the
/// feed's end).
pub fn create_endpoints(db: &mut DbState) {
    for (id, types) in SIM_ENDPOINTS {
        let created = db.outbox.create(
            Endpoint {
                id: id.to_owned(),
                url: format!("http://{RECEIVER_HOST}:{RECEIVER_PORT}/{id}"),
                types: types.map(<[_]>::to_vec),
                sealed_secret: format!("plain:whsec_{id}"),
                status: EndpointStatus::Enabled,
                disabled_reason: None,
                created_at: 0,
                updated_at: 0,
            },
            &db.tables.events,
        );
        assert!(created, "endpoint {id} is new");
    }
}

/// The delivery loop's settings, scaled (see `config`), on an instance's clock.
pub fn settings(clock_offset_ms: i64) -> DeliverySettings {
    DeliverySettings {
        clock: Clock::from_fn(move || now_ms() as i64 + clock_offset_ms),
        retry_max: WEBHOOK_RETRY_MAX,
        retry_delays_ms: &WEBHOOK_RETRY_DELAYS_MS,
        lease_ms: WEBHOOK_LEASE_MS,
        tick_ms: WEBHOOK_TICK_MS,
        inflight_max: WEBHOOK_INFLIGHT_MAX,
        per_endpoint_max: WEBHOOK_PER_ENDPOINT_MAX,
    }
}

/// One instance's attempts: a message to the receiver, its answer awaited
/// for [`WEBHOOK_TIMEOUT_MS`] (a lost message or answer is a timeout, as an
/// HTTP attempt that never hears back).
pub struct SimDeliver {
    pub net: Caller,
    pub owner: String,
    pub oracle: OracleRef,
}

impl Deliver for SimDeliver {
    async fn send(&self, claim: &Claimed) -> Sent {
        let started = now_ms();
        let post = HookPost {
            endpoint_id: claim.endpoint_id.clone(),
            event_id: claim.event.id.clone(),
            attempt: claim.attempt,
            owner: self.owner.clone(),
        };
        let got: Result<HookAnswer, CallError> = self
            .net
            .call(
                RECEIVER_HOST,
                RECEIVER_PORT,
                post,
                Duration::from_millis(WEBHOOK_TIMEOUT_MS),
            )
            .await;
        let duration_ms = now_ms() - started;
        match got {
            Ok(HookAnswer { status }) => Sent {
                answer: Some(match status {
                    200..=299 => Answer::Delivered,
                    410 => Answer::Gone,
                    _ => Answer::Retry { timed_out: false },
                }),
                status: Some(status),
                error: None,
                duration_ms,
            },
            Err(e) => Sent {
                answer: Some(Answer::Retry {
                    timed_out: e == CallError::Timeout,
                }),
                status: None,
                error: Some(e.to_string()),
                duration_ms,
            },
        }
    }

    fn counted(&self, outcome: &'static str) {
        let mut o = self.oracle.borrow_mut();
        o.stats.hook_attempts += 1;
        o.stats.hook_retries += u64::from(outcome == "retry");
    }
}

/// The webhook checks at the end of a seed (see the module docs). `fault_free`:
/// the seed had no fault, no loss and no stall (liveness applies).
pub fn check(db: &DbState, receiver: &Receiver, oracle: &mut Oracle, fault_free: bool) {
    let events = &db.tables.events;
    let outbox = &db.outbox;
    let mut receipts: BTreeMap<DeliveryKey, Vec<&Receipt>> = BTreeMap::new();
    for r in &receiver.receipts {
        receipts
            .entry((r.endpoint_id.clone(), r.event_id.clone()))
            .or_default()
            .push(r);
    }
    // Fan-out: exactly the matching events after each endpoint's creation.
    for row in outbox.endpoints.values() {
        let types = row.endpoint.types_column();
        for e in events.iter().filter(|e| e.seq > row.created_after_seq) {
            let wanted = types
                .as_ref()
                .is_none_or(|t| t.contains(&format!("\"{}\"", e.kind.as_str())));
            let has = outbox
                .deliveries
                .get(&(row.endpoint.id.clone(), e.id.clone()));
            oracle.check(
                ViolationKind::WebhookFanOut,
                wanted == has.is_some() && has.is_none_or(|d| d.event_seq == e.seq),
                || {
                    format!(
                        "endpoint {}: event {} ({}, seq {}) matches: {wanted}, delivery: {:?}",
                        row.endpoint.id,
                        e.id,
                        e.kind.as_str(),
                        e.seq,
                        has.map(|d| d.event_seq)
                    )
                },
            );
        }
    }
    for (ep, ev) in outbox.deliveries.keys() {
        let known = outbox.endpoints.get(ep).is_some_and(|r| {
            events
                .iter()
                .any(|e| &e.id == ev && e.seq > r.created_after_seq)
        });
        oracle.check(ViolationKind::WebhookFanOut, known, || {
            format!("a delivery of {ev} to {ep}: no such committed event after the endpoint")
        });
    }
    for ((ep, ev), d) in &outbox.deliveries {
        let key = (ep.clone(), ev.clone());
        let log: &[HookLog] = outbox.log.get(&key).map_or(&[], Vec::as_slice);
        let got: &[&Receipt] = receipts.get(&key).map_or(&[], Vec::as_slice);
        let name = format!("delivery {ep}/{ev}");
        oracle.stats.hook_deliveries += 1;
        oracle.stats.hook_receipts += got.len() as u64;
        oracle.stats.hook_duplicates +=
            u64::from(got.iter().filter(|r| r.status < 300).count() > 1);
        // Nothing lost.
        match d.status {
            DeliveryStatus::Delivered => oracle.stats.hook_delivered += 1,
            DeliveryStatus::Failed if !fault_free && d.attempts >= WEBHOOK_RETRY_MAX => {
                oracle.stats.hook_failed += 1
            }
            status => oracle.violate(
                ViolationKind::WebhookUndelivered,
                format!(
                    "{name}: {} after {} attempts and the drain ({} received)",
                    status.as_str(),
                    d.attempts,
                    got.len()
                ),
            ),
        }
        // The claims number the attempts 1..n.
        let claims: Vec<(u32, i64, i64)> = log
            .iter()
            .filter_map(|l| match l {
                HookLog::Claimed {
                    attempt,
                    now_ms,
                    lease_until,
                    ..
                } => Some((*attempt, *now_ms, *lease_until)),
                HookLog::Kept { .. } => None,
            })
            .collect();
        let numbered: Vec<u32> = claims.iter().map(|c| c.0).collect();
        oracle.check(
            ViolationKind::WebhookAttempts,
            numbered.iter().copied().eq(1..=d.attempts),
            || {
                format!(
                    "{name}: {} attempts, claims numbered {numbered:?}",
                    d.attempts
                )
            },
        );
        for a in got.iter().map(|r| r.attempt).chain(
            outbox
                .attempts
                .range((ep.clone(), ev.clone(), 0)..=(ep.clone(), ev.clone(), u32::MAX))
                .map(|(_, row)| row.attempt),
        ) {
            oracle.check(
                ViolationKind::WebhookAttempts,
                (1..=d.attempts).contains(&a),
                || {
                    format!(
                        "{name}: attempt {a} received or logged, {} claimed",
                        d.attempts
                    )
                },
            );
        }
        // Each result kept is the latest claim's; overlapping leases.
        let mut latest: Option<(u32, i64, bool)> = None;
        for l in log {
            match l {
                HookLog::Claimed {
                    attempt,
                    now_ms,
                    lease_until,
                    owner,
                    ..
                } => {
                    if let Some((prev, prev_lease, kept)) = latest {
                        oracle.check(
                            ViolationKind::WebhookOverlap,
                            kept || *now_ms >= prev_lease,
                            || format!("{name}: attempt {attempt} claimed by {owner} at {now_ms} ms while attempt {prev}'s lease ran until {prev_lease} ms, its result not kept"),
                        );
                    }
                    latest = Some((*attempt, *lease_until, false));
                }
                HookLog::Kept {
                    attempt, owner, at, ..
                } => {
                    let last = latest.map(|(a, _, _)| a);
                    oracle.check(
                        ViolationKind::WebhookAttempts,
                        last == Some(*attempt),
                        || format!("{name}: the result of attempt {attempt} by {owner} kept at {at} ms, the latest claim was {last:?}"),
                    );
                    if let Some(l) = latest.as_mut().filter(|l| l.0 == *attempt) {
                        l.2 = true;
                    }
                }
            }
        }
        let delivered = log.iter().find_map(|l| match l {
            HookLog::Kept {
                attempt,
                at,
                next: AttemptNext::Delivered,
                ..
            } => Some((*attempt, *at)),
            _ => None,
        });
        if let Some((attempt, at)) = delivered {
            oracle.check(
                ViolationKind::WebhookAttempts,
                attempt == d.attempts,
                || format!("{name}: delivered by attempt {attempt} of {}", d.attempts),
            );
            let acked = got.iter().any(|r| r.attempt == attempt && r.status < 300);
            oracle.check(ViolationKind::WebhookDeliveredWithoutAck, acked, || {
                format!(
                    "{name}: recorded delivered at {at} ms by attempt {attempt}, which the receiver answered {:?}",
                    got.iter()
                        .filter(|r| r.attempt == attempt)
                        .map(|r| r.status)
                        .collect::<Vec<_>>()
                )
            });
            for r in got.iter().filter(|r| r.at > at) {
                let lease = claims
                    .iter()
                    .find(|c| c.0 == r.attempt)
                    .map_or(i64::MIN, |c| c.2);
                // Its claimer gave it up before it landed: its result (a
                // timeout, a retry) was kept. An HTTP request that timed out
                // can still reach the endpoint after it (a slow link); the
                // endpoint dedupes by `webhook-id`.
                let given_up = log.iter().any(|l| {
                    matches!(l, HookLog::Kept { attempt, at: kept, .. }
                        if *attempt == r.attempt && *kept <= r.at)
                });
                oracle.check(
                    ViolationKind::WebhookReceivedAfterDelivered,
                    given_up || r.at as i64 >= lease,
                    || format!("{name}: attempt {} from {} received at {} ms, after the delivered record at {at} ms, its lease running until {lease} ms and its result not kept", r.attempt, r.owner, r.at),
                );
            }
            if fault_free {
                let created = events
                    .iter()
                    .find(|e| &e.id == ev)
                    .map_or(0, |e| e.created_at);
                oracle.check(
                    ViolationKind::WebhookLiveness,
                    at as i64 - created <= WEBHOOK_LIVENESS_MS as i64,
                    || format!("{name}: delivered at {at} ms, its event committed at {created} ms, over {WEBHOOK_LIVENESS_MS} ms with no fault"),
                );
            }
        }
        if d.status == DeliveryStatus::Delivered {
            oracle.check(ViolationKind::WebhookUndelivered, !got.is_empty(), || {
                format!("{name}: delivered, never received")
            });
        }
    }
}
