//! The writer thread: group commit of the lanes' batches, and how one batch runs.
//!
//! One thread owns the only connection that writes batches. It drains whatever
//! has queued up (up to `writer_batch_ops_max` commands) and commits it as one
//! `BEGIN IMMEDIATE` transaction: one fsync for many requests. Each command first
//! runs without a savepoint (the fast path); if one trips a constraint (only
//! possible when something above the database is wrong), the transaction is
//! rolled back and the batch replayed with one savepoint per command, so the
//! refused command is undone alone and the rest of the batch still commits.

use super::commands::exec_command;
use super::error::{unavailable, Fault};
use crate::failpoint::{self, Action};
use crate::store::{after_commit_failpoint_applies, Command, OpResult, Rejection, StoreError};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

/// Lane batches that may wait for the writer before senders are made to wait.
pub const WRITER_QUEUE_JOBS_MAX: usize = 1024;

/// One lane batch for the writer, and where its answers go.
pub(super) struct Job {
    pub(super) cmds: Vec<Command>,
    pub(super) reply: oneshot::Sender<Result<Vec<OpResult>, StoreError>>,
}

/// Starts the writer thread on `conn`; it runs until every sender is dropped,
/// after answering every job it took.
pub(super) fn spawn(
    conn: Connection,
    batch_ops_max: usize,
) -> Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel(WRITER_QUEUE_JOBS_MAX);
    let writer = std::thread::Builder::new()
        .name("payguard-sqlite-writer".into())
        .spawn(move || writer_loop(conn, rx, batch_ops_max))
        .map_err(unavailable)?;
    Ok((tx, writer))
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>, batch_ops_max: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].cmds.len();
        while n < batch_ops_max {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.cmds.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let lens: Vec<usize> = jobs.iter().map(|j| j.cmds.len()).collect();
        let ops: Vec<Command> = jobs.iter_mut().flat_map(|j| j.cmds.drain(..)).collect();
        let now = chrono::Utc::now().timestamp_millis();
        let mut outcome = apply_ops(&mut conn, &ops, now);
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
                debug_assert_eq!(results.len(), ops.len());
                let mut results = results.into_iter();
                for (job, len) in jobs.into_iter().zip(lens) {
                    let mine: Vec<OpResult> = results.by_ref().take(len).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One command in its own `BEGIN IMMEDIATE` transaction, with a savepoint around it.
pub(super) fn run_one(conn: &mut Connection, cmd: &Command) -> Result<OpResult, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    match run_batch(conn, std::slice::from_ref(cmd), now, true) {
        Ok(mut results) => Ok(results.remove(0)),
        Err(f) => Err(f.into_store_error()),
    }
}

/// Applies `ops` in one `BEGIN IMMEDIATE` transaction, one result per op.
///
/// Public so that tests can race two connections on one file with no lane or lock
/// above them, and see the constraints alone keep every order to one debit.
pub fn apply_ops(
    conn: &mut Connection,
    ops: &[Command],
    now_ms: i64,
) -> Result<Vec<OpResult>, StoreError> {
    match run_batch(conn, ops, now_ms, false) {
        Ok(results) => Ok(results),
        Err(Fault::Constraint(msg)) => {
            tracing::warn!(event = "store_constraint", detail = %msg, "replaying batch with a savepoint per op");
            run_batch(conn, ops, now_ms, true).map_err(Fault::into_store_error)
        }
        Err(f @ Fault::Store(_)) => Err(f.into_store_error()),
    }
}

fn run_batch(
    conn: &mut Connection,
    ops: &[Command],
    now: i64,
    careful: bool,
) -> Result<Vec<OpResult>, Fault> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Fault::Store)?;
    let mut out = Vec::with_capacity(ops.len());
    // Half-way through a batch of two or more (see `failpoint::MID_BATCH`).
    let midpoint = if ops.len() >= 2 {
        ops.len() / 2
    } else {
        usize::MAX
    };
    for (i, op) in ops.iter().enumerate() {
        if i == midpoint && failpoint::hit_blocking(failpoint::MID_BATCH) == Some(Action::Error) {
            return Err(Fault::Store(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("failpoint store.mid_batch".into()),
            )));
        }
        if !careful {
            out.push(exec_command(&tx, op, now)?);
            continue;
        }
        tx.execute_batch("SAVEPOINT op").map_err(Fault::Store)?;
        match exec_command(&tx, op, now) {
            Ok(r) => {
                tx.execute_batch("RELEASE op").map_err(Fault::Store)?;
                out.push(r);
            }
            Err(Fault::Constraint(msg)) => {
                tx.execute_batch("ROLLBACK TO op; RELEASE op")
                    .map_err(Fault::Store)?;
                tracing::error!(event = "store_refused", op = ?op, detail = %msg, "the database refused a change");
                out.push(Err(Rejection::Refused(msg)));
            }
            Err(f) => return Err(f),
        }
    }
    tx.commit().map_err(Fault::Store)?;
    Ok(out)
}
