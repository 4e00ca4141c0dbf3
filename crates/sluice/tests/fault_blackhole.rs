//! A backend blackholed (issue 6): one of two backends sits in a network namespace whose every
//! packet nftables starts dropping while connections to it move bytes or sit idle, as when a
//! host dies or a network partitions (no FIN, no reset, only silence).
//!
//! With `timeouts.user_timeout: 2s` and `keepalive: { time: 1s, interval: 1s, probes: 2 }`,
//! the kernel aborts each of Sluice's backend sockets to it (unacknowledged bytes for 2 s, or
//! unanswered keepalive probes), and Sluice closes those connections toward their clients
//! within a bound, while the connections to the other backend finish with matching digests,
//! memory stays bounded and every fd is given back. A second listener with the default
//! settings (keepalive after 60 s, the kernel's user timeout) over the same backends shows
//! that the settings are what ends them: its idle connections to the blackholed backend stay
//! open meanwhile.
//!
//! Needs root, `ip` and `nft` (scripts/install-deps.sh); without them it prints "skipped".

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    Checksum, EchoServer, Netns, SeededStream, Sluice, StreamEnd, StreamSummary, figure, free_addr,
    scrape_metrics, series,
};

with_workers_1_and_2!(blackholed_backend_connections_close_within_the_configured_bound);

/// Connections through the configured listener (about half reach each backend).
const CONNECTIONS: usize = 40;
/// Connections through the listener with default settings.
const CONTROL_CONNECTIONS: usize = 8;
/// What the configured listener sets, and the bound they give.
const USER_TIMEOUT: Duration = Duration::from_secs(2);
const KEEPALIVE_TIME: Duration = Duration::from_secs(1);
/// Slack over `USER_TIMEOUT + KEEPALIVE_TIME` for a debug build on a shared machine.
const SLACK: Duration = Duration::from_secs(3);
/// Each connection to the loopback backend streams this much, paced to last through the
/// episode.
const LOOPBACK_BYTES: u64 = 2_500_000;
/// Pace of every writing client, bytes per second.
const RATE: u64 = 512 * 1024;
/// Bytes every writing connection must have echoed before the blackhole starts.
const WARM_BYTES: u64 = 32 * 1024;
/// Bound on RSS growth during the episode.
const RSS_GROWTH_MAX_KIB: u64 = 32 * 1024;
/// Greetings that tell which backend a connection reached.
const NETNS_GREETING: u8 = b'N';
const LOOPBACK_GREETING: u8 = b'L';

