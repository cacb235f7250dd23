//! Unanswered COMMITs: how a store runs a batch so that an error never says
//! "nothing moved" when something did. Written once, generic over the few
//! calls that differ per database ([`FateStore`]), so that the code that ships
//! in the PostgreSQL store (`postgres/commit.rs`) is the code the deterministic
//! simulation runs (`payguard-sim`'s `SimStore`, issue #17) under a simulated
//! clock and network, with its own scaled [`FateLimits`].
//!
//! Why here, in `store`, and not in `store::postgres`: the decisions (when to
//! look a fate up, what a look-up's answer means for the error a caller may be
//! given, when to give up and with which error) are the store's promise ("a
//! [`StoreError`] other than `Unknown` means nothing moved"), not PostgreSQL's
//! dialect; `txid_status`, `pg_terminate_backend` and the pool stay behind the
//! trait in `postgres/commit.rs`, so the simulation depends on nothing of
//! PostgreSQL. Why not in the engine: it is below the engine (the engine only
//! sees a `Store`).
//!
//! The loop ([`apply_resolved`]): a batch whose COMMIT went unanswered, or
//! whose deadline passed while its COMMIT was on the wire, is never guessed
//! about. Its fate is looked up ([`FateStore::fate_once`], which ends the
//! transaction if it is still in progress, so that the answer is final: a late
//! COMMIT cannot land after the caller was answered), then the batch runs
//! again: its commands are idempotent, so a batch that did commit reads back as
//! its replay (a keyed command from its key's stored answer). Once an attempt is
//! known to have committed, no later error may be reported as "nothing moved":
//! the batch runs again until it reads its result back, or the caller gets
//! [`StoreError::Unknown`]. Also `Unknown` when a fate cannot be learned within
//! [`FateLimits::resolve_deadline_ms`]; past [`FateLimits::reruns_max`] reruns
//! none of which committed, `Unavailable` (each was looked up: nothing moved).
//!
//! Observability is part of what ships: the tracing events
//! `store_commit_unanswered`, `store_commit_resolved` and
//! `store_commit_lookup_failed` are emitted here for every store; counters
//! are the store's own ([`FateStore::unanswered`], [`FateStore::resolved`]).

use crate::mutants::{armed, Mutant};
use crate::store::{OpResult, StoreError};
use std::future::Future;
use std::time::Duration;

/// The limits of one batch's resolution. The PostgreSQL store passes its
/// named constants (`postgres::{RESOLVE_DEADLINE_MS, AMBIGUOUS_RERUNS_MAX}`,
/// `postgres::commit::{RERUN_BACKOFF_MS, FATE_POLL_MS}`, and its configured
/// batch deadline); the simulation its scaled ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FateLimits {
    /// Client-side deadline of one attempt, COMMIT included.
    pub batch_deadline: Duration,
    /// How long learning one unanswered COMMIT's fate may take.
    pub resolve_deadline_ms: u64,
    /// Pause before a rerun, times the rerun's number.
    pub rerun_backoff_ms: u64,
    /// Pause between looks at a fate (still in progress, or a failed look).
    pub fate_poll_ms: u64,
    /// Reruns after the first attempt before giving up.
    pub reruns_max: u32,
}

/// How one attempt of a batch ended, as the store's attempt reports it (the
/// deadline is the loop's: see [`apply_resolved`]).
#[derive(Debug)]
pub enum Attempt<X> {
    /// Committed (or nothing to commit): one result per command.
    Done(Vec<OpResult>),
    /// COMMIT of transaction `xid` was sent and no answer came: it may have
    /// committed.
    Unanswered { xid: X, detail: String },
    /// A failure the database answered, or one before COMMIT was sent:
    /// nothing of this attempt committed.
    Failed(StoreError),
}

/// What one look at a transaction's fate found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Committed,
    Aborted,
    /// Still in progress: the store has ended it, so the next look is final.
    InProgress,
}

/// The calls a store makes for [`apply_resolved`]. The futures are `Send`
/// because a store's futures are (`StoreFuture`).
pub trait FateStore: Sync {
    /// A transaction id, as the store's look-up takes it.
    type Xid: Copy + std::fmt::Display + tracing::Value + Send + Sync;
    /// What one attempt runs on (a pooled connection); kept by the loop until
    /// the attempt's fate is resolved.
    type Conn: Send;

    /// A connection for the next attempt.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, StoreError>> + Send;

