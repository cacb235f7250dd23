//! Every limit of the HTTP boundary, named, configurable, and with a documented
//! error when hit:
//!
//! | limit | default | when hit |
//! |---|---|---|
//! | `body_bytes_max` | 64 KiB | 413 `body_too_large` |
//! | `header_bytes_max` | 16 KiB (names + values) | 431 `headers_too_large` |
//! | `request_timeout_ms` | 10 s | 503 `unavailable`, only before a change reaches the store (reads: any time; bodies: while being read) |
//! | `connections_max` | 1024 | further connections wait in the listen backlog |
//! | lane queue depth (engine) | 4096 | 503 `unavailable` at once |
//!
//! A write's timeout is enforced by the engine as a deadline for reaching the
//! store: once its change is handed over, the request waits for the outcome, so a
//! 503 always means nothing moved.

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const BODY_BYTES_MAX: usize = 64 * 1024;
pub const HEADER_BYTES_MAX: usize = 16 * 1024;
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const CONNECTIONS_MAX: usize = 1024;
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

#[derive(Clone, Debug)]
pub struct Limits {
    pub body_bytes_max: usize,
    pub header_bytes_max: usize,
    pub request_timeout_ms: u64,
    pub connections_max: usize,
    /// How long a stored Idempotency-Key response is kept.
    pub idempotency_ttl_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: BODY_BYTES_MAX,
            header_bytes_max: HEADER_BYTES_MAX,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            connections_max: CONNECTIONS_MAX,
            idempotency_ttl_ms: IDEMPOTENCY_TTL_MS,
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

/// A listener that holds one permit per open connection: at `connections_max`
/// it stops accepting, and new connections wait in the kernel's backlog.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, connections_max: usize) -> Self {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(connections_max.max(1))),
        }
    }
}

/// Delay after a failed accept (e.g. out of file descriptors) before retrying.
const ACCEPT_RETRY_MS: u64 = 50;

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed; if it were, accept without a limit.
            Err(_) => Arc::new(Semaphore::new(1))
                .acquire_owned()
                .await
                .expect("a fresh semaphore has a permit"),
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::warn!(event = "accept_failed", detail = %e);
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection and the permit it holds until it closes.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
