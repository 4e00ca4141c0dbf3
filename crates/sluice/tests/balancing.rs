//! Backend choice through the real binary: every algorithm on loopback, with backends that say
//! who they are (each greets with its name), and clients bound to distinct source addresses.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use sluice_balance::maglev::MaglevTable;
use sluice_balance::{Backend, BackendId};
use sluice_testkit::{EchoServer, Sluice, free_addr, refusing_addr, scrape_metrics};
use socket2::{Domain, Socket, Type};

use common::{
    Listener, TIMEOUT, assert_maglev_choices, binary, client_key, config, equal_weight_table,
};

/// Backends that greet every connection with `backend-<i>\n`, then echo.
fn greeting_backends(count: usize) -> Vec<EchoServer> {
    (0..count)
        .map(|i| EchoServer::greeting(format!("backend-{i}\n").as_bytes()))
        .collect()
}

/// The greeting's length: `backend-<i>\n` with a one-digit `i`.
const GREETING_LEN: usize = "backend-0\n".len();

/// Connects to `proxy` from `source` (any port), reads the greeting, checks the echo of a few
/// bytes, and returns the connection with the index of the backend that answered.
fn connect_from(proxy: SocketAddr, source: Option<Ipv4Addr>) -> (TcpStream, usize) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    if let Some(ip) = source {
        socket
            .bind(&SocketAddr::from((ip, 0)).into())
            .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    }
    socket
        .connect_timeout(&proxy.into(), Duration::from_secs(10))
        .expect("connect to sluice");
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; GREETING_LEN];
    stream
        .read_exact(&mut greeting)
        .expect("the backend's greeting");
    let text = std::str::from_utf8(&greeting).expect("ascii greeting");
    let index = text
        .strip_prefix("backend-")
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {text:?}"));
    stream.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    stream
        .read_exact(&mut echo)
        .expect("echo through the chosen backend");
    assert_eq!(&echo, b"ping");
    (stream, index)
}

/// One request-and-close: the index of the backend that served a connection from `source`.
fn served_by(proxy: SocketAddr, source: Option<Ipv4Addr>) -> usize {
    let (stream, index) = connect_from(proxy, source);
    let _ = stream.shutdown(Shutdown::Write);
    index
}

/// Distinct client source addresses, outside the block `free_addr` hands to listeners.
fn client_ips(count: u8) -> Vec<Ipv4Addr> {
    (1..=count)
        .map(|i| Ipv4Addr::new(127, 254, i / 16 + 1, i))
        .collect()
}

/// Counts per backend index over `connections` sequential connections.
fn split(proxy: SocketAddr, backends: usize, connections: usize) -> Vec<usize> {
    let mut counts = vec![0; backends];
    for _ in 0..connections {
        counts[served_by(proxy, None)] += 1;
    }
    counts
}

/// Starts Sluice with an admin endpoint; returns it, the listener's and the admin's address.
fn start_with_admin(workers: usize, listener: Listener) -> (Sluice, SocketAddr, SocketAddr) {
    let (bind, admin) = (listener.bind, free_addr());
    let yaml = config(workers, Some(admin), &[], &[listener]);
    (Sluice::start(binary(), &yaml), bind, admin)
}

/// The `fingerprint` label of `sluice_balance_info` for `listener` on the admin at `admin`.
fn exported_fingerprint(admin: SocketAddr, listener: &str) -> String {
    let metrics = scrape_metrics(admin).expect("scrape /metrics");
    let wanted = format!("listener=\"{listener}\"");
    let key = metrics
        .keys()
        .find(|k| k.starts_with("sluice_balance_info{") && k.contains(&wanted))
        .unwrap_or_else(|| panic!("no sluice_balance_info for {listener}"));
    let start = key.find("fingerprint=\"").expect("a fingerprint label") + "fingerprint=\"".len();
    key[start..start + 16].to_owned()
}

fn start(workers: usize, listener: Listener) -> (Sluice, SocketAddr) {
    let bind = listener.bind;
    (
        Sluice::start(binary(), &config(workers, None, &[], &[listener])),
        bind,
    )
}

/// Which backend each client IP reaches, asked `repeats` times from new source ports; panics
/// if one client reaches two backends.
fn affinity(proxy: SocketAddr, clients: &[Ipv4Addr], repeats: usize) -> HashMap<Ipv4Addr, usize> {
    let mut seen = HashMap::new();
    for _ in 0..repeats {
        for &ip in clients {
            let index = served_by(proxy, Some(ip));
            let first = *seen.entry(ip).or_insert(index);
            assert_eq!(
                first, index,
                "client {ip} moved from backend {first} to {index}"
            );
        }
    }
    seen
}

