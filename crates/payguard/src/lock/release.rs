//! Release notifications: how a request waiting for another instance's lock
//! learns, without polling, that the lock is free.
//!
//! Nobody holds a Redis lock while waiting for another (that was the cycle of
//! issue #12: A held X and waited for Y, B held Y and waited for X). A batch takes
//! the locks that are free in one round trip and leaves the busy orders behind;
//! those wait here until the holder's release script publishes their order id on
//! the `{prefix}:released` channel, which one subscriber task per instance turns
//! into a wake-up. A wake-up is only a hint to try again: the lock is taken anew,
//! and the database still decides.
//!
//! Two gaps are closed without polling:
//! * a release that reaches the subscriber between the acquire script's answer and
//!   the registration of the waiter: the board remembers recent releases with the
//!   time they arrived, and a waiter whose acquire was sent before that time does
//!   not wait at all;
//! * a release published while the subscriber was disconnected: every
//!   (re)subscription wakes every waiter.
//!
//! What remains (a holder that died, a message lost in flight) is bounded by the
//! caller's `at_most`: the holder's remaining TTL, capped by
//! [`super::redis::RELEASE_WAIT_MS_MAX`].

use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Release notifications remembered before old ones are dropped; each is only
/// needed for the few milliseconds between an acquire's answer and its waiter's
/// registration.
pub const RECENT_RELEASES_MAX: usize = 4096;
/// How long a release notification is remembered once the board is full.
pub const RECENT_RELEASE_KEEP_MS: u64 = 1_000;
/// Pause before subscribing again after the subscription failed or dropped.
pub const RESUBSCRIBE_PAUSE_MS: u64 = 100;
/// How long connecting and subscribing may take before it counts as a failure.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = 2_000;

#[derive(Default)]
struct Board {
    /// Order id → the requests (lanes) waiting for its release. Ordered, so a
    /// resubscription wakes them in the same order every run (the simulation
    /// replays a seed exactly).
    waiting: BTreeMap<String, Vec<oneshot::Sender<()>>>,
    /// Order id → when its last release notification arrived.
    recent: HashMap<String, Instant>,
    /// When the subscription last (re)started: every waiter registered for an
    /// acquire sent before this may have missed its notification.
    subscribed_at: Option<Instant>,
}

/// The instance's waiters on other holders' locks; cheap to clone.
#[derive(Clone, Default)]
pub struct ReleaseBoard {
    board: Arc<Mutex<Board>>,
}

impl ReleaseBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `order`'s lock is released (a notification arrives, or
    /// arrived after `since`, the moment the acquire that found it busy was
    /// sent), or `at_most` has passed. Returns true when woken by a release.
    pub async fn released(&self, order: &str, since: Instant, at_most: Duration) -> bool {
        let rx = {
            let mut b = self.lock();
            let missed = b.recent.get(order).is_some_and(|t| *t >= since)
                || b.subscribed_at.is_some_and(|t| t >= since);
            if missed {
                return true;
            }
            let (tx, rx) = oneshot::channel();
            b.waiting.entry(order.to_owned()).or_default().push(tx);
            rx
        };
        match tokio::time::timeout(at_most, rx).await {
            Ok(woken) => woken.is_ok(),
            Err(_) => {
                let mut b = self.lock();
                if let Some(list) = b.waiting.get_mut(order) {
                    list.retain(|tx| !tx.is_closed());
                    if list.is_empty() {
                        b.waiting.remove(order);
                    }
                }
                false
            }
        }
    }

    /// A release notification for `order` arrived (called by the subscriber,
    /// and by the simulation's).
    pub fn notify(&self, order: &str) {
        let now = Instant::now();
        let mut b = self.lock();
        if b.recent.len() >= RECENT_RELEASES_MAX {
            let keep = Duration::from_millis(RECENT_RELEASE_KEEP_MS);
            b.recent.retain(|_, t| now.duration_since(*t) < keep);
            if b.recent.len() >= RECENT_RELEASES_MAX {
                // Still full: forget them all. A waiter that needed one falls
                // back to its `at_most`.
                b.recent.clear();
            }
        }
        b.recent.insert(order.to_owned(), now);
        if let Some(list) = b.waiting.remove(order) {
            for tx in list {
                let _ = tx.send(());
            }
        }
    }

    /// The subscription (re)started: wake everyone, they may have missed theirs.
    pub fn subscribed(&self) {
        let mut b = self.lock();
        b.subscribed_at = Some(Instant::now());
        for (_, list) in std::mem::take(&mut b.waiting) {
            for tx in list {
                let _ = tx.send(());
            }
        }
    }

    /// Orders with at least one waiter (tests, metrics).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn downgrade(&self) -> Weak<Mutex<Board>> {
        Arc::downgrade(&self.board)
    }

    fn upgrade(weak: &Weak<Mutex<Board>>) -> Option<ReleaseBoard> {
        weak.upgrade().map(|board| ReleaseBoard { board })
    }
}

