//! UDP listeners through the real binary: echo backends that say who they are (each reply
//! starts with the backend's name), clients bound to distinct `127.x` source addresses, a real
//! DNS server (dnsmasq) queried with dig, and a flood of 100,000 distinct flows against a
//! bounded session table.
//!
//! Every reply is checked against what was sent (SHA-256), and must come from exactly the
//! address the client sent to. Counters are read from `/metrics`, summed over the workers.
//! Client addresses come from `127.251.0.0` to `127.254.255.255`, outside the block
//! `free_addr` hands to listeners and backends.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, TIMEOUT, assert_maglev_choices, binary, config};
use sluice_testkit::{
    Sluice, UdpEcho, UdpEchoPool, free_addr, run_with_timeout, scrape_metrics, series,
    split_echo_reply, summary_of, wait_metric,
};

with_workers_1_and_2!(
    echo_returns_every_datagram_intact_from_a_specific_bind,
    echo_returns_every_datagram_intact_from_a_wildcard_bind,
    maglev_sends_each_client_to_the_same_backend_on_two_instances,
    dns_queries_are_answered_and_each_frees_its_session,
    a_killed_backend_loses_a_few_datagrams_then_its_clients_move,
    a_full_table_drops_exactly_the_overflow,
    a_full_table_evicts_exactly_the_overflow,
    an_idle_session_expires_and_the_client_gets_a_new_one,
    per_packet_alternates_backends_and_drops_replies,
    open_sessions_never_delay_shutdown,
    sessions_of_a_removed_backend_move_on_their_next_datagram,
    ipv6_and_ipv4_clients_of_a_dual_stack_bind_get_replies_from_where_they_sent,
);

/// How long a reply may take when none is expected to be lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a counter may take to show what the traffic already did.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
/// Payload sizes each client sends: empty, tiny, around one MTU, jumbo and nearly 64 KiB.
const SIZES: [usize; 8] = [0, 1, 64, 300, 1472, 9000, 61_440, 512];

// ---- Scenarios ----

/// A specific bind: 12 clients, 8 datagrams each from 0 B to 60 KiB.
fn echo_returns_every_datagram_intact_from_a_specific_bind(workers: usize) {
    let pool = UdpEchoPool::start(3);
    let listener = udp("echo", &pool.addrs());
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let clients: Vec<(Ipv4Addr, Vec<SocketAddr>)> = (1..=12)
        .map(|c| (Ipv4Addr::new(127, 254, 10, c), vec![proxy]))
        .collect();
    check_echo(&sluice, admin, "echo", &clients);
}

/// A wildcard bind `0.0.0.0:PORT`: each client sends to two other addresses of the loopback
/// block, and each reply must come from the one its datagram went to (`IP_PKTINFO`). The two
/// destinations are two flows, so two sessions, per client.
fn echo_returns_every_datagram_intact_from_a_wildcard_bind(workers: usize) {
    let pool = UdpEchoPool::start(3);
    let (sluice, admin, port) = start_on_wildcard(workers, &pool.addrs());
    let clients: Vec<(Ipv4Addr, Vec<SocketAddr>)> = (1..=12)
        .map(|c| {
            let to = |third| SocketAddr::from((Ipv4Addr::new(127, 254, third, c), port));
            (Ipv4Addr::new(127, 254, 11, c), vec![to(200), to(201)])
        })
        .collect();
    check_echo(&sluice, admin, "wild", &clients);
}

/// `maglev`: each client IP sticks to one backend from two source ports (which SO_REUSEPORT
/// may hand to different workers); a second instance with the backends listed in another order
/// agrees client by client; and both agree with the table this test builds itself.
fn maglev_sends_each_client_to_the_same_backend_on_two_instances(workers: usize) {
    let pool = UdpEchoPool::start(3);
    let addrs = pool.addrs();
    let reordered = vec![addrs[2], addrs[0], addrs[1]];
    let first = udp("maglev", &addrs).algorithm("maglev");
    let second = udp("maglev", &reordered).algorithm("maglev");
    let (proxy_a, proxy_b) = (first.bind, second.bind);
    let (sluice_a, _) = start(workers, &[first]);
    let (sluice_b, _) = start(workers, &[second]);
    let clients: Vec<Ipv4Addr> = (1..=30).map(|c| Ipv4Addr::new(127, 254, 12, c)).collect();
    let on_a = maglev_affinity(&sluice_a, proxy_a, &clients);
    let on_b = maglev_affinity(&sluice_b, proxy_b, &clients);
    assert_eq!(on_a, on_b, "the two instances disagree");
    assert_maglev_choices(&addrs, &on_a);
    let used: HashSet<usize> = on_a.values().copied().collect();
    assert!(used.len() == 3, "30 clients reached only backends {used:?}");
}