    /// One attempt of the batch. `sent` holds the xid whose COMMIT is on the
    /// wire while it is, so that the loop knows it if the deadline passes.
    fn attempt<'a>(
        &'a self,
        conn: &'a mut Self::Conn,
        sent: &'a mut Option<Self::Xid>,
    ) -> impl Future<Output = Attempt<Self::Xid>> + Send + 'a;

    /// The connection of an attempt that went unanswered is lost to us: never
    /// hand it back for reuse.
    fn discard(&self, conn: &mut Self::Conn);

    /// One look at `xid`'s fate; [`Fate::InProgress`] only after ending it.
    fn fate_once(&self, xid: Self::Xid) -> impl Future<Output = Result<Fate, StoreError>> + Send;

    /// A COMMIT went unanswered; its fate is about to be looked up (counters).
    fn unanswered(&self, xid: Self::Xid, detail: &str);

    /// An unanswered COMMIT's fate was learned; the batch runs again (counters).
    fn resolved(&self, xid: Self::Xid, committed: bool);
}

/// Runs a batch on `store` with unanswered COMMITs resolved (see the module
/// docs): the only way a store that uses this runs a batch.
pub async fn apply_resolved<S: FateStore>(
    store: &S,
    limits: &FateLimits,
) -> Result<Vec<OpResult>, StoreError> {
    let mut reruns = 0;
    // Once an earlier attempt is known to have committed, no error may be
    // reported as "nothing moved": the batch is re-run (it replays) until it
    // reads its result back, or the caller gets `Unknown`.
    let mut committed_before = false;
    loop {
        let (why, _conn) = match store.connect().await {
            // Before any attempt committed, a connection that cannot be had
            // is what it says: nothing moved.
            Err(e) if !committed_before || armed(Mutant::CommittedAttemptForgotten) => {
                return Err(e)
            }
            Err(e) => (e.to_string(), None),
            Ok(mut conn) => {
                let why = match run_attempt(store, limits, &mut conn, &mut committed_before).await?
                {
                    Ok(results) => return Ok(results),
                    Err(why) => why,
                };
                // Held through the backoff, as the attempt's connection guard
                // was before this loop was shared: a store closing waits for it.
                (why, Some(conn))
            }
        };
        reruns += 1;
        if reruns > limits.reruns_max {
            return Err(
                if committed_before && !armed(Mutant::CommittedAttemptForgotten) {
                    StoreError::Unknown(format!(
                        "an earlier attempt committed, and reading its result back failed: {why}"
                    ))
                } else {
                    StoreError::Unavailable(format!(
                        "{reruns} COMMITs in a row went unanswered, none of them committed: {why}"
                    ))
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(
            limits.rerun_backoff_ms * u64::from(reruns),
        ))
        .await;
    }
}

/// One attempt under the batch deadline: `Ok(Ok(results))` to answer,
/// `Ok(Err(why))` to run the batch again, `Err` to answer that error.
async fn run_attempt<S: FateStore>(
    store: &S,
    limits: &FateLimits,
    conn: &mut S::Conn,
    committed_before: &mut bool,
) -> Result<Result<Vec<OpResult>, String>, StoreError> {
    // The xid whose COMMIT is on the wire, while it is.
    let mut sent = None;
    let attempt = tokio::time::timeout(limits.batch_deadline, store.attempt(conn, &mut sent)).await;
    let why = match attempt {
        Ok(Attempt::Done(results)) => return Ok(Ok(results)),
        Ok(Attempt::Unanswered { xid, detail }) => {
            store.discard(conn);
            resolve(store, limits, xid, &detail, committed_before).await?;
            detail
        }
        Ok(Attempt::Failed(e)) => {
            if !*committed_before || armed(Mutant::CommittedAttemptForgotten) {
                return Err(e);
            }
            e.to_string()
        }
        Err(_) => {
            let detail = format!(
                "no answer within the {:?} batch deadline",
                limits.batch_deadline
            );
            // The connection is lost to us: never hand it back.
            store.discard(conn);
            match sent {
                Some(xid) => {
                    resolve(store, limits, xid, &detail, committed_before).await?;
                    detail
                }
                // COMMIT was never sent: the server rolls back when the
                // connection goes, and nothing of this attempt can commit.
                None if !*committed_before || armed(Mutant::CommittedAttemptForgotten) => {
                    return Err(StoreError::Unavailable(format!(
                        "{detail}; nothing was committed"
                    )))
                }
                None => detail,
            }
        }
    };
    Ok(Err(why))
}

/// Looks up an unanswered COMMIT's fate (bounded by the resolve deadline), so
/// the batch can run again; `Unknown` when the fate cannot be learned.
async fn resolve<S: FateStore>(
    store: &S,
    limits: &FateLimits,
    xid: S::Xid,
    detail: &str,
    committed_before: &mut bool,
) -> Result<(), StoreError> {
    if armed(Mutant::UnansweredCommitGuessedAborted) {
        return Err(StoreError::Unavailable(format!(
            "COMMIT of transaction {xid} was not answered ({detail}); guessed not committed"
        )));
    }
    store.unanswered(xid, detail);
    tracing::warn!(event = "store_commit_unanswered", xid, detail = %detail, "looking up the transaction's fate");
    let committed = tokio::time::timeout(
        Duration::from_millis(limits.resolve_deadline_ms),
        commit_fate(store, limits, xid),
    )
    .await
    .map_err(|_| {
        StoreError::Unknown(format!(
            "COMMIT of transaction {xid} was not answered ({detail}) and its fate could not be learned within {} ms",
            limits.resolve_deadline_ms
        ))
    })?;
    tracing::warn!(
        event = "store_commit_resolved",
        xid,
        committed,
        "running the batch again (it replays if it committed)"
    );
    store.resolved(xid, committed);
    if committed {
        *committed_before = true;
    }
    Ok(())
}

/// Whether transaction `xid` committed. A transaction still in progress (its
/// COMMIT may yet arrive from a connection the network is holding) is ended by
/// the look that finds it so, and looked at again, so the answer is final.
/// Failed looks are retried (the caller bounds the whole look-up).
async fn commit_fate<S: FateStore>(store: &S, limits: &FateLimits, xid: S::Xid) -> bool {
    loop {
        match store.fate_once(xid).await {
            Ok(Fate::Committed) => return true,
            Ok(Fate::Aborted) => return false,
            Ok(Fate::InProgress) => {}
            Err(e) => {
                tracing::warn!(event = "store_commit_lookup_failed", xid, detail = %e, "retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(limits.fate_poll_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    //! The loop's decisions against a scripted store: no database, real (tiny)
    //! times.
    use super::*;
    use crate::store::Rejection;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// What the scripted store's next attempt does.
    enum Step {
        Done,
        Unanswered,
        Failed,
        /// No connection can be had.
        NoConnection,
        /// Never answers; COMMIT on the wire or not.
        Hang {
            sent: bool,
        },
    }

    #[derive(Default)]
    struct Script {
        steps: Mutex<VecDeque<Step>>,
        fates: Mutex<VecDeque<Result<Fate, StoreError>>>,
        /// What happened, in order.
        log: Mutex<Vec<String>>,
        next_xid: Mutex<i64>,
    }

    impl Script {
        fn new(steps: Vec<Step>, fates: Vec<Result<Fate, StoreError>>) -> Self {
            Script {
                steps: Mutex::new(steps.into()),
                fates: Mutex::new(fates.into()),
                ..Script::default()
            }
        }

        fn note(&self, line: String) {
            self.log.lock().unwrap().push(line);
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    const LIMITS: FateLimits = FateLimits {
        batch_deadline: Duration::from_millis(20),
        resolve_deadline_ms: 50,
        rerun_backoff_ms: 1,
        fate_poll_ms: 1,
        reruns_max: 3,
    };

    fn result() -> Vec<OpResult> {
        vec![Err(Rejection::InsufficientFunds)]
    }

    impl FateStore for Script {
        type Xid = i64;
        type Conn = ();

        async fn connect(&self) -> Result<(), StoreError> {
            let mut steps = self.steps.lock().unwrap();
            if matches!(steps.front(), Some(Step::NoConnection)) {
                steps.pop_front();
                drop(steps);
                self.note("no connection".into());
                return Err(StoreError::Unavailable("no connection".into()));
            }
            Ok(())
        }

        async fn attempt(&self, _conn: &mut (), sent: &mut Option<i64>) -> Attempt<i64> {
            let xid = {
                let mut x = self.next_xid.lock().unwrap();
                *x += 1;
                *x
            };
            let step = self.steps.lock().unwrap().pop_front().expect("a step");
            match step {
                Step::Done => {
                    self.note(format!("{xid} done"));
                    Attempt::Done(result())
                }
                Step::Unanswered => {
                    self.note(format!("{xid} unanswered"));
                    Attempt::Unanswered {
                        xid,
                        detail: "connection lost".into(),
                    }
                }
                Step::Failed => {
                    self.note(format!("{xid} failed"));
                    Attempt::Failed(StoreError::Unavailable("refused".into()))
                }
                Step::NoConnection => unreachable!("taken by connect"),
                Step::Hang { sent: on_wire } => {
                    self.note(format!("{xid} hangs"));
                    if on_wire {
                        *sent = Some(xid);
                    }
                    std::future::pending().await
                }
            }
        }

        fn discard(&self, _conn: &mut ()) {
            self.note("discard".into());
        }

        async fn fate_once(&self, xid: i64) -> Result<Fate, StoreError> {
            let next = self.fates.lock().unwrap().pop_front();
            match next {
                Some(fate) => {
                    self.note(format!("{xid} fate {fate:?}"));
                    fate
                }
                // Not learnable: the look-up never answers.
                None => std::future::pending().await,
            }
        }

        fn unanswered(&self, xid: i64, _detail: &str) {
            self.note(format!("{xid} looked up"));
        }

        fn resolved(&self, xid: i64, committed: bool) {
            self.note(format!("{xid} committed {committed}"));
        }
    }

    fn is_unknown(r: &Result<Vec<OpResult>, StoreError>) -> bool {
        matches!(r, Err(StoreError::Unknown(_)))
    }

    fn is_unavailable(r: &Result<Vec<OpResult>, StoreError>) -> bool {
        matches!(r, Err(StoreError::Unavailable(_)))
    }

    #[tokio::test]
    async fn an_unanswered_commit_is_looked_up_and_the_batch_runs_again() {
        let s = Script::new(
            vec![Step::Unanswered, Step::Done],
            vec![Ok(Fate::InProgress), Ok(Fate::Committed)],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert_eq!(r.ok(), Some(result()));
        assert_eq!(
            s.log(),
            [
                "1 unanswered",
                "discard",
                "1 looked up",
                "1 fate Ok(InProgress)",
                "1 fate Ok(Committed)",
                "1 committed true",
                "2 done"
            ]
        );
    }

    #[tokio::test]
    async fn a_failure_after_an_attempt_that_committed_is_unknown_never_nothing_moved() {
        // The rerun's failure is not answered: the batch runs again and
        // reads its result back.
        let s = Script::new(
            vec![Step::Unanswered, Step::Failed, Step::Done],
            vec![Ok(Fate::Committed)],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert_eq!(r.ok(), Some(result()), "{:?}", s.log());
        // Failures until the reruns run out: unknown.
        let s = Script::new(
            vec![Step::Unanswered, Step::Failed, Step::Failed, Step::Failed],
            vec![Ok(Fate::Committed)],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unknown(&r), "{r:?}: {:?}", s.log());
        // No connection for the rerun: still unknown (the money moved).
        let s = Script::new(
            vec![
                Step::Unanswered,
                Step::NoConnection,
                Step::Failed,
                Step::Failed,
            ],
            vec![Ok(Fate::Committed)],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unknown(&r), "{r:?}: {:?}", s.log());
    }

    #[tokio::test]
    async fn a_failure_after_attempts_that_did_not_commit_is_nothing_moved() {
        let s = Script::new(
            vec![Step::Unanswered, Step::Failed],
            vec![Ok(Fate::Aborted)],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unavailable(&r), "{r:?}: {:?}", s.log());
        // Four unanswered COMMITs, none committed: nothing moved.
        let s = Script::new(
            (0..4).map(|_| Step::Unanswered).collect(),
            (0..4).map(|_| Ok(Fate::Aborted)).collect(),
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unavailable(&r), "{r:?}: {:?}", s.log());
        assert_eq!(
            s.log().iter().filter(|l| l.ends_with("looked up")).count(),
            4
        );
    }

    #[tokio::test]
    async fn a_deadline_with_the_commit_on_the_wire_is_looked_up_and_without_it_is_nothing_moved() {
        let s = Script::new(
            vec![Step::Hang { sent: true }, Step::Done],
            vec![
                Err(StoreError::Unavailable("down".into())),
                Ok(Fate::Aborted),
            ],
        );
        let r = apply_resolved(&s, &LIMITS).await;
        assert_eq!(r.ok(), Some(result()), "{:?}", s.log());
        assert!(s.log().contains(&"1 committed false".to_string()));
        let s = Script::new(vec![Step::Hang { sent: false }], vec![]);
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unavailable(&r), "{r:?}: {:?}", s.log());
        assert!(!s.log().iter().any(|l| l.ends_with("looked up")));
    }

    #[tokio::test]
    async fn a_fate_that_cannot_be_learned_is_unknown() {
        let s = Script::new(vec![Step::Unanswered], vec![]);
        let r = apply_resolved(&s, &LIMITS).await;
        assert!(is_unknown(&r), "{r:?}: {:?}", s.log());
    }
}
