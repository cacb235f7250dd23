//! payguard's HTTP API (`shared/spec/API.md`) over the engine.
//!
//! The server takes its listener and its shutdown signal as arguments, so the
//! binary and the tests start exactly the same thing: tests bind port 0.
//! Data flows one way: HTTP → [`payguard::Engine`] → lane → store → back.
//! Every error leaves as `{"error":{"code","message"}}` with the status of
//! API.md; internal details go to the log with the request id, never to the client.
#![forbid(unsafe_code)]

mod error;
mod request;
mod routes;

pub use error::ApiError;
pub use request::{BODY_BYTES_MAX, REQUEST_ID_HEADER};

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
}

/// The whole API as an axum router.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// Serves until `shutdown` resolves, then drains: axum stops accepting, waits for
/// every request in flight (each waits for its lane's commit), and only then the
/// engine finishes whatever its lanes still hold and closes the store. Nothing
/// acknowledged is lost and nothing accepted is left without an answer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine = state.engine.clone();
    let app = router(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let closed = engine.shutdown().await;
    served?;
    closed?;
    Ok(())
}