/// dnsmasq behind a `responses: 1` listener (health-checked over DNS's TCP port): 50 dig
/// queries, each from a new source port, each answered; each session ends with its answer,
/// long before the 60 s idle timeout.
fn dns_queries_are_answered_and_each_frees_its_session(workers: usize) {
    const QUERIES: usize = 50;
    let dns = Dnsmasq::start();
    let listener = udp("dns", &[dns.addr])
        .with("responses: 1")
        .with("health: { check: tcp, interval: 1s, timeout: 500ms }");
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let up = series(
        "sluice_backend_up",
        &[("listener", "dns"), ("backend", &dns.addr.to_string())],
    );
    assert_eq!(metric(admin, &up), 1.0, "the TCP probe of dnsmasq");
    let started = Instant::now();
    for n in 0..QUERIES {
        let answer = dig(proxy);
        assert_eq!(
            answer.as_deref(),
            Ok("10.1.2.3"),
            "query {n} through sluice\n--- dnsmasq log ---\n{}\n--- sluice stderr ---\n{}",
            dns.log(),
            sluice.stderr_text()
        );
    }
    eprintln!(
        "workers {workers}: {QUERIES} dig queries through sluice in {:?}",
        started.elapsed()
    );
    let n = QUERIES as f64;
    expect(
        &sluice,
        admin,
        &udp_series("sluice_udp_sessions_active", "dns", None),
        0.0,
    );
    for (key, value) in [
        (ended("dns", "closed"), n),
        (ended("dns", "expired"), 0.0),
        (
            udp_series("sluice_udp_sessions_created_total", "dns", None),
            n,
        ),
        (datagrams("dns", "to_backend"), n),
        (datagrams("dns", "to_client"), n),
    ] {
        expect(&sluice, admin, &key, value);
    }
}

/// Two backends under maglev; backend-1 is killed (its socket closed, so the kernel answers
/// ICMP port unreachable). Its clients lose a few datagrams: each one ends its session and
/// counts as a passive failure, and after 5 the backend is ejected and the table sends them to
/// backend-0. Backend-0's clients lose nothing, and no session stays on the dead backend.
fn a_killed_backend_loses_a_few_datagrams_then_its_clients_move(workers: usize) {
    const ROUNDS: usize = 30;
    let mut pool = UdpEchoPool::start(2);
    let dead = pool.addrs()[1];
    // An ejection of 60 s (not 10 s) so that the backend cannot come back during the test.
    let listener = udp("kill", &pool.addrs())
        .algorithm("maglev")
        .with("passive: { consecutive_failures: 5, ejection_time: 60s }");
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let clients: Vec<UdpSocket> = (1..=20)
        .map(|c| client(Ipv4Addr::new(127, 254, 13, c)))
        .collect();
    let before: Vec<String> = clients
        .iter()
        .map(|socket| served_by(&sluice, socket, proxy, 3))
        .collect();
    let victims: Vec<usize> = (0..clients.len())
        .filter(|&c| before[c] == "backend-1")
        .collect();
    assert!(
        !victims.is_empty() && victims.len() < clients.len(),
        "20 clients all went to one backend: {before:?}"
    );

    pool.kill(1);
    let killed_at = Instant::now();
    let outcomes = rounds_after_kill(&clients, proxy, ROUNDS);
    let lost: Vec<usize> = outcomes.iter().map(|o| o.lost).collect();
    let total_lost: usize = lost.iter().sum();
    eprintln!(
        "workers {workers}: {} of {} clients were on the killed backend; lost after the kill: \
         {total_lost} datagrams in all ({lost:?} per client), last loss after {:?}",
        victims.len(),
        clients.len(),
        outcomes
            .iter()
            .filter_map(|o| o.last_loss)
            .max()
            .map(|at| at - killed_at)
    );
    for (c, outcome) in outcomes.iter().enumerate() {
        if !victims.contains(&c) {
            assert_eq!(outcome.lost, 0, "client {c} of backend-0 lost datagrams");
        }
        assert!(
            outcome.tail_from_0 >= 10,
            "client {c}: its last datagrams were not all served by backend-0: {outcome:?}\n\
             --- sluice stderr ---\n{}",
            sluice.stderr_text()
        );
    }
    // Five failures eject; a datagram or two while the new table reaches the workers may add
    // to them.
    assert!(total_lost >= 5, "{total_lost} datagrams lost: {lost:?}");
    assert!(total_lost <= 10, "{total_lost} datagrams lost: {lost:?}");
    let ejected = series(
        "sluice_backend_state",
        &[
            ("listener", "kill"),
            ("backend", &dead.to_string()),
            ("state", "ejected"),
        ],
    );
    expect(&sluice, admin, &ejected, 1.0);
    // One session per client, all on backend-0. Each lost datagram's session was ended by its
    // ICMP error; a victim whose first datagram came after the ejection had its session on
    // backend-1 ended by that datagram instead. Nothing expired or was evicted, so every
    // session created and not ended is active.
    let active = udp_series("sluice_udp_sessions_active", "kill", None);
    expect(&sluice, admin, &active, clients.len() as f64);
    let closed = metric(admin, &ended("kill", "closed"));
    let created = metric(
        admin,
        &udp_series("sluice_udp_sessions_created_total", "kill", None),
    );
    assert!(
        closed >= total_lost as f64 && closed <= (total_lost + victims.len()) as f64,
        "{closed} sessions closed, {total_lost} datagrams lost, {} victims",
        victims.len()
    );
    assert_eq!(created, clients.len() as f64 + closed);
}