/// `maglev` with `hash_key: client_ip`: each client IP sticks to one backend from every worker
/// (repeats use new source ports, which SO_REUSEPORT spreads over the workers); a second
/// instance with the backends listed in another order agrees client by client; and both agree
/// with the table this test builds itself from the same addresses.
fn maglev_sends_each_client_to_the_same_backend_on_every_instance(workers: usize) {
    let servers = greeting_backends(4);
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let first = Listener::new("maglev", &addrs).algorithm("maglev");
    let reordered: Vec<SocketAddr> = [2, 0, 3, 1].iter().map(|&i| addrs[i]).collect();
    let second = Listener::new("maglev", &reordered).algorithm("maglev");
    let (sluice_a, proxy_a, admin_a) = start_with_admin(workers, first);
    let (sluice_b, proxy_b, admin_b) = start_with_admin(workers, second);
    let clients = client_ips(40);
    let on_a = affinity(proxy_a, &clients, 3);
    let on_b = affinity(proxy_b, &clients, 1);
    assert_eq!(on_a, on_b, "the two instances disagree");
    // The expected table, built here from the addresses alone.
    assert_maglev_choices(&addrs, &on_a);
    let used: std::collections::HashSet<usize> = on_a.values().copied().collect();
    assert!(used.len() >= 3, "40 clients reached only backends {used:?}");
    // Both export the fingerprint of that same table.
    let expected = format!("{:016x}", equal_weight_table(&addrs).fingerprint());
    assert_eq!(exported_fingerprint(admin_a, "maglev"), expected);
    assert_eq!(exported_fingerprint(admin_b, "maglev"), expected);
    drop((sluice_a, sluice_b));
}

/// `ring_hash` keeps clients on their backend too, and `hash_key: client_ip_port` spreads one
/// host's connections over several backends.
fn ring_hash_sticks_by_ip_and_spreads_by_port(workers: usize) {
    let servers = greeting_backends(4);
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let (_by_ip, proxy) = start(
        workers,
        Listener::new("ring", &addrs).algorithm("ring_hash"),
    );
    let on_ring = affinity(proxy, &client_ips(20), 3);
    let used: std::collections::HashSet<usize> = on_ring.values().copied().collect();
    assert!(used.len() >= 2, "20 clients reached only backends {used:?}");
    let by_port = Listener::new("ports", &addrs)
        .algorithm("ring_hash")
        .with("hash_key: client_ip_port");
    let (_by_port, proxy) = start(workers, by_port);
    let ip = Ipv4Addr::new(127, 254, 200, 1);
    let reached: std::collections::HashSet<usize> =
        (0..40).map(|_| served_by(proxy, Some(ip))).collect();
    assert!(
        reached.len() >= 3,
        "one host's 40 connections reached only {reached:?}"
    );
}

/// Weighted round-robin 1:3 splits 400 connections 100:300 (each worker is exact over every
/// four of its own picks, so two workers can be off by a few).
fn round_robin_1_to_3_splits_400_connections(workers: usize) {
    let servers = greeting_backends(2);
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let (_sluice, proxy) = start(workers, Listener::new("wrr", &addrs).weights(&[1, 3]));
    let counts = split(proxy, 2, 400);
    let slack = 3 * workers - 3;
    assert!(counts[0].abs_diff(100) <= slack, "{counts:?}");
    assert_eq!(counts[0] + counts[1], 400);
}

/// Weighted random 1:3 over 400 connections: about 100:300 (binomial: sd 8.7; 40 is 4.6 sd).
fn random_1_to_3_splits_400_connections_roughly(workers: usize) {
    let servers = greeting_backends(2);
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let listener = Listener::new("random", &addrs)
        .algorithm("random")
        .weights(&[1, 3]);
    let (_sluice, proxy) = start(workers, listener);
    let counts = split(proxy, 2, 400);
    assert!(counts[0].abs_diff(100) <= 40, "{counts:?}");
}

/// With connections held open, a new one goes to the backend with fewer: after backend B's
/// connections close, the next two both go to B, whichever worker accepts them.
fn fewer_open_connections_win(workers: usize, algorithm: &str) {
    let servers = greeting_backends(2);
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let (_sluice, proxy) = start(workers, Listener::new("lc", &addrs).algorithm(algorithm));
    let mut held: Vec<(TcpStream, usize)> = (0..4).map(|_| connect_from(proxy, None)).collect();
    let on =
        |held: &Vec<(TcpStream, usize)>, b: usize| held.iter().filter(|(_, i)| *i == b).count();
    assert_eq!(
        (on(&held, 0), on(&held, 1)),
        (2, 2),
        "{algorithm}: four connections split unevenly"
    );
    // Close backend 1's connections and wait until the backend has seen both end: by then
    // Sluice has closed them and uncounted them.
    held.retain(|(stream, index)| {
        if *index == 1 {
            stream.shutdown(Shutdown::Both).unwrap();
        }
        *index != 1
    });
    servers[1]
        .wait_records(2, TIMEOUT)
        .expect("backend 1's connections end");
    for _ in 0..2 {
        let (stream, index) = connect_from(proxy, None);
        assert_eq!(
            index, 1,
            "{algorithm}: backend 0 has 2 open, backend 1 fewer"
        );
        held.push((stream, index));
    }
    assert_eq!((on(&held, 0), on(&held, 1)), (2, 2));
}

fn least_connections_prefers_fewer_open_connections(workers: usize) {
    fewer_open_connections_win(workers, "least_connections");
}