/// Subscribes to `channel` on `client` and feeds `board` until `stop` fires or
/// its sender is dropped (the lock table went away); reconnects after failures.
pub fn spawn_subscriber(
    client: redis::Client,
    channel: String,
    board: &ReleaseBoard,
    mut stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    let weak = board.downgrade();
    tokio::spawn(async move {
        loop {
            let subscribed =
                tokio::time::timeout(Duration::from_millis(SUBSCRIBE_TIMEOUT_MS), async {
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(ps)
                });
            let ps = tokio::select! {
                _ = &mut stop => return,
                got = subscribed => got,
            };
            match ps {
                Ok(Ok(ps)) => {
                    let Some(board) = ReleaseBoard::upgrade(&weak) else {
                        return;
                    };
                    board.subscribed();
                    drop(board);
                    let mut messages = ps.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            _ = &mut stop => return,
                            msg = messages.next() => msg,
                        };
                        let Some(msg) = msg else { break };
                        let Some(board) = ReleaseBoard::upgrade(&weak) else {
                            return;
                        };
                        if let Ok(order) = msg.get_payload::<String>() {
                            board.notify(&order);
                        }
                    }
                    tracing::warn!(
                        event = "lock_release_feed_lost",
                        channel,
                        "the release subscription dropped; subscribing again"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(event = "lock_release_feed_lost", channel, detail = %e);
                }
                Err(_) => {
                    tracing::warn!(
                        event = "lock_release_feed_lost",
                        channel,
                        detail = "subscribing timed out"
                    );
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(Duration::from_millis(RESUBSCRIBE_PAUSE_MS)) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_wakes_its_waiter_and_only_it() {
        let board = ReleaseBoard::default();
        let since = Instant::now();
        let b = board.clone();
        let x = tokio::spawn(async move { b.released("x", since, Duration::from_secs(60)).await });
        let b = board.clone();
        let y =
            tokio::spawn(async move { b.released("y", since, Duration::from_millis(50)).await });
        tokio::task::yield_now().await;
        assert_eq!(board.waiting(), 2);
        board.notify("x");
        assert!(x.await.unwrap(), "woken by the release");
        assert!(!y.await.unwrap(), "y timed out: nobody released it");
        assert_eq!(board.waiting(), 0, "a timed-out waiter leaves no entry");
    }

    #[tokio::test]
    async fn a_release_that_came_before_the_waiter_registered_is_not_lost() {
        let board = ReleaseBoard::default();
        let since = Instant::now();
        board.notify("x");
        // The acquire that found x busy was sent before the release arrived.
        assert!(board.released("x", since, Duration::from_secs(60)).await);
        // A release older than the acquire says nothing about this holder.
        let later = Instant::now() + Duration::from_millis(1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!board.released("x", later, Duration::from_millis(5)).await);
    }

    #[tokio::test]
    async fn a_resubscription_wakes_every_waiter() {
        let board = ReleaseBoard::default();
        let since = Instant::now();
        let b = board.clone();
        let w = tokio::spawn(async move { b.released("x", since, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        board.subscribed();
        assert!(w.await.unwrap());
    }
}