/// 100,000 flows, one datagram each, against `max_sessions: 10000` with `on_max_sessions:
/// drop`: 10,000 sessions, and exactly 90,000 datagrams dropped as `sessions_full`.
fn a_full_table_drops_exactly_the_overflow(workers: usize) {
    let report = flood(workers, "drop");
    let count = |key: &str| report.metrics.get(key).copied().unwrap_or(-1.0);
    let full = count(&dropped("flood", "sessions_full"));
    let created = count(&udp_series(
        "sluice_udp_sessions_created_total",
        "flood",
        None,
    ));
    assert_eq!(created + full, FLOWS as f64, "{report}");
    // 100,000 flows spread by the kernel's hash leave far more than 5,000 to each worker.
    assert_eq!(created, MAX_SESSIONS as f64, "{report}");
    assert_eq!(full, (FLOWS - MAX_SESSIONS) as f64, "{report}");
    assert_eq!(count(&ended("flood", "evicted")), 0.0, "{report}");
}

/// The same flood with `on_max_sessions: evict_lru`: every flow gets a session, and 90,000
/// are evicted to make room.
fn a_full_table_evicts_exactly_the_overflow(workers: usize) {
    let report = flood(workers, "evict_lru");
    let count = |key: &str| report.metrics.get(key).copied().unwrap_or(-1.0);
    let created = count(&udp_series(
        "sluice_udp_sessions_created_total",
        "flood",
        None,
    ));
    assert_eq!(created, FLOWS as f64, "{report}");
    assert_eq!(
        count(&ended("flood", "evicted")),
        (FLOWS - MAX_SESSIONS) as f64,
        "{report}"
    );
    assert_eq!(count(&dropped("flood", "sessions_full")), 0.0, "{report}");
}

/// `timeouts.idle: 500ms` in real time: the session ends on its own, counted as expired, and
/// the client's next datagram makes a new one and is answered.
fn an_idle_session_expires_and_the_client_gets_a_new_one(workers: usize) {
    let backend = UdpEcho::start("backend-0");
    let listener = udp("idle", &[backend.addr()]).with("timeouts: { idle: 500ms }");
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let socket = client(Ipv4Addr::new(127, 254, 14, 1));
    let active = udp_series("sluice_udp_sessions_active", "idle", None);
    let created = udp_series("sluice_udp_sessions_created_total", "idle", None);
    let expired = ended("idle", "expired");

    exchange(&socket, proxy, b"first").unwrap_or_else(|e| panic!("first datagram: {e}"));
    let answered = Instant::now();
    assert_eq!(metric(admin, &active), 1.0, "right after the reply");
    assert_eq!(metric(admin, &expired), 0.0);
    expect(&sluice, admin, &active, 0.0);
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(450),
        "expired after {idle_for:?}"
    );
    expect(&sluice, admin, &expired, 1.0);
    eprintln!("workers {workers}: the session expired {idle_for:?} after its reply");

    let reply = exchange(&socket, proxy, b"second").unwrap_or_else(|e| panic!("after expiry: {e}"));
    assert_eq!(reply.payload, b"second");
    expect(&sluice, admin, &created, 2.0);
    assert_eq!(metric(admin, &active), 1.0);
    assert_eq!(metric(admin, &ended("idle", "closed")), 0.0);
}

