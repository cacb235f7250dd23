//! Every limit of the HTTP boundary, named, configurable, and with a documented
//! error when hit:
//!
//! | limit | default | when hit |
//! |---|---|---|
//! | `body_bytes_max` | 64 KiB | 413 `body_too_large` |
//! | `header_bytes_max` | 16 KiB (names + values) | 431 `headers_too_large` |
//! | `request_timeout_ms` | 10 s | 503 `unavailable`, only before a change reaches the store (reads: any time); counted from a complete request, reading it is under the header and body deadlines |
//! | `connections_max` | 1024 | the connection waiting longest without a complete request (idle or unfinished) is closed to make room, else one stuck writing; only when all are handling a request do new ones wait in the listen backlog |
//! | `header_read_timeout_ms` | 5 s | connection closed (from accept, or from a kept-alive connection's next first byte) |
//! | `body_read_timeout_ms` | 10 s | 408 `request_timeout`, connection closed, nothing moved |
//! | `idle_timeout_ms` | 120 s | idle keep-alive connection closed |
//! | `write_timeout_ms` | 10 s | connection closed (answer not taken by the client in time) |
//! | `drain_timeout_ms` | 30 s | at shutdown, connections still open are closed |
//! | lane queue depth (engine) | 4096 | 503 `unavailable` at once |
//!
//! A write's timeout is enforced by the engine as a deadline for reaching the
//! store: once its change is handed over, the request waits for the outcome, so a
//! 503 always means nothing moved. The connection deadlines are enforced by
//! [`crate::connections`].

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Duration;

pub const BODY_BYTES_MAX: usize = 64 * 1024;
pub const HEADER_BYTES_MAX: usize = 16 * 1024;
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const CONNECTIONS_MAX: usize = 1024;
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// Headers are under 16 KiB, one or two packets from any working client: 5 s is
/// generous, and no longer than a slow client may keep a place it never uses.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Bodies are under 64 KiB: 10 s is an average of 6.5 KB/s, far below any
/// working link.
pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;
/// Longer than the idle timeouts of client pools (Go and reqwest: 90 s) and load
/// balancers (60 s), so payguard is not the side that closes a pooled connection
/// just as a request is sent on it; at the limit idle connections go first anyway.
pub const IDLE_TIMEOUT_MS: u64 = 120_000;
/// Answers are small (the largest, `/openapi.json` and `/metrics`, tens of KiB).
pub const WRITE_TIMEOUT_MS: u64 = 10_000;
/// Like a Kubernetes pod's default termination grace period.
pub const DRAIN_TIMEOUT_MS: u64 = 30_000;

#[derive(Clone, Debug)]
pub struct Limits {
    pub body_bytes_max: usize,
    pub header_bytes_max: usize,
    pub request_timeout_ms: u64,
    pub connections_max: usize,
    /// How long a stored Idempotency-Key response is kept.
    pub idempotency_ttl_ms: i64,
    /// From accept (or a kept-alive connection's next first byte) to the end of the headers.
    pub header_read_timeout_ms: u64,
    /// From the end of the headers to the end of the body.
    pub body_read_timeout_ms: u64,
    /// Between keep-alive requests: from an answer sent to the next request's first byte.
    pub idle_timeout_ms: u64,
    /// From an answer ready to it handed to the socket, and the longest a write may
    /// find the socket full.
    pub write_timeout_ms: u64,
    /// At shutdown, how long requests already handed to the engine may take to be answered.
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: BODY_BYTES_MAX,
            header_bytes_max: HEADER_BYTES_MAX,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            connections_max: CONNECTIONS_MAX,
            idempotency_ttl_ms: IDEMPOTENCY_TTL_MS,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: BODY_READ_TIMEOUT_MS,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
            write_timeout_ms: WRITE_TIMEOUT_MS,
            drain_timeout_ms: DRAIN_TIMEOUT_MS,
        }
    }
}

/// Header size for every request; the whole-request timeout for reads.
pub async fn enforce(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_bytes > limits.header_bytes_max {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "request headers are limited to {} bytes",
                limits.header_bytes_max
            ),
        )
        .into_response();
    }
    let timeout = Duration::from_millis(limits.request_timeout_ms);
    if req.method() == Method::GET || req.method() == Method::HEAD {
        // A read changes nothing, so it may be cut off at any point.
        return match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(resp) => resp,
            Err(_) => {
                ApiError::unavailable("the request timed out; nothing was changed").into_response()
            }
        };
    }
    next.run(req).await
}
