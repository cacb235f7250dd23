//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`, and any crash kept under
//! `fuzz/regressions/<target>/`) through the same checks the fuzz targets run.
//!
//! Why: cargo-fuzz needs libFuzzer and is run by hand; this test runs on the stable toolchain
//! in `cargo test --workspace`, so CI holds every input the fuzzers ever found interesting,
//! and every bug they found stays fixed.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.expect("a directory entry").path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, min: usize, mut check: impl FnMut(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= min,
        "fuzz/corpus/{target} holds {} inputs, expected at least {min}",
        files.len()
    );
    for f in &files {
        let data = std::fs::read(f).expect("a corpus file");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        assert!(outcome.is_ok(), "{} fails its checks", f.display());
    }
}

#[test]
fn request_body_corpus() {
    replay("request_body", 8, payguard_fuzz_checks::request_body::check);
}

#[test]
fn log_line_corpus() {
    replay("log_line", 8, payguard_fuzz_checks::log_line::check);
}

#[test]
fn router_corpus() {
    let mut h = payguard_fuzz_checks::router::Harness::new();
    replay("router", 8, |d| h.check(d));
}
