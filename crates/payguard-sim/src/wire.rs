//! Messages between the simulated hosts, and a request/answer call over UDP.
//!
//! Why UDP: turmoil drops, delays and partitions datagrams, which is exactly the
//! uncertainty a real client of Redis or PostgreSQL lives with: a call that times
//! out may or may not have been applied. Each call binds a fresh ephemeral socket
//! and matches the answer by id, so a late answer to an earlier call is ignored.

use crate::config::DATAGRAM_BYTES_MAX;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use turmoil::net::UdpSocket;

pub const REDIS_HOST: &str = "redis";
pub const DB_HOST: &str = "db";
pub const CLIENT_HOST: &str = "clients";
pub const REDIS_PORT: u16 = 6379;
pub const DB_PORT: u16 = 5432;
pub const INSTANCE_PORT: u16 = 8080;
/// Where an instance's `released` subscription listens (Redis pushes to it).
pub const SUBSCRIBER_PORT: u16 = 8081;

pub fn instance_host(i: usize) -> String {
    format!("inst{i}")
}

/// `lock:order:{id}`, the order's lock key.
pub fn lock_key(order: &str) -> String {
    format!("lock:order:{order}")
}

/// `lock:order:{id}:w`, set while an instance waits for the order's lock:
/// its release is then published.
pub fn waiter_key(order: &str) -> String {
    format!("lock:order:{order}:w")
}

/// The simulated clock, in milliseconds since the simulation started.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

/// The commands of `lock/redis.rs`'s Lua scripts, one message each (a script runs
/// atomically in Redis, and the simulated Redis runs one message at a time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RedisReq {
    /// `ACQUIRE`: `SET key owner NX PX ttl`, then `HINCRBY fence n 1`, `HGET fence epoch`.
    Acquire {
        key: String,
        owner: String,
        ttl_ms: u64,
    },
    /// `RAISE_EPOCH`: set `fence.epoch` only upward; answers the epoch in force.
    RaiseEpoch { fresh: i64 },
    /// payguard's `RAISE_EPOCH` (since the simulation found the gap): first checks the
    /// hash is the incarnation the caller's `ACQUIRE` saw, refusing if a flush
    /// has re-created it since.
    RaiseEpochIfSame { fresh: i64, incarnation: String },
    /// The old bug's `SET counter 1` after a new epoch.
    ResetCounter,
    /// `RELEASE`: compare-and-delete.
    Release { key: String, owner: String },
    /// `ACQUIRE_MANY` (issue #12): for each order's lock key `SET NX PX ttl`; a
    /// granted key gets its own `HINCRBY fence n 1`; a held key is reported with
    /// its PTTL and gets a waiter marker (`SET lock:order:{id}:w 1 PX pttl`).
    /// The epoch and the incarnation are read once, after every grant.
    AcquireMany {
        orders: Vec<String>,
        owner: String,
        ttl_ms: u64,
    },
    /// `RELEASE_MANY`: compare-and-delete each lock; where the delete succeeded
    /// and a waiter marker existed, delete the marker and `PUBLISH released {id}`.
    ReleaseMany { orders: Vec<String>, owner: String },
    /// `SUBSCRIBE released` from the sender's socket (not a script; re-sent
    /// periodically, as a client would notice a dropped connection).
    Subscribe,
}

