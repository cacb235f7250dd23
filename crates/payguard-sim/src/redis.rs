//! The simulated Redis: the Lua scripts of `payguard::lock::redis`
//! (`ACQUIRE_MANY`, `RAISE_EPOCH`, `RELEASE_MANY`) as one state machine on the
//! simulated clock, with the `released` pub/sub channel; it can be flushed or
//! restarted.
//!
//! Why a model and not a Redis: a real server runs on the wall clock and its own
//! scheduler, so no seed could replay it, and the scripts are Lua, which this
//! process does not run. The model follows each script line by line (the
//! comments name the Redis command each step stands for) and keeps what the
//! protocol relies on: a script runs atomically (one message at a time), `SET NX
//! PX` expires on time, the counter, the epoch and the incarnation live in one
//! hash (lost together), `FLUSHALL` or a restart loses every key, and a published
//! message reaches the subscribers Redis knows of at that moment, at most once: a
//! restart forgets every subscription (a flush does not), and a message to an
//! instance that is down or cut off is lost. A divergence between a script and
//! this model is not caught here: `crates/payguard/tests/fencing.rs` runs the
//! real scripts.

use crate::wire::{now_ms, Post, Server, REDIS_PORT};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// The commands, one message each.
#[derive(Debug, Clone)]
pub enum RedisReq {
    /// `ACQUIRE_MANY`: for each order, its settled hint if asked for and
    /// present, else `SET lock NX PX ttl` (+ `HINCRBY fence n 1`), else the
    /// holder's PTTL and a waiter marker that outlives it by `grace_ms`.
    AcquireMany {
        orders: Vec<String>,
        owner: String,
        ttl_ms: u64,
        grace_ms: u64,
        hints: Vec<bool>,
    },
    /// `RAISE_EPOCH`: the epoch only upward, only on the incarnation `inc`.
    RaiseEpoch { fresh: i64, inc: String },
    /// `RELEASE_MANY`: compare-and-delete of each `(order, settled)` lock of
    /// `owner`, leaving the settled hint for `hint_ms` where flagged, and
    /// publishing the order where somebody waits.
    ReleaseMany {
        owner: String,
        items: Vec<(String, bool)>,
        hint_ms: u64,
    },
    /// `SUBSCRIBE released` from the sender's socket.
    Subscribe,
    /// The old bug (fixed in e03f2f7), sent by the client after raising the
    /// epoch: `HSET fence n 1`, racing with grants already made under it.
    ResetCounter,
}

/// `ACQUIRE_MANY`'s answer, as the Lua returns it: the epoch, the incarnation,
/// and per order `n >= 1` (granted with counter n), `0` (settled hint), or
/// `-left - 1` (held elsewhere for `left` more ms).
pub type AcquireAnswer = (Option<i64>, Option<String>, Vec<i64>);

#[derive(Debug, Clone)]
pub enum RedisResp {
    Acquired(AcquireAnswer),
    /// `RAISE_EPOCH`: the epoch in force, or `None` (another incarnation).
    Raised(Option<i64>),
    /// `RELEASE_MANY`: 1 per lock freed, 0 per lock no longer the owner's.
    Released(Vec<i64>),
    /// `SUBSCRIBE` took: `run` names the Redis process (a restart changes it).
    Subscribed {
        run: u64,
    },
    /// A message on the `released` channel.
    Message {
        order: String,
    },
    /// `ResetCounter` done.
    Done,
}

/// The `fence` hash.
#[derive(Debug, Clone, Default)]
struct Fence {
    n: i64,
    epoch: Option<i64>,
    /// The owner of the grant that created the hash (`inc`).
    inc: Option<String>,
}

/// Every key: what `FLUSHALL` empties. A key past its expiry is absent.
#[derive(Debug, Default)]
struct Keys {
    /// order → (owner, expiry ms).
    locks: BTreeMap<String, (String, u64)>,
    /// order → expiry ms of its waiter marker (`:w`).
    markers: BTreeMap<String, u64>,
    /// order → expiry ms of its settled hint (`:s`).
    hints: BTreeMap<String, u64>,
    fence: Option<Fence>,
}

fn live(map: &BTreeMap<String, u64>, key: &str, now: u64) -> bool {
    map.get(key).is_some_and(|until| *until > now)
}

#[derive(Debug, Default)]
pub struct RedisState {
    keys: Keys,
    /// Sockets subscribed to `released`. A restart forgets them; a flush does not.
    subscribers: BTreeSet<SocketAddr>,
    /// Which process this is: changes at every (re)start.
    run: u64,
    /// Orders published by the last script, for [`serve`] to push.
    outbox: Vec<String>,
    /// Grants made so far (for the stats).
    pub grants: u64,
}

