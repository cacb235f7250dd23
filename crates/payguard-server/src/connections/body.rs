//! The request and response bodies as the connection's [`Slot`] sees them.
//!
//! [`RequestBody`] carries the body deadline: past it the body fails with
//! [`BodyError::Timeout`] (the handler answers 408 `request_timeout` and the
//! connection closes after it), and a body that completes on a connection already
//! closing fails too, so a request whose body was cut off never reaches the engine.
//! [`ResponseBody`] tells the slot when the answer has been handed over in full,
//! which ends the write deadline and starts the idle one.

use super::registry::Registry;
use super::slot::{CloseReason, Slot};
use axum::body::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// Why a request body could not be read; the HTTP boundary maps each to a status
/// (`request::body_bytes`).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body did not arrive within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the server is closing this connection")]
    Closing,
    #[error("reading the request body: {0}")]
    Read(#[from] hyper::Error),
}

pub struct RequestBody {
    inner: Incoming,
    slot: Arc<Slot>,
    registry: Arc<Registry>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Set once the body has ended, failed or timed out; nothing is polled after.
    finished: bool,
}

impl RequestBody {
    pub fn new(inner: Incoming, slot: Arc<Slot>, registry: Arc<Registry>) -> Self {
        let timeout = registry.deadlines.body;
        RequestBody {
            inner,
            slot,
            registry,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            finished: false,
        }
    }

    fn timed_out(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.finished = true;
        self.slot.update(|st| st.body_timed_out = true);
        self.registry.count_close(CloseReason::BodyTimeout);
        Poll::Ready(Some(Err(BodyError::Timeout {
            timeout_ms: self.timeout.as_millis() as u64,
        })))
    }

    /// The body is complete: hands the request on unless the connection is closing.
    fn complete(&mut self) -> Result<(), BodyError> {
        self.finished = true;
        if self.slot.update(|st| st.on_body_complete(Instant::now())) {
            Ok(())
        } else {
            Err(BodyError::Closing)
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        // Checked before reading too: a client trickling bytes never lets a read pend.
        if this.deadline.is_elapsed() {
            return this.timed_out();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(this.complete().err().map(Err)),
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    if let Err(e) = this.complete() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finished = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return this.timed_out();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub struct ResponseBody {
    inner: axum::body::Body,
    slot: Arc<Slot>,
    /// The request this answers (see `State::request_seq`).
    seq: u64,
    sent: bool,
}

impl ResponseBody {
    pub fn new(inner: axum::body::Body, slot: Arc<Slot>, seq: u64) -> Self {
        ResponseBody {
            inner,
            slot,
            seq,
            sent: false,
        }
    }

    fn sent(&mut self) {
        if !self.sent {
            self.sent = true;
            let seq = self.seq;
            self.slot
                .update(|st| st.on_response_sent(Instant::now(), seq));
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.sent(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.sent(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    /// hyper drops the body once it has taken all of it (or the connection ends).
    fn drop(&mut self) {
        self.sent();
    }
}
