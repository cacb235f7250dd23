//! Serving connections: payguard's own accept loop over hyper, so that slow and
//! idle connections cannot lock everyone out (issue #19).
//!
//! `axum::serve` behind a semaphore let a connection hold one of the
//! `connections_max` places for as long as it liked: no header, body, idle or write
//! deadline, and an idle keep-alive connection counted the same as a working one.
//! 1,100 connections that sent half a request stopped every payment. Here:
//!
//! * every phase of a connection has a deadline ([`slot::Phase`]): reading the
//!   headers (from accept, or from the first byte of a kept-alive connection's next
//!   request), reading the body (the request fails with 408 and the connection
//!   closes), waiting idle between requests, and writing the answer (including any
//!   write that finds the socket full for that long). Past one, the connection is
//!   closed. A request whose body was cut off never reaches the engine, so it moved
//!   nothing;
//! * at the limit, a new connection makes room instead of waiting: the server closes
//!   the connection that has waited longest without a complete request (idle since
//!   its last answer, or with its request unfinished since it began), else one stuck
//!   writing an answer; never one whose request is with the engine ([`registry`],
//!   [`slot::Tier`]; the order is measured in BENCHMARKS.md). Only when every
//!   connection is handling a request do new ones wait in the listen backlog;
//! * shutdown drains for at most `drain_timeout_ms`: connections without a complete
//!   request are closed at once, requests already handed to the engine get their
//!   answer, and whatever is left at the deadline is closed;
//! * `/metrics` counts closes by reason and shows connections by phase; a WARN
//!   `connections_closed` (at most one per reason per 10 s) tells the operator.
//!
//! Only HTTP/1.1 is served, as before (axum's `http2` feature is off).

mod body;
mod io;
pub mod registry;
pub mod slot;

pub use body::BodyError;

use crate::limits::Limits;
use crate::metrics::Metrics;
use axum::http::{header, HeaderValue, Request, Response};
use axum::Router;
use hyper::body::{Body as _, Incoming};
use registry::Registry;
use slot::{CloseReason, Closing, Deadlines, Slot};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Delay after a failed accept (e.g. out of file descriptors) before retrying.
const ACCEPT_RETRY_MS: u64 = 50;

impl Limits {
    pub fn deadlines(&self) -> Deadlines {
        Deadlines {
            header: Duration::from_millis(self.header_read_timeout_ms),
            body: Duration::from_millis(self.body_read_timeout_ms),
            idle: Duration::from_millis(self.idle_timeout_ms),
            write: Duration::from_millis(self.write_timeout_ms),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (at most
/// `limits.drain_timeout_ms`). Returns when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Registry::new(limits.deadlines(), limits.connections_max, metrics);
    let sweeper = sweep_forever(registry.clone());
    let served = async {
        accept_until(listener, &app, &registry, shutdown).await;
        drain(&registry, Duration::from_millis(limits.drain_timeout_ms)).await;
    };
    tokio::select! {
        () = served => {}
        () = sweeper => unreachable!("the sweeper never ends"),
    }
    registry.warn_closes(Instant::now(), true);
}

async fn sweep_forever(registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(registry.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        registry.sweep(Instant::now());
    }
}

/// Accepts until `shutdown`, admitting each connection through the registry (which
/// makes room at the limit). The listener is closed on return, so new clients are
/// refused at once rather than left in a backlog nobody reads.
async fn accept_until(
    listener: TcpListener,
    app: &Router,
    registry: &Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(event = "accept_failed", detail = %e);
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (slot, guard) = tokio::select! {
            () = &mut shutdown => return,
            admitted = registry.admit() => admitted,
        };
        let service = ConnService {
            app: app.clone(),
            slot: slot.clone(),
            registry: registry.clone(),
        };
        tokio::spawn(async move {
            serve_connection(stream, slot, service).await;
            drop(guard);
        });
        // Let the new connection read what it was sent before more are accepted: in a
        // burst of connections it would otherwise still look unfinished, and the
        // oldest at that, when the next ones make room.
        tokio::task::yield_now().await;
    }
}

/// Runs one connection until it ends or its slot says close.
async fn serve_connection(stream: TcpStream, slot: Arc<Slot>, service: ConnService) {
    let io = hyper_util::rt::TokioIo::new(io::TrackedIo::new(stream, slot.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The registry enforces every deadline; hyper's own header timer would also
    // cut idle keep-alive connections at the header deadline.
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(event = "connection_error", detail = %e);
                }
                return;
            }
            () = slot.wake.notified() => match slot.closing() {
                Some(Closing::Now(_) | Closing::Ended) => return,
                Some(Closing::AfterResponse) => conn.as_mut().graceful_shutdown(),
                None => {}
            },
        }
    }
}

/// Closes what has no complete request, waits for the rest at most `deadline`,
/// then closes whatever is left.
async fn drain(registry: &Registry, deadline: Duration) {
    let started = Instant::now();
    let (closed, finishing) = registry.begin_drain();
    tracing::info!(
        event = "drain_started",
        closed_unfinished = closed,
        finishing,
        deadline_ms = deadline.as_millis() as u64
    );
    if tokio::time::timeout(deadline, registry.wait_empty())
        .await
        .is_err()
    {
        let cut_off = registry.close_all(CloseReason::DrainDeadline);
        tracing::warn!(
            event = "drain_deadline_reached",
            cut_off,
            deadline_ms = deadline.as_millis() as u64,
            "closed connections still open at the drain deadline; their clients get no answer"
        );
        registry.wait_empty().await;
    }
    tracing::info!(
        event = "drain_finished",
        dur_ms = started.elapsed().as_millis() as u64
    );
}

/// The router, seen through one connection's slot: the headers are in when hyper
/// calls it, the answer is ready when the router returns.
#[derive(Clone)]
struct ConnService {
    app: Router,
    slot: Arc<Slot>,
    registry: Arc<Registry>,
}

type Answer = Response<body::ResponseBody>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let has_body = !req.body().is_end_stream();
        let seq = self
            .slot
            .update(|st| st.on_headers(Instant::now(), has_body));
        let (slot, registry) = (self.slot.clone(), self.registry.clone());
        let req = req.map(|b| {
            axum::body::Body::new(body::RequestBody::new(b, slot.clone(), registry.clone()))
        });
        let app = self.app.clone();
        Box::pin(async move {
            let mut resp = match app.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            let close = slot.update(|st| st.on_response(Instant::now()));
            registry.left_handling();
            if close {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp.map(|b| body::ResponseBody::new(b, slot, seq)))
        })
    }
}
