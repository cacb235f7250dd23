//! This server's part of the delivery loop: the loop itself is
//! `payguard::outbox::delivery` (shared with the deterministic simulation, so
//! the code simulated is the code shipped); here is what it calls for one
//! attempt, [`HttpDeliver`]: open the endpoint's secret, sign and `POST` once
//! with the [`Sender`] (SSRF rule, timeout), and count the attempt in the
//! metrics.
//!
//! Guarantees: the same as before the loop moved (the loop's limits, log lines,
//! shutdown and results are unchanged); an attempt that could not be made (a
//! secret that does not open, a URL that no longer parses) is retried like a
//! failure; a sender that cannot be built is logged once and the loop does
//! not run on this instance.

use super::WebhookSettings;
use crate::metrics::Metrics;
use crate::webhooks::{Outcome, Sender, SenderConfig, RETRY_DELAYS_MS};
use payguard::outbox::delivery::{Answer, Deliver, DeliverySettings, Sent};
use payguard::store::outbox::Claimed;
use payguard::Store;
use std::sync::Arc;

pub use payguard::outbox::delivery::{Delivery, PASS_GAP_MS, RECORD_BATCH_MAX};

/// Starts the loop with this server's attempt ([`HttpDeliver`]).
pub fn start(
    store: Arc<dyn Store>,
    settings: WebhookSettings,
    instance: String,
    metrics: Arc<Metrics>,
) -> Delivery {
    let loop_settings = DeliverySettings {
        clock: settings.clock.clone(),
        retry_max: settings.retry_max,
        retry_delays_ms: &RETRY_DELAYS_MS,
        lease_ms: settings.lease_ms,
        tick_ms: settings.tick_ms,
        inflight_max: settings.inflight_max,
        per_endpoint_max: settings.per_endpoint_max,
    };
    Delivery::start(store, loop_settings, instance, async move {
        match Sender::new(SenderConfig {
            allow_private: settings.allow_private,
            timeout_ms: settings.timeout_ms,
            ..SenderConfig::default()
        }) {
            Ok(sender) => Some(HttpDeliver {
                settings,
                sender,
                metrics,
            }),
            Err(e) => {
                tracing::error!(event = "webhook_sender_failed", detail = %e, "no webhook will be delivered by this instance");
                None
            }
        }
    })
}

/// One attempt over HTTP, as the loop asks for it.
pub struct HttpDeliver {
    settings: WebhookSettings,
    sender: Sender,
    metrics: Arc<Metrics>,
}

impl Deliver for HttpDeliver {
    async fn send(&self, claim: &Claimed) -> Sent {
        let (outcome, status, error, duration_ms) = send(&self.settings, &self.sender, claim).await;
        Sent {
            answer: outcome.map(|o| match o {
                Outcome::Delivered => Answer::Delivered,
                Outcome::Gone => Answer::Gone,
                Outcome::Retry { timed_out } => Answer::Retry { timed_out },
            }),
            status,
            error,
            duration_ms,
        }
    }

    fn counted(&self, outcome: &'static str) {
        self.metrics.webhook_attempt(outcome);
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
