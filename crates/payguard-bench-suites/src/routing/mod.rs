//! The routing suite: how evenly each hash spreads order ids over lanes, how many
//! orders change lane when lanes grow, and how fast each hash is.
//!
//! payguard's correctness rests on one lane owning each order; its throughput rests
//! on lanes filling evenly. The write-up routes with `fnv32a(id) % 1024` and claims
//! a max bucket of 112 for FNV-1a against 137 for CRC32 (100,000 ids); payguard
//! routes with xxh3_64 and multiply-shift. This suite puts every such number beside
//! what a uniformly random assignment would give (binomial sd, expected max,
//! chi-square with df = lanes - 1) so "uneven" and "too even" can be told apart.
//!
//! One responsibility a file: `plan` (flags to a checked plan), `spread` (lane
//! counts and what random would give), `measure` (the runs), `writeup` (the
//! search for the write-up's numbers) and `document` (the tables and charts).

mod document;
mod measure;
mod plan;
mod spread;
mod writeup;

pub use document::routing_document;
pub use measure::{measure_routing, DistRow, MoveRow, RoutingResults, SpeedRow};
pub use plan::{RoutingArgs, RoutingPlan};
pub use spread::{expectation, lane_counts, spread, Expectation, Spread};
pub use writeup::{ids_for_expected_max, WriteupRow};

use crate::report::emit;

/// Most lanes a distribution is computed for.
pub const LANES_MAX: u64 = 65_536;
/// Smallest id set worth a distribution.
pub const IDS_MIN: u64 = 100;
/// Rounds of the throughput loop; the best is kept (least disturbed by neighbours).
pub const SPEED_ROUNDS: u32 = 5;
/// The write-up's own setup: `fnv32a(id) % 1024` over 100,000 ids.
pub const WRITEUP_IDS: u64 = 100_000;
pub const WRITEUP_LANES: u64 = 1024;
/// Claimed in the write-up's table (chapter 4.2).
pub const WRITEUP_FNV_MAX: u64 = 112;
pub const WRITEUP_CRC_MAX: u64 = 137;
/// Rows of the "nearest to 112" table.
pub const WRITEUP_NEAREST_ROWS: usize = 10;

/// `payguard bench routing`.
pub fn run_routing(args: &RoutingArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let res = measure_routing(&plan);
    emit(&routing_document(&res), &res, &args.output)
}
