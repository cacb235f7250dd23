//! The outbox's consumers: the event feed ([`feed`]), webhook endpoints
//! ([`endpoints`]) and the delivery loop ([`delivery`]) that carries every
//! committed event to them, at least once, signed (Standard Webhooks, see
//! [`crate::webhooks`]).
//!
//! Events are written by the store in each movement's own transaction; nothing
//! here can lose one: the loop only reads what was committed and leases each
//! delivery before an attempt, so a dead instance's attempt is made again by
//! another once its lease runs out.
//!
//! The loop itself is `payguard::outbox::delivery` (the deterministic
//! simulation runs it too); [`delivery`] gives it this server's attempt (the
//! signed HTTP `POST`) and metrics.

pub mod delivery;
pub(crate) mod endpoints;
pub(crate) mod feed;

use crate::webhooks::{SecretSealer, DELIVERY_TIMEOUT_MS, RETRY_MAX_DEFAULT};
use std::sync::Arc;

pub use payguard::outbox::Clock;

/// How often each instance looks for events to number, fan out and deliver.
pub const DELIVERY_TICK_MS: u64 = 100;
/// Attempts in flight at once from one instance, over all endpoints.
pub const DELIVERY_INFLIGHT_MAX: usize = 256;
/// Attempts in flight at once to one endpoint (per instance): one slow or dead
/// endpoint holds at most this many of [`DELIVERY_INFLIGHT_MAX`].
pub const DELIVERY_PER_ENDPOINT_MAX: usize = 64;
/// How long a claimed delivery stays with its claimer: longer than an attempt
/// may take, so a live claimer always records its result first.
pub const DELIVERY_LEASE_MS: i64 = DELIVERY_TIMEOUT_MS as i64 + 15_000;

/// Webhook settings (`--webhook-*` flags).
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// `--webhook-allow-private`: endpoints may be loopback, private or link-local.
    pub allow_private: bool,
    /// `--webhook-retry-max`: attempts per delivery before it is `failed`.
    pub retry_max: u32,
    /// `--webhook-key-file`: how endpoint secrets are kept at rest.
    pub sealer: Arc<SecretSealer>,
    pub clock: Clock,
    /// One attempt's deadline (API.md: 15 s).
    pub timeout_ms: u64,
    pub lease_ms: i64,
    /// The delivery loop's period; 0 runs no loop on this instance.
    pub tick_ms: u64,
    pub inflight_max: usize,
    pub per_endpoint_max: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            allow_private: false,
            retry_max: RETRY_MAX_DEFAULT,
            sealer: Arc::new(SecretSealer::plaintext()),
            clock: Clock::system(),
            timeout_ms: DELIVERY_TIMEOUT_MS,
            lease_ms: DELIVERY_LEASE_MS,
            tick_ms: DELIVERY_TICK_MS,
            inflight_max: DELIVERY_INFLIGHT_MAX,
            per_endpoint_max: DELIVERY_PER_ENDPOINT_MAX,
        }
    }
}
