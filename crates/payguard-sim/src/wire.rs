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

pub fn instance_host(i: usize) -> String {
    format!("inst{i}")
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbResp {
    Epoch(i64),
    Charged { entry: u64 },
    Replayed { entry: u64 },
    Prepare,
    InsufficientFunds,
    StaleFencingToken,
    NoSuchOrder,
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

    /// Answers `req`. A lost answer is the network's business, not an error.
    pub async fn reply<Q, R: Serialize>(&self, req: &Incoming<Q>, body: R) {
        let bytes = serde_json::to_vec(&Envelope { id: req.id, body }).expect("messages serialise");
        assert!(bytes.len() <= DATAGRAM_BYTES_MAX, "answer too large");
        let _ = self.sock.send_to(&bytes, req.from).await;
    }
}
