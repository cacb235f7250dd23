//! Every bound the forensics pipeline enforces, in one place, each named with its unit last.
//!
//! Why: logs come from production and may be huge, hostile or broken. Memory and work must be
//! bounded by these numbers, not by the input, and a reader of a report should be able to find
//! the number that shaped it.

/// A line longer than this is skipped and counted as `too_long` (never parsed).
pub const LOG_LINE_BYTES_MAX: usize = 64 * 1024;

/// How many bytes one read takes from one file per round (newline-aligned after reading).
pub const READ_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// The size of one piece of a chunk that one parser task takes (cut at a newline).
pub const PARSE_PIECE_BYTES: usize = 512 * 1024;

/// An order whose last event is older than the merged time minus this is finished: it is
/// analysed, its result kept, and its events dropped. Two debits of one order farther apart
/// than this are not joined (see the README).
pub const ORDER_RETIRE_AFTER_MS: i64 = 15 * 60 * 1000;

/// A retired order with exactly one debit is remembered this long after its retirement (in
/// merged log time; about 80 bytes each), so a second debit up to `order_retire_after_ms` +
/// this after the order's last event still makes an incident.
pub const RETIRED_DEBIT_MEMORY_MS: i64 = 30 * 60 * 1000;

/// Retired single-debit orders remembered at most (about 80 bytes each).
pub const RETIRED_DEBITS_MAX: usize = 300_000;

/// Retirement scans all open orders; it runs when the merged time moved this far since the last scan.
pub const RETIRE_SCAN_EVERY_MS: i64 = 30 * 1000;

/// A file is read in a round while its time is no further ahead of the slowest file than this,
/// so files advance together in time and open orders stay few.
pub const READ_LEAD_MS: i64 = 5 * 60 * 1000;

/// A request without a `req` id and without an end event is assumed in flight at most this long.
pub const REQUEST_INFLIGHT_ASSUMED_MS_MAX: i64 = 30 * 1000;

/// Dateless lines waiting for a dated line in the same file; past this they take `--date`.
pub const UNDATED_PENDING_LINES_MAX: usize = 100_000;

/// A time-of-day that jumps by more than this against the previous line crosses midnight.
pub const MIDNIGHT_ROLLOVER_JUMP_MS: i64 = 12 * 60 * 60 * 1000;

/// Evidence lines kept per incident.
pub const EVIDENCE_LINES_MAX: usize = 16;

/// Race windows listed one by one (all are counted in totals).
pub const RACE_WINDOWS_LISTED_MAX: usize = 100_000;

/// Orders with an incident whose timelines are kept for `--trace-out` and `--html` (the first ones).
pub const TIMELINE_INCIDENT_ORDERS_MAX: usize = 10_000;

/// Orders with only healthy race windows whose timelines are kept for `--trace-out` (the first).
pub const TIMELINE_RACE_ORDERS_MAX: usize = 10_000;

/// Incidents listed one by one; past this the worst are kept (all are counted in totals).
pub const INCIDENTS_LISTED_MAX: usize = 20_000;

/// Incidents drawn in the HTML page.
pub const HTML_INCIDENTS_MAX: usize = 20;

/// Distinct hosts and files (interned as u16).
pub const HOSTS_MAX: usize = 65_000;
/// See [`HOSTS_MAX`].
pub const FILES_MAX: usize = 65_000;

/// Distinct request ids within one order (interned per order as u16).
pub const REQUESTS_PER_ORDER_MAX: usize = 60_000;

/// Events kept for one order; past this further events of that order are counted and dropped.
pub const EVENTS_PER_ORDER_MAX: usize = 100_000;

/// Decompressed bytes of each file that clock alignment samples before the merge (from the
/// start of the file); memory and the extra read are bounded by this, not by input size.
/// (8 MiB of the benchmark's logs hold ~1,700 cross-host orderings per host; see BENCHMARKS.md.)
pub const CLOCK_SAMPLE_BYTES_PER_FILE: u64 = 8 * 1024 * 1024;

/// Commits' ledger ids clock alignment collects from the samples (24 bytes each).
pub const CLOCK_EVIDENCE_IDS_MAX: usize = 400_000;

/// A ledger id is taken inside its transaction, before the commit is logged: two commits may
/// be logged in the other order than their ids by about this much, so id order bounds clocks
/// this much more loosely than an order's own requests do.
pub const CLOCK_ID_SLACK_MS: i64 = 2;

/// Seconds of each clock domain whose event counts alignment keeps (the event-rate evidence).
pub const CLOCK_RATE_SECONDS_MAX: usize = 2_048;

/// Events a host and the reference must each have in their samples before the event rate may
/// say which zone the host's zone-less times are in.
pub const CLOCK_RATE_EVENTS_MIN: u64 = 2_000;

/// The event rate's best lag must score this many times the best lag farther than
/// `clock_rate_distinct_s` from it, or it says nothing.
pub const CLOCK_RATE_PEAK_RATIO_MIN: u64 = 2;
pub const CLOCK_RATE_DISTINCT_S: i64 = 600;

/// The event rate's best lag must be this close to a whole quarter-hour zone.
pub const CLOCK_RATE_ZONE_FIT_S: i64 = 60;

/// Clock steps between pairs of hosts listed (found anywhere in the input, see `analyze::drift`).
pub const CLOCK_STEPS_LISTED_MAX: usize = 100;

/// The sampled chunks are kept, parsed, for the merge (so nothing is read or parsed twice) when
/// all the files' samples together fit in this many bytes; past it they are read again.
pub const CLOCK_SAMPLE_KEPT_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// An order's evidence is judged once it has not been seen for this many sampling rounds (one
/// chunk of every file a round); orders whose lines are farther apart in the files are not used.
pub const CLOCK_EVIDENCE_ROUNDS: u32 = 3;

/// Commit and replay events kept per order while sampling; past this an order's evidence is
/// not extended (a storm of thousands of replays adds nothing a dozen do not).
pub const CLOCK_EVIDENCE_EVENTS_PER_ORDER_MAX: usize = 32;

/// Orders whose evidence is held at once while sampling; past this new orders are not followed.
pub const CLOCK_EVIDENCE_ORDERS_MAX: usize = 500_000;

/// Cross-host orderings between two hosts needed before their offset is trusted, in all.
pub const CLOCK_CONSTRAINTS_MIN: u64 = 8;

/// ... and in each direction (a bound from below and one from above), so the offset is bracketed.
pub const CLOCK_CONSTRAINTS_PER_SIDE_MIN: u64 = 3;

/// An offset is applied only when the interval that brackets it is at most this wide.
pub const CLOCK_INTERVAL_MS_MAX: i64 = 50;

/// Orderings broken under the applied offsets that are listed one by one (all are counted).
pub const IMPOSSIBLE_ORDERINGS_LISTED_MAX: usize = 1_000;

/// An ordering is reported impossible only when it is broken by more than this: the applied
/// offsets are estimates (see `clock_interval_ms_max`) and log times are rounded to the ms.
pub const IMPOSSIBLE_ORDERING_SLACK_MS: i64 = 2;
