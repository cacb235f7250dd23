//! The clients: every order's deduct sent several times at nearly the same
//! instant, a copy to each instance and one more to the first copy's instance
//! (`config::DUPLICATES`), each retried elsewhere on anything but 200, 402 or a
//! 409; refunds sent the same way; and two-phase payments, each a flow: its
//! authorize sent like a deduct, then (unless the hold was declined) its
//! captures, voids and refunds, each sent the same way at their own instants.
//!
//! Why: the incident was duplicates racing; a client that retries after a timeout
//! is the other source of duplicates, and the one that makes "unknown" outcomes.
//! What each client was told is recorded in the oracle, to be held against the
//! database at the end: a 200 must be in the ledger exactly once, a 402 must not;
//! and when, so that a seed with no fault can be held to answering every request
//! in time. Orders are sent in bursts (see `run`), so each instance's lanes batch
//! several of them while the same orders' copies batch on the other instances,
//! and two copies meet in one instance's lane (single flight). A two-phase flow
//! waits for its authorize's answers before capturing, as a real client would,
//! so its captures and voids race each other and the hold's expiry (the
//! sweepers), not the hold itself. A keyed request ([`crate::keys`]) is sent
//! the same way, every copy and retry under its key; once its copies are
//! answered, its follow-ups go (the same request again, and maybe another
//! one under the same key), as a client that retries later, or reuses a key
//! by mistake, would.

use crate::config::{CLIENT_ATTEMPTS_MAX, CLIENT_RETRY_MS, CLIENT_TIMEOUT_MS, INSTANCES};
use crate::oracle::{Attempt, Keyed, OracleRef};
use crate::wire::{
    call, instance_host, now_ms, ApiReq, ApiResp, Ask, CallError, Post, INSTANCE_PORT,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// One request to send (each copy of a duplicate is its own).
#[derive(Debug, Clone)]
pub struct Send {
    pub order: String,
    pub ask: Ask,
    /// Simulated ms after the start; a send planned for an instant already
    /// past (a flow's step after a slow authorize) leaves at once.
    pub at_ms: u64,
    /// The instance of the first attempt; retries go to the next ones.
    pub first_instance: usize,
    /// The Idempotency-Key it carries: every copy of a keyed request, every
    /// retry, and its follow-ups carry the same one ([`crate::keys`]).
    pub key: Option<String>,
    /// Another request under a key already answered (expected: 422).
    pub reuses_key: bool,
    /// Its number in the seed's schedule, for a [`crate::shrink::Mask`]
    /// (given once the whole schedule is drawn).
    pub id: usize,
}

/// A two-phase payment: the copies of its authorize, then (unless a copy was
/// answered 402) its later steps.
#[derive(Debug, Clone)]
pub struct Flow {
    pub authorize: Vec<Send>,
    pub then: Vec<Send>,
    /// The follow-ups of its keyed requests, by key.
    pub follow_ups: FollowUps,
}

/// What is sent under a key once its request's copies are answered, by key;
/// their `at_ms` counts from then.
pub type FollowUps = BTreeMap<String, Vec<Send>>;

/// Sends `s` until it gets a definite answer or runs out of attempts; records
/// every attempt and the definite answer in the oracle, and returns it.
async fn send(s: Send, post: Post, oracle: OracleRef) -> Option<ApiResp> {
    tokio::time::sleep(Duration::from_millis(s.at_ms.saturating_sub(now_ms()))).await;
    let timeout = Duration::from_millis(CLIENT_TIMEOUT_MS);
    for attempt in 0..CLIENT_ATTEMPTS_MAX {
        let host = instance_host((s.first_instance + attempt) % INSTANCES);
        let req = ApiReq {
            order: s.order.clone(),
            ask: s.ask.clone(),
            key: s.key.clone(),
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
                let mut what = match &s.ask {
                    Ask::Deduct => s.order.clone(),
                    ask => format!("{} {ask}", s.order),
                };
                if let Some(key) = &s.key {
                    what.push_str(&format!(" [key {key}]"));
                }
                format!("client: {what} via {host} (attempt {attempt}, sent at {sent_ms} ms): {answer:?}")
            });
            o.attempt(Attempt {
                order: s.order.clone(),
                host: host.clone(),
                sent_ms,
                answer: answer.as_ref().ok().map(|a| (now_ms(), *a)),
            });
        }
        if let (Some(key), Ok(a)) = (&s.key, &answer) {
            if a.is_definite() {
                oracle.borrow_mut().keyed(Keyed {
                    key: key.clone(),
                    order: s.order.clone(),
                    ask: s.ask.clone(),
                    reuses_key: s.reuses_key,
                    answer: *a,
                });
            }
        }
        match answer {
            Ok(ApiResp::NoSuchOrder) => {
                panic!("order {} was created before any request", s.order)
            }
            Ok(a @ (ApiResp::Charged { .. } | ApiResp::Replayed { .. })) => {
                oracle.borrow_mut().answered(&s.order, &s.ask, a);
                return Some(a);
            }
            // A 402 is a deduct's or an authorize's answer; a refund is retried.
            Ok(a @ ApiResp::InsufficientFunds) if !matches!(s.ask, Ask::Refund { .. }) => {
                oracle.borrow_mut().answered(&s.order, &s.ask, a);
                return Some(a);
            }
            // A 409 is definite for every request but a deduct (never its answer).
            Ok(a @ ApiResp::Conflict { .. }) if s.ask != Ask::Deduct => {
                oracle.borrow_mut().answered(&s.order, &s.ask, a);
                return Some(a);
            }
            Ok(a @ ApiResp::KeyReused) => return Some(a),
            Ok(
                ApiResp::LockBusy
                | ApiResp::KeyInUse
                | ApiResp::StaleFencingToken
                | ApiResp::Unknown
                | ApiResp::Unavailable
                | ApiResp::InsufficientFunds
                | ApiResp::Conflict { .. }
                | ApiResp::Refused,
            )
            | Err(_) => {
                tokio::time::sleep(Duration::from_millis(CLIENT_RETRY_MS)).await;
            }
        }
    }
    oracle.borrow_mut().stats.unanswered += 1;
    None
}

