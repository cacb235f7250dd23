//! The simulated Redis: the three Lua scripts of `payguard::lock::redis` as one
//! state machine, on the simulated clock, that can be flushed or restarted.
//!
//! Why a model and not a Redis: a real server runs on the wall clock and its own
//! scheduler, so no seed could replay it. The model keeps what the protocol
//! relies on: a script runs atomically (one message at a time), `SET NX PX`
//! expires on time, the counter and the epoch live in one hash (lost together),
//! and `FLUSHALL` or a restart loses every key.

use crate::wire::{now_ms, RedisReq, RedisResp, Server, REDIS_PORT};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

#[derive(Debug, Default)]
pub struct RedisState {
    /// lock key → (owner, expiry in simulated ms). A key past its expiry is absent.
    locks: BTreeMap<String, (String, u64)>,
    /// The `fence` hash's `n` field (HINCRBY creates it at 0).
    fence_n: Option<i64>,
    /// The `fence` hash's `epoch` field.
    fence_epoch: Option<i64>,
    /// For the incarnation check: set by the `ACQUIRE` whose `HINCRBY` created the
    /// counter (to its owner, unique per grant), so each life of the hash has its
    /// own name. payguard's scripts have no such field; nothing else reads it.
    fence_incarnation: Option<String>,
}

impl RedisState {
    /// `FLUSHALL`, or a restart without persistence: every key is gone.
    pub fn flush(&mut self) {
        *self = RedisState::default();
    }

    /// `GET key == owner`, as Redis would answer at `now`.
    pub fn holds(&self, key: &str, owner: &str, now: u64) -> bool {
        matches!(self.locks.get(key), Some((o, until)) if o == owner && *until > now)
    }

    fn raise_epoch(&mut self, fresh: i64) -> RedisResp {
        let cur = self.fence_epoch.unwrap_or(0);
        if fresh > cur {
            self.fence_epoch = Some(fresh);
            RedisResp::Epoch(fresh)
        } else {
            RedisResp::Epoch(cur)
        }
    }

    /// Runs one script at `now`.
    pub fn exec(&mut self, req: &RedisReq, now: u64) -> RedisResp {
        match req {
            RedisReq::Acquire { key, owner, ttl_ms } => {
                if matches!(self.locks.get(key), Some((_, until)) if *until > now) {
                    return RedisResp::Acquired(None);
                }
                self.locks
                    .insert(key.clone(), (owner.clone(), now + ttl_ms));
                let n = self.fence_n.unwrap_or(0) + 1;
                self.fence_n = Some(n);
                if n == 1 {
                    self.fence_incarnation = Some(owner.clone());
                }
                RedisResp::Acquired(Some((n, self.fence_epoch, self.fence_incarnation.clone())))
            }
            RedisReq::RaiseEpoch { fresh } => self.raise_epoch(*fresh),
            RedisReq::RaiseEpochIfSame { fresh, incarnation } => {
                if self.fence_incarnation.as_ref() == Some(incarnation) {
                    self.raise_epoch(*fresh)
                } else {
                    RedisResp::Refused
                }
            }
            RedisReq::ResetCounter => {
                self.fence_n = Some(1);
                RedisResp::Done
            }
            RedisReq::Release { key, owner } => {
                let mine = self.holds(key, owner, now);
                if mine {
                    self.locks.remove(key);
                }
                RedisResp::Released(mine)
            }
        }
    }
}

/// The Redis host's software. A (re)start begins with no keys.
pub async fn serve(state: Rc<RefCell<RedisState>>) -> turmoil::Result {
    state.borrow_mut().flush();
    let server = Server::bind(REDIS_PORT).await?;
    loop {
        let req = server.recv::<RedisReq>().await?;
        let resp = state.borrow_mut().exec(&req.body, now_ms());
        server.reply(&req, resp).await;
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
}