/// `per_packet: true` with round-robin: 40 datagrams from one client socket go alternately to
/// the two backends (each worker takes turns on its own, and one socket's flow stays on one
/// worker), and the backends' replies are not relayed: they are counted as `unclaimed`.
fn per_packet_alternates_backends_and_drops_replies(workers: usize) {
    const DATAGRAMS: usize = 40;
    let pool = UdpEchoPool::start(2);
    let listener = udp("statsd", &pool.addrs()).with("per_packet: true");
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let socket = client(Ipv4Addr::new(127, 254, 15, 1));
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for n in 0..DATAGRAMS {
        socket
            .send_to(format!("metric:{n}|c").as_bytes(), proxy)
            .unwrap();
    }
    let half = (DATAGRAMS / 2) as u64;
    for index in 0..2 {
        let backend = pool.backend(index).unwrap();
        let received = backend.wait_received(half, REPLY_TIMEOUT);
        assert_eq!(
            received,
            Ok(half),
            "backend-{index}: {:?}",
            backend.payloads()
        );
        let parities: HashSet<usize> = backend
            .payloads()
            .iter()
            .map(|p| sequence_number(p) % 2)
            .collect();
        assert_eq!(
            parities.len(),
            1,
            "backend-{index} did not get every other datagram"
        );
    }
    let mut buf = [0u8; 256];
    let stray = socket.recv_from(&mut buf);
    assert!(
        stray.is_err(),
        "a per_packet reply reached the client: {stray:?}"
    );
    let n = DATAGRAMS as f64;
    expect(&sluice, admin, &dropped("statsd", "unclaimed"), n);
    expect(&sluice, admin, &datagrams("statsd", "to_backend"), n);
    assert_eq!(metric(admin, &datagrams("statsd", "to_client")), 0.0);
    let created = udp_series("sluice_udp_sessions_created_total", "statsd", None);
    assert_eq!(metric(admin, &created), 0.0);
}

// ---- Echo checks ----

/// Each client (a socket on its own IP) sends every size in [`SIZES`] to each of its
/// destinations, in turn; checks every reply's payload and source, that each flow stays on one
/// backend, that the round-robin used all three, and the counters to the byte.
fn check_echo(
    sluice: &Sluice,
    admin: SocketAddr,
    name: &str,
    clients: &[(Ipv4Addr, Vec<SocketAddr>)],
) {
    let mut flows: HashMap<(Ipv4Addr, SocketAddr), String> = HashMap::new();
    let (mut sent, mut to_backend, mut to_client) = (0u64, 0u64, 0u64);
    for (c, (ip, destinations)) in clients.iter().enumerate() {
        let socket = client(*ip);
        for (k, &size) in SIZES.iter().enumerate() {
            for (d, &to) in destinations.iter().enumerate() {
                let payload = payload((c * 100 + k * 10 + d) as u64, size);
                let reply = exchange(&socket, to, &payload).unwrap_or_else(|e| {
                    panic!(
                        "client {ip} to {to}, {size} B: {e}\n{}",
                        sluice.stderr_text()
                    )
                });
                assert_eq!(reply.from, to, "the reply to {ip} came from elsewhere");
                assert_eq!(
                    summary_of(&reply.payload),
                    summary_of(&payload),
                    "{ip} to {to}"
                );
                let first = flows.entry((*ip, to)).or_insert(reply.backend.clone());
                assert_eq!(*first, reply.backend, "{ip} to {to} changed backend");
                sent += 1;
                to_backend += size as u64;
                to_client += (size + reply.backend.len() + 1) as u64;
            }
        }
    }
    let used: HashSet<&String> = flows.values().collect();
    assert_eq!(used.len(), 3, "{} flows reached only {used:?}", flows.len());
    for (key, value) in [
        (datagrams(name, "to_backend"), sent),
        (datagrams(name, "to_client"), sent),
        (bytes(name, "to_backend"), to_backend),
        (bytes(name, "to_client"), to_client),
        (
            udp_series("sluice_udp_sessions_created_total", name, None),
            flows.len() as u64,
        ),
        (
            udp_series("sluice_udp_sessions_active", name, None),
            flows.len() as u64,
        ),
    ] {
        expect(sluice, admin, &key, value as f64);
    }
    for reason in [
        "no_backend",
        "sessions_full",
        "truncated",
        "send_failed",
        "socket",
    ] {
        assert_eq!(
            metric(admin, &dropped(name, reason)),
            0.0,
            "dropped as {reason}"
        );
    }
}

