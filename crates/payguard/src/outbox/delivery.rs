//! The delivery loop: every instance, every tick, numbers committed events
//! (PostgreSQL), turns them into deliveries for the endpoints they match, leases
//! what is due and makes the attempts, bounded in total and per endpoint.
//!
//! Why generic: the loop is the protocol, and it is run as it ships by
//! `payguard-server` (its [`Deliver`] signs and `POST`s over HTTP, and counts
//! the attempts in its metrics) and by the deterministic simulation
//! (`payguard-sim`: its [`Deliver`] sends to a simulated receiver over the
//! simulated network, and its [`DeliverySettings`] are scaled to simulated
//! milliseconds). What an attempt's answer does next (delivered, failed, the
//! next attempt's time from [`DeliverySettings::retry_delays_ms`]) is decided
//! here, once, for both.
//!
//! Guarantees, and what gives each:
//! * at least once: a delivery leaves `pending` only on a 2xx (`delivered`), a
//!   410 or the last scheduled failure (`failed`); an instance that dies
//!   mid-attempt leaves its lease to run out, and another instance attempts again;
//! * one attempt at a time per delivery: the lease is taken by a conditional
//!   write, and a result is kept only while its claimer still holds the lease
//!   ([`crate::store::outbox`]);
//! * duplicates only after a timeout or a crash: a live claimer's lease outlasts
//!   its attempt (`payguard-server`'s `DELIVERY_LEASE_MS`; the caller's
//!   [`DeliverySettings::lease_ms`]);
//! * one slow or dead endpoint cannot hold up the others: this instance keeps
//!   at most [`DeliverySettings::per_endpoint_max`] attempts in flight per
//!   endpoint and [`DeliverySettings::inflight_max`] in all, and claims no
//!   more than that room, so memory stays bounded whatever the backlog (the
//!   rest waits in the database). With `k` instances an endpoint sees at most
//!   `k × per_endpoint_max` at once;
//! * throughput: a pass runs at every tick and whenever an attempt ends (at
//!   most one every [`PASS_GAP_MS`]); results are written in batches of up to
//!   [`RECORD_BATCH_MAX`] per transaction.

use super::schedule::next_attempt_at_on;
use super::Clock;
use crate::mutants::{armed, Mutant};
use crate::store::outbox::{
    AttemptNext, AttemptResult, AttemptRow, ClaimRequest, Claimed, EndpointStatus,
};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};

/// Most attempt results written in one transaction.
pub const RECORD_BATCH_MAX: usize = 256;
/// Shortest pause between two passes: a pass is woken by every finished
/// attempt, and this keeps the claims (write transactions) to a few hundred
/// a second however fast the endpoints answer.
pub const PASS_GAP_MS: u64 = 1;

/// How the loop runs; `payguard-server` builds it from its `--webhook-*`
/// flags (`WebhookSettings`), the simulation from its scaled limits.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// The time deliveries are scheduled, claimed and recorded at.
    pub clock: Clock,
    /// Attempts per delivery before it is `failed` (`--webhook-retry-max`).
    pub retry_max: u32,
    /// The wait after attempt k fails is `retry_delays_ms[k-1]`, the last one
    /// repeating ([`super::schedule::RETRY_DELAYS_MS`] in production).
    pub retry_delays_ms: &'static [i64],
    /// How long a claimed delivery stays with its claimer: longer than an
    /// attempt may take, so a live claimer always records its result first.
    pub lease_ms: i64,
    /// The loop's period (a pass also runs whenever an attempt ends).
    pub tick_ms: u64,
    /// Attempts in flight at once from this instance, over all endpoints.
    pub inflight_max: usize,
    /// Attempts in flight at once to one endpoint from this instance.
    pub per_endpoint_max: usize,
}

/// What an attempt's answer was, as the loop decides by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A 2xx: the delivery is done.
    Delivered,
    /// A 410: the delivery is failed and its endpoint disabled.
    Gone,
    /// Anything else (another status, refused, reset, timed out): the next
    /// attempt is scheduled.
    Retry { timed_out: bool },
}

/// One attempt as it went: `answer` is `None` when it could not even be made
/// (a secret that does not open, a URL that no longer parses), which is
/// retried like a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub answer: Option<Answer>,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The part of an attempt that is the caller's: making it (in production:
/// open the endpoint's secret, sign, `POST` once within the attempt timeout)
/// and counting it. The loop decides everything else.
pub trait Deliver: Send + Sync + 'static {
    /// Makes one attempt at `claim` and says how it went; returns within the
    /// caller's attempt timeout, which must be shorter than the lease.
    fn send(&self, claim: &Claimed) -> impl Future<Output = Sent> + Send;
    /// One attempt ended with `outcome` (`delivered`, `retry`, `failed`, `gone`).
    fn counted(&self, outcome: &'static str);
}

