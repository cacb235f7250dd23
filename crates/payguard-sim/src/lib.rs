//! A deterministic simulation of payguard's own engine, several instances at
//! once, over a simulated database and a simulated Redis (issue #17).
//!
//! Why: the multi-instance protocol (lanes and group commit, `fenced_apply`'s
//! batch locks, parking until a release, fencing tokens, the store's rules and
//! commit-fate resolution) lives in payguard's engine, and its failures are
//! schedules: which instance's batch takes which lock while which message is
//! lost. Here three instances each run payguard's real [`payguard::Engine`]
//! (`Engine::start_with_order_locks`, `--guard full`) on
//! [turmoil](https://docs.rs/turmoil): their store ([`store`]) talks to a
//! simulated database ([`db`]) that decides every command with payguard's own
//! money rules (`payguard::store::rules`), their lock service ([`locks`]) is
//! payguard's own Redis lock client talking to a simulated Redis ([`redis`])
//! that runs the client's Lua scripts in an embedded Lua 5.1, and a
//! client host ([`client`]) sends bursts of duplicate deducts to different
//! instances, and duplicate refunds of some orders around them (two refund ids
//! whose amounts may add up past the charge), and pays other orders in two
//! phases ([`two_phase`]): an authorize (a hold, some expiring mid-run), then
//! captures (whole or in part), voids, both at once, or nothing, each
//! duplicated across the instances, racing each other and the expiry that
//! payguard's own sweeper, running on every instance, writes. One request in
//! three carries an Idempotency-Key ([`keys`]): all its copies and retries,
//! then the same request once more under it once answered, and for half of
//! them another request (a refund of its own) under the same key; an instance
//! runs a keyed request with payguard's own keyed sequence
//! (`Engine::submit_keyed`, what `payguard-server` runs for the header). All
//! of it over a simulated network on a simulated clock. A seed decides
//! latencies, message loss, partitions, slow links, crashes and restarts of any
//! host, Redis flushes, and writers stalled past their lock's TTL ([`run`]).
//! Every run ends with the money invariants checked against the database and
//! what the clients were told ([`checks`], [`oracle`]), fencing checked (no write applied
//! below a token already applied to its order, no live lock holder given a
//! token at or below an earlier live holder's), no request hung inside an
//! instance, refunds checked (each refund id once, an order's refunds within its
//! charge or capture, every acknowledged refund in the ledger, none for a
//! refund refused as exceeding what was paid), holds checked (one hold, one
//! capture, one release per order; exactly one of capture, void and expiry;
//! every definite answer agreeing with it; no capture at or after the expiry;
//! every short hold released by a sweeper; `held` the sum of the open holds and
//! within the balance after every commit), one event per effect in the events
//! feed, Idempotency-Keys checked (every definite answer under a key to its
//! request the same as the first, one effect per key, a reused key answered
//! 422 and moving nothing), every "nothing moved" the store answered true
//! (no transaction of such a batch committed, before the answer or after
//! it), and, on a seed with no fault, liveness: every
//! request answered 200, 402, a definite 409 or a 422 for a reused key within
//! one lock TTL plus the store's batch deadline.
//!
//! A seed replays exactly: every random choice comes from that seed (turmoil's
//! RNG and ours), time is turmoil's (the engine and payguard's release board
//! read tokio's clock, which turmoil drives), nothing decides on hash order,
//! and what the engine would take from the wall clock or a random source is
//! supplied by the simulated store (event ids, the time the rules decide at).
//! A seed's schedule (requests and faults) is drawn whole, then a
//! [`shrink::Mask`] may remove part of it: a failing seed is shrunk to the
//! fewest requests and faults that still fail the same way ([`shrink`]), and
//! replays with its seed and mask.
//!
//! What runs for real: the engine (lanes, single flight, group commit, the
//! fenced batch path with settled hints and parking, the lane's give-up after
//! the lock wait), the expiry sweeper (`payguard::engine::sweeper::run_on_clock`,
//! the loop `payguard-server` runs, on the simulated clock), payguard's
//! `ReleaseBoard` and its release subscriber (`lock::release::subscriber`,
//! the loop `spawn_subscriber` runs: the subscribe timeout, a wake-up of every
//! waiter on each (re)subscription, the pause before subscribing again), the
//! money rules (two-phase ones included) with their events,
//! the Idempotency-Key sequence and rules (claim, replay, wait, refuse a reuse,
//! the answer stored in the op's transaction, the key freed after a retryable
//! failure), the token arithmetic, the PostgreSQL store's commit-fate
//! resolution (`payguard::store::commit_fate`, the loop `PgStore` ships: the
//! look-up, the rerun, an earlier commit never answered as "nothing moved",
//! `Unknown` past its limits; [`store`] supplies one attempt over the
//! simulated network and one look at a fate, the database's side of
//! `txid_status` and `pg_terminate_backend`), the Redis lock client
//! (`RedisLocks`: every step from the owner per acquire to the epoch raise,
//! its retries and the give-backs, over a transport that crosses the
//! simulated network) and its Lua scripts (the shipped texts, run by
//! [`redis`]), and, with `Protocol::webhooks`, the webhook delivery loop
//! (`payguard::outbox::delivery`, what `payguard-server` starts: fan-out,
//! claims with leases and per-endpoint and total room, attempts, results
//! batched and kept only under their lease, the retry schedule at scaled
//! delays) on every instance, crashing with it, its store calls crossing the
//! network to the database's outbox ([`outbox`], each rule the SQL stores'
//! statement it names), its attempts going to a receiver host ([`hooks`])
//! that stands in for a customer's endpoint behind the server's HTTP sender
//! (signing, secrets, SSRF and HTTP are not run: an attempt is one message
//! and its answer; the receiver answers 200, or 500, or 504 past the
//! attempt's timeout, and records every attempt; on a seed with faults it
//! may also be down, cut off from an instance, or slow past the timeout on
//! one instance's link, up to [`config::RECEIVER_FAULTS_MAX`] times, on its
//! own random stream); at the end of such a seed,
//! once its deliveries drained, every matching event has exactly one delivery
//! per endpoint, every delivery is delivered and was received, none recorded
//! delivered without a 2xx, no attempt arrives after its delivery's
//! `delivered` record while its own lease ran, attempts are numbered by their
//! claims without gaps and a result is kept only for the latest claim, no
//! claim overlaps a running lease, and on a seed with no fault every delivery
//! is made within a bound ([`hooks::check`]). What is re-stated, because it is written against a real
//! server's calls: only the pub/sub connection under the release subscriber
//! (production's `RedisFeed`: redis-rs's `get_async_pubsub`, `SUBSCRIBE` and
//! message stream). The simulation's feed ([`locks`]) subscribes over the
//! simulated network and ends its stream when a periodic `SUBSCRIBE` probe
//! goes unanswered or another Redis run answers, its stand-in for a TCP
//! connection's loss; how redis-rs reports a dropped connection is not
//! checked here. Not simulated: the HTTP layer (the header's
//! validation, the fingerprint's hash of method, path and canonical body, the
//! JSON stored under a key: [`keys`] stands in for them), the Idempotency-Key
//! calls crossing the network unless `Protocol::keys_over_network` says so
//! (`payguard_holds_with_keys_over_the_network`, 250 seeds per CI run;
//! otherwise they read and write the database's state at once), webhook
//! delivery unless `Protocol::webhooks` says so (`payguard_holds_with_webhooks`,
//! 250 seeds per CI run), transactions that overlap in time (the database runs
//! each at one instant) and so PostgreSQL's numbering of events after commit
//! (`sequence_events`: it orders a transaction that took its position first
//! but committed last, which cannot happen here; `payguard-server`'s
//! `tests/events.rs` checks it against a real PostgreSQL), Redis eviction and replication, and a database that
//! loses committed data. Every host reads the one simulated clock, unless
//! `Protocol::clock_skew_ms` sets the instances' clocks apart: each instance
//! then decides its batches, snapshot reads and sweeps at its own clock, as
//! payguard does (`payguard_holds_with_clocks_apart` runs 250 seeds so per CI
//! run).
//!
//! What it found once refunds were sent: a batch holding a duplicate deduct
//! answered by a settled hint and a refund of the same order takes that
//! order's lock in a second acquire, and the engine released both acquires'
//! leases in one call, which takes one acquire's: none was released, and the
//! orders stayed locked until their TTL (`LockBusy` on a seed with no fault).
//! The engine now releases per acquire (`tests/sim.rs`: seed 340 then, 24
//! once the clients also paid in two phases, 31 since they send keys).
//!
//! What it found once holds were captured around their expiry: the PostgreSQL
//! store read its clock when a batch attempt started, before its row locks, so
//! with Redis unreachable a capture that read the clock before the expiry
//! committed after a duplicate, decided after it, had been told
//! `hold_expired`. The store now reads the clock once it holds its rows
//! (`tests/sim.rs`, seed 1677 with the old clock read, 1147 since the clients
//! send keys; `payguard`'s `tests/pg_store.rs` against a real server).
//!
//! What it found once clients sent Idempotency-Keys: a keyed command refused
//! `stale_fencing_token` had its key freed by the store in its own
//! transaction, and then freed again by the keyed sequence, which by then
//! freed the claim a repeat had taken: the repeat's answer went unstored and a
//! reuse of the key for another refund moved money. `Engine::submit_keyed` no
//! longer frees the key after that answer (`tests/sim.rs`, seed 2897 with the
//! old release), and every free now names its claim's token, so such a
//! release frees nothing another request holds (seed 2897 fails only with the
//! stores' old release by key, `StoreVariant::release_checks_claim` off). And a rerun after a lost COMMIT decided a keyed refund
//! afresh after its refusal was stored under its key, and made it once the
//! order was charged meanwhile (seed 4096; 4031 too): a keyed command whose
//! key already holds its answer is now not decided again
//! (`store::rules::answered`, `Rejection::KeyAnswered`, in every store), and
//! the keyed sequence answers the stored response (`tests/sim.rs`, seed 4096
//! with `StoreVariant::rerun_reads_key` off; 7382 since payguard's release
//! subscriber runs here).
//!
//! What it found with clocks apart: a capture or void past the expiry only
//! refused, so with instance clocks 5 ms apart one instance told a client
//! `hold_expired` and another, its clock behind, then captured the same hold,
//! with no fault (seed 390; 339 since the clients send keys). A refusal for expiry now writes the expiry itself
//! (`store::rules::Effect::Lapse`): what a client is told is what the database
//! says from then on, whatever the next instance's clock reads.
//!
//! [`config::Protocol`] can switch the old batch-locking protocol back on, or a
//! rule of the store off (an Idempotency-Key rule among them), or send an
//! edited lock script ([`config::ScriptSwap`]), or arm a bug in the engine,
//! its sweeper, its lock client (the old counter reset among them) or the
//! store's commit-fate loop, or its webhook delivery loop (`payguard::mutants`),
//! or switch a webhook lease rule of the database off, to show that the
//! checks then fail (`tests/sim.rs` pins a seed for each).

#![forbid(unsafe_code)]

pub mod checks;
pub mod client;
pub mod config;
pub mod db;
pub mod hooks;
pub mod instance;
pub mod keys;
pub mod locks;
pub mod oracle;
pub mod outbox;
pub mod redis;
pub mod run;
pub mod shrink;
pub mod store;
pub mod two_phase;
pub mod wire;

pub use config::{LockProtocol, Protocol, ScriptSwap};
pub use oracle::{Stats, Violation, ViolationKind};
pub use run::{
    run_seed, run_seed_masked, run_seed_traced, run_seeds, schedule, Outcome, Schedule, SeedsReport,
};
pub use shrink::{shrink, Mask, Shrunk};
