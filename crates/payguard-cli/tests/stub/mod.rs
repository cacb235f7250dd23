//! A tiny payguard look-alike for the storm's own tests: an in-memory ledger
//! that keeps every money promise (each order charged once, replays name the
//! same entry, refunds within the amount), behind listeners on port 0 that can
//! each be told to break liveness on some deducts: answer 503 (having done
//! nothing), answer 500, sleep before answering, or apply the charge and cut the
//! answer off mid-body. Several listeners share one ledger, like instances on
//! one database, so a storm can be pointed at a healthy one and a broken one.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one listener does to its deducts: the n-th deduct it gets (1-based)
/// misbehaves when n is a multiple of the given period.
#[derive(Clone, Copy, Default, Debug)]
pub struct Behaviour {
    /// Answer 503 `unavailable`, having moved nothing.
    pub unavailable_every: Option<usize>,
    /// Answer 500, having moved nothing.
    pub server_error_every: Option<usize>,
    /// Sleep this long, then answer as usual.
    pub slow_every: Option<(usize, Duration)>,
    /// Apply the deduct, then cut the answer off mid-body.
    pub cut_every: Option<usize>,
}

#[derive(Default)]
struct Order {
    account: String,
    amount: i64,
    /// (entry id, balance after)
    debit: Option<(String, i64)>,
    /// (entry id, refund id, amount, balance after)
    refunds: Vec<(String, String, i64, i64)>,
}

/// The shared ledger. One mutex: every operation is one critical section, so
/// the stub is trivially correct under any concurrency.
#[derive(Default)]
pub struct Ledger {
    accounts: HashMap<String, i64>,
    orders: HashMap<String, Order>,
    next_entry: u64,
}

impl Ledger {
    pub fn shared() -> Arc<Mutex<Ledger>> {
        Arc::new(Mutex::new(Ledger::default()))
    }

    fn entry_id(&mut self) -> String {
        self.next_entry += 1;
        format!("e{}", self.next_entry)
    }
}

#[derive(Clone)]
struct App {
    ledger: Arc<Mutex<Ledger>>,
    behaviour: Behaviour,
    deducts: Arc<AtomicUsize>,
}

pub struct Stub {
    pub url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts a listener on 127.0.0.1:0 over `ledger`.
pub async fn start(ledger: Arc<Mutex<Ledger>>, behaviour: Behaviour) -> Stub {
    let app = App {
        ledger,
        behaviour,
        deducts: Arc::new(AtomicUsize::new(0)),
    };
    let router = Router::new()
        .route("/v1/accounts", post(create_account))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}/deduct", post(deduct))
        .route("/v1/orders/{id}/refunds", post(refund))
        .route("/v1/orders/{id}/entries", get(entries))
        .route("/v1/audit", get(|| async { Json(json!({"ok": true})) }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Stub {
        url,
        shutdown: Some(tx),
    }
}

async fn create_account(State(app): State<App>, Json(b): Json<Value>) -> Response {
    let id = b["id"].as_str().unwrap_or_default().to_owned();
    let balance = b["balance"].as_i64().unwrap_or(0);
    let mut l = app.ledger.lock().unwrap();
    let balance = *l.accounts.entry(id.clone()).or_insert(balance);
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "balance": balance})),
    )
        .into_response()
}

async fn account(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.ledger.lock().unwrap().accounts.get(&id) {
        Some(b) => Json(json!({"id": id, "balance": b})).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn create_order(State(app): State<App>, Json(b): Json<Value>) -> Response {
    let id = b["id"].as_str().unwrap_or_default().to_owned();
    let mut l = app.ledger.lock().unwrap();
    l.orders.entry(id.clone()).or_insert_with(|| Order {
        account: b["account_id"].as_str().unwrap_or_default().to_owned(),
        amount: b["amount"].as_i64().unwrap_or(0),
        ..Order::default()
    });
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": code}})),
    )
        .into_response()
}

fn hits(every: Option<usize>, n: usize) -> bool {
    every.is_some_and(|e| n.is_multiple_of(e))
}

async fn deduct(State(app): State<App>, Path(id): Path<String>) -> Response {
    let n = app.deducts.fetch_add(1, Ordering::Relaxed) + 1;
    let b = app.behaviour;
    if hits(b.unavailable_every, n) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    if hits(b.server_error_every, n) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    }
    if let Some((every, pause)) = b.slow_every {
        if n % every == 0 {
            tokio::time::sleep(pause).await;
        }
    }
    let answer = apply_deduct(&app.ledger, &id);
    if hits(b.cut_every, n) {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"{\"entry\":")),
            Err(std::io::Error::other("answer cut off")),
        ];
        return Response::new(Body::from_stream(futures::stream::iter(chunks)));
    }
    answer
}

fn apply_deduct(ledger: &Mutex<Ledger>, id: &str) -> Response {
    let mut l = ledger.lock().unwrap();
    let Some(order) = l.orders.get(id) else {
        return error(StatusCode::NOT_FOUND, "order_not_found");
    };
    if let Some((entry, _)) = &order.debit {
        return Json(json!({"entry": {"id": entry}, "replayed": true})).into_response();
    }
    let (account, amount) = (order.account.clone(), order.amount);
    let balance = l.accounts.get(&account).copied().unwrap_or(0);
    if balance < amount {
        return error(StatusCode::PAYMENT_REQUIRED, "insufficient_funds");
    }
    let entry = l.entry_id();
    l.accounts.insert(account, balance - amount);
    if let Some(o) = l.orders.get_mut(id) {
        o.debit = Some((entry.clone(), balance - amount));
    }
    Json(json!({"entry": {"id": entry}, "replayed": false})).into_response()
}

async fn refund(State(app): State<App>, Path(id): Path<String>, Json(b): Json<Value>) -> Response {
    let rid = b["id"].as_str().unwrap_or_default().to_owned();
    let amount = b["amount"].as_i64().unwrap_or(0);
    let mut l = app.ledger.lock().unwrap();
    let Some(order) = l.orders.get(&id) else {
        return error(StatusCode::NOT_FOUND, "order_not_found");
    };
    if let Some((entry, ..)) = order.refunds.iter().find(|r| r.1 == rid) {
        return Json(json!({"entry": {"id": entry}, "replayed": true})).into_response();
    }
    let refunded: i64 = order.refunds.iter().map(|r| r.2).sum();
    if order.debit.is_none() || refunded + amount > order.amount {
        return error(StatusCode::CONFLICT, "refund_exceeds_amount");
    }
    let account = order.account.clone();
    let balance = l.accounts.get(&account).copied().unwrap_or(0) + amount;
    let entry = l.entry_id();
    l.accounts.insert(account, balance);
    if let Some(o) = l.orders.get_mut(&id) {
        o.refunds.push((entry.clone(), rid, amount, balance));
    }
    Json(json!({"entry": {"id": entry}, "replayed": false})).into_response()
}

async fn entries(State(app): State<App>, Path(id): Path<String>) -> Response {
    let l = app.ledger.lock().unwrap();
    let Some(o) = l.orders.get(&id) else {
        return error(StatusCode::NOT_FOUND, "order_not_found");
    };
    let mut out = Vec::new();
    if let Some((entry, after)) = &o.debit {
        out.push(json!({"id": entry, "kind": "debit", "amount": o.amount, "balance_after": after}));
    }
    for (entry, rid, amount, after) in &o.refunds {
        out.push(json!({"id": entry, "kind": "refund", "refund_id": rid, "amount": amount, "balance_after": after}));
    }
    Json(json!({"entries": out})).into_response()
}
