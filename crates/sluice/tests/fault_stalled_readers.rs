//! Peers that never read (issue 11, item 6). A send toward a peer that does not read stays in
//! flight until the peer takes every byte, and the direction's two chunks hold their buffers of
//! the worker's pool (4096 x 16 KiB) meanwhile. With the idle timeout off (the default), about
//! 2048 stalled directions held the whole pool forever, and every other connection of the worker
//! waited for a buffer, forever too.
//!
//! Each scenario stalls one direction of every connection of a crowd on one worker: clients
//! that push into a backend that never reads, then a backend that pushes into clients that never
//! read. A new connection to another listener of the same worker must then be served at once:
//! its bytes echoed, checked by SHA-256, within `SERVED_WITHIN`.
//!
//! Stalled directions must not hold the worker's 256 splice pipes either: a third scenario
//! stalls more directions than there are pipes, with a backend whose window and pushes are
//! larger (what made pipes keep bytes the sink could not take), and the new connection's bulk
//! bytes must still be spliced.

mod common;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    EchoServer, SlowBackend, Sluice, figure, free_addr, raise_fd_limit, reset, scrape_metrics,
    series, verify_echo,
};
use socket2::{Domain, Protocol, Socket, Type};

/// Connections with one stalled direction each, all on one worker. Their two chunks each would
/// take 4400 of the pool's 4096 buffers: more than the pool, even when some directions' bytes
/// wait in the worker's pipes instead.
const CROWD: usize = 2200;
/// Bytes each pushing peer writes: more than the proxy's socket toward the stalled peer takes
/// (TCP_NOTSENT_LOWAT 256 KiB unsent, plus the stalled peer's receive window), so that the
/// direction's two chunks stay queued in Sluice; less than the whole path holds, so that every
/// push ends without blocking.
const PUSH: usize = 336 * 1024;
/// The pipe scenario: more stalled directions than a worker has pipes, pushing more (so that
/// bursts are spliced while the sinks fill), into a `SlowBackend` (64 KiB receive buffers) that
/// reads one byte per connection per tick: never enough to reopen a window.
const PIPE_CROWD: usize = 400;
const PIPE_PUSH: usize = 480 * 1024;
const NEVER_READ: usize = 1;
const NEVER_TICK: Duration = Duration::from_millis(250);
/// Pipes the stalled crowd may still hold once settled (of 256).
const PIPES_HELD_MAX: f64 = 32.0;
/// The kernel buffers of the test's own sockets, small so that the crowd's bytes stay far
/// from the kernel's TCP memory pressure mark.
const PEER_BUFFER: usize = 16 * 1024;
/// The new connection's echo, its bound, and how long it may try before it counts as starved.
const ECHO_BYTES: u64 = 1 << 20;
const SERVED_WITHIN: Duration = Duration::from_secs(2);
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pushing ends when nothing moved for `SETTLED`, and in any case at `PUSH_TIMEOUT`.
const SETTLED: Duration = Duration::from_millis(500);
const PUSH_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on every other wait (connects, metrics).
const WAIT: Duration = Duration::from_secs(15);
/// Descriptors beyond two per connection in each process (Sluice's pipes, the test's own).
const FD_RESERVE: u64 = 2048;

