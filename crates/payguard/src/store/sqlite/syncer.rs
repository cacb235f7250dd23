//! The syncer thread: makes the writer's commits durable, then answers them.
//!
//! With [`Durability::Pipelined`] the writer commits with `synchronous=NORMAL`:
//! the commit's WAL frames are written, not yet fsynced, and the writer goes on
//! to the next batch at once. It hands each commit's answers here; this thread
//! takes every commit queued so far, `fdatasync`s the WAL file once for all of
//! them, publishes the newest as durable and only then answers their callers.
//! An fsync that starts after a commit's frames were written makes them
//! durable, so no caller hears of a commit that a power cut could undo. One
//! fsync here covers every commit the writer finished meanwhile, so the writer
//! no longer waits a disk round trip per batch (BENCHMARKS.md, "Fourth session").
//!
//! What a crash loses: WAL recovery keeps the checksum-valid prefix of the log,
//! so only commits whose fsync had not returned, none of them answered, and
//! nothing anyone was shown: every other reader of this store (GETs, `settled`,
//! the events feed, webhook fan-out and claims, idempotency records) waits at
//! [`Watermark::wait_durable`] until the syncer has passed every commit that its
//! read could have seen. SQLite syncs the WAL itself before every checkpoint
//! under `NORMAL`, so no frame reaches the database file undurable.
//!
//! Limit: another *process* on the same file reads through SQLite's shared
//! memory, not through this watermark; it may see a commit up to one fsync
//! (milliseconds) before it is durable. Run one payguard process per SQLite
//! file, or `--sqlite-sync full`.
//!
//! With [`Durability::Full`] the commit fsyncs (`synchronous=FULL`) and this
//! thread only forwards the answers.

use super::error::unavailable;
use crate::failpoint::{self, Action};
use crate::store::{after_commit_failpoint_applies, OpResult, StoreError};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::oneshot;

/// Commits the writer may run ahead of the last fsync before it waits: bounds
/// the answers held in memory and the work a crash can lose.
pub const SYNC_QUEUE_COMMITS_MAX: usize = 256;

/// How a writer commit reaches the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=NORMAL` commits, one `fdatasync` of the WAL per group of
    /// commits on the syncer thread, answers and reads held until it returns.
    #[default]
    Pipelined,
    /// `synchronous=FULL`: every commit fsyncs before the writer goes on.
    Full,
}

/// Which writer commits have begun, and which are durable. Shared by the
/// writer (bumps `begun` before each commit becomes visible), the syncer
/// (raises `durable` after each fsync) and every reader (waits for `durable`
/// to reach what `begun` was after its read).
#[derive(Default)]
pub(super) struct Watermark {
    /// Number of writer transactions begun. Incremented before `BEGIN`, so a
    /// reader that saw a commit's rows loads a `begun` at least its number.
    begun: AtomicU64,
    /// Highest commit number that is durable; only the syncer raises it.
    durable: Mutex<u64>,
    raised: Condvar,
}

