//! Start-up and shutdown: SIGTERM drains open connections, bounded by `shutdown_timeout`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Signal, Sluice};

with_workers_1_and_2!(
    sigterm_when_idle_exits_zero_promptly,
    sigterm_waits_for_an_open_connection_until_shutdown_timeout,
    sigterm_exits_once_the_last_connection_closes,
);

/// Round trip of `message` over an open connection.
fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

fn start_with_shutdown_timeout(
    workers: usize,
    backend: &EchoServer,
    timeout: &str,
) -> (Sluice, Listener) {
    let listener = Listener::new("drain", &[backend.addr()]);
    let yaml = config(
        workers,
        None,
        &[&format!("shutdown_timeout: {timeout}")],
        std::slice::from_ref(&listener),
    );
    (Sluice::start(binary(), &yaml), listener)
}

/// No connection open: SIGTERM ends the process with status 0 within 3 s.
fn sigterm_when_idle_exits_zero_promptly(workers: usize) {
    let backend = EchoServer::echo();
    let (mut sluice, _) = start_with_shutdown_timeout(workers, &backend, "30s");
    let started = Instant::now();
    let status = sluice.terminate(Duration::from_secs(3));
    let status = status
        .unwrap_or_else(|| panic!("still running 3 s after SIGTERM:\n{}", sluice.stderr_text()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status} after SIGTERM; stderr:\n{}",
        sluice.stderr_text()
    );
    eprintln!("workers {workers}: idle exit in {:?}", started.elapsed());
}

/// A connection stays open: after SIGTERM the process keeps serving it, then exits 0 at
/// `shutdown_timeout` (2 s), within 3 s of margin.
fn sigterm_waits_for_an_open_connection_until_shutdown_timeout(workers: usize) {
    let backend = EchoServer::echo();
    let (mut sluice, listener) = start_with_shutdown_timeout(workers, &backend, "2s");
    let mut stream = TcpStream::connect(listener.bind).unwrap();
    round_trip(&mut stream, b"before");
    let started = Instant::now();
    sluice.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = sluice.try_exit_status() {
        panic!(
            "exited ({status}) with a connection open, before shutdown_timeout; stderr:\n{}",
            sluice.stderr_text()
        );
    }
    round_trip(&mut stream, b"during the drain");
    let status = sluice.wait_exit(Duration::from_secs(5));
    let elapsed = started.elapsed();
    let status = status
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", sluice.stderr_text()));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", sluice.stderr_text());
    assert!(
        elapsed >= Duration::from_millis(1500),
        "exited after {elapsed:?}, before shutdown_timeout (2 s)"
    );
    eprintln!("workers {workers}: exit {elapsed:?} after SIGTERM with shutdown_timeout 2s");
}

/// After SIGTERM with a connection open (`shutdown_timeout` 30 s), closing that connection lets
/// the process exit 0 at once.
fn sigterm_exits_once_the_last_connection_closes(workers: usize) {
    let backend = EchoServer::echo();
    let (mut sluice, listener) = start_with_shutdown_timeout(workers, &backend, "30s");
    let mut stream = TcpStream::connect(listener.bind).unwrap();
    round_trip(&mut stream, b"hello");
    sluice.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = sluice.try_exit_status() {
        panic!(
            "exited ({status}) with a connection open; stderr:\n{}",
            sluice.stderr_text()
        );
    }
    let closed = Instant::now();
    drop(stream);
    let status = sluice.wait_exit(Duration::from_secs(5));
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running 5 s after the last close:\n{}",
            sluice.stderr_text()
        )
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", sluice.stderr_text());
    eprintln!(
        "workers {workers}: exit {:?} after the last connection closed",
        closed.elapsed()
    );
}
