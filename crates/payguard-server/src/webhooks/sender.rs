//! One webhook attempt over HTTP: sign, `POST`, classify the answer.
//!
//! Why one shared client: connections to a customer's endpoint are reused
//! across deliveries, and every request goes through the same guarded setup:
//! no redirects (a 3xx could point anywhere, including inside our network),
//! no proxy taken from the environment, the [`SsrfResolver`] on every name it
//! resolves, a connect timeout and an overall timeout covering the answer.
//!
//! Guarantees: [`Sender::send`] never panics and always returns an [`Attempt`]
//! within about `timeout_ms` (plus at most [`super::ssrf::DNS_TIMEOUT_MS`] for
//! DNS); 2xx is [`Outcome::Delivered`], 410 is [`Outcome::Gone`], anything else
//! (3xx, other 4xx, 5xx, refused, reset, timed out, a forbidden address) is
//! [`Outcome::Retry`]. A forbidden IP-literal URL is refused before any
//! connection (the resolver never sees literals) unless `allow_private`. At
//! most [`RESPONSE_BODY_MAX_BYTES`] of the answer are read; the outcome rests on
//! the status alone, so a 2xx whose body is slow or cut is still delivered.
//!
//! Transport: `http` and `https`. TLS is rustls (reqwest's `rustls` feature:
//! the aws-lc-rs provider, certificates checked against the platform's trust
//! store by rustls-platform-verifier); HTTP/1.1 only, as the workspace builds
//! reqwest without `http2`.

use super::secret::WebhookSecret;
use super::sign::headers;
use super::ssrf::{check_parsed, SsrfResolver};
use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::{redirect, Client, Response, StatusCode, Url};
use std::time::{Duration, Instant};

/// Longest wait for one attempt's answer, connecting included, in milliseconds
/// (`shared/spec/API.md`: a 2xx within 15 s is delivered).
pub const DELIVERY_TIMEOUT_MS: u64 = 15_000;
/// Longest wait for the TCP connection, in milliseconds (capped at the timeout).
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Most of an answer's body that is read and kept, in bytes.
pub const RESPONSE_BODY_MAX_BYTES: usize = 4 * 1024;
/// Longest error text kept for an attempt, in bytes.
pub const ERROR_LEN_MAX_BYTES: usize = 512;
/// `User-Agent` unless configured otherwise.
pub const USER_AGENT_DEFAULT: &str = concat!("payguard-webhooks/", env!("CARGO_PKG_VERSION"));

/// How the sender is built; one per server.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// `--webhook-allow-private`: send to loopback and private addresses too.
    pub allow_private: bool,
    /// 1..=[`DELIVERY_TIMEOUT_MS`]; tests use less.
    pub timeout_ms: u64,
    pub user_agent: String,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            timeout_ms: DELIVERY_TIMEOUT_MS,
            user_agent: USER_AGENT_DEFAULT.to_owned(),
        }
    }
}

/// Why a sender cannot be built (at startup only).
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("the webhook timeout must be 1..={DELIVERY_TIMEOUT_MS} ms, not {0}")]
    Timeout(u64),
    #[error("building the webhook HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What the delivery loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the delivery is done.
    Delivered,
    /// A 410: disable the endpoint.
    Gone,
    /// Anything else: schedule the next attempt (`schedule::next_attempt_at`).
    Retry { timed_out: bool },
}

/// One attempt, as the deliveries list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: Outcome,
    /// The answer's status, when one came.
    pub status: Option<u16>,
    /// Why it was not delivered, at most [`ERROR_LEN_MAX_BYTES`].
    pub error: Option<String>,
    /// The start of the answer's body (lossy UTF-8), at most [`RESPONSE_BODY_MAX_BYTES`].
    pub response_excerpt: String,
    pub duration_ms: u64,
}

impl Attempt {
    fn not_answered(timed_out: bool, error: String) -> Self {
        Self {
            outcome: Outcome::Retry { timed_out },
            status: None,
            error: Some(truncate(error)),
            response_excerpt: String::new(),
            duration_ms: 0,
        }
    }
}

/// Sends webhook attempts; cheap to share (`reqwest::Client` is an `Arc`).
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client,
    allow_private: bool,
}

impl Sender {
    pub fn new(config: SenderConfig) -> Result<Self, SenderError> {
        if !(1..=DELIVERY_TIMEOUT_MS).contains(&config.timeout_ms) {
            return Err(SenderError::Timeout(config.timeout_ms));
        }
        let client = Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .dns_resolver(SsrfResolver {
                allow_private: config.allow_private,
            })
            .connect_timeout(Duration::from_millis(
                CONNECT_TIMEOUT_MS.min(config.timeout_ms),
            ))
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(config.user_agent)
            .build()
            .map_err(SenderError::Client)?;
        Ok(Self {
            client,
            allow_private: config.allow_private,
        })
    }

    /// One signed `POST` of `body` (the event JSON) to `url`, stamped `now_s`.
    pub async fn send(
        &self,
        url: &Url,
        event_id: &str,
        body: Bytes,
        secret: &WebhookSecret,
        now_s: i64,
    ) -> Attempt {
        let started = Instant::now();
        let mut attempt = self.attempt(url, event_id, body, secret, now_s).await;
        attempt.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        attempt
    }

    async fn attempt(
        &self,
        url: &Url,
        event_id: &str,
        body: Bytes,
        secret: &WebhookSecret,
        now_s: i64,
    ) -> Attempt {
        if let Err(refused) = check_parsed(url, self.allow_private) {
            return Attempt::not_answered(false, format!("refused: {refused}"));
        }
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json");
        for (name, value) in headers(secret, event_id, now_s, &body) {
            request = request.header(name, value);
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(err) => return Attempt::not_answered(err.is_timeout(), describe(err)),
        };
        let status = response.status();
        let outcome = match status {
            s if s.is_success() => Outcome::Delivered,
            StatusCode::GONE => Outcome::Gone,
            _ => Outcome::Retry { timed_out: false },
        };
        let error = (outcome != Outcome::Delivered).then(|| format!("answered {status}"));
        Attempt {
            outcome,
            status: Some(status.as_u16()),
            error,
            response_excerpt: read_excerpt(response).await,
            duration_ms: 0,
        }
    }
}

/// Up to [`RESPONSE_BODY_MAX_BYTES`] of the body; the rest is never read.
/// A body that fails midway keeps what came: the status already decided.
async fn read_excerpt(mut response: Response) -> String {
    let mut kept = Vec::new();
    while kept.len() < RESPONSE_BODY_MAX_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_BODY_MAX_BYTES - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The error and its causes on one line, without the URL (it is on the row).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate(mut text: String) -> String {
    if text.len() > ERROR_LEN_MAX_BYTES {
        let mut end = ERROR_LEN_MAX_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
#[path = "sender_tests.rs"]
mod tests;
