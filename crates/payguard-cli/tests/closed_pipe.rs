//! Every subcommand ends quietly when the reader of its output goes away
//! (`payguard audit --fix-plan | head -5`): exit 0, no panic, no backtrace.
//! Before, the first `println!` after the pipe closed panicked ("failed printing
//! to stdout: Broken pipe").

use std::process::{Command, Stdio};

/// Runs `payguard args…` with standard output a pipe whose reading end is
/// already closed, so its very first write fails with `BrokenPipe`.
fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("payguard runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_quiet(args: &[&str]) {
    let (code, stderr) = run_into_closed_pipe(args);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "payguard {args:?} into a closed pipe: {stderr}"
    );
    assert_eq!(code, Some(0), "payguard {args:?}: {stderr}");
}

#[test]
fn audit_forensics_bench_and_help_end_quietly_when_the_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pipe.db");
    payguard::store::sqlite::SqliteStore::open(payguard::store::sqlite::SqliteConfig::new(&db))
        .unwrap();
    let db_url = format!("sqlite://{}", db.display());
    assert_quiet(&["audit", "--db", &db_url, "--fix-plan"]);
    assert_quiet(&["audit", "--db", &db_url, "--json"]);
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../payguard-forensics/tests/fixtures/incident.log"
    );
    // forensics exits 1 when it finds incidents; the write error must not turn
    // into a panic or a usage error either way.
    let (code, stderr) = run_into_closed_pipe(&["forensics", fixture]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        matches!(code, Some(0) | Some(1)),
        "forensics: {code:?} {stderr}"
    );
    assert_quiet(&["bench", "routing", "--quick"]);
    assert_quiet(&["--help"]);
}