/// A keyed request's copies (or one unkeyed send): each sent, and once all
/// are answered or given up on, if any got a definite answer, the key's
/// follow-ups. The copies' answers, in order.
async fn unit(
    copies: Vec<Send>,
    follow_ups: Vec<Send>,
    post: Post,
    oracle: OracleRef,
) -> Vec<Option<ApiResp>> {
    let tasks: Vec<_> = copies
        .into_iter()
        .map(|s| tokio::task::spawn_local(send(s, post.clone(), oracle.clone())))
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for t in tasks {
        answers.push(t.await.ok().flatten());
    }
    if answers.iter().any(Option::is_some) {
        let now = now_ms();
        let tasks: Vec<_> = follow_ups
            .into_iter()
            .map(|s| {
                let s = Send {
                    at_ms: now + s.at_ms,
                    ..s
                };
                tokio::task::spawn_local(send(s, post.clone(), oracle.clone()))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
    answers
}

/// `sends` as units: each keyed request's copies together (with its
/// follow-ups), every unkeyed send alone, in the order of their first send.
fn units(sends: Vec<Send>, follow_ups: &mut FollowUps) -> Vec<(Vec<Send>, Vec<Send>)> {
    let mut out: Vec<(Vec<Send>, Vec<Send>)> = Vec::new();
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for s in sends {
        match s.key.clone() {
            Some(key) if !s.reuses_key => match by_key.get(&key) {
                Some(&i) => out[i].0.push(s),
                None => {
                    by_key.insert(key.clone(), out.len());
                    out.push((vec![s], follow_ups.remove(&key).unwrap_or_default()));
                }
            },
            _ => out.push((vec![s], Vec::new())),
        }
    }
    out
}

/// Spawns each unit of `sends`; their copies' answers, flattened in order.
async fn all_units(
    sends: Vec<Send>,
    mut follow_ups: FollowUps,
    post: &Post,
    oracle: &OracleRef,
) -> Vec<Option<ApiResp>> {
    let tasks: Vec<_> = units(sends, &mut follow_ups)
        .into_iter()
        .map(|(copies, follow)| {
            tokio::task::spawn_local(unit(copies, follow, post.clone(), oracle.clone()))
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap_or_default());
    }
    answers
}

/// One two-phase payment: the authorize's copies at once; once they are all
/// answered (or given up on), the later steps, unless the hold was declined.
async fn flow(f: Flow, post: Post, oracle: OracleRef) {
    let Flow {
        authorize,
        then,
        mut follow_ups,
    } = f;
    // Its copies are keyed together or not at all ([`crate::keys`]).
    let answers = match authorize.first().and_then(|s| s.key.clone()) {
        Some(key) => {
            let follow = follow_ups.remove(&key).unwrap_or_default();
            unit(authorize, follow, post.clone(), oracle.clone()).await
        }
        None => {
            let copies: Vec<_> = authorize
                .into_iter()
                .map(|s| tokio::task::spawn_local(send(s, post.clone(), oracle.clone())))
                .collect();
            let mut answers = Vec::new();
            for c in copies {
                answers.push(c.await.ok().flatten());
            }
            answers
        }
    };
    if answers.contains(&Some(ApiResp::InsufficientFunds)) {
        return;
    }
    all_units(then, follow_ups, &post, &oracle).await;
}

/// The client host: all sends and flows concurrently; done when every one has
/// settled.
pub async fn run(
    plan: Vec<Send>,
    follow_ups: FollowUps,
    flows: Vec<Flow>,
    post: Post,
    oracle: OracleRef,
) -> turmoil::Result {
    let (keyed, unkeyed): (Vec<Send>, Vec<Send>) = plan.into_iter().partition(|s| s.key.is_some());
    let mut tasks: Vec<_> = unkeyed
        .into_iter()
        .map(|s| {
            let (post, oracle) = (post.clone(), oracle.clone());
            tokio::task::spawn_local(async move {
                send(s, post, oracle).await;
            })
        })
        .collect();
    tasks.extend(
        flows
            .into_iter()
            .map(|f| tokio::task::spawn_local(flow(f, post.clone(), oracle.clone()))),
    );
    {
        let (post, oracle) = (post.clone(), oracle.clone());
        tasks.push(tokio::task::spawn_local(async move {
            all_units(keyed, follow_ups, &post, &oracle).await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
