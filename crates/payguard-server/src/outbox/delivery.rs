//! The delivery loop: every instance, every tick, numbers committed events
//! (PostgreSQL), turns them into deliveries for the endpoints they match, leases
//! what is due and makes the attempts, bounded in total and per endpoint.
//!
//! Guarantees, and what gives each:
//! * at least once: a delivery leaves `pending` only on a 2xx (`delivered`), a
//!   410 or the last scheduled failure (`failed`); an instance that dies
//!   mid-attempt leaves its lease to run out, and another instance attempts again;
//! * one attempt at a time per delivery: the lease is taken by a conditional
//!   write, and a result is kept only while its claimer still holds the lease
//!   ([`payguard::store::outbox`]);
//! * duplicates only after a timeout or a crash: a live claimer's lease outlasts
//!   its attempt ([`super::DELIVERY_LEASE_MS`]);
//! * one slow or dead endpoint cannot hold up the others: each claim takes at
//!   most [`super::WebhookSettings::per_endpoint_max`] per endpoint, and at most
//!   the free share of [`super::WebhookSettings::inflight_max`] in all, so
//!   memory stays bounded whatever the backlog (the rest waits in the database).

use super::WebhookSettings;
use crate::metrics::Metrics;
use crate::webhooks::{next_attempt_at, Outcome, Sender, SenderConfig};
use payguard::store::outbox::{AttemptNext, AttemptResult, AttemptRow, ClaimRequest, Claimed};
use payguard::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Runs the loop until aborted. Store failures are logged and retried at the
/// next tick: nothing is lost, the rows wait in the database.
pub async fn run(
    store: Arc<dyn Store>,
    settings: WebhookSettings,
    instance: String,
    metrics: Arc<Metrics>,
) {
    let sender = match Sender::new(SenderConfig {
        allow_private: settings.allow_private,
        timeout_ms: settings.timeout_ms,
        ..SenderConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = "webhook_sender_failed", detail = %e, "no webhook will be delivered by this instance");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(settings.inflight_max));
    let mut tick = tokio::time::interval(Duration::from_millis(settings.tick_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&store, &settings, &instance, &sender, &slots, &metrics).await {
            tracing::warn!(event = "webhook_pass_failed", detail = %e);
        }
    }
}

/// One tick's work: number, fan out, claim, and start the attempts.
async fn pass(
    store: &Arc<dyn Store>,
    settings: &WebhookSettings,
    instance: &str,
    sender: &Sender,
    slots: &Arc<Semaphore>,
    metrics: &Arc<Metrics>,
) -> Result<(), payguard::store::StoreError> {
    store.sequence_events().await?;
    let now = settings.clock.now_ms();
    store.webhook_fan_out(now).await?;
    let free = slots.available_permits();
    if free == 0 {
        return Ok(());
    }
    let claimed = store
        .webhook_claim(ClaimRequest {
            now_ms: now,
            lease_ms: settings.lease_ms,
            owner: instance.to_owned(),
            per_endpoint_max: settings.per_endpoint_max,
            total_max: free,
        })
        .await?;
    for claim in claimed {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Cannot happen (we claimed at most what was free); the lease
            // runs out and the delivery is attempted again.
            break;
        };
        let (store, settings, sender, metrics) = (
            store.clone(),
            settings.clone(),
            sender.clone(),
            metrics.clone(),
        );
        let instance = instance.to_owned();
        tokio::spawn(async move {
            attempt(&*store, &settings, &sender, &instance, claim, &metrics).await;
            drop(permit);
        });
    }
    Ok(())
}

/// One attempt, its log lines, and its result written under the lease.
async fn attempt(
    store: &dyn Store,
    settings: &WebhookSettings,
    sender: &Sender,
    instance: &str,
    claim: Claimed,
    metrics: &Metrics,
) {
    let (outcome, status, error, duration_ms) = send(settings, sender, &claim).await;
    let at = settings.clock.now_ms();
    let next = match outcome {
        Some(Outcome::Delivered) => AttemptNext::Delivered,
        Some(Outcome::Gone) => AttemptNext::Gone,
        Some(Outcome::Retry { .. }) | None => {
            match next_attempt_at(claim.attempt, settings.retry_max, at) {
                Some(when) => AttemptNext::RetryAt(when),
                None => AttemptNext::Failed,
            }
        }
    };
    tracing::info!(
        event = "webhook_attempt",
        evt = %claim.event.id,
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
            endpoint = %claim.endpoint_id,
            attempts = claim.attempt,
            reason = if next == AttemptNext::Gone { "gone" } else { "retries_exhausted" },
        );
    }
    metrics.webhook_attempt(next_label(next));
    let result = AttemptResult {
        endpoint_id: claim.endpoint_id.clone(),
        event_id: claim.event.id.clone(),
        owner: instance.to_owned(),
        attempt: claim.attempt,
        row: AttemptRow {
            attempt: claim.attempt,
            at,
            status_code: status,
            error,
            duration_ms: duration_ms as i64,
            instance: instance.to_owned(),
        },
        next,
    };
    match store.webhook_record(result).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            event = "webhook_lease_lost",
            evt = %claim.event.id,
            endpoint = %claim.endpoint_id,
            "the lease ran out before the result was written; another attempt follows"
        ),
        // The lease runs out and the delivery is attempted again.
        Err(e) => {
            tracing::warn!(event = "webhook_record_failed", evt = %claim.event.id, detail = %e)
        }
    }
}

/// The HTTP attempt; `None` outcome when it could not even be made (a secret
/// that does not open, a URL that no longer parses): retried like a failure.
async fn send(
    settings: &WebhookSettings,
    sender: &Sender,
    claim: &Claimed,
) -> (Option<Outcome>, Option<u16>, Option<String>, u64) {
    let secret = match settings
        .sealer
        .open(&claim.endpoint_id, &claim.sealed_secret)
    {
        Ok(s) => s,
        Err(e) => return (None, None, Some(format!("secret: {e}")), 0),
    };
    let url = match url::Url::parse(&claim.url) {
        Ok(u) => u,
        Err(e) => return (None, None, Some(format!("url: {e}")), 0),
    };
    // The signature's timestamp is the wall clock's: the receiver checks it
    // against its own (the schedule's clock may be a test's).
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let body = bytes::Bytes::from(claim.event.to_json());
    let a = sender
        .send(&url, &claim.event.id, body, &secret, now_s)
        .await;
    (Some(a.outcome), a.status, a.error, a.duration_ms)
}

fn next_label(next: AttemptNext) -> &'static str {
    match next {
        AttemptNext::Delivered => "delivered",
        AttemptNext::RetryAt(_) => "retry",
        AttemptNext::Failed => "failed",
        AttemptNext::Gone => "gone",
    }
}
