//! The simulated network: a request/answer call over turmoil's UDP, and the
//! bridge that lets payguard's engine (whose futures must be `Send`) make
//! such calls.
//!
//! Why UDP: turmoil drops, delays and partitions datagrams, which is exactly the
//! uncertainty a real client of Redis or PostgreSQL lives with: a call that times
//! out may or may not have been applied. Each call binds a fresh ephemeral socket
//! and matches the answer by id, so a late answer to an earlier call is ignored.
//!
//! Why a [`Post`]: what travels is payguard's own values (`Command`,
//! `OpResult`, ...), not bytes. A datagram carries only a call id and a parcel
//! number; the value waits in the seed's post office until the datagram that
//! names it is delivered. The network decides whether and when it arrives; the
//! bytes would add nothing. A parcel whose datagram is lost is never collected.
//!
//! Why an [`Agent`]: turmoil's sockets may only be used from their host's
//! thread-local tasks (they are not `Sync`), while the engine's tasks, its
//! `Store` and its lock service must be `Send`. Each instance runs one agent
//! task that does the socket work; the engine's side hands it calls over a
//! channel and waits for the answer.

use std::any::Any;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use turmoil::net::UdpSocket;

pub const REDIS_HOST: &str = "redis";
pub const DB_HOST: &str = "db";
pub const CLIENT_HOST: &str = "clients";
pub const REDIS_PORT: u16 = 6379;
pub const DB_PORT: u16 = 5432;
pub const INSTANCE_PORT: u16 = 8080;
/// Where an instance's `released` subscription listens (Redis pushes to it).
pub const SUBSCRIBER_PORT: u16 = 8081;
/// A datagram: the call id and the parcel number, little-endian.
const DATAGRAM_BYTES: usize = 16;

pub fn instance_host(i: usize) -> String {
    format!("inst{i}")
}

/// The simulated clock, in milliseconds since the simulation started.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

/// Any value a host sends.
pub type Parcel = Box<dyn Any + Send>;

/// The seed's post office: parcels waiting for their datagram. One per seed,
/// shared by every host (all of them run on one thread, in turn).
#[derive(Clone, Default)]
pub struct Post {
    inner: Arc<Mutex<PostInner>>,
}

#[derive(Default)]
struct PostInner {
    /// The last parcel number and call id handed out.
    last: u64,
    parcels: BTreeMap<u64, Parcel>,
}

impl Post {
    fn lock(&self) -> std::sync::MutexGuard<'_, PostInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A number no other parcel or call of this seed has.
    pub fn next_id(&self) -> u64 {
        let mut p = self.lock();
        p.last += 1;
        p.last
    }

    fn put(&self, parcel: Parcel) -> u64 {
        let id = self.next_id();
        self.lock().parcels.insert(id, parcel);
        id
    }

    fn take(&self, id: u64) -> Option<Parcel> {
        self.lock().parcels.remove(&id)
    }

    fn datagram(call: u64, parcel: u64) -> [u8; DATAGRAM_BYTES] {
        let mut d = [0u8; DATAGRAM_BYTES];
        d[..8].copy_from_slice(&call.to_le_bytes());
        d[8..].copy_from_slice(&parcel.to_le_bytes());
        d
    }

