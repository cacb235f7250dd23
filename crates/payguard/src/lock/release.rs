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
//! The subscriber's loop ([`subscriber`]) is written over a [`ReleaseFeed`],
//! "subscribe to this channel, then stream its messages until the subscription
//! is lost": production's is a Redis pub/sub connection ([`RedisFeed`],
//! [`spawn_subscriber`]), the deterministic simulation's its simulated network,
//! so the simulation runs this loop rather than a re-statement of it. Its two
//! time limits are [`SubscriberConfig`]'s.
//!
//! What remains (a holder that died, a message lost in flight) is bounded by the
//! caller's `at_most`: the holder's remaining TTL, capped by
//! [`super::redis::RELEASE_WAIT_MS_MAX`].

use futures::stream::{BoxStream, Stream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
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

/// The subscriber's two time limits. [`SubscriberConfig::default`] has
/// production's ([`RESUBSCRIBE_PAUSE_MS`], [`SUBSCRIBE_TIMEOUT_MS`]); the
/// simulation scales them to its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// Pause before subscribing again after the subscription failed or dropped.
    pub resubscribe_pause_ms: u64,
    /// How long connecting and subscribing may take before it counts as a failure.
    pub subscribe_timeout_ms: u64,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            resubscribe_pause_ms: RESUBSCRIBE_PAUSE_MS,
            subscribe_timeout_ms: SUBSCRIBE_TIMEOUT_MS,
        }
    }
}

/// Where the subscriber's messages come from: one call, "connect and subscribe
/// to this channel", answered with the channel's payloads.
///
/// Why a trait: the subscriber's loop ([`subscriber`]: the timeout around
/// subscribing, `subscribed()` on every (re)subscription, a notification per
/// message, the pause before subscribing again, the stop) is written once.
/// Production's feed is a Redis pub/sub connection ([`RedisFeed`]); the
/// deterministic simulation (`crates/payguard-sim`) has one over its simulated
/// network, so the simulation runs this loop, not a re-statement of it.
///
/// What an implementation guarantees: `subscribe` answers `Ok` only once the
/// server has confirmed the subscription (every release published after that
/// reaches the stream, unless lost in flight), and the stream ends when the
/// subscription is lost (a dropped connection, a restarted server). Telling
/// that a subscription is lost is the feed's job: the loop only subscribes
/// again when the stream ends.
pub trait ReleaseFeed {
    /// The payloads (order ids) published on the channel, in arrival order;
    /// ends when the subscription is lost.
    type Messages: Stream<Item = String> + Unpin;
    /// Why connecting or subscribing failed (logged).
    type Error: std::fmt::Display;

    /// Connects and subscribes to `channel`. The caller bounds it with
    /// [`SubscriberConfig::subscribe_timeout_ms`] and drops it when that passes.
    fn subscribe(
        &mut self,
        channel: &str,
    ) -> impl Future<Output = Result<Self::Messages, Self::Error>>;
}

/// Production's feed: a fresh pub/sub connection from `client` per
/// subscription. A payload that is not a string is skipped.
pub struct RedisFeed {
    client: redis::Client,
}

impl RedisFeed {
    pub fn new(client: redis::Client) -> Self {
        RedisFeed { client }
    }
}

impl ReleaseFeed for RedisFeed {
    type Messages = BoxStream<'static, String>;
    type Error = redis::RedisError;

    async fn subscribe(&mut self, channel: &str) -> Result<Self::Messages, Self::Error> {
        let mut ps = self.client.get_async_pubsub().await?;
        ps.subscribe(channel).await?;
        Ok(ps
            .into_on_message()
            .filter_map(|msg| futures::future::ready(msg.get_payload::<String>().ok()))
            .boxed())
    }
}

/// Subscribes to `channel` on `client` and feeds `board` until `stop` fires or
/// its sender is dropped (the lock table went away); reconnects after failures.
/// Production's limits ([`SubscriberConfig::default`]) over [`RedisFeed`].
pub fn spawn_subscriber(
    client: redis::Client,
    channel: String,
    board: &ReleaseBoard,
    stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(subscriber(
        RedisFeed::new(client),
        channel,
        board,
        SubscriberConfig::default(),
        stop,
    ))
}

