//! UDP under conditions a review found unsafe (issue 11): sessions that end while a datagram for
//! their socket is still queued, a flood of flows under a low fd limit, and a datagram pool that
//! runs dry.
//!
//! Every load loop here is bounded in count and time; every wait has a deadline.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{Sluice, UdpEcho, figure, free_addr, scrape_metrics, split_echo_reply};

with_workers_1_and_2!(replies_reach_only_the_client_that_sent_the_request);

/// Clients of the misdelivery test, each with its own id.
const CLIENTS: u32 = 64;
/// How long the misdelivery test's clients send.
const CHURN_WINDOW: Duration = Duration::from_secs(6);
/// How long a misdelivery client waits for replies after each burst.
const BURST_WAIT: Duration = Duration::from_millis(5);
/// Datagrams a misdelivery client sends per burst.
const BURST: u32 = 8;

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
