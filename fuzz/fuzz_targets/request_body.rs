//! Fuzz target: a request body and a content type through the body parser of each POST
//! (create account, create order, deduct, refund). The checks, and the input format, are
//! `payguard_fuzz_checks::request_body`; `tests/corpus.rs` there replays this corpus on stable.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| payguard_fuzz_checks::request_body::check(data));
