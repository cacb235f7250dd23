//! The sender against real HTTP receivers on 127.0.0.1, port 0.

use super::*;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect};
use axum::routing::post;
use axum::Router;
use standardwebhooks::Webhook;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BODY: &str =
    r#"{"id":"evt_1","seq":1,"type":"order.paid","data":{"order":{"id":"o1"},"entry":null}}"#;
const SLOW_MS: u64 = 3_000;
const SHORT_TIMEOUT_MS: u64 = 300;

/// A receiver and the number of requests that reached it.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Receiver {
    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://{}{path}", self.addr)).unwrap()
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn verify(State(hook): State<Arc<Webhook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    match hook.verify(&body, &headers) {
        Ok(()) if body == BODY.as_bytes() => StatusCode::NO_CONTENT,
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// Verifies with the reference crate, keyed with `whsec`.
async fn spawn_receiver(whsec: &str) -> Receiver {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let count = move |req: Request, next: Next| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            next.run(req).await
        }
    };
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(SLOW_MS)).await;
        StatusCode::OK
    };
    let app = Router::new()
        .route("/ok", post(|| async { (StatusCode::OK, "thanks") }))
        .route(
            "/fail",
            post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route("/bad", post(|| async { StatusCode::BAD_REQUEST }))
        .route("/gone", post(|| async { StatusCode::GONE }))
        .route("/redirect", post(|| async { Redirect::to("/ok") }))
        .route("/slow", post(slow))
        .route(
            "/big",
            post(|| async { "x".repeat(1 << 20).into_response() }),
        )
        .route("/verify", post(verify))
        .with_state(Arc::new(Webhook::new(whsec).unwrap()))
        .layer(middleware::from_fn(count));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { addr, hits }
}

fn sender(allow_private: bool, timeout_ms: u64) -> Sender {
    let config = SenderConfig {
        allow_private,
        timeout_ms,
        ..SenderConfig::default()
    };
    Sender::new(config).unwrap()
}

fn now_s() -> i64 {
    i64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap().as_secs()).unwrap()
}

async fn send_to(sender: &Sender, url: &Url, secret: &WebhookSecret) -> Attempt {
    let body = Bytes::from_static(BODY.as_bytes());
    sender.send(url, "evt_1", body, secret, now_s()).await
}

#[tokio::test]
async fn statuses_map_to_outcomes() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let s = sender(true, DELIVERY_TIMEOUT_MS);
    let retry = Outcome::Retry { timed_out: false };
    for (path, outcome, status) in [
        ("/ok", Outcome::Delivered, 200),
        ("/fail", retry, 500),
        ("/bad", retry, 400),
        ("/gone", Outcome::Gone, 410),
        ("/missing", retry, 404),
    ] {
        let attempt = send_to(&s, &rx.url(path), &secret).await;
        assert_eq!(
            (attempt.outcome, attempt.status),
            (outcome, Some(status)),
            "{path}"
        );
        assert_eq!(
            attempt.error.is_none(),
            outcome == Outcome::Delivered,
            "{path}"
        );
    }
    let ok = send_to(&s, &rx.url("/ok"), &secret).await;
    assert_eq!(ok.response_excerpt, "thanks");
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let attempt = send_to(
        &sender(true, DELIVERY_TIMEOUT_MS),
        &rx.url("/redirect"),
        &secret,
    )
    .await;
    assert_eq!(attempt.outcome, Outcome::Retry { timed_out: false });
    assert_eq!(attempt.status, Some(303));
    assert_eq!(rx.hits(), 1, "the redirect target was requested");
}

#[tokio::test]
async fn a_slow_receiver_times_out() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let attempt = send_to(&sender(true, SHORT_TIMEOUT_MS), &rx.url("/slow"), &secret).await;
    assert_eq!(
        attempt.outcome,
        Outcome::Retry { timed_out: true },
        "{attempt:?}"
    );
    assert_eq!(attempt.status, None);
    assert!(attempt.duration_ms >= SHORT_TIMEOUT_MS, "{attempt:?}");
    assert!(attempt.duration_ms < SLOW_MS, "{attempt:?}");
}

#[tokio::test]
async fn a_big_answer_is_read_only_up_to_the_limit() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let attempt = send_to(&sender(true, DELIVERY_TIMEOUT_MS), &rx.url("/big"), &secret).await;
    assert_eq!(attempt.outcome, Outcome::Delivered);
    assert_eq!(attempt.response_excerpt.len(), RESPONSE_BODY_MAX_BYTES);
}

