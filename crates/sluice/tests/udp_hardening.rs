//! UDP under conditions a review found unsafe (issue 11): sessions that end while a datagram for
//! their socket is still queued, a flood of flows under a low fd limit, and a datagram pool that
//! runs dry.
//!
//! Every load loop here is bounded in count and time; every wait has a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    EchoServer, Netns, Sluice, UdpEcho, assert_echo, fd_limit_wrapper, fd_limits, figure,
    free_addr, scrape_metrics, series, split_echo_reply,
};

with_workers_1_and_2!(
    replies_reach_only_the_client_that_sent_the_request,
    a_flood_of_flows_leaves_tcp_and_the_admin_endpoint_their_fds,
    sessions_wait_for_datagram_buffers_without_spinning,
);

/// Clients of the misdelivery test, each with its own id.
const CLIENTS: u32 = 64;
/// How long the misdelivery test's clients send.
const CHURN_WINDOW: Duration = Duration::from_secs(6);
/// How long a misdelivery client waits for replies after each burst.
const BURST_WAIT: Duration = Duration::from_millis(5);
/// Datagrams a misdelivery client sends per burst.
const BURST: u32 = 8;

/// The fd limit of the fd-budget test, soft and hard.
const FD_LIMIT: u64 = 512;
/// Flows (distinct client addresses) of the fd-budget test: more than the limit.
const FLOWS: u32 = 600;
/// TCP connections the fd-budget test holds open at once (its share is about 90).
const TCP_HELD: usize = 64;
/// Bound on every wait of the fd-budget test.
const WAIT: Duration = Duration::from_secs(10);

/// Flows of the datagram-pool test.
const POOL_FLOWS: u32 = 32;
/// Datagrams each flow of the datagram-pool test sends: together far more than the pool's 256
/// buffers and than what the backends' send buffers take before their sends block.
const POOL_DATAGRAMS: u32 = 48;
/// The size of each of them (fragmented on the veth, whole on loopback).
const POOL_DATAGRAM_SIZE: usize = 8192;
/// How long the datagram-pool test watches Sluice's CPU while the pool is empty.
const STARVED_WINDOW: Duration = Duration::from_secs(2);

/// One dead backend (ICMP port unreachable ends a session at once) and one echo, round-robin,
/// `responses: 1` (an echo session ends at its first reply) and passive ejection off (the dead
/// backend stays in turn): sessions end all the time, toward both backends, while datagrams of
/// other sessions are queued in the same batch. Every request carries its client's id, and
/// every reply must reach the client whose id it carries. On 1a79917 a session socket closed
/// while a send naming its fd was still queued let a new session take the fd number, so the
/// send left on the other client's socket and its answer reached the other client (hundreds
/// of misdelivered replies in 6 s).
fn replies_reach_only_the_client_that_sent_the_request(workers: usize) {
    let echo = UdpEcho::start("echo");
    let dead = free_addr();
    let admin = free_addr();
    let listener = Listener::new("churn", &[dead, echo.addr()])
        .protocol("udp")
        .with("timeouts: { idle: 2s }")
        .with("responses: 1")
        .with("passive: { consecutive_failures: 0 }");
    let proxy = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));

    let stop = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let misdelivered = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (stop, replies, misdelivered) =
                (stop.clone(), replies.clone(), misdelivered.clone());
            thread::spawn(move || {
                churn_client(id, proxy, &stop, &replies, &misdelivered);
            })
        })
        .collect();
    thread::sleep(CHURN_WINDOW);
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().expect("a client thread");
    }
    let (replies, misdelivered) = (
        replies.load(Ordering::SeqCst),
        misdelivered.load(Ordering::SeqCst),
    );
    figure(
        &format!("udp session churn, {CLIENTS} clients, one dead backend, {workers} worker(s)"),
        "0 misdelivered replies",
        &format!("{misdelivered} misdelivered of {replies} replies in {CHURN_WINDOW:?}"),
    );
    let udp_metrics = udp_metrics(admin);
    assert!(
        replies > 100,
        "only {replies} replies in {CHURN_WINDOW:?}: the echo backend was not reached\n\
         {udp_metrics}\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );
    assert_eq!(
        misdelivered, 0,
        "{misdelivered} of {replies} replies reached a client that did not send the request"
    );
}

