//! Clients cannot eject a healthy backend (issue 11, item 3).
//!
//! A server resets a connection whenever it closes it with unread input, as redis-server does
//! after a protocol error. Passive health counts only what says something about the backend
//! (refused or timed-out connects, resets before any client byte reached it), so a burst of
//! junk clients, each answered by a reset, leaves both redis backends up, and every later
//! client is served. Before the fix ten junk connections sent together ejected one for 10 s.
//! A backend that resets connections before any client byte reached it is still ejected.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    EchoServer, RedisServer, Reply, Sluice, closed_connections, free_addr, redis_command,
    require_installed, scrape_metrics, series,
};

/// Junk connections sent at once: twice the default `consecutive_failures` (5) per backend.
const JUNK: usize = 20;
/// A RESP array header redis-server rejects at once, then more than it reads in one go, so it
/// closes with input unread (a reset).
const JUNK_HEAD: &[u8] = b"*x\r\n";
const JUNK_BYTES: usize = 256 * 1024;

with_workers_1_and_2!(
    junk_clients_leave_healthy_backends_up,
    a_backend_that_resets_before_any_client_byte_is_ejected
);

fn junk_clients_leave_healthy_backends_up(workers: usize) {
    require_installed(&["redis-server"]);
    let redis = [RedisServer::start(), RedisServer::start()];
    let backends: Vec<SocketAddr> = redis.iter().map(RedisServer::addr).collect();
    let admin = free_addr();
    let listener = Listener::new("redis", &backends);
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], std::slice::from_ref(&listener)),
    );
    let front = listener.bind;

    let resets_before = backend_resets(admin);
    let junk: Vec<_> = (0..JUNK)
        .map(|_| thread::spawn(move || send_junk(front)))
        .collect();
    for client in junk {
        client.join().expect("junk client");
    }
    // Every junk connection was reset by its backend (else the test shows nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_resets(admin) < resets_before + JUNK as f64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let resets = backend_resets(admin) - resets_before;
    assert!(
        resets >= JUNK as f64,
        "only {resets} of {JUNK} junk connections ended in a backend reset"
    );

    // Both backends stay up, and every new client reaches a redis that answers, for a while
    // after the burst (a report travels to the control plane asynchronously).
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let metrics = scrape_metrics(admin).expect("scrape /metrics");
        for backend in &backends {
            let key = series(
                "sluice_backend_up",
                &[("listener", "redis"), ("backend", &backend.to_string())],
            );
            assert_eq!(
                metrics.get(&key).copied(),
                Some(1.0),
                "{backend} is not up after {JUNK} junk clients\n--- sluice stderr ---\n{}",
                sluice.stderr_text()
            );
        }
        for _ in 0..backends.len() {
            let stream = TcpStream::connect(front).expect("connect through sluice");
            let reply = redis_command(&stream, &["PING"]).expect("PING through sluice");
            assert_eq!(reply, Reply::Status("PONG".into()));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One junk client: a protocol error, then bytes the server never reads; reads what comes back
/// until the reset or EOF.
fn send_junk(front: SocketAddr) {
    let mut stream = TcpStream::connect(front).expect("connect through sluice");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut junk = JUNK_HEAD.to_vec();
    junk.resize(JUNK_BYTES, b'j');
    // The server may reset before everything is written.
    let _ = stream.write_all(&junk);
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Connections of the listener closed because the backend reset them.
fn backend_resets(admin: SocketAddr) -> f64 {
    closed_connections(admin, "redis", "backend_reset")
}

/// The counterpart: a backend that resets every connection at once, before the client sent
/// anything, is a backend failing, and passive health ejects it (default: 5 in a row).
fn a_backend_that_resets_before_any_client_byte_is_ejected(workers: usize) {
    require_installed(&["redis-server"]);
    let redis = RedisServer::start();
    let resetter = EchoServer::send_then_reset(0, 1);
    let admin = free_addr();
    let listener = Listener::new("redis", &[redis.addr(), resetter.addr()]);
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], std::slice::from_ref(&listener)),
    );
    let key = series(
        "sluice_backend_up",
        &[
            ("listener", "redis"),
            ("backend", &resetter.addr().to_string()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut clients = 0;
    loop {
        let up = scrape_metrics(admin)
            .expect("scrape /metrics")
            .get(&key)
            .copied();
        if up == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resetting backend is still up after {clients} clients\n--- sluice stderr ---\n{}",
            sluice.stderr_text()
        );
        // A client that sends nothing (a FIN at most, which redis answers with its own) and
        // waits for the end of its connection.
        let mut stream = TcpStream::connect(listener.bind).expect("connect through sluice");
        thread::sleep(Duration::from_millis(20));
        let _ = stream.shutdown(std::net::Shutdown::Write);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut sink = [0u8; 64];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        clients += 1;
    }
}
