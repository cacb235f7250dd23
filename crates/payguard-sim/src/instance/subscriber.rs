//! The instance's subscription to Redis's `released` channel (issue #12).
//!
//! Each message names an order whose lock was released while someone waited for
//! it; the [`Node`] remembers it and wakes the order's lane. Messages are lost
//! while the instance is down or cut off from Redis, and a Redis restart drops
//! the subscription. A real client learns that its connection dropped; here the
//! subscriber re-sends `SUBSCRIBE` every [`SUBSCRIPTION_CHECK_MS`] (every Redis
//! timeout while it is not subscribed) and takes an unanswered one, or an answer
//! from another Redis process, as a lapse. After a
//! lapse it cannot know what it missed, so it wakes every parked order.

use super::Node;
use crate::config::{REDIS_COMMAND_TIMEOUT_MS, SUBSCRIPTION_CHECK_MS};
use crate::wire::{now_ms, RedisResp, Subscription, SUBSCRIBER_PORT};
use std::rc::Rc;
use std::time::Duration;

pub(super) async fn run(node: Rc<Node>) {
    let Ok(sub) = Subscription::bind(SUBSCRIBER_PORT).await else {
        node.inst
            .note(|| "cannot bind the subscriber's socket".into());
        return;
    };
    // The Redis process the subscription is known to be on; `None`: lapsed.
    let mut run: Option<u64> = None;
    loop {
        let asked = sub.subscribe().await.ok();
        // Not subscribed: try again as soon as this one could have been answered.
        let window = match run {
            Some(_) => SUBSCRIPTION_CHECK_MS,
            None => REDIS_COMMAND_TIMEOUT_MS,
        };
        let until = now_ms() + window;
        let mut answered = false;
        while now_ms() < until {
            let left = Duration::from_millis(until - now_ms());
            let Ok(got) = tokio::time::timeout(left, sub.recv()).await else {
                break;
            };
            match got {
                Ok((_, RedisResp::Message { order })) => node.released(&order),
                Ok((id, RedisResp::Subscribed { run: r })) if Some(id) == asked => {
                    answered = true;
                    if run != Some(r) {
                        // Also the first time: an order may have parked before.
                        run = Some(r);
                        node.inst.note(|| format!("subscribed (Redis run {r})"));
                        node.subscribed();
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(left).await,
            }
        }
        if !answered {
            run = None;
        }
    }
}
