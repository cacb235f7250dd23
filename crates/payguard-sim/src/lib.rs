//! A deterministic simulation of payguard's multi-instance protocol.
//!
//! Why: the lock + fencing protocol (`payguard::lock::redis`, the engine's
//! `fenced_apply`, the stores' `fence` column) is only exercised by a handful of
//! integration tests, each one schedule. Here the same protocol runs on
//! [turmoil](https://docs.rs/turmoil): a simulated Redis ([`redis`]), a simulated
//! database ([`db`]), three payguard instances ([`instance`]) and a client host
//! sending bursts of duplicate deducts ([`client`]) talk over a simulated network
//! on a simulated clock, while a seed decides latencies, message loss,
//! partitions, crashes, Redis flushes and restarts, and lock holders stalled past
//! their TTL ([`run`]). Every run ends with the money invariants checked against
//! the database and the ground truth an [`oracle`] kept along the way, and, on a
//! seed with no fault, with liveness checked: every request answered, none
//! `LockBusy`, each within one lock TTL.
//!
//! Instances batch, as the engine does: requests go into lanes by payguard's own
//! `lane_for`, and payguard's own `LaneCore` does single flight and group commit,
//! so several instances commit multi-order batches at once. A batch takes its
//! orders' locks under one of two protocols ([`config::LockProtocol`]): the
//! engine's before issue #12 (`join_all` of waiting acquires, which deadlocks
//! across instances until the wait limit), or issue #12's (`ACQUIRE_MANY` in one
//! round trip, busy orders parked until `RELEASE_MANY` publishes their release on
//! Redis pub/sub, or a fallback timer).
//!
//! A seed replays exactly: every random choice comes from that seed (turmoil's
//! own RNG and ours), time is turmoil's, and nothing decides on hash order.
//!
//! What it guarantees is bounded by what it models. payguard's own code runs for
//! the token arithmetic ([`payguard::lock::token`]), lane routing and the lane
//! state machine (`engine::lane_for`, `engine::lane::LaneCore`). The Lua scripts,
//! the SQL fence check, `run_lane`'s loop and `fenced_apply`'s sequence are
//! re-stated here as small state machines that follow the production code (and,
//! for issue #12, the protocol as specified while the engine is being changed):
//! a divergence between the two is not caught. Not modelled: refunds and other
//! ops (only deducts), Idempotency-Keys, the HTTP layer, the read cache, batch
//! deadlines, lane queue back-pressure beyond a bound, Redis eviction and
//! replication, and a database that loses committed data. Running the real
//! engine under the simulation is issue #17. [`config::Protocol`] can switch
//! each safety mechanism off, and the lock protocol back, to show that the
//! checker then fails.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod db;
pub mod instance;
pub mod oracle;
pub mod redis;
pub mod run;
pub mod wire;

pub use config::Protocol;
pub use oracle::{Stats, Violation, ViolationKind};
pub use run::{run_seed, run_seed_traced, run_seeds, Outcome, SeedsReport};
