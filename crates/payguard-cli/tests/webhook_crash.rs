//! Events and webhooks across crashes, with real `payguard serve` processes:
//! an event committed right before the process exits is there after restart and
//! is delivered; an instance killed with `kill -9` in the middle of an attempt
//! leaves the delivery to another instance, which makes it once the lease runs
//! out. The receiver verifies every delivery with the `standardwebhooks` crate.

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{get_json, pg_base, pg_url, start, start_with_env, Server};
use payguard::store::postgres::ScratchDb;
use serde_json::{json, Value};
use standardwebhooks::Webhook;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Receiver {
    hook: Arc<Mutex<Option<Webhook>>>,
    /// (webhook-id, verified, body) of every request, in arrival order.
    got: Arc<Mutex<Vec<(String, bool, String)>>>,
    /// Requests to leave unanswered (hang) before answering 200.
    hang_first: Arc<Mutex<usize>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let ok = r
        .hook
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|h| h.verify(&body, &headers).is_ok());
    r.got
        .lock()
        .unwrap()
        .push((id, ok, String::from_utf8_lossy(&body).into_owned()));
    let hang = {
        let mut left = r.hang_first.lock().unwrap();
        let hang = *left > 0;
        *left = left.saturating_sub(1);
        hang
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    StatusCode::OK
}

async fn receiver() -> (Receiver, String) {
    let r = Receiver::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, url)
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Creates the endpoint, an account and an order on `s`.
async fn setup(http: &reqwest::Client, s: &Server, r: &Receiver, url: &str) {
    let (st, ep) = post(
        http,
        format!("{}/v1/webhook_endpoints", s.url),
        json!({ "url": url }),
    )
    .await;
    assert_eq!(st, 201, "{ep}");
    *r.hook.lock().unwrap() = Some(Webhook::new(ep["secret"].as_str().unwrap()).unwrap());
    let (st, _) = post(
        http,
        format!("{}/v1/accounts", s.url),
        json!({"id": "a", "balance": 5000}),
    )
    .await;
    assert_eq!(st, 201);
    let (st, _) = post(
        http,
        format!("{}/v1/orders", s.url),
        json!({"id": "o1", "account_id": "a", "amount": 1185}),
    )
    .await;
    assert_eq!(st, 201);
}

async fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

const FLAGS: &[&str] = &[
    "--webhook-allow-private",
    "--webhook-timeout-ms",
    "2000",
    "--webhook-lease-ms",
    "3000",
];

/// The process exits right after the charge commits, before anything else:
/// the event committed with it, and the next start delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_just_before_an_exit_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("wh.db");
    let db = db.to_str().unwrap();
    let http = reqwest::Client::new();
    let (r, url) = receiver().await;
    let s = start_with_env(
        dir.path(),
        "w1",
        db,
        FLAGS,
        &[("FAILPOINTS", "store.after_commit=return(exit)")],
    );
    setup(&http, &s, &r, &url).await;
    let lost = http
        .post(format!("{}/v1/orders/o1/deduct", s.url))
        .send()
        .await;
    assert!(lost.is_err(), "the reply must be lost: {lost:?}");
    assert_eq!(s.wait_exit(), Some(86), "the failpoint ended the process");
    assert!(
        r.got.lock().unwrap().is_empty(),
        "the process died before any delivery"
    );

    let s = start(dir.path(), "w2", db, FLAGS);
    assert!(
        wait_for(Duration::from_secs(15), || !r
            .got
            .lock()
            .unwrap()
            .is_empty())
        .await,
        "delivered after the restart"
    );
    let got = r.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert!(got[0].1, "verified by standardwebhooks");
    let event: Value = serde_json::from_str(&got[0].2).unwrap();
    assert_eq!(event["type"], "order.paid");
    assert_eq!(event["data"]["order"]["id"], "o1");
    assert_eq!(event["id"], got[0].0.as_str());
    s.stop();
}

/// `kill -9` of the instance making an attempt (the receiver holds the request
/// open): once its lease runs out, `second` delivers the same event, same id.
async fn killed_mid_attempt(dir: &Path, db: &str) {
    let http = reqwest::Client::new();
    let (r, url) = receiver().await;
    *r.hang_first.lock().unwrap() = 1;
    let s1 = start(dir, "k1", db, FLAGS);
    setup(&http, &s1, &r, &url).await;
    let (st, _) = post(
        &http,
        format!("{}/v1/orders/o1/deduct", s1.url),
        json!(null),
    )
    .await;
    assert_eq!(st, 200);
    assert!(
        wait_for(Duration::from_secs(10), || r.got.lock().unwrap().len() == 1).await,
        "the first attempt reached the receiver"
    );
    s1.kill9();
    let killed_at = Instant::now();
    let s2 = start(dir, "k2", db, FLAGS);
    assert!(
        wait_for(Duration::from_secs(20), || r.got.lock().unwrap().len() == 2).await,
        "another instance delivered it"
    );
    let got = r.got.lock().unwrap().clone();
    assert_eq!(got[0].0, got[1].0, "the same webhook-id on both attempts");
    assert!(got.iter().all(|g| g.1), "both verified");
    assert_eq!(got[0].2, got[1].2, "the same body");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.got.lock().unwrap().len(), 2, "and no third attempt");
    let eps = get_json(&http, format!("{}/v1/webhook_endpoints", s2.url)).await;
    let ep = eps["endpoints"][0]["id"].as_str().unwrap();
    let list = get_json(
        &http,
        format!("{}/v1/webhook_endpoints/{ep}/deliveries", s2.url),
    )
    .await;
    let d = &list["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(d["attempts"], 2, "{d}");
    assert_eq!(
        d["attempt_log"][0]["instance"], "k2",
        "only the live instance wrote its attempt: {d}"
    );
    eprintln!(
        "killed mid-attempt; delivered by k2 {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    s2.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_attempt_on_sqlite_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    killed_mid_attempt(dir.path(), db.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_attempt_on_postgres_is_delivered_by_another_instance() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_whkill").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    killed_mid_attempt(dir.path(), &pg_url(&base, &scratch.name)).await;
    scratch.drop_db().await.unwrap();
}