/// The loop's shared state.
struct Deliverer<D> {
    store: Arc<dyn Store>,
    settings: DeliverySettings,
    instance: String,
    deliver: D,
    /// Attempts in flight from this instance, in all ([`DeliverySettings::inflight_max`]).
    slots: Arc<Semaphore>,
    /// Attempts in flight from this instance per endpoint; an endpoint is
    /// absent when it has none. Invariant: every count ≤ `per_endpoint_max`.
    busy: Mutex<HashMap<String, usize>>,
    /// Woken when an attempt ends: its slot is free for the next claim.
    wake: Notify,
    /// Which endpoint a pass offers room to first (round robin).
    turn: AtomicUsize,
    /// Finished attempts, to the recorder (bounded by the slots: an attempt
    /// holds its slot until its result is queued).
    results: mpsc::Sender<AttemptResult>,
}

/// The running loop of one instance.
pub struct Delivery {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Delivery {
    /// Starts the loop, once `deliver` is ready (`None`: it could not be
    /// made, which it has logged; the loop then does not run). Store failures
    /// are logged and retried at the next tick: nothing is lost, the rows wait
    /// in the database.
    pub fn start<D: Deliver>(
        store: Arc<dyn Store>,
        settings: DeliverySettings,
        instance: String,
        deliver: impl Future<Output = Option<D>> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            if let Some(deliver) = deliver.await {
                run(store, settings, instance, deliver, stopped).await;
            }
        });
        Delivery { stop, task }
    }

    /// Stops claiming, lets the attempts in flight finish (each is bounded by
    /// the attempt timeout) and writes their results, for at most `within`; what
    /// is still unfinished then is cut off and stays leased, to be sent again
    /// once its lease runs out (a duplicate, never a loss).
    pub async fn shutdown(mut self, within: Duration) {
        self.stop.notify_one();
        if tokio::time::timeout(within, &mut self.task).await.is_err() {
            tracing::warn!(
                event = "webhook_shutdown_cut",
                "webhook attempts still in flight at the deadline; they are sent again after their lease"
            );
            self.task.abort();
        }
    }
}

async fn run<D: Deliver>(
    store: Arc<dyn Store>,
    settings: DeliverySettings,
    instance: String,
    deliver: D,
    stop: Arc<Notify>,
) {
    let (results, queued) = mpsc::channel(settings.inflight_max.max(1));
    let recorder = tokio::spawn(record(store.clone(), queued));
    let d = Arc::new(Deliverer {
        slots: Arc::new(Semaphore::new(settings.inflight_max)),
        busy: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        turn: AtomicUsize::new(0),
        store,
        settings,
        instance,
        deliver,
        results,
    });
    let mut tick = tokio::time::interval(Duration::from_millis(d.settings.tick_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // If this task is aborted, the recorder goes with it (the leases cover
    // what it had not written).
    let mut recorder = AbortOnDrop(recorder);
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            _ = tick.tick() => {}
            _ = d.wake.notified() => {}
        }
        if let Err(e) = pass(&d).await {
            tracing::warn!(event = "webhook_pass_failed", detail = %e);
        }
        tokio::time::sleep(Duration::from_millis(PASS_GAP_MS)).await;
    }
    // Every slot back means every attempt ended and queued its result.
    let all = u32::try_from(d.settings.inflight_max).unwrap_or(u32::MAX);
    let _ = d.slots.acquire_many(all).await;
    // The last sender goes with `d`: the recorder writes what is queued and ends.
    drop(d);
    let _ = (&mut recorder.0).await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes finished attempts in batches. A batch that fails to commit leaves
/// its deliveries leased: they are attempted again once the lease runs out.
async fn record(store: Arc<dyn Store>, mut queued: mpsc::Receiver<AttemptResult>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH_MAX);
    while queued.recv_many(&mut batch, RECORD_BATCH_MAX).await > 0 {
        let results = std::mem::take(&mut batch);
        let n = results.len();
        match store.webhook_record(results).await {
            Ok(kept) => {
                let lost = kept.iter().filter(|k| !**k).count();
                if lost > 0 {
                    tracing::warn!(
                        event = "webhook_lease_lost",
                        results = lost,
                        "a lease ran out before its result was written; another attempt follows"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(event = "webhook_record_failed", results = n, detail = %e)
            }
        }
    }
}

/// One pass: number, fan out, claim up to the free capacity per endpoint, and
/// start the attempts.
async fn pass<D: Deliver>(d: &Arc<Deliverer<D>>) -> Result<(), StoreError> {
    d.store.sequence_events(false).await?;
    let now = d.settings.clock.now_ms();
    d.store.webhook_fan_out(now).await?;
    let free = d.slots.available_permits();
    if free == 0 {
        return Ok(());
    }
    let mut endpoints: Vec<String> = d
        .store
        .webhook_endpoints(None)
        .await?
        .into_iter()
        .filter(|e| e.status == EndpointStatus::Enabled)
        .map(|e| e.id)
        .collect();
    if endpoints.is_empty() {
        return Ok(());
    }
    // A different endpoint goes first on each pass, so when the total is the
    // limit no endpoint is always last.
    let turn = d.turn.fetch_add(1, Ordering::Relaxed) % endpoints.len();
    endpoints.rotate_left(turn);
    let wants: Vec<(String, usize)> = {
        let busy = d.busy.lock().unwrap_or_else(|p| p.into_inner());
        endpoints
            .into_iter()
            .filter_map(|id| {
                let room = d
                    .settings
                    .per_endpoint_max
                    .saturating_sub(busy.get(&id).copied().unwrap_or(0));
                (room > 0).then_some((id, room))
            })
            .collect()
    };
    if wants.is_empty() {
        return Ok(());
    }
    let claimed = d
        .store
        .webhook_claim(ClaimRequest {
            now_ms: now,
            lease_ms: d.settings.lease_ms,
            owner: d.instance.clone(),
            wants,
            total_max: free,
        })
        .await?;
    for claim in claimed {
        let Ok(permit) = d.slots.clone().try_acquire_owned() else {
            // Cannot happen (we claimed at most what was free); the lease
            // runs out and the delivery is attempted again.
            break;
        };
        let room = Room::take(d.clone(), claim.endpoint_id.clone());
        let d = d.clone();
        tokio::spawn(async move {
            let result = attempt(&d, claim).await;
            // Queued before the slot is given back: the queue never holds
            // more than the slots.
            let _ = d.results.send(result).await;
            drop(room);
            drop(permit);
            d.wake.notify_one();
        });
    }
    Ok(())
}

/// One attempt's share of its endpoint's room on this instance, given back
/// when dropped: also when the attempt panics, so no room is lost for good.
struct Room<D> {
    d: Arc<Deliverer<D>>,
    endpoint: String,
}

impl<D> Room<D> {
    fn take(d: Arc<Deliverer<D>>, endpoint: String) -> Self {
        *d.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(endpoint.clone())
            .or_default() += 1;
        Room { d, endpoint }
    }
}

impl<D> Drop for Room<D> {
    fn drop(&mut self) {
        let mut busy = self.d.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.endpoint) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.endpoint);
            }
        }
    }
}

