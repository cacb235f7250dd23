//! The ceiling of `payguard bench http`: the least an HTTP service can do
//! per durable charge on this machine, with payguard's own SQL.
//!
//! Issue #16 asks first charges for half of `GET /healthz`'s rate. Whether
//! that is reachable is a question about the machine and about SQLite, not
//! only about payguard, so the bench answers it in the same run: a server
//! written as plainly as a durable charge allows — axum, the server's own body
//! parsers, one writer thread that group-commits whatever has queued
//! (`BEGIN IMMEDIATE`, payguard's store SQL through
//! [`payguard::store::sqlite::apply_ops`], `COMMIT` under `synchronous=FULL`),
//! and the answer sent straight back to the request's task. Everything payguard
//! adds on top is absent: no lanes or single flight, no fencing, no log lines,
//! no metrics, no middleware, no Idempotency-Keys, no order cache. The writes
//! are the same rows, indexes, triggers and fsyncs payguard makes, so the gap
//! between this row and payguard's first charges is what payguard's own layers
//! cost, and this row over `/healthz` is as far as any design with these
//! writes goes on this machine. It is a measuring stick, never a server to run:
//! it answers a rejection as a bare 409 and keeps nothing an operator needs.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use payguard::domain::OrderId;
use payguard::store::sqlite::{apply_ops, open_connection};
use payguard::store::{Command, Op, OpResult, Output};
use std::path::Path as FsPath;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Commands waiting for the writer; a request that finds the queue full is
/// answered 503 (counted as an error by both clients, never hidden).
const CEILING_QUEUE_MAX: usize = 8_192;
/// Most commands in one transaction (payguard's writer default is the same
/// order of magnitude; under 64 connections a transaction holds far fewer).
const CEILING_BATCH_MAX: usize = 256;

type Job = (Command, oneshot::Sender<Result<OpResult, String>>);

/// A running ceiling server: its base URL; dropping it stops the writer once
/// the server task is aborted.
pub struct Ceiling {
    pub url: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Ceiling {
    pub fn stop(self) {
        self.server.abort();
    }
}

/// Starts the ceiling on a fresh SQLite file at `path` (payguard's schema).
pub async fn start(path: &FsPath) -> anyhow::Result<Ceiling> {
    let mut conn = open_connection(path)?;
    payguard::store::sqlite::migrate(&mut conn)?;
    let (tx, rx) = mpsc::sync_channel::<Job>(CEILING_QUEUE_MAX);
    std::thread::Builder::new()
        .name("ceiling-writer".into())
        .spawn(move || write_loop(conn, rx))?;
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/accounts", post(create_account))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}/deduct", post(deduct))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Ceiling { url, server })
}

/// The writer: one blocking receive, then whatever else has queued (up to
/// [`CEILING_BATCH_MAX`]) in the same transaction; each answer goes straight
/// to its request's task. Ends when every sender is gone.
fn write_loop(mut conn: rusqlite::Connection, rx: mpsc::Receiver<Job>) {
    let mut cmds = Vec::with_capacity(CEILING_BATCH_MAX);
    let mut replies = Vec::with_capacity(CEILING_BATCH_MAX);
    while let Ok((cmd, reply)) = rx.recv() {
        cmds.push(cmd);
        replies.push(reply);
        while cmds.len() < CEILING_BATCH_MAX {
            match rx.try_recv() {
                Ok((cmd, reply)) => {
                    cmds.push(cmd);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let now = chrono::Utc::now().timestamp_millis();
        match apply_ops(&mut conn, &cmds, now) {
            Ok(results) => {
                for (reply, r) in replies.drain(..).zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
        cmds.clear();
    }
}

type Writer = mpsc::SyncSender<Job>;

async fn create_account(State(w): State<Writer>, headers: HeaderMap, body: Bytes) -> Response {
    match payguard_server::fuzzing::create_account_op(&headers, &body) {
        Ok(op) => run(&w, op).await,
        Err(e) => e.into_response(),
    }
}

async fn create_order(State(w): State<Writer>, headers: HeaderMap, body: Bytes) -> Response {
    match payguard_server::fuzzing::create_order_op(&headers, &body) {
        Ok(op) => run(&w, op).await,
        Err(e) => e.into_response(),
    }
}

async fn deduct(
    State(w): State<Writer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(order_id) = OrderId::parse(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match payguard_server::fuzzing::deduct_op(order_id, &headers, &body) {
        Ok(op) => run(&w, op).await,
        Err(e) => e.into_response(),
    }
}

/// Sends `op` to the writer and renders its answer: the order and entry as
/// payguard's answer carries them, a bare 409 for a rejection, 503 when the
/// queue is full or the transaction failed.
async fn run(w: &Writer, op: Op) -> Response {
    let (reply, answer) = oneshot::channel();
    if w.try_send((Command::new(op), reply)).is_err() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match answer.await {
        Ok(Ok(Ok(out))) => {
            let body = match &out {
                Output::Movement {
                    order,
                    entry,
                    replayed,
                } => serde_json::json!({"order": order, "entry": entry, "replayed": replayed}),
                Output::Order { order, .. } => serde_json::json!({"order": order}),
                Output::Account { account, .. } => serde_json::json!({"account": account}),
            };
            axum::Json(body).into_response()
        }
        Ok(Ok(Err(rejection))) => (StatusCode::CONFLICT, format!("{rejection:?}")).into_response(),
        Ok(Err(_)) | Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
