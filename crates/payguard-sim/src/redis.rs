//! The simulated Redis: the Lua scripts of `payguard::lock::redis` (`ACQUIRE`,
//! `RAISE_EPOCH`, `RELEASE`, and issue #12's `ACQUIRE_MANY` and `RELEASE_MANY`)
//! as one state machine on the simulated clock, with the `released` pub/sub
//! channel; it can be flushed or restarted.
//!
//! Why a model and not a Redis: a real server runs on the wall clock and its own
//! scheduler, so no seed could replay it. The model keeps what the protocol
//! relies on: a script runs atomically (one message at a time), `SET NX PX`
//! expires on time, the counter and the epoch live in one hash (lost together),
//! `FLUSHALL` or a restart loses every key, and a published message reaches the
//! subscribers Redis knows of at that moment, at most once: a restart forgets
//! every subscription (a flush does not), and a message to an instance that is
//! down or cut off is lost.

use crate::wire::{lock_key, now_ms, waiter_key, RedisReq, RedisResp, Server, Slot, REDIS_PORT};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::rc::Rc;

/// Every key: what `FLUSHALL` empties.
#[derive(Debug, Default)]
struct Keys {
    /// lock key → (owner, expiry in simulated ms). A key past its expiry is absent.
    locks: BTreeMap<String, (String, u64)>,
    /// waiter marker key → expiry in simulated ms.
    markers: BTreeMap<String, u64>,
    /// The `fence` hash's `n` field (HINCRBY creates it at 0).
    fence_n: Option<i64>,
    /// The `fence` hash's `epoch` field.
    fence_epoch: Option<i64>,
    /// For the incarnation check: set by the grant whose `HINCRBY` created the
    /// counter (to its owner, unique per grant), so each life of the hash has its
    /// own name (payguard's `inc` field).
    fence_incarnation: Option<String>,
}

#[derive(Debug, Default)]
pub struct RedisState {
    keys: Keys,
    /// Sockets subscribed to `released`. A restart forgets them; a flush does not.
    subscribers: BTreeSet<SocketAddr>,
    /// Which process this is: changes at every (re)start.
    run: u64,
    /// Orders published by the last script, for [`serve`] to push. Drained after
    /// each script, so it holds at most one batch's orders.
    outbox: Vec<String>,
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

    /// `GET key == owner`, as Redis would answer at `now`.
    pub fn holds(&self, key: &str, owner: &str, now: u64) -> bool {
        matches!(self.keys.locks.get(key), Some((o, until)) if o == owner && *until > now)
    }

    /// The orders published since the last call.
    pub fn take_published(&mut self) -> Vec<String> {
        std::mem::take(&mut self.outbox)
    }

    /// `SUBSCRIBE released` from `from`; answers which process took it.
    pub fn subscribe(&mut self, from: SocketAddr) -> RedisResp {
        self.subscribers.insert(from);
        RedisResp::Subscribed { run: self.run }
    }

    fn raise_epoch(&mut self, fresh: i64) -> RedisResp {
        let cur = self.keys.fence_epoch.unwrap_or(0);
        if fresh > cur {
            self.keys.fence_epoch = Some(fresh);
            RedisResp::Epoch(fresh)
        } else {
            RedisResp::Epoch(cur)
        }
    }

    /// `SET key owner NX PX ttl` and, when granted, `HINCRBY fence n 1`: the
    /// counter value, or the holder's PTTL.
    fn set_nx(&mut self, key: &str, owner: &str, ttl_ms: u64, now: u64) -> Slot {
        if let Some((_, until)) = self.keys.locks.get(key).filter(|(_, u)| *u > now) {
            return Slot::Busy {
                pttl_ms: until - now,
            };
        }
        self.keys
            .locks
            .insert(key.to_owned(), (owner.to_owned(), now + ttl_ms));
        let n = self.keys.fence_n.unwrap_or(0) + 1;
        self.keys.fence_n = Some(n);
        if n == 1 {
            self.keys.fence_incarnation = Some(owner.to_owned());
        }
        Slot::Granted(n)
    }

    /// Compare-and-delete.
    fn release(&mut self, key: &str, owner: &str, now: u64) -> bool {
        let mine = self.holds(key, owner, now);
        if mine {
            self.keys.locks.remove(key);
        }
        mine
    }

    fn acquire_many(&mut self, orders: &[String], owner: &str, ttl_ms: u64, now: u64) -> RedisResp {
        let mut slots = Vec::with_capacity(orders.len());
        for order in orders {
            let slot = self.set_nx(&lock_key(order), owner, ttl_ms, now);
            if let Slot::Busy { pttl_ms } = slot {
                // The marker lives as long as the holder's lease: only that
                // holder's release could publish, and only while it holds.
                self.keys.markers.insert(waiter_key(order), now + pttl_ms);
            }
            slots.push(slot);
        }
        RedisResp::AcquiredMany {
            slots,
            epoch: self.keys.fence_epoch,
            incarnation: self.keys.fence_incarnation.clone(),
        }
    }

