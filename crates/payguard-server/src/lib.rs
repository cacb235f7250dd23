//! payguard's HTTP API (`shared/spec/API.md`) over the engine.
//!
//! The server takes its listener and its shutdown signal as arguments, so the
//! binary and the tests start exactly the same thing: tests bind port 0.
//! Data flows one way: HTTP → [`payguard::Engine`] → lane → store → back.
//! Every error leaves as `{"error":{"code","message"}}` with the status of
//! API.md; internal details go to the log with the request id, never to the client.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod connections;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod outbox;
mod render;
mod request;
mod routes;
pub mod webhooks;

pub use auth::ApiKeys;
pub use error::ApiError;
pub use limits::Limits;
pub use request::{REQUEST_ID_HEADER, REQUEST_SPAN};

use axum::Router;
use payguard::Engine;
use std::future::Future;
use std::sync::Arc;

/// What `/healthz` reports about this instance.
#[derive(Clone, Debug)]
pub struct ServiceInfo {
    pub instance: String,
    /// `full`, `seed` or `naive`.
    pub guard: &'static str,
    /// `local` or `redis`.
    pub lock: &'static str,
}

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub info: Arc<ServiceInfo>,
    /// Empty: no authentication (loopback only, checked by the binary).
    pub keys: ApiKeys,
    pub limits: Limits,
    pub two_phase: TwoPhase,
    pub webhooks: outbox::WebhookSettings,
    pub metrics: Arc<metrics::Metrics>,
}

/// How long a hold lasts unless the request names its own TTL (`--hold-ttl`):
/// 7 days, like Stripe's uncaptured card payments.
pub const HOLD_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
/// The longest hold API.md allows (`hold_ttl_s`, `--hold-ttl`): 30 days.
pub const HOLD_TTL_S_MAX: i64 = 2_592_000;
/// How often each instance looks for expired holds (`--sweep-interval`): a hold
/// is released within this long of its `hold_expires_at`.
pub const SWEEP_INTERVAL_MS: u64 = 1000;

/// Two-phase payment settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwoPhase {
    /// The TTL of a hold whose authorize names none.
    pub hold_ttl_ms: i64,
    /// The expiry sweeper's period; 0 runs no sweeper (tests that drive expiry
    /// by hand; a capture after `hold_expires_at` is refused either way).
    pub sweep_interval_ms: u64,
}

impl Default for TwoPhase {
    fn default() -> Self {
        TwoPhase {
            hold_ttl_ms: HOLD_TTL_MS,
            sweep_interval_ms: SWEEP_INTERVAL_MS,
        }
    }
}

impl ServiceInfo {
    /// What the engine is: its instance id, guard and lock, read from the engine
    /// itself so no assembly of the app can report something else.
    pub fn of(engine: &Engine) -> Self {
        ServiceInfo {
            instance: engine.config().instance_id.clone(),
            guard: engine.config().guard.name(),
            lock: engine.lock_kind(),
        }
    }
}

impl AppState {
    /// The zero-setup state: no keys, default limits; `/healthz` reports what
    /// the engine is ([`ServiceInfo::of`]).
    pub fn new(engine: Arc<Engine>) -> Self {
        AppState {
            metrics: metrics::Metrics::new(&engine),
            info: Arc::new(ServiceInfo::of(&engine)),
            engine,
            keys: ApiKeys::default(),
            limits: Limits::default(),
            two_phase: TwoPhase::default(),
            webhooks: outbox::WebhookSettings::default(),
        }
    }
}

/// Beyond an attempt's timeout, how long a shutdown waits for the results of
/// the attempts in flight to be written.
pub const WEBHOOK_RECORD_GRACE_MS: u64 = 2_000;

/// How often expired Idempotency-Key records are pruned.
pub const IDEMPOTENCY_PRUNE_INTERVAL_MS: u64 = 60_000;

/// The whole API as an axum router.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// Serves until `shutdown` resolves, then drains ([`connections`]): stops accepting,
/// closes at once every connection without a complete request, waits at most
/// `drain_timeout_ms` for the requests in flight (each waits for its lane's commit),
/// and only then the engine finishes whatever its lanes still hold and closes the
/// store. Nothing acknowledged is lost, and a request cut off by the drain deadline
/// was already with the engine, which still finishes it (a retry replays it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine = state.engine.clone();
    let limits = state.limits.clone();
    let metrics = state.metrics.clone();
    let pruner = tokio::spawn(prune_idempotency(engine.clone()));
    let sweeper = (state.two_phase.sweep_interval_ms > 0).then(|| {
        tokio::spawn(payguard::engine::sweeper::run(
            engine.clone(),
            std::time::Duration::from_millis(state.two_phase.sweep_interval_ms),
        ))
    });
    let delivery = (state.webhooks.tick_ms > 0).then(|| {
        outbox::delivery::start(
            engine.store().clone(),
            state.webhooks.clone(),
            state.info.instance.clone(),
            metrics.clone(),
        )
    });
    let delivery_grace =
        std::time::Duration::from_millis(state.webhooks.timeout_ms + WEBHOOK_RECORD_GRACE_MS);
    let app = router(state);
    connections::serve(listener, app, &limits, metrics, shutdown).await;
    pruner.abort();
    if let Some(delivery) = delivery {
        // Attempts in flight finish and their results are written, before the
        // store closes; one cut off by the deadline is sent again after its lease.
        delivery.shutdown(delivery_grace).await;
    }
    if let Some(sweeper) = sweeper {
        // An expiry it had handed to a lane still commits or fails there (the
        // engine finishes its lanes below); one not yet handed over is left for
        // the next start or another instance.
        sweeper.abort();
    }
    engine.shutdown().await?;
    Ok(())
}

/// Deletes expired Idempotency-Key records in the background.
async fn prune_idempotency(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        IDEMPOTENCY_PRUNE_INTERVAL_MS,
    ));
    loop {
        tick.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        match engine.store().idem_prune(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(event = "idempotency_pruned", records = n),
            Err(e) => tracing::warn!(event = "idempotency_prune_failed", detail = %e),
        }
    }
}