/// Sluice with a udp listener on `0.0.0.0:PORT`, a port free for UDP a moment ago (tried again
/// on a new port if another process took it meanwhile); returns it, its admin and the port.
fn start_on_wildcard(workers: usize, backends: &[SocketAddr]) -> (Sluice, SocketAddr, u16) {
    let mut last = String::new();
    for _ in 0..3 {
        let port = UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.local_addr())
            .expect("a free udp port")
            .port();
        let listener = udp("wild", backends).bind(SocketAddr::from(([0, 0, 0, 0], port)));
        let admin = free_addr();
        let yaml = config(workers, Some(admin), &[], &[listener]);
        match Sluice::try_start(binary(), &yaml, sluice_testkit::READY_TIMEOUT) {
            Ok(sluice) => return (sluice, admin, port),
            Err(e) => last = e.to_string(),
        }
    }
    panic!("sluice did not start on a wildcard address: {last}");
}

/// Which backend index each client IP reaches; every IP sends from two sockets (two source
/// ports), two datagrams each, and must reach one backend from both.
fn maglev_affinity(
    sluice: &Sluice,
    proxy: SocketAddr,
    clients: &[Ipv4Addr],
) -> BTreeMap<Ipv4Addr, usize> {
    let mut seen = BTreeMap::new();
    for &ip in clients {
        let sockets = [client(ip), client(ip)];
        for socket in &sockets {
            let name = served_by(sluice, socket, proxy, 2);
            let index: usize = name
                .strip_prefix("backend-")
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected backend name {name:?}"));
            let first = *seen.entry(ip).or_insert(index);
            assert_eq!(
                first, index,
                "client {ip} moved from backend {first} to {index}"
            );
        }
    }
    seen
}

/// Sends `datagrams` datagrams from `socket` (each must be answered) and returns the name of
/// the backend that answered them all.
fn served_by(sluice: &Sluice, socket: &UdpSocket, proxy: SocketAddr, datagrams: usize) -> String {
    let mut names = HashSet::new();
    for n in 0..datagrams {
        let reply = exchange(socket, proxy, format!("hello {n}").as_bytes())
            .unwrap_or_else(|e| panic!("{e}\n--- sluice stderr ---\n{}", sluice.stderr_text()));
        names.insert(reply.backend);
    }
    assert_eq!(names.len(), 1, "one socket's datagrams reached {names:?}");
    names.into_iter().next().unwrap()
}

// ---- The killed backend ----

/// What one client saw after the kill.
#[derive(Debug, Default)]
struct AfterKill {
    /// Datagrams that got no reply.
    lost: usize,
    /// When the last of them was sent.
    last_loss: Option<Instant>,
    /// Consecutive replies from backend-0 at the end.
    tail_from_0: usize,
    /// Replies from any other backend (there is none alive).
    others: Vec<String>,
}