fn blackholed_backend_connections_close_within_the_configured_bound(workers: usize) {
    if let Some(why) = Netns::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let netns = Netns::create("bh").expect("create a netns and a veth pair");
    let inside = SocketAddr::from((netns.addr(), 0));
    let remote = netns
        .run_in(|| NetnsEcho::start(inside))
        .expect("enter the netns")
        .expect("bind the echo server in the netns");
    let local = EchoServer::greeting(&[LOOPBACK_GREETING]);
    let backends = [remote.addr, local.addr()];
    let configured = Listener::new("bh", &backends)
        .with(&format!(
            "timeouts: {{ user_timeout: {}s }}",
            USER_TIMEOUT.as_secs()
        ))
        .with(&format!(
            "keepalive: {{ time: {}s, interval: 1s, probes: 2 }}",
            KEEPALIVE_TIME.as_secs()
        ))
        .with("passive: { consecutive_failures: 0 }");
    let control = Listener::new("control", &backends).with("passive: { consecutive_failures: 0 }");
    let (front, control_front) = (configured.bind, control.bind);
    let admin = free_addr();
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], &[configured, control]),
    );
    let label = format!("{workers} worker(s)");
    let baseline_sockets = socket_count(&sluice);

    // Connect everything; the greeting says which backend each connection reached.
    let connections: Vec<(TcpStream, u8)> = (0..CONNECTIONS).map(|_| connect(front)).collect();
    let controls: Vec<(TcpStream, u8)> = (0..CONTROL_CONNECTIONS)
        .map(|_| connect(control_front))
        .collect();
    let to_netns = connections
        .iter()
        .filter(|(_, g)| *g == NETNS_GREETING)
        .count();
    assert!(
        (CONNECTIONS / 4..=CONNECTIONS * 3 / 4).contains(&to_netns),
        "{label}: round robin sent {to_netns} of {CONNECTIONS} to the netns backend"
    );
    let controls_held: Vec<TcpStream> = controls
        .into_iter()
        .filter_map(|(stream, g)| (g == NETNS_GREETING).then_some(stream))
        .collect();
    assert!(
        !controls_held.is_empty(),
        "{label}: no control connection reached the netns backend"
    );

    // Start the traffic: every loopback connection streams LOOPBACK_BYTES; every other netns
    // connection streams without end (so bytes are in flight when the blackhole starts),
    // the rest of them sit idle.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut netns_seen = 0;
    for (i, (stream, greeting)) in connections.into_iter().enumerate() {
        let role = match greeting {
            LOOPBACK_GREETING => Role::Finite(LOOPBACK_BYTES),
            _ => {
                netns_seen += 1;
                if netns_seen % 2 == 1 {
                    Role::Endless
                } else {
                    Role::Idle
                }
            }
        };
        clients.push(Client::start(stream, role, i as u64, &stop));
    }
    wait_until(Duration::from_secs(15), || {
        clients
            .iter()
            .filter(|c| c.role != Role::Idle)
            .all(|c| c.received.load(Ordering::SeqCst) >= WARM_BYTES)
    })
    .unwrap_or_else(|()| panic!("{label}: the transfers did not start"));

    // Blackhole: from now on the netns neither receives nor sends anything.
    let rss_before = sluice.rss_kib();
    let blackholed_at = Instant::now();
    netns
        .blackhole()
        .expect("nft: drop everything in the netns");
    let bound = USER_TIMEOUT + KEEPALIVE_TIME + SLACK;
    let mut rss_max = rss_before;
    let netns_clients = || {
        clients
            .iter()
            .filter(|c| c.role != Role::Finite(LOOPBACK_BYTES))
    };
    while netns_clients().any(|c| !c.ended()) && blackholed_at.elapsed() < bound * 3 {
        rss_max = rss_max.max(sluice.rss_kib());
        thread::sleep(Duration::from_millis(50));
    }
    rss_max = rss_max.max(sluice.rss_kib());
    let open_controls = controls_held.iter().filter(|s| still_open(s)).count();

    // Every connection to the blackholed backend ended toward its client, within the bound.
    let mut close_times = Vec::new();
    for client in netns_clients() {
        let outcome = client.outcome();
        let after = outcome
            .ended_at
            .map(|t| t.saturating_duration_since(blackholed_at));
        close_times.push((client.role, after, outcome.end));
    }
    let unclosed: Vec<_> = close_times.iter().filter(|c| c.1.is_none()).collect();
    assert!(
        unclosed.is_empty(),
        "{label}: connections to the blackholed backend still open after {:?}: {unclosed:?}\n\
         --- sluice stderr ---\n{}",
        bound * 3,
        sluice.stderr_text()
    );
    let max_close = |role: Role| {
        close_times
            .iter()
            .filter(|c| c.0 == role)
            .filter_map(|c| c.1)
            .max()
            .unwrap_or_default()
    };
    let min_close = close_times
        .iter()
        .filter_map(|c| c.1)
        .min()
        .unwrap_or_default();
    let (max_active, max_idle) = (max_close(Role::Endless), max_close(Role::Idle));
    assert!(
        max_active.max(max_idle) < bound,
        "{label}: closed after {max_active:?} (streaming) and {max_idle:?} (idle), not within \
         {bound:?}: {close_times:?}"
    );
    // Not closed by anything but the kernel giving up: not before a good part of the timeout.
    assert!(
        min_close >= Duration::from_millis(500),
        "{label}: a connection closed {min_close:?} after the blackhole: too early to be the \
         user timeout or keepalive: {close_times:?}"
    );
    assert_eq!(
        open_controls,
        controls_held.len(),
        "{label}: with the default settings, idle connections to the blackholed backend stay \
         open that long: the settings are what closes them"
    );

    // The others finish, every byte echoed.
    stop.store(true, Ordering::SeqCst);
    let mut digests_match = 0;
    let loopback_count = clients
        .iter()
        .filter(|c| c.role == Role::Finite(LOOPBACK_BYTES))
        .count();
    for client in clients {
        let role = client.role;
        let outcome = client.join();
        if role == Role::Finite(LOOPBACK_BYTES) {
            assert_eq!(
                outcome.end,
                StreamEnd::Eof,
                "{label}: a loopback connection did not finish cleanly: {outcome:?}"
            );
            assert_eq!(
                outcome.sent,
                Some(outcome.received),
                "{label}: a loopback connection's echo differs from what it sent"
            );
            digests_match += 1;
        }
    }
    let rss_growth = rss_max.saturating_sub(rss_before);
    assert!(
        rss_growth < RSS_GROWTH_MAX_KIB,
        "{label}: RSS grew by {rss_growth} KiB during the episode"
    );

    // Every socket given back, except the control connections' two each. (Pipes leased for
    // the bulk transfers stay in the worker's pool: they are bounded and reused.)
    let expected_sockets = baseline_sockets + 2 * controls_held.len();
    wait_until(Duration::from_secs(10), || {
        socket_count(&sluice) == expected_sockets
    })
    .unwrap_or_else(|()| {
        panic!(
            "{label}: {} sockets open, expected {expected_sockets} (baseline \
             {baseline_sockets} + 2 per held control connection)",
            socket_count(&sluice)
        )
    });
    let metrics = scrape_metrics(admin).unwrap();
    let closed = |reason| {
        let key = series(
            "sluice_connections_closed_total",
            &[("listener", "bh"), ("reason", reason)],
        );
        metrics.get(&key).copied().unwrap_or(0.0)
    };
    // The kernel's ETIMEDOUT on the backend socket is an error on the backend's side, carried
    // to the client as a reset (a client that is writing may meet it in its write, and its
    // next read then sees an end of stream).
    assert_eq!(
        closed("backend_reset"),
        close_times.len() as f64,
        "{label}: every connection to the blackholed backend is closed as a backend error"
    );
    figure(
        &format!(
            "backend blackholed (nft drop), user_timeout {}s, keepalive {}s/1s x2, {label}",
            USER_TIMEOUT.as_secs(),
            KEEPALIVE_TIME.as_secs()
        ),
        &format!(
            "its connections closed within {} s; others' digests match; RSS growth < {} MiB; \
             sockets back",
            bound.as_secs(),
            RSS_GROWTH_MAX_KIB / 1024
        ),
        &format!(
            "{} to it closed (as backend_reset): streaming max {:.2} s, idle max {:.2} s, first \
             {:.2} s; {digests_match}/{loopback_count} digests; RSS +{:.1} MiB; sockets back; \
             {open_controls}/{} default-settings connections still open",
            close_times.len(),
            max_active.as_secs_f64(),
            max_idle.as_secs_f64(),
            min_close.as_secs_f64(),
            rss_growth as f64 / 1024.0,
            controls_held.len()
        ),
    );

    drop(controls_held);
    drop(sluice);
    drop(remote);
    drop(netns);
}

