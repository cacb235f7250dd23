//! The clients: every order's deduct sent several times at nearly the same
//! instant, a copy to each instance and one more to the first copy's instance
//! (`config::DUPLICATES`), each retried elsewhere on anything but 200 or 402.
//!
//! Why: the incident was duplicates racing; a client that retries after a timeout
//! is the other source of duplicates, and the one that makes "unknown" outcomes.
//! What each client was told is recorded in the oracle, to be held against the
//! database at the end: a 200 must be in the ledger exactly once, a 402 must not;
//! and when, so that a seed with no fault can be held to answering every request
//! in time. Orders are sent in bursts (see `run`), so each instance's lanes batch
//! several of them while the same orders' copies batch on the other instances,
//! and two copies meet in one instance's lane (single flight).

use crate::config::{CLIENT_ATTEMPTS_MAX, CLIENT_RETRY_MS, CLIENT_TIMEOUT_MS, INSTANCES};
use crate::oracle::{Attempt, OracleRef};
use crate::wire::{call, instance_host, now_ms, ApiReq, ApiResp, CallError, Post, INSTANCE_PORT};
use std::time::Duration;

/// One deduct (or refund) to send.
#[derive(Debug, Clone)]
pub struct Send {
    pub order: String,
    /// A refund of the order (its id and amount) instead of its deduct.
    pub refund: Option<(String, i64)>,
    /// Simulated ms after the start.
    pub at_ms: u64,
    /// The instance of the first attempt; retries go to the next ones.
    pub first_instance: usize,
}

async fn send(s: Send, post: Post, oracle: OracleRef) {
    tokio::time::sleep(Duration::from_millis(s.at_ms)).await;
    let timeout = Duration::from_millis(CLIENT_TIMEOUT_MS);
    for attempt in 0..CLIENT_ATTEMPTS_MAX {
        let host = instance_host((s.first_instance + attempt) % INSTANCES);
        let req = ApiReq {
            order: s.order.clone(),
            refund: s.refund.clone(),
        };
        let sent_ms = now_ms();
        let answer = call(&post, &host, INSTANCE_PORT, Box::new(req), timeout)
            .await
            .and_then(|a| {
                a.downcast::<ApiResp>()
                    .map(|a| *a)
                    .map_err(|_| CallError::Io("not an answer".into()))
            });
        {
            let mut o = oracle.borrow_mut();
            o.note(now_ms(), || {
                let what = match &s.refund {
                    None => s.order.clone(),
                    Some((id, _)) => format!("{} refund {id}", s.order),
                };
                format!("client: {what} via {host} (attempt {attempt}, sent at {sent_ms} ms): {answer:?}")
            });
            o.attempt(Attempt {
                order: s.order.clone(),
                host: host.clone(),
                sent_ms,
                answer: answer.as_ref().ok().map(|a| (now_ms(), *a)),
            });
        }
        if let Some((refund_id, _)) = &s.refund {
            match answer {
                Ok(ApiResp::Charged { entry } | ApiResp::Replayed { entry }) => {
                    let mut o = oracle.borrow_mut();
                    o.stats.refund_acks += 1;
                    o.refund_acks.push((s.order, refund_id.clone(), entry));
                    return;
                }
                Ok(ApiResp::RefundRefused { reason }) => {
                    let mut o = oracle.borrow_mut();
                    o.stats.refunds_refused += 1;
                    if reason == "refund_exceeds_paid" {
                        o.refunds_refused.push((s.order, refund_id.clone()));
                    }
                    return;
                }
                Ok(ApiResp::NoSuchOrder) => {
                    panic!("order {} was created before any refund", s.order)
                }
                // Anything else (a 402 included: never a refund's answer) is retried.
                _ => {
                    tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_MS)).await;
                    continue;
                }
            }
        }
        match answer {
            Ok(ApiResp::Charged { entry } | ApiResp::Replayed { entry }) => {
                let mut o = oracle.borrow_mut();
                o.stats.acks += 1;
                o.acks.push((s.order, entry));
                return;
            }
            Ok(ApiResp::InsufficientFunds) => {
                let mut o = oracle.borrow_mut();
                o.stats.declined += 1;
                o.declined.push(s.order);
                return;
            }
            Ok(ApiResp::NoSuchOrder) => panic!("order {} was created before any deduct", s.order),
            Ok(
                ApiResp::LockBusy
                | ApiResp::StaleFencingToken
                | ApiResp::Unknown
                | ApiResp::Unavailable
                | ApiResp::RefundRefused { .. }
                | ApiResp::Refused,
            )
            | Err(_) => {
                tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_MS)).await;
            }
        }
    }
    oracle.borrow_mut().stats.unanswered += 1;
}

/// The client host: all sends concurrently; done when every one has settled.
pub async fn run(plan: Vec<Send>, post: Post, oracle: OracleRef) -> turmoil::Result {
    let tasks: Vec<_> = plan
        .into_iter()
        .map(|s| tokio::task::spawn_local(send(s, post.clone(), oracle.clone())))
        .collect();
    for t in tasks {
        t.await?;
    }
    Ok(())
}