fn power_of_two_prefers_fewer_open_connections(workers: usize) {
    // With two backends both are always drawn, so P2C must choose like least_connections.
    fewer_open_connections_win(workers, "power_of_two");
}

/// A client whose Maglev backend refuses connections is retried on the table's next choice for
/// it, the same one every time, and every client is served. Passive ejection is off here: it
/// would take the backend out of the table (see the next test) in the middle of the check.
fn maglev_retries_a_refused_backend_on_a_stable_next_choice(workers: usize) {
    let servers = greeting_backends(3);
    let mut addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    addrs.push(refusing_addr());
    let listener = Listener::new("retry", &addrs)
        .algorithm("maglev")
        .with("passive: { consecutive_failures: 0 }");
    let (_sluice, proxy) = start(workers, listener);
    let clients = client_ips(40);
    let seen = affinity(proxy, &clients, 2);
    let table = equal_weight_table(&addrs);
    let retried = clients
        .iter()
        .filter(|&&ip| table.lookup(client_key(ip)) == Some(BackendId(3)))
        .count();
    assert!(retried > 0, "no client maps to the refusing backend");
    for ip in &clients {
        let expected = table.pick(client_key(*ip), &[BackendId(3)]).unwrap();
        assert_eq!(seen[ip], expected.index(), "client {ip}");
    }
}

/// With an active check the refusing backend is down from the first probe, so the table is
/// built without it: every client gets what a table of the other three gives it.
fn maglev_leaves_a_down_backend_out_of_the_table(workers: usize) {
    let servers = greeting_backends(3);
    let mut addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    addrs.push(refusing_addr());
    let listener = Listener::new("down", &addrs)
        .algorithm("maglev")
        .with("health: { check: tcp, interval: 1s, timeout: 500ms }");
    let (_sluice, proxy) = start(workers, listener);
    let clients = client_ips(40);
    let seen = affinity(proxy, &clients, 2);
    let without = equal_weight_table(&addrs[..3]);
    for ip in &clients {
        let expected = without.lookup(client_key(*ip)).unwrap();
        assert_eq!(seen[ip], expected.index(), "client {ip}");
    }
}

with_workers_1_and_2!(
    maglev_retries_a_refused_backend_on_a_stable_next_choice,
    maglev_leaves_a_down_backend_out_of_the_table,
    maglev_sends_each_client_to_the_same_backend_on_every_instance,
    ring_hash_sticks_by_ip_and_spreads_by_port,
    round_robin_1_to_3_splits_400_connections,
    random_1_to_3_splits_400_connections_roughly,
    least_connections_prefers_fewer_open_connections,
    power_of_two_prefers_fewer_open_connections,
);

/// `sluice inspect` in two processes, with the backends in different orders: the same
/// fingerprint and shares; a different backend set: a different fingerprint.
#[test]
fn inspect_prints_equal_fingerprints_for_equal_backend_sets() {
    let yaml = |backends: &[&str], weights: &[u16]| {
        let mut text = String::from(
            "listeners:\n  - name: redis\n    bind: \"127.0.0.1:6379\"\n    algorithm: maglev\n    backends:\n",
        );
        for (b, w) in backends.iter().zip(weights) {
            text.push_str(&format!("      - {{ address: \"{b}\", weight: {w} }}\n"));
        }
        text
    };
    let inspect = |yaml: String| {
        let file = sluice_testkit::ConfigFile::new(&yaml);
        let out = Command::new(binary())
            .args(["inspect", "-c"])
            .arg(file.path())
            .output()
            .expect("run sluice inspect");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fingerprint = |report: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix("fingerprint "))
            .expect("a fingerprint line")
            .to_owned()
    };
    let a = inspect(yaml(
        &["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"],
        &[1, 1, 2],
    ));
    let b = inspect(yaml(
        &["10.0.0.3:6379", "10.0.0.1:6379", "10.0.0.2:6379"],
        &[2, 1, 1],
    ));
    let c = inspect(yaml(
        &["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.4:6379"],
        &[1, 1, 2],
    ));
    assert_eq!(fingerprint(&a), fingerprint(&b));
    assert_ne!(fingerprint(&a), fingerprint(&c));
    assert!(
        a.contains("maglev, hash_key client_ip, table_size 65537"),
        "{a}"
    );
    // Weight 2 of 4: half the slots (the fill is exact to one slot).
    let line = a.lines().find(|l| l.contains("10.0.0.3:6379")).unwrap();
    let slots: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
    assert!(slots.abs_diff(65537 / 2) <= 1, "{line}");
    // The fingerprint is the table's, as built in this process from the same addresses.
    let backends: Vec<Backend> = ["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"]
        .iter()
        .zip([1, 1, 2])
        .enumerate()
        .map(|(i, (a, w))| Backend::new(BackendId(i as u32), a.parse().unwrap(), w))
        .collect();
    let table = MaglevTable::build(&backends, 65537);
    assert_eq!(fingerprint(&a), format!("{:016x}", table.fingerprint()));
}