/// Connects to `front` and reads the backend's one-byte greeting.
fn connect(front: SocketAddr) -> (TcpStream, u8) {
    let mut stream = TcpStream::connect_timeout(&front, Duration::from_secs(5)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 1];
    stream
        .read_exact(&mut greeting)
        .expect("the backend's greeting");
    assert!(
        [NETNS_GREETING, LOOPBACK_GREETING].contains(&greeting[0]),
        "unexpected greeting {greeting:?}"
    );
    (stream, greeting[0])
}

/// Sockets among Sluice's open fds.
fn socket_count(sluice: &Sluice) -> usize {
    let dir = format!("/proc/{}/fd", sluice.pid());
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Whether `stream` has neither ended nor received anything (a non-blocking read would block).
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open =
        matches!((&*stream).read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// Polls `done` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return Err(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What a client connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Streams this many bytes, paced, then half-closes.
    Finite(u64),
    /// Streams, paced, until its connection fails or the test stops it.
    Endless,
    /// Sends nothing.
    Idle,
}

/// How one client connection ended.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// What it wrote, when it wrote everything it meant to.
    sent: Option<StreamSummary>,
    received: StreamSummary,
    end: StreamEnd,
    /// When reading stopped (EOF, reset, error); `None` while it is still open.
    ended_at: Option<Instant>,
}

/// One client connection: a paced writer and a reader, each on its own thread.
struct Client {
    role: Role,
    received: Arc<AtomicU64>,
    ended_at: Arc<std::sync::Mutex<Option<Outcome>>>,
    writer: JoinHandle<Option<StreamSummary>>,
    reader: JoinHandle<()>,
}