    fn parse(d: &[u8]) -> Option<(u64, u64)> {
        if d.len() != DATAGRAM_BYTES {
            return None;
        }
        let call = u64::from_le_bytes(d[..8].try_into().ok()?);
        let parcel = u64::from_le_bytes(d[8..].try_into().ok()?);
        Some((call, parcel))
    }
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

/// Sends `req` to `host:port` and waits up to `timeout` for its answer. Must
/// run on a host's own task (see [`Agent`] for the engine's side).
pub async fn call(
    post: &Post,
    host: &str,
    port: u16,
    req: Parcel,
    timeout: Duration,
) -> Result<Parcel, CallError> {
    let io = |e: std::io::Error| CallError::Io(e.to_string());
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(io)?;
    let id = post.next_id();
    let parcel = post.put(req);
    sock.send_to(&Post::datagram(id, parcel), (host, port))
        .await
        .map_err(io)?;
    let wait = async {
        let mut buf = [0u8; DATAGRAM_BYTES];
        loop {
            let (n, _) = sock.recv_from(&mut buf).await.map_err(io)?;
            match Post::parse(&buf[..n]) {
                Some((call, parcel)) if call == id => {
                    return post
                        .take(parcel)
                        .ok_or_else(|| CallError::Io("an answer without its parcel".into()));
                }
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
    post: Post,
}

/// One received request, and where its answer goes.
pub struct Incoming {
    pub body: Parcel,
    call: u64,
    from: SocketAddr,
}

impl Incoming {
    /// The sender's socket.
    pub fn from(&self) -> SocketAddr {
        self.from
    }
}

impl Server {
    pub async fn bind(post: Post, port: u16) -> std::io::Result<Server> {
        Ok(Server {
            sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?,
            post,
        })
    }

    /// The next request whose parcel is there.
    pub async fn recv(&self) -> std::io::Result<Incoming> {
        let mut buf = [0u8; DATAGRAM_BYTES];
        loop {
            let (n, from) = self.sock.recv_from(&mut buf).await?;
            if let Some((call, parcel)) = Post::parse(&buf[..n]) {
                if let Some(body) = self.post.take(parcel) {
                    return Ok(Incoming { body, call, from });
                }
            }
        }
    }

    /// Answers `req`. A lost answer is the network's business, not an error.
    pub async fn reply(&self, req: &Incoming, body: Parcel) {
        self.send(req.from, req.call, body).await;
    }

    /// Sends `body` to `to` unasked (a pub/sub push, call id 0); lost is lost.
    pub async fn push(&self, to: SocketAddr, body: Parcel) {
        self.send(to, 0, body).await;
    }

    async fn send(&self, to: SocketAddr, call: u64, body: Parcel) {
        let parcel = self.post.put(body);
        let _ = self.sock.send_to(&Post::datagram(call, parcel), to).await;
    }
}

/// A subscriber's socket: sends requests to one server from a fixed port and
/// receives both their answers and the pushes.
pub struct Subscription {
    sock: UdpSocket,
    post: Post,
}

impl Subscription {
    pub async fn bind(post: Post, port: u16) -> std::io::Result<Subscription> {
        Ok(Subscription {
            sock: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?,
            post,
        })
    }

    /// Sends `body` to `host:port`; its answer comes back through
    /// [`Subscription::recv`] with the returned call id.
    pub async fn send(&self, host: &str, port: u16, body: Parcel) -> std::io::Result<u64> {
        let id = self.post.next_id();
        let parcel = self.post.put(body);
        self.sock
            .send_to(&Post::datagram(id, parcel), (host, port))
            .await?;
        Ok(id)
    }

    /// The next message: `(call id, body)`, call id 0 for a push.
    pub async fn recv(&self) -> std::io::Result<(u64, Parcel)> {
        let mut buf = [0u8; DATAGRAM_BYTES];
        loop {
            let (n, _) = self.sock.recv_from(&mut buf).await?;
            if let Some((call, parcel)) = Post::parse(&buf[..n]) {
                if let Some(body) = self.post.take(parcel) {
                    return Ok((call, body));
                }
            }
        }
    }
}

/// One call handed to an [`Agent`].
struct Job {
    host: &'static str,
    port: u16,
    req: Parcel,
    timeout: Duration,
    answer: oneshot::Sender<Result<Parcel, CallError>>,
}

/// The engine's side of an instance's network: `Send`, cheap to clone. Its
/// calls fail (as a dead connection would) once the instance's agent is gone
/// (the host crashed).
#[derive(Clone)]
pub struct Caller {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Caller {
    /// Calls `host:port` with `req` through the agent; the answer downcast to `R`.
    pub async fn call<Q: Any + Send, R: Any>(
        &self,
        host: &'static str,
        port: u16,
        req: Q,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let (answer, got) = oneshot::channel();
        self.jobs
            .send(Job {
                host,
                port,
                req: Box::new(req),
                timeout,
                answer,
            })
            .map_err(|_| CallError::Io("the instance's network is gone".into()))?;
        let parcel = got
            .await
            .map_err(|_| CallError::Io("the instance's network is gone".into()))??;
        parcel
            .downcast::<R>()
            .map(|r| *r)
            .map_err(|_| CallError::Io("an answer of another type".into()))
    }
}

/// The socket side of an instance's network: runs each call handed to it as a
/// task of the host (see the module docs).
pub struct Agent;

impl Agent {
    /// Starts the agent on the current host; returns the engine's handle.
    pub fn start(post: Post) -> Caller {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        tokio::task::spawn_local(async move {
            while let Some(job) = rx.recv().await {
                let post = post.clone();
                tokio::task::spawn_local(async move {
                    let got = call(&post, job.host, job.port, job.req, job.timeout).await;
                    let _ = job.answer.send(got);
                });
            }
        });
        Caller { jobs }
    }
}

/// A client's request to an instance: what to do to which order, and the
/// Idempotency-Key it carries, if any.
#[derive(Debug, Clone)]
pub struct ApiReq {
    pub order: String,
    pub ask: Ask,
    pub key: Option<String>,
}

/// What a client asks of an order (amounts in minor units), as payguard's
/// HTTP routes would turn them into engine ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    Deduct,
    /// A refund under this refund id.
    Refund {
        id: String,
        amount: i64,
    },
    /// Two-phase: hold the order's amount for this long.
    Authorize {
        hold_ttl_ms: i64,
    },
    /// Take this much of the hold (`None`: all of it).
    Capture {
        amount: Option<i64>,
    },
    Void,
}

impl std::fmt::Display for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ask::Deduct => write!(f, "deduct"),
            Ask::Refund { id, amount } => write!(f, "refund {id} of {amount}"),
            Ask::Authorize { hold_ttl_ms } => write!(f, "authorize for {hold_ttl_ms} ms"),
            Ask::Capture { amount: None } => write!(f, "capture"),
            Ask::Capture { amount: Some(n) } => write!(f, "capture of {n}"),
            Ask::Void => write!(f, "void"),
        }
    }
}

/// An instance's answer: what payguard's HTTP API would say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiResp {
    /// 200, the entry the op wrote (first time): a debit, a refund, a hold, a
    /// capture, a void's release.
    Charged { entry: i64 },
    /// 200 with `"replayed": true`, the same entry.
    Replayed { entry: i64 },
    /// 402.
    InsufficientFunds,
    /// 503: the lock stayed held past the wait limit.
    LockBusy,
    /// 503 naming `stale_fencing_token`: this holder lost its lock.
    StaleFencingToken,
    /// 500 "outcome unknown": may or may not have moved.
    Unknown,
    /// 503: nothing moved (store unavailable, lane queue full, timed out).
    Unavailable,
    /// 404.
    NoSuchOrder,
    /// A definite refusal (409): a refund's `order_not_paid` (it came before
    /// the charge) or `refund_exceeds_paid`; a two-phase step's
    /// `order_not_authorized` (it came before the hold, or the hold was
    /// declined), `capture_exceeds_hold`, or the name of what already ended
    /// the hold (`hold_already_captured`, `hold_voided`, `hold_expired`).
    Conflict { reason: &'static str },
    /// Any other refusal (a 409 or a 422: never expected here).
    Refused,
    /// 422 `idempotency_key_reuse`: the key was used for another request.
    KeyReused,
    /// 409 `idempotency_key_in_use`: the first request with the key is still
    /// in flight (retried, like a 503).
    KeyInUse,
}

impl ApiResp {
    /// A definite answer (200, 402, a 409): the only ones a seed with no fault
    /// may give.
    pub fn is_definite(self) -> bool {
        matches!(
            self,
            ApiResp::Charged { .. }
                | ApiResp::Replayed { .. }
                | ApiResp::InsufficientFunds
                | ApiResp::Conflict { .. }
                | ApiResp::KeyReused
        )
    }
}