#[tokio::test]
async fn a_dropped_connection_or_a_closed_port_is_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            drop(socket); // no answer at all
        }
    });
    let s = sender(true, DELIVERY_TIMEOUT_MS);
    let secret = WebhookSecret::generate();
    let dropped = Url::parse(&format!("http://{addr}/hook")).unwrap();
    let attempt = send_to(&s, &dropped, &secret).await;
    assert_eq!(
        attempt.outcome,
        Outcome::Retry { timed_out: false },
        "{attempt:?}"
    );
    assert!(attempt.error.is_some() && attempt.status.is_none());

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/hook", closed.local_addr().unwrap())).unwrap();
    drop(closed);
    let attempt = send_to(&s, &url, &secret).await;
    assert_eq!(
        attempt.outcome,
        Outcome::Retry { timed_out: false },
        "{attempt:?}"
    );
}

#[tokio::test]
async fn private_addresses_are_refused_before_any_request() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let port = rx.addr.port();
    let guarded = sender(false, DELIVERY_TIMEOUT_MS);
    for (url, says) in [
        (format!("http://127.0.0.1:{port}/ok"), "refused"),
        (format!("http://[::ffff:127.0.0.1]:{port}/ok"), "refused"),
        // A name: only the client's resolver stands in the way here.
        (format!("http://localhost:{port}/ok"), "loopback"),
    ] {
        let attempt = send_to(&guarded, &Url::parse(&url).unwrap(), &secret).await;
        assert_eq!(
            attempt.outcome,
            Outcome::Retry { timed_out: false },
            "{url}"
        );
        let error = attempt.error.unwrap_or_default();
        assert!(error.contains(says), "{url}: {error}");
    }
    assert_eq!(rx.hits(), 0, "a request reached the loopback receiver");
    // The same URLs with --webhook-allow-private do arrive.
    let open = sender(true, DELIVERY_TIMEOUT_MS);
    let url = Url::parse(&format!("http://localhost:{port}/ok")).unwrap();
    assert_eq!(
        send_to(&open, &url, &secret).await.outcome,
        Outcome::Delivered
    );
    assert_eq!(rx.hits(), 1);
}

#[tokio::test]
async fn the_receiver_verifies_what_goes_on_the_wire() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let s = sender(true, DELIVERY_TIMEOUT_MS);
    let attempt = send_to(&s, &rx.url("/verify"), &secret).await;
    assert_eq!(
        (attempt.outcome, attempt.status),
        (Outcome::Delivered, Some(204))
    );
    // The same receiver refuses a delivery signed with another secret.
    let other = WebhookSecret::generate();
    let attempt = send_to(&s, &rx.url("/verify"), &other).await;
    assert_eq!(attempt.status, Some(401));
}

#[test]
fn bad_timeouts_are_refused_at_startup() {
    for timeout_ms in [0, DELIVERY_TIMEOUT_MS + 1] {
        let config = SenderConfig {
            timeout_ms,
            ..SenderConfig::default()
        };
        assert!(matches!(Sender::new(config), Err(SenderError::Timeout(_))));
    }
}

#[test]
fn errors_are_cut_at_a_char_boundary() {
    let long = "é".repeat(ERROR_LEN_MAX_BYTES);
    let cut = truncate(long);
    assert!(cut.len() <= ERROR_LEN_MAX_BYTES && cut.len() >= ERROR_LEN_MAX_BYTES - 1);
}

#[tokio::test]
async fn https_urls_speak_tls() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let url = Url::parse(&format!("https://{}/ok", rx.addr)).unwrap();
    let attempt = send_to(&sender(true, DELIVERY_TIMEOUT_MS), &url, &secret).await;
    // rustls sent a ClientHello and got plain HTTP back: the https path is
    // wired (without a TLS backend reqwest refuses the scheme instead).
    assert_eq!(attempt.outcome, Outcome::Retry { timed_out: false });
    let error = attempt.error.unwrap_or_default();
    assert!(error.contains("InvalidContentType"), "{error}");
}

#[tokio::test]
async fn an_event_id_that_cannot_be_a_header_is_an_error_not_a_panic() {
    let secret = WebhookSecret::generate();
    let rx = spawn_receiver(&secret.to_whsec()).await;
    let s = sender(true, DELIVERY_TIMEOUT_MS);
    let body = Bytes::from_static(BODY.as_bytes());
    let attempt = s
        .send(&rx.url("/ok"), "evt\n1", body, &secret, now_s())
        .await;
    assert_eq!(attempt.outcome, Outcome::Retry { timed_out: false });
    assert!(attempt.error.is_some());
    assert_eq!(rx.hits(), 0);
}
