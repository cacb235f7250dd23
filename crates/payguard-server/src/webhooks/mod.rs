//! Webhook delivery primitives (placeholder while the pieces land).

pub mod schedule;
pub mod seal;
pub mod secret;
pub mod sign;
pub mod ssrf;