impl Client {
    fn start(stream: TcpStream, role: Role, seed: u64, stop: &Arc<AtomicBool>) -> Client {
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let stream = Arc::new(stream);
        let received = Arc::new(AtomicU64::new(0));
        let ended_at = Arc::new(std::sync::Mutex::new(None));
        let writer = {
            let stream = Arc::clone(&stream);
            let stop = Arc::clone(stop);
            thread::spawn(move || paced_write(&stream, role, seed, &stop))
        };
        let reader = {
            let stream = Arc::clone(&stream);
            let received = Arc::clone(&received);
            let ended_at = Arc::clone(&ended_at);
            thread::spawn(move || {
                let outcome = read_counting(&stream, &received);
                *ended_at.lock().unwrap() = Some(outcome);
                // Unblock a writer stuck on a connection that is gone.
                let _ = stream.shutdown(Shutdown::Both);
            })
        };
        Client {
            role,
            received,
            ended_at,
            writer,
            reader,
        }
    }

    fn ended(&self) -> bool {
        self.ended_at.lock().unwrap().is_some()
    }

    /// How it ended so far (`ended_at: None` while still open).
    fn outcome(&self) -> Outcome {
        self.ended_at.lock().unwrap().unwrap_or(Outcome {
            sent: None,
            received: Checksum::new().finish(),
            end: StreamEnd::TimedOut,
            ended_at: None,
        })
    }

    fn join(self) -> Outcome {
        let Client {
            writer,
            reader,
            ended_at,
            ..
        } = self;
        let sent = writer.join().expect("writer thread");
        reader.join().expect("reader thread");
        let mut outcome = ended_at
            .lock()
            .unwrap()
            .expect("the reader records how it ended");
        outcome.sent = sent;
        outcome
    }
}

/// Writes the seeded stream `(seed, ..)` at [`RATE`]; returns its summary once a finite
/// stream was written whole and half-closed, `None` otherwise.
fn paced_write(
    stream: &TcpStream,
    role: Role,
    seed: u64,
    stop: &AtomicBool,
) -> Option<StreamSummary> {
    let bytes = match role {
        Role::Idle => return None,
        Role::Finite(bytes) => bytes,
        Role::Endless => u64::MAX,
    };
    let mut source = SeededStream::with_max_write(seed, bytes, 16 * 1024);
    let mut checksum = Checksum::new();
    let started = Instant::now();
    while let Some(chunk) = source.next_chunk() {
        if role == Role::Endless && stop.load(Ordering::SeqCst) {
            return None;
        }
        if (&*stream).write_all(chunk).is_err() {
            return None;
        }
        checksum.update(chunk);
        let due = Duration::from_secs_f64(checksum.bytes() as f64 / RATE as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    stream.shutdown(Shutdown::Write).ok()?;
    Some(checksum.finish())
}

/// Reads until the stream ends (bounded to 60 s), counting bytes as they come.
fn read_counting(stream: &TcpStream, received: &AtomicU64) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut checksum = Checksum::new();
    let mut buffer = vec![0; 64 * 1024];
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = loop {
        if Instant::now() >= deadline {
            // Far past every bound the test asserts: report, do not hang.
            break StreamEnd::TimedOut;
        }
        match (&*stream).read(&mut buffer) {
            Ok(0) => break StreamEnd::Eof,
            Ok(n) => {
                checksum.update(&buffer[..n]);
                received.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break StreamEnd::Reset,
            Err(e) => break StreamEnd::Error(e.kind()),
        }
    };
    Outcome {
        sent: None,
        received: checksum.finish(),
        end,
        ended_at: (end != StreamEnd::TimedOut).then(Instant::now),
    }
}

/// An echo server inside the netns that greets with [`NETNS_GREETING`]. Its threads poll a
/// stop flag, so it stops on drop even while its peers are blackholed (a plain blocking
/// accept could never be woken through a network that drops everything).
struct NetnsEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl NetnsEcho {
    /// Binds `addr`; call it inside the netns.
    fn start(addr: SocketAddr) -> io::Result<NetnsEcho> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let stop = Arc::clone(&stop);
                            thread::spawn(move || echo(stream, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Ok(NetnsEcho {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for NetnsEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Greets, then echoes until EOF (then half-closes), an error, or `stop`. Writes give up after
/// a second, so a thread blocked toward a blackholed peer ends.
fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(&[NETNS_GREETING]).is_err() {
        return;
    }
    let mut buffer = vec![0; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buffer) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}