/// The subscriber's loop over any feed, for the caller to spawn (production:
/// [`spawn_subscriber`]; the simulation's feed is not `Send`, so it runs it on
/// its host's local task set): subscribes to `channel` (bounded by
/// `config.subscribe_timeout_ms`), wakes every waiter of `board` once
/// subscribed, notifies it of each message, and when subscribing fails or the
/// stream ends logs `lock_release_feed_lost`, pauses
/// `config.resubscribe_pause_ms` and subscribes again. It ends when `stop`
/// fires or its sender is dropped, or once `board` is gone (it holds it
/// weakly).
pub fn subscriber<F: ReleaseFeed>(
    mut feed: F,
    channel: String,
    board: &ReleaseBoard,
    config: SubscriberConfig,
    mut stop: oneshot::Receiver<()>,
) -> impl Future<Output = ()> + use<F> {
    let weak = board.downgrade();
    async move {
        loop {
            let subscribed = tokio::time::timeout(
                Duration::from_millis(config.subscribe_timeout_ms),
                feed.subscribe(&channel),
            );
            let ps = tokio::select! {
                _ = &mut stop => return,
                got = subscribed => got,
            };
            match ps {
                Ok(Ok(mut messages)) => {
                    let Some(board) = ReleaseBoard::upgrade(&weak) else {
                        return;
                    };
                    board.subscribed();
                    drop(board);
                    loop {
                        let msg = tokio::select! {
                            _ = &mut stop => return,
                            msg = messages.next() => msg,
                        };
                        let Some(order) = msg else { break };
                        let Some(board) = ReleaseBoard::upgrade(&weak) else {
                            return;
                        };
                        board.notify(&order);
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
                _ = tokio::time::sleep(Duration::from_millis(config.resubscribe_pause_ms)) => {}
            }
        }
    }
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

    /// What the scripted feed does at each `subscribe`, in turn.
    enum Step {
        Fails,
        /// Never answers (the loop's timeout must end it).
        Hangs,
        /// Subscribed: the messages sent on the other end, ending when it is
        /// dropped.
        Opens(futures::channel::mpsc::UnboundedReceiver<String>),
    }

    /// A feed that follows a script and records when each `subscribe` came.
    struct Scripted {
        steps: std::vec::IntoIter<Step>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl ReleaseFeed for Scripted {
        type Messages = futures::channel::mpsc::UnboundedReceiver<String>;
        type Error = String;

        async fn subscribe(&mut self, channel: &str) -> Result<Self::Messages, String> {
            assert_eq!(channel, "t:released");
            self.calls.lock().unwrap().push(Instant::now());
            match self.steps.next() {
                Some(Step::Fails) => Err("connection refused".into()),
                Some(Step::Opens(rx)) => Ok(rx),
                Some(Step::Hangs) | None => futures::future::pending().await,
            }
        }
    }

    const FAST: SubscriberConfig = SubscriberConfig {
        resubscribe_pause_ms: 40,
        subscribe_timeout_ms: 30,
    };

    /// Starts the loop over `steps`: its task, the stop, and the calls seen.
    fn run(
        steps: Vec<Step>,
        board: &ReleaseBoard,
    ) -> (
        tokio::task::JoinHandle<()>,
        oneshot::Sender<()>,
        Arc<Mutex<Vec<Instant>>>,
    ) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let feed = Scripted {
            steps: steps.into_iter(),
            calls: calls.clone(),
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(subscriber(feed, "t:released".into(), board, FAST, stopped));
        (task, stop, calls)
    }

    /// Waits (a few seconds at most) until `calls` has `n` entries.
    async fn until_calls(calls: &Arc<Mutex<Vec<Instant>>>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while calls.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "subscribe {n} never came");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A subscription wakes every waiter; each message then wakes its order's
    /// waiters only.
    #[tokio::test]
    async fn the_subscriber_wakes_everyone_when_subscribed_then_each_messages_waiters() {
        let board = ReleaseBoard::default();
        let since = Instant::now();
        let b = board.clone();
        let early =
            tokio::spawn(async move { b.released("x", since, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert_eq!(board.waiting(), 1);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let (task, _stop, calls) = run(vec![Step::Opens(rx)], &board);
        until_calls(&calls, 1).await;
        assert!(early.await.unwrap(), "woken by the subscription");

        let since = Instant::now() + Duration::from_millis(1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let b = board.clone();
        let x = tokio::spawn(async move { b.released("x", since, Duration::from_secs(60)).await });
        let b = board.clone();
        let y =
            tokio::spawn(async move { b.released("y", since, Duration::from_millis(200)).await });
        tokio::task::yield_now().await;
        tx.unbounded_send("x".into()).unwrap();
        assert!(x.await.unwrap(), "woken by x's message");
        assert!(!y.await.unwrap(), "nothing released y");
        assert!(!task.is_finished());
    }

    /// A failed subscribe, one that never answers and a stream that ends are
    /// each followed by the pause and a new subscribe, whose success wakes
    /// every waiter again.
    #[tokio::test]
    async fn the_subscriber_subscribes_again_after_the_pause_and_wakes_everyone() {
        let board = ReleaseBoard::default();
        let (tx1, rx1) = futures::channel::mpsc::unbounded();
        let (_tx2, rx2) = futures::channel::mpsc::unbounded();
        let steps = vec![Step::Fails, Step::Hangs, Step::Opens(rx1), Step::Opens(rx2)];
        let (_task, _stop, calls) = run(steps, &board);
        until_calls(&calls, 3).await;
        // A waiter whose acquire was sent after the third subscription.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let since = Instant::now();
        let b = board.clone();
        let w = tokio::spawn(async move { b.released("x", since, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert_eq!(board.waiting(), 1);
        let lost = Instant::now();
        drop(tx1); // the subscription is lost
        until_calls(&calls, 4).await;
        assert!(w.await.unwrap(), "woken by the resubscription");
        let calls = calls.lock().unwrap().clone();
        let pause = Duration::from_millis(FAST.resubscribe_pause_ms);
        let timeout = Duration::from_millis(FAST.subscribe_timeout_ms);
        assert!(calls[1] - calls[0] >= pause, "paused after the failure");
        assert!(
            calls[2] - calls[1] >= timeout + pause,
            "the hanging subscribe timed out, then the pause"
        );
        assert!(calls[3] - lost >= pause, "paused after the stream ended");
    }

    /// `stop` (sent or dropped) ends the loop while subscribed and while
    /// pausing; so does the board going away.
    #[tokio::test]
    async fn the_subscriber_ends_on_stop_or_when_the_board_is_gone() {
        let board = ReleaseBoard::default();
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let (task, stop, calls) = run(vec![Step::Opens(rx)], &board);
        until_calls(&calls, 1).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped while subscribed")
            .unwrap();

        let (task, stop, calls) = run(vec![Step::Fails], &board);
        until_calls(&calls, 1).await;
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped while pausing")
            .unwrap();

        let (tx, rx) = futures::channel::mpsc::unbounded();
        let (task, _stop, calls) = run(vec![Step::Opens(rx)], &board);
        until_calls(&calls, 1).await;
        drop(board);
        tx.unbounded_send("x".into()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ended once the board was gone")
            .unwrap();
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