    fn release_many(&mut self, orders: &[String], owner: &str, now: u64) -> RedisResp {
        let mut released = Vec::with_capacity(orders.len());
        for order in orders {
            let mine = self.release(&lock_key(order), owner, now);
            if mine {
                let marker = self.keys.markers.remove(&waiter_key(order));
                if marker.is_some_and(|until| until > now) {
                    self.outbox.push(order.clone());
                }
            }
            released.push(mine);
        }
        RedisResp::ReleasedMany(released)
    }

    /// Runs one script at `now`.
    pub fn exec(&mut self, req: &RedisReq, now: u64) -> RedisResp {
        match req {
            RedisReq::Acquire { key, owner, ttl_ms } => match self.set_nx(key, owner, *ttl_ms, now)
            {
                Slot::Busy { .. } => RedisResp::Acquired(None),
                Slot::Granted(n) => RedisResp::Acquired(Some((
                    n,
                    self.keys.fence_epoch,
                    self.keys.fence_incarnation.clone(),
                ))),
            },
            RedisReq::RaiseEpoch { fresh } => self.raise_epoch(*fresh),
            RedisReq::RaiseEpochIfSame { fresh, incarnation } => {
                if self.keys.fence_incarnation.as_ref() == Some(incarnation) {
                    self.raise_epoch(*fresh)
                } else {
                    RedisResp::Refused
                }
            }
            RedisReq::ResetCounter => {
                self.keys.fence_n = Some(1);
                RedisResp::Done
            }
            RedisReq::Release { key, owner } => RedisResp::Released(self.release(key, owner, now)),
            RedisReq::AcquireMany {
                orders,
                owner,
                ttl_ms,
            } => self.acquire_many(orders, owner, *ttl_ms, now),
            RedisReq::ReleaseMany { orders, owner } => self.release_many(orders, owner, now),
            // Needs the sender's address: see `serve`.
            RedisReq::Subscribe => RedisResp::Refused,
        }
    }
}

