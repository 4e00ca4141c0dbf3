//! A worker that dies while the others run (issue 11): the process must not go on serving
//! only part of its traffic unnoticed; it exits with status 70 and a message naming the worker
//! and the error.
//!
//! Nothing a test can do from outside makes a worker's ring fail or a worker panic, so the
//! debug build reads `SLUICE_TEST_WORKER_FAULT=N:panic|error` (see `sluice_dataplane`'s
//! `test_fault`; release builds never read it): worker `N` panics, or its `run` returns an
//! error, 1 s after it was ready. The rest of the path is the real one.

mod common;

use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Sluice, assert_echo};

/// How long the process may take to notice a dead worker and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_worker_that_panics_stops_the_process_with_status_70() {
    dies_with(
        "panic",
        "worker 1 stopped: panicked: test fault injected by SLUICE_TEST_WORKER_FAULT",
    );
}

#[test]
fn a_worker_whose_run_fails_stops_the_process_with_status_70() {
    dies_with(
        "error",
        "worker 1 stopped: test fault injected by SLUICE_TEST_WORKER_FAULT",
    );
}

/// Two workers; worker 1 dies (`kind`) 1 s after it was ready. Before that the process serves;
/// then it exits 70 within [`EXIT_TIMEOUT`], its stderr carrying `message`.
fn dies_with(kind: &str, message: &str) {
    let backend = EchoServer::echo();
    let listener = Listener::new("served", &[backend.addr()]);
    let front = listener.bind;
    let yaml = config(2, None, &[], &[listener]);
    let wrapper = vec![
        "env".to_owned(),
        format!("SLUICE_TEST_WORKER_FAULT=1:{kind}"),
    ];
    let mut sluice = Sluice::try_start_with(binary(), &yaml, Duration::from_secs(10), &wrapper)
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    assert_echo(front, 64 * 1024, 7, Duration::from_secs(5));
    let status = sluice.wait_exit(EXIT_TIMEOUT);
    let stderr = sluice.stderr_text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(70),
        "exit status {status:?} {:?} after ready (70 expected)\n--- sluice stderr ---\n{stderr}",
        started.elapsed()
    );
    assert!(
        stderr.contains(message),
        "stderr names the worker and the error ({message:?})\n--- sluice stderr ---\n{stderr}"
    );
}