/// One order's fate in `ACQUIRE_MANY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// Granted, with its counter value `n`.
    Granted(i64),
    /// Held by another owner for this much longer.
    Busy { pttl_ms: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RedisResp {
    /// `(n, epoch, incarnation)` when the lock was granted, `None` when it is
    /// held. The incarnation is read by the incarnation check.
    Acquired(Option<(i64, Option<i64>, Option<String>)>),
    Epoch(i64),
    /// `RaiseEpochIfSame` found another incarnation of the hash.
    Refused,
    Done,
    Released(bool),
    /// `ACQUIRE_MANY`'s answer: one slot per order, in order; the epoch and the
    /// incarnation of the fence hash after the grants.
    AcquiredMany {
        slots: Vec<Slot>,
        epoch: Option<i64>,
        incarnation: Option<String>,
    },
    /// `RELEASE_MANY`: whether each lock was still this owner's.
    ReleasedMany(Vec<bool>),
    /// `SUBSCRIBE` took: `run` names the Redis process (a restart drops every
    /// subscription and changes it).
    Subscribed {
        run: u64,
    },
    /// A message on the `released` channel, pushed to every subscriber.
    Message {
        order: String,
    },
}

/// What an instance asks the database; each is one transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DbReq {
    /// `nextval('fence_epochs')`.
    NextFenceEpoch,
    /// payguard's deduct: fence check, status check, the unique debit, the balance.
    Deduct { order: String, token: Option<i64> },
    /// Without the unique debit: the check half of check-then-act (fenced too).
    Read { order: String, token: Option<i64> },
    /// Without the unique debit: the act half, an unconditional debit.
    Debit { order: String, token: Option<i64> },
    /// A lane's batch: its ops in one transaction, each answered on its own (one
    /// refused op does not abort the others).
    Batch(Vec<DbReq>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbResp {
    Epoch(i64),
    Charged {
        entry: u64,
    },
    Replayed {
        entry: u64,
    },
    Prepare,
    InsufficientFunds,
    StaleFencingToken,
    NoSuchOrder,
    /// One answer per op of a [`DbReq::Batch`], in order.
    Batch(Vec<DbResp>),
}

/// A client's request to an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiReq {
    pub order: String,
}

/// An instance's answer: what payguard's HTTP API would say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResp {
    /// 200, the debit entry (first time).
    Charged { entry: u64 },
    /// 200 with `"replayed": true`, the same entry.
    Replayed { entry: u64 },
    /// 402.
    InsufficientFunds,
    /// 503: the lock stayed held past the wait limit.
    LockBusy,
    /// 503 naming `stale_fencing_token`: this holder lost its lock.
    StaleFencingToken,
    /// 503 after the database did not answer in time: may or may not have moved.
    Unknown,
    /// 404.
    NoSuchOrder,
    /// 503: the lane's queue was full.
    Overloaded,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    id: u64,
    body: T,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Timeout,
    Io(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "no answer in time"),
            CallError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Numbers calls from one host, so an answer is matched to its own call.
#[derive(Debug, Default)]
pub struct CallIds(Cell<u64>);

impl CallIds {
    fn next(&self) -> u64 {
        let id = self.0.get() + 1;
        self.0.set(id);
        id
    }
}

/// Sends `req` to `host:port` and waits up to `timeout` for its answer.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    ids: &CallIds,
    host: &str,
    port: u16,
    req: Q,
    timeout: Duration,
) -> Result<R, CallError> {
    let io = |e: std::io::Error| CallError::Io(e.to_string());
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(io)?;
    let id = ids.next();
    let bytes = serde_json::to_vec(&Envelope { id, body: req }).expect("messages serialise");
    assert!(bytes.len() <= DATAGRAM_BYTES_MAX, "request too large");
    sock.send_to(&bytes, (host, port)).await.map_err(io)?;
    let wait = async {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            let (n, _) = sock.recv_from(&mut buf).await.map_err(io)?;
            match serde_json::from_slice::<Envelope<R>>(&buf[..n]) {
                Ok(env) if env.id == id => return Ok(env.body),
                _ => continue,
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or(Err(CallError::Timeout))
}

/// A server's socket: receives requests, answers them.
pub struct Server {
    sock: UdpSocket,
}

/// One received request, and where its answer goes.
pub struct Incoming<Q> {
    pub body: Q,
    id: u64,
    from: SocketAddr,
}

impl<Q> Incoming<Q> {
    /// The sender's socket.
    pub fn from(&self) -> SocketAddr {
        self.from
    }
}

impl Server {
    pub async fn bind(port: u16) -> std::io::Result<Server> {
        Ok(Server {
            sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?,
        })
    }

    /// The next request that decodes (anything else is dropped, as garbage would be).
    pub async fn recv<Q: DeserializeOwned>(&self) -> std::io::Result<Incoming<Q>> {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            let (n, from) = self.sock.recv_from(&mut buf).await?;
            if let Ok(env) = serde_json::from_slice::<Envelope<Q>>(&buf[..n]) {
                return Ok(Incoming {
                    body: env.body,
                    id: env.id,
                    from,
                });
            }
        }
    }

    /// Sends `body` to `to` unasked (a pub/sub push); lost is lost.
    pub async fn push<R: Serialize>(&self, to: SocketAddr, body: R) {
        let bytes = serde_json::to_vec(&Envelope { id: 0, body }).expect("messages serialise");
        assert!(bytes.len() <= DATAGRAM_BYTES_MAX, "push too large");
        let _ = self.sock.send_to(&bytes, to).await;
    }

    /// Answers `req`. A lost answer is the network's business, not an error.
    pub async fn reply<Q, R: Serialize>(&self, req: &Incoming<Q>, body: R) {
        let bytes = serde_json::to_vec(&Envelope { id: req.id, body }).expect("messages serialise");
        assert!(bytes.len() <= DATAGRAM_BYTES_MAX, "answer too large");
        let _ = self.sock.send_to(&bytes, req.from).await;
    }
}

/// A subscriber's socket: sends `SUBSCRIBE` to Redis and receives both its
/// answers and the pushed messages.
pub struct Subscription {
    sock: UdpSocket,
    ids: CallIds,
}

impl Subscription {
    pub async fn bind(port: u16) -> std::io::Result<Subscription> {
        Ok(Subscription {
            sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?,
            ids: CallIds::default(),
        })
    }

    /// Sends `SUBSCRIBE`; its answer comes back through [`Subscription::recv`]
    /// with the returned id.
    pub async fn subscribe(&self) -> std::io::Result<u64> {
        let id = self.ids.next();
        let bytes = serde_json::to_vec(&Envelope {
            id,
            body: RedisReq::Subscribe,
        })
        .expect("messages serialise");
        self.sock.send_to(&bytes, (REDIS_HOST, REDIS_PORT)).await?;
        Ok(id)
    }

    /// The next message from Redis: `(id, body)`, id 0 for a push.
    pub async fn recv(&self) -> std::io::Result<(u64, RedisResp)> {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            let (n, _) = self.sock.recv_from(&mut buf).await?;
            if let Ok(env) = serde_json::from_slice::<Envelope<RedisResp>>(&buf[..n]) {
                return Ok((env.id, env.body));
            }
        }
    }
}
