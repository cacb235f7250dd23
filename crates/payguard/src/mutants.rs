//! Deliberate bugs, for the deterministic simulation to show that its checks
//! fail when the engine, its lock client, the store's commit-fate
//! resolution or the webhook delivery loop is wrong (`crates/payguard-sim`, issue #17).
//!
//! Why in payguard itself: the simulation runs payguard's own code (the
//! engine, the Redis lock client and the loop that resolves unanswered
//! COMMITs, `store::commit_fate`, and the webhook delivery loop,
//! `outbox::delivery`), so a broken variant of that code can only
//! be made here. Why at the crate root, beside [`crate::failpoint`]: the
//! engine, the lock layer and the store all arm bugs from it, and a lower
//! layer never imports a higher one; `engine::mutants` re-exports it.
//!
//! Compiled in only with the `mutants` feature (only `payguard-sim`, a test
//! crate, turns it on; a release build of the CLI never has it); without it [`armed`] is a constant `false`
//! and nothing of this exists. With it (in a workspace test build, cargo turns
//! it on for every crate), nothing changes until a bug is armed: it is
//! armed per thread, for the one simulated seed running on that thread (every
//! host of a turmoil simulation runs on the thread that steps it), so other
//! tests in the same process never see it.

/// A bug the simulation can switch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// A lane answers the first waiter of an op and forgets the others (the
    /// duplicates that joined it by single flight): they are never answered.
    LaneForgetsWaiter,
    /// A batch gives back the leases of all its acquires in one release (the
    /// engine before the simulation's refunds found it): a release takes one
    /// acquire's leases, so a batch that acquired twice released none and
    /// stranded its orders until their TTL.
    ReleaseAcquiresAsOne,
    /// The expiry sweeper's loop ends at its first sweep that failed (a store
    /// error, a full lane), as a task written with `?` would (`sweeper.rs`):
    /// once every instance's sweeper met a database outage, holds nobody
    /// captured or voided are never released.
    SweeperDiesOnFailure,
    /// The keyed sequence frees its key after a stale fencing token too (as
    /// before the simulation sent Idempotency-Keys): the store freed it in the
    /// op's transaction already, so this frees the claim another request took
    /// since, whose answer then goes unstored.
    ReleaseKeyAfterStaleToken,
    /// The commit-fate loop (`store::commit_fate`) guesses that an unanswered
    /// COMMIT did not commit: it answers `Unavailable` ("nothing moved") at
    /// once, with no look-up (which would also have ended the transaction if
    /// it had not arrived yet).
    UnansweredCommitGuessedAborted,
    /// The commit-fate loop forgets that an earlier attempt committed: a later
    /// failure of the batch (a rerun refused, a connection lost, the reruns
    /// exhausted) is answered `Unavailable` ("nothing moved"), not `Unknown`.
    CommittedAttemptForgotten,
    /// The Redis lock client's bug before e03f2f7: after raising the fencing
    /// epoch (its grant found the fence hash gone), it set the grant counter
    /// back to 1 ([`RESET_COUNTER`]), racing with the grants other instances
    /// had made under the new epoch meanwhile: a later grant repeats a token
    /// a live holder already has (`crate::lock::redis`).
    ResetCounterOnNewEpoch,
    /// The webhook delivery loop (`outbox::delivery`) takes an attempt that
    /// timed out for a delivered one: it records the delivery `delivered`
    /// though the endpoint never answered 2xx (a slow endpoint's answer came
    /// after the timeout, or never).
    TimedOutAttemptRecordedDelivered,
}

/// [`Mutant::ResetCounterOnNewEpoch`]'s extra command, as a script over the
/// fence hash (`KEYS[1]`), the one call the lock client's transport makes. It
/// is the old client's `SET fence:counter 1` in today's one-hash layout.
pub const RESET_COUNTER: &str = r#"
redis.call('HSET', KEYS[1], 'n', 1)
return 1
"#;

#[cfg(feature = "mutants")]
thread_local! {
    static ARMED: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Whether `m` is armed on this thread.
#[inline]
pub fn armed(m: Mutant) -> bool {
    #[cfg(feature = "mutants")]
    {
        ARMED.with(|a| a.get() == Some(m))
    }
    #[cfg(not(feature = "mutants"))]
    {
        let _ = m;
        false
    }
}

/// Arms `m` (or disarms with `None`) on this thread.
#[cfg(feature = "mutants")]
pub fn arm(m: Option<Mutant>) {
    ARMED.with(|a| a.set(m));
}