/// `rounds` rounds, each one datagram from every client with a short timeout, bounded in time
/// as well (a lost datagram costs its timeout).
fn rounds_after_kill(clients: &[UdpSocket], proxy: SocketAddr, rounds: usize) -> Vec<AfterKill> {
    const LOSS_TIMEOUT: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut outcomes: Vec<AfterKill> = clients.iter().map(|_| AfterKill::default()).collect();
    for round in 0..rounds {
        for (c, socket) in clients.iter().enumerate() {
            let payload = format!("round {round} client {c}");
            let sent_at = Instant::now();
            let outcome = &mut outcomes[c];
            match exchange_within(socket, proxy, payload.as_bytes(), LOSS_TIMEOUT) {
                Ok(reply) if reply.backend == "backend-0" => outcome.tail_from_0 += 1,
                Ok(reply) => {
                    outcome.tail_from_0 = 0;
                    outcome.others.push(reply.backend);
                }
                Err(_) => {
                    outcome.tail_from_0 = 0;
                    outcome.lost += 1;
                    outcome.last_loss = Some(sent_at);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "30 s passed after {round} rounds: {outcomes:?}"
        );
    }
    outcomes
}

// ---- The flood ----

/// Distinct client flows in the flood.
const FLOWS: usize = 100_000;
/// The flood listener's `max_sessions`.
const MAX_SESSIONS: usize = 10_000;

/// What a flood left behind, for the assertions and their messages.
struct FloodReport {
    metrics: HashMap<String, f64>,
    rss_growth_kib: i64,
    elapsed: Duration,
    kernel_drops: u64,
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut udp: Vec<_> = self
            .metrics
            .iter()
            .filter(|(k, _)| k.starts_with("sluice_udp_"))
            .collect();
        udp.sort_by(|a, b| a.0.cmp(b.0));
        write!(
            f,
            "flood of {FLOWS} flows in {:?}, RSS growth {} KiB, kernel UDP receive-buffer drops \
             meanwhile (whole host) {}:",
            self.elapsed, self.rss_growth_kib, self.kernel_drops
        )?;
        for (key, value) in udp {
            write!(f, "\n  {key} {value}")?;
        }
        Ok(())
    }
}

/// 100,000 flows, each a socket bound to its own `127.251.x.y`/`127.252.x.y` address that sends
/// one datagram and closes, against `max_sessions: 10000` with `policy`. The sender waits
/// whenever Sluice is more than two batches behind, so that the listener sockets' receive
/// buffers never overflow and every datagram is counted by Sluice. Checks what holds for both
/// policies: memory bounded, 10,000 sessions active, no other drop.
fn flood(workers: usize, policy: &str) -> FloodReport {
    const BATCH: usize = 64;
    let backend = UdpEcho::start("backend-0");
    let listener = udp("flood", &[backend.addr()])
        .with(&format!("max_sessions: {MAX_SESSIONS}"))
        .with(&format!("on_max_sessions: {policy}"));
    let proxy = listener.bind;
    let (sluice, admin) = start(workers, &[listener]);
    let rss_before = sluice.rss_kib();
    let kernel_before = udp_receive_buffer_errors();
    let started = Instant::now();
    let deadline = started + TIMEOUT;
    let mut sent = 0;
    while sent < FLOWS {
        for _ in 0..BATCH.min(FLOWS - sent) {
            let socket = UdpSocket::bind((flow_ip(sent), 0)).expect("bind a flow's client");
            socket
                .send_to(&(sent as u32).to_be_bytes(), proxy)
                .expect("send a flow's datagram");
            sent += 1;
        }
        let behind = sent.saturating_sub(2 * BATCH);
        while processed(admin) < behind as f64 {
            assert!(Instant::now() < deadline, "flood stalled at {sent} flows");
            // Each look renders every metric: looking less often leaves Sluice the CPU.
            thread::sleep(Duration::from_millis(1));
        }
    }
    let settle = Instant::now() + METRIC_TIMEOUT;
    while processed(admin) < FLOWS as f64 && Instant::now() < settle {
        thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    let report = FloodReport {
        metrics: scrape_metrics(admin).expect("scrape /metrics"),
        rss_growth_kib: sluice.rss_kib() as i64 - rss_before as i64,
        elapsed,
        kernel_drops: udp_receive_buffer_errors() - kernel_before,
    };
    eprintln!(
        "workers {workers}, {policy}: {FLOWS} flows in {elapsed:?}; RSS {rss_before} KiB + {} KiB; \
         {} fds open; sluice CPU {:?}; backend received {}",
        report.rss_growth_kib,
        sluice.fd_count(),
        sluice.cpu_time(),
        backend.received()
    );
    assert_eq!(processed_in(&report.metrics), FLOWS as f64, "{report}");
    let active = udp_series("sluice_udp_sessions_active", "flood", None);
    assert_eq!(
        report.metrics.get(&active),
        Some(&(MAX_SESSIONS as f64)),
        "{report}"
    );
    for reason in ["no_backend", "truncated", "socket"] {
        assert_eq!(
            report.metrics.get(&dropped("flood", reason)),
            Some(&0.0),
            "{report}"
        );
    }
    assert!(report.rss_growth_kib < 64 * 1024, "{report}");
    report
}

/// The `n`th flow's client address: 127.251.0.0 onwards.
fn flow_ip(n: usize) -> Ipv4Addr {
    let n = n as u32;
    Ipv4Addr::new(127, 251 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// Datagrams from clients Sluice has dealt with: forwarded, or dropped on their way in.
fn processed(admin: SocketAddr) -> f64 {
    scrape_metrics(admin).map_or(0.0, |m| processed_in(&m))
}

fn processed_in(metrics: &HashMap<String, f64>) -> f64 {
    let get = |key: String| metrics.get(&key).copied().unwrap_or(0.0);
    get(datagrams("flood", "to_backend"))
        + ["no_backend", "sessions_full", "truncated", "socket"]
            .iter()
            .map(|reason| get(dropped("flood", reason)))
            .sum::<f64>()
}

/// The host's `Udp: RcvbufErrors` (datagrams dropped for a full receive buffer), for messages.
fn udp_receive_buffer_errors() -> u64 {
    let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

// ---- DNS ----

/// A `dnsmasq` serving `example.test` as 10.1.2.3 (UDP and TCP) on a loopback address of its
/// own, in the foreground; killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Dnsmasq {
    fn start() -> Self {
        let program = installed("dnsmasq");
        installed("dig");
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "sluice-dnsmasq-{}-{}",
            std::process::id(),
            addr.port()
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let child = Command::new(program)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--listen-address={}", addr.ip()))
            .arg("--address=/example.test/10.1.2.3")
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-facility={}", dir.join("log").display()))
            // As root it would switch to `nobody`, which may not read its log's directory.
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        let mut dns = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = dig(addr);
            if answer.as_deref() == Ok("10.1.2.3") {
                return dns;
            }
            let exited = dns.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "dnsmasq on {addr} does not answer (exit {exited:?}, last dig {answer:?})\n\
                 --- log ---\n{}",
                dns.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `dig @IP -p PORT example.test +short` with one try of 2 s: the answer, or what went wrong.
fn dig(server: SocketAddr) -> Result<String, String> {
    let mut command = Command::new(installed("dig"));
    command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["example.test", "+short", "+tries=1", "+time=2"]);
    let out = run_with_timeout(&mut command, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{}: {}{}", out.status, out.stdout, out.stderr));
    }
    Ok(out.stdout.trim().to_owned())
}

/// The path of `program`, looked up in PATH and the sbin directories (dnsmasq lives in
/// /usr/sbin, often outside a user's PATH); panics naming the install script when it is missing.
fn installed(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: run scripts/install-deps.sh (Debian packages)")
        })
}

// ---- Clients, config and metrics ----

/// A udp listener named `name` on a fresh loopback address, round-robin over `backends`.
fn udp(name: &str, backends: &[SocketAddr]) -> Listener {
    Listener::new(name, backends).protocol("udp")
}

/// Sluice with `listeners` and an admin endpoint; returns it and the admin's address.
fn start(workers: usize, listeners: &[Listener]) -> (Sluice, SocketAddr) {
    let admin = free_addr();
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], listeners));
    (sluice, admin)
}