impl RedisState {
    /// `FLUSHALL`: every key is gone; subscriptions stay.
    pub fn flush(&mut self) {
        self.keys = Keys::default();
    }

    /// A restart without persistence: every key and every subscription is gone.
    pub fn restart(&mut self) {
        self.flush();
        self.subscribers.clear();
        self.outbox.clear();
        self.run += 1;
    }

    /// Runs one script at `now`; `from` is the sender (for `SUBSCRIBE`).
    pub fn exec(&mut self, req: &RedisReq, from: Option<SocketAddr>, now: u64) -> RedisResp {
        match req {
            RedisReq::AcquireMany {
                orders,
                owner,
                ttl_ms,
                grace_ms,
                hints,
            } => RedisResp::Acquired(
                self.acquire_many(orders, owner, *ttl_ms, *grace_ms, hints, now),
            ),
            RedisReq::RaiseEpoch { fresh, inc } => RedisResp::Raised(self.raise_epoch(*fresh, inc)),
            RedisReq::ReleaseMany {
                owner,
                items,
                hint_ms,
            } => RedisResp::Released(self.release_many(owner, items, *hint_ms, now)),
            RedisReq::Subscribe => {
                if let Some(from) = from {
                    self.subscribers.insert(from);
                }
                RedisResp::Subscribed { run: self.run }
            }
            RedisReq::ResetCounter => {
                self.keys.fence.get_or_insert_with(Fence::default).n = 1;
                RedisResp::Done
            }
        }
    }

    /// `GET lock == owner`, as Redis would answer at `now` (for the oracle).
    pub fn holds(&self, order: &str, owner: &str, now: u64) -> bool {
        matches!(self.keys.locks.get(order), Some((o, until)) if o == owner && *until > now)
    }

    fn acquire_many(
        &mut self,
        orders: &[String],
        owner: &str,
        ttl_ms: u64,
        grace_ms: u64,
        hints: &[bool],
        now: u64,
    ) -> AcquireAnswer {
        let mut out = Vec::with_capacity(orders.len());
        for (k, order) in orders.iter().enumerate() {
            // ARGV[3 + k] == '1' and EXISTS :s
            if hints.get(k) == Some(&true) && live(&self.keys.hints, order, now) {
                out.push(0);
                continue;
            }
            let held = self.keys.locks.get(order).filter(|(_, until)| *until > now);
            match held {
                None => {
                    // SET lock owner NX PX ttl; HINCRBY fence n 1
                    self.keys
                        .locks
                        .insert(order.clone(), (owner.to_owned(), now + ttl_ms));
                    let fence = self.keys.fence.get_or_insert_with(Fence::default);
                    fence.n += 1;
                    if fence.n == 1 {
                        fence.inc = Some(owner.to_owned());
                    }
                    self.grants += 1;
                    out.push(fence.n);
                }
                Some((_, until)) => {
                    // PTTL; SET :w 1 PX left + grace
                    let left = until - now;
                    self.keys
                        .markers
                        .insert(order.clone(), now + left + grace_ms);
                    out.push(-(left as i64) - 1);
                }
            }
        }
        let fence = self.keys.fence.as_ref();
        (
            fence.and_then(|f| f.epoch),
            fence.and_then(|f| f.inc.clone()),
            out,
        )
    }

    fn raise_epoch(&mut self, fresh: i64, inc: &str) -> Option<i64> {
        // (HGET fence inc or '') ~= ARGV[2]
        let current_inc = self.keys.fence.as_ref().and_then(|f| f.inc.as_deref());
        if current_inc.unwrap_or("") != inc {
            return None;
        }
        let fence = self.keys.fence.get_or_insert_with(Fence::default);
        let cur = fence.epoch.unwrap_or(0);
        if fresh > cur {
            fence.epoch = Some(fresh);
            Some(fresh)
        } else {
            Some(cur)
        }
    }

    fn release_many(
        &mut self,
        owner: &str,
        items: &[(String, bool)],
        hint_ms: u64,
        now: u64,
    ) -> Vec<i64> {
        let mut out = Vec::with_capacity(items.len());
        for (order, settled) in items {
            let mine = matches!(self.keys.locks.get(order), Some((o, until)) if o == owner && *until > now);
            if !mine {
                out.push(0);
                continue;
            }
            if *settled {
                self.keys.hints.insert(order.clone(), now + hint_ms);
            }
            self.keys.locks.remove(order);
            // DEL :w == 1 → PUBLISH
            if self
                .keys
                .markers
                .remove(order)
                .is_some_and(|until| until > now)
            {
                self.outbox.push(order.clone());
            }
            out.push(1);
        }
        out
    }

    /// The orders published since the last call.
    pub fn take_published(&mut self) -> Vec<String> {
        std::mem::take(&mut self.outbox)
    }
}