/// Under RLIMIT_NOFILE 512, a tcp and a udp listener (default `max_sessions`, 100000), and 600
/// flows of one datagram each: the udp sessions stay within their share of the fd budget (the
/// rest are dropped and counted as `sessions_full`), so the tcp listener still forwards (bytes
/// checked, 64 connections open at once) and /metrics still answers. On 1a79917 the sessions took every fd: the TCP
/// listener and the admin endpoint stopped.
fn a_flood_of_flows_leaves_tcp_and_the_admin_endpoint_their_fds(workers: usize) {
    let wrapper = match fd_limit_wrapper(FD_LIMIT) {
        Ok(wrapper) => wrapper,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let tcp_backend = EchoServer::echo();
    let udp_backend = UdpEcho::start("echo");
    let tcp = Listener::new("tcp", &[tcp_backend.addr()]);
    let udp = Listener::new("udp", &[udp_backend.addr()]).protocol("udp");
    let (tcp_front, udp_front) = (tcp.bind, udp.bind);
    let admin = free_addr();
    let yaml = config(workers, Some(admin), &[], &[tcp, udp]);
    let sluice = Sluice::try_start_with(binary(), &yaml, WAIT, &wrapper)
        .unwrap_or_else(|e| panic!("{e}\n--- config ---\n{yaml}"));
    assert_eq!(fd_limits(sluice.pid()), Some((FD_LIMIT, FD_LIMIT)));

    for n in 0..FLOWS {
        // A client address of its own per flow (so no two flows share a key), dropped at once:
        // the session stays in Sluice until its idle timeout (60 s).
        let ip = Ipv4Addr::new(127, 249, (n / 250) as u8, (n % 250) as u8 + 1);
        let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        socket
            .send_to(&n.to_be_bytes(), udp_front)
            .expect("send a flow's datagram");
    }
    let udp_key = |name: &str, label: Option<(&str, &str)>| match label {
        Some(label) => series(name, &[("listener", "udp"), label]),
        None => series(name, &[("listener", "udp")]),
    };
    let created = udp_key("sluice_udp_sessions_created_total", None);
    let full = udp_key(
        "sluice_udp_dropped_total",
        Some(("reason", "sessions_full")),
    );
    let socket = udp_key("sluice_udp_dropped_total", Some(("reason", "socket")));
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let metrics = scrape_metrics(admin);
        let seen = metrics.as_ref().map_or(0.0, |m| {
            [&created, &full, &socket]
                .iter()
                .map(|k| m.get(*k).copied().unwrap_or(0.0))
                .sum::<f64>()
        });
        if seen >= f64::from(FLOWS) || Instant::now() >= deadline {
            break metrics;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let metrics = metrics.unwrap_or_else(|e| {
        panic!(
            "/metrics does not answer after {FLOWS} flows: {e}\n--- sluice stderr ---\n{}",
            sluice.stderr_text()
        )
    });
    let get = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
    let (sessions, dropped, no_socket) = (get(&created), get(&full), get(&socket));
    let fds = sluice.fd_count();
    // The TCP listener still has its share: bytes checked both ways, and room for
    // [`TCP_HELD`] connections open at once.
    assert_echo(tcp_front, 256 * 1024, 11, WAIT);
    let held: Vec<TcpStream> = (0..TCP_HELD)
        .map(|i| {
            let mut stream = TcpStream::connect_timeout(&tcp_front, WAIT)
                .unwrap_or_else(|e| panic!("tcp connection {i} while udp holds its share: {e}"));
            stream.set_read_timeout(Some(WAIT)).expect("a read timeout");
            let byte = [i as u8];
            stream.write_all(&byte).expect("write one byte");
            let mut back = [0u8; 1];
            stream.read_exact(&mut back).unwrap_or_else(|e| {
                panic!(
                    "tcp connection {i} of {TCP_HELD} not echoed while udp holds its share: \
                     {e}\n--- sluice stderr ---\n{}",
                    sluice.stderr_text()
                )
            });
            assert_eq!(back, byte);
            stream
        })
        .collect();
    figure(
        &format!("udp flood under RLIMIT_NOFILE {FD_LIMIT}, {FLOWS} flows, {workers} worker(s)"),
        "tcp forwards, /metrics answers, sessions within their share, the rest counted",
        &format!("{sessions} sessions, {dropped} dropped as sessions_full, {fds} fds open"),
    );
    assert_eq!(
        no_socket,
        0.0,
        "no session met EMFILE: {sessions} sessions, {dropped} sessions_full\n--- sluice \
         stderr ---\n{}",
        sluice.stderr_text()
    );
    assert_eq!(
        sessions + dropped,
        f64::from(FLOWS),
        "every flow either got a session or was counted as dropped"
    );
    assert!(
        dropped > 0.0 && sessions > 0.0,
        "{sessions} sessions, {dropped} dropped: the share is below {FLOWS}"
    );
    assert!(fds < FD_LIMIT as usize, "{fds} fds open");
    scrape_metrics(admin).expect("/metrics still answers with the tcp connections open");
    drop(held);
    assert!(
        sluice.stderr_text().contains("max_sessions"),
        "start-up warns that max_sessions is capped by the fd budget\n--- sluice stderr \
         ---\n{}",
        sluice.stderr_text()
    );
}

/// The backend sits behind a link throttled to 1 Mbit/s (a network namespace, tc tbf), so the
/// sessions' sends to it block once their send buffers are full, and each holds its datagram
/// buffer: a flood of 32 flows x 48 datagrams of 8 KiB empties the worker's datagram pool,
/// while the backend's replies keep arriving on the sessions' sockets. A session receive that
/// ends for want of buffers must wait for buffers, as the listener receive does; on 1a79917 it
/// was re-armed at once, failed again at once, and the worker spun at full CPU for as long as
/// the pool stayed empty. Once the link is fast again, every session is served again.
fn sessions_wait_for_datagram_buffers_without_spinning(workers: usize) {
    if let Some(why) = Netns::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let netns = Netns::create("nobufs").expect("create a netns and a veth pair");
    let inside = SocketAddr::from((netns.addr(), 0));
    let backend = netns
        .run_in(|| UdpEcho::start_on(inside, "echo"))
        .expect("enter the netns")
        .expect("bind the echo in the netns");
    let admin = free_addr();
    let listener = Listener::new("pool", &[backend.addr()]).protocol("udp");
    let proxy = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));
    let clients: Vec<UdpSocket> = (0..POOL_FLOWS)
        .map(|n| {
            let ip = Ipv4Addr::new(127, 248, 0, n as u8 + 1);
            let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
            socket.set_read_timeout(Some(WAIT)).expect("a read timeout");
            socket
        })
        .collect();
    for (n, client) in clients.iter().enumerate() {
        echo_within(client, proxy, &pool_payload(n as u32, 0), WAIT)
            .unwrap_or_else(|e| panic!("flow {n} before the throttle: {e}"));
    }

    if let Err(e) = netns.throttle("1mbit") {
        eprintln!("skipped: cannot shape the veth (tc from iproute2 needed): {e}");
        return;
    }
    for seq in 1..=POOL_DATAGRAMS {
        for (n, client) in clients.iter().enumerate() {
            // The kernel may drop some of the flood (the listener's receive queue is full):
            // that is the point.
            let _ = client.send_to(&pool_payload(n as u32, seq), proxy);
        }
    }
    let to_backend = series(
        "sluice_udp_datagrams_total",
        &[("listener", "pool"), ("direction", "to_backend")],
    );
    let forwarded = |admin| {
        scrape_metrics(admin)
            .ok()
            .and_then(|m| m.get(&to_backend).copied())
            .unwrap_or(0.0)
    };
    // Settled: Sluice took what it could of the flood (the count stays put for 500 ms).
    let deadline = Instant::now() + WAIT;
    let mut last = (forwarded(admin), Instant::now());
    while Instant::now() < deadline && last.1.elapsed() < Duration::from_millis(500) {
        thread::sleep(Duration::from_millis(50));
        let now = forwarded(admin);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let cpu_before = sluice.cpu_time();
    let window = Instant::now();
    thread::sleep(STARVED_WINDOW);
    let cpu = sluice.cpu_time().saturating_sub(cpu_before);
    let elapsed = window.elapsed();
    let share = cpu.as_secs_f64() / elapsed.as_secs_f64();
    let forwarded_in_window = forwarded(admin) - last.0;
    figure(
        &format!("udp datagram pool empty (backend link 1 Mbit/s), {workers} worker(s)"),
        "< 15% of a core while the pool is empty; every flow served once the link is fast",
        &format!(
            "{:.0}% of a core over {elapsed:.1?}; {forwarded_in_window} forwarded meanwhile",
            share * 100.0
        ),
    );
    assert!(
        share < 0.15,
        "sluice used {cpu:?} of CPU in {elapsed:?} while its datagram pool was empty: it \
         spins\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );

    netns.unthrottle().expect("remove the shaping");
    // The echoes of the flood come back first and may fill a client's receive buffer, where a
    // later echo would be dropped: each flow reads them off, then sends fresh datagrams (a few
    // tries, as any UDP client would) until one is echoed.
    let deadline = Instant::now() + WAIT;
    for (n, client) in clients.iter().enumerate() {
        let mut tries = 0;
        loop {
            drain(client, deadline);
            tries += 1;
            let payload = pool_payload(n as u32, u32::MAX - tries);
            match echo_within(client, proxy, &payload, Duration::from_secs(1)) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => panic!(
                    "flow {n} once the link is fast again, {tries} tries: {e}\n--- sluice \
                     stderr ---\n{}",
                    sluice.stderr_text()
                ),
                Err(_) => {}
            }
        }
    }
}

/// Reads what waits on `socket` until it has been quiet for 100 ms (or `deadline`).
fn drain(socket: &UdpSocket, deadline: Instant) {
    let mut buf = vec![0u8; 65536];
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("a read timeout");
    while Instant::now() < deadline && socket.recv(&mut buf).is_ok() {}
}

/// A datagram of the pool test: flow `n`'s `seq`th, [`POOL_DATAGRAM_SIZE`] bytes.
fn pool_payload(n: u32, seq: u32) -> Vec<u8> {
    let mut payload = vec![(n % 251) as u8; POOL_DATAGRAM_SIZE];
    payload[..4].copy_from_slice(&n.to_be_bytes());
    payload[4..8].copy_from_slice(&seq.to_be_bytes());
    payload
}

/// Sends `payload` to `to` and waits at most `timeout` for its echo, passing over echoes of
/// earlier datagrams.
fn echo_within(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    socket
        .send_to(payload, to)
        .map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let Ok(len) = socket.recv(&mut buf) else {
            continue;
        };
        if split_echo_reply(&buf[..len]).is_some_and(|(_, echoed)| echoed == payload) {
            return Ok(());
        }
    }
    Err(format!("no echo within {timeout:?}"))
}

