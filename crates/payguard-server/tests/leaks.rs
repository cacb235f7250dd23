//! After a server has run and stopped, nothing it started is left behind: no
//! async task, no file descriptor (database files, sockets), no thread.

mod common;

use common::spawn_app;
use futures::future::join_all;
use serde_json::json;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn thread_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_leaves_no_task_fd_or_thread_behind() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIP: no /proc on this system");
        return;
    }
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up once so lazily created process-wide resources exist before the baseline.
    spawn_app().await.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (tasks0, fds0, threads0) = (metrics.num_alive_tasks(), open_fds(), threads());

    for round in 0..3 {
        let app = spawn_app().await;
        app.account("acct", 1_000_000).await;
        for i in 0..20 {
            app.order(&format!("o{i}"), "acct", 10).await;
        }
        let paths: Vec<String> = (0..20)
            .flat_map(|i| std::iter::repeat_n(format!("/v1/orders/o{i}/deduct"), 5))
            .collect();
        let calls: Vec<_> = paths.iter().map(|p| app.post(p, json!({}))).collect();
        for r in join_all(calls).await {
            assert_eq!(r.status, 200, "round {round}");
        }
        app.stop().await;
    }
    // Blocking-pool threads linger idle for a while by design; give them time.
    let settle = std::time::Instant::now();
    loop {
        let (tasks, fds, th) = (metrics.num_alive_tasks(), open_fds(), threads());
        if (tasks, fds) == (tasks0, fds0) && th <= threads0 + 2 {
            break;
        }
        assert!(
            settle.elapsed() < std::time::Duration::from_secs(15),
            "left behind: tasks {tasks0} -> {tasks}, fds {fds0} -> {fds}, threads {threads0} -> {th}: {:?}",
            thread_names()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
