//! The outbox's delivery side: the loop that carries every committed event to
//! the webhook endpoints it matches ([`delivery`]), its retry schedule
//! ([`schedule`]) and the clock it schedules by ([`Clock`]).
//!
//! Why in `payguard`, not in `payguard-server`: the loop's decisions (what to
//! claim, how much room each endpoint gets, what an attempt's result does to
//! its delivery, when results are written) are the protocol that makes
//! delivery at least once and one attempt at a time, and the deterministic
//! simulation (`payguard-sim`, issue #17) must run this code, not a copy of
//! it. Only the attempt itself is the server's: opening the secret, signing,
//! the HTTP `POST` through its SSRF rule, and its metrics
//! ([`delivery::Deliver`]). The rows it reads and writes are the stores'
//! ([`crate::store::outbox`]).

pub mod delivery;
pub mod schedule;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// The time the delivery loop schedules by. The system clock in production;
/// tests drive retries through hours of schedule without sleeping, and the
/// simulation reads its simulated clock.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        }))
    }

    /// A clock that reads `now` (ms), which the test moves.
    pub fn manual(now: Arc<AtomicI64>) -> Self {
        Clock(Arc::new(move || now.load(Ordering::SeqCst)))
    }

    /// A clock that reads `now` (ms) from a function (the simulation's clock).
    pub fn from_fn(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}
