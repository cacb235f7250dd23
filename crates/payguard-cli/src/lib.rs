//! The `payguard` command line as a library, so the integration tests drive the
//! same storm, audit and in-process servers as the binary.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bench;
pub mod demo;
pub mod logging;
pub mod out;
pub mod serve;
pub mod storm;
