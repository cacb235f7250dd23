//! Webhook delivery primitives (`shared/spec/API.md`, "Events and webhooks"):
//! everything the delivery loop calls that needs no store.
//!
//! How the pieces fit, in the order an endpoint lives:
//! 1. `POST /v1/webhook_endpoints`: [`ssrf::check_url`] refuses the URL or
//!    returns it parsed (422 with [`UrlRefused`]'s message);
//!    [`WebhookSecret::generate`] makes the secret, shown once as
//!    [`WebhookSecret::to_whsec`]; [`SecretSealer::seal`] gives the text to store.
//! 2. The delivery loop claims a due delivery, opens the secret with
//!    [`SecretSealer::open`] and calls [`Sender::send`], which signs
//!    ([`sign::headers`]) and `POST`s once, through the same SSRF rule.
//! 3. The [`Attempt`] it returns is stored; its [`Outcome`] decides the row:
//!    `Delivered` done, `Gone` disables the endpoint, `Retry` asks
//!    [`schedule::next_attempt_at`] for the next time, `None` meaning `failed`.
//!
//! Guarantees of the whole: no secret bytes in `Debug` or errors; every limit
//! (URL length, DNS wait, timeouts, bytes read back) is a named constant; no
//! function here touches the database or panics on input from outside.
//! Startup: `--webhook-key-file` goes to [`SecretSealer::from_key_file`]
//! (WARN when [`SecretSealer::is_plaintext`]), `--webhook-allow-private` to
//! [`SenderConfig::allow_private`] and `check_url`, `--webhook-retry-max`
//! (at most [`schedule::RETRY_MAX_LIMIT`]) to `next_attempt_at`.

pub mod seal;
pub mod secret;
pub mod sender;
pub mod sign;
pub mod ssrf;

/// The retry schedule, in `payguard` since the delivery loop moved there
/// (`payguard::outbox`).
pub use payguard::outbox::schedule;
pub use schedule::{next_attempt_at, RETRY_DELAYS_MS, RETRY_MAX_DEFAULT, RETRY_MAX_LIMIT};
pub use seal::{KeyFileError, OpenError, SecretSealer};
pub use secret::{SecretError, WebhookSecret};
pub use sender::{Attempt, Outcome, Sender, SenderConfig, SenderError, DELIVERY_TIMEOUT_MS};
pub use sign::{headers, sign};
pub use ssrf::{check_url, forbidden, SsrfResolver, UrlRefused};
