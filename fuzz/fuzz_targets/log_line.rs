//! Fuzz target: arbitrary bytes, split into lines, through forensics' line parser (every
//! format: JSON, tracing JSON, payguard and incident text, logfmt). The checks are
//! `payguard_fuzz_checks::log_line`; `tests/corpus.rs` there replays this corpus on stable.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| payguard_fuzz_checks::log_line::check(data));
