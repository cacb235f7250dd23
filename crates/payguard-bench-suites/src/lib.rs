//! The cache, routing and queue suites behind `payguard bench SUITE`.
//!
//! The incident write-up that started payguard makes performance claims (a 32-shard
//! `RwLock` map at 312,600 QPS against a global lock at 84,200; FNV-1a-32 routing
//! with a max bucket of 112; a fast MPSC queue) and payguard made choices on the
//! strength of them (`scc::HashCache` for the order cache, xxh3 with multiply-shift
//! for lane routing, tokio mpsc into each lane). This crate measures those claims and
//! choices on the machine it runs on, and prints the numbers as a markdown table,
//! as JSON (`--json`) or as a self-contained HTML page with SVG charts (`--html FILE`).
//!
//! Each suite has a `clap::Args` struct and a `run_*` function, so the `payguard`
//! binary can mount them as `payguard bench cache|routing|queue`.
//!
//! Guarantees: no `unsafe` here; every size flag is bounded by a named limit and
//! rejected with [`ArgError`] when out of range; `--quick` finishes in seconds.

#![forbid(unsafe_code)]

pub mod cache;
pub mod error;
pub mod hashes;
pub mod ids;
pub mod machine;
pub mod maps;
pub mod queue;
pub mod report;
pub mod routing;
pub mod stats;

pub use cache::{run_cache, CacheArgs};
pub use error::ArgError;
pub use queue::{run_queue, QueueArgs};
pub use routing::{run_routing, RoutingArgs};