/// The scenarios hold a gigabyte of kernel socket memory each: one at a time.
static ONE_CROWD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `n` clients connected through `front` (small buffers), once the backend holds every one of
/// them (`reached` counts what it holds).
fn connect_crowd(front: SocketAddr, n: usize, reached: impl Fn() -> usize) -> Vec<TcpStream> {
    let clients: Vec<TcpStream> = (0..n).map(|_| connect_small(front)).collect();
    wait_for("every client to reach the backend", || reached() >= n);
    clients
}

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_CROWD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether this process may hold the crowd (two descriptors per connection, in this process and
/// in Sluice, which inherits the limit); prints why not.
fn enough_fds() -> bool {
    let needed = 2 * CROWD as u64 + FD_RESERVE;
    let limit = raise_fd_limit();
    if limit < needed {
        eprintln!(
            "SKIPPED: {CROWD} stalled connections need {needed} descriptors (two per connection \
             in the test and in Sluice, plus reserves); RLIMIT_NOFILE allows {limit}"
        );
        return false;
    }
    true
}

/// Sluice with one worker and two listeners: `stalled` to the peers that never read, `echo` to
/// an echo server. Every connection shares the one worker, and its buffer pool.
struct Instance {
    sluice: Sluice,
    admin: SocketAddr,
    stalled_front: SocketAddr,
    echo_front: SocketAddr,
    _echo: EchoServer,
}

impl Instance {
    fn start(stalled: SocketAddr) -> Self {
        let echo = EchoServer::echo();
        let stalled_listener = Listener::new("stalled", &[stalled]);
        let echo_listener = Listener::new("echo", &[echo.addr()]);
        let admin = free_addr();
        let (stalled_front, echo_front) = (stalled_listener.bind, echo_listener.bind);
        let sluice = Sluice::start(
            binary(),
            &config(1, Some(admin), &[], &[stalled_listener, echo_listener]),
        );
        Self {
            sluice,
            admin,
            stalled_front,
            echo_front,
            _echo: echo,
        }
    }

    fn metric(&self, key: &str) -> f64 {
        scrape_metrics(self.admin)
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(f64::NAN)
    }

    /// Bytes Sluice forwarded so far, both ways, over every backend.
    fn forwarded(&self) -> f64 {
        scrape_metrics(self.admin).map_or(f64::NAN, |m| {
            m.iter()
                .filter(|(k, _)| {
                    k.starts_with("sluice_bytes_to_backend_total")
                        || k.starts_with("sluice_bytes_to_client_total")
                })
                .map(|(_, v)| v)
                .sum()
        })
    }

    /// Waits until Sluice forwards nothing more for `SETTLED` (bounded by `WAIT`).
    fn wait_settled(&self) {
        let deadline = Instant::now() + WAIT;
        let (mut last, mut since) = (self.forwarded(), Instant::now());
        while since.elapsed() < SETTLED && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            let now = self.forwarded();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
    }

    /// One new connection to the echo listener: how long its verified echo took, or why it
    /// failed.
    fn serve_new(&self) -> Result<Duration, String> {
        let started = Instant::now();
        match verify_echo(self.echo_front, ECHO_BYTES, 11, ECHO_TIMEOUT) {
            Ok(report) => {
                report.assert_echoed();
                Ok(started.elapsed())
            }
            Err(error) => Err(format!("{error} after {:?}", started.elapsed())),
        }
    }

    /// Resets `streams` (the test's ends of the crowd, both sides) and waits until Sluice
    /// closed the crowd: a plain close would leave the pushed bytes queued in the kernel.
    fn close_crowd(&self, streams: impl Iterator<Item = TcpStream>) {
        for stream in streams {
            reset(stream);
        }
        let key = series("sluice_connections_active", &[("listener", "stalled")]);
        let deadline = Instant::now() + WAIT;
        while self.metric(&key) != 0.0 {
            assert!(
                Instant::now() < deadline,
                "the crowd's connections did not close"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A client socket with small kernel buffers, connected to `addr`.
fn connect_small(addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))
        .expect("a client socket");
    // Before the connect, so that the window it offers is small from the start.
    let _ = socket.set_recv_buffer_size(PEER_BUFFER);
    let _ = socket.set_send_buffer_size(PEER_BUFFER);
    socket
        .connect_timeout(&addr.into(), WAIT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    socket.into()
}

/// Writes `bytes` to each stream, without ever blocking on one: until each took them all, or
/// nothing moved for `SETTLED`, or `PUSH_TIMEOUT`. Returns the bytes written.
fn push_all(streams: &[TcpStream], bytes: usize) -> u64 {
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut left = vec![bytes; streams.len()];
    for stream in streams {
        stream.set_nonblocking(true).expect("non-blocking");
    }
    let deadline = Instant::now() + PUSH_TIMEOUT;
    let mut moved_at = Instant::now();
    while left.iter().any(|&l| l > 0) && moved_at.elapsed() < SETTLED && Instant::now() < deadline {
        for (mut stream, left) in streams.iter().zip(left.iter_mut()) {
            while *left > 0 {
                match stream.write(&chunk[..(*left).min(chunk.len())]) {
                    Ok(n) => {
                        *left -= n;
                        moved_at = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("a pushing peer's write failed: {e}"),
                }
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    left.iter().map(|&l| (bytes - l) as u64).sum()
}

/// A backend that accepts connections and hands them to the test (which pushes into them and
/// never reads).
struct HoldingBackend {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HoldingBackend {
    fn start() -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))
            .expect("a listener socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        // Accepted sockets inherit these: small from the handshake on.
        let _ = socket.set_recv_buffer_size(PEER_BUFFER);
        let _ = socket.set_send_buffer_size(PEER_BUFFER);
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        // A backlog for the whole crowd (std's 128 overflows into 1 s SYN retransmissions).
        socket.listen(4096).expect("listen");
        socket.set_nonblocking(true).expect("non-blocking");
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().expect("local address");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stopping) = (Arc::clone(&accepted), Arc::clone(&stopping));
            thread::spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => lock(&accepted).push(stream),
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            stopping,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        lock(&self.accepted).len()
    }

    fn take(&self) -> Vec<TcpStream> {
        std::mem::take(&mut *lock(&self.accepted))
    }
}

impl Drop for HoldingBackend {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// TCP memory of the whole machine in pages (/proc/net/sockstat), for the figure.
fn tcp_memory_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("TCP:"))?;
            let mut words = line.split_whitespace();
            words.find(|w| *w == "mem")?;
            words.next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Serves one new connection beside the stalled crowd, reports and asserts.
fn check_new_connection(fault: &str, instance: &Instance, pushed: u64, started: Instant) {
    instance.wait_settled();
    let pipes = instance.metric("sluice_pipes_leased");
    let waits = instance.metric("sluice_buffer_waits_total");
    let spilled = instance.metric("sluice_chunks_spilled_total");
    let pages = tcp_memory_pages();
    let rss_mib = instance.sluice.rss_kib() / 1024;
    let served = instance.serve_new();
    figure(
        fault,
        &format!("a new connection's 1 MiB echo is done within {SERVED_WITHIN:?}"),
        &format!(
            "{CROWD} stalled connections ({} MiB pushed, set up in {:.1} s, TCP memory {} MiB): \
             new connection {}; Sluice RSS {rss_mib} MiB, {pipes} pipes leased, {waits} \
             receives waited for buffers, {spilled} chunks spilled",
            pushed >> 20,
            started.elapsed().as_secs_f64(),
            pages * 4 / 1024,
            match &served {
                Ok(took) => format!("echoed in {} ms", took.as_millis()),
                Err(error) => format!("not served: {error}"),
            }
        ),
    );
    let took = served.unwrap_or_else(|error| {
        panic!("a new connection beside {CROWD} stalled ones was not served: {error}")
    });
    // The crowd is sized to exhaust the pool: served, it was served by the spill.
    assert!(
        spilled > 0.0,
        "no chunk was spilled: the crowd no longer runs the pool low"
    );
    assert!(
        took <= SERVED_WITHIN,
        "a new connection beside {CROWD} stalled ones took {took:?} to echo {ECHO_BYTES} bytes"
    );
}

#[test]
fn backends_that_never_read() {
    stalled_crowd(
        "backends that never read, clients pushing, 1 worker",
        Pushing::Clients,
    );
}

#[test]
fn clients_that_never_read() {
    stalled_crowd(
        "clients that never read, backends pushing, 1 worker",
        Pushing::Backends,
    );
}

/// Which side of the crowd pushes; the other never reads.
enum Pushing {
    Clients,
    Backends,
}

/// `CROWD` connections whose one side pushes `PUSH` into the other, which never reads; then a
/// new connection must be served at once.
fn stalled_crowd(fault: &str, pushing: Pushing) {
    let _turn = one_at_a_time();
    if !enough_fds() {
        return;
    }
    let backend = HoldingBackend::start();
    let instance = Instance::start(backend.addr);
    let started = Instant::now();
    let clients = connect_crowd(instance.stalled_front, CROWD, || backend.accepted());
    let streams = backend.take();
    let pushed = match pushing {
        Pushing::Clients => push_all(&clients, PUSH),
        Pushing::Backends => push_all(&streams, PUSH),
    };
    check_new_connection(fault, &instance, pushed, started);
    instance.close_crowd(clients.into_iter().chain(streams));
}

#[test]
fn stalled_sinks_leave_the_pipes_to_others() {
    let _turn = one_at_a_time();
    if !enough_fds() {
        return;
    }
    let backend = SlowBackend::start(NEVER_READ, NEVER_TICK);
    let instance = Instance::start(backend.addr());
    let started = Instant::now();
    let clients = connect_crowd(instance.stalled_front, PIPE_CROWD, || backend.connections());
    let pushed = push_all(&clients, PIPE_PUSH);
    instance.wait_settled();
    let held = instance.metric("sluice_pipes_leased");
    let spliced_before = instance.metric("sluice_bytes_spliced_total");
    let served = instance.serve_new();
    let spliced = instance.metric("sluice_bytes_spliced_total") - spliced_before;
    figure(
        "backends that never read, clients pushing bursts, 1 worker: pipes",
        &format!(
            "the stalled crowd holds <= {PIPES_HELD_MAX} of 256 pipes; a new connection splices"
        ),
        &format!(
            "{PIPE_CROWD} stalled connections ({} MiB pushed, set up in {:.1} s): {held} pipes \
             held; the new connection's echo {}, {spliced} bytes spliced meanwhile",
            pushed >> 20,
            started.elapsed().as_secs_f64(),
            match &served {
                Ok(took) => format!("took {} ms", took.as_millis()),
                Err(error) => format!("failed: {error}"),
            }
        ),
    );
    served.unwrap_or_else(|error| panic!("the new connection was not served: {error}"));
    assert!(
        held <= PIPES_HELD_MAX,
        "{PIPE_CROWD} connections stalled behind backends that never read hold {held} pipes"
    );
    assert!(
        spliced > 0.0,
        "the new connection's {ECHO_BYTES} bytes were copied: no pipe was left for it"
    );
    instance.close_crowd(clients.into_iter());
}