/// One client of the misdelivery test: bursts of requests `[id, seq]`, then whatever replies
/// come within [`BURST_WAIT`], until `stop`.
fn churn_client(
    id: u32,
    proxy: SocketAddr,
    stop: &AtomicBool,
    replies: &AtomicU64,
    misdelivered: &AtomicU64,
) {
    let ip = Ipv4Addr::new(127, 250, (id / 250) as u8, (id % 250) as u8 + 1);
    let mut buf = [0u8; 256];
    let mut seq = 0u32;
    let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    socket
        .set_read_timeout(Some(BURST_WAIT))
        .expect("a read timeout");
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..BURST {
            let mut request = [0u8; 8];
            request[..4].copy_from_slice(&id.to_be_bytes());
            request[4..].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
            // A send may fail for a moment when the loopback queue is full; the next burst
            // tries again.
            let _ = socket.send_to(&request, proxy);
        }
        let wait_until = Instant::now() + BURST_WAIT;
        while Instant::now() < wait_until {
            let Ok(len) = socket.recv(&mut buf) else {
                break;
            };
            let Some((_, payload)) = split_echo_reply(&buf[..len]) else {
                continue;
            };
            replies.fetch_add(1, Ordering::Relaxed);
            if payload.len() != 8 || payload[..4] != id.to_be_bytes() {
                misdelivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The udp series of /metrics, one per line, for failure messages.
fn udp_metrics(admin: SocketAddr) -> String {
    let mut lines: Vec<String> = scrape_metrics(admin)
        .map(|m| {
            m.into_iter()
                .filter(|(k, _)| k.starts_with("sluice_udp"))
                .map(|(k, v)| format!("{k} {v}"))
                .collect()
        })
        .unwrap_or_default();
    lines.sort();
    lines.join("\n")
}
