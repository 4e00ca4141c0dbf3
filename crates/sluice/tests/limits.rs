//! `max_connections`: `reject` resets the excess at accept and counts it; `queue` (the default)
//! holds it, unserved but not refused, until an open connection closes. The cap holds across
//! workers.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Sluice, free_addr, scrape_metrics, series, wait_metric};

with_workers_1_and_2!(
    reject_resets_beyond_max_connections_and_counts_them,
    queue_holds_beyond_max_connections_until_one_closes,
);

const SETTLE: Duration = Duration::from_secs(5);

fn start(workers: usize, listener: Listener) -> (Sluice, SocketAddr, SocketAddr) {
    let admin = free_addr();
    let front = listener.bind;
    let yaml = config(workers, Some(admin), &[], &[listener]);
    (Sluice::start(binary(), &yaml), front, admin)
}

/// Sends one byte and reads it back within `timeout`.
fn echo_byte(stream: &mut TcpStream, byte: u8, timeout: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&[byte])?;
    let mut got = [0u8; 1];
    stream.read_exact(&mut got)?;
    assert_eq!(got[0], byte);
    Ok(())
}

fn served(front: SocketAddr, byte: u8) -> TcpStream {
    let mut stream = TcpStream::connect(front).unwrap();
    echo_byte(&mut stream, byte, Duration::from_secs(5))
        .expect("a connection within the cap is served");
    stream
}

fn reject_resets_beyond_max_connections_and_counts_them(workers: usize) {
    let backend = EchoServer::echo();
    let listener = Listener::new("capped", &[backend.addr()])
        .with("max_connections: 2")
        .with("on_max_connections: reject");
    let (_sluice, front, admin) = start(workers, listener);
    let first = served(front, 1);
    let _second = served(front, 2);

    // The kernel completes the handshake; Sluice accepts and resets at once. (Read without
    // writing first: a write that meets the reset consumes the error, and a later read then
    // sees a plain end of stream.)
    let mut third = TcpStream::connect(front).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 1];
    match third.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection beyond max_connections got {other:?}, not a reset"),
    }
    let rejected = series(
        "sluice_connections_rejected_total",
        &[("listener", "capped")],
    );
    assert_eq!(wait_metric(admin, &rejected, 1.0, SETTLE), Some(1.0));
    assert_eq!(
        backend.accepted(),
        2,
        "the rejected connection reached no backend"
    );

    // Room again once one closes.
    drop(first);
    let active = series("sluice_connections_active", &[("listener", "capped")]);
    assert_eq!(wait_metric(admin, &active, 1.0, SETTLE), Some(1.0));
    let _fourth = served(front, 4);
    let metrics = scrape_metrics(admin).unwrap();
    assert_eq!(metrics.get(&rejected).copied(), Some(1.0));
}

fn queue_holds_beyond_max_connections_until_one_closes(workers: usize) {
    let backend = EchoServer::echo();
    let listener = Listener::new("queued", &[backend.addr()]).with("max_connections: 2");
    let (_sluice, front, admin) = start(workers, listener);
    let first = served(front, 1);
    let _second = served(front, 2);

    // Beyond the cap: connected (kernel backlog) but not served.
    let mut third = TcpStream::connect(front).unwrap();
    match echo_byte(&mut third, 3, Duration::from_millis(500)) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third connection was not held back: {other:?}"),
    }
    assert_eq!(backend.accepted(), 2);

    // One closes: the held connection is served, and its early byte was kept.
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0u8; 1];
    third
        .read_exact(&mut got)
        .expect("the held connection is served once there is room");
    assert_eq!(got[0], 3);
    echo_byte(&mut third, 33, Duration::from_secs(5)).unwrap();

    let metrics = scrape_metrics(admin).unwrap();
    let rejected = series(
        "sluice_connections_rejected_total",
        &[("listener", "queued")],
    );
    assert_eq!(
        metrics.get(&rejected).copied(),
        Some(0.0),
        "queue mode resets nothing"
    );
    let paused = series(
        "sluice_accept_paused_total",
        &[("listener", "queued"), ("reason", "max_connections")],
    );
    assert!(
        metrics.get(&paused).copied().unwrap_or(0.0) >= 1.0,
        "pauses are counted: {metrics:?}"
    );
}
