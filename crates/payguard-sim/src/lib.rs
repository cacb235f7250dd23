//! A deterministic simulation of payguard's multi-instance protocol.
//!
//! Why: the lock + fencing protocol (`payguard::lock::redis`, the engine's
//! `fenced_apply`, the stores' `fence` column) is only exercised by a handful of
//! integration tests, each one schedule. Here the same protocol runs on
//! [turmoil](https://docs.rs/turmoil): a simulated Redis ([`redis`]), a simulated
//! database ([`db`]), three payguard instances ([`instance`]) and a client host
//! sending duplicate deducts ([`client`]) talk over a simulated network on a
//! simulated clock, while a seed decides latencies, message loss, partitions,
//! crashes, Redis flushes and restarts, and lock holders stalled past their TTL
//! ([`run`]). Every run ends with the money invariants checked against the
//! database and the ground truth an [`oracle`] kept along the way.
//!
//! A seed replays exactly: every random choice comes from that seed (turmoil's
//! own RNG and ours), time is turmoil's, and nothing decides on hash order.
//!
//! What it guarantees is bounded by what it models: the pure token arithmetic is
//! payguard's own ([`payguard::lock::token`]); the Lua scripts, the SQL fence
//! check and the engine's sequence (acquire, maybe stall, fenced write, release)
//! are re-stated here as small state machines that follow the production code
//! line by line, and [`config::Protocol`] can switch each safety mechanism off
//! to show that the checker then fails.

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
pub use oracle::{Violation, ViolationKind};
pub use run::{run_seed, run_seed_traced, run_seeds, Outcome, SeedsReport};