/// The Redis host's software. A (re)start begins with no keys and no subscribers.
pub async fn serve(state: Rc<RefCell<RedisState>>) -> turmoil::Result {
    state.borrow_mut().restart();
    let server = Server::bind(REDIS_PORT).await?;
    loop {
        let req = server.recv::<RedisReq>().await?;
        let resp = match req.body {
            RedisReq::Subscribe => state.borrow_mut().subscribe(req.from()),
            _ => state.borrow_mut().exec(&req.body, now_ms()),
        };
        server.reply(&req, resp).await;
        let published = state.borrow_mut().take_published();
        let subscribers: Vec<SocketAddr> = state.borrow().subscribers.iter().copied().collect();
        for order in published {
            for &to in &subscribers {
                server
                    .push(
                        to,
                        RedisResp::Message {
                            order: order.clone(),
                        },
                    )
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(r: &mut RedisState, key: &str, owner: &str, now: u64) -> RedisResp {
        r.exec(
            &RedisReq::Acquire {
                key: key.into(),
                owner: owner.into(),
                ttl_ms: 10,
            },
            now,
        )
    }

    #[test]
    fn set_nx_px_counts_grants_and_expires() {
        let mut r = RedisState::default();
        assert!(matches!(
            acquire(&mut r, "k", "a", 0),
            RedisResp::Acquired(Some((1, None, _)))
        ));
        assert!(matches!(
            acquire(&mut r, "k", "b", 9),
            RedisResp::Acquired(None)
        ));
        assert!(matches!(
            acquire(&mut r, "k", "b", 10),
            RedisResp::Acquired(Some((2, None, _)))
        ));
        assert!(matches!(
            r.exec(
                &RedisReq::Release {
                    key: "k".into(),
                    owner: "a".into()
                },
                11
            ),
            RedisResp::Released(false)
        ));
        assert!(r.holds("k", "b", 11));
    }

    #[test]
    fn the_epoch_only_rises_and_a_flush_loses_it_with_the_counter() {
        let mut r = RedisState::default();
        assert!(matches!(
            r.exec(&RedisReq::RaiseEpoch { fresh: 5 }, 0),
            RedisResp::Epoch(5)
        ));
        assert!(matches!(
            r.exec(&RedisReq::RaiseEpoch { fresh: 3 }, 0),
            RedisResp::Epoch(5)
        ));
        acquire(&mut r, "k", "a", 0);
        r.flush();
        assert!(matches!(
            acquire(&mut r, "k", "b", 1),
            RedisResp::Acquired(Some((1, None, _)))
        ));
    }

    fn acquire_many(r: &mut RedisState, orders: &[&str], owner: &str, now: u64) -> Vec<Slot> {
        match r.exec(
            &RedisReq::AcquireMany {
                orders: orders.iter().map(|o| o.to_string()).collect(),
                owner: owner.into(),
                ttl_ms: 10,
            },
            now,
        ) {
            RedisResp::AcquiredMany { slots, .. } => slots,
            other => panic!("{other:?}"),
        }
    }

    fn release_many(r: &mut RedisState, orders: &[&str], owner: &str, now: u64) -> Vec<bool> {
        match r.exec(
            &RedisReq::ReleaseMany {
                orders: orders.iter().map(|o| o.to_string()).collect(),
                owner: owner.into(),
            },
            now,
        ) {
            RedisResp::ReleasedMany(released) => released,
            other => panic!("{other:?}"),
        }
    }

    /// The cross-wise batches of issue #12: A holds x, B holds y, and each next
    /// batch wants the other's. Nothing waits: each is told busy (with the PTTL),
    /// and each release is published because someone is waiting for it.
    #[test]
    fn acquire_many_never_waits_and_a_release_someone_waits_for_is_published() {
        let mut r = RedisState::default();
        assert_eq!(acquire_many(&mut r, &["x"], "A", 0), [Slot::Granted(1)]);
        assert_eq!(acquire_many(&mut r, &["y"], "B", 0), [Slot::Granted(2)]);
        assert_eq!(
            acquire_many(&mut r, &["y", "z"], "A2", 4),
            [Slot::Busy { pttl_ms: 6 }, Slot::Granted(3)]
        );
        assert_eq!(
            acquire_many(&mut r, &["x"], "B2", 5),
            [Slot::Busy { pttl_ms: 5 }]
        );
        // A releases x (and has no right to y): x's waiter hears of it.
        assert_eq!(release_many(&mut r, &["x", "y"], "A", 6), [true, false]);
        assert_eq!(r.take_published(), ["x"]);
        // B releases y; z was nobody's wait: only y is published.
        assert_eq!(release_many(&mut r, &["y"], "B", 7), [true]);
        assert_eq!(release_many(&mut r, &["z"], "A2", 7), [true]);
        assert_eq!(r.take_published(), ["y"]);
        // The marker went with the announcement: the next release is silent.
        assert_eq!(acquire_many(&mut r, &["x"], "C", 8), [Slot::Granted(4)]);
        assert_eq!(release_many(&mut r, &["x"], "C", 8), [true]);
        assert!(r.take_published().is_empty());
    }

    #[test]
    fn a_marker_outlives_no_lease_and_an_expired_holder_publishes_nothing() {
        let mut r = RedisState::default();
        acquire_many(&mut r, &["x"], "A", 0);
        acquire_many(&mut r, &["x"], "B", 3);
        // A's lease ended at 10: its release is refused and announces nothing.
        assert_eq!(release_many(&mut r, &["x"], "A", 10), [false]);
        assert!(r.take_published().is_empty());
        // B takes the expired lock; the marker expired with A's lease.
        assert_eq!(acquire_many(&mut r, &["x"], "B", 10), [Slot::Granted(2)]);
        assert_eq!(release_many(&mut r, &["x"], "B", 11), [true]);
        assert!(r.take_published().is_empty());
    }

    #[test]
    fn one_epoch_per_batch_and_a_flush_keeps_subscribers_but_a_restart_does_not() {
        let mut r = RedisState::default();
        let addr: SocketAddr = "10.0.0.1:8081".parse().expect("an address");
        assert!(matches!(
            r.subscribe(addr),
            RedisResp::Subscribed { run: 0 }
        ));
        r.exec(&RedisReq::RaiseEpoch { fresh: 7 }, 0);
        let got = r.exec(
            &RedisReq::AcquireMany {
                orders: vec!["x".into(), "y".into()],
                owner: "A".into(),
                ttl_ms: 10,
            },
            0,
        );
        assert!(matches!(
            got,
            RedisResp::AcquiredMany { ref slots, epoch: Some(7), .. }
                if *slots == [Slot::Granted(1), Slot::Granted(2)]
        ));
        r.flush();
        assert_eq!(r.subscribers.len(), 1);
        assert_eq!(acquire_many(&mut r, &["x"], "B", 1), [Slot::Granted(1)]);
        r.restart();
        assert!(r.subscribers.is_empty());
        assert!(matches!(
            r.subscribe(addr),
            RedisResp::Subscribed { run: 1 }
        ));
    }
}