/// A client socket on `ip`, any port.
fn client(ip: Ipv4Addr) -> UdpSocket {
    UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"))
}

/// An echo reply: where it came from, which backend sent it, and the echoed payload.
#[derive(Debug)]
struct Reply {
    from: SocketAddr,
    backend: String,
    payload: Vec<u8>,
}

/// Sends `payload` to `to` and waits (at most [`REPLY_TIMEOUT`]) for its echo.
fn exchange(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Result<Reply, String> {
    exchange_within(socket, to, payload, REPLY_TIMEOUT)
}

/// Sends `payload` to `to` and waits at most `timeout` for its echo, passing over late echoes
/// of earlier datagrams.
fn exchange_within(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Reply, String> {
    socket
        .send_to(payload, to)
        .map_err(|e| format!("send {} B to {to}: {e}", payload.len()))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no reply to {} B within {timeout:?}",
                payload.len()
            ));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let (backend, echoed) = split_echo_reply(&buf[..len])
            .ok_or_else(|| format!("a reply without a backend name from {from}"))?;
        if echoed == payload {
            return Ok(Reply {
                from,
                backend: backend.to_owned(),
                payload: echoed.to_vec(),
            });
        }
    }
}

/// `len` seeded pseudo-random bytes (xorshift), different for each `seed`.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The `n` of a `metric:n|c` datagram.
fn sequence_number(datagram: &[u8]) -> usize {
    let text = String::from_utf8_lossy(datagram);
    text.strip_prefix("metric:")
        .and_then(|rest| rest.strip_suffix("|c"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected datagram {text:?}"))
}

/// The key of a udp listener's series, with one more label when given.
fn udp_series(name: &str, listener: &str, label: Option<(&str, &str)>) -> String {
    match label {
        Some(label) => series(name, &[("listener", listener), label]),
        None => series(name, &[("listener", listener)]),
    }
}

fn datagrams(listener: &str, direction: &str) -> String {
    udp_series(
        "sluice_udp_datagrams_total",
        listener,
        Some(("direction", direction)),
    )
}

fn bytes(listener: &str, direction: &str) -> String {
    udp_series(
        "sluice_udp_bytes_total",
        listener,
        Some(("direction", direction)),
    )
}

fn ended(listener: &str, reason: &str) -> String {
    udp_series(
        "sluice_udp_sessions_ended_total",
        listener,
        Some(("reason", reason)),
    )
}

fn dropped(listener: &str, reason: &str) -> String {
    udp_series(
        "sluice_udp_dropped_total",
        listener,
        Some(("reason", reason)),
    )
}

/// The value of `key` now; panics when the series is absent.
fn metric(admin: SocketAddr, key: &str) -> f64 {
    let metrics = scrape_metrics(admin).expect("scrape /metrics");
    *metrics.get(key).unwrap_or_else(|| {
        let mut udp: Vec<&String> = metrics.keys().filter(|k| k.contains("udp")).collect();
        udp.sort();
        panic!("no series {key} in /metrics; udp series: {udp:#?}")
    })
}

/// Waits (bounded) until `key` reads `expected`; panics with the last value and Sluice's log.
fn expect(sluice: &Sluice, admin: SocketAddr, key: &str, expected: f64) {
    let value = wait_metric(admin, key, expected, METRIC_TIMEOUT);
    assert_eq!(
        value,
        Some(expected),
        "{key}\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );
}

/// SIGTERM with udp sessions open: Sluice exits at once (no connection to wait for), with 0.
fn open_sessions_never_delay_shutdown(workers: usize) {
    let pool = UdpEchoPool::start(1);
    let listener = udp("bye", &pool.addrs());
    let proxy = listener.bind;
    let (mut sluice, admin) = start(workers, &[listener]);
    let clients: Vec<UdpSocket> = (1..=8)
        .map(|i| client(Ipv4Addr::new(127, 254, 9, i)))
        .collect();
    for c in &clients {
        exchange(c, proxy, b"hello").expect("an echo before shutdown");
    }
    expect(
        &sluice,
        admin,
        &udp_series("sluice_udp_sessions_active", "bye", None),
        8.0,
    );
    let asked = Instant::now();
    let status = sluice
        .terminate(Duration::from_secs(5))
        .expect("exits within 5 s with sessions open");
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for udp sessions",
        asked.elapsed()
    );
}

/// A listener on `[::]` serves IPv6 clients and, through the dual-stack socket, IPv4 ones;
/// each reply comes from the address its client sent to.
fn ipv6_and_ipv4_clients_of_a_dual_stack_bind_get_replies_from_where_they_sent(workers: usize) {
    if !sluice_testkit::ipv6_loopback_available() {
        panic!("::1 is not configured: the IPv6 tests need a loopback with IPv6");
    }
    let backend =
        UdpEcho::start_on("[::1]:0".parse().unwrap(), "backend-0").expect("an IPv6 echo backend");
    let port = UdpSocket::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listener = udp("dual", &[backend.addr()]).bind(SocketAddr::from(([0u16; 8], port)));
    let (_sluice, _admin) = start(workers, &[listener]);
    let v6 = UdpSocket::bind("[::1]:0").unwrap();
    let to6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let reply = exchange(&v6, to6, b"over six").expect("an IPv6 echo");
    assert_eq!(reply.from, to6);
    let v4 = client(Ipv4Addr::new(127, 254, 10, 1));
    let to4: SocketAddr = format!("127.0.0.9:{port}").parse().unwrap();
    let reply = exchange(&v4, to4, b"over four").expect("an IPv4 echo through [::]");
    assert_eq!(
        reply.from, to4,
        "the reply leaves from the IPv4 address the client used"
    );
}

/// A reload removes a backend: its sessions move to a live backend on their next datagram,
/// without losing one, rather than staying pinned until they expire.
fn sessions_of_a_removed_backend_move_on_their_next_datagram(workers: usize) {
    let pool = UdpEchoPool::start(2);
    let listener = udp("moving", &pool.addrs());
    let proxy = listener.bind;
    let admin = free_addr();
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], std::slice::from_ref(&listener)),
    );
    let clients: Vec<UdpSocket> = (1..=12)
        .map(|i| client(Ipv4Addr::new(127, 254, 11, i)))
        .collect();
    let before: Vec<String> = clients
        .iter()
        .map(|c| served_by(&sluice, c, proxy, 2))
        .collect();
    assert!(before.iter().any(|b| b == "backend-1"), "{before:?}");
    // The same listener with backend-1 removed.
    let kept = udp("moving", &pool.addrs()[..1]).bind(proxy);
    let path = sluice.config_path().expect("a config file");
    std::fs::write(path, config(workers, Some(admin), &[], &[kept])).unwrap();
    sluice.signal(sluice_testkit::Signal::SIGHUP);
    let deadline = Instant::now() + METRIC_TIMEOUT;
    while !sluice.stderr_text().contains("reloaded") {
        assert!(
            Instant::now() < deadline,
            "no reload:\n{}",
            sluice.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the workers adopt the new snapshot.
    std::thread::sleep(Duration::from_millis(200));
    for (c, was) in clients.iter().zip(&before) {
        let reply = exchange(c, proxy, b"after the reload").expect("no datagram lost");
        assert_eq!(
            reply.backend, "backend-0",
            "a client of {was} stayed pinned"
        );
    }
    let moved = before.iter().filter(|b| *b == "backend-1").count() as f64;
    expect(&sluice, admin, &ended("moving", "closed"), moved);
}
