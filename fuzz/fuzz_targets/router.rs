//! Fuzz target: a whole HTTP request (method, path, headers, body) through the axum router
//! and the engine on a temporary SQLite database (a fresh one every 5 000 rows). The checks (no
//! 5xx; a 4xx moves no money and creates no rows) and the input format are
//! `payguard_fuzz_checks::router`; `tests/corpus.rs` there replays this corpus on stable.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use payguard_fuzz_checks::router::Harness;
use std::cell::RefCell;

thread_local! {
    // libFuzzer calls the target on one thread; the harness (runtime, engine, database and
    // its read connection) lives as long as the process, starting over on a fresh database
    // when the old one has grown.
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::new());
}

fuzz_target!(|data: &[u8]| HARNESS.with(|h| h.borrow_mut().check(data)));