/// One attempt and its log lines; returns its result, for the recorder.
async fn attempt<D: Deliver>(d: &Deliverer<D>, claim: Claimed) -> AttemptResult {
    let settings = &d.settings;
    let Sent {
        answer,
        status,
        error,
        duration_ms,
    } = d.deliver.send(&claim).await;
    let at = settings.clock.now_ms();
    let next = match answer {
        Some(Answer::Delivered) => AttemptNext::Delivered,
        // A deliberate bug for the simulation (inert unless armed).
        Some(Answer::Retry { timed_out: true })
            if armed(Mutant::TimedOutAttemptRecordedDelivered) =>
        {
            AttemptNext::Delivered
        }
        Some(Answer::Gone) => AttemptNext::Gone,
        Some(Answer::Retry { .. }) | None => match next_attempt_at_on(
            settings.retry_delays_ms,
            claim.attempt,
            settings.retry_max,
            at,
        ) {
            Some(when) => AttemptNext::RetryAt(when),
            None => AttemptNext::Failed,
        },
    };
    tracing::info!(
        event = "webhook_attempt",
        evt = %claim.event.id,
        oid = claim.event.order.id.as_str(),
        endpoint = %claim.endpoint_id,
        attempt = claim.attempt,
        status = status.map_or(0, i64::from),
        outcome = next_label(next),
        ms = duration_ms,
        error = error.as_deref().unwrap_or(""),
    );
    if matches!(next, AttemptNext::Failed | AttemptNext::Gone) {
        tracing::warn!(
            event = "webhook_failed",
            evt = %claim.event.id,
            oid = claim.event.order.id.as_str(),
            endpoint = %claim.endpoint_id,
            attempts = claim.attempt,
            reason = if next == AttemptNext::Gone { "gone" } else { "retries_exhausted" },
        );
    }
    d.deliver.counted(next_label(next));
    AttemptResult {
        endpoint_id: claim.endpoint_id,
        event_id: claim.event.id,
        owner: d.instance.clone(),
        attempt: claim.attempt,
        row: AttemptRow {
            attempt: claim.attempt,
            at,
            status_code: status,
            error,
            duration_ms: duration_ms as i64,
            instance: d.instance.clone(),
        },
        next,
    }
}

fn next_label(next: AttemptNext) -> &'static str {
    match next {
        AttemptNext::Delivered => "delivered",
        AttemptNext::RetryAt(_) => "retry",
        AttemptNext::Failed => "failed",
        AttemptNext::Gone => "gone",
    }
}
