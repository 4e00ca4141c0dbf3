//! Splice pipes come back to the pool however a connection ends (issue 11, item 2).
//!
//! A backend streams bulk bytes toward clients that read a little and then stop, so the
//! direction switches to splicing, and a client's socket takes less than the pipe holds (a peer
//! with small segments gets a small send buffer on Sluice's side): the leased pipe still holds
//! bytes when the connection closes. Whether it ends by the idle timeout or by the client's reset, the pipe must be given
//! back (a pipe with bytes in it is closed, never reused): `sluice_pipes_leased` returns to 0
//! after every round and the process's sockets return to their count at start. Before the fix
//! every such pipe stayed leased, with its two fds, for the life of the process; after 256 of
//! them a worker never spliced again.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{Sluice, closed_connections, free_addr, metric};

/// Connections per batch.
const CONNECTIONS: usize = 12;
/// How long the clients read before they stop.
const READ_TIME: Duration = Duration::from_millis(500);
/// How long a round waits for its connections' directions to fill.
const FILL_TIME: Duration = Duration::from_millis(500);
/// Batches of connections a round may open before one of them is caught with bytes in a pipe
/// (each batch catches several: this bounds a machine where timing differs).
const BATCHES_MAX: usize = 5;
/// Generous bound for the closes and the gauge to settle in a debug build.
const SETTLE: Duration = Duration::from_secs(15);

with_workers_1_and_2!(pipes_holding_bytes_are_given_back_when_connections_close);

/// A backend that writes to every connection as fast as it is let, until the connection ends.
struct Source {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Source {
    fn start() -> Source {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the source");
        listener.set_nonblocking(true).expect("non-blocking source");
        let addr = listener.local_addr().expect("source address");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let s = Arc::clone(&s);
                thread::spawn(move || push_until_closed(stream, &s));
            }
        });
        Source { addr, stop }
    }
}

/// Writes until the connection is gone (or `stop`), blocking while it is full.
fn push_until_closed(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(50)));
    let chunk = vec![0x5a_u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.write(&chunk) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects `n` clients through `front` that read for a moment and then stop for good, with a
/// small receive buffer and small segments: the first chunks go through (the direction
/// switches to splicing once a whole buffer arrives), and Sluice's socket toward the client,
/// whose send buffer stays small, takes less than a pipe holds.
fn stalling_clients(front: SocketAddr, n: usize) -> Vec<TcpStream> {
    let clients: Vec<TcpStream> = (0..n)
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(front),
                socket2::Type::STREAM,
                None,
            )
            .expect("client socket");
            socket.set_recv_buffer_size(4096).unwrap();
            // Small segments, as from a peer across the internet: Sluice's socket toward it
            // then keeps a small send buffer, which takes less than a pipe holds.
            socket.set_tcp_mss(536).unwrap();
            socket
                .connect(&front.into())
                .expect("connect through sluice");
            socket.set_nonblocking(true).unwrap();
            TcpStream::from(socket)
        })
        .collect();
    // Slowly, as a peer behind a slow link: 4 KiB per client every 10 ms.
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < READ_TIME {
        for mut client in &clients {
            let _ = client.read(&mut buf);
        }
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(FILL_TIME);
    clients
}

/// One round: connections whose pipes hold bytes, then closed by `end` (idle timeout, or the
/// client's reset); every pipe is given back once they have closed.
fn round(admin: SocketAddr, front: SocketAddr, reset: bool) {
    let how = if reset {
        "client reset"
    } else {
        "idle timeout"
    };
    let closed_before = closed(admin);
    // Every connection is stalled once the push is over, and an empty pipe goes back at
    // once: a pipe still leased now holds bytes.
    let mut clients = Vec::new();
    for _ in 0..BATCHES_MAX {
        clients.extend(stalling_clients(front, CONNECTIONS));
        if metric(admin, "sluice_pipes_leased") >= 1.0 {
            break;
        }
    }
    let leased = metric(admin, "sluice_pipes_leased");
    assert!(
        leased >= 1.0,
        "no pipe held bytes after {BATCHES_MAX} batches: the test no longer exercises the leak"
    );
    let connections = clients.len() as f64;
    if reset {
        for client in &clients {
            socket2::SockRef::from(client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(clients);
    }
    let deadline = Instant::now() + SETTLE;
    while closed(admin) < closed_before + connections && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let ended = closed(admin) - closed_before;
    assert!(
        ended >= connections,
        "only {ended} of {connections} connections closed ({how})"
    );
    let mut leased = metric(admin, "sluice_pipes_leased");
    while leased > 0.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        leased = metric(admin, "sluice_pipes_leased");
    }
    assert_eq!(
        leased, 0.0,
        "pipes still leased after every connection closed ({how})"
    );
}

/// Connections of the listener closed by the idle timeout or a client's reset (a client of a
/// reset round may have met its idle timeout first).
fn closed(admin: SocketAddr) -> f64 {
    ["idle_timeout", "client_reset"]
        .iter()
        .map(|reason| closed_connections(admin, "bulk", reason))
        .sum()
}

fn pipes_holding_bytes_are_given_back_when_connections_close(workers: usize) {
    let source = Source::start();
    let admin = free_addr();
    let bulk = Listener::new("bulk", &[source.addr]).with("timeouts: { idle: 3s }");
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], std::slice::from_ref(&bulk)),
    );
    let baseline = fds_by_kind(&sluice);
    // Two rounds of each ending. A pipe kept by a closed connection shows as a lease that
    // never ends (checked in each round); its connection's sockets must be gone too.
    for reset in [false, true, false, true] {
        round(admin, bulk.bind, reset);
    }
    let deadline = Instant::now() + SETTLE;
    let mut after = fds_by_kind(&sluice);
    while after.sockets > baseline.sockets && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        after = fds_by_kind(&sluice);
    }
    // Pipes returned empty stay open in the pool for reuse (two fds each, bounded by the
    // pool); leased ones hold bytes, and none is leased now.
    eprintln!("fds: {baseline:?} at start, {after:?} after four rounds");
    assert!(
        after.sockets <= baseline.sockets,
        "sockets: {} at start, {} after every connection closed",
        baseline.sockets,
        after.sockets
    );
}

/// Sluice's open fds: sockets, and pipe ends.
#[derive(Debug, Clone, Copy)]
struct Fds {
    sockets: usize,
    pipes: usize,
}

fn fds_by_kind(sluice: &Sluice) -> Fds {
    let mut fds = Fds {
        sockets: 0,
        pipes: 0,
    };
    let dir = format!("/proc/{}/fd", sluice.pid());
    for entry in std::fs::read_dir(&dir)
        .expect("read /proc/PID/fd")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if target.starts_with("socket:") {
            fds.sockets += 1;
        } else if target.starts_with("pipe:") {
            fds.pipes += 1;
        }
    }
    fds
}