impl Watermark {
    /// A watermark whose commits are durable as they are made (`Full`): the
    /// writer still numbers them, and the syncer raises `durable` as it forwards.
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Watermark::default())
    }

    /// The writer's next commit number; call before the transaction begins.
    pub(super) fn begin(&self) -> u64 {
        self.begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn raise(&self, to: u64) {
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        debug_assert!(*durable <= to, "durable only moves forward");
        *durable = to;
        self.raised.notify_all();
    }

    /// Blocks until every writer commit that had begun by now is durable. Call
    /// after a read (or another connection's transaction) finished and before
    /// its result leaves the store: anything it saw was begun before this load.
    pub(super) fn wait_durable(&self) {
        let want = self.begun.load(Ordering::SeqCst);
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        while *durable < want {
            durable = self.raised.wait(durable).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One writer commit's answers, waiting for their fsync.
pub(super) struct Committed {
    pub(super) seq: u64,
    pub(super) outcome: Result<Vec<OpResult>, StoreError>,
    /// Each caller's reply and how many of `outcome`'s results are its.
    pub(super) replies: Vec<(oneshot::Sender<Result<Vec<OpResult>, StoreError>>, usize)>,
}

/// Starts the syncer thread; it runs until the writer drops its sender, after
/// syncing and answering every commit it took.
pub(super) fn spawn(
    db: PathBuf,
    durability: Durability,
    watermark: Arc<Watermark>,
) -> Result<
    (
        std::sync::mpsc::SyncSender<Committed>,
        std::thread::JoinHandle<()>,
    ),
    StoreError,
> {
    let (tx, rx) = std::sync::mpsc::sync_channel(SYNC_QUEUE_COMMITS_MAX);
    let mut wal = Wal::new(db);
    let handle = std::thread::Builder::new()
        .name("payguard-fsync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut group: Vec<Committed> = vec![first];
                group.extend(rx.try_iter());
                let last = group.last().map_or(0, |c| c.seq);
                if durability == Durability::Pipelined {
                    // Held here by a test to prove nothing is answered or read early.
                    failpoint::hit_blocking(failpoint::BEFORE_SYNC);
                    if let Err(e) = wal.sync() {
                        // Whether the frames reached the disk is now unknown, and a
                        // retried fsync may report success for pages the kernel
                        // dropped: stop rather than answer anything (PostgreSQL's
                        // choice after a failed fsync, for the same reason).
                        tracing::error!(event = "store_fsync_failed", error = %e, "WAL fsync failed; aborting");
                        std::process::abort();
                    }
                }
                watermark.raise(last);
                group.into_iter().for_each(answer);
            }
        })
        .map_err(unavailable)?;
    Ok((tx, handle))
}

/// Answers one durable commit's callers (the after-commit failpoint first).
fn answer(c: Committed) {
    let mut outcome = c.outcome;
    if outcome
        .as_ref()
        .is_ok_and(|r| after_commit_failpoint_applies(r))
        && failpoint::hit_blocking(failpoint::AFTER_COMMIT) == Some(Action::Error)
    {
        // Committed and durable, and every caller hears "unavailable": the
        // lost-acknowledgement case a retry must resolve as a replay.
        outcome = Err(StoreError::Unavailable(
            "failpoint store.after_commit: committed, reply lost".into(),
        ));
    }
    match outcome {
        Ok(results) => {
            debug_assert_eq!(
                results.len(),
                c.replies.iter().map(|(_, n)| n).sum::<usize>()
            );
            let mut results = results.into_iter();
            for (reply, len) in c.replies {
                let _ = reply.send(Ok(results.by_ref().take(len).collect()));
            }
        }
        Err(e) => {
            for (reply, _) in c.replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The database's WAL file, opened by path (`<db>-wal`) and reopened if SQLite
/// ever replaces it (it deletes the file only when its last connection closes,
/// which the writer's open connection prevents; checked anyway, by inode).
struct Wal {
    path: PathBuf,
    file: Option<(File, u64)>,
}

impl Wal {
    fn new(db: PathBuf) -> Self {
        let mut path = db.into_os_string();
        path.push("-wal");
        Wal {
            path: path.into(),
            file: None,
        }
    }

    /// `fdatasync` of the WAL: durable every frame written before the call.
    fn sync(&mut self) -> std::io::Result<()> {
        let ino = std::fs::metadata(&self.path)?.ino();
        if self.file.as_ref().is_none_or(|(_, i)| *i != ino) {
            // Opened read-only: fsync needs no write access, and any descriptor
            // of the inode flushes its dirty pages.
            let file = File::open(&self.path)?;
            let opened = file.metadata()?.ino();
            self.file = Some((file, opened));
        }
        let (file, _) = self.file.as_ref().expect("opened above");
        file.sync_data()
    }
}