/// The Redis state of a seed: its host runs the scripts on it; the run loop
/// flushes it; the oracle reads whether a lock is still held.
pub type SharedRedis = Arc<Mutex<RedisState>>;

pub fn lock(state: &SharedRedis) -> MutexGuard<'_, RedisState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Redis host's software. A (re)start begins with no keys and no subscribers.
pub async fn serve(post: Post, state: SharedRedis) -> turmoil::Result {
    lock(&state).restart();
    let server = Server::bind(post, REDIS_PORT).await?;
    loop {
        let req = server.recv().await?;
        let Some(body) = req.body.downcast_ref::<RedisReq>().cloned() else {
            continue;
        };
        let resp = lock(&state).exec(&body, Some(req.from()), now_ms());
        server.reply(&req, Box::new(resp)).await;
        let published = lock(&state).take_published();
        let subscribers: Vec<SocketAddr> = lock(&state).subscribers.iter().copied().collect();
        for order in published {
            for &to in &subscribers {
                server
                    .push(
                        to,
                        Box::new(RedisResp::Message {
                            order: order.clone(),
                        }),
                    )
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(
        r: &mut RedisState,
        orders: &[&str],
        owner: &str,
        hints: &[bool],
        now: u64,
    ) -> AcquireAnswer {
        match r.exec(
            &RedisReq::AcquireMany {
                orders: orders.iter().map(|o| o.to_string()).collect(),
                owner: owner.into(),
                ttl_ms: 10,
                grace_ms: 5,
                hints: hints.to_vec(),
            },
            None,
            now,
        ) {
            RedisResp::Acquired(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn release(r: &mut RedisState, items: &[(&str, bool)], owner: &str, now: u64) -> Vec<i64> {
        match r.exec(
            &RedisReq::ReleaseMany {
                owner: owner.into(),
                items: items.iter().map(|(o, s)| (o.to_string(), *s)).collect(),
                hint_ms: 100,
            },
            None,
            now,
        ) {
            RedisResp::Released(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// The cross-wise batches of issue #12: nothing waits, each is told busy
    /// with the PTTL, and a release somebody waits for is published.
    #[test]
    fn acquire_many_never_waits_and_a_release_someone_waits_for_is_published() {
        let mut r = RedisState::default();
        assert_eq!(acquire(&mut r, &["x"], "A", &[false], 0).2, [1]);
        assert_eq!(acquire(&mut r, &["y"], "B", &[false], 0).2, [2]);
        assert_eq!(
            acquire(&mut r, &["y", "z"], "A2", &[false, false], 4).2,
            [-7, 3]
        );
        assert_eq!(
            release(&mut r, &[("x", false), ("y", false)], "A", 6),
            [1, 0]
        );
        assert!(r.take_published().is_empty(), "nobody waited for x");
        assert_eq!(release(&mut r, &[("y", true)], "B", 7), [1]);
        assert_eq!(r.take_published(), ["y"]);
        // y's settled hint answers an acquire that asks for it, and only that one.
        assert_eq!(
            acquire(&mut r, &["y", "y2"], "C", &[true, true], 8).2,
            [0, 4]
        );
        assert_eq!(acquire(&mut r, &["y"], "C", &[false], 8).2, [5]);
    }

    /// A flush loses the counter, the epoch and the incarnation together; a raise
    /// carrying the incarnation from before the flush is refused.
    #[test]
    fn a_raise_delayed_across_a_flush_is_refused() {
        let mut r = RedisState::default();
        let (epoch, inc, n) = acquire(&mut r, &["x"], "A", &[false], 0);
        assert_eq!((epoch, n), (None, vec![1]));
        let inc = inc.expect("the grant created the hash");
        r.flush();
        let (_, inc2, _) = acquire(&mut r, &["y"], "B", &[false], 1);
        assert_eq!(
            r.exec(&RedisReq::RaiseEpoch { fresh: 5, inc }, None, 1)
                .clone_epoch(),
            None
        );
        let inc2 = inc2.expect("re-created");
        assert_eq!(
            r.exec(
                &RedisReq::RaiseEpoch {
                    fresh: 6,
                    inc: inc2.clone()
                },
                None,
                1
            )
            .clone_epoch(),
            Some(6)
        );
        assert_eq!(
            r.exec(
                &RedisReq::RaiseEpoch {
                    fresh: 4,
                    inc: inc2
                },
                None,
                1
            )
            .clone_epoch(),
            Some(6),
            "the epoch only rises"
        );
    }

    impl RedisResp {
        fn clone_epoch(&self) -> Option<i64> {
            match self {
                RedisResp::Raised(e) => *e,
                other => panic!("{other:?}"),
            }
        }
    }
}
