//! A loopback TCP fault proxy for tests: between payguard and PostgreSQL or Redis,
//! it resets, delays, blackholes or half-opens connections on command.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the bytes it carries, switched at any moment for every
/// connection, open or new (tc netem does not work on these machines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward as they come.
    Pass,
    /// Hold every chunk this long before forwarding it (each direction).
    Latency(Duration),
    /// Forward nothing and hold everything, in both directions, until the mode
    /// changes: a network partition. TCP would retransmit what it holds, so when
    /// it heals the held bytes arrive late, as they would (a COMMIT included).
    Blackhole,
    /// Half-open at the worst moment: a connection that carries a COMMIT from
    /// now on loses every answer (read and dropped), for good. The database
    /// commits; the client never hears it did.
    HalfOpenAtCommit,
}

/// A loopback TCP proxy whose connections can be cut at once, delayed,
/// blackholed or made half-open.
pub struct FaultProxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    mode: tokio::sync::watch::Sender<Mode>,
    accept: tokio::task::JoinHandle<()>,
}

/// Bytes of one read.
const PROXY_CHUNK: usize = 16 * 1024;

/// Copies `from` to `to` under the proxy's mode; `to_client` is the direction
/// half-open drops.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: tokio::sync::watch::Receiver<Mode>,
    to_client: bool,
    answers_lost: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; PROXY_CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Pass => break,
                Mode::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::HalfOpenAtCommit => {
                    if !to_client && buf[..n].windows(6).any(|w| w == b"COMMIT") {
                        answers_lost.store(true, Ordering::SeqCst);
                    }
                    break;
                }
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to_client && answers_lost.load(Ordering::SeqCst) {
            continue; // dropped on the floor
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (mode, watch) = tokio::sync::watch::channel(Mode::Pass);
        let live = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let watch = watch.clone();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let lost = Arc::new(AtomicBool::new(false));
                        tokio::join!(
                            pump(cr, sw, watch.clone(), false, lost.clone()),
                            pump(sr, cw, watch, true, lost)
                        );
                    }
                });
                live.lock().unwrap().push(task.abort_handle());
            }
        });
        FaultProxy {
            port,
            conns,
            mode,
            accept,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Cuts every connection open now (both sockets are dropped).
    pub fn reset_all(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.len();
        for c in conns.drain(..) {
            c.abort();
        }
        n
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}
