//! `timeouts.idle` and `timeouts.half_close` close quiet connections; a connection that keeps
//! moving bytes outlives both; `idle: 0` (the default) keeps a quiet connection open.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Sluice, StreamEnd, closed_connections, free_addr, read_to_end};

with_workers_1_and_2!(
    idle_timeout_closes_a_quiet_connection_but_not_a_busy_one,
    half_close_timeout_closes_after_a_quiet_fin,
    idle_zero_keeps_a_quiet_connection,
);

fn start(
    workers: usize,
    name: &str,
    backend: SocketAddr,
    timeouts: &str,
) -> (Sluice, SocketAddr, SocketAddr) {
    let admin = free_addr();
    let listener = Listener::new(name, &[backend]).with(timeouts);
    let front = listener.bind;
    (
        Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener])),
        front,
        admin,
    )
}

fn echo(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).unwrap();
    let mut got = vec![0u8; bytes.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, bytes);
}

fn closed_count(admin: SocketAddr, listener: &str, reason: &str) -> f64 {
    closed_connections(admin, listener, reason)
}

fn idle_timeout_closes_a_quiet_connection_but_not_a_busy_one(workers: usize) {
    let backend = EchoServer::echo();
    let (_sluice, front, admin) = start(workers, "idle", backend.addr(), "timeouts: { idle: 1s }");
    // Quiet: closed by Sluice within the timeout plus a generous margin, while...
    let quiet = TcpStream::connect(front).unwrap();
    let started = Instant::now();
    let waiter = thread::spawn(move || {
        let read = read_to_end(&quiet, Instant::now() + Duration::from_secs(5));
        (read.end, started.elapsed())
    });
    // ...a busy connection, a byte every 300 ms for 2.4 s (twice the timeout), stays open.
    let mut busy = TcpStream::connect(front).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..8u8 {
        echo(&mut busy, &[i]);
        thread::sleep(Duration::from_millis(300));
    }
    echo(&mut busy, b"still here");
    let (end, elapsed) = waiter.join().unwrap();
    assert_eq!(
        end,
        StreamEnd::Eof,
        "quiet connection not closed within 5 s"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}, timeout 1s"
    );
    assert_eq!(closed_count(admin, "idle", "idle_timeout"), 1.0);
}

fn half_close_timeout_closes_after_a_quiet_fin(workers: usize) {
    let backend = EchoServer::echo();
    let (_sluice, front, admin) = start(
        workers,
        "half",
        backend.addr(),
        "timeouts: { half_close: 1s }",
    );
    // The echo backend answers the FIN with its own: a clean close, no timeout involved.
    let mut clean = TcpStream::connect(front).unwrap();
    echo(&mut clean, b"x");
    clean.shutdown(Shutdown::Write).unwrap();
    let read = read_to_end(&clean, Instant::now() + Duration::from_secs(5));
    assert_eq!(read.end, StreamEnd::Eof);
    assert!(read.received.bytes == 0);

    // A backend that accepts and then neither reads, writes nor closes: after the client's FIN
    // the half-closed connection ends about 1 s later.
    let quiet_backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_sluice2, front2, admin2) = start(
        workers,
        "half2",
        quiet_backend.local_addr().unwrap(),
        "timeouts: { half_close: 1s }",
    );
    let client = TcpStream::connect(front2).unwrap();
    let (_held, _) = quiet_backend.accept().unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let started = Instant::now();
    let read = read_to_end(&client, Instant::now() + Duration::from_secs(5));
    let elapsed = started.elapsed();
    assert_eq!(
        read.end,
        StreamEnd::Eof,
        "half-closed connection not closed within 5 s"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "after {elapsed:?}"
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(closed_count(admin2, "half2", "half_close_timeout"), 1.0);
    assert_eq!(closed_count(admin, "half", "half_close_timeout"), 0.0);
}

fn idle_zero_keeps_a_quiet_connection(workers: usize) {
    let backend = EchoServer::echo();
    let (_sluice, front, _admin) =
        start(workers, "forever", backend.addr(), "timeouts: { idle: 0 }");
    let mut stream = TcpStream::connect(front).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo(&mut stream, b"before");
    thread::sleep(Duration::from_millis(2500));
    echo(&mut stream, b"after 2.5 s of silence");
}
